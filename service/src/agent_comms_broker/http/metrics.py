"""GET /metrics: the broker's figures for Prometheus, in its text format (metrics.py)."""

import functools
import ipaddress

from bottle import request, response

from ..access import caller, unauthorized
from ..metrics import exposition

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def register(app, broker):
    if broker.settings.metrics_access != "off":
        app.get("/metrics", callback=functools.partial(get_metrics, broker), access="public")


def get_metrics(broker):
    settings = broker.settings
    if settings.metrics_access == "token" and caller() is None and not scraper(settings):
        raise unauthorized("metrics need a token (AGENT_COMMS_METRICS=token): send 'Authorization: Bearer <token>'")
    response.content_type = CONTENT_TYPE
    return exposition(broker.store, settings, broker.runtime.metrics)


def scraper(settings):
    """Whether the request comes from an address AGENT_COMMS_METRICS_FROM lets in without a
    token (the socket's own address, never a forwarded one)."""
    if not settings.metrics_from:
        return False
    try:
        address = ipaddress.ip_address(request.environ.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in network for network in settings.metrics_from)
