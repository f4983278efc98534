"""GET /stream/{channel} and GET /stream: Server-Sent Events, the backlog after the
client's cursor from the store, then live messages from this worker's hub."""

import _socket
import contextlib
import functools
import logging
import os
import ssl
import time

import gevent
import gevent.socket
from bottle import HTTPError, request, response

from ..access import PRIVATE_INBOXES, allow_read, caller
from ..live import Parked, sse_frame
from .validate import given_cursor, header, int_param, validate_channel, whole_number
from .waiting import Wait

log = logging.getLogger("agent_comms_broker.streams")

STREAM_BACKLOG_PAGE = 500


def register(app, broker):
    app.get("/stream", callback=functools.partial(stream_all, broker))
    app.get("/stream/<channel>", callback=functools.partial(stream_channel, broker))


def stream_all(broker):
    who = caller()
    if who is not None and not who.read:
        raise HTTPError(403, f"token {who.token_id} (agent {who.agent}) may not read any channel")
    return open_stream(broker, None)


def stream_channel(broker, channel):
    validate_channel(channel)
    allow_read(channel)
    return open_stream(broker, channel)


def open_stream(broker, channel):
    """A text/event-stream of a channel (or of all): backlog after the cursor, then live."""
    # Both are checked when both are given; the header (what EventSource sends on a
    # reconnect) wins over the query's starting point.
    after = int_param("after", 0)
    last_event_id = header("Last-Event-ID")
    resumed_at = whole_number(last_event_id, "Last-Event-ID", 0) if last_event_id is not None else after
    store = broker.store
    given_cursor(store, resumed_at, "Last-Event-ID" if last_event_id is not None else "after")
    if resumed_at is not None:
        cursor = resumed_at
        resumed = True
    else:
        cursor = store.max_id()
        resumed = False
    agent = broker.touch_reader()
    response.content_type = "text/event-stream"
    response.set_header("Cache-Control", "no-cache")
    response.set_header("X-Accel-Buffering", "no")
    environ = request.environ
    waiting = Wait(broker, channel, "stream")
    stream = Stream(broker, channel, cursor, resumed, agent, waiting, environ.get(PRIVATE_INBOXES))
    return stream.serve(environ)


# What Stream.frames yields when the stream is caught up and about to wait for messages.
PARK = object()
KEEP_ALIVE = b": keep-alive\n\n"
CHUNK_END = b"0\r\n\r\n"


def _chunk(frame, last=[b"", b""]):  # noqa: B006 (the last frame and its chunk, kept on purpose)
    """The frame as one HTTP chunk. The hub hands the same frame to every parked stream of
    its channel: framed once, not once per stream."""
    if frame is not last[0]:
        last[0], last[1] = frame, b"%x\r\n%s\r\n" % (len(frame), frame)
    return last[1]


