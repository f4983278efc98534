"""Scenario: publish ~1 KiB messages from 32 keep-alive clients (wrk), then check through
GET /status that every accepted post was stored. The broker runs with its defaults (FULL
durability, the access log on, the rate limiter on every post with buckets the load does
not empty), and the stack's floor (bench/floor.py: the same Bottle and gunicorn answering
a hello POST) is measured just before it, so the ratio compares like with like. The
`secured` variant posts with a bearer token (mode write-requires-token) too, so the
difference is what checking a token on every request costs."""

import subprocess
import time

import floor
from broker_process import BIN
from brokers import running_broker, stored_messages
from wrk_runner import run_wrk

CHANNEL = "bench-publish"
MESSAGE_BYTES = 1024
CONNECTIONS = 32
SENDER = "bench-publisher"
SECRET = "bench-token-0123456789-0123456789-0123456789"
# The rate limiter on, as by default, with buckets (requests and bytes) the load does not
# empty: one address sends everything here.
RATE_LIMITED = {
    "AGENT_COMMS_RATE_LIMIT": "1000000",
    "AGENT_COMMS_RATE_BURST": "1000000",
    "AGENT_COMMS_BYTE_RATE": "10G",
    "AGENT_COMMS_BYTE_BURST": "10G",
}
SECURED = {**RATE_LIMITED, "AGENT_COMMS_AUTH": "write-requires-token"}
# Publish with the defaults must reach this share of the floor's rate.
FLOOR_SHARE = 0.8


def run(report, workdir, seconds=10, threads=1, secured=False):
    name = "publish (token + rate limit)" if secured else "publish"
    if not secured:
        floor_result, floor_idle = floor.measure(workdir, seconds, threads, MESSAGE_BYTES, CONNECTIONS)
        report.details["floor"] = {"wrk": floor_result.as_dict(), "idle_pss_mb": floor_idle}
        report.add(
            "floor: hello POST on the same stack",
            floor_result.rate,
            "req/s",
            None,
            at_least=True,
            note=f"p99 {floor_result.latency_ms['99']:.1f} ms; idle PSS {floor_idle:.1f} MB (master + 2 workers)",
        )
        old_result, old_memory = floor.measure_old_design(workdir, seconds, threads, MESSAGE_BYTES, CONNECTIONS)
        old_accepted = old_result.requests - old_result.errors["status"]
        report.details["old_design"] = {"wrk": old_result.as_dict(), "pss_mb": old_memory}
        report.add(
            "the replaced broker.py's design (old_design.py), same load",
            old_accepted / old_result.seconds,
            "msg/s",
            None,
            at_least=True,
            note=f"p99 {old_result.latency_ms['99']:.0f} ms, {old_result.failed} errors; PSS {old_memory:.1f} MB",
        )
    with running_broker(
        workdir, "publish-secured" if secured else "publish", env=SECURED if secured else RATE_LIMITED
    ) as broker:
        url = f"{broker.url}/messages/{CHANNEL}"
        token = []
        if secured:
            for agent in (SENDER, "bench-warmup"):
                secret = f"{SECRET}-{agent}"
                subprocess.run(
                    [str(BIN / "agent-comms-broker"), "token", "add", agent, "--secret-stdin", "--db", broker.db_path],
                    input=secret,
                    capture_output=True,
                    text=True,
                    check=True,
                )
            token = [f"{SECRET}-{SENDER}"]
        warmup = [MESSAGE_BYTES, "bench-warmup", *([f"{SECRET}-bench-warmup"] if secured else [])]
        run_wrk(url, "publish.lua", warmup, connections=CONNECTIONS, seconds=1)
        time.sleep(0.5)
        before = stored_messages(broker.port)
        result = run_wrk(
            url,
            "publish.lua",
            [MESSAGE_BYTES, SENDER, *token],
            connections=CONNECTIONS,
            threads=threads,
            seconds=seconds,
        )
        time.sleep(1.0)  # posts still in flight when wrk stopped counting
        stored = stored_messages(broker.port) - before
    accepted = result.requests - result.errors["status"]
    report.details[name] = {
        "wrk": result.as_dict(),
        "accepted": accepted,
        "stored": stored,
        "message_bytes": MESSAGE_BYTES,
        "connections": CONNECTIONS,
        "wrk_threads": threads,
    }
    rate = accepted / result.seconds
    note = f"{accepted} accepted in {result.seconds:.1f} s, {result.failed} errors"
    if secured:
        report.add(f"{name} rate", rate, "msg/s", 3000, at_least=True, note=note)
    else:
        report.add(
            f"{name} rate, share of the floor",
            rate / floor_result.rate,
            "x",
            FLOOR_SHARE,
            at_least=True,
            note=f"{rate:,.0f} msg/s vs the floor's {floor_result.rate:,.0f}; {note}",
        )
    report.add(
        f"{name} p99 latency",
        result.latency_ms["99"],
        "ms",
        25,
        at_least=False,
        note=f"p50 {result.latency_ms['50']:.1f} ms, max {result.latency_ms['max']:.1f} ms",
    )
    # At most one post per connection may be stored without wrk having counted its reply
    # (it was in flight when the run ended).
    report_stored(report, name, accepted, stored)
    if stored - accepted > CONNECTIONS + result.failed:
        report.errors.append(f"{name}: {stored - accepted} more messages stored than wrk saw answered")


