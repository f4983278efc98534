"""Builds the Bottle app: the JSON encoder, the error handler, the plugins (store errors,
access control) and the route modules. No route of its own."""

import bottle

from ..access import AccessPlugin
from . import admin, cursors, keys, messages, metrics, queue, search, streams, ui
from .context import Broker
from .errors import StoreErrorsPlugin, json_error
from .replies import JsonReplies


def create_app(settings, runtime, limits=None):
    """The Bottle app. `runtime` gives this process's store, hub and committer; `limits`
    the rate and stream counters shared by the workers (limits.SharedLimits)."""
    app = bottle.Bottle()
    app.uninstall("json")
    access = AccessPlugin(settings, runtime, limits)
    broker = Broker(settings, runtime, access, limits)
    # Installed first, so it wraps the others: it sees each route's final reply.
    app.install(JsonReplies(broker))
    app.default_error_handler = json_error
    app.install(StoreErrorsPlugin())
    app.install(access)
    for module in (admin, keys, messages, queue, cursors, search, streams, metrics, ui):
        module.register(app, broker)
    return app
