"""Agents' public keys, on either backend: each agent's current signing (Ed25519) and
encryption (X25519) keys, and every key it had before with when a newer one replaced it,
so a change is on record and messages signed before it still check. Part of the store (a
mixin of it); its statements are the backend's (`self.sql`)."""

import time

from .model import AgentKey, KeysRefused

# Keys published through the API, or pinned by the operator (`agent-comms-broker key add`).
FROM_AGENT, FROM_OPERATOR = "agent", "operator"


class AgentKeys:
    def agent_keys(self, agent):
        """Every key `agent` published, the current one first (if it has one: its
        `replaced` is None)."""
        rows = self._read(lambda db: db.execute(self.sql.SELECT_AGENT_KEYS, (agent,)).fetchall())
        return [AgentKey(*row) for row in rows]

    def key_agents(self):
        """Every agent that ever published keys."""
        return {row[0] for row in self._read(lambda db: db.execute(self.sql.SELECT_KEY_AGENTS).fetchall())}

    def current_key(self, agent):
        """The agent's current AgentKey, or None."""
        row = self._read(lambda db: db.execute(self.sql.SELECT_CURRENT_KEY, (agent,)).fetchone())
        return None if row is None else AgentKey(*row)

    def publish_keys(self, agent, sign_key, box_key, box_sig, source, may_replace, now=None):
        """Make these the agent's current keys; returns ("added" | "changed" | "unchanged",
        the current AgentKey). Keys the agent has already are unchanged, whoever gives them.
        Replacing other keys needs `may_replace`, and keys the operator pinned only the
        operator replaces: else KeysRefused, nothing changed."""
        stamp = time.time() if now is None else now

        def work(db):
            row = db.execute(self.sql.SELECT_CURRENT_KEY, (agent,)).fetchone()
            current = None if row is None else AgentKey(*row)
            if current is not None and (current.sign, current.box, current.box_sig) == (sign_key, box_key, box_sig):
                return "unchanged", current
            if current is not None:
                if current.source == FROM_OPERATOR and source != FROM_OPERATOR:
                    raise KeysRefused(f"agent {agent!r}'s keys were pinned by the operator: only they change them")
                if not may_replace:
                    raise KeysRefused(f"agent {agent!r} has published keys already: {may_replace_hint(agent)}")
                db.execute(self.sql.RETIRE_KEY, (stamp, agent))
            added = stamp if current is None else max(stamp, current.added + 0.001)
            db.execute(self.sql.INSERT_KEY, (agent, sign_key, box_key, box_sig, source, added))
            return ("added" if current is None else "changed"), AgentKey(
                sign_key, box_key, box_sig, source, added, None
            )

        return self._write(work)


def may_replace_hint(agent):
    return (
        f"only a holder of agent {agent}'s token replaces them "
        f"(or the operator: agent-comms-broker key add {agent} ...)"
    )
