"""A small client of the agent-comms broker's HTTP API, apart from any printing, so other
Python code can use it:

    from agent_comms_chat.client import BrokerClient
    broker = BrokerClient("http://192.168.122.86:8080", agent_id="warp-ct200")
    broker.send("tasks", "Task completed successfully")
    for message in broker.watch("tasks", after=broker.latest_cursor("tasks")):
        ...
"""

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
# Opening a connection is tried this many times, 0.3, 0.6, 1.2, 2.4 s apart: a broker
# that is restarting (a few seconds) is waited for.
SEND_CONNECT_TRIES = 5


# A post refused with 429 (rate limit) or 503 (busy) was not stored: sending it again is
# safe. It is, after the broker's Retry-After, for at most this many seconds in all.
SEND_RETRY_BUDGET = 10.0


class BrokerError(Exception):
    """The broker could not be reached, or answered with an error. str() is one line that
    names the URL and the cause; `status` is the HTTP status, if there was an answer."""

    def __init__(self, text, status=None):
        super().__init__(text)
        self.status = status


def _tls_hint(url, error):
    return (
        f"cannot verify the TLS certificate of {url} ({getattr(error, 'reason', None) or error}): "
        "give the CA that signed it with --ca FILE (or AGENT_COMMS_CA)"
    )


def _cause(error):
    text = str(error)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found.group(1).strip().lower()
    if "timed out" in text.lower() or "timeout" in type(error).__name__.lower():
        return "timed out"
    if "Name or service not known" in text or "NameResolution" in text:
        return "unknown host"
    return type(error).__name__


def _os_cause(error):
    if isinstance(error, TimeoutError) or "timed out" in str(error):
        return "timed out"
    if error.__class__.__name__ == "gaierror":
        return "unknown host"
    return (getattr(error, "strerror", None) or str(error) or type(error).__name__).lower()


