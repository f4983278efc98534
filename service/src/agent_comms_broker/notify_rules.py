"""The notification rules of AGENT_COMMS_NOTIFY_FILE (TOML): which messages go where, and
the allow-list of destinations. Read once, in the master, before anything is served: a
mistake in the file stops the broker with one line (NotifyConfigError), as a bad setting
does. What is sent and when is notify.py's.

    allow = ["https://ntfy.sh", "http://192.168.122.30:8090"]

    [[rule]]
    name = "alerts"
    channels = ["alerts", "ops-*"]
    min_priority = 4
    tags = ["page"]
    ntfy = { server = "https://ntfy.sh", topic = "homelab-agents" }
"""

import dataclasses
import re
import tomllib
from urllib.parse import unquote, urlsplit

from . import auth

KINDS = ("ntfy", "gotify", "webhook")
RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# What each kind of destination takes (beyond what every rule takes), and which of it must be given.
DESTINATION_KEYS = {
    "ntfy": ({"server", "topic", "token"}, {"server", "topic"}),
    "gotify": ({"server", "token"}, {"server", "token"}),
    "webhook": ({"url", "secret"}, {"url", "secret"}),
}
RULE_KEYS = {"name", "channels", "min_priority", "tags", "timeout", *KINDS}
TOP_KEYS = {"allow", "rule", "retry_min", "retry_max"}
TIMEOUT_DEFAULT = 10.0
RETRY_MIN_DEFAULT = 1.0
RETRY_MAX_DEFAULT = 300.0


class NotifyConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    kind: str  # ntfy, gotify or webhook
    url: str  # where the POST goes
    channels: str  # channel patterns, comma-separated, as a token's grants
    min_priority: int
    tags: frozenset  # any of them (empty: any message)
    timeout: float
    token: str = ""  # ntfy: Bearer token; gotify: the application token
    topic: str = ""  # ntfy
    secret: str = ""  # webhook: the HMAC-SHA256 key

    def matches(self, message):
        if message.priority < self.min_priority:
            return False
        if self.tags and not self.tags.intersection(message.tags):
            return False
        if message.channel.startswith(auth.INBOX):  # only a pattern of inboxes reaches one
            inboxes = ",".join(p for p in self.channels.split(",") if p.startswith(auth.INBOX))
            return auth.matches(inboxes, message.channel)
        return auth.matches(self.channels, message.channel)


@dataclasses.dataclass(frozen=True)
class Rules:
    rules: tuple
    retry_min: float = RETRY_MIN_DEFAULT
    retry_max: float = RETRY_MAX_DEFAULT


