"""The WSGI entry point: `gunicorn -c gunicorn.conf.py agent_comms_broker.wsgi:app`.

Each gunicorn worker imports this after forking, so each has its own SQLite connection,
hub and group committer, created on its first request.
"""

import os
import time

import gevent
import gevent.threadpool

from . import limits
from .config import Settings
from .headers import ResponseHeaders
from .http.app import create_app
from .live import GroupCommitter, Hub, run_retention
from .store import Store


class Runtime:
    """This process's store, live-delivery hub and group committer."""

    def __init__(self, settings):
        self.settings = settings
        self.pid = None
        # Set by gunicorn's post_worker_init hook: lets streams end when the worker stops.
        self.alive = lambda: True

    def __call__(self):
        if self.pid != os.getpid():
            self._start()
        return self

    def _start(self):
        settings = self.settings
        self.store = Store(settings.db, settings.synchronous, sleep=gevent.sleep, max_attempts=settings.max_attempts)
        self.hub = Hub(self.store, settings.wakeup_interval, settings.page_bytes, alive=lambda: self.alive())
        # The group committer writes on a connection of its own, in a thread of its own.
        self.writer = Store(
            settings.db, settings.synchronous, sleep=time.sleep, max_attempts=settings.max_attempts, writers_queue=True
        )
        self.committer = GroupCommitter(
            self.writer,
            self.hub.committed,
            settings.max_channels,
            settings.max_agents,
            settings.max_database,
            call=gevent.threadpool.ThreadPool(1).apply,
        )
        self.retention = run_retention(self.store, settings, alive=lambda: self.alive())
        self.pid = os.getpid()


settings = Settings.from_env()
runtime = Runtime(settings)
# The limits were made by the gunicorn master before it forked (gunicorn.conf.py), so
# every worker counts in the same table.
app = ResponseHeaders(create_app(settings, runtime, limits.shared()), settings)
