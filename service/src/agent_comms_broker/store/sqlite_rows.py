"""How a message row reads on SQLite, with its task if it was ever claimed: the columns
message reads select, and the Message and Task they make. Pages select the message
columns only and look up the tasks of their messages in one more query (a join on every
row cost a quarter of a latest-50 read); one message is read with its task joined."""

import orjson

from .model import Message, Task

# A message row and, if it was ever claimed, its task's (the columns Message takes, then
# the task's state, agent, expires, attempt, failures and reply).
MESSAGE_COLUMNS = """m.id, m.channel, m.sender, m.message, m.timestamp, m.reply_to, m.thread, m.priority,
    m.tags, m.meta, t.state, t.agent, t.expires, t.attempt, t.failures, t.reply"""
MESSAGES = "messages AS m LEFT JOIN tasks AS t ON t.id = m.id"
PAGE_COLUMNS = "m.id, m.channel, m.sender, m.message, m.timestamp, m.reply_to, m.thread, m.priority, m.tags, m.meta"
# The tasks of a page's messages: {ids} is one ? per id.
SELECT_TASKS_OF = "SELECT id, state, agent, expires, attempt, failures, reply FROM tasks WHERE id IN ({ids})"
SELECT_ONE = f"SELECT {MESSAGE_COLUMNS} FROM {MESSAGES} WHERE m.id = ? AND m.channel = ?"


def task_of(row, now, max_attempts):
    """The Task of a message row (None if it was never claimed), as it stands at `now`: a
    claim whose lease ended is pending again, or dead if that was its last attempt."""
    state, agent, expires, attempt, failures, reply = row[10:16]
    if state is None:
        return None
    if state == "claimed" and expires <= now:
        state = "dead" if failures + 1 >= max_attempts else "pending"
        agent = agent if state == "dead" else None
        expires = None
    return Task(state, agent, expires if state == "claimed" else None, attempt, reply)


def message_of(row, now, max_attempts):
    """The Message of a row of MESSAGE_COLUMNS."""
    if row[8] is None and row[10] is None:  # no tags, never claimed: most messages
        return Message(*row[:8], (), row[9])
    return Message(*row[:8], _tags(row[8]), row[9], task_of(row, now, max_attempts))


def messages_of(db, rows, now, max_attempts):
    """The Messages of rows of PAGE_COLUMNS, with the tasks of those ever claimed."""
    if not rows:
        return []
    tasks = {}
    for start in range(0, len(rows), 500):
        ids = [row[0] for row in rows[start : start + 500]]
        statement = SELECT_TASKS_OF.format(ids=",".join("?" * len(ids)))
        tasks.update((task[0], task) for task in db.execute(statement, ids))
    if not tasks:
        return [Message(*row[:8], _tags(row[8]), row[9]) for row in rows]
    return [message_of((*row, *tasks.get(row[0], _NO_TASK)[1:]), now, max_attempts) for row in rows]


_NO_TASK = (None,) * 7


def _tags(stored):
    """A message's tags, from their JSON list (NULL: none)."""
    return tuple(orjson.loads(stored)) if stored else ()
