"""Prometheus metrics: what the broker counts as it works, summed over every worker.

prometheus_client's multiprocess mode keeps each process's counters in memory-mapped files
of one directory (PROMETHEUS_MULTIPROC_DIR), and a scrape of any worker reads them all.
The gunicorn master makes the directory (prepare_directory, from gunicorn.conf.py, before
anything imports prometheus_client), empties it at each start, and drops a dead worker's
live gauges (worker_gone). What the database already knows (messages, agents, queues,
its size) is read at scrape time instead of counted (DatabaseFigures).

Channel names become label values only up to AGENT_COMMS_METRICS_CHANNELS of them in each
worker; later channels count as "other", and every inbox as "@inbox" (its name is an
agent's), so neither a flood of channels nor the agents' names reach Prometheus.
"""

import os
import shutil
import tempfile
import time

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The master whose directory MULTIPROCESS_ENV names: a reload (SIGHUP) of the same master
# reads gunicorn.conf.py again and keeps it.
OWNER_ENV = "AGENT_COMMS_METRICS_OWNER"
OTHER = "other"
INBOX = "@inbox"
# Request latency buckets, seconds: a post with its fsync takes a few ms, a page of reads
# less; long-polls take up to their wait.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Streams last as long as their client: their time is no latency.
STREAM_ROUTES = frozenset({"/stream", "/stream/<channel>"})
UNMATCHED = "unmatched"
# A method label is one of these, or "other": a client cannot make up label values.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def prepare_directory():
    """The master's directory for the workers' metric files: new and empty, named in the
    environment every worker inherits (on a reload, the one it made). Returns its path."""
    path = os.environ.get(MULTIPROCESS_ENV)
    if path and os.environ.get(OWNER_ENV) == str(os.getpid()) and os.path.isdir(path):
        return path
    path = tempfile.mkdtemp(prefix="agent-comms-metrics-")
    os.environ[MULTIPROCESS_ENV] = path
    os.environ[OWNER_ENV] = str(os.getpid())
    return path


def remove_directory(path):
    shutil.rmtree(path, ignore_errors=True)


def worker_gone(pid):
    """A worker exited: its open streams and long-polls no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


class Metrics:
    """The broker's counters and gauges, made once in the master (so every worker shares
    the definitions) and written to by each worker."""

    def __init__(self, settings):
        from prometheus_client import Counter, Gauge, Histogram

        self.max_channels = settings.metrics_channels
        self._labeled = set()
        self.stored_messages = Counter(
            "agent_comms_messages_stored", "Messages stored (repeats of an idempotency key not counted).", ["channel"]
        )
        self.requests = Counter("agent_comms_http_requests", "HTTP requests answered.", ["route", "method", "status"])
        self.latency = Histogram(
            "agent_comms_http_request_duration_seconds",
            "Time to answer a request (event streams left out; long-polls count their wait).",
            ["route"],
            buckets=LATENCY_BUCKETS,
        )
        self.rate_limited = Counter("agent_comms_rate_limited_requests", "Requests refused with 429.", ["route"])
        self.waiting = Gauge(
            "agent_comms_open_waits",
            "Open event streams and waiting long-polls.",
            ["kind"],
            multiprocess_mode="livesum",
        )
        self.redeliveries = Counter(
            "agent_comms_task_redeliveries", "Tasks handed out again after a release or an ended lease.", ["channel"]
        )
        self.dead_tasks = Counter("agent_comms_tasks_given_up", "Tasks released as dead.", ["channel"])
        self.notifications = Counter(
            "agent_comms_notifications",
            "Notifications sent, by rule and outcome (delivered, failed).",
            ["rule", "outcome"],
        )

    def channel_label(self, channel):
        if channel.startswith("@"):
            return INBOX
        if channel in self._labeled:
            return channel
        if len(self._labeled) < self.max_channels:
            self._labeled.add(channel)
            return channel
        return OTHER

    def stored(self, channel, count=1):
        if count:
            self.stored_messages.labels(self.channel_label(channel)).inc(count)

    def request(self, environ, status, seconds):
        """One answered request (from the access logger, which sees every one)."""
        route = environ.get("bottle.route")
        rule = route.rule if route is not None else UNMATCHED
        method = environ.get("REQUEST_METHOD")
        self.requests.labels(rule, method if method in METHODS else OTHER, str(status)).inc()
        if str(status) == "429":
            self.rate_limited.labels(rule).inc()
        if rule not in STREAM_ROUTES:
            self.latency.labels(rule).observe(seconds)

    def redelivered(self, channel):
        self.redeliveries.labels(self.channel_label(channel)).inc()

    def given_up(self, channel):
        self.dead_tasks.labels(self.channel_label(channel)).inc()

    def notified(self, rule, outcome):
        self.notifications.labels(rule, outcome).inc()


class DatabaseFigures:
    """A collector of what the database holds, read when Prometheus scrapes."""

    def __init__(self, store, settings, metrics):
        self.store = store
        self.settings = settings
        self.metrics = metrics

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        now = time.time()
        messages, channels, agents, active = self.store.totals(now - self.settings.active_window)
        size = self.store.size_bytes()
        for name, text, value in (
            ("agent_comms_messages", "Messages held (after retention).", messages),
            ("agent_comms_channels", "Channels that hold messages.", channels),
            ("agent_comms_agents", "Agents the broker knows.", agents),
            ("agent_comms_agents_active", "Agents seen within AGENT_COMMS_ACTIVE_WINDOW.", active),
            ("agent_comms_database_bytes", "Bytes of the database file and its write-ahead log.", size),
        ):
            yield GaugeMetricFamily(name, text, value=value)
        tasks = GaugeMetricFamily(
            "agent_comms_queue_tasks", "Tasks of each queue by state.", labels=["channel", "state"]
        )
        merged = {}
        for channel, counts in self.store.queue_totals(now):
            label = self.metrics.channel_label(channel)
            for state, count in counts.items():
                merged[label, state] = merged.get((label, state), 0) + count
        for (label, state), count in sorted(merged.items()):
            tasks.add_metric([label, state], count)
        yield tasks
        failing = GaugeMetricFamily(
            "agent_comms_notification_failures", "Failed deliveries in a row, by rule (0: working).", labels=["rule"]
        )
        for rule, (_, _, failures, _, _) in sorted(self.store.notify_rules().items()):
            failing.add_metric([rule], failures)
        yield failing


def exposition(store, settings, metrics):
    """The text Prometheus reads: every worker's counters, and the database's figures."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(DatabaseFigures(store, settings, metrics))
    return generate_latest(registry)
