"""Scenario: the broker on PostgreSQL (a server started here with PostgreSQL's own
durable defaults: fsync, synchronous_commit on; tests/postgres_server.py), beside the
SQLite figures of the same run: publish (as the publish scenario: ~1 KiB from 32
keep-alive clients, the limiter on), publish with two broker nodes on one database (16
clients on each), the latest-50 read, and the fan-out to 1,000 watchers. The issue asks
for the figures, not targets: only every post stored, and every watcher served every
message once in order, must hold."""

import sys
import threading
from pathlib import Path

import fanout
from brokers import Client, fill_channel, running_broker, stored_messages
from publish import CHANNEL, CONNECTIONS, MESSAGE_BYTES, RATE_LIMITED, report_stored
from wrk_runner import run_wrk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from postgres_server import PostgresServer

READ_CHANNEL = "bench-latest"
READ_FILL = 1000


def run(report, workdir, seconds=10, threads=1):
    server = PostgresServer(durable=True).start()
    try:
        publish_one_node(report, workdir, server.new_database(), seconds, threads)
        publish_two_nodes(report, workdir, server.new_database(), seconds)
        latest_read(report, workdir, server.new_database(), seconds, threads)
        fanout.run(report, workdir, database_url=server.new_database())
    finally:
        server.stop()


def _posts(broker_url, seconds, connections, threads=1, sender="bench-publisher"):
    return run_wrk(
        f"{broker_url}/messages/{CHANNEL}",
        "publish.lua",
        [MESSAGE_BYTES, sender],
        connections=connections,
        threads=threads,
        seconds=seconds,
    )


def publish_one_node(report, workdir, url, seconds, threads):
    with running_broker(workdir, "publish-postgresql", env=RATE_LIMITED, database_url=url) as broker:
        _posts(broker.url, 1, CONNECTIONS, sender="bench-warmup")
        before = stored_messages(broker.port)
        result = _posts(broker.url, seconds, CONNECTIONS, threads)
        stored = stored_messages(broker.port) - before
    accepted = result.requests - result.errors["status"]
    report.details["publish-postgresql"] = {"wrk": result.as_dict(), "accepted": accepted, "stored": stored}
    report.add(
        "publish rate on PostgreSQL (one node)",
        accepted / result.seconds,
        "msg/s",
        None,
        at_least=True,
        note=f"p50 {result.latency_ms['50']:.1f} ms, p99 {result.latency_ms['99']:.1f} ms, {result.failed} errors",
    )
    report_stored(report, "publish on PostgreSQL", accepted, stored)


def publish_two_nodes(report, workdir, url, seconds):
    """Two nodes (2 workers each) on one database, 16 clients posting to each at once."""
    with (
        running_broker(workdir, "publish-postgresql-a", env=RATE_LIMITED, database_url=url) as a,
        running_broker(workdir, "publish-postgresql-b", env=RATE_LIMITED, database_url=url) as b,
    ):
        _posts(a.url, 1, CONNECTIONS // 2, sender="bench-warmup")
        before = stored_messages(a.port)
        results = {}

        def load(node):
            results[node.url] = _posts(node.url, seconds, CONNECTIONS // 2)

        loaders = [threading.Thread(target=load, args=(node,)) for node in (a, b)]
        for loader in loaders:
            loader.start()
        for loader in loaders:
            loader.join()
        stored = stored_messages(b.port) - before
    accepted = sum(result.requests - result.errors["status"] for result in results.values())
    rate = sum((result.requests - result.errors["status"]) / result.seconds for result in results.values())
    p99 = max(result.latency_ms["99"] for result in results.values())
    report.details["publish-postgresql-two-nodes"] = {
        "wrk": {node: result.as_dict() for node, result in results.items()},
        "accepted": accepted,
        "stored": stored,
    }
    report.add(
        "publish rate on PostgreSQL, two nodes on one database",
        rate,
        "msg/s",
        None,
        at_least=True,
        note=f"16 clients on each node; p99 {p99:.1f} ms (the slower node's)",
    )
    report_stored(report, "publish on two nodes", accepted, stored)


def latest_read(report, workdir, url, seconds, threads):
    with running_broker(workdir, "latest-read-postgresql", database_url=url) as broker:
        fill_channel(broker.port, READ_CHANNEL, READ_FILL, ("channel history " * 64)[:MESSAGE_BYTES])
        path = f"/messages/{READ_CHANNEL}?limit=50"
        client = Client(broker.port)
        if client.get_json(path)["count"] != 50:
            raise RuntimeError("the latest read on PostgreSQL did not return 50 messages")
        client.close()
        run_wrk(broker.url + path, connections=CONNECTIONS, seconds=1)
        result = run_wrk(broker.url + path, connections=CONNECTIONS, threads=threads, seconds=seconds)
    report.details["latest-read-postgresql"] = {"wrk": result.as_dict()}
    report.add(
        "latest-50 read rate on PostgreSQL",
        (result.requests - result.failed) / result.seconds,
        "req/s",
        None,
        at_least=True,
        note=f"p50 {result.latency_ms['50']:.1f} ms, p99 {result.latency_ms['99']:.1f} ms, {result.failed} errors",
    )
