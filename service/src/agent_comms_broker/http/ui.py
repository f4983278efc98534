"""The dashboard: /ui/ serves its page, script and style (agent_comms_broker/ui/, plain
files, no build step), and the two reads it needs beside the public API: /activity (each
channel's messages per minute, for the sparklines) and /queues (the channels worked as
task queues). The page makes every other call through the public API with the person's
own token, so grants hold for it as for any agent."""

import functools
import time
from importlib import resources

from bottle import HTTPError, HTTPResponse, redirect, static_file

from ..access import readable
from .validate import int_param

UI_FILES = str(resources.files("agent_comms_broker").joinpath("ui"))
ACTIVITY_SLOT = 60  # seconds


def register(app, broker):
    if broker.settings.ui:
        app.get("/ui", callback=lambda: redirect("/ui/", 301), access="public")
        app.get("/ui/", callback=functools.partial(page_file, "index.html"), access="public")
        app.get("/ui/<name:re:[a-z]+\\.(?:js|css|png|svg)>", callback=page_file, access="public")
    app.get("/activity", callback=functools.partial(activity, broker))
    app.get("/queues", callback=functools.partial(queues, broker))


def page_file(name):
    reply = static_file(name, root=UI_FILES)
    if isinstance(reply, HTTPResponse) and reply.status_code >= 400:
        raise HTTPError(404, "no such file of the dashboard")
    return reply


def activity(broker):
    """Messages per minute of each channel the caller may read, over the last `minutes`."""
    minutes = int_param("minutes", 1, 1440) or 60
    broker.touch_reader()
    now = time.time()
    since = now - minutes * ACTIVITY_SLOT
    counts = broker.store.activity(since, ACTIVITY_SLOT, now)
    shown = {channel: row for channel, row in sorted(counts.items()) if readable(channel)}
    return {"since": since, "slot": ACTIVITY_SLOT, "minutes": minutes, "channels": shown}


def queues(broker):
    """The channels a task was ever taken from that the caller may read, with their
    counts by state."""
    broker.touch_reader()
    rows = [
        {"channel": channel, "counts": counts} for channel, counts in broker.store.queue_totals() if readable(channel)
    ]
    return {"queues": rows, "count": len(rows)}
