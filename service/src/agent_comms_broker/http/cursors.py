"""Read positions: where each agent has read up to in each channel (the seed's `read_by`,
kept per agent and channel). They move forward only; `GET /messages/{channel}?unread=1`
reads what follows, /channels counts it, receipts are built from their moves."""

import functools

from ..access import allow_read
from .validate import bad_request, given_cursor, optional_json_object, validate_channel


def register(app, broker):
    app.put("/cursors/<channel>", callback=functools.partial(put_cursor, broker), access="write")
    app.get("/cursors/<channel>", callback=functools.partial(get_cursor, broker))


def put_cursor(broker, channel):
    validate_channel(channel)
    allow_read(channel)
    body = optional_json_object(broker.settings.max_body)
    read = body.get("read")
    if isinstance(read, bool) or not isinstance(read, int) or read < 0:
        raise bad_request('send {"read": ID}: the id of the last message read, a whole number')
    given_cursor(broker.store, read, "read")
    agent = broker.acting_agent()
    position, moved = broker.committer.run(broker.store.move_cursor_work(agent, channel, read))
    return {"channel": channel, "agent": agent, "read": position, "moved": moved}


def get_cursor(broker, channel):
    validate_channel(channel)
    allow_read(channel)
    agent = broker.acting_agent()
    store = broker.store
    return {
        "channel": channel,
        "agent": agent,
        "read": store.cursor(agent, channel),
        "unread": store.unread(agent, channel),
    }
