"""The PostgreSQL store: a pool of connections and the transactions on them; its
statements are in postgres_sql.py, its schema in postgres_schema.py, search in
postgres_search.py, and the logic over them, shared with SQLite, in shared.py.

psycopg and psycopg_pool are imported when a store is made, never before: they choose
how to wait for the server (gevent's cooperative wait, once gevent has patched the
process) and what locks to use when they are first imported, and the gunicorn master,
which imports the app before its workers patch, must not make that choice for them.

Write transactions take turns on the `writer` row (postgres_sql.WRITE_LOCK), which also
gives the ids: a transaction's ids are all above every id committed before it, and a
reader that sees one id sees every smaller one. Reads run at REPEATABLE READ, so the
statements of one read see one snapshot, as SQLite's do.
"""

import threading
import time

from ..config import one_line, redacted_error
from . import postgres_sql
from .model import DatabaseFull, Message, StoreBusy, StoreFull, StoreUnavailable
from .postgres_schema import SCHEMA_VERSION, migrate, schema_version
from .postgres_search import PostgresSearch
from .shared import DEFAULT_MAX_ATTEMPTS, SQLStore

BEGIN_WRITE = "BEGIN"
BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
# Connections each worker keeps open at most; one at least, for the hub's reads.
DEFAULT_POOL_SIZE = 8
# The libpq settings every connection gets, unless the URL says otherwise: a server that
# went away without a word is noticed within about half a minute; text is UTF-8 both ways,
# even in a database created SQL_ASCII (initdb without a locale), where psycopg would
# otherwise hand out bytes.
CONNECTION_OPTIONS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "client_encoding": "utf8",
}
# The listener reads the last id given at least this often (seconds), so a lost
# notification or a silently dead connection is noticed.
PROBE_INTERVAL = 2.0
# How long a request waits for a connection while the database is known to be gone.
UNAVAILABLE_WAIT = 1.0
# How much longer than its deadline a transaction may wait for the server's answers.
ANSWER_MARGIN = 2.0
# SQLSTATEs a transaction is tried again after: serialization failure, deadlock.
RETRIED = {"40001", "40P01"}
# A server that cannot take the connection, or dropped it (classes 08 and 57).
UNAVAILABLE_CLASSES = ("08", "57")


class _Transaction:
    """A connection inside one of the store's transactions, as shared.py's logic uses it:
    `execute`, and for a write the last id given so far (new rows' ids follow it)."""

    __slots__ = ("execute", "given", "last_id")

    def __init__(self, connection, last_id=None):
        self.execute = connection.execute
        self.given = self.last_id = last_id


