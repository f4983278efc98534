"""How agent-chat talks HTTP to a broker: timeouts, retries, replies read within bounds,
and failures (unreachable, refused, TLS) said in one line. The API calls themselves are in
client.py.

Reads and writes are HTTP/1.1 exchanges of agent-chat's own over a socket, one request a
connection: a command is often a process of its own, and http.client would cost it more
than everything else it does (it imports the email package, and ssl even for http://); it
also lets agent-chat decide exactly what may be sent twice. Only the live stream (watch)
goes through requests, imported for it alone."""

import functools
import json
import re
import time

from . import __version__

# (connect, read) seconds for every request but the live stream.
TIMEOUT = (3.05, 15.0)
# A live stream hears at least a keep-alive comment every 15 s; silence this long is a
# dead connection, so reconnect.
STREAM_SILENCE = 45.0
RECONNECT_FIRST, RECONNECT_MAX = 0.2, 5.0
# Opening a connection is tried this many times, BACKOFF, 2, 4 and 8 times BACKOFF (0.3,
# 0.6, 1.2, 2.4 s) apart: a broker that is restarting (a few seconds) is waited for.
SEND_CONNECT_TRIES = 5
BACKOFF = 0.3
# A read (GET) whose connection broke before its answer came, or that was answered with
# one of these statuses (busy, or a proxy whose broker is restarting), is asked again this
# many times, BACKOFF and then twice BACKOFF apart: reading twice does no harm.
READ_RETRIES = 2
READ_RETRY_STATUSES = (429, 502, 503, 504)


# A post refused with 429 (rate limit) or 503 (busy) was not stored: sending it again is
# safe. It is, after the broker's Retry-After, for at most this many seconds in all (a
# read so refused waits its Retry-After within the same budget).
SEND_RETRY_BUDGET = 10.0
# The longest status or header line, and the most header lines, an answer may have.
HEADER_LINE_MAX, HEADER_LINES_MAX = 65536, 100
# No reply of a broker comes near this (a page of messages is at most a few MiB), nor takes
# longer than the read timeout plus a long-poll's wait in all: past either, it is not one
# to wait for (a broken server, or something in the way).
REPLY_MAX = 32 << 20


class BrokerError(Exception):
    """The broker could not be reached, or answered with an error. str() is one line that
    names the URL and the cause; `status` is the HTTP status, if there was an answer."""

    def __init__(self, text, status=None):
        super().__init__(text)
        self.status = status


def _chain(error):
    """`error` and the errors inside it (requests wraps urllib3's, which wraps the socket's)."""
    for _ in range(10):
        if error is None:
            return
        yield error
        inner = [arg for arg in error.args if isinstance(arg, BaseException)]
        reason = getattr(error, "reason", None)
        error = inner[0] if inner else reason if isinstance(reason, BaseException) else error.__context__


class _BadAnswer(OSError):
    """What came back is not (all of) an HTTP answer; `unanswered`: not even its status
    line, as when a TLS port is spoken to in plain HTTP."""

    def __init__(self, text, unanswered=False):
        super().__init__(text)
        self.unanswered = unanswered


def _cause(error):
    """A few words on why a connection failed: "connection refused", "unknown host"..."""
    import socket
    from http.client import BadStatusLine, RemoteDisconnected

    for inner in _chain(error):
        if isinstance(inner, _BadAnswer):
            return str(inner)
        if isinstance(inner, socket.gaierror) or type(inner).__name__ == "NameResolutionError":
            return "unknown host"
        if isinstance(inner, TimeoutError) or "timed out" in str(inner) or "Timeout" in type(inner).__name__:
            return "timed out"
        if isinstance(inner, (RemoteDisconnected, BadStatusLine)):
            return "the connection closed without an answer"
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror.lower()
    return type(error).__name__


def _closed_unanswered(error):
    """Whether a connection was made and then closed without an HTTP answer: what a TLS
    server does with a plain-HTTP request."""
    from http.client import BadStatusLine, RemoteDisconnected

    closed = (RemoteDisconnected, BadStatusLine, ConnectionResetError)
    return any(isinstance(inner, closed) or getattr(inner, "unanswered", False) for inner in _chain(error))


def _address(host):
    """The host name as bytes for the resolver: given a str, it imports the idna codec
    (and unicodedata) even for an ASCII name or an address, a ms or two of a command."""
    return host.encode("ascii") if host.isascii() else host.encode("idna")


def _speaks_tls(host, port):
    """Whether HOST:PORT completes a TLS handshake. Only to explain a failure: nothing is
    sent over it, so its certificate does not matter here."""
    import socket
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT[0]) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except OSError:
        return False