def report_stored(report, name, accepted, stored):
    """The figure that every post wrk saw accepted (a 201) is in the store."""
    report.add(
        f"{name}: accepted posts missing from the store",
        max(accepted - stored, 0),
        "msgs",
        0,
        at_least=False,
        note=f"stored {stored}, wrk counted {accepted} (in flight: {stored - accepted})",
    )


# Batch publish: posts of BATCH_COUNT messages of BATCH_BYTES each, from BATCH_CONNECTIONS
# keep-alive clients, with the same defaults (the limiter on, its buckets not emptied).
BATCH_COUNT = 100
BATCH_BYTES = 256
BATCH_CONNECTIONS = 8
BATCH_TARGET = 50_000


def run_batch(report, workdir, seconds=10, threads=1):
    results = {}
    with running_broker(workdir, "batch", env=RATE_LIMITED) as broker:
        url = f"{broker.url}/messages/{CHANNEL}-batch"
        run_wrk(url, "batch.lua", [BATCH_COUNT, BATCH_BYTES, "bench-warmup"], connections=BATCH_CONNECTIONS, seconds=1)
        for size in (BATCH_BYTES, MESSAGE_BYTES):
            before = stored_messages(broker.port)
            result = run_wrk(
                url,
                "batch.lua",
                [BATCH_COUNT, size, "bench-batch"],
                connections=BATCH_CONNECTIONS,
                threads=threads,
                seconds=seconds,
            )
            time.sleep(1.0)
            stored = stored_messages(broker.port) - before
            accepted = (result.requests - result.errors["status"]) * BATCH_COUNT
            results[size] = (result, accepted, stored)
    report.details["batch"] = {
        str(size): {"wrk": result.as_dict(), "accepted": accepted, "stored": stored}
        for size, (result, accepted, stored) in results.items()
    }
    result, accepted, stored = results[BATCH_BYTES]
    report.add(
        f"batch publish, {BATCH_COUNT} messages of {BATCH_BYTES} B a post",
        accepted / result.seconds,
        "msg/s",
        BATCH_TARGET,
        at_least=True,
        note=f"{BATCH_CONNECTIONS} clients, p99 of a post {result.latency_ms['99']:.1f} ms, {result.failed} errors",
    )
    big, big_accepted, _ = results[MESSAGE_BYTES]
    report.add(
        f"batch publish, {BATCH_COUNT} messages of {MESSAGE_BYTES} B a post",
        big_accepted / big.seconds,
        "msg/s",
        None,
        at_least=True,
        note=f"the same with ~1 KiB messages; p99 of a post {big.latency_ms['99']:.1f} ms",
    )
    missing = sum(max(accepted - stored, 0) for _, accepted, stored in results.values())
    report.add("batch publish: accepted messages missing from the store", missing, "msgs", 0, at_least=False)
