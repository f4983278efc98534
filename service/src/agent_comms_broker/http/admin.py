"""The broker's own resources: /healthz, /status, /channels, /agents, /openapi.json."""

import datetime
import functools
import os
import time
from importlib import resources

from bottle import HTTPError, response

from .. import __version__
from ..access import caller, readable
from ..notify_rules import redacted
from .validate import LIMIT_MAX, int_param, text_param

OPENAPI_DOCUMENT = resources.files("agent_comms_broker").joinpath("openapi.json").read_bytes()


def register(app, broker):
    app.get("/healthz", callback=functools.partial(healthz, broker), access="health")
    app.get("/status", callback=functools.partial(status, broker), access="public")
    app.get("/channels", callback=functools.partial(channels, broker))
    app.get("/agents", callback=functools.partial(agents, broker))
    app.get("/openapi.json", callback=openapi, access="public")


def healthz(broker):
    try:
        ok = broker.store.healthy()
    except Exception as error:  # whatever failed, the answer is 503 with its cause
        raise HTTPError(503, f"database check failed: {error}") from None
    if not ok:
        raise HTTPError(503, "database schema is not this broker's")
    return {"status": "ok"}


def status(broker):
    settings = broker.settings
    anonymous_in_required = caller() is None and settings.auth == "required"
    # Anonymous callers in `required` mode write nothing (and are nobody).
    agent = None if anonymous_in_required else broker.touch_reader()
    now = time.time()
    reply = {
        "status": "running",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
        "version": __version__,
        "uptime": round(now - broker.started, 3),
        "auth": settings.auth,
        "worker": os.getpid(),
        # Who the broker takes the caller for: its token's agent, else its X-Agent-ID.
        "agent": agent,
    }
    if anonymous_in_required:
        return reply  # anonymous callers learn only that the broker runs
    store = broker.store
    messages, channel_count, agent_count, active = store.totals(now - settings.active_window)
    reply |= {
        "messages": messages,
        "channels": channel_count,
        "agents": agent_count,
        "active_agents": active,
        "database": store.database,
        "database_size": store.size_bytes(),
        "synchronous": store.synchronous(),
        "search": settings.search,
    }
    rules = broker.runtime.notify_rules
    if rules is not None and rules.rules:
        reply["notifications"] = notifications(store, rules)
    return reply


def notifications(store, rules):
    """Each notification rule: its destination, cursor, deliveries and failures in a row,
    the last error and when it is tried again (null: not failing)."""
    records = store.notify_rules()
    shown = []
    for rule in rules.rules:
        cursor, delivered, failures, error, next_try = records.get(rule.name, (None, 0, 0, None, 0))
        shown.append(
            {
                "rule": rule.name,
                "kind": rule.kind,
                "url": redacted(rule.url),
                "cursor": cursor,
                "delivered": delivered,
                "failures": failures,
                "last_error": error,
                "next_try": next_try if failures else None,
            }
        )
    return shown


def listing_page():
    """`limit` and `after` of a listing: a page of names after `after`, in name order."""
    return int_param("limit", 1, LIMIT_MAX) or LIMIT_MAX, text_param("after") or ""


def listed(key, rows, limit, after):
    """A listing's reply: at most `limit` rows, whether more follow, and the cursor (the
    last name given, or `after` again) to pass as the next `after`."""
    more = len(rows) > limit
    del rows[limit:]
    cursor = rows[-1][0] if rows else (after or None)
    return {key: rows, "count": len(rows), "more": more, "cursor": cursor}


def channels(broker):
    limit, after = listing_page()
    agent = broker.touch_reader()
    rows, position = [], after
    # Channels the token may not read are skipped, never named (not even by the cursor):
    # read on until the page is full or the channels end.
    while len(rows) <= limit:
        batch = broker.store.channels(position, limit + 1)
        rows += [row for row in batch if readable(row[0])]
        if len(batch) <= limit:
            break
        position = batch[-1][0]
    reply = listed("channels", rows, limit, after)
    reply["channels"] = [
        {"name": name, "message_count": count, "last_activity": last} for name, count, last in reply["channels"]
    ]
    if agent is not None:  # what the caller has not read yet, by its read positions
        unread = broker.store.unread_counts(
            agent, [(each["name"], each["message_count"]) for each in reply["channels"]]
        )
        for each in reply["channels"]:
            each["unread"] = unread[each["name"]]
    return reply


def agents(broker):
    limit, after = listing_page()
    broker.touch_reader()
    active_since = time.time() - broker.settings.active_window
    reply = listed("agents", broker.store.agents(after, limit + 1), limit, after)
    reply["agents"] = [
        {
            "id": agent_id,
            "first_seen": first,
            "last_seen": last,
            "message_count": sent,
            "active": last >= active_since,
            "status": "online" if last >= active_since else "offline",
        }
        for agent_id, first, last, sent in reply["agents"]
    ]
    return reply


def openapi():
    response.content_type = "application/json"
    return OPENAPI_DOCUMENT