class Stream:
    """One event stream. Served by its request's greenlet (through gunicorn) until it has
    caught up; then, on a plain HTTP/1.1 connection, parked: the worker's hub writes each
    new message to its socket at once, with no greenlet of its own (a greenlet blocked in
    a request holds some 9 KiB and more; 10,000 watchers would hold 100 MB). A write that
    the client's socket cannot take whole, a backlog to read from the store (the stream
    fell behind), or anything else that must wait wakes it: a greenlet of its own writes
    and reads until it has caught up again, then parks it again."""

    __slots__ = (
        "agent",
        "broker",
        "channel",
        "cursor",
        "finished",
        "last_write",
        "parked",
        "private_inboxes",
        "resumed",
        "sock",
        "waiting",
    )

    def __init__(self, broker, channel, cursor, resumed, agent, waiting, private_inboxes):
        self.broker = broker
        self.channel = channel
        self.cursor = cursor
        self.resumed = resumed
        self.agent = agent
        self.waiting = waiting
        self.private_inboxes = private_inboxes
        # Once parked: this stream's own descriptor of the connection, whose reply is
        # gunicorn's HTTP/1.1 one without a length (serve() parks no other): chunked.
        self.sock = None
        self.parked = False
        self.finished = False
        self.last_write = 0.0

    # -- what is written ------------------------------------------------------------------

    def read_after(self, position):
        """The next page of the backlog: one write of the stream, within the page budget;
        of every channel, only those the token may read, looked for in bounded steps."""
        store, settings, waiting = self.broker.store, self.broker.settings, self.waiting
        if self.channel is None:
            granted = waiting.who.read if waiting.who is not None else None
            return store.all_after_id(position, STREAM_BACKLOG_PAGE, settings.page_bytes, granted)
        return store.after_id(self.channel, position, STREAM_BACKLOG_PAGE, settings.page_bytes)

    def readable(self, message):
        if self.channel is not None:
            return True
        if not self.waiting.has_token:
            return not (self.private_inboxes and message.channel.startswith("@"))
        return self.waiting.who is not None and self.waiting.who.may_read(message.channel)

    def frames(self, preamble=True):
        """What the stream writes, in order; PARK whenever it has caught up and would wait."""
        waiting = self.waiting
        watcher = waiting.watcher
        settings = self.broker.settings
        if preamble:
            yield b"retry: 2000\n\n"
            if self.resumed and self.broker.store.pruned_after(self.cursor, self.channel):
                yield f'event: gap\ndata: {{"cursor": {self.cursor}}}\n\n'.encode()
        while True:
            # Catch up from the store: on connect, and whenever this stream fell behind.
            # Each page is written before the next is read: a client that reads slowly
            # holds one page of this worker's memory, never its whole backlog.
            while True:
                page = self.read_after(self.cursor)
                if not waiting.allowed():
                    return
                frames = b"".join(sse_frame(message) for message in page.messages if self.readable(message))
                if frames:
                    yield frames
                else:
                    gevent.sleep(0)  # nothing to write: let the worker's other requests run
                self.cursor = page.cursor
                if not page.more:
                    break
            keepalive_at = time.monotonic() + settings.keepalive
            while not waiting.over:
                if not watcher.pending and not watcher.overflowed:
                    yield PARK
                arrived = waiting.wait(keepalive_at - time.monotonic())
                if not waiting.allowed():
                    return
                if not arrived:
                    if time.monotonic() >= keepalive_at:
                        yield KEEP_ALIVE
                        self.broker.touch(self.agent, register=False)  # a watching agent stays active
                        keepalive_at = time.monotonic() + settings.keepalive
                    continue
                items, overflowed = watcher.take()
                if overflowed:
                    break
                fresh = [frame for message, frame in items if message.id > self.cursor and self.readable(message)]
                if fresh:
                    self.cursor = items[-1][0].id
                    yield b"".join(fresh)
            if waiting.over:
                return

    # -- served by the request's greenlet -----------------------------------------------

    def serve(self, environ):
        """The WSGI body: frames until the stream parks (Parked, through gunicorn, which
        then ends the request and closes its descriptor; this stream keeps its own)."""
        can_park = (
            environ.get("REQUEST_METHOD") == "GET"
            and environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
            and not isinstance(environ.get("gunicorn.socket"), ssl.SSLSocket)
        )
        sock = environ.get("gunicorn.socket")

        def body():
            # Entered on the first step of the stream (Bottle takes it before replying), so
            # the slot is always given back.
            parked = False
            self.waiting.__enter__()
            try:
                for item in self.frames():
                    if item is PARK:
                        if can_park and sock is not None and self._park(sock):
                            parked = True
                            raise Parked()
                        continue
                    yield item
            finally:
                if not parked:
                    self.waiting.__exit__(None, None, None)

        return body()

    # -- parked -------------------------------------------------------------------------

    def _park(self, sock):
        """Hand the connection to the hub (False if this worker holds as many as it may)."""
        runtime = self.broker.runtime()
        if len(runtime.hub.parked) + runtime.connections() >= runtime.max_connections:
            return False
        # The C socket, not gevent's: a write that cannot go at once raises, never waits.
        self.sock = _socket.socket(fileno=os.dup(sock.fileno()))
        self.sock.setblocking(False)
        self.waiting.watch_client(self.sock)
        self._to_hub()
        return True

    def _to_hub(self):
        self.parked = True
        self.last_write = time.monotonic()
        self.waiting.watcher.direct = self
        self.broker.hub.parked.add(self)

    def _from_hub(self):
        self.parked = False
        self.waiting.watcher.direct = None
        self.broker.hub.parked.discard(self)

    def _send(self, data):
        """Write a frame without waiting; True if all of it went. What did not is written by
        a greenlet of the stream's own, which goes on from there."""
        data = _chunk(data)
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.finish()
            return False
        self.last_write = time.monotonic()
        if sent < len(data):
            self._wake(data[sent:])
            return False
        return True

    def push(self, message, frame):
        """The hub has a new message for this parked stream."""
        if not self.waiting.allowed():  # the token as it stands now (re-read once a second)
            self.finish()
            return
        if message.id <= self.cursor or not self.readable(message):
            return
        self.cursor = message.id
        self._send(frame)

    def tick(self, now):
        """A few times a second while parked: the token re-check (when due) and the
        keep-alive."""
        if not self.waiting.allowed():
            self.finish()
            return
        if now - self.last_write >= self.broker.settings.keepalive:
            if self._send(KEEP_ALIVE):
                self.broker.touch(self.agent, register=False)

    def _wake(self, unsent=b""):
        """Leave the hub: a greenlet writes `unsent`, then serves the stream until it has
        caught up again."""
        self._from_hub()
        gevent.spawn(self._pump, unsent)

    def _pump(self, unsent):
        sock = gevent.socket.socket(fileno=os.dup(self.sock.fileno()))
        sock.settimeout(self.broker.settings.send_timeout)
        try:
            peer = sock.getpeername()
        except OSError:
            peer = "a client that went"
        try:
            if unsent:
                sock.sendall(unsent)
            for item in self.frames(preamble=False):
                if item is PARK:
                    self._to_hub()
                    return
                sock.sendall(_chunk(item))
            sock.sendall(CHUNK_END)  # the stream ended (a token revoked): as gunicorn would
        except TimeoutError:
            log.info("closed the stream of %s: it took nothing of its reply for %g s", peer, sock.gettimeout())
        except OSError:  # the client went
            pass
        finally:
            sock.close()
            if not self.parked:
                self.finish(end=False)

    def finish(self, end=True):
        """The stream is over: the client went, its token no longer reads it, or the worker
        stops. Its slot, watcher and descriptor are given back."""
        if self.finished:
            return
        self.finished = True
        self._from_hub()
        if end and self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.send(CHUNK_END)
        self.waiting.__exit__(None, None, None)
        if self.sock is not None:
            self.sock.close()
