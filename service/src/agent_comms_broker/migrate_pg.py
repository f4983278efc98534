"""`agent-comms-broker migrate-to-postgres --from messages.db --to URL`: copies a SQLite
database (the broker's, or the old broker.py's) into an empty PostgreSQL database, every
row of every table with its ids kept, in one transaction: a copy is whole or not there.

The source is not changed: a snapshot of it (SQLite's online backup, so a broker may keep
running on it meanwhile) is brought up to the current schema in a temporary file, and
read from there. The statements of the copy are here: the columns of each table, read
from SQLite in the order COPY writes them to PostgreSQL.
"""

import os
import sqlite3
import tempfile

from .config import redacted, redacted_error

# Every table the copy fills, with its columns (the same on both backends).
TABLES = {
    "messages": "id, channel, sender, message, timestamp, reply_to, thread, priority, tags, meta, signature",
    "channels": "name, message_count, last_activity, pruned_id, pruned_timestamp",
    "agents": "id, first_seen, last_seen, message_count",
    "tokens": "id, hash, agent, read, write, note, created, expires, revoked, last_used",
    "message_tags": "id, tag, channel",
    "tasks": "id, channel, state, agent, expires, attempt, failures, reply, updated",
    "queues": "channel, floor",
    "cursors": "agent, channel, read_id, updated",
    "cursor_moves": "channel, read_id, agent, at",
    "idempotency": "sender, key, id, channel, created",
    "notify_rules": "rule, cursor, delivered, failures, last_error, next_try, updated",
    "leases": "name, owner, expires",
    "agent_keys": "agent, sign_key, box_key, box_sig, source, added, replaced",
}
# Rows that PostgreSQL's text cannot hold (U+0000): the copy stops before it starts.
SELECT_NUL_MESSAGES = "SELECT id FROM messages WHERE instr(message, char(0)) > 0 ORDER BY id LIMIT 5"
SELECT_LAST_GIVEN = """
SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),
           (SELECT coalesce(max(id), 0) FROM messages))"""
# Empty: no message, no token, and no id ever given (a database whose messages retention
# removed would give their ids again).
TARGET_IS_EMPTY = """
SELECT NOT EXISTS (SELECT 1 FROM messages) AND NOT EXISTS (SELECT 1 FROM tokens)
   AND (SELECT last_id FROM writer) = 0"""
# A database of ours or broker.py's has a messages table.
SOURCE_HAS_MESSAGES = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
SET_LAST_ID = "UPDATE writer SET last_id = %s"


class MigrationError(Exception):
    """The copy cannot be made; str() is the one line to print. Nothing was copied."""


def migrate(source, url, progress=None):
    """Copy the SQLite database at `source` into the PostgreSQL database at `url`; returns
    {table: rows copied}."""
    from .store import Store

    if not os.path.isfile(source):
        raise MigrationError(f"no SQLite database at {source}")
    with tempfile.TemporaryDirectory(prefix="agent-comms-migrate-") as scratch:
        snapshot = os.path.join(scratch, "snapshot.db")
        try:
            origin, copy = sqlite3.connect(f"file:{source}?mode=ro", uri=True), sqlite3.connect(snapshot)
            try:
                if origin.execute(SOURCE_HAS_MESSAGES).fetchone() is None:
                    raise MigrationError(f"{source} is not an agent-comms or broker.py database: it has no messages")
                origin.backup(copy)
            finally:
                origin.close()
                copy.close()
            Store(snapshot).close()  # brought up to the current schema (broker.py's included)
        except (sqlite3.Error, RuntimeError) as error:
            raise MigrationError(f"cannot read {source} as an agent-comms or broker.py database: {error}") from None
        db = sqlite3.connect(snapshot)
        try:
            nul = [row[0] for row in db.execute(SELECT_NUL_MESSAGES)]
            if nul:
                listed = ", ".join(map(str, nul))
                raise MigrationError(
                    f"messages {listed} hold the character U+0000, which PostgreSQL's text cannot; nothing was copied"
                )
            from .store.postgres import DatabaseUnreachable, DatabaseUnusable, open_checked

            try:
                target = open_checked(url, pool_size=1)  # makes the schema
            except (DatabaseUnreachable, DatabaseUnusable) as error:
                raise MigrationError(f"cannot use the database {redacted(url)}: {error}") from None
            try:
                return _copy(db, target, url, progress)
            finally:
                target.close()
        finally:
            db.close()


def _copy(db, target, url, progress):
    import psycopg

    from .store.postgres import CONNECTION_OPTIONS

    copied = {}
    try:
        with psycopg.connect(url, **CONNECTION_OPTIONS) as connection, connection.transaction():
            if not connection.execute(TARGET_IS_EMPTY).fetchone()[0]:
                where = redacted(url)
                raise MigrationError(f"the database {where} already holds messages or tokens: give an empty one")
            for table, columns in TABLES.items():
                count = 0
                with connection.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in db.execute(f"SELECT {columns} FROM {table}"):
                        copy.write_row(row)
                        count += 1
                copied[table] = count
                if progress is not None:
                    progress(table, count)
            connection.execute(SET_LAST_ID, (db.execute(SELECT_LAST_GIVEN).fetchone()[0],))
    except psycopg.Error as error:
        where = redacted(url)
        raise MigrationError(
            f"the copy into {where} failed, nothing was copied: {redacted_error(error, url)}"
        ) from None
    except sqlite3.Error as error:  # such as text that is not UTF-8
        raise MigrationError(f"cannot read the source ({error}); nothing was copied") from None
    return copied