class BrokerClient:
    def __init__(self, url, agent_id=None, token=None, ca=None):
        self.url = url.rstrip("/")
        self.agent_id = agent_id
        # A CA bundle to verify the broker's certificate; None: the system's. There is no
        # way to turn verification off.
        self.ca = ca
        # Given with each request: a session's own `verify` loses to $REQUESTS_CA_BUNDLE.
        self.verify = ca or True
        self.headers = {"User-Agent": f"agent-chat/{__version__}"}
        if agent_id:
            self.headers["X-Agent-ID"] = agent_id
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
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

    # -- plain requests -------------------------------------------------------------------

    def _call(self, method, path, timeout=TIMEOUT, **kwargs):
        url = self.url + path
        session = self.session
        requests = self._requests
        try:
            reply = session.request(method, url, timeout=timeout, verify=self.verify, **kwargs)
        except requests.exceptions.InvalidURL as error:
            raise BrokerError(f"invalid broker URL {self.url}: {error}") from None
        except requests.exceptions.MissingSchema:
            raise BrokerError(f"invalid broker URL {self.url}: it must start with http:// or https://") from None
        except requests.exceptions.SSLError as error:
            raise BrokerError(_tls_hint(url, _ssl_cause(error))) from None
        except requests.RequestException as error:
            raise BrokerError(f"cannot reach {url}: {_cause(error)}") from None
        if reply.status_code >= 400:
            raise BrokerError(f"{method} {url} answered {reply.status_code}: {_error_text(reply)}", reply.status_code)
        try:
            return reply.json()
        except ValueError:
            raise BrokerError(f"{method} {url} answered {reply.status_code} with something that is not JSON") from None

    def send(self, channel, message, sender=None):
        """Post one message; returns the stored message (with its id).

        Uses the standard library's http.client rather than requests: a send is often a
        whole process of its own, and this keeps it near 50 ms. Only opening the
        connection is retried; once the request has gone out it is never sent again, so
        a message is never posted twice."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BrokerError(f"invalid broker URL {self.url}: it must look like http://HOST:PORT")
        post = {"message": message}
        if sender or self.agent_id:
            post["sender"] = sender or self.agent_id
        body = json.dumps(post).encode()
        give_up = time.monotonic() + SEND_RETRY_BUDGET
        while True:
            status, reason, data, retry_after = self._post_once(parts, channel, body)
            if status not in (429, 503) or retry_after is None or time.monotonic() + retry_after > give_up:
                break
            time.sleep(retry_after)
        url = f"{self.url}/messages/{channel}"
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if status >= 400:
            detail = answer.get("error") if isinstance(answer, dict) else None
            raise BrokerError(f"POST {url} answered {status}: {detail or reason}", status)
        if not isinstance(answer, dict):
            raise BrokerError(f"POST {url} answered {status} with something that is not JSON")
        return answer

    def _post_once(self, parts, channel, body):
        """One POST: (status, reason, body, Retry-After seconds or None)."""
        import ssl
        from http.client import HTTPConnection, HTTPException, HTTPSConnection
        from urllib.parse import quote

        url = f"{self.url}/messages/{channel}"
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
                raise BrokerError(_tls_hint(url, error)) from None
            except OSError as error:
                connection.close()
                if attempt + 1 == SEND_CONNECT_TRIES:
                    raise BrokerError(f"cannot reach {url}: {_os_cause(error)}") from None
                time.sleep(0.3 * 2**attempt)
                continue
            try:
                connection.sock.settimeout(TIMEOUT[1])
                connection.request("POST", f"{parts.path}/messages/{quote(channel, safe='')}", body, headers)
                reply = connection.getresponse()
                status, reason, data = reply.status, reply.reason, reply.read()
                retry_after = reply.getheader("Retry-After")
            except (OSError, HTTPException) as error:
                raise BrokerError(f"POST {url} got no answer ({_os_cause(error)}): it may have been stored") from None
            finally:
                connection.close()
            try:
                return status, reason, data, float(retry_after) if retry_after is not None else None
            except ValueError:
                return status, reason, data, None

    def read(self, channel, limit=None, since=None, after=None, wait=None):
        """One page: {"messages": [...], "cursor": ..., "gap": ..., "more": ...}."""
        params = {"limit": limit, "since": since, "after": after, "wait": wait}
        timeout = (TIMEOUT[0], TIMEOUT[1] + float(wait or 0))
        return self._call("GET", f"/messages/{channel}", timeout=timeout, params=params)

    def latest_cursor(self, channel):
        """The cursor of the channel's newest message: watch after it for what comes next."""
        return self.read(channel, limit=1)["cursor"]

    def channels(self):
        return self._call("GET", "/channels")

    def agents(self):
        return self._call("GET", "/agents")

    def status(self):
        return self._call("GET", "/status")

    # -- live stream ----------------------------------------------------------------------

    def watch(self, channel, after, deadline=None, on_gap=None):
        """Yield the channel's messages after the cursor as they arrive, from its Server-Sent
        Events stream. A dropped connection (a broker restart) is reopened from the last id
        seen, so nothing is lost or repeated. Returns when `deadline` (time.monotonic())
        passes; raises BrokerError for an answer that retrying cannot fix (4xx)."""
        session = self.session
        requests = self._requests
        cursor = after
        pause = RECONNECT_FIRST
        while True:
            silence = STREAM_SILENCE if deadline is None else min(STREAM_SILENCE, deadline - time.monotonic())
            if silence <= 0:
                return
            url = f"{self.url}/stream/{channel}"
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
                            f"GET {url} answered {reply.status_code}: {_error_text(reply)}", reply.status_code
                        )
                    if reply.status_code < 400:
                        pause = RECONNECT_FIRST
                        for event in _events(reply):
                            if event.get("event") == "gap":
                                if on_gap:
                                    on_gap(cursor)
                            elif "data" in event and event.get("event", "message") == "message":
                                message = json.loads(event["data"])
                                cursor = message["id"]
                                yield message
                            if deadline is not None and time.monotonic() >= deadline:
                                return
            except requests.exceptions.SSLError as error:
                raise BrokerError(_tls_hint(url, _ssl_cause(error))) from None
            except (requests.RequestException, ValueError):
                pass  # dropped, refused or garbled: reconnect from the cursor below
            if deadline is not None and time.monotonic() + pause >= deadline:
                time.sleep(max(0.0, deadline - time.monotonic()))
                return
            time.sleep(pause)
            pause = min(pause * 2, RECONNECT_MAX)


def _ssl_cause(error):
    """The ssl module's own error inside what requests raised, for its short reason."""
    while error is not None:
        if getattr(error, "reason", None) and error.__class__.__module__ == "ssl":
            return error
        inner = error.args[0] if error.args and isinstance(error.args[0], BaseException) else None
        error = inner or error.__context__
    return "TLS handshake failed"


def _error_text(reply):
    try:
        return str(reply.json()["error"])
    except (ValueError, KeyError, TypeError):
        return reply.reason or "error"


def _events(reply):
    """Server-Sent Events of a streamed reply, each a dict of its fields; a comment (the
    broker's keep-alive) yields an empty dict so the caller can check its deadline."""
    buffer = b""
    event = {}
    for chunk in reply.iter_content(chunk_size=None):
        buffer += chunk
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
