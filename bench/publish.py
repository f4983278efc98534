"""Scenario: publish ~1 KiB messages from 32 keep-alive clients (wrk), then check through
GET /status that every accepted post was stored. The `secured` variant posts with a bearer
token (mode write-requires-token) through the rate limiter (a limit too high to refuse),
so the difference is what checking a token and a bucket on every request costs."""

import subprocess
import time

from broker_process import BIN
from brokers import running_broker, stored_messages
from wrk_runner import run_wrk

CHANNEL = "bench-publish"
MESSAGE_BYTES = 1024
CONNECTIONS = 32
SENDER = "bench-publisher"
SECRET = "bench-token-0123456789-0123456789-0123456789"
SECURED = {
    "AGENT_COMMS_AUTH": "write-requires-token",
    "AGENT_COMMS_RATE_LIMIT": "1000000",
    "AGENT_COMMS_RATE_BURST": "1000000",
}


def run(report, workdir, seconds=10, threads=1, secured=False):
    name = "publish (token + rate limit)" if secured else "publish"
    with running_broker(
        workdir, "publish-secured" if secured else "publish", env=SECURED if secured else None
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
    report.add(
        f"{name} rate",
        accepted / result.seconds,
        "msg/s",
        3000,
        at_least=True,
        note=f"{accepted} accepted in {result.seconds:.1f} s, {result.failed} errors",
    )
    report.add(
        f"{name} p99 latency",
        result.latency_ms["99"],
        "ms",
        25,
        at_least=False,
        note=f"p50 {result.latency_ms['50']:.1f} ms, max {result.latency_ms['max']:.1f} ms",
    )
    # Every 201 must be in the store; at most one post per connection may be stored
    # without wrk having counted its reply (it was in flight when the run ended).
    report.add(
        f"{name}: accepted posts missing from the store",
        max(accepted - stored, 0),
        "msgs",
        0,
        at_least=False,
        note=f"stored {stored}, wrk counted {accepted} (in flight: {stored - accepted})",
    )
    if stored - accepted > CONNECTIONS + result.failed:
        report.errors.append(f"{name}: {stored - accepted} more messages stored than wrk saw answered")
