"""What the routes share: the settings, this process's runtime (store, hub, committer),
access control and the limits, and the bookkeeping of agents seen and streams open."""

import logging
import time

from bottle import HTTPError

from ..access import TOUCH_WAIT, caller, limit_key, too_many
from ..store import StoreBusy, StoreFull
from .validate import header, look_alike, validate_agent_id

log = logging.getLogger("agent_comms_broker.http")

# Reads naming an agent refresh its last-seen at most this often (per worker).
TOUCH_INTERVAL = 1.0
# The agents that hold tokens are re-read at most this often (per worker).
TOKEN_AGENTS_INTERVAL = 1.0


class Broker:
    """One per app: handed to every route function as its first argument."""

    def __init__(self, settings, runtime, access, limits):
        self.settings = settings
        self.runtime = runtime
        self.access = access
        self.limits = limits
        self.started = time.time()
        self._last_touch = {}
        self._token_agents = (0.0, {})

    @property
    def store(self):
        return self.runtime().store

    @property
    def hub(self):
        return self.runtime().hub

    @property
    def committer(self):
        return self.runtime().committer

    @property
    def metrics(self):
        """metrics.Metrics, or None when /metrics is off."""
        return self.runtime.metrics

    def touch(self, agent, register=True):
        """Refresh an agent's last-seen (registering it if new and `register`); best
        effort, so a read never fails for it."""
        now = time.time()
        if agent is None or now - self._last_touch.get(agent, 0) < TOUCH_INTERVAL:
            return
        # Once an interval whatever comes of it: a record that waits past TOUCH_WAIT is
        # still queued, and requests that came meanwhile must not queue more of them.
        if len(self._last_touch) >= 10000:
            self._last_touch.clear()
        self._last_touch[agent] = now
        # In the group commit: a write of its own would wait for SQLite's lock between
        # the committers' turns, and did, up to its deadline, under a steady load.
        work = self.store.touch_agent_work(agent, now, max_agents=self.settings.max_agents, register=register)
        try:
            self.committer.run(work, timeout=TOUCH_WAIT)
        except (StoreBusy, StoreFull) as error:
            log.warning("agent %s: its last-seen is not recorded (yet): %s", agent, error)

    def touch_reader(self):
        """The agent of this request (its token's, else its X-Agent-ID), recorded as seen.
        An agent that holds a token is seen only through it: an anonymous X-Agent-ID that
        names it is checked, then ignored (None)."""
        who = caller()
        if who is not None:
            self.touch(who.agent)
            return who.agent
        agent = header("X-Agent-ID")
        if agent is None:
            return None
        validate_agent_id(agent, "X-Agent-ID header")
        if self.token_holder_like(agent) is not None:
            return None
        # Registering an agent is a write: only where anonymous callers may write.
        self.touch(agent, register=self.settings.auth == "open")
        return agent

    def acting_agent(self):
        """The agent a request acts as, for claims and read positions: its token's, else
        its X-Agent-ID (400 if it has neither; 403 if the id is, or looks like, an agent
        that holds a token)."""
        agent = self.touch_reader()
        if agent is not None:
            return agent
        claimed = header("X-Agent-ID")
        if claimed is None:
            raise HTTPError(400, "this needs an agent: send a bearer token, or an X-Agent-ID header")
        holder = self.token_holder_like(claimed)
        raise HTTPError(403, f"agent {holder!r} has a token: act as it with the token (Authorization: Bearer ...)")

    def token_holder_like(self, agent, fresh=False):
        """The agent holding a token (neither revoked nor expired) that `agent` is, or
        looks like (look_alike: 'alice', 'Alice', 'alice\u00a0'); None if there is none.
        `fresh`: read the holders from the store now, not at most TOKEN_AGENTS_INTERVAL ago."""
        checked, holders = self._token_agents
        now = time.monotonic()
        if fresh or now - checked >= TOKEN_AGENTS_INTERVAL:
            holders = {look_alike(name): name for name in self.store.token_agents()}
            self._token_agents = (now, holders)
        return holders.get(look_alike(agent)) if holders else None

    def take_stream_slot(self, key):
        settings = self.settings
        if settings.max_streams and not self.limits.hold(key, settings.max_streams):
            raise HTTPError(
                429,
                f"too many open streams and long-polls: at most {settings.max_streams} per agent "
                "(AGENT_COMMS_MAX_STREAMS); close one first",
                **{"Retry-After": "5"},
            )

    def give_stream_slot(self, key):
        if self.settings.max_streams:
            self.limits.release(key)

    def holding(self, size):
        """Count `size` bytes (a request body being read, a reply being written) against the
        caller's bytes in flight, across workers, while the block runs: 429 past
        AGENT_COMMS_MAX_INFLIGHT. Bytes a client is slow to send or take are what a flood of
        slow clients would pile up in the broker's memory."""
        return Holding(self.limits, self.settings.max_inflight, size)


class Holding:
    """A context manager (a class: on every post, a generator's costs more): holds the
    bytes on enter, gives them back on exit."""

    __slots__ = ("amount", "cap", "key", "limits")

    def __init__(self, limits, cap, size):
        self.limits = limits
        self.cap = cap
        self.amount = min(size, cap)  # one larger than the cap waits for the others to finish
        self.key = None

    def __enter__(self):
        if not self.cap:
            return self
        key = "inflight:" + limit_key()
        if not self.limits.hold(key, self.cap, self.amount):
            raise too_many(
                f"too many bytes in flight: at most {self.cap} of requests and replies per agent at once "
                "(AGENT_COMMS_MAX_INFLIGHT); nothing was done",
                1,
            )
        self.key = key
        return self

    def __exit__(self, *exc_info):
        if self.key is not None:
            self.limits.release(self.key, self.amount)
            self.key = None
