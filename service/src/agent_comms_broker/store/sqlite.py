"""The SQLite store: its connection and transactions; its statements are in sqlite_sql.py,
its schema and migrations in schema.py, search in sqlite_search.py, and the logic over
them, shared with PostgreSQL, in shared.py.

Ids come from AUTOINCREMENT under SQLite's single write lock, so they rise strictly in
commit order. One Store is one connection: use it from one thread (or one gevent hub).
"""

import fcntl
import os
import sqlite3
import time

from . import sqlite_sql
from .model import DatabaseFull, Message, StoreBusy, StoreFull
from .schema import MIGRATIONS, SCHEMA_VERSION
from .shared import DEFAULT_MAX_ATTEMPTS, SQLStore
from .sqlite_search import Search

# Posts are refused (StoreFull) while free space is below what one checkpoint of a full
# write-ahead log may need, plus a margin; never more than this share of the filesystem.
# Refusing a little early means a checkpoint always has room, so freeing a little space
# brings posting back; refusing only at ENOSPC could leave a checkpoint that never fits.
DISK_RESERVE_MARGIN = 1 << 20
DISK_RESERVE_SHARE = 0.25
# A store with a thread commits in it once its commits take this long (in seconds,
# smoothed: COMMIT_SMOOTHING is the last one's weight), as on a disk whose fsync takes
# milliseconds. Quicker ones run in the caller's thread: on a busy machine, handing a
# commit to the thread and back cost more than the commit (tasks done a second on the
# development machine, 1,500 through the thread, 2,000 without).
SLOW_COMMIT = 0.001
COMMIT_SMOOTHING = 0.25


def _is_locked(error):
    text = str(error)
    return "locked" in text or "busy" in text


def _is_full(error):
    return "full" in str(error) or getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class _Connection(sqlite3.Connection):
    """A connection that knows whether its write transaction under way inserted messages
    (which the search index then takes in before the commit)."""

    inserted = False


