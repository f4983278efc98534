"""What a request that waits for messages (a long-poll, an event stream) holds while it
waits, and gives back the moment it ends: one of its agent's stream slots, a watcher of
its channel in this worker's hub, and an eye on its client's socket, so that a client
that goes away frees its slot at once rather than at the next write. Its token is re-read
as it waits, at most every TOKEN_RECHECK seconds."""

import time

import gevent
from bottle import request

from ..access import CALLER, allow_read, caller, limit_key, unauthorized

# A waiting request re-reads its token at most this often: revoked or expired, the wait
# ends; changed grants apply.
TOKEN_RECHECK = 1.0


class Wait:
    __slots__ = ("_checked", "_client", "_gauge", "_socket", "broker", "channel", "has_token", "key", "watcher", "who")

    def __init__(self, broker, channel, kind="long_poll"):
        """`kind`: what the metrics count it as, a long_poll (a waiting read or take) or a
        stream."""
        self.broker = broker
        self.channel = channel
        self._gauge = broker.metrics.waiting.labels(kind) if broker.metrics is not None else None
        self.who = caller()
        # With a token, `who` turns None once the token is revoked or expires.
        self.has_token = self.who is not None
        self.key = limit_key()
        self._socket = request.environ.get("gunicorn.socket")
        self._checked = time.monotonic()
        self._client = None
        self.watcher = None

    def __enter__(self):
        self.broker.take_stream_slot(self.key)
        self.watcher = self.broker.hub.watch(self.channel)
        self._client = _on_readable(self._socket, self.watcher.close)
        if self._gauge is not None:
            self._gauge.inc()
        return self

    def watch_client(self, sock):
        """Watch `sock` (the stream's own descriptor of the connection, once parked) for
        the client going away, instead of the request's."""
        if self._client is not None:
            self._client.stop()
            self._client.close()
        self._socket = sock
        self._client = _on_readable(sock, self.watcher.close)

    def __exit__(self, *exc_info):
        if self._client is not None:
            self._client.stop()
            self._client.close()
        self.broker.hub.unwatch(self.watcher)
        self.broker.give_stream_slot(self.key)
        if self._gauge is not None:
            self._gauge.dec()

    @property
    def over(self):
        """The watcher was closed: the client went, or the worker is stopping."""
        return self.watcher.closed

    def wait(self, timeout):
        """Until a message for the watcher arrives (True) or timeout passes (False); with a
        token, never longer than until its next re-check."""
        if self.has_token:
            timeout = min(timeout, TOKEN_RECHECK)
        return self.watcher.event.wait(max(0.0, timeout))

    def allowed(self, now=False):
        """Whether the token (if any) still holds and grants the channel; re-read when its
        re-check is due, or at once with now=True. Updates `who`."""
        if not self.has_token:
            return True
        if self.who is not None and (now or time.monotonic() - self._checked >= TOKEN_RECHECK):
            self._checked = time.monotonic()
            self.who = self.broker.access.refresh(self.who)
        return self.who is not None and (self.channel is None or self.who.may_read(self.channel))

    def recheck(self):
        """After the wait: the token (if any) as it stands now becomes the request's caller,
        and one revoked or expired is 401, one that lost the channel 403."""
        if not self.has_token:
            return
        self.allowed(now=True)
        request.environ[CALLER] = self.who
        if self.who is None:
            raise unauthorized("the bearer token was revoked or expired while the request waited")
        allow_read(self.channel)


def _on_readable(sock, gone):
    """Call gone() once when the client's socket turns readable. A waiting request expects
    nothing more from its client, so readable means it closed its side (or went away, or
    sent what this request cannot use): either way the wait is over."""
    if sock is None:
        return None
    watcher = gevent.get_hub().loop.io(sock.fileno(), 1)

    def readable():
        watcher.stop()
        gone()

    watcher.start(readable)
    return watcher
