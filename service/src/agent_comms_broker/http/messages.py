"""POST and GET /messages/{channel}: posting (one message or a batch), pages by cursor,
and the long-poll that waits for the next message."""

import functools
import time

from bottle import HTTPError, request, response

from ..access import CALLER, allow_read, allow_write, caller
from ..store import stored_size
from .validate import (
    LIMIT_DEFAULT,
    LIMIT_MAX,
    bad_request,
    given_cursor,
    int_param,
    parse_timestamp,
    read_json_body,
    validate_channel,
    validate_post,
    wait_param,
)
from .waiting import Wait


def register(app, broker):
    app.post("/messages/<channel>", callback=functools.partial(post_messages, broker), access="write")
    app.get("/messages/<channel>", callback=functools.partial(get_messages, broker))


def post_messages(broker, channel):
    settings = broker.settings
    validate_channel(channel)
    allow_write(channel)
    broker.touch_reader()
    length = request.content_length
    # A body larger than the limit is refused unread; one being read counts as in flight.
    with broker.holding(length if 0 <= length <= settings.max_body else settings.max_body):
        return store_post(broker, channel, read_json_body(settings.max_body))


def store_post(broker, channel, body):
    settings = broker.settings
    who = caller()
    if isinstance(body, list):
        if not body:
            raise bad_request("a batch must hold at least one message")
        if len(body) > settings.max_batch:
            raise HTTPError(413, f"a batch holds at most {settings.max_batch} messages")
        entries = [
            (channel, *validate_post(item, settings.max_message, who, f"item {i}: ")) for i, item in enumerate(body)
        ]
    else:
        entries = [(channel, *validate_post(body, settings.max_message, who))]
    if who is None:
        # An agent that holds a token speaks only with it: no one may post as it, or as a
        # name that looks like it, without.
        for _, sender, _ in entries:
            holder = broker.token_holder_like(sender)
            if holder == sender:
                raise HTTPError(403, f"agent {sender!r} has a token: post with it (Authorization: Bearer ...)")
            if holder is not None:
                raise HTTPError(403, f"sender {sender!r} looks like agent {holder!r}, which has a token")
    broker.access.spend_bytes(sum(stored_size(*entry) for entry in entries))
    # The caps on channels and agents hold anonymous posts: a flood of them cannot lock
    # out the agents that hold tokens.
    stored = broker.committer.append(entries, capped=who is None)
    response.status = 201
    if isinstance(body, list):
        return {"status": "success", "messages": [m.as_dict() for m in stored], "count": len(stored)}
    return {"status": "success", **stored[0].as_dict()}


def get_messages(broker, channel):
    validate_channel(channel)
    allow_read(channel)
    limit = int_param("limit", 1, LIMIT_MAX) or LIMIT_DEFAULT
    after = int_param("after", 0)
    since_raw = request.query.get("since")
    since = parse_timestamp(since_raw) if since_raw is not None else None
    if after is not None and since is not None:
        raise bad_request("give either after or since, not both")
    wait = wait_param(broker.settings.max_wait)
    if wait and after is None and since is None:
        raise bad_request("wait needs a cursor: after=ID (take it from a previous reply's cursor)")
    broker.touch_reader()
    store = broker.store
    given_cursor(store, after, "after")
    budget = broker.settings.page_bytes
    if after is None and since is None:
        return message_page(channel, store.latest(channel, limit, budget))
    if after is not None:
        read = functools.partial(store.after_id, channel, after, limit, budget)
    else:
        read = functools.partial(store.after_time, channel, since, limit, budget)
    return message_page(channel, long_poll(broker, read, channel, wait))


def long_poll(broker, read, channel, wait):
    """read() now; if that page is empty, read again as each message of the channel
    arrives, until one is there or `wait` seconds pass."""
    page = read()
    if page.messages or not wait:
        return page
    # A waiting long-poll holds a stream slot, as a stream does.
    with Wait(broker, channel) as waiting:
        page = read()  # again, now that a commit cannot slip between read and watch
        deadline = time.monotonic() + wait
        while not page.messages and not waiting.over and waiting.allowed():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if waiting.wait(remaining):
                waiting.watcher.take()
                page = read()
    if waiting.has_token:  # the token may have gone, or lost the channel, while it waited
        waiting.allowed(now=True)
        request.environ[CALLER] = waiting.who
        if waiting.who is None:
            raise HTTPError(401, "the bearer token was revoked or expired while the request waited")
        allow_read(channel)
    return page


def message_page(channel, page):
    messages = [message.as_dict() for message in page.messages]
    return {
        "channel": channel,
        "messages": messages,
        "count": len(messages),
        "cursor": page.cursor,
        "gap": page.gap,
        "more": page.more,
    }
