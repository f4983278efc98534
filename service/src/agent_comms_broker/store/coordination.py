"""Coordination, on either backend: task claims and leases, read positions and receipts.
Part of the store (a mixin of it); its statements are the backend's (`self.sql`).

Claims stay correct without leaning on a single writer: each change of a task is a
conditional UPDATE (or an INSERT that a primary key refuses) whose row count says whether
it won, so two takers each in its own transaction cannot both get a task; a take that
loses looks again.
"""

import time

from .model import KeyConflict, NoSuchMessage, TaskRefused
from .rows import message_of

DEFAULT_LEASE = 300.0
# Where a task's raw columns are in a row of MESSAGE_COLUMNS.
STATE, AGENT, EXPIRES, FAILURES = 11, 12, 13, 15


class Coordination:
    """Tasks, read positions and receipts; mixed into the Store."""

    # -- tasks ----------------------------------------------------------------------------

    # Each change is a *_work(...) that makes the transaction's work (work(db)), which a
    # group commit runs beside others (Store.write_batch); the plain method runs it alone.

    def take(self, channel, agent, lease=DEFAULT_LEASE, now=None):
        """Claim the channel's oldest task that is pending (released, lapsed or never
        claimed) for `agent` for `lease` seconds; its Message (with its task), or None."""
        return self._write(self.take_work(channel, agent, lease, now))

    def take_work(self, channel, agent, lease=DEFAULT_LEASE, now=None):
        stamp = time.time() if now is None else now
        return lambda db: self._take_one(db, channel, agent, lease, stamp)

    def _take_one(self, db, channel, agent, lease, now):
        while True:
            pending = db.execute(self.sql.SELECT_PENDING, (channel,)).fetchone()
            lapsed = db.execute(self.sql.SELECT_LAPSED, (channel, now)).fetchone()
            floor = db.execute(self.sql.SELECT_FLOOR, (channel,)).fetchone()
            fresh = db.execute(self.sql.SELECT_UNCLAIMED, (channel, floor[0] if floor else 0)).fetchone()
            choices = [
                (row[0], way) for row, way in ((pending, "pending"), (lapsed, "lapsed"), (fresh, "fresh")) if row
            ]
            if not choices:
                return None
            task_id, way = min(choices)
            expires = now + lease
            if way == "fresh":
                won = db.execute(self.sql.INSERT_CLAIM, (task_id, channel, agent, expires, now)).rowcount
                # Every task up to this one has a row now: the next take looks after it.
                db.execute(self.sql.SET_FLOOR, (channel, task_id))
            elif way == "pending":
                won = db.execute(self.sql.CLAIM_PENDING, (agent, expires, now, task_id)).rowcount
            elif lapsed[1] + 1 >= self.max_attempts:
                db.execute(self.sql.BURY_LAPSED, (now, task_id, now))
                continue
            else:
                won = db.execute(self.sql.CLAIM_LAPSED, (agent, expires, now, task_id, now)).rowcount
            if won:
                return self._task_message(db, channel, task_id, now)

    def claim(self, channel, message_id, agent, lease=DEFAULT_LEASE, now=None):
        """Claim one task for `agent`, or extend the lease it holds; its Message. Raises
        NoSuchMessage, or TaskRefused (a reply; held by another agent; done; dead)."""
        return self._write(self.claim_work(channel, message_id, agent, lease, now))

    def claim_work(self, channel, message_id, agent, lease=DEFAULT_LEASE, now=None):
        stamp = time.time() if now is None else now

        def work(db):
            row = self._task_row(db, channel, message_id)
            task = message_of(row, stamp, self.max_attempts).task
            expires = stamp + lease
            if task is None:
                won = db.execute(self.sql.INSERT_CLAIM, (message_id, channel, agent, expires, stamp)).rowcount
            elif self._holds(row, agent, stamp):
                won = db.execute(self.sql.EXTEND_CLAIM, (expires, stamp, message_id, agent)).rowcount
            elif task.state == "claimed":
                raise TaskRefused(f"task {message_id} is held by agent {task.agent!r} until {task.expires}", task)
            elif task.state == "pending":
                won = db.execute(self.sql.CLAIM_PENDING, (agent, expires, stamp, message_id)).rowcount
                won = won or db.execute(self.sql.CLAIM_LAPSED, (agent, expires, stamp, message_id, stamp)).rowcount
            else:
                raise TaskRefused(f"task {message_id} is {task.state}", task)
            if not won:
                raise TaskRefused(f"task {message_id} changed hands while it was claimed; try again", task)
            return self._task_message(db, channel, message_id, stamp)

        return work

    def done(self, channel, message_id, agent, reply=None, now=None):
        """Mark the task `agent` holds done and, in the same transaction, store `reply` (a
        Post answering it, or None); (its Message, the reply's Message or None). Done again
        by the agent that finished it answers the same, storing nothing."""
        return self._write(self.done_work(channel, message_id, agent, reply, now))

    def done_work(self, channel, message_id, agent, reply=None, now=None, max_agents=0, max_database=0):
        """(The caps hold the reply as they hold a post.)"""
        stamp = time.time() if now is None else now

        def work(db):
            row = self._task_row(db, channel, message_id)
            message = message_of(row, stamp, self.max_attempts)
            task = message.task
            if task is not None and task.state == "done" and task.agent == agent:
                answer = db.execute(self.sql.SELECT_ONE, (task.reply, channel)).fetchone() if task.reply else None
                return message, None if answer is None else message_of(answer, stamp, self.max_attempts)
            self._check_holder(row, message, agent, stamp, "finish")
            stored = None
            if reply is not None:
                if max_database:
                    self._check_database_size(db, max_database)
                if max_agents:
                    self._check_agent_cap(db, {reply.sender}, max_agents)
                stored = self._insert(db, [reply], stamp)[0]
                if stored.duplicate and stored.reply_to != message_id:
                    raise KeyConflict(
                        f"idempotency key {reply.key!r} was used for message {stored.id}, not a reply to "
                        f"task {message_id}; use a new key"
                    )
            db.execute(self.sql.FINISH, (stored.id if stored else None, stamp, message_id, agent))
            return self._task_message(db, channel, message_id, stamp), stored

        return work

    def release(self, channel, message_id, agent, dead=False, now=None):
        """Give back the task `agent` holds: pending again, or dead (with `dead`, or when it
        was its last attempt); its Message."""
        return self._write(self.release_work(channel, message_id, agent, dead, now))

    def release_work(self, channel, message_id, agent, dead=False, now=None):
        stamp = time.time() if now is None else now

        def work(db):
            row = self._task_row(db, channel, message_id)
            self._check_holder(row, message_of(row, stamp, self.max_attempts), agent, stamp, "release")
            buried = dead or row[FAILURES] + 1 >= self.max_attempts
            state, kept = ("dead", agent) if buried else ("pending", None)
            db.execute(self.sql.RELEASE, (state, kept, stamp, message_id, agent))
            return self._task_message(db, channel, message_id, stamp)

        return work

    def _task_message(self, db, channel, message_id, now):
        return message_of(self._task_row(db, channel, message_id), now, self.max_attempts)

    def _task_row(self, db, channel, message_id):
        """The row (MESSAGE_COLUMNS) of a task: NoSuchMessage, or TaskRefused for a reply."""
        row = db.execute(self.sql.SELECT_TASK_ROW, (message_id, channel)).fetchone()
        if row is None:
            raise NoSuchMessage(f"no message {message_id} in channel {channel!r}")
        if row[5] is not None:
            raise TaskRefused(f"message {message_id} is a reply (to {row[5]}), not a task", not_a_task=True)
        return row

    def _holds(self, row, agent, now):
        """Whether `agent` still holds the task of a row: its claim, even past its lease
        while no one took the task since (it may still extend, finish or release it),
        unless the lease that ended was its last attempt: a task shown dead stays dead."""
        if row[STATE] != "claimed" or row[AGENT] != agent:
            return False
        return row[EXPIRES] > now or row[FAILURES] + 1 < self.max_attempts

    def _check_holder(self, row, message, agent, now, what):
        task = message.task
        if task is None or not self._holds(row, agent, now):
            if task is None:
                text = f"task {message.id} is not claimed: claim it before you {what} it"
            elif task.state == "claimed":
                text = f"task {message.id} is held by agent {task.agent!r}, not {agent!r}"
            else:
                text = f"task {message.id} is {task.state}" + (f" (by {task.agent!r})" if task.agent else "")
            raise TaskRefused(text, task)

    def queue(self, channel, limit=100, now=None):
        """A channel's tasks: counts by state, and the claimed and dead ones (at most `limit`
        of each) as (id, agent, expires, attempt) and (id, agent, attempt)."""
        stamp = time.time() if now is None else now

        def work(db):
            counts = self._task_counts(db, channel, stamp)
            claimed = db.execute(self.sql.SELECT_CLAIMED, (channel, stamp, limit)).fetchall()
            dead = db.execute(self.sql.SELECT_DEAD, (channel, stamp, self.max_attempts, limit)).fetchall()
            return counts, claimed, dead

        return self._read(work)

    def queue_totals(self, now=None):
        """[(channel, counts by state)] of every channel a task was ever taken from."""
        stamp = time.time() if now is None else now

        def work(db):
            channels = [row[0] for row in db.execute(self.sql.SELECT_QUEUES)]
            return [(channel, self._task_counts(db, channel, stamp)) for channel in channels]

        return self._read(work)

    def _task_counts(self, db, channel, stamp):
        total = db.execute(self.sql.COUNT_TASKS, (channel,)).fetchone()[0]
        rows = dict(db.execute(self.sql.COUNT_BY_STATE, {"now": stamp, "max": self.max_attempts, "channel": channel}))
        pending = total - sum(rows.values()) + rows.get("pending", 0)
        return {"pending": pending} | {state: rows.get(state, 0) for state in ("claimed", "done", "dead")}

    # -- read positions -------------------------------------------------------------------

    def move_cursor(self, agent, channel, read_id, now=None):
        """Move an agent's read position in a channel forward to `read_id` (never back);
        (where it stands, whether it moved)."""
        return self._write(self.move_cursor_work(agent, channel, read_id, now))

    def move_cursor_work(self, agent, channel, read_id, now=None):
        stamp = time.time() if now is None else now

        def work(db):
            moved = db.execute(self.sql.MOVE_CURSOR, (agent, channel, read_id, stamp)).rowcount > 0
            if moved:
                db.execute(self.sql.RECORD_MOVE, (channel, read_id, agent, stamp))
            return db.execute(self.sql.SELECT_CURSOR, (agent, channel)).fetchone()[0], moved

        return work

    def cursor(self, agent, channel):
        """An agent's read position in a channel (0: it has read nothing)."""
        row = self._read(lambda db: db.execute(self.sql.SELECT_CURSOR, (agent, channel)).fetchone())
        return 0 if row is None else row[0]

    def unread(self, agent, channel):
        """How many messages of a channel follow the agent's read position."""

        def work(db):
            row = db.execute(self.sql.SELECT_CURSOR, (agent, channel)).fetchone()
            return db.execute(self.sql.COUNT_AFTER, (channel, row[0] if row else 0)).fetchone()[0]

        return self._read(work)

    def unread_counts(self, agent, listed):
        """{channel: unread} for (channel, message count) pairs: what follows the agent's
        position in each (all of it where it has none)."""

        def work(db):
            positions = dict(db.execute(self.sql.SELECT_CURSORS, (agent,)))
            return {
                channel: count
                if channel not in positions
                else db.execute(self.sql.COUNT_AFTER, (channel, positions[channel])).fetchone()[0]
                for channel, count in listed
            }

        return self._read(work)

    def receipts(self, channel, message_id):
        """(agent, when) of each agent whose read position reached the message, earliest
        first. Raises NoSuchMessage."""

        def work(db):
            if db.execute(self.sql.SELECT_ONE, (message_id, channel)).fetchone() is None:
                raise NoSuchMessage(f"no message {message_id} in channel {channel!r}")
            return db.execute(self.sql.SELECT_RECEIPTS, (channel, message_id)).fetchall()

        return self._read(work)
