"""What the routes share: the settings, this process's runtime (store, hub, committer),
access control and the limits, and the bookkeeping of agents seen and streams open."""

import logging
import time

from bottle import HTTPError

from ..access import caller
from ..store import StoreBusy, StoreFull
from .validate import header, validate_agent_id

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
        self._token_agents = (0.0, frozenset())

    @property
    def store(self):
        return self.runtime().store

    @property
    def hub(self):
        return self.runtime().hub

    @property
    def committer(self):
        return self.runtime().committer

    def touch(self, agent):
        """Refresh an agent's last-seen; best effort, so a read never fails for it."""
        now = time.time()
        if agent is None or now - self._last_touch.get(agent, 0) < TOUCH_INTERVAL:
            return
        try:
            self.store.touch_agent(agent, now, max_agents=self.settings.max_agents)
        except (StoreBusy, StoreFull) as error:
            log.warning("could not record agent %s as seen: %s", agent, error)
            return
        self._last_touch[agent] = now
        if len(self._last_touch) > 10000:
            self._last_touch.clear()

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
        if self.holds_token(agent):
            return None
        self.touch(agent)
        return agent

    def holds_token(self, agent):
        """Whether a token that is neither revoked nor expired belongs to the agent."""
        checked, agents = self._token_agents
        now = time.monotonic()
        if now - checked >= TOKEN_AGENTS_INTERVAL:
            agents = frozenset(self.store.token_agents())
            self._token_agents = (now, agents)
        return agent in agents

    def take_stream_slot(self, key):
        settings = self.settings
        if settings.max_streams and not self.limits.open_stream(key, settings.max_streams):
            raise HTTPError(
                429,
                f"too many open streams and long-polls: at most {settings.max_streams} per agent "
                "(AGENT_COMMS_MAX_STREAMS); close one first",
                **{"Retry-After": "5"},
            )

    def give_stream_slot(self, key):
        if self.settings.max_streams:
            self.limits.close_stream(key)