class Store(Search, SQLStore):
    sql = sqlite_sql
    database = "sqlite"

    def __init__(
        self,
        path,
        synchronous="FULL",
        busy_deadline=10.0,
        sleep=time.sleep,
        max_attempts=DEFAULT_MAX_ATTEMPTS,
        writers_queue=False,
        thread=None,
    ):
        self.path = path
        # With `thread` (gevent's ThreadPool(1): apply and spawn, in one thread, in turn),
        # a write waits there for the lock, and commits there on a slow disk (_write).
        self._thread = thread
        self._commit_seconds = 0.0  # how long commits take, smoothed
        self._behind = None  # a task of a stopped write, left to the thread (_thread_behind)
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
        """Run work(db) in a write transaction. With a thread, the waits happen in it, so
        that an event loop calling this goes on serving meanwhile: for the write lock
        while another worker holds it, and for a commit on a slow disk (SLOW_COMMIT). The
        statements run here: in the thread, each call into SQLite would wait to take the
        interpreter lock back from the loop."""

        def transaction():
            slow = self._thread is not None and (self._commit_seconds >= SLOW_COMMIT or self._thread_behind())
            if self._thread is None:
                self._begin()
            elif slow or not self._begin(wait=False):
                self._begin_in_thread()
            try:
                self._db.inserted = False
                result = work(self._db)
                if self._db.inserted:  # the search index takes them in one statement
                    self._index_new(self._db)
            except BaseException:
                self._release()
                raise
            if slow:
                self._in_thread(self._commit)
            else:
                self._commit()
            return result

        return self._retry(transaction, busy_deadline)

    def _begin(self, wait=True):
        """Take the write lock: the workers' turn (the -writers file), then SQLite's.
        Without `wait`, False at once if another worker has the turn."""
        if self._writers is not None:
            try:
                fcntl.flock(self._writers, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release()
            raise
        return True

    def _begin_in_thread(self):
        try:
            self._in_thread(self._begin)
        except BaseException as error:
            if not isinstance(error, Exception):
                # Stopped while the thread waited (a GreenletExit): the thread may still
                # get the lock, and must not keep it. Its tasks run in turn.
                self._behind = self._thread.spawn(_outcome, self._release)
            raise

    def _in_thread(self, function):
        task = self._thread.spawn(_outcome, function)
        try:
            value, error = task.get()
        except BaseException:
            self._behind = task  # stopped while it runs: it goes on, on this connection
            raise
        if error is not None:
            raise error
        return value

    def _thread_behind(self):
        """Whether a write that was stopped left the thread a task still to finish: until
        it has, every step of the next writes goes to the thread too (after it), so that
        no two threads use the connection at once."""
        if self._behind is not None and self._behind.ready():
            self._behind = None
        return self._behind is not None

    def _commit(self):
        started = time.monotonic()
        try:
            self._db.execute("COMMIT")
        finally:
            self._release()
        took = time.monotonic() - started
        self._commit_seconds += COMMIT_SMOOTHING * (took - self._commit_seconds)

    def _release(self):
        """Roll back what was not committed, and give the turn back."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        finally:
            if self._writers is not None:
                fcntl.flock(self._writers, fcntl.LOCK_UN)

    def _read(self, work):
        """Several statements over one snapshot of the database."""

        def transaction():
            self._db.execute("BEGIN")
            try:
                return work(self._db)
            finally:
                self._db.execute("COMMIT")

        return self._retry(transaction)

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

    def _insert_rows(self, db, rows, stored):
        """Insert the waiting rows, several to a statement (each statement under the write
        lock also waits for the interpreter lock again when it returns: 8 posts took 8 of
        them, now 1), and put their Messages in their places in `stored`. AUTOINCREMENT
        gives the rows of one statement consecutive ids, ending at its lastrowid."""
        done = 0
        while done < len(rows):
            count = min(len(rows) - done, self.sql.ROWS_PER_INSERT)
            count = 1 << (count.bit_length() - 1)  # a power of two: few statements to prepare
            chunk = rows[done : done + count]
            values = [value for _, row, _ in chunk for value in row]
            last = db.execute(self.sql.insert_messages(count), values).lastrowid
            for message_id, (place, row, tags) in enumerate(chunk, last - count + 1):
                stored[place] = Message(message_id, *row[:6], row[6], tuple(tags), row[8], row[9])
            db.executemany(
                self.sql.INSERT_TAG,
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

    def _check_free_space(self):
        try:
            disk = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return
        reserve = min(self.disk_reserve, disk.f_blocks * disk.f_frsize * DISK_RESERVE_SHARE)
        free = disk.f_bavail * disk.f_frsize
        if free < reserve:
            raise StoreFull(f"{free} bytes free, under the {int(reserve)} the broker keeps for SQLite's checkpoints")

    def _check_database_size(self, db, max_database):
        used = db.execute(self.sql.USED_BYTES).fetchone()[0]
        if used >= max_database:
            raise DatabaseFull(f"the database holds {used} bytes, at its limit (AGENT_COMMS_MAX_DATABASE)")

    def synchronous(self):
        """The durability this connection runs with, as SQLite reports it (FULL, NORMAL...)."""
        level = self._db.execute("PRAGMA synchronous").fetchone()[0]
        return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(level, str(level))

    def data_version(self):
        """Changes whenever another connection (another worker) commits."""
        return self._retry(lambda: self._db.execute("PRAGMA data_version").fetchone()[0])

    def size_bytes(self):
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total

    def healthy(self):
        """A cheap check that the database answers and its schema is ours."""
        return self._read(lambda db: db.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION


def _outcome(function):
    """What function() returned, or what it raised, as a value: raised again by the
    caller (a thread pool's apply would also print it as a traceback)."""
    try:
        return function(), None
    except BaseException as error:
        return None, error


def _create_private(path):
    """A new database file readable by its owner only; SQLite gives its -wal and -shm the
    database file's mode, so they are private too."""
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
