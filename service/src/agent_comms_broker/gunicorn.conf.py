"""gunicorn settings shared by every way of running the broker: `agent-comms-broker serve`
(make run), Docker and systemd all start gunicorn with this file. Values come from the
AGENT_COMMS_* environment (see config.py); gunicorn's own flags still override them."""

import gc
import logging
import math
import os

from agent_comms_broker import accesslog as accesslog_format
from agent_comms_broker import balance, limits, metrics, notify_rules, preflight
from agent_comms_broker.config import ConfigError, Settings

try:
    _settings = Settings.from_env()
    # A mistake in the notification rules stops the broker here, with one line.
    if _settings.notify_file:
        notify_rules.load(_settings.notify_file)
except (ConfigError, notify_rules.NotifyConfigError) as error:
    raise SystemExit(f"agent-comms-broker: {error}") from None

wsgi_app = "agent_comms_broker.wsgi:app"
# The master imports the app before it forks, so the workers share its pages (see
# pre_fork). A reload (SIGHUP) starts new workers from the same code: a new version needs
# a restart, which is what the Ansible role and the unit do on an upgrade.
preload_app = True
# Made here, in the master, so every forked worker shares the rate and stream counters,
# and the table of how many connections each worker holds.
limits.shared()
balance.shared()
# The workers' metric files, in a directory of this master's (before the app, and with it
# prometheus_client, is imported).
_metrics_directory = metrics.prepare_directory() if _settings.metrics_access != "off" else None
bind = [_settings.bind]
workers = _settings.workers
# gevent (see worker.py): every SSE stream and long-poll is a greenlet of a few KiB, not a
# thread, so a worker holds thousands of idle watchers while it keeps serving posts.
worker_class = "agent_comms_broker.worker.BrokerWorker"
# As many as this process may open files for (and, where it can, the soft limit is raised).
worker_connections = limits.connections_within_file_limit(_settings.worker_connections)
timeout = 30
graceful_timeout = int(_settings.graceful_timeout)
# A request's head must arrive within this, also the next one on a keep-alive connection.
keepalive = max(1, math.ceil(_settings.request_timeout))  # gunicorn takes whole seconds
# Requests with a longer head get a JSON 4xx before the app sees them.
limit_request_line = 4094
limit_request_fields = _settings.max_headers
limit_request_field_size = _settings.max_header
if _settings.tls:
    certfile = _settings.tls_cert
    keyfile = _settings.tls_key

    def ssl_context(config, default_ssl_context_factory):
        """gunicorn's context, with each handshake done where the worker tracks it."""
        from agent_comms_broker.worker import LazyHandshake

        return LazyHandshake(default_ssl_context_factory())


proc_name = "agent-comms-broker"
# gunicorn 24+ opens a control socket under $HOME by default: one path shared by every
# broker on the host, and a write outside the state directory. The broker needs none.
control_socket_disable = True
loglevel = _settings.log_level
errorlog = "-"
accesslog = _settings.access_log or None
# The access log's lines are written in batches, a few times a second (accesslog.py).
logger_class = "agent_comms_broker.accesslog.AccessLogger"
access_log_format = accesslog_format.FORMAT


def on_starting(server):
    """In the master, before any socket or worker: one clear line instead of a traceback."""
    preflight.check(_settings.db, server.cfg.bind, _settings)


def child_exit(server, worker):
    """A worker is gone, even one killed outright: its open streams no longer count."""
    limits.shared().forget_worker(worker.pid)
    balance.shared().free_row(getattr(worker, "balance_row", None))
    if _metrics_directory is not None:
        metrics.worker_gone(worker.pid)


def on_exit(server):
    if _metrics_directory is not None:
        metrics.remove_directory(_metrics_directory)


def post_worker_init(worker):
    """Streams and long-polls end as soon as this worker is told to stop; the broker's own
    log lines go where gunicorn's go, at the same level."""
    from agent_comms_broker.wsgi import runtime

    ours = logging.getLogger("agent_comms_broker")
    ours.handlers = list(worker.log.error_log.handlers)
    ours.setLevel(worker.log.error_log.level)
    ours.propagate = False

    if runtime.metrics is not None:  # every answered request, as the access log sees it
        worker.log.observer = runtime.metrics.request
    runtime.alive = lambda: worker.alive
    runtime.connections = lambda: len(worker.connections)
    runtime.max_connections = worker.worker_connections
    worker.streams_parked = lambda: len(runtime.hub.parked) if runtime.pid == os.getpid() else 0


def pre_fork(server, worker):
    """What the master holds now (the app, imported once) stays shared with the workers:
    frozen, its objects are never touched by a worker's garbage collector, which would
    otherwise copy every page holding one into each worker; and the free pages of its heap
    are given back (worker.trim_free_memory). The worker's row in the table of
    connections held (balance.py)."""
    from agent_comms_broker.worker import trim_free_memory

    worker.balance_row = balance.shared().give_row()
    gc.freeze()
    trim_free_memory()


def worker_exit(server, worker):
    """The access log's last lines, before the worker is gone."""
    flush = getattr(worker.log, "flush", None)
    if flush is not None:
        flush()
