"""Headers every response carries, errors included, and CORS: a WSGI wrapper around the
Bottle app, so nothing a route or an error handler does can leave them out.

The API serves JSON and event streams to programs, never pages: browsers are told not to
sniff, frame, cache or send referrers. CORS is off unless AGENT_COMMS_CORS_ORIGINS lists
the origins of browser apps allowed to call the API.
"""

import json

SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-site"),
]
HSTS = ("Strict-Transport-Security", "max-age=31536000")
# The dashboard (/ui/) is a page: it may run the broker's own scripts and styles, talk to
# the broker's own API, and nothing else. Every other answer keeps the API's policy.
UI_PREFIX = "/ui/"
UI_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
CORS_METHODS = "GET, POST, PUT, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, X-Agent-ID, Last-Event-ID, Idempotency-Key"
CORS_EXPOSE = "Retry-After, WWW-Authenticate"
CORS_MAX_AGE = "600"


def same_origin(origin, environ):
    """Whether a browser's Origin is the broker's own address (a page the broker served)."""
    scheme, _, host = origin.partition("://")
    own = environ.get("HTTP_HOST", "")
    return bool(host) and host.lower() == own.lower() and scheme == environ.get("wsgi.url_scheme", "http")


def security_headers(tls):
    return SECURITY_HEADERS + ([HSTS] if tls else [])


class ResponseHeaders:
    def __init__(self, app, settings):
        self.app = app
        self.origins = set(settings.cors_origins)
        self.fixed = security_headers(settings.tls)
        self.page = [
            ("Content-Security-Policy", UI_POLICY) if name == "Content-Security-Policy" else (name, value)
            for name, value in self.fixed
        ]

    def allowed_origin(self, origin):
        if origin is None or not self.origins:
            return None
        if "*" in self.origins:
            return "*"
        return origin if origin.rstrip("/") in self.origins else None

    def __call__(self, environ, start_response):
        origin = environ.get("HTTP_ORIGIN")
        allowed = self.allowed_origin(origin)
        if self.origins and environ["REQUEST_METHOD"] == "OPTIONS" and origin is not None:
            return self.preflight(origin, allowed, environ, start_response)
        if environ["REQUEST_METHOD"] == "POST" and origin is not None and allowed is None:
            if not same_origin(origin, environ):
                # A page on another site may send a "simple" POST (text/plain) without any
                # preflight: with CORS off it must not post as whoever opened the page.
                return self.refuse_origin(origin, start_response)
        extra = list(self.page if environ.get("PATH_INFO", "").startswith(UI_PREFIX) else self.fixed)
        if allowed is not None:
            extra += [("Access-Control-Allow-Origin", allowed), ("Access-Control-Expose-Headers", CORS_EXPOSE)]
        if self.origins:
            extra.append(("Vary", "Origin"))

        def start(status, headers, exc_info=None):
            names = {name.lower() for name, _ in headers}
            if "cache-control" not in names:
                headers.append(("Cache-Control", "no-store"))
            return start_response(status, headers + extra, exc_info)

        return self.app(environ, start)

    def refuse_origin(self, origin, start_response):
        payload = json.dumps({"error": f"origin {origin} may not call this broker (AGENT_COMMS_CORS_ORIGINS)"}).encode()
        headers = [*self.fixed, ("Vary", "Origin"), ("Cache-Control", "no-store")]
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        start_response("403 Forbidden", headers)
        return [payload]

    def preflight(self, origin, allowed, environ, start_response):
        if allowed is None:
            return self.refuse_origin(origin, start_response)
        headers = [*self.fixed, ("Vary", "Origin"), ("Cache-Control", "no-store")]
        headers += [
            ("Access-Control-Allow-Origin", allowed),
            ("Access-Control-Allow-Methods", CORS_METHODS),
            ("Access-Control-Allow-Headers", CORS_HEADERS),
            ("Access-Control-Max-Age", CORS_MAX_AGE),
        ]
        start_response("204 No Content", headers)
        return []
