"""The SQLite store: every SQL statement of the broker but the schema's (schema.py).

Ids come from AUTOINCREMENT under SQLite's single write lock, so they rise strictly in
commit order. Timestamps are assigned inside the same write transaction and also rise
strictly (each at least 1 microsecond after the last), so `since=` can never skip a
later commit. One Store is one connection: use it from one thread (or one gevent hub).
"""

import dataclasses
import fcntl
import functools
import os
import sqlite3
import time
from dataclasses import dataclass

import orjson

from .contract import StoreContract
from .model import (
    AgentLimit,
    ChannelLimit,
    DatabaseFull,
    KeyConflict,
    Message,
    NoSuchMessage,
    Page,
    Post,
    StoreBusy,
    StoreFull,
    TaskRefused,
    Token,
    text_size,
)
from .schema import MIGRATIONS, SCHEMA_VERSION
from .sqlite_coordination import Coordination
from .sqlite_notify import NotifyRecords
from .sqlite_rows import PAGE_COLUMNS, SELECT_ONE, message_of, messages_of
from .sqlite_search import Search

LAST_TIMESTAMP = "SELECT timestamp FROM messages ORDER BY id DESC LIMIT 1"
# Bytes of the database's pages in use: what AGENT_COMMS_MAX_DATABASE caps. Pages retention
# freed are reused by later posts, so they do not count.
USED_BYTES = """
SELECT (page_count - freelist_count) * page_size
FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"""
# When retention has emptied the table, the newest timestamp it removed.
LAST_PRUNED_TIMESTAMP = "SELECT max(pruned_timestamp) FROM channels"
MAX_ID = "SELECT coalesce(max(id), 0) FROM messages"
# The largest id ever given (AUTOINCREMENT's high-water mark): kept when retention removes
# the newest messages too. No cursor a client was given can be past it.
LAST_GIVEN_ID = "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)"
INSERT_MESSAGES = """
INSERT INTO messages (channel, sender, message, timestamp, reply_to, thread, priority, tags, meta)
VALUES {rows}"""
# Rows one INSERT takes at most (9 values each, well within SQLite's 32,766).
ROWS_PER_INSERT = 64


