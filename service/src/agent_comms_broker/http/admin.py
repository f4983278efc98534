"""The broker's own resources: /healthz, /status, /channels, /agents, /openapi.json."""

import datetime
import functools
import os
import time
from importlib import resources

from bottle import HTTPError, response

from .. import __version__
from ..access import caller

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
    if not anonymous_in_required:
        broker.touch_reader()  # anonymous callers in `required` mode write nothing
    now = time.time()
    reply = {
        "status": "running",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
        "version": __version__,
        "uptime": round(now - broker.started, 3),
        "auth": settings.auth,
        "worker": os.getpid(),
    }
    if anonymous_in_required:
        return reply  # anonymous callers learn only that the broker runs
    store = broker.store
    messages, channel_count, agent_count, active = store.totals(now - settings.active_window)
    return reply | {
        "messages": messages,
        "channels": channel_count,
        "agents": agent_count,
        "active_agents": active,
        "database_size": store.size_bytes(),
    }


def channels(broker):
    broker.touch_reader()
    rows = broker.store.channels()
    who = caller()
    listing = [
        {"name": name, "message_count": count, "last_activity": last}
        for name, count, last in rows
        if who is None or who.may_read(name)
    ]
    return {"channels": listing, "count": len(listing)}


def agents(broker):
    broker.touch_reader()
    active_since = time.time() - broker.settings.active_window
    listing = [
        {
            "id": agent_id,
            "first_seen": first,
            "last_seen": last,
            "message_count": sent,
            "active": last >= active_since,
            "status": "online" if last >= active_since else "offline",
        }
        for agent_id, first, last, sent in broker.store.agents()
    ]
    return {"agents": listing, "count": len(listing)}


def openapi():
    response.content_type = "application/json"
    return OPENAPI_DOCUMENT