# OpenSSL's reasons for a handshake that got something other than TLS back (a plain-HTTP
# answer): the port does not speak TLS.
_NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL")
# X.509 verification results that another CA cannot fix.
_X509_HOSTNAME_MISMATCH, _X509_IP_MISMATCH = 62, 64
_X509_NOT_YET_VALID, _X509_EXPIRED = 9, 10


def _tls_failure(url, error):
    """One line on why TLS with the broker at `url` failed, and what would fix it."""
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    for inner in _chain(error):
        if isinstance(inner, ssl.SSLCertVerificationError):
            why = inner.verify_message or inner.reason or "verification failed"
            if inner.verify_code in (_X509_HOSTNAME_MISMATCH, _X509_IP_MISMATCH):
                return (
                    f"the TLS certificate of {url} is not for {parts.hostname} ({why}): "
                    "use the broker's name that its certificate names"
                )
            if inner.verify_code in (_X509_NOT_YET_VALID, _X509_EXPIRED):
                return f"the TLS certificate of {url} is not valid now ({why}): the broker needs a new certificate"
            return (
                f"cannot verify the TLS certificate of {url} ({why}): "
                "give the CA that signed it with --ca FILE (or AGENT_COMMS_CA)"
            )
    reason = next((inner.reason for inner in _chain(error) if isinstance(inner, ssl.SSLError) and inner.reason), None)
    plain = parts._replace(scheme="http").geturl()
    if reason in _NOT_TLS_REASONS:
        return f"{url} does not speak TLS ({reason}): for a plain-HTTP broker use {plain}"
    return f"the TLS handshake with {url} failed ({reason or error}): if the broker serves plain HTTP, use {plain}"


