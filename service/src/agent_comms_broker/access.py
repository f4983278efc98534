"""Access control and abuse limits for every route, as one Bottle plugin: who is calling
(a bearer token, or anonymous), whether the mode lets them in, and whether their bucket
has a request left. Routes name what they need with `access=` in their route config:

    health   no token, no rate limit (/healthz: monitors must always get an answer)
    public   no token (the OpenAPI document, /status)
    read     a token in `required` mode
    write    a token in `write-requires-token` and `required` modes

Per-channel grants are checked by the routes, which know the channel (allow_read,
allow_write).
"""

import logging
import math
import time

from bottle import HTTPError, request

from . import auth

log = logging.getLogger("agent_comms_broker.access")

CALLER = "agent_comms.caller"
# Set in modes with tokens: an inbox ('@AGENT') is read with a token only.
PRIVATE_INBOXES = "agent_comms.private_inboxes"
LOGGED_TOKEN = "agent_comms.token"
LOGGED_AGENT = "agent_comms.agent"
# The longest X-Agent-ID the access log shows (a valid one is at most 128 characters).
LOGGED_AGENT_MAX = 130
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="agent-comms"'}
# A token's last use is recorded at most this often (per worker).
TOKEN_TOUCH_INTERVAL = 60.0
# How long a request waits for a best-effort record (its token's last use; its agent's
# last-seen, Broker.touch) in the group commit; past it the record stays queued and the
# request goes on.
TOUCH_WAIT = 0.5


def unauthorized(text):
    return HTTPError(401, text, **CHALLENGE)


def logged_claim(value):
    """The X-Agent-ID a client sent, as the access log shows it: in single quotes, with
    quotes, backslashes and all but printable ASCII escaped (so it cannot forge another
    field of the line), cut short if too long; '-' if none."""
    if value is None:
        return "-"
    text = value.encode("latin-1").decode("utf-8", "backslashreplace")
    if len(text) > LOGGED_AGENT_MAX:
        text = text[:LOGGED_AGENT_MAX] + "..."
    escaped = text.encode("unicode_escape").decode("ascii").replace("'", "\\'")
    return f"'{escaped}'"


def too_many(text, wait):
    """429 for a bucket that is empty for `wait` more seconds."""
    return HTTPError(429, f"{text}; retry in {wait:.2f} s", **{"Retry-After": str(max(1, math.ceil(wait)))})


def caller():
    """The Caller of this request (None: anonymous)."""
    return request.environ.get(CALLER)


def limit_key():
    """Whose bucket and stream count a request uses: the token's agent, else the address."""
    who = caller()
    if who is not None:
        return f"agent:{who.agent}"
    # The socket's address: Bottle's remote_addr would believe a client's X-Forwarded-For.
    return f"address:{request.environ.get('REMOTE_ADDR')}"


def readable(channel):
    """Whether this request may read a channel: its token's grants, and without a token
    anything but an inbox in modes with tokens."""
    who = caller()
    if who is not None:
        return who.may_read(channel)
    return not (channel.startswith(auth.INBOX) and request.environ.get(PRIVATE_INBOXES))


def allow_read(channel):
    who = caller()
    if who is not None and not who.may_read(channel):
        raise HTTPError(403, f"token {who.token_id} (agent {who.agent}) may not read channel {channel!r}")
    if who is None and not readable(channel):
        raise unauthorized(f"{channel} is an inbox: read it with its agent's token (Authorization: Bearer ...)")


def allow_write(channel):
    who = caller()
    if who is not None and not who.may_write(channel):
        raise HTTPError(403, f"token {who.token_id} (agent {who.agent}) may not post to channel {channel!r}")


class AccessPlugin:
    name = "access"
    api = 2

    def __init__(self, settings, runtime, limits):
        self.settings = settings
        self.policy = auth.Policy(settings.auth)
        self.runtime = runtime
        self.limits = limits
        self._touched = {}

    def apply(self, callback, route):
        need = route.config.get("access", "read")
        if need == "health":
            return callback

        def wrapper(*args, **kwargs):
            request.environ[LOGGED_AGENT] = logged_claim(request.environ.get("HTTP_X_AGENT_ID"))
            request.environ[PRIVATE_INBOXES] = self.policy.mode != "open"
            who = request.environ[CALLER] = self.identify()
            if who is not None:  # for the access log: the agent the token proved
                request.environ[LOGGED_TOKEN] = f"{who.token_id}({who.agent})"
            self.spend()
            if who is None:
                self.admit_anonymous(need)
            return callback(*args, **kwargs)

        return wrapper

    def identify(self):
        # As the WSGI server decoded it (latin-1): a token is printable ASCII, so bytes that
        # are not cannot be one, and are refused below like any malformed header.
        header = request.environ.get("HTTP_AUTHORIZATION")
        if header is None:
            return None
        scheme, _, secret = header.strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret or not secret.isascii():
            self.spend()
            raise unauthorized("the Authorization header must be 'Bearer <token>'")
        token = self.runtime().store.token_by_hash(auth.digest(secret))
        now = time.time()
        state = token.state(now) if token is not None else "unknown"
        if state != "active":
            self.spend()  # from the address: guessing tokens costs like any request
            reason = {"unknown": "is not known to this broker", "expired": "has expired", "revoked": "was revoked"}
            raise unauthorized(f"the bearer token {reason[state]}")
        self.touch(token, now)
        return auth.Caller.of(token)

    def refresh(self, who):
        """The caller as its token stands now (grants may have changed), or None once the
        token is revoked or expired: long-lived requests ask this as they go."""
        token = self.runtime().store.token_by_hash(who.digest)
        if token is None or token.state(time.time()) != "active":
            return None
        return auth.Caller.of(token)

    def spend(self):
        """One request from the caller's bucket, or 429."""
        if self.settings.rate_limit <= 0:
            return
        wait = self.limits.take(limit_key(), self.settings.rate_limit, self.settings.rate_burst)
        if wait > 0:
            raise too_many(
                f"rate limit: {self.settings.rate_limit:g} requests a second (bursts of "
                f"{self.settings.rate_burst}) per agent",
                wait,
            )

    def spend_bytes(self, stored):
        """`stored` bytes from the caller's byte budget (what it may store), or 429."""
        settings = self.settings
        if settings.byte_rate <= 0:
            return
        # A post larger than the whole bucket waits for a full one rather than never passing.
        cost = min(stored, settings.byte_burst)
        wait = self.limits.take("bytes:" + limit_key(), settings.byte_rate, settings.byte_burst, cost)
        if wait > 0:
            raise too_many(
                f"storage budget: {settings.byte_rate} bytes a second (at most {settings.byte_burst} at once) "
                "per agent (AGENT_COMMS_BYTE_RATE); nothing was stored",
                wait,
            )

    def admit_anonymous(self, need):
        mode = self.policy.mode
        if need == "read" and not self.policy.anonymous_read:
            raise unauthorized(f"a token is required (mode {mode}): send 'Authorization: Bearer <token>'")
        if need == "write" and not self.policy.anonymous_write:
            raise unauthorized(f"a token is required to post (mode {mode}): send 'Authorization: Bearer <token>'")

    def touch(self, token, now):
        if now - self._touched.get(token.id, 0) < TOKEN_TOUCH_INTERVAL:
            return
        self._touched[token.id] = now
        runtime = self.runtime()
        try:
            runtime.committer.run(runtime.store.touch_token_work(token.id, now), timeout=TOUCH_WAIT)
        except Exception as error:  # best effort: a busy or full disk never fails a request
            log.warning("could not record token %s as used: %s", token.id, error)
