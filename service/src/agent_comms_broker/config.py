"""The broker's settings: one table of names, environment variables and defaults.

Flags of `agent-comms-broker serve` are written into the environment, so the gunicorn
config file, the WSGI app and every worker read the same values from one place.
"""

import os
import re
from dataclasses import dataclass, field, fields

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConfigError(ValueError):
    """A setting has a value the broker cannot use."""


def duration(text):
    """Seconds from '90', '90s', '15m', '12h' or '30d'."""
    match = _DURATION.fullmatch(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 30, 15m, 12h or 7d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def size(text):
    """Bytes from '65536', '64k', '16m', '6g' (binary: k is 1024; KiB, MB... accepted)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size such as 65536, 64k, 16m or 6g")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def positive_size(text):
    value = size(text)
    if value < 1:
        raise ValueError(f"{text!r} is not a size of 1 byte or more")
    return value


def synchronous(text):
    value = str(text).strip().upper()
    if value not in ("NORMAL", "FULL"):
        raise ValueError(f"{text!r} is not NORMAL or FULL")
    return value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError(f"{text!r} is not a whole number of 1 or more")
    return value


def count(text):
    value = int(text)
    if value < 0:
        raise ValueError(f"{text!r} is not a whole number of 0 or more")
    return value


def one_of(*choices):
    """A parser of a setting that is one of `choices` (any case)."""

    def parse(text):
        value = str(text).strip().lower()
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return parse


AUTH_MODES = ("open", "write-requires-token", "required")
auth_mode = one_of(*AUTH_MODES)
metrics_mode = one_of("off", "open", "token")


def switch(text):
    value = str(text).strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{text!r} is not on or off (1, true, on / 0, false, off)")


def networks(text):
    """Comma-separated addresses or networks (192.168.122.10, 10.0.0.0/24, ::1)."""
    import ipaddress

    values = []
    for part in filter(None, (part.strip() for part in str(text).split(","))):
        try:
            values.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not an address or network such as 192.168.122.10 or 10.0.0.0/24") from None
    return tuple(values)


def origins(text):
    """A comma-separated list of browser origins such as https://dash.lan:3000, or *."""
    values = tuple(part.strip().rstrip("/") for part in str(text).split(",") if part.strip())
    for value in values:
        if value != "*" and not re.fullmatch(r"https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an origin such as https://dash.lan:3000 (or *)")
    return values


def channel_patterns(text):
    """Comma-separated channel names or patterns, as a token's grants take them."""
    from .auth import TokenError, parse_patterns

    try:
        return parse_patterns(str(text))
    except TokenError as error:
        raise ValueError(str(error)) from None


def rate(text):
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a number of 0 or more")
    return value


def positive_duration(text):
    value = duration(text)
    if value <= 0:
        raise ValueError(f"{text!r} is not a duration above zero")
    return value


def database_url(text):
    """A PostgreSQL URL (postgresql://user:password@host:port/database?options)."""
    text = str(text).strip()
    if not re.match(r"postgres(ql)?://", text):
        raise ValueError("give a PostgreSQL URL such as postgresql://agent_comms:PASSWORD@db.lan/agent_comms")
    return text


def redacted(url):
    """A database URL without its password (user:PASSWORD@, even holding a raw @, or a
    password= parameter), for messages and logs."""
    scheme, separator, rest = url.partition("://")
    if separator and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        if ":" in credentials:
            rest = f"{credentials.partition(':')[0]}:***@{host}"
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", scheme + separator + rest)


def redacted_error(error, url):
    """An error about the database at `url` on one line, the password taken out wherever
    the driver quoted the URL or its parts."""
    text = one_line(error).replace(url, redacted(url))
    return re.sub(r"(?i)(password=)\S*", r"\1***", text)


def one_line(error):
    """An error's text on one line (psycopg's span several)."""
    return " ".join(str(error).split())


def setting(default, parse=str):
    """A field of Settings: its default, and how to read it from the environment."""
    return field(default=default, metadata={"parse": parse})


@dataclass(frozen=True)
class Settings:
    """Every setting, with its default. The environment variable is AGENT_COMMS_<NAME>."""

    bind: str = setting("0.0.0.0:8080")
    db: str = setting("/opt/agent-comms/messages.db")
    # PostgreSQL instead of the SQLite file `db`: several broker nodes share one database.
    database_url: str = setting("", database_url)
    workers: int = setting(2, positive_int)
    # gevent connections one worker holds at once: watchers plus requests in flight.
    worker_connections: int = setting(4096, positive_int)
    # FULL: a 2xx survives a power cut (fsync per group commit). NORMAL: survives a killed
    # process; a power cut may drop the last commits, never corrupt the file.
    synchronous: str = setting("FULL", synchronous)
    # open: anyone may read and post (the old broker's behaviour). write-requires-token:
    # posts need a token, reads do not. required: everything but /healthz needs a token.
    auth: str = setting("open", auth_mode)
    # HTTPS when both are set: PEM certificate (chain) and private key.
    tls_cert: str = setting("")
    tls_key: str = setting("")
    # Token bucket per agent (per address for anonymous callers), shared by all workers:
    # `rate_limit` requests a second on average, bursts of up to `rate_burst`. 0: off.
    rate_limit: float = setting(100.0, rate)
    rate_burst: int = setting(200, positive_int)
    # What an agent (an address, anonymous) may store: a bucket of bytes of message text
    # and names, refilled at `byte_rate` a second, holding at most `byte_burst`. 0: off.
    # The default lets one client fill 5.4 GiB a day at the most.
    byte_rate: int = setting(65536, size)
    byte_burst: int = setting(16 << 20, positive_size)
    # Bytes of request bodies being read and of large replies being written that one agent
    # (an address, anonymous) holds at once, all workers together (429 past it). 0: no cap.
    max_inflight: int = setting(16 << 20, size)
    # Open SSE streams per agent (per address for anonymous callers). 0: no cap.
    max_streams: int = setting(64, count)
    # Channels the broker creates at most; posts to existing channels still work. 0: no cap.
    max_channels: int = setting(10000, count)
    # Agents the broker registers at most (posts by a new sender past it: 409). 0: no cap.
    max_agents: int = setting(10000, count)
    # Agents not seen for this long that hold no token are forgotten (their messages stay).
    agent_expiry: float = setting(30 * 86400.0, duration)
    # Posts get 507 once the database's pages in use hold this many bytes. 0: no cap
    # (posts still stop before the disk is full).
    max_database: int = setting(0, size)
    max_body: int = setting(1048576, positive_int)
    max_message: int = setting(65536, positive_int)
    max_batch: int = setting(500, positive_int)
    # A page of messages, or one write of an event stream, holds at most this many bytes of
    # message text (and always one message), so no request holds much of a worker's memory.
    page_bytes: int = setting(256 << 10, positive_size)
    # Seconds a client has to send a request's head (and to start the next one on a
    # keep-alive connection), and again its body: slower ones get 408 and are closed.
    request_timeout: float = setting(15.0, positive_duration)
    # A client that takes nothing of a reply or stream for this long is dropped.
    send_timeout: float = setting(30.0, positive_duration)
    # Past this resident memory, a worker closes the connections waiting longest on their
    # clients (what they sent so far is held in memory). 0: never for memory.
    worker_memory: int = setting(256 << 20, size)
    # gunicorn's limits on the request head: bytes of one header line, number of headers.
    max_header: int = setting(8190, positive_int)
    max_headers: int = setting(50, positive_int)
    # Browser origins allowed to call the API (CORS); none by default.
    cors_origins: tuple = setting((), origins)
    # Channels (names or patterns, as grants: tasks,ops-*,@*) that take signed posts only.
    require_signed: str = setting("", channel_patterns)
    max_wait: float = setting(60.0, duration)
    # A task released or whose lease ended this many times is dead (handed out no more).
    max_attempts: int = setting(5, positive_int)
    keepalive: float = setting(15.0, positive_duration)
    active_window: float = setting(300.0, positive_duration)
    retention_max_age: float = setting(0.0, duration)
    retention_max_messages: int = setting(0, count)
    prune_interval: float = setting(60.0, positive_duration)
    wakeup_interval: float = setting(0.02, positive_duration)
    graceful_timeout: float = setting(10.0, duration)
    # GET /metrics (Prometheus): off, open, or token (any valid token). Unset: open in
    # auth mode open, else token.
    metrics: str = setting("", metrics_mode)
    # Addresses (or networks) that may read /metrics without a token: a Prometheus server.
    metrics_from: tuple = setting((), networks)
    # Channels that get a label of their own in the metrics, per worker; the rest: "other".
    metrics_channels: int = setting(100, count)
    # GET /search and its index, kept in each post's transaction (off: posts skip its cost,
    # and the index is emptied; on again, it is rebuilt at start).
    search: bool = setting(True, switch)
    # The web dashboard at /ui/ (on unless 0, false or off).
    ui: bool = setting(True, switch)
    # Notification rules (TOML): notify.py, notify_rules.py. Empty: none.
    notify_file: str = setting("")
    log_level: str = setting("info")
    access_log: str = setting("-")

    @classmethod
    def from_env(cls, environ=None):
        environ = os.environ if environ is None else environ
        values = {}
        for each in fields(cls):
            name = "AGENT_COMMS_" + each.name.upper()
            raw = environ.get(name)
            if raw is None or raw == "":
                continue
            try:
                values[each.name] = each.metadata["parse"](raw)
            except ValueError as error:
                raise ConfigError(f"{name}: {error}") from None
        settings = cls(**values)
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ConfigError("AGENT_COMMS_TLS_CERT and AGENT_COMMS_TLS_KEY go together: set both or neither")
        return settings

    @property
    def metrics_access(self):
        """Who may read /metrics: off, open or token."""
        return self.metrics or ("open" if self.auth == "open" else "token")

    @property
    def tls(self):
        return bool(self.tls_cert and self.tls_key)
