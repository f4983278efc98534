"""The WSGI entry point: `gunicorn -c gunicorn.conf.py agent_comms_broker.wsgi:app`.

The gunicorn master imports this before it forks its workers (preload_app in
gunicorn.conf.py), so the workers share the pages of the code and the app instead of
each importing them again. Each worker has its own SQLite connections, hub and group
committer, made on its first request.
"""

import os
import threading

import gevent
import gevent.event
import gevent.local
import gevent.threadpool


def _import_bottle():
    """Bottle makes the storage of its request and response objects when it is imported
    (threading.local()). Imported here in the master, before gevent patches threading in
    each worker, that storage would be one per thread, shared by every greenlet of a
    worker; made as gevent's local, it is one per greenlet, as after the patch."""
    thread_local = threading.local
    threading.local = gevent.local.local
    try:
        import bottle  # noqa: F401
    finally:
        threading.local = thread_local


_import_bottle()

from . import limits  # noqa: E402
from .config import Settings  # noqa: E402
from .headers import ResponseHeaders  # noqa: E402
from .http.app import create_app  # noqa: E402
from .live import GroupCommitter, Hub, run_retention  # noqa: E402
from .store import Store  # noqa: E402


class Runtime:
    """This process's store, live-delivery hub and group committer."""

    def __init__(self, settings):
        self.settings = settings
        self.pid = None
        self._starting = None  # (pid, the result of the start under way in that process)
        # Set by gunicorn's post_worker_init hook: lets streams end when the worker stops,
        # and tells how many connections the worker serves and may serve (parked event
        # streams count against the same number).
        self.alive = lambda: True
        self.connections = lambda: 0
        self.max_connections = settings.worker_connections
        # What /metrics counts (metrics.py), or None when it is off: made here, in the
        # master, so every worker shares the definitions.
        self.metrics = None
        if settings.metrics_access != "off":
            from .metrics import Metrics

            self.metrics = Metrics(settings)
        # The notification rules, read once here (gunicorn.conf.py checked them).
        self.notify_rules = None
        if settings.notify_file:
            from .notify_rules import load

            self.notify_rules = load(settings.notify_file)

    def __call__(self):
        while self.pid != os.getpid():
            self._start_once()
        return self

    def _start_once(self):
        """One start per process, however many requests come before it ends: on PostgreSQL
        a start waits for the server, and each request that came meanwhile made a store, a
        pool and a listener of its own, all but the last left open (8 listeners for 2
        workers after a burst of 200 first requests; a burst of 1,000 watchers used up the
        server's connections). Those requests wait for the start under way, and get what
        it raised if it failed; if its greenlet was killed instead, one of them starts."""
        pid = os.getpid()
        if self._starting is not None and self._starting[0] == pid:
            self._starting[1].get()  # raises what the start raised
            return
        started = gevent.event.AsyncResult()
        self._starting = (pid, started)
        try:
            self._start()
        except Exception as error:
            started.set_exception(error)
            raise
        finally:
            self._starting = None
            if not started.ready():
                started.set(None)  # started, or its greenlet killed: the others look again

    def _open_stores(self):
        """The store, and the group committer's store (the same one on PostgreSQL)."""
        settings = self.settings
        if settings.database_url:
            # Imported here, in the worker, after gevent has patched it (store/postgres.py).
            from .store.postgres import PostgresStore

            # A pool of connections, whose waits for the server yield to the other
            # greenlets: the group committer runs on the event loop, on the same pool.
            store = PostgresStore(
                settings.database_url,
                sleep=gevent.sleep,
                max_attempts=settings.max_attempts,
                migrate_schema=False,
                bounded=lambda seconds: gevent.Timeout(seconds, TimeoutError),
            )
            return store, store
        store = Store(settings.db, settings.synchronous, sleep=gevent.sleep, max_attempts=settings.max_attempts)
        try:
            # The group committer writes on a connection of its own, and waits for the
            # write lock (and commits on a slow disk) in a thread of its own.
            writer = Store(
                settings.db,
                settings.synchronous,
                sleep=gevent.sleep,
                max_attempts=settings.max_attempts,
                writers_queue=True,
                thread=gevent.threadpool.ThreadPool(1),
            )
        except BaseException:
            store.close()
            raise
        return store, writer

    def _start(self):
        settings = self.settings
        store, writer = self._open_stores()
        try:
            # The hub reads where the store stands: when the database does not answer (a
            # server that hangs or restarts), the start fails, and the worker's next
            # request starts again.
            hub = Hub(store, settings.wakeup_interval, settings.page_bytes, alive=lambda: self.alive())
        except BaseException:
            # What was opened is closed, in a greenlet of its own (a pool's close waits for
            # its threads, some of them on the server that does not answer). Left to the
            # garbage collector, a PostgreSQL pool stopped its own threads from within one
            # of them: a traceback in the log.
            gevent.spawn(_close, store, writer)  # the same store twice on PostgreSQL: closed once
            raise
        self.store, self.writer, self.hub = store, writer, hub
        self.committer = GroupCommitter(
            self.writer,
            self.hub.committed,
            settings.max_channels,
            settings.max_agents,
            settings.max_database,
        )
        self.retention = run_retention(self.store, settings, alive=lambda: self.alive())
        self.notifier = None
        if self.notify_rules is not None and self.notify_rules.rules:
            from .notify import Notifier

            self.notifier = Notifier(
                self.notify_rules, self.store, self.committer.run, self.metrics, alive=lambda: self.alive()
            )
            self.notifier.start()
        self.pid = os.getpid()


def _close(*stores):
    for store in stores:
        try:
            store.close()
        except Exception:  # closing what failed to start: nothing more to tell
            pass


settings = Settings.from_env()
runtime = Runtime(settings)
# The limits were made by the gunicorn master before it forked (gunicorn.conf.py), so
# every worker counts in the same table.
app = ResponseHeaders(create_app(settings, runtime, limits.shared()), settings)