@functools.cache
def insert_messages(count):
    """The INSERT of `count` messages."""
    return INSERT_MESSAGES.format(rows=", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * count))


INSERT_TAG = "INSERT OR IGNORE INTO message_tags (id, tag, channel) VALUES (?, ?, ?)"
# What a reply's thread is: the channel and thread of the message it answers.
SELECT_REPLY_TARGET = "SELECT channel, thread FROM messages WHERE id = ?"
# Idempotency keys: what a sender's key stored, while it is younger than KEY_LIFETIME.
SELECT_KEYED = "SELECT id, channel FROM idempotency WHERE sender = ? AND key = ? AND created > ?"
RECORD_KEY = "INSERT OR REPLACE INTO idempotency (sender, key, id, channel, created) VALUES (?, ?, ?, ?, ?)"
DELETE_OLD_KEYS = "DELETE FROM idempotency WHERE created <= ?"
UPSERT_CHANNEL = """
INSERT INTO channels (name, message_count, last_activity) VALUES (?, ?, ?)
ON CONFLICT (name) DO UPDATE SET
    message_count = message_count + excluded.message_count,
    last_activity = excluded.last_activity"""
UPSERT_AGENT_SENT = """
INSERT INTO agents (id, first_seen, last_seen, message_count) VALUES (?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    last_seen = max(last_seen, excluded.last_seen),
    message_count = message_count + excluded.message_count"""
UPSERT_AGENT_SEEN = """
INSERT INTO agents (id, first_seen, last_seen) VALUES (?, ?, ?)
ON CONFLICT (id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)"""

# Channel reads; `{only}` is what a read's filters add (Filter.sql), before its limit.
SELECT_LATEST = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = ? {{only}} ORDER BY m.id DESC LIMIT ?"""
SELECT_AFTER_ID = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = ? AND m.id > ? {{only}} ORDER BY m.id LIMIT ?"""
SELECT_AFTER_TIME = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = ? AND m.timestamp > ? {{only}}
ORDER BY m.timestamp, m.id LIMIT ?"""
# Rows sharing the page's last timestamp, so a page never splits such a group.
SELECT_SAME_TIME = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = ? AND m.timestamp = ? AND m.id > ? {{only}}
ORDER BY m.id"""
# The filters: a thread (its first message and its replies), a tag, a lowest priority.
ONLY_THREAD = "AND (m.id = ? OR m.thread = ?)"
ONLY_TAG = "AND m.id IN (SELECT id FROM message_tags WHERE channel = ? AND tag = ?)"
ONLY_PRIORITY = "AND m.priority >= ?"
SELECT_ALL_AFTER_ID = f"SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.id > ? ORDER BY m.id LIMIT ?"
# The same for a reader granted some channels only (patterns where `*` is any characters,
# as GLOB reads them), over a window of ids: (after, window end, limit) then the patterns.
SELECT_GRANTED_AFTER_ID = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.id > ? AND m.id <= ? AND ({{granted}})
ORDER BY m.id LIMIT ?"""
GRANTED = "m.channel GLOB ?"
# A granted read looks at this many ids at most: reading past messages it may not see
# costs one bounded step at a time, never one long scan of the whole table.
GRANTED_WINDOW = 20000
CHANNEL_EXISTS = "SELECT 1 FROM channels WHERE name = ?"
COUNT_ALL_CHANNELS = "SELECT count(*) FROM channels"
SELECT_CHANNEL_PRUNED = "SELECT pruned_id, pruned_timestamp FROM channels WHERE name = ?"
SELECT_MAX_PRUNED_ID = "SELECT coalesce(max(pruned_id), 0) FROM channels"
SELECT_CHANNEL_LAST_ID = "SELECT coalesce(max(id), 0) FROM messages WHERE channel = ?"

# Listings in pages by name: `after` is the last name of the previous page ('' first).
SELECT_CHANNELS = """
SELECT name, message_count, last_activity FROM channels
WHERE message_count > 0 AND name > ? ORDER BY name LIMIT ?"""
SELECT_AGENTS = """
SELECT id, first_seen, last_seen, message_count FROM agents WHERE id > ? ORDER BY id LIMIT ?"""
AGENT_EXISTS = "SELECT 1 FROM agents WHERE id = ?"
COUNT_AGENTS = "SELECT count(*) FROM agents"
# Seen, without creating the agent: a read may name an agent the cap leaves out.
UPDATE_AGENT_SEEN = "UPDATE agents SET last_seen = max(last_seen, ?) WHERE id = ?"
# Agents not seen since a time, that no token names, are forgotten.
DELETE_IDLE_AGENTS = """
DELETE FROM agents WHERE last_seen < ? AND id NOT IN (SELECT agent FROM tokens)"""
# The window of the latest `limit` messages starts here (for a page the budget cuts).
SELECT_LATEST_WINDOW_START = """
SELECT min(id) FROM (SELECT m.id FROM messages AS m WHERE m.channel = ? {only} ORDER BY m.id DESC LIMIT ?)"""
SELECT_TOTALS = """
SELECT (SELECT coalesce(sum(message_count), 0) FROM channels),
       (SELECT count(*) FROM channels WHERE message_count > 0),
       (SELECT count(*) FROM agents),
       (SELECT count(*) FROM agents WHERE last_seen >= ?)"""

# Retention, oldest first, a bounded batch per transaction so writers never wait long.
SELECT_EXPIRED = """
SELECT channel, count(*), max(id), max(timestamp) FROM
    (SELECT id, channel, timestamp FROM messages WHERE timestamp < ? ORDER BY id LIMIT ?)
GROUP BY channel"""
DELETE_EXPIRED = """
DELETE FROM messages WHERE id IN
    (SELECT id FROM messages WHERE timestamp < ? ORDER BY id LIMIT ?)"""
# What hangs on the messages a batch removes goes with them: their tags and tasks (the
# same selection of ids, taken before the messages go), and moves of read positions that
# reached no message kept.
EXPIRED_IDS = "SELECT id FROM messages WHERE timestamp < ? ORDER BY id LIMIT ?"
EXCESS_IDS = "SELECT id FROM messages WHERE channel = ? AND id <= ? ORDER BY id LIMIT ?"
DELETE_TAGS_OF = "DELETE FROM message_tags WHERE id IN ({ids})"
DELETE_TASKS_OF = "DELETE FROM tasks WHERE id IN ({ids})"
DELETE_PASSED_MOVES = "DELETE FROM cursor_moves WHERE channel = ? AND read_id <= ?"
SELECT_OVERFULL_CHANNELS = "SELECT name, message_count FROM channels WHERE message_count > ?"
SELECT_NTH_NEWEST_ID = "SELECT id FROM messages WHERE channel = ? ORDER BY id DESC LIMIT 1 OFFSET ?"
SELECT_EXCESS = """
SELECT count(*), max(id), max(timestamp) FROM
    (SELECT id, timestamp FROM messages WHERE channel = ? AND id <= ? ORDER BY id LIMIT ?)"""
DELETE_EXCESS = """
DELETE FROM messages WHERE id IN
    (SELECT id FROM messages WHERE channel = ? AND id <= ? ORDER BY id LIMIT ?)"""
RECORD_PRUNED = """
UPDATE channels SET message_count = max(0, message_count - ?),
    pruned_id = max(pruned_id, ?), pruned_timestamp = max(pruned_timestamp, ?)
WHERE name = ?"""

TOKEN_COLUMNS = "id, hash, agent, read, write, note, created, expires, revoked, last_used"
INSERT_TOKEN = f"INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)"
SELECT_TOKEN_BY_HASH = f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?"
SELECT_TOKENS = f"SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created, id"
UPDATE_TOKEN_GRANTS = "UPDATE tokens SET read = ?, write = ?, note = ?, expires = ? WHERE id = ?"
REVOKE_TOKEN = "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL"
SELECT_TOKEN_IDS = "SELECT id FROM tokens WHERE id = ?"
SELECT_TOKEN_AGENTS = """
SELECT DISTINCT agent FROM tokens WHERE revoked IS NULL AND (expires IS NULL OR expires > ?)"""
TOUCH_TOKEN = "UPDATE tokens SET last_used = ? WHERE id = ?"

# Posts are refused (StoreFull) while free space is below what one checkpoint of a full
# write-ahead log may need, plus a margin; never more than this share of the filesystem.
# Refusing a little early means a checkpoint always has room, so freeing a little space
# brings posting back; refusing only at ENOSPC could leave a checkpoint that never fits.
DISK_RESERVE_MARGIN = 1 << 20
DISK_RESERVE_SHARE = 0.25

# Strictly rising timestamps: the next is at least this far after the last.
TIMESTAMP_STEP = 1e-6
PRUNE_BATCH = 2000
# What one write of a batch may be refused with, leaving the others be.
REFUSALS = (AgentLimit, ChannelLimit, DatabaseFull, KeyConflict, NoSuchMessage, TaskRefused)
# A post repeated with its idempotency key within this many seconds stores nothing.
KEY_LIFETIME = 24 * 3600
# Tasks: a release or an expired lease counts as a failure; this many make a task dead.
DEFAULT_MAX_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Filter:
    """What a channel read keeps: one thread, one tag, a lowest priority (None: all)."""

    thread: int | None = None
    tag: str | None = None
    min_priority: int | None = None

    def sql(self, channel):
        """The statement's `{only}` and its parameters."""
        parts, params = [], []
        if self.thread is not None:
            parts.append(ONLY_THREAD)
            params += [self.thread, self.thread]
        if self.tag is not None:
            parts.append(ONLY_TAG)
            params += [channel, self.tag]
        if self.min_priority is not None:
            parts.append(ONLY_PRIORITY)
            params.append(self.min_priority)
        return " ".join(parts), params


EVERYTHING = Filter()


def _text_size(row):
    return text_size(row[1], row[2], row[3])


def _take(rows, limit, max_bytes):
    """The first rows that fit in `limit` and in `max_bytes` of text (always one, if there
    is one), read one at a time so no more are held; and whether any row is left."""
    taken, size = [], 0
    for row in rows:
        if len(taken) == limit:
            return taken, True
        size += _text_size(row)
        if taken and max_bytes is not None and size > max_bytes:
            return taken, True
        taken.append(row)
    return taken, False


def _is_locked(error):
    text = str(error)
    return "locked" in text or "busy" in text


def _is_full(error):
    return "full" in str(error) or getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class _Connection(sqlite3.Connection):
    """A connection that knows whether its write transaction under way inserted messages
    (which the search index then takes in before the commit)."""

    inserted = False


class Store(Coordination, Search, NotifyRecords, StoreContract):
    def __init__(
        self,
        path,
        synchronous="FULL",
        busy_deadline=10.0,
        sleep=time.sleep,
        max_attempts=DEFAULT_MAX_ATTEMPTS,
        writers_queue=False,
    ):
        self.path = path
        self._writers = None
        if writers_queue and not (path == ":memory:" or path.startswith("file:")):
            self._writers = os.open(path + "-writers", os.O_RDWR | os.O_CREAT, 0o600)
        self.max_attempts = max_attempts
        self.busy_deadline = busy_deadline
        # Waiting for the write lock sleeps through `sleep` (cooperative under gevent),
        # not through SQLite's busy handler, which would block the whole worker.
        self._sleep = sleep
        _create_private(path)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False, factory=_Connection)
        self._db.execute("PRAGMA busy_timeout = 0")
        self._retry(lambda: self._db.execute("PRAGMA journal_mode = WAL"))
        self._db.execute(f"PRAGMA synchronous = {synchronous}")
        self._retry(self._migrate)
        page = self._db.execute("PRAGMA page_size").fetchone()[0]
        checkpoint_pages = self._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        self.disk_reserve = page * checkpoint_pages + DISK_RESERVE_MARGIN

    def close(self):
        self._db.close()

    # -- transactions -------------------------------------------------------------------

    def _retry(self, work, busy_deadline=None):
        """Run work (a whole transaction) until SQLite stops answering 'locked'."""
        deadline = time.monotonic() + (self.busy_deadline if busy_deadline is None else busy_deadline)
        pause = 0.0002
        while True:
            try:
                return work()
            except sqlite3.OperationalError as error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if _is_full(error):
                    raise StoreFull(str(error)) from error
                if not _is_locked(error) or time.monotonic() > deadline:
                    if _is_locked(error):
                        raise StoreBusy(str(error)) from error
                    raise
                self._sleep(pause)
                pause = min(pause * 2, 0.005)

    def _write(self, work, busy_deadline=None):
        def transaction():
            if self._writers is not None:
                fcntl.flock(self._writers, fcntl.LOCK_EX)
            try:
                return locked()
            finally:
                if self._writers is not None:
                    fcntl.flock(self._writers, fcntl.LOCK_UN)

        def locked():
            self._db.execute("BEGIN IMMEDIATE")
            self._db.inserted = False
            try:
                result = work(self._db)
                if self._db.inserted:  # the search index takes them in one statement
                    self._index_new(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return result

        return self._retry(transaction, busy_deadline)

    def _read(self, work):
        """Several statements over one snapshot of the database."""

        def transaction():
            self._db.execute("BEGIN")
            try:
                return work(self._db)
            finally:
                self._db.execute("COMMIT")

        return self._retry(transaction)

    # -- schema ---------------------------------------------------------------------------

    def _migrate(self):
        if self.schema_version() == SCHEMA_VERSION:
            return  # the usual case: no write lock needed to open the store
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"database schema {version} is newer than this broker's ({SCHEMA_VERSION})")
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](self._db)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def schema_version(self):
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    # -- writes ---------------------------------------------------------------------------

    def append(self, entries, now=None, max_channels=0, max_agents=0, max_database=0, capped=None):
        """Store Posts (or (channel, sender, message) tuples) in one transaction; returns
        their Messages. A post repeated with its idempotency key answers the Message stored
        the first time (marked `duplicate`) and stores nothing; a key used for another
        channel raises KeyConflict. With max_channels or max_agents, a post that would
        create a channel or register an agent past the cap stores nothing; `capped`
        (default: all of `entries`) are the entries the caps hold. With max_database,
        nothing is stored once the database's pages in use hold that many bytes."""
        return self.append_gathered(
            lambda: (entries, entries if capped is None else capped), now, max_channels, max_agents, max_database
        )

    def append_gathered(self, gather, now=None, max_channels=0, max_agents=0, max_database=0):
        self._check_free_space()
        gathered = []

        def work(db):
            if not gathered:  # a retried transaction stores the same posts
                entries, capped = gather()
                posts = [Post.of(entry) for entry in entries]
                gathered.append((posts, posts if capped is entries else [Post.of(entry) for entry in capped]))
            posts, capped = gathered[0]
            if max_database:
                self._check_database_size(db, max_database)
            if max_channels and capped:
                self._check_channel_cap(db, {post.channel for post in capped}, max_channels)
            if max_agents and capped:
                self._check_agent_cap(db, {post.sender for post in capped}, max_agents)
            return self._insert(db, posts, time.time() if now is None else now)

        return self._write(work)

    def write_batch(self, works):
        """Run each work(db) in one transaction (one commit), each in a savepoint of its
        own: one that is refused (a task's state, a missing message, a reused key) is
        undone alone. [(result, None) or (None, the refusal)] in order."""
        self._check_free_space()

        def transaction(db):
            outcomes = []
            for work in works:
                db.execute("SAVEPOINT work")
                try:
                    outcomes.append((work(db), None))
                except REFUSALS as error:
                    db.execute("ROLLBACK TO work")
                    outcomes.append((None, error))
                db.execute("RELEASE work")
            return outcomes

        return self._write(transaction)

    def _insert(self, db, posts, clock):
        """Insert posts inside the caller's transaction (see append)."""
        # The newest message is never pruned while any other is kept, so only an empty
        # table needs the pruned timestamps: either way a clock stepped back cannot give a
        # new message a time a reader with `since=` has already passed.
        row = db.execute(LAST_TIMESTAMP).fetchone() or db.execute(LAST_PRUNED_TIMESTAMP).fetchone()
        stamp = clock if row is None or row[0] is None else max(clock, row[0] + TIMESTAMP_STEP)
        stored, per_channel, per_agent, keyed = [], {}, {}, {}
        rows = []  # posts not inserted yet: (their place in `stored`, row, tags)
        for post in posts:
            if post.key is not None or post.reply_to is not None:
                # What these look up may be among the rows waiting: insert those first.
                self._insert_rows(db, rows, stored)
            if post.key is not None:
                first = keyed.get((post.sender, post.key)) or self._keyed(db, post, clock)
                if first is not None:
                    if first.channel != post.channel:
                        raise KeyConflict(
                            f"idempotency key {post.key!r} of {post.sender!r} was used for a post to "
                            f"channel {first.channel!r} (message {first.id}); use a new key"
                        )
                    stored.append(dataclasses.replace(first, duplicate=True))
                    continue
            thread = None
            if post.reply_to is not None:
                target = db.execute(SELECT_REPLY_TARGET, (post.reply_to,)).fetchone()
                # Checked before the post was queued; pruned since, it still names the thread.
                thread = post.reply_to if target is None or target[1] is None else target[1]
            tags = orjson.dumps(list(post.tags)).decode() if post.tags else None
            row = (
                post.channel,
                post.sender,
                post.message,
                stamp,
                post.reply_to,
                thread,
                post.priority,
                tags,
                post.meta,
            )
            rows.append((len(stored), row, post.tags))
            stored.append(None)
            if post.key is not None:
                self._insert_rows(db, rows, stored)
                message = stored[-1]
                db.execute(RECORD_KEY, (post.sender, post.key, message.id, post.channel, clock))
                keyed[(post.sender, post.key)] = message
            per_channel[post.channel] = (per_channel.get(post.channel, (0,))[0] + 1, stamp)
            per_agent[post.sender] = (per_agent.get(post.sender, (0,))[0] + 1, stamp)
            stamp += TIMESTAMP_STEP
        self._insert_rows(db, rows, stored)
        for channel, (added, last) in per_channel.items():
            db.execute(UPSERT_CHANNEL, (channel, added, last))
        for sender, (sent, last) in per_agent.items():
            db.execute(UPSERT_AGENT_SENT, (sender, last, last, sent))
        return stored

    def _insert_rows(self, db, rows, stored):
        """Insert the waiting rows, several to a statement (each statement under the write
        lock also waits for the interpreter lock again when it returns: 8 posts took 8 of
        them, now 1), and put their Messages in their places in `stored`. AUTOINCREMENT
        gives the rows of one statement consecutive ids, ending at its lastrowid."""
        done = 0
        while done < len(rows):
            count = min(len(rows) - done, ROWS_PER_INSERT)
            count = 1 << (count.bit_length() - 1)  # a power of two: few statements to prepare
            chunk = rows[done : done + count]
            last = db.execute(insert_messages(count), [value for _, row, _ in chunk for value in row]).lastrowid
            for message_id, (place, row, tags) in enumerate(chunk, last - count + 1):
                stored[place] = Message(message_id, *row[:6], row[6], tuple(tags), row[8])
            db.executemany(
                INSERT_TAG,
                [
                    (message_id, tag, row[0])
                    for message_id, (_, row, tags) in enumerate(chunk, last - count + 1)
                    for tag in tags
                ],
            )
            done += count
        if rows:
            db.inserted = True  # on the connection: the work may be another Store's (done_work)
            rows.clear()

    def _keyed(self, db, post, now):
        """The message a sender's idempotency key stored within KEY_LIFETIME, if it is kept."""
        row = db.execute(SELECT_KEYED, (post.sender, post.key, now - KEY_LIFETIME)).fetchone()
        if row is None:
            return None
        found = db.execute(SELECT_ONE, row).fetchone()
        return None if found is None else message_of(found, now, self.max_attempts)

    def forget_old_keys(self, now=None):
        """Forget idempotency keys older than KEY_LIFETIME; returns how many went."""
        before = (time.time() if now is None else now) - KEY_LIFETIME
        return self._write(lambda db: db.execute(DELETE_OLD_KEYS, (before,)).rowcount)

    def _check_free_space(self):
        try:
            disk = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return
        reserve = min(self.disk_reserve, disk.f_blocks * disk.f_frsize * DISK_RESERVE_SHARE)
        free = disk.f_bavail * disk.f_frsize
        if free < reserve:
            raise StoreFull(f"{free} bytes free, under the {int(reserve)} the broker keeps for SQLite's checkpoints")

    @staticmethod
    def _check_channel_cap(db, channels, max_channels):
        new = [name for name in channels if db.execute(CHANNEL_EXISTS, (name,)).fetchone() is None]
        if new and db.execute(COUNT_ALL_CHANNELS).fetchone()[0] + len(new) > max_channels:
            raise ChannelLimit(f"the broker holds its limit of {max_channels} channels; {new[0]!r} would be one more")

    @staticmethod
    def _check_agent_cap(db, senders, max_agents):
        new = sorted(name for name in senders if db.execute(AGENT_EXISTS, (name,)).fetchone() is None)
        if new and db.execute(COUNT_AGENTS).fetchone()[0] + len(new) > max_agents:
            raise AgentLimit(f"the broker holds its limit of {max_agents} agents; {new[0]!r} would be one more")

    @staticmethod
    def _check_database_size(db, max_database):
        used = db.execute(USED_BYTES).fetchone()[0]
        if used >= max_database:
            raise DatabaseFull(f"the database holds {used} bytes, at its limit (AGENT_COMMS_MAX_DATABASE)")

    def touch_agent(self, agent_id, now=None, busy_deadline=0.5, max_agents=0, register=True):
        """Record that an agent was seen (it read, or watched). Best effort: it gives up
        on a locked database sooner than a post does. An agent not known yet is registered
        only with `register`, and with max_agents only while the cap is not reached."""
        seen = time.time() if now is None else now

        def work(db):
            if db.execute(UPDATE_AGENT_SEEN, (seen, agent_id)).rowcount or not register:
                return
            if not max_agents or db.execute(COUNT_AGENTS).fetchone()[0] < max_agents:
                db.execute(UPSERT_AGENT_SEEN, (agent_id, seen, seen))

        self._write(work, busy_deadline)

    def forget_idle_agents(self, idle_since):
        """Forget the agents not seen since `idle_since` that no token names; returns how
        many went. Their messages stay, under their names."""
        return self._write(lambda db: db.execute(DELETE_IDLE_AGENTS, (idle_since,)).rowcount)

    def prune(self, max_age=0.0, max_messages=0, now=None):
        """Remove what retention no longer keeps; returns how many messages went."""
        removed = 0
        if max_age > 0:
            cutoff = (time.time() if now is None else now) - max_age
            while True:
                gone = self._write(lambda db: self._prune_expired(db, cutoff))
                removed += gone
                if gone < PRUNE_BATCH:
                    break
        if max_messages > 0:
            overfull = self._read(lambda db: db.execute(SELECT_OVERFULL_CHANNELS, (max_messages,)).fetchall())
            for channel, _ in overfull:
                while True:
                    gone = self._write(lambda db, ch=channel: self._prune_excess(db, ch, max_messages))
                    removed += gone
                    if gone < PRUNE_BATCH:
                        break
        return removed

    @staticmethod
    def _prune_expired(db, cutoff):
        groups = db.execute(SELECT_EXPIRED, (cutoff, PRUNE_BATCH)).fetchall()
        if not groups:
            return 0
        for statement in (DELETE_TAGS_OF, DELETE_TASKS_OF):
            db.execute(statement.format(ids=EXPIRED_IDS), (cutoff, PRUNE_BATCH))
        db.execute(DELETE_EXPIRED, (cutoff, PRUNE_BATCH))
        for channel, gone, last_id, last_stamp in groups:
            db.execute(RECORD_PRUNED, (gone, last_id, last_stamp, channel))
            db.execute(DELETE_PASSED_MOVES, (channel, last_id))
        return sum(group[1] for group in groups)

    @staticmethod
    def _prune_excess(db, channel, keep):
        row = db.execute(SELECT_NTH_NEWEST_ID, (channel, keep)).fetchone()
        if row is None:
            return 0
        gone, last_id, last_stamp = db.execute(SELECT_EXCESS, (channel, row[0], PRUNE_BATCH)).fetchone()
        if not gone:
            return 0
        for statement in (DELETE_TAGS_OF, DELETE_TASKS_OF):
            db.execute(statement.format(ids=EXCESS_IDS), (channel, row[0], PRUNE_BATCH))
        db.execute(DELETE_EXCESS, (channel, row[0], PRUNE_BATCH))
        db.execute(RECORD_PRUNED, (gone, last_id, last_stamp, channel))
        db.execute(DELETE_PASSED_MOVES, (channel, last_id))
        return gone

    # -- reads ----------------------------------------------------------------------------

    def _messages(self, db, rows):
        return messages_of(db, rows, time.time(), self.max_attempts)

    def message(self, channel, message_id, now=None):
        """One message of a channel (its task as it stands at `now`), or None."""
        row = self._read(lambda db: db.execute(SELECT_ONE, (message_id, channel)).fetchone())
        stamp = time.time() if now is None else now
        return None if row is None else message_of(row, stamp, self.max_attempts)

    def latest(self, channel, limit, max_bytes=None, only=EVERYTHING):
        """The newest `limit` messages of a channel (those `only` keeps), oldest first; the
        cursor is the newest one's id (0 if there is none). If they hold more than
        `max_bytes` of text, the page starts at the oldest of them and stops within the
        budget, like an after_id page (`more` set, the cursor its last id), so paging on
        from the cursor gets the rest."""
        where, params = only.sql(channel)

        def work(db):
            rows, cut = _take(db.execute(SELECT_LATEST.format(only=where), (channel, *params, limit)), limit, max_bytes)
            if cut:
                statement = SELECT_LATEST_WINDOW_START.format(only=where)
                start = db.execute(statement, (channel, *params, limit)).fetchone()[0]
                return self._after_id(db, channel, start - 1, limit, max_bytes, only)
            rows.reverse()
            cursor = rows[-1][0] if rows else 0
            return Page(self._messages(db, rows), cursor, False, False)

        return self._read(work)

    def after_id(self, channel, after, limit, max_bytes=None, only=EVERYTHING):
        """Messages of a channel with id > after (those `only` keeps), oldest first: at
        most `limit`, and no more than `max_bytes` of text (but always one)."""
        return self._read(lambda db: self._after_id(db, channel, after, limit, max_bytes, only))

    def _after_id(self, db, channel, after, limit, max_bytes, only):
        where, params = only.sql(channel)
        statement = SELECT_AFTER_ID.format(only=where)
        rows, more = _take(db.execute(statement, (channel, after, *params, limit + 1)), limit, max_bytes)
        pruned = db.execute(SELECT_CHANNEL_PRUNED, (channel,)).fetchone()
        gap = pruned is not None and pruned[0] > after
        cursor = rows[-1][0] if rows else after
        return Page(self._messages(db, rows), cursor, gap, more)

    def after_time(self, channel, since, limit, max_bytes=None, only=EVERYTHING):
        """Messages of a channel with timestamp > since, oldest first, within `limit` and
        `max_bytes` as after_id. A page is extended past both rather than split between
        messages sharing one timestamp (possible only in data adopted from the seed, whose
        timestamps had one-second resolution)."""
        where, params = only.sql(channel)
        after_time = SELECT_AFTER_TIME.format(only=where)

        def work(db):
            rows, more = _take(db.execute(after_time, (channel, since, *params, limit + 1)), limit, max_bytes)
            if more:
                last = rows[-1]
                same = SELECT_SAME_TIME.format(only=where)
                rows += db.execute(same, (channel, last[4], last[0], *params)).fetchall()
                more = db.execute(after_time, (channel, rows[-1][4], *params, 1)).fetchone() is not None
            pruned = db.execute(SELECT_CHANNEL_PRUNED, (channel,)).fetchone()
            gap = pruned is not None and pruned[1] > since
            if rows:
                cursor = rows[-1][0]
            else:
                # Nothing newer than `since`: continue from the channel's newest message.
                cursor = db.execute(SELECT_CHANNEL_LAST_ID, (channel,)).fetchone()[0]
            return Page(self._messages(db, rows), cursor, gap, more)

        return self._read(work)

    def all_after_id(self, after, limit, max_bytes=None, granted=None):
        """Messages of every channel with id > after, oldest first, within `limit` and
        `max_bytes` as after_id (a Page whose `gap` is always False). With `granted` (channel
        patterns such as 'tasks,team-*'), only the channels they match, read over at most
        GRANTED_WINDOW ids: `more` is then also set when ids past the window remain, and the
        cursor moves past the window's end when none of it was granted."""

        def work(db):
            if granted is None or "*" in granted.split(","):
                rows, more = _take(db.execute(SELECT_ALL_AFTER_ID, (after, limit + 1)), limit, max_bytes)
                return Page(self._messages(db, rows), rows[-1][0] if rows else after, False, more)
            patterns = granted.split(",")
            end = after + GRANTED_WINDOW
            statement = SELECT_GRANTED_AFTER_ID.format(granted=" OR ".join([GRANTED] * len(patterns)))
            rows, cut = _take(db.execute(statement, (after, end, *patterns, limit + 1)), limit, max_bytes)
            if cut:
                return Page(self._messages(db, rows), rows[-1][0], False, True)
            last = db.execute(LAST_GIVEN_ID).fetchone()[0]
            return Page(self._messages(db, rows), min(end, max(last, after)), False, end < last)

        return self._read(work)

    def pruned_after(self, after, channel=None):
        """Whether retention removed any message with id > after (in one channel, or any)."""
        if channel is None:
            return self._read(lambda db: db.execute(SELECT_MAX_PRUNED_ID).fetchone()[0]) > after
        row = self._read(lambda db: db.execute(SELECT_CHANNEL_PRUNED, (channel,)).fetchone())
        return row is not None and row[0] > after

    def max_id(self):
        return self._read(lambda db: db.execute(MAX_ID).fetchone()[0])

    def last_given_id(self):
        """The largest id this database ever gave a message, even if retention removed it."""
        return self._read(lambda db: db.execute(LAST_GIVEN_ID).fetchone()[0])

    def synchronous(self):
        """The durability this connection runs with, as SQLite reports it (FULL, NORMAL...)."""
        level = self._db.execute("PRAGMA synchronous").fetchone()[0]
        return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(level, str(level))

    def data_version(self):
        """Changes whenever another connection (another worker) commits."""
        return self._retry(lambda: self._db.execute("PRAGMA data_version").fetchone()[0])

    def channels(self, after="", limit=-1):
        """(name, message count, last activity) of the channels that hold messages, by
        name: those after `after`, at most `limit` (-1: all)."""
        return self._read(lambda db: db.execute(SELECT_CHANNELS, (after, limit)).fetchall())

    def agents(self, after="", limit=-1):
        """(id, first seen, last seen, messages sent) of the agents, by id: those after
        `after`, at most `limit` (-1: all)."""
        return self._read(lambda db: db.execute(SELECT_AGENTS, (after, limit)).fetchall())

    def totals(self, active_since):
        """(messages, channels, agents, active agents)."""
        return self._read(lambda db: db.execute(SELECT_TOTALS, (active_since,)).fetchone())

    def size_bytes(self):
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total

    # -- tokens -------------------------------------------------------------------------

    def add_token(self, token_id, digest, agent, read, write, note="", expires=None, now=None):
        created = time.time() if now is None else now
        row = (token_id, digest, agent, read, write, note, created, expires)
        self._write(lambda db: db.execute(INSERT_TOKEN, row))
        return self.token_by_hash(digest)

    def update_token(self, token_id, read, write, note, expires):
        """New grants and expiry for a token (a revoked one stays revoked)."""
        self._write(lambda db: db.execute(UPDATE_TOKEN_GRANTS, (read, write, note, expires, token_id)))

    def token_by_hash(self, digest):
        row = self._read(lambda db: db.execute(SELECT_TOKEN_BY_HASH, (digest,)).fetchone())
        return None if row is None else Token(*row)

    def tokens(self):
        return [Token(*row) for row in self._read(lambda db: db.execute(SELECT_TOKENS).fetchall())]

    def revoke_token(self, token_id, now=None):
        """True if the token was active and is now revoked; None if there is no such token."""
        stamp = time.time() if now is None else now

        def work(db):
            if db.execute(SELECT_TOKEN_IDS, (token_id,)).fetchone() is None:
                return None
            return db.execute(REVOKE_TOKEN, (stamp, token_id)).rowcount == 1

        return self._write(work)

    def token_agents(self, now=None):
        """The agents that hold a token that is neither revoked nor expired."""
        stamp = time.time() if now is None else now
        return {row[0] for row in self._read(lambda db: db.execute(SELECT_TOKEN_AGENTS, (stamp,)).fetchall())}

    def touch_token(self, token_id, now=None, busy_deadline=0.5):
        """Record a token's last use; best effort, like touch_agent."""
        stamp = time.time() if now is None else now
        self._write(lambda db: db.execute(TOUCH_TOKEN, (stamp, token_id)), busy_deadline)

    def healthy(self):
        """A cheap check that the database answers and its schema is ours."""
        return self._read(lambda db: db.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION


def _create_private(path):
    """A new database file readable by its owner only; SQLite gives its -wal and -shm the
    database file's mode, so they are private too."""
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