class _NoAnswer(Exception):
    """A request went out and its connection broke before the answer came: the broker may
    have done it. `error` is why (OSError, HTTPException)."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


class Transport:
    """A broker's URL and who speaks to it (agent id, token, CA), and requests to it."""

    def __init__(self, url, agent_id=None, token=None, ca=None):
        self.url = url.rstrip("/")
        self.agent_id = agent_id
        # A CA bundle to verify the broker's certificate; None: the system's. There is no
        # way to turn verification off.
        self.ca = ca
        # Given with each request of the stream: a session's own `verify` loses to
        # $REQUESTS_CA_BUNDLE.
        self.verify = ca or True
        self.headers = {"User-Agent": f"agent-chat/{__version__}"}
        # Header values go out as UTF-8, as the broker reads them: an agent may be "café".
        if agent_id:
            self.headers["X-Agent-ID"] = agent_id.encode("utf-8")
        if token:
            self.headers["Authorization"] = f"Bearer {token}".encode()
        self._session = None

    def close(self):
        """Close the connections the session keeps open (streams); the client may be used
        again afterwards and opens new ones."""
        if self._session is not None:
            self._session.close()
            self._session = None

    @property
    def session(self):
        """A requests session for the live stream, whose requests retry with backoff.
        requests costs more than the rest of agent-chat's start-up, so it is imported only
        by the commands that follow a stream."""
        if self._session is None:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            self._requests = requests
            self._session = requests.Session()
            self._session.headers.update(self.headers)
            retry = Retry(
                total=None,
                connect=SEND_CONNECT_TRIES - 1,
                read=READ_RETRIES,
                status=READ_RETRIES,
                other=0,
                allowed_methods=frozenset({"GET"}),
                status_forcelist=READ_RETRY_STATUSES,
                backoff_factor=BACKOFF,
                raise_on_status=False,
            )
            adapter = HTTPAdapter(max_retries=retry)
            self._session.mount("http://", adapter)
            self._session.mount("https://", adapter)
        return self._session

    def _https_instead(self, error):
        """For an http:// broker whose connection closed without an answer (what a TLS
        port does with plain HTTP): its https:// URL if the port speaks TLS, else None."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if parts.scheme == "http" and _closed_unanswered(error) and _speaks_tls(parts.hostname, parts.port or 80):
            return parts._replace(scheme="https").geturl()
        return None

    def _unreachable(self, url, error):
        """The one line for a request that got no HTTP answer."""
        https = self._https_instead(error)
        if https:
            return f"cannot reach {url}: the broker there speaks TLS: use {https}"
        return f"cannot reach {url}: {_cause(error)}"

    def _refused(self, method, url, status, detail):
        """The one line for an error answer; a 404 means no such route, so the URL given
        is not a broker's root."""
        from urllib.parse import urlsplit

        text = f"{method} {url} answered {status}: {detail}"
        parts = urlsplit(self.url)
        if status == 404 and parts.path not in ("", "/"):
            root = parts._replace(path="").geturl()
            text += f" (the broker URL has a path, {parts.path}: is the broker at {root}?)"
        return text

    def call(self, method, path, timeout=TIMEOUT, params=None):
        """One read (GET) with the query `params` (those not None): the answer's JSON
        object. Opening the connection is retried; a read whose connection broke before its
        answer came, or that was answered 429, 502, 503 or 504, is asked again
        READ_RETRIES times (after a 429's or 503's Retry-After, within SEND_RETRY_BUDGET)."""
        from urllib.parse import urlencode

        parts = self._parts()
        url = f"{self.url}{path}"
        query = urlencode([(name, value) for name, value in (params or {}).items() if value is not None])
        give_up = time.monotonic() + SEND_RETRY_BUDGET
        for retry in range(READ_RETRIES + 1):
            try:
                status, reason, data, retry_after = self._exchange(parts, method, path, query=query, timeout=timeout)
            except _NoAnswer as lost:
                if retry == READ_RETRIES:
                    raise BrokerError(self._unreachable(url, lost.error)) from None
                time.sleep(BACKOFF * 2**retry)
                continue
            if status not in READ_RETRY_STATUSES or retry == READ_RETRIES:
                break
            pause = retry_after if retry_after is not None and status in (429, 503) else BACKOFF * 2**retry
            if time.monotonic() + pause > give_up:
                break
            time.sleep(pause)
        if status >= 400:
            raise BrokerError(self._refused(method, url, status, _error_text(data, reason)), status)
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise BrokerError(f"{method} {url} answered {status} with something that is not a JSON object")
        return answer

    def expect(self, answer, path, key, kind):
        """answer[key], checked to be a `kind`: a server that is not an agent-comms broker
        (or a broken one) gets one line, not a traceback."""
        value = answer.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BrokerError(f"{self.url}{path} answered without {key!r}: is it an agent-comms broker?")
        if kind is list and not all(isinstance(item, dict) for item in value):
            raise BrokerError(f"{self.url}{path} answered a {key!r} that is not a list of objects")
        return value

    def write(self, method, path, payload, timeout=TIMEOUT, retry_lost=False):
        """One write (POST, PUT) of `payload` as JSON: the answer's JSON object, or None
        for an answer without a body (204). Opening the connection is retried, and a
        refusal that says nothing was done (429, 503) after its Retry-After. Once the
        request has gone out it is sent again only if `retry_lost` says a repeat is
        harmless (a post with an idempotency key, a heartbeat): when its connection broke
        before the answer came, for up to SEND_RETRY_BUDGET seconds in all."""
        parts = self._parts()
        url = f"{self.url}{path}"
        body = json.dumps(payload).encode()
        give_up = time.monotonic() + SEND_RETRY_BUDGET
        pause = RECONNECT_FIRST
        while True:
            try:
                status, reason, data, retry_after = self._exchange(parts, method, path, body, timeout=timeout)
            except _NoAnswer as lost:
                https = self._https_instead(lost.error)
                if https:
                    raise BrokerError(
                        f"{method} {url} got no answer: the broker there speaks TLS, so nothing was stored: use {https}"
                    ) from None
                if not retry_lost or time.monotonic() + pause > give_up:
                    why = _cause(lost.error)
                    raise BrokerError(f"{method} {url} got no answer ({why}): it may have been stored") from None
                time.sleep(pause)
                pause = min(pause * 2, RECONNECT_MAX)
                continue
            if status not in (429, 503) or retry_after is None or time.monotonic() + retry_after > give_up:
                break
            time.sleep(retry_after)
        if status == 204 and not data:
            return None
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if status >= 400:
            detail = answer.get("error") if isinstance(answer, dict) else None
            raise BrokerError(self._refused(method, url, status, detail or reason), status)
        if not isinstance(answer, dict):
            raise BrokerError(f"{method} {url} answered {status} with something that is not a JSON object")
        return answer

    def _parts(self):
        """The broker URL, split; BrokerError if it is not one to send requests to."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BrokerError(f"invalid broker URL {self.url}: it must look like http://HOST:PORT")
        return parts

    def _exchange(self, parts, method, path, body=None, query="", timeout=TIMEOUT):
        """One request, over a connection of its own: (status, reason, body, Retry-After
        seconds or None). Opening the connection is tried SEND_CONNECT_TRIES times, and a
        failure to is a BrokerError; once the request has gone out, a failure is _NoAnswer.
        ssl is imported only for an https:// broker."""
        import socket

        url = f"{self.url}{path}"
        request = self._request(parts, method, path, body, query)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        tls = None
        if parts.scheme == "https":
            import ssl

            try:
                tls = ssl.create_default_context(cafile=self.ca)
            except OSError as error:  # ssl.SSLError too: a file that holds no certificate
                raise BrokerError(f"cannot use the CA file {self.ca}: {error.strerror or error}") from None
        for attempt in range(SEND_CONNECT_TRIES):
            connection = None
            try:
                connection = socket.create_connection((_address(parts.hostname), port), timeout=TIMEOUT[0])
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if tls:  # the handshake, within the connect timeout
                    connection = tls.wrap_socket(connection, server_hostname=parts.hostname)
            except OSError as error:
                if connection is not None:
                    connection.close()
                if tls and isinstance(error, ssl.SSLError):
                    raise BrokerError(_tls_failure(self.url, error)) from None
                if attempt + 1 == SEND_CONNECT_TRIES:
                    raise BrokerError(self._unreachable(url, error)) from None
                time.sleep(BACKOFF * 2**attempt)
                continue
            try:
                connection.settimeout(timeout[1])
                connection.sendall(request)
                with connection.makefile("rb") as answer:
                    status, reason, headers = _answer_head(answer)
                    pieces = _body(answer, status, headers, method)
                    data = _bounded(pieces, f"{method} {url}", time.monotonic() + timeout[1])
            except OSError as error:
                raise _NoAnswer(error) from None
            finally:
                connection.close()
            retry_after = headers.get("retry-after")
            try:
                return status, reason, data, float(retry_after) if retry_after is not None else None
            except ValueError:
                return status, reason, data, None

    def _request(self, parts, method, path, body, query):
        """The bytes of a request: its line, its headers (values checked, as a header
        cannot hold a line break) and its body."""
        from urllib.parse import quote

        # A path in the broker URL (a proxy's prefix) quoted as a browser would; the
        # routes' segments are quoted already.
        target = quote(parts.path, safe="/%!$&'()*+,;=:@~") + path + (f"?{query}" if query else "")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        if parts.port is not None:
            host += f":{parts.port}"
        headers = {"Host": host if host.isascii() else host.encode("idna"), **self.headers, "Connection": "close"}
        if body is not None:
            headers.update({"Content-Type": "application/json", "Content-Length": str(len(body))})
        lines = [f"{method} {target} HTTP/1.1".encode()]
        for name, value in headers.items():
            value = value if isinstance(value, bytes) else value.encode("latin-1")
            if any(char in value for char in b"\r\n\0"):
                raise ValueError(f"invalid {name} header value {value!r}")
            lines.append(name.encode() + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")

    def stream(self, path, after, deadline=None, on_gap=None):
        """Yield the messages after the cursor as they arrive, from the Server-Sent Events
        stream at `path`. A dropped connection (a broker restart) is reopened from the last id
        seen, so nothing is lost or repeated. Returns when `deadline` (time.monotonic())
        passes; raises BrokerError for an answer that retrying cannot fix (4xx)."""
        session = self.session
        requests = self._requests
        cursor = after
        pause = RECONNECT_FIRST
        url = f"{self.url}{path}"
        while True:
            silence = STREAM_SILENCE if deadline is None else min(STREAM_SILENCE, deadline - time.monotonic())
            if silence <= 0:
                return
            try:
                with session.get(
                    url,
                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(cursor)},
                    stream=True,
                    timeout=(TIMEOUT[0], silence),
                    verify=self.verify,
                ) as reply:
                    if 400 <= reply.status_code < 500 and reply.status_code != 429:
                        detail = _error_text(reply.content, reply.reason)
                        raise BrokerError(self._refused("GET", url, reply.status_code, detail), reply.status_code)
                    if reply.status_code < 400:
                        pause = RECONNECT_FIRST
                        for event in _events(reply):
                            if event.get("event") == "gap":
                                if on_gap:
                                    on_gap(cursor)
                            elif "data" in event and event.get("event", "message") == "message":
                                message = _message(event["data"])
                                cursor = message["id"]
                                yield message
                            if deadline is not None and time.monotonic() >= deadline:
                                return
            except requests.exceptions.SSLError as error:
                raise BrokerError(_tls_failure(self.url, error)) from None
            except requests.RequestException as error:
                # Dropped or refused (a broker restarting): reconnect from the cursor below;
                # but no retry mends plain HTTP sent to a TLS port.
                https = self._https_instead(error)
                if https:
                    raise BrokerError(f"cannot reach {url}: the broker there speaks TLS: use {https}") from None
            except ValueError:
                pass  # a garbled event: reconnect from the cursor below
            if deadline is not None and time.monotonic() + pause >= deadline:
                time.sleep(max(0.0, deadline - time.monotonic()))
                return
            time.sleep(pause)
            pause = min(pause * 2, RECONNECT_MAX)


