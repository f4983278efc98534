"""How a message row reads on SQLite, with its task if it was ever claimed: the columns
every message read selects, and the Message and Task they make."""

import orjson

from .model import Message, Task

# A message row and, if it was ever claimed, its task's (the columns Message takes, then
# the task's state, agent, expires, attempt, failures and reply).
MESSAGE_COLUMNS = """m.id, m.channel, m.sender, m.message, m.timestamp, m.reply_to, m.thread, m.priority,
    m.tags, m.meta, t.state, t.agent, t.expires, t.attempt, t.failures, t.reply"""
MESSAGES = "messages AS m LEFT JOIN tasks AS t ON t.id = m.id"
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
    tags = tuple(orjson.loads(row[8])) if row[8] else ()
    return Message(*row[:8], tags, row[9], task_of(row, now, max_attempts))
