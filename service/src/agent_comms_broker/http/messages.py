"""POST and GET /messages/{channel}: posting (one message or a batch, with replies, tags,
priorities, meta and idempotency keys), pages by cursor or read position and their
filters, the long-poll that waits for the next message; one message and its receipts."""

import dataclasses
import functools
import time

from bottle import HTTPError, request, response

from ..access import allow_read, allow_write, caller, readable
from ..store import EVERYTHING, Filter, NoSuchMessage, stored_size
from .keys import check_signatures
from .validate import (
    LIMIT_DEFAULT,
    LIMIT_MAX,
    PRIORITY_RANGE,
    TAG_MAX,
    bad_request,
    given_cursor,
    header,
    int_param,
    parse_timestamp,
    read_json_body,
    text_param,
    validate_channel,
    validate_key,
    validate_post,
    validate_tag,
    wait_param,
    whole_number,
)
from .waiting import Wait

# One message: its id is digits (anything else is no route of this broker's: 404).
MESSAGE_PATH = "/messages/<channel>/<message_id:re:[0-9]+>"


def register(app, broker):
    app.post("/messages/<channel>", callback=functools.partial(post_messages, broker), access="write")
    app.get("/messages/<channel>", callback=functools.partial(get_messages, broker))
    app.get(MESSAGE_PATH, callback=functools.partial(get_message, broker))
    app.get(f"{MESSAGE_PATH}/receipts", callback=functools.partial(get_receipts, broker))


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
    key = validate_key(header("Idempotency-Key"), "the Idempotency-Key header")
    if isinstance(body, list):
        if not body:
            raise bad_request("a batch must hold at least one message")
        if len(body) > settings.max_batch:
            raise HTTPError(413, f"a batch holds at most {settings.max_batch} messages")
        if key is not None:
            raise bad_request('an Idempotency-Key header names one post: give each batch item its own "key"')
        posts = [validate_post(item, settings.max_message, channel, who, f"item {i}: ") for i, item in enumerate(body)]
        keys = [(post.sender, post.key) for post in posts if post.key is not None]
        if len(keys) != len(set(keys)):
            raise bad_request("two items of the batch have the same sender and key")
    else:
        posts = [validate_post(body, settings.max_message, channel, who)]
        if key is not None:
            if posts[0].key not in (None, key):
                raise bad_request('the Idempotency-Key header and the body\'s "key" differ')
            posts = [dataclasses.replace(posts[0], key=key)]
    check_replies(broker, channel, posts)
    check_signatures(broker, posts)
    if who is None:
        # An agent that holds a token speaks only with it: no one may post as it, or as a
        # name that looks like it, without.
        for sender in {post.sender for post in posts}:
            holder = broker.token_holder_like(sender)
            if holder == sender:
                raise HTTPError(403, f"agent {sender!r} has a token: post with it (Authorization: Bearer ...)")
            if holder is not None:
                raise HTTPError(403, f"sender {sender!r} looks like agent {holder!r}, which has a token")
    sizes = (stored_size(p.channel, p.sender, p.message, p.tags, p.meta, p.signature) for p in posts)
    broker.access.spend_bytes(sum(sizes))
    # The caps on channels and agents hold anonymous posts: a flood of them cannot lock
    # out the agents that hold tokens.
    stored = broker.committer.append(posts, capped=who is None)
    repeated = sum(message.duplicate for message in stored)
    if broker.metrics is not None:
        broker.metrics.stored(channel, len(stored) - repeated)
    # 201: stored now; 200: every post was a repeat (its idempotency key), nothing stored.
    response.status = 200 if repeated == len(stored) else 201
    if isinstance(body, list):
        messages = [message.as_dict() for message in stored]
        return {"status": "success", "messages": messages, "count": len(stored), "duplicates": repeated}
    reply = {"status": "success", **stored[0].as_dict()}
    if repeated:
        reply["duplicate"] = True
    return reply


def check_replies(broker, channel, posts):
    """A reply answers an earlier message of its own channel (400 otherwise), which the
    poster may read: else a reply_to would tell which ids an inbox it may only post to
    holds."""
    if any(post.reply_to is not None for post in posts) and not readable(channel):
        raise HTTPError(403, f"reply_to needs read access to channel {channel!r}: nothing was stored")
    for index, post in enumerate(posts):
        if post.reply_to is not None and broker.store.message(channel, post.reply_to) is None:
            where = f"item {index}: " if len(posts) > 1 else ""
            raise bad_request(f"{where}reply_to {post.reply_to} is not a message of channel {channel!r}")


def get_messages(broker, channel):
    validate_channel(channel)
    allow_read(channel)
    limit = int_param("limit", 1, LIMIT_MAX) or LIMIT_DEFAULT
    after = int_param("after", 0)
    since_raw = request.query.get("since")
    since = parse_timestamp(since_raw) if since_raw is not None else None
    unread = flag_param("unread")
    if after is not None and since is not None:
        raise bad_request("give either after or since, not both")
    if unread and (after is not None or since is not None):
        raise bad_request("unread reads from the agent's read position: give it without after or since")
    only = read_filter()
    wait = wait_param(broker.settings.max_wait)
    store = broker.store
    if unread:
        after = store.cursor(broker.acting_agent(), channel)
    else:
        broker.touch_reader()
    if wait and after is None and since is None:
        raise bad_request("wait needs a cursor: after=ID (take it from a previous reply's cursor)")
    given_cursor(store, after, "after")
    budget = broker.settings.page_bytes
    if after is None and since is None:
        return message_page(channel, store.latest(channel, limit, budget, only))
    if after is not None:
        read = functools.partial(store.after_id, channel, after, limit, budget, only)
    else:
        read = functools.partial(store.after_time, channel, since, limit, budget, only)
    return message_page(channel, long_poll(broker, read, channel, wait))


def flag_param(name):
    raw = request.query.get(name)
    if raw is None or raw in ("0", "false"):
        return False
    if raw in ("", "1", "true"):
        return True
    raise bad_request(f"{name} must be 1 or 0 (true or false)")


def read_filter():
    """What a read keeps: thread=ID, tag=T, min_priority=N."""
    thread = int_param("thread", 1)
    tag = text_param("tag", TAG_MAX)
    if tag is not None:
        validate_tag(tag)
    min_priority = int_param("min_priority", *PRIORITY_RANGE)
    if thread is None and tag is None and min_priority is None:
        return EVERYTHING
    return Filter(thread, tag, min_priority)


def get_message(broker, channel, message_id):
    message = one_message(broker, channel, message_id)
    return message.as_dict()


def get_receipts(broker, channel, message_id):
    """Who has read a message: each agent whose read position reached it, and when."""
    message = one_message(broker, channel, message_id)
    try:
        rows = broker.store.receipts(channel, message.id)
    except NoSuchMessage as error:  # pruned between the two reads
        raise HTTPError(404, str(error)) from None
    receipts = [{"agent": agent, "read_at": at} for agent, at in rows]
    return {"channel": channel, "id": message.id, "receipts": receipts, "count": len(receipts)}


def one_message(broker, channel, raw_id):
    validate_channel(channel)
    allow_read(channel)
    message_id = whole_number(raw_id, "message id", 1)
    broker.touch_reader()
    message = broker.store.message(channel, message_id)
    if message is None:
        raise HTTPError(404, f"no message {message_id} in channel {channel!r}")
    return message


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
    waiting.recheck()  # the token may have gone, or lost the channel, while it waited
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
