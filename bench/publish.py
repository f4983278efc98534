"""Scenario: publish ~1 KiB messages from 32 keep-alive clients (wrk), then check through
GET /status that every accepted post was stored."""

import time

from brokers import running_broker, stored_messages
from wrk_runner import run_wrk

CHANNEL = "bench-publish"
MESSAGE_BYTES = 1024
CONNECTIONS = 32


def run(report, workdir, seconds=10, threads=1):
    with running_broker(workdir, "publish") as broker:
        url = f"{broker.url}/messages/{CHANNEL}"
        run_wrk(url, "publish.lua", [MESSAGE_BYTES, "bench-warmup"], connections=CONNECTIONS, seconds=1)
        time.sleep(0.5)
        before = stored_messages(broker.port)
        result = run_wrk(url, "publish.lua", [MESSAGE_BYTES], connections=CONNECTIONS, threads=threads, seconds=seconds)
        time.sleep(1.0)  # posts still in flight when wrk stopped counting
        stored = stored_messages(broker.port) - before
    accepted = result.requests - result.errors["status"]
    report.details["publish"] = {
        "wrk": result.as_dict(),
        "accepted": accepted,
        "stored": stored,
        "message_bytes": MESSAGE_BYTES,
        "connections": CONNECTIONS,
        "wrk_threads": threads,
    }
    report.add(
        "publish rate",
        accepted / result.seconds,
        "msg/s",
        3000,
        at_least=True,
        note=f"{accepted} accepted in {result.seconds:.1f} s, {result.failed} errors",
    )
    report.add(
        "publish p99 latency",
        result.latency_ms["99"],
        "ms",
        25,
        at_least=False,
        note=f"p50 {result.latency_ms['50']:.1f} ms, max {result.latency_ms['max']:.1f} ms",
    )
    # Every 201 must be in the store; at most one post per connection may be stored
    # without wrk having counted its reply (it was in flight when the run ended).
    report.add(
        "publish: accepted posts missing from the store",
        max(accepted - stored, 0),
        "msgs",
        0,
        at_least=False,
        note=f"stored {stored}, wrk counted {accepted} (in flight: {stored - accepted})",
    )
    if stored - accepted > CONNECTIONS + result.failed:
        report.errors.append(f"publish: {stored - accepted} more messages stored than wrk saw answered")
