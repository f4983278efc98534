"""The HTTP layer: Bottle routes that validate requests, call the store or the hub, and
shape replies. Every error leaves as JSON {"error": "..."} with its status code."""

import datetime
import functools
import json
import logging
import math
import os
import re
import time
from importlib import resources

import bottle
import orjson
from bottle import HTTPError, request, response

from . import __version__
from .access import CALLER, AccessPlugin, allow_read, allow_write, caller, limit_key
from .live import sse_frame
from .store import ChannelLimit, StoreBusy, StoreFull

log = logging.getLogger("agent_comms_broker.app")

CHANNEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
AGENT_ID_MAX = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"^[0-9]{1,20}$")
LIMIT_DEFAULT = 50
LIMIT_MAX = 1000
# SQLite's largest integer: no cursor can be past it.
ID_MAX = 2**63 - 1
STREAM_BACKLOG_PAGE = 500
# Reads naming an agent refresh its last-seen at most this often (per worker).
TOUCH_INTERVAL = 1.0
# An open stream re-reads its token at most this often: revoked or expired, the stream
# ends; changed grants apply.
TOKEN_RECHECK = 1.0


def _bad_request(text):
    return HTTPError(400, text)


def validate_channel(channel):
    if not CHANNEL_PATTERN.match(channel):
        raise _bad_request(
            "invalid channel name: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return channel


def validate_agent_id(value, what):
    if not isinstance(value, str):
        raise _bad_request(f"{what} must be a string")
    if not value or len(value) > AGENT_ID_MAX or _CONTROL.search(value):
        raise _bad_request(f"{what} must be 1 to {AGENT_ID_MAX} characters, without control characters")
    _require_unicode(value, what)
    return value


def _require_unicode(value, what):
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad_request(f"{what} is not valid Unicode (lone surrogate)") from None


def whole_number(raw, name, low, high=ID_MAX):
    value = int(raw) if _DIGITS.match(raw) else None
    if value is None or not low <= value <= high:
        raise _bad_request(f"{name} must be a whole number from {low} to {high}")
    return value


def _int_param(name, low, high=ID_MAX):
    raw = request.query.get(name)
    return None if raw is None else whole_number(raw, name, low, high)


def parse_timestamp(raw, name="since"):
    """Unix seconds as a number, or an ISO 8601 time (naive means UTC, as the seed's were)."""
    try:
        value = float(raw)
    except ValueError:
        try:
            moment = datetime.datetime.fromisoformat(raw.strip())
        except ValueError:
            raise _bad_request(f"{name} must be unix seconds (e.g. 1732406400.5) or an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        value = moment.timestamp()
    if not math.isfinite(value) or value < 0:
        raise _bad_request(f"{name} must be a finite number of 0 or more (1970 or later)")
    return value


def _wait_param(max_wait):
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise _bad_request("wait must be a number of seconds, 0 or more")
    return min(value, max_wait)


def read_json_body(max_body):
    """The request body parsed as JSON, within the size limit."""
    length = request.content_length
    if length > max_body:
        raise HTTPError(413, f"request body is over the limit of {max_body} bytes")
    stream = request.environ["wsgi.input"]
    raw = stream.read(length) if length >= 0 else stream.read(max_body + 1)
    if len(raw) > max_body:
        raise HTTPError(413, f"request body is over the limit of {max_body} bytes")
    if not raw.strip():
        raise _bad_request('request body is empty: send JSON {"sender": "...", "message": "..."}')
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise _bad_request(f"request body is not valid JSON: {error}") from None


def validate_post(item, max_message, caller=None, where=""):
    """(sender, message) of one post. With a token the sender is the token's agent: it may
    be left out, and naming another agent is refused."""
    if not isinstance(item, dict):
        raise _bad_request(f'{where}must be a JSON object {{"sender": "...", "message": "..."}}')
    if "sender" not in item and caller is None:
        raise _bad_request(f"{where}missing field: sender")
    if "message" not in item:
        raise _bad_request(f"{where}missing field: message")
    if "sender" in item:
        sender = validate_agent_id(item["sender"], f"{where}sender")
        if caller is not None and sender != caller.agent:
            raise HTTPError(403, f"{where}this token belongs to agent {caller.agent!r}: it cannot post as {sender!r}")
    else:
        sender = caller.agent
    text = item["message"]
    if not isinstance(text, str):
        raise _bad_request(f"{where}message must be a string")
    if not text:
        raise _bad_request(f"{where}message must not be empty")
    _require_unicode(text, f"{where}message")
    if len(text) > max_message // 4 and len(text.encode()) > max_message:
        raise HTTPError(413, f"{where}message is over the limit of {max_message} bytes")
    return sender, text


def _json_error(res):
    """Bottle's default error page, as JSON; never a traceback."""
    response.content_type = "application/json"
    if res.status_code >= 500 and res.status_code not in (503, 507):
        body = "internal server error"
    else:
        body = res.body if isinstance(res.body, str) and res.body else res.status_line[4:].lower()
    if res.status_code == 404 and body.startswith("Not found:"):
        body = f"no such route: {request.method} {request.path}"
    elif res.status_code == 405:
        body = f"method {request.method} is not allowed on {request.path}; allowed: {res.headers.get('Allow', '')}"
    return json.dumps({"error": body})


class StoreErrorsPlugin:
    """Turns the store's refusals into JSON answers a client can act on."""

    name = "store_errors"
    api = 2

    def apply(self, callback, route):
        def wrapper(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except StoreFull:
                raise HTTPError(507, "the broker's disk is full: nothing was stored; retry later") from None
            except ChannelLimit as error:
                raise HTTPError(409, f"{error}: nothing was stored") from None
            except StoreBusy:
                raise HTTPError(
                    503, "the database is busy: nothing was stored; retry later", **{"Retry-After": "1"}
                ) from None

        return wrapper


def _message_page(channel, page):
    messages = [message.as_dict() for message in page.messages]
    return {
        "channel": channel,
        "messages": messages,
        "count": len(messages),
        "cursor": page.cursor,
        "gap": page.gap,
        "more": page.more,
    }


def create_app(settings, runtime, limits=None):
    """The Bottle app. `runtime` gives this process's store, hub and committer; `limits`
    the rate and stream counters shared by the workers (limits.SharedLimits)."""
    app = bottle.Bottle()
    app.uninstall("json")
    # orjson: replies are mostly lists of messages, and encoding them was a third of a
    # worker's time with the standard library's json.
    app.install(bottle.JSONPlugin(json_dumps=orjson.dumps))
    app.default_error_handler = _json_error
    app.install(StoreErrorsPlugin())
    access = AccessPlugin(settings, runtime, limits)
    app.install(access)
    started = time.time()
    last_touch = {}

    def touch(agent):
        """Refresh an agent's last-seen; best effort, so a read never fails for it."""
        now = time.time()
        if agent is None or now - last_touch.get(agent, 0) < TOUCH_INTERVAL:
            return
        try:
            runtime().store.touch_agent(agent, now)
        except (StoreBusy, StoreFull) as error:
            log.warning("could not record agent %s as seen: %s", agent, error)
            return
        last_touch[agent] = now
        if len(last_touch) > 10000:
            last_touch.clear()

    def touch_reader():
        """The agent of this request (its token's, else its X-Agent-ID), recorded as seen."""
        who = caller()
        agent = who.agent if who is not None else request.headers.get("X-Agent-ID")
        if agent is not None:
            validate_agent_id(agent, "X-Agent-ID header")
            touch(agent)
        return agent

    @app.get("/healthz", access="health")
    def healthz():
        try:
            ok = runtime().store.healthy()
        except Exception as error:  # whatever failed, the answer is 503 with its cause
            raise HTTPError(503, f"database check failed: {error}") from None
        if not ok:
            raise HTTPError(503, "database schema is not this broker's")
        return {"status": "ok"}

    @app.get("/status", access="public")
    def status():
        if caller() is not None or settings.auth != "required":
            touch_reader()  # anonymous callers in `required` mode write nothing
        store = runtime().store
        now = time.time()
        reply = {
            "status": "running",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
            "version": __version__,
            "uptime": round(now - started, 3),
            "auth": settings.auth,
            "worker": os.getpid(),
        }
        if caller() is None and settings.auth == "required":
            return reply  # anonymous callers learn only that the broker runs
        messages, channels, agents, active = store.totals(now - settings.active_window)
        return reply | {
            "messages": messages,
            "channels": channels,
            "agents": agents,
            "active_agents": active,
            "database_size": store.size_bytes(),
        }

    @app.get("/channels")
    def channels():
        touch_reader()
        rows = runtime().store.channels()
        who = caller()
        listing = [
            {"name": name, "message_count": count, "last_activity": last}
            for name, count, last in rows
            if who is None or who.may_read(name)
        ]
        return {"channels": listing, "count": len(listing)}

    @app.get("/agents")
    def agents():
        touch_reader()
        active_since = time.time() - settings.active_window
        listing = [
            {
                "id": agent_id,
                "first_seen": first,
                "last_seen": last,
                "message_count": sent,
                "active": last >= active_since,
                "status": "online" if last >= active_since else "offline",
            }
            for agent_id, first, last, sent in runtime().store.agents()
        ]
        return {"agents": listing, "count": len(listing)}

    @app.post("/messages/<channel>", access="write")
    def post_messages(channel):
        validate_channel(channel)
        allow_write(channel)
        touch_reader()
        body = read_json_body(settings.max_body)
        who = caller()
        if isinstance(body, list):
            if not body:
                raise _bad_request("a batch must hold at least one message")
            if len(body) > settings.max_batch:
                raise HTTPError(413, f"a batch holds at most {settings.max_batch} messages")
            entries = [
                (channel, *validate_post(item, settings.max_message, who, f"item {i}: ")) for i, item in enumerate(body)
            ]
        else:
            entries = [(channel, *validate_post(body, settings.max_message, who))]
        stored = runtime().committer.append(entries)
        response.status = 201
        if isinstance(body, list):
            return {"status": "success", "messages": [m.as_dict() for m in stored], "count": len(stored)}
        return {"status": "success", **stored[0].as_dict()}

    @app.get("/messages/<channel>")
    def get_messages(channel):
        validate_channel(channel)
        allow_read(channel)
        limit = _int_param("limit", 1, LIMIT_MAX) or LIMIT_DEFAULT
        after = _int_param("after", 0)
        since_raw = request.query.get("since")
        since = parse_timestamp(since_raw) if since_raw is not None else None
        if after is not None and since is not None:
            raise _bad_request("give either after or since, not both")
        wait = _wait_param(settings.max_wait)
        if wait and after is None and since is None:
            raise _bad_request("wait needs a cursor: after=ID (take it from a previous reply's cursor)")
        touch_reader()
        store = runtime().store
        if after is None and since is None:
            return _message_page(channel, store.latest(channel, limit))
        if after is not None:
            read = functools.partial(store.after_id, channel, after, limit)
        else:
            read = functools.partial(store.after_time, channel, since, limit)
        return _message_page(channel, long_poll(read, channel, wait))

    def long_poll(read, channel, wait):
        """read() now; if that page is empty, read again as each message of the channel
        arrives, until one is there or `wait` seconds pass."""
        page = read()
        if page.messages or not wait:
            return page
        key = limit_key()
        take_stream_slot(key)  # a waiting long-poll holds a connection as a stream does
        hub = runtime().hub
        watcher = hub.watch(channel)
        try:
            page = read()  # again, now that a commit cannot slip between read and watch
            deadline = time.monotonic() + wait
            while not page.messages and not watcher.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not watcher.event.wait(remaining):
                    break
                watcher.take()
                page = read()
        finally:
            hub.unwatch(watcher)
            give_stream_slot(key)
        who = caller()
        if who is not None:  # the token may have gone, or lost the channel, while the request waited
            request.environ[CALLER] = access.refresh(who)
            if request.environ[CALLER] is None:
                raise HTTPError(401, "the bearer token was revoked or expired while the request waited")
            allow_read(channel)
        return page

    def take_stream_slot(key):
        if settings.max_streams and not limits.open_stream(key, settings.max_streams):
            raise HTTPError(
                429,
                f"too many open streams and long-polls: at most {settings.max_streams} per agent "
                "(AGENT_COMMS_MAX_STREAMS); close one first",
                **{"Retry-After": "5"},
            )

    def give_stream_slot(key):
        if settings.max_streams:
            limits.close_stream(key)

    def open_stream(channel):
        """A text/event-stream of a channel (or of all): backlog after the cursor, then live."""
        # Both are checked when both are given; the header (what EventSource sends on a
        # reconnect) wins over the query's starting point.
        after = _int_param("after", 0)
        header = request.headers.get("Last-Event-ID")
        resumed_at = whole_number(header, "Last-Event-ID", 0) if header is not None else after
        store = runtime().store
        if resumed_at is not None:
            cursor = resumed_at
            resumed = True
        else:
            cursor = store.max_id()
            resumed = False
        agent = touch_reader()
        who = caller()
        stream_key = limit_key()
        hub = runtime().hub
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
            who = access.refresh(who)
            return who is not None and (channel is None or who.may_read(channel))

        def events():
            nonlocal cursor
            # Checked on the first step of the stream (Bottle takes it before replying),
            # so the `finally` below always gives the slot back.
            take_stream_slot(stream_key)
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
                            touch(agent)  # a watching agent stays active
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
                give_stream_slot(stream_key)

        return events()

    @app.get("/stream")
    def stream_all():
        who = caller()
        if who is not None and not who.read:
            raise HTTPError(403, f"token {who.token_id} (agent {who.agent}) may not read any channel")
        return open_stream(None)

    @app.get("/stream/<channel>")
    def stream_channel(channel):
        validate_channel(channel)
        allow_read(channel)
        return open_stream(channel)

    @app.get("/openapi.json", access="public")
    def openapi():
        response.content_type = "application/json"
        return OPENAPI_DOCUMENT

    return app


OPENAPI_DOCUMENT = resources.files(__package__).joinpath("openapi.json").read_bytes()
