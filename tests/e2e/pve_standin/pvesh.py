"""`pvesh get|set|create|delete PATH [--key value ...] [--output-format json]`: the API's
routes (api.py) from the node's shell, as root@pam."""

import json

from .api import ApiError, Caller, call
from .node import PveError, options

METHODS = {"get": "GET", "set": "PUT", "create": "POST", "delete": "DELETE"}


def pvesh(method, path, *args):
    params = options(args)
    output = params.pop("output-format", "text")
    try:
        data = call(Caller(), METHODS[method], path, params)
    except ApiError as error:
        detail = "".join(f"\n{key}: {message}" for key, message in sorted((error.errors or {}).items()))
        raise PveError(f"{error}{detail}") from error
    if output.startswith("json"):
        print(json.dumps(data, indent=2 if output == "json-pretty" else None))
    elif data is not None:
        print(data if isinstance(data, str) else json.dumps(data))


def command(method):
    return lambda *args: pvesh(method, *args)


COMMANDS = {method: command(method) for method in METHODS}
