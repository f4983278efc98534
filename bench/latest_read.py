"""Scenario: read the latest 50 messages of a channel holding 1,000 (~1 KiB each) from 32
keep-alive clients (wrk)."""

from brokers import Client, fill_channel, running_broker
from wrk_runner import run_wrk

CHANNEL = "bench-latest"
FILL = 1000
MESSAGE_BYTES = 1024
CONNECTIONS = 32


def run(report, workdir, seconds=10, threads=1):
    with running_broker(workdir, "latest-read") as broker:
        fill_channel(broker.port, CHANNEL, FILL, ("channel history " * 64)[:MESSAGE_BYTES])
        path = f"/messages/{CHANNEL}?limit=50"
        client = Client(broker.port)
        page = client.get_json(path)
        client.close()
        if page["count"] != 50:
            raise RuntimeError(f"latest read returned {page['count']} messages, not 50")
        run_wrk(broker.url + path, connections=CONNECTIONS, seconds=1)
        result = run_wrk(broker.url + path, connections=CONNECTIONS, threads=threads, seconds=seconds)
    served = result.requests - result.failed
    reply_bytes = result.bytes // max(result.requests, 1)
    report.details["latest_read"] = {
        "wrk": result.as_dict(),
        "channel_messages": FILL,
        "message_bytes": MESSAGE_BYTES,
        "reply_bytes": reply_bytes,
        "connections": CONNECTIONS,
        "wrk_threads": threads,
    }
    latency = result.latency_ms
    report.add(
        "latest-50 read rate",
        served / result.seconds,
        "req/s",
        3000,
        at_least=True,
        note=f"~{reply_bytes // 1024} KiB replies, p50 {latency['50']:.1f} ms, p99 {latency['99']:.1f} ms, "
        f"{result.failed} errors",
    )
