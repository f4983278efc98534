"""GET /stream/{channel} and GET /stream: Server-Sent Events, the backlog after the
client's cursor from the store, then live messages from this worker's hub."""

import functools
import time

import gevent
from bottle import HTTPError, request, response

from ..access import PRIVATE_INBOXES, allow_read, caller
from ..live import sse_frame
from .validate import given_cursor, header, int_param, validate_channel, whole_number
from .waiting import Wait

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
    settings = broker.settings
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
    waiting = Wait(broker, channel)

    def read_after(position):
        """The next page of the backlog: one write of the stream, within the page budget;
        of every channel, only those the token may read, looked for in bounded steps."""
        if channel is None:
            granted = waiting.who.read if waiting.who is not None else None
            return store.all_after_id(position, STREAM_BACKLOG_PAGE, settings.page_bytes, granted)
        return store.after_id(channel, position, STREAM_BACKLOG_PAGE, settings.page_bytes)

    private_inboxes = request.environ.get(PRIVATE_INBOXES)

    def readable(message):
        if channel is not None:
            return True
        if not waiting.has_token:
            return not (private_inboxes and message.channel.startswith("@"))
        return waiting.who is not None and waiting.who.may_read(message.channel)

    def events():
        nonlocal cursor
        # Entered on the first step of the stream (Bottle takes it before replying), so
        # the slot is always given back.
        with waiting:
            watcher = waiting.watcher
            yield b"retry: 2000\n\n"
            if resumed and store.pruned_after(cursor, channel):
                yield f'event: gap\ndata: {{"cursor": {cursor}}}\n\n'.encode()
            while True:
                # Catch up from the store: on connect, and whenever this stream fell behind.
                # Each page is written before the next is read: a client that reads slowly
                # holds one page of this worker's memory, never its whole backlog.
                while True:
                    page = read_after(cursor)
                    if not waiting.allowed():
                        return
                    frames = b"".join(sse_frame(message) for message in page.messages if readable(message))
                    if frames:
                        yield frames
                    else:
                        gevent.sleep(0)  # nothing to write: let the worker's other requests run
                    cursor = page.cursor
                    if not page.more:
                        break
                keepalive_at = time.monotonic() + settings.keepalive
                while not waiting.over:
                    arrived = waiting.wait(keepalive_at - time.monotonic())
                    if not waiting.allowed():
                        return
                    if not arrived:
                        if time.monotonic() >= keepalive_at:
                            yield b": keep-alive\n\n"
                            broker.touch(agent, register=False)  # a watching agent stays active
                            keepalive_at = time.monotonic() + settings.keepalive
                        continue
                    items, overflowed = watcher.take()
                    if overflowed:
                        break
                    fresh = [frame for message, frame in items if message.id > cursor and readable(message)]
                    if fresh:
                        cursor = items[-1][0].id
                        yield b"".join(fresh)
                if waiting.over:
                    return

    return events()
