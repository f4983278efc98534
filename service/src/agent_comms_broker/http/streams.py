"""GET /stream/{channel} and GET /stream: Server-Sent Events, the backlog after the
client's cursor from the store, then live messages from this worker's hub."""

import functools
import time

from bottle import HTTPError, request, response

from ..access import allow_read, caller, limit_key
from ..live import sse_frame
from .validate import int_param, validate_channel, whole_number

STREAM_BACKLOG_PAGE = 500
# An open stream re-reads its token at most this often: revoked or expired, the stream
# ends; changed grants apply.
TOKEN_RECHECK = 1.0


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
    header = request.headers.get("Last-Event-ID")
    resumed_at = whole_number(header, "Last-Event-ID", 0) if header is not None else after
    store = broker.store
    if resumed_at is not None:
        cursor = resumed_at
        resumed = True
    else:
        cursor = store.max_id()
        resumed = False
    agent = broker.touch_reader()
    who = caller()
    stream_key = limit_key()
    hub = broker.hub
    response.content_type = "text/event-stream"
    response.set_header("Cache-Control", "no-cache")
    response.set_header("X-Accel-Buffering", "no")

    def read_after(position):
        if channel is None:
            return store.all_after_id(position, STREAM_BACKLOG_PAGE)
        return store.after_id(channel, position, STREAM_BACKLOG_PAGE).messages

    def readable(message):
        return who is None or channel is not None or who.may_read(message.channel)

    checked = time.monotonic()

    def still_allowed():
        """Whether the stream's token still holds (re-read at most every TOKEN_RECHECK)."""
        nonlocal who, checked
        if who is None or time.monotonic() - checked < TOKEN_RECHECK:
            return True
        checked = time.monotonic()
        who = broker.access.refresh(who)
        return who is not None and (channel is None or who.may_read(channel))

    def events():
        nonlocal cursor
        # Checked on the first step of the stream (Bottle takes it before replying),
        # so the `finally` below always gives the slot back.
        broker.take_stream_slot(stream_key)
        watcher = hub.watch(channel)
        try:
            yield b"retry: 2000\n\n"
            if resumed and store.pruned_after(cursor, channel):
                yield f'event: gap\ndata: {{"cursor": {cursor}}}\n\n'.encode()
            while True:
                # Catch up from the store: on connect, and whenever this stream fell behind.
                while True:
                    messages = read_after(cursor)
                    if not still_allowed():
                        return
                    if messages:
                        frames = b"".join(sse_frame(message) for message in messages if readable(message))
                        if frames:
                            yield frames
                        cursor = messages[-1].id
                    if len(messages) < STREAM_BACKLOG_PAGE:
                        break
                while not watcher.closed:
                    if not watcher.event.wait(settings.keepalive):
                        if not still_allowed():
                            return
                        yield b": keep-alive\n\n"
                        broker.touch(agent)  # a watching agent stays active
                        continue
                    items, overflowed = watcher.take()
                    if not still_allowed():
                        return
                    if overflowed:
                        break
                    fresh = [frame for message, frame in items if message.id > cursor and readable(message)]
                    if fresh:
                        cursor = items[-1][0].id
                        yield b"".join(fresh)
                if watcher.closed:
                    return
        finally:
            hub.unwatch(watcher)
            broker.give_stream_slot(stream_key)

    return events()