class PostgresStore(PostgresSearch, SQLStore):
    sql = postgres_sql
    database = "postgresql"
    stores_nul = False

    def __init__(
        self,
        url,
        busy_deadline=10.0,
        sleep=time.sleep,
        max_attempts=DEFAULT_MAX_ATTEMPTS,
        pool_size=DEFAULT_POOL_SIZE,
        migrate_schema=True,
        bounded=None,
    ):
        """bounded(seconds): a context manager that raises TimeoutError in its block once
        that long has passed (gevent.Timeout in a worker); None: waits are not bounded."""
        import psycopg
        import psycopg_pool

        self._psycopg = psycopg
        self._pool_timeout = psycopg_pool.PoolTimeout
        self.url = url
        self.max_attempts = max_attempts
        self.busy_deadline = busy_deadline
        self._sleep = sleep
        self._bounded = bounded
        self.pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs={**CONNECTION_OPTIONS, "autocommit": True},
            open=False,
            timeout=busy_deadline,
            name="agent-comms",
        )
        self.pool.open(wait=False)
        # data_version's listener, its count of commits seen, and what it last failed with.
        self._listener = None
        self._version = 0
        self._listen_error = None
        self._closed = False
        if migrate_schema:
            self._retry(lambda: self._on_connection(self._migrate))

    def close(self):
        self._closed = True
        self.pool.close()

    # -- transactions -------------------------------------------------------------------

    def _on_connection(self, work, timeout=None):
        """work(connection) on a pooled connection, waiting at most `timeout` (default: the
        busy deadline) for one, and with a `bounded` store at most that long plus
        ANSWER_MARGIN for the server's answers: a server that hangs (stopped, or behind a
        partition that TCP does not notice) costs a 503, and the connection is dropped."""
        if self._listen_error is not None:
            # The listener has lost the database: a request waits a second for a
            # connection, not the whole deadline, before its 503.
            timeout = min(timeout or UNAVAILABLE_WAIT, UNAVAILABLE_WAIT)
        with self.pool.connection(timeout=timeout) as connection:
            if self._bounded is None:
                return work(connection)
            limit = (timeout or self.busy_deadline) + ANSWER_MARGIN
            try:
                with self._bounded(limit):
                    return work(connection)
            except TimeoutError as error:
                connection.close()  # mid-conversation: the pool drops it
                raise StoreUnavailable(f"the database did not answer within {limit:g} s") from error

    def _retry(self, attempt, busy_deadline=None):
        """Run attempt() (a whole transaction) again while it fails before its commit for
        a reason that a new try can get past: a lost connection (a server restarted, a
        pooled connection gone stale), a deadlock, a serialization failure; until the
        deadline, then StoreBusy. A full disk raises StoreFull; a lock wait past
        lock_timeout, StoreBusy."""
        deadline = time.monotonic() + (self.busy_deadline if busy_deadline is None else busy_deadline)
        pause = 0.005
        while True:
            try:
                return attempt()
            except self._pool_timeout as error:
                if self._listen_error is not None:
                    raise StoreUnavailable(f"the database is unavailable: {self._listen_error}") from error
                raise StoreBusy(f"no database connection within the deadline: {error}") from error
            except self._psycopg.Error as error:
                state = error.sqlstate or ""
                if state == "53100":
                    raise StoreFull(str(error)) from error
                if state == "55P03":
                    raise StoreBusy(str(error)) from error
                passing = state in RETRIED or state.startswith(UNAVAILABLE_CLASSES) or not state
                if not (passing and isinstance(error, self._psycopg.OperationalError)):
                    raise
                if getattr(error, "agent_comms_committing", False):
                    # The commit was sent: it may have taken effect. Not tried again.
                    raise StoreUnavailable(f"the database connection was lost during a commit: {error}") from error
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"the database is unavailable: {error}") from error
                self._sleep(pause)
                pause = min(pause * 2, 0.25)

    def _write(self, work, busy_deadline=None):
        lock_timeout = int(1000 * (self.busy_deadline if busy_deadline is None else busy_deadline))

        def transaction(connection):
            try:
                # One message for the three (no parameters: the simple query protocol),
                # the lock's row in the last of its results.
                locked = connection.execute(
                    f"{BEGIN_WRITE}; SET LOCAL lock_timeout = {lock_timeout}; {self.sql.WRITE_LOCK}"
                )
                while locked.nextset():
                    pass
                tx = _Transaction(connection, locked.fetchone()[0])
                result = work(tx)
                if tx.last_id != tx.given:
                    connection.execute(self.sql.SET_LAST_ID_AND_NOTIFY, (tx.last_id,))
            except BaseException:
                _rollback(connection)
                raise
            try:
                connection.execute("COMMIT")
            except self._psycopg.Error as error:
                error.agent_comms_committing = True
                raise
            return result

        return self._retry(lambda: self._on_connection(transaction), busy_deadline)

    def _read(self, work):
        def transaction(connection):
            connection.execute(BEGIN_READ)
            try:
                result = work(_Transaction(connection))
            except BaseException:
                _rollback(connection)
                raise
            connection.execute("COMMIT")
            return result

        return self._retry(lambda: self._on_connection(transaction))

    # -- schema ---------------------------------------------------------------------------

    def _migrate(self, connection):
        if schema_version(connection) == SCHEMA_VERSION:
            return
        with connection.transaction():
            migrate(connection)

    def schema_version(self):
        return self._on_connection(schema_version)

    # -- writes ---------------------------------------------------------------------------

    def _insert_rows(self, db, rows, stored):
        """Insert the waiting rows in one statement (a column of values each), with the ids
        after the last given, and put their Messages in their places in `stored`."""
        if not rows:
            return
        ids = list(range(db.last_id + 1, db.last_id + 1 + len(rows)))
        columns = [list(column) for column in zip(*(row for _, row, _ in rows), strict=True)]
        db.execute(self.sql.INSERT_MESSAGES, (ids, *columns))
        tagged = ([], [], [])
        for message_id, (place, row, tags) in zip(ids, rows, strict=True):
            stored[place] = Message(message_id, *row[:6], row[6], tuple(tags), row[8], row[9])
            for tag in tags:
                tagged[0].append(message_id)
                tagged[1].append(tag)
                tagged[2].append(row[0])
        if tagged[0]:
            db.execute(self.sql.INSERT_TAGS, tagged)
        db.last_id = ids[-1]
        rows.clear()

    def _check_free_space(self):
        """The server's disk is the server's: a full one answers 53100 (StoreFull)."""

    def _check_database_size(self, db, max_database):
        used = db.execute(self.sql.USED_BYTES).fetchone()[0]
        if used >= max_database:
            raise DatabaseFull(f"the database holds {used} bytes, at its limit (AGENT_COMMS_MAX_DATABASE)")

    # -- state ----------------------------------------------------------------------------

    def data_version(self):
        """Changes whenever any node commits new messages. A listener (started by the first
        call, in the worker) counts the notifications each commit of new messages sends;
        while it has no connection to the database this raises StoreUnavailable."""
        if self._listener is None:
            self._listener = threading.Thread(target=self._listen, name="agent-comms-listen", daemon=True)
            self._listener.start()
        if self._listen_error is not None:
            raise StoreUnavailable(f"the database is unavailable: {self._listen_error}")
        return self._version

    def _listen(self):
        """LISTEN for commits of new messages, forever; every PROBE_INTERVAL without one,
        read the last id given too (a notification is lost when the connection is: the
        probe notices both). On a lost connection, connect again every second."""
        last_id = None
        while not self._closed:
            try:
                connect = self._psycopg.connect
                with connect(self.url, autocommit=True, connect_timeout=5, **CONNECTION_OPTIONS) as connection:
                    connection.execute(self.sql.LISTEN)
                    while not self._closed:
                        probed = self._bounded_probe(connection)
                        if probed != last_id or self._listen_error is not None:
                            last_id, self._listen_error = probed, None
                            self._version += 1
                        for _ in connection.notifies(timeout=PROBE_INTERVAL):
                            self._version += 1
            except (self._psycopg.Error, TimeoutError) as error:
                self._listen_error = one_line(error) or "the database did not answer"
                self._sleep(1)

    def _bounded_probe(self, connection):
        """The last id given, read on the listener's connection (within PROBE_INTERVAL plus
        ANSWER_MARGIN when bounded: a hung server is noticed too)."""
        if self._bounded is None:
            return connection.execute(self.sql.LAST_GIVEN_ID).fetchone()[0]
        with self._bounded(PROBE_INTERVAL + ANSWER_MARGIN):
            return connection.execute(self.sql.LAST_GIVEN_ID).fetchone()[0]

    def synchronous(self):
        """The server's durability of commits (synchronous_commit: on, remote_apply...)."""
        return self._on_connection(lambda c: c.execute("SHOW synchronous_commit").fetchone()[0]).upper()

    def size_bytes(self):
        return self._on_connection(lambda c: c.execute(self.sql.USED_BYTES).fetchone()[0])

    def healthy(self):
        """The database answers, with this broker's schema."""
        return self._on_connection(schema_version, timeout=2) == SCHEMA_VERSION


class DatabaseUnreachable(Exception):
    """No connection to the database could be made; str() is why, on one line, without
    the password."""


class DatabaseUnusable(Exception):
    """A connection was made, but the store could not be opened on it (its schema is
    newer, it cannot be migrated...); str() is why, as DatabaseUnreachable's."""


def open_checked(url, **options):
    """A PostgresStore (migrated) for a command or the master's preflight: first one plain
    connection (within 10 s), so that an unreachable or refusing server says why at once,
    rather than the pool's PoolTimeout after its deadline."""
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=10, **CONNECTION_OPTIONS).close()
    except psycopg.Error as error:
        raise DatabaseUnreachable(redacted_error(error, url)) from None
    try:
        return PostgresStore(url, **options)
    except (psycopg.Error, StoreBusy) as error:
        raise DatabaseUnusable(redacted_error(error, url)) from None
    except RuntimeError as error:
        raise DatabaseUnusable(str(error)) from None


def _rollback(connection):
    """Roll back the transaction under way, if the connection still has one."""
    if not connection.closed and connection.info.transaction_status != 0:  # 0: idle
        try:
            connection.execute("ROLLBACK")
        except Exception:  # a broken connection: the pool discards it
            pass