def route(*segments):
    """/messages/CHANNEL, /stream/CHANNEL... with each segment quoted: whatever a user
    types as a channel ("a/b", "a?b", "@alice") stays one path segment, for the broker to
    judge."""
    from urllib.parse import quote

    return "".join(f"/{quote(str(segment), safe='')}" for segment in segments)


def _message(data):
    """A stream event's message; ValueError (a garbled stream: reconnect) if it is not one."""
    message = json.loads(data)
    if not isinstance(message, dict) or not isinstance(message.get("id"), int):
        raise ValueError("an event without a message id")
    return message


def _error_text(body, reason):
    """What an error answer says: its JSON "error", else the status's reason."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return reason or "error"


def _answer_head(answer):
    """An answer's status, reason and headers ({lower-case name: value}), read from the
    file of its connection; an interim answer (1xx) is passed over."""
    while True:
        line = answer.readline(HEADER_LINE_MAX + 1)
        if not line:
            raise _BadAnswer("the connection closed without an answer", unanswered=True)
        version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not re.fullmatch(r"[1-5][0-9][0-9]", code) or len(line) > HEADER_LINE_MAX:
            raise _BadAnswer(f"not an HTTP answer: {line[:40]!r}", unanswered=True)
        headers = {}
        for _ in range(HEADER_LINES_MAX + 1):
            line = answer.readline(HEADER_LINE_MAX + 1)
            if line in (b"\r\n", b"\n"):
                break
            if not line.endswith(b"\n"):
                raise _BadAnswer("the answer broke off in its headers")
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        else:
            raise _BadAnswer(f"an answer with more than {HEADER_LINES_MAX} headers")
        if not 100 <= int(code) < 200:
            return int(code), reason.strip(), headers


def _body(answer, status, headers, method):
    """An answer's body as it arrives, in pieces: read1 returns what is there (at most 64
    KiB), so a server that trickles its answer is noticed between pieces."""
    if method == "HEAD" or status in (204, 304):
        return
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = answer.readline(HEADER_LINE_MAX + 1)
            size = line.split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", size):
                raise _BadAnswer("the answer broke off (a chunk without its size)")
            size = int(size, 16)
            if size == 0:
                while answer.readline(HEADER_LINE_MAX + 1) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            yield from _exactly(answer, size)
            answer.readline(HEADER_LINE_MAX + 1)  # the chunk's line break
    elif "content-length" in headers:
        length = headers["content-length"]
        if not re.fullmatch(r"[0-9]{1,19}", length):
            raise _BadAnswer(f"an answer with Content-Length {length!r}")
        yield from _exactly(answer, int(length))
    else:  # to the end of the connection
        yield from iter(functools.partial(answer.read1, 65536), b"")


def _exactly(answer, size):
    while size > 0:
        piece = answer.read1(min(size, 65536))
        if not piece:
            raise _BadAnswer("the answer broke off")
        size -= len(piece)
        yield piece


def _bounded(chunks, what, deadline):
    """The chunks of a reply joined, within REPLY_MAX bytes and by the deadline
    (time.monotonic()); else BrokerError."""
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > REPLY_MAX:
            raise BrokerError(f"{what} answered more than {REPLY_MAX} bytes: not a broker's reply")
        if time.monotonic() > deadline:
            raise BrokerError(f"{what} did not finish its answer in time")
    return bytes(data)


def _events(reply):
    """Server-Sent Events of a streamed reply, each a dict of its fields; a comment (the
    broker's keep-alive) yields an empty dict so the caller can check its deadline."""
    buffer = b""
    event = {}
    for chunk in reply.iter_content(chunk_size=None):
        buffer += chunk
        if len(buffer) > REPLY_MAX:  # one line of the stream without end
            raise BrokerError(f"{reply.url} sent a line of more than {REPLY_MAX} bytes: not a broker's stream")
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            line = raw.decode("utf-8").rstrip("\r")
            if line == "":
                if event:
                    yield event
                event = {}
            elif line.startswith(":"):
                yield {}
            else:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                event[field] = event[field] + "\n" + value if field == "data" and "data" in event else value
