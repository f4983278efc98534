"""How agent-chat talks HTTP to a broker: timeouts, retries, replies read within bounds,
and failures (unreachable, refused, TLS) said in one line. The API calls themselves are in
client.py.

Reads go through requests, whose sessions retry with backoff; writes through the standard
library's http.client, which starts fast (a send is often a process of its own) and lets
agent-chat decide exactly what may be sent twice."""

import functools
import json
import time

from . import __version__

# (connect, read) seconds for every request but the live stream.
TIMEOUT = (3.05, 15.0)
# A live stream hears at least a keep-alive comment every 15 s; silence this long is a
# dead connection, so reconnect.
STREAM_SILENCE = 45.0
RECONNECT_FIRST, RECONNECT_MAX = 0.2, 5.0
# Opening a connection is tried this many times, 0.3, 0.6, 1.2, 2.4 s apart: a broker
# that is restarting (a few seconds) is waited for.
SEND_CONNECT_TRIES = 5


# A post refused with 429 (rate limit) or 503 (busy) was not stored: sending it again is
# safe. It is, after the broker's Retry-After, for at most this many seconds in all.
SEND_RETRY_BUDGET = 10.0
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


def _cause(error):
    """A few words on why a connection failed: "connection refused", "unknown host"..."""
    import socket
    from http.client import BadStatusLine, RemoteDisconnected

    for inner in _chain(error):
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

    return any(isinstance(inner, (RemoteDisconnected, BadStatusLine, ConnectionResetError)) for inner in _chain(error))


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


class _LostAnswer(Exception):
    """A request went out and its connection broke before the answer came: the broker may
    have done it."""


class Transport:
    """A broker's URL and who speaks to it (agent id, token, CA), and requests to it."""

    def __init__(self, url, agent_id=None, token=None, ca=None):
        self.url = url.rstrip("/")
        self.agent_id = agent_id
        # A CA bundle to verify the broker's certificate; None: the system's. There is no
        # way to turn verification off.
        self.ca = ca
        # Given with each request: a session's own `verify` loses to $REQUESTS_CA_BUNDLE.
        self.verify = ca or True
        self.headers = {"User-Agent": f"agent-chat/{__version__}"}
        # Header values go out as UTF-8, as the broker reads them: an agent may be "café".
        if agent_id:
            self.headers["X-Agent-ID"] = agent_id.encode("utf-8")
        if token:
            self.headers["Authorization"] = f"Bearer {token}".encode()
        self._session = None

    def close(self):
        """Close the connections the session keeps open (reads); the client may be used
        again afterwards and opens new ones."""
        if self._session is not None:
            self._session.close()
            self._session = None

    @property
    def session(self):
        """A requests session whose reads retry with backoff. requests costs most of
        agent-chat's start-up, so it is imported only by commands that read."""
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
                read=2,
                status=2,
                other=0,
                allowed_methods=frozenset({"GET"}),
                status_forcelist=(429, 502, 503, 504),
                backoff_factor=0.3,
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

    def call(self, method, path, timeout=TIMEOUT, **kwargs):
        url = self.url + path
        session = self.session
        requests = self._requests
        try:
            reply = session.request(method, url, timeout=timeout, verify=self.verify, stream=True, **kwargs)
        except requests.exceptions.SSLError as error:
            raise BrokerError(_tls_failure(self.url, error)) from None
        except requests.RequestException as error:
            raise BrokerError(self._unreachable(url, error)) from None
        try:
            # Within REPLY_MAX bytes and the whole read timeout, not a timeout per chunk.
            reply._content = _bounded(_pieces(reply.raw), f"{method} {url}", time.monotonic() + timeout[1])
        except requests.RequestException as error:
            raise BrokerError(self._unreachable(url, error)) from None
        finally:
            reply.close()
        if reply.status_code >= 400:
            raise BrokerError(self._refused(method, url, reply.status_code, _error_text(reply)), reply.status_code)
        try:
            answer = reply.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise BrokerError(f"{method} {url} answered {reply.status_code} with something that is not a JSON object")
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
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BrokerError(f"invalid broker URL {self.url}: it must look like http://HOST:PORT")
        body = json.dumps(payload).encode()
        give_up = time.monotonic() + SEND_RETRY_BUDGET
        pause = RECONNECT_FIRST
        while True:
            try:
                status, reason, data, retry_after = self._write_once(parts, method, path, body, timeout)
            except _LostAnswer as lost:
                if not retry_lost or time.monotonic() + pause > give_up:
                    raise BrokerError(str(lost)) from None
                time.sleep(pause)
                pause = min(pause * 2, RECONNECT_MAX)
                continue
            if status not in (429, 503) or retry_after is None or time.monotonic() + retry_after > give_up:
                break
            time.sleep(retry_after)
        url = f"{self.url}{path}"
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

    def _write_once(self, parts, method, path, body, timeout):
        """One request: (status, reason, body, Retry-After seconds or None)."""
        import ssl
        from http.client import HTTPConnection, HTTPException, HTTPSConnection

        url = f"{self.url}{path}"
        headers = {**self.headers, "Content-Type": "application/json"}
        for attempt in range(SEND_CONNECT_TRIES):
            if parts.scheme == "https":
                context = ssl.create_default_context(cafile=self.ca)
                connection = HTTPSConnection(parts.hostname, parts.port, timeout=TIMEOUT[0], context=context)
            else:
                connection = HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT[0])
            try:
                connection.connect()
            except ssl.SSLError as error:
                connection.close()
                raise BrokerError(_tls_failure(self.url, error)) from None
            except OSError as error:
                connection.close()
                if attempt + 1 == SEND_CONNECT_TRIES:
                    raise BrokerError(f"cannot reach {url}: {_cause(error)}") from None
                time.sleep(0.3 * 2**attempt)
                continue
            try:
                connection.sock.settimeout(timeout[1])
                connection.request(method, f"{parts.path}{path}", body, headers)
                reply = connection.getresponse()
                status, reason = reply.status, reply.reason
                data = _bounded(_pieces(reply), f"{method} {url}", time.monotonic() + timeout[1])
                retry_after = reply.getheader("Retry-After")
            except (OSError, HTTPException) as error:
                https = self._https_instead(error)
                if https:
                    raise BrokerError(
                        f"{method} {url} got no answer: the broker there speaks TLS, so nothing was stored: use {https}"
                    ) from None
                raise _LostAnswer(f"{method} {url} got no answer ({_cause(error)}): it may have been stored") from None
            finally:
                connection.close()
            try:
                return status, reason, data, float(retry_after) if retry_after is not None else None
            except ValueError:
                return status, reason, data, None

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
                        raise BrokerError(
                            self._refused("GET", url, reply.status_code, _error_text(reply)), reply.status_code
                        )
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


def _error_text(reply):
    try:
        return str(reply.json()["error"])
    except (ValueError, KeyError, TypeError):
        return reply.reason or "error"


def _pieces(raw):
    """A reply's body as it arrives: read1 returns what is there (at most 64 KiB), so a
    server that trickles its answer is noticed between pieces."""
    if hasattr(raw, "stream"):  # urllib3's, under requests (1.x has no read1)
        read = getattr(raw, "read1", None) or raw.read
        return iter(functools.partial(read, 65536, decode_content=True), b"")
    return iter(functools.partial(raw.read1, 65536), b"")


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
