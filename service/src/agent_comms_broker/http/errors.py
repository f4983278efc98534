"""Errors as JSON {"error": "..."}: Bottle's error pages replaced, and the store's
refusals (full disk or database, channel or agent cap, busy database) turned into answers
a client can act on."""

import json

from bottle import HTTPError, request, response

from ..store import (
    AgentLimit,
    ChannelLimit,
    DatabaseFull,
    KeyConflict,
    NoSuchMessage,
    StoreBusy,
    StoreFull,
    StoreUnavailable,
    Unstorable,
)


def busy_answer(error):
    """What a 503 says: the database busy or out of reach; for a write, whether anything
    may have been stored (a commit whose answer was lost may have taken effect)."""
    state = "cannot be reached" if isinstance(error, StoreUnavailable) else "is busy"
    if request.method in ("GET", "HEAD"):
        return f"the database {state}; retry later"
    if "during a commit" in str(error):
        return f"the database {state}: the write may have been stored; retry with the same idempotency key"
    return f"the database {state}: nothing was stored; retry later"


def json_error(res):
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
            except DatabaseFull as error:
                raise HTTPError(507, f"{error}: nothing was stored") from None
            except StoreFull:
                raise HTTPError(507, "the broker's disk is full: nothing was stored; retry later") from None
            except (ChannelLimit, AgentLimit, KeyConflict) as error:
                raise HTTPError(409, f"{error}: nothing was stored") from None
            except NoSuchMessage as error:
                raise HTTPError(404, str(error)) from None
            except Unstorable as error:
                raise HTTPError(400, f"{error}: nothing was stored") from None
            except StoreBusy as error:
                raise HTTPError(503, busy_answer(error), **{"Retry-After": "1"}) from None

        return wrapper
