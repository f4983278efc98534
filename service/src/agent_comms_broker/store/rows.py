"""How a message row reads, on either backend, with its task if it was ever claimed: the
Message and Task a row of MESSAGE_COLUMNS makes (the statements are each backend's, in
sqlite_sql.py and postgres_sql.py). Pages select the message columns only and look up
the tasks of their messages in one more query (a join on every row cost a quarter of a
latest-50 read); one message is read with its task joined."""

import orjson

from .model import Message, Task


def task_of(row, now, max_attempts):
    """The Task of a message row (None if it was never claimed), as it stands at `now`: a
    claim whose lease ended is pending again, or dead if that was its last attempt."""
    state, agent, expires, attempt, failures, reply = row[11:17]
    if state is None:
        return None
    if state == "claimed" and expires <= now:
        state = "dead" if failures + 1 >= max_attempts else "pending"
        agent = agent if state == "dead" else None
        expires = None
    return Task(state, agent, expires if state == "claimed" else None, attempt, reply)


def message_of(row, now, max_attempts):
    """The Message of a row of MESSAGE_COLUMNS."""
    if row[8] is None and row[11] is None:  # no tags, never claimed: most messages
        return Message(*row[:8], (), row[9], row[10])
    return Message(*row[:8], _tags(row[8]), row[9], row[10], task_of(row, now, max_attempts))


def messages_of(db, sql, rows, now, max_attempts):
    """The Messages of rows of PAGE_COLUMNS, with the tasks of those ever claimed (`sql`:
    the backend's statements)."""
    if not rows:
        return []
    tasks = {}
    for start in range(0, len(rows), 500):
        statement, params = sql.tasks_of([row[0] for row in rows[start : start + 500]])
        tasks.update((task[0], task) for task in db.execute(statement, params))
    if not tasks:
        return [Message(*row[:8], _tags(row[8]), row[9], row[10]) for row in rows]
    return [message_of((*row, *tasks.get(row[0], _NO_TASK)[1:]), now, max_attempts) for row in rows]


_NO_TASK = (None,) * 7


def _tags(stored):
    """A message's tags, from their JSON list (NULL: none)."""
    return tuple(orjson.loads(stored)) if stored else ()
