"""Builds the Bottle app: the JSON encoder, the error handler, the plugins (store errors,
access control) and the route modules. No route of its own."""

import bottle
import orjson

from ..access import AccessPlugin
from . import admin, messages, streams
from .context import Broker
from .errors import StoreErrorsPlugin, json_error


def create_app(settings, runtime, limits=None):
    """The Bottle app. `runtime` gives this process's store, hub and committer; `limits`
    the rate and stream counters shared by the workers (limits.SharedLimits)."""
    app = bottle.Bottle()
    app.uninstall("json")
    # orjson: replies are mostly lists of messages, and encoding them was a third of a
    # worker's time with the standard library's json.
    app.install(bottle.JSONPlugin(json_dumps=orjson.dumps))
    app.default_error_handler = json_error
    app.install(StoreErrorsPlugin())
    access = AccessPlugin(settings, runtime, limits)
    app.install(access)
    broker = Broker(settings, runtime, access, limits)
    for module in (admin, messages, streams):
        module.register(app, broker)
    return app