def load(path):
    """The Rules of a notify file; NotifyConfigError naming what is wrong."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise NotifyConfigError(f"cannot read {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise NotifyConfigError(f"{path} is not valid TOML (UTF-8): {error}") from None
    try:
        return parse(data)
    except NotifyConfigError as error:
        raise NotifyConfigError(f"{path}: {error}") from None


def parse(data):
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise NotifyConfigError(f"unknown key {sorted(unknown)[0]!r} (the keys are {', '.join(sorted(TOP_KEYS))})")
    allow = data.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(entry, str) for entry in allow):
        raise NotifyConfigError('allow must be a list of URLs such as ["https://ntfy.sh"]')
    allowed = [_allowed_prefix(entry) for entry in allow]
    retry_min = _number(data, "retry_min", RETRY_MIN_DEFAULT, "")
    retry_max = _number(data, "retry_max", RETRY_MAX_DEFAULT, "")
    if retry_max < retry_min:
        raise NotifyConfigError("retry_max must not be below retry_min")
    items = data.get("rule", [])
    if not isinstance(items, list):
        raise NotifyConfigError("rules are [[rule]] tables")
    rules, names = [], set()
    for index, item in enumerate(items):
        rule = _rule(item, index, allowed)
        if rule.name in names:
            raise NotifyConfigError(f"two rules are named {rule.name!r}")
        names.add(rule.name)
        rules.append(rule)
    return Rules(tuple(rules), retry_min, retry_max)


def _rule(item, index, allowed):
    where = f"rule {index + 1}"
    if not isinstance(item, dict):
        raise NotifyConfigError(f"{where} is not a table")
    name = item.get("name")
    if not isinstance(name, str) or not RULE_NAME.match(name):
        raise NotifyConfigError(f"{where}: name must be 1 to 64 letters, digits, '.', '_' or '-'")
    where = f"rule {name!r}"
    unknown = set(item) - RULE_KEYS
    if unknown:
        raise NotifyConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    kinds = [kind for kind in KINDS if kind in item]
    if len(kinds) != 1:
        raise NotifyConfigError(f"{where}: give exactly one destination: ntfy, gotify or webhook")
    kind = kinds[0]
    destination = item[kind]
    if not isinstance(destination, dict):
        raise NotifyConfigError(f"{where}: {kind} must be a table such as {kind} = {{ ... }}")
    takes, needs = DESTINATION_KEYS[kind]
    if set(destination) - takes:
        extra = sorted(set(destination) - takes)[0]
        raise NotifyConfigError(f"{where}: {kind} takes {', '.join(sorted(takes))}, not {extra!r}")
    if needs - set(destination):
        raise NotifyConfigError(f"{where}: {kind} needs {', '.join(sorted(needs - set(destination)))}")
    for key, value in destination.items():
        if not isinstance(value, str) or not value:
            raise NotifyConfigError(f"{where}: {kind}.{key} must be a non-empty string")
    if kind == "ntfy":
        if not re.fullmatch(r"[-_A-Za-z0-9]{1,64}", destination["topic"]):
            raise NotifyConfigError(f"{where}: ntfy.topic must be 1 to 64 letters, digits, '-' or '_'")
        url = destination["server"].rstrip("/")  # JSON publishing: a POST to the server's root
    elif kind == "gotify":
        url = destination["server"].rstrip("/") + "/message"
    else:
        url = destination["url"]
    _check_url(url, where)
    if not any(_within(url, prefix) for prefix in allowed):
        raise NotifyConfigError(f"{where}: {url} is not in the allow list: add it to allow = [...] to send there")
    channels = item.get("channels", ["*"])
    if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
        raise NotifyConfigError(f'{where}: channels must be a list of channel patterns such as ["alerts", "ops-*"]')
    try:
        patterns = auth.parse_patterns(",".join(channels))
    except ValueError as error:
        raise NotifyConfigError(f"{where}: channels: {error}") from None
    min_priority = item.get("min_priority", 1)
    if isinstance(min_priority, bool) or not isinstance(min_priority, int) or not 1 <= min_priority <= 5:
        raise NotifyConfigError(f"{where}: min_priority must be a whole number from 1 to 5")
    tags = item.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) and tag for tag in tags):
        raise NotifyConfigError(f'{where}: tags must be a list of tags such as ["page"]')
    timeout = _number(item, "timeout", TIMEOUT_DEFAULT, f"{where}: ")
    return Rule(
        name=name,
        kind=kind,
        url=url,
        channels=patterns,
        min_priority=min_priority,
        tags=frozenset(tags),
        timeout=timeout,
        token=destination.get("token", ""),
        topic=destination.get("topic", ""),
        secret=destination.get("secret", ""),
    )


def _number(table, key, default, where):
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
        raise NotifyConfigError(f"{where}{key} must be a number of seconds above 0")
    return float(value)


def _check_url(url, where):
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise NotifyConfigError(f"{where}: {url!r} is not a valid URL (its host or port)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotifyConfigError(f"{where}: {url!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise NotifyConfigError(f"{where}: put credentials in token or secret, not in the URL")
    if port == 0:
        raise NotifyConfigError(f"{where}: {url!r} has port 0")
    if re.search(r"[\s\x00-\x1f\x7f]", url) or parts.fragment:
        raise NotifyConfigError(f"{where}: {url!r} holds spaces, control characters or a #fragment")
    segments = unquote(parts.path).replace("\\", "/").split("/")
    if any(segment in (".", "..") for segment in segments):
        raise NotifyConfigError(f"{where}: {url!r} has a . or .. segment in its path")


def redacted(url):
    """What may be shown of a destination (in /status, in errors): scheme, host and port.
    Its path and query can hold a secret (webhook URLs often do)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _allowed_prefix(entry):
    _check_url(entry, "allow")
    parts = urlsplit(entry)
    return parts.scheme, parts.hostname, _port(parts), parts.path.rstrip("/")


def _port(parts):
    return parts.port or (443 if parts.scheme == "https" else 80)


def _within(url, prefix):
    """Whether `url` is the allowed entry's scheme, host and port, under its path."""
    scheme, host, port, path = prefix
    parts = urlsplit(url)
    if (parts.scheme, parts.hostname, _port(parts)) != (scheme, host, port):
        return False
    return parts.path == path or parts.path.startswith(path + "/") or not path
