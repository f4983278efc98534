"""Scenario: task queue throughput. Eight worker agents (wrk, one thread and one keep-alive
connection each, bench/lua/queue.lua) loop as `agent-chat work` does: take a task, then
mark it done with a short reply and take the next in the same request (`"next"`), as fast
as the broker answers, for a fixed time; each task is taken once and done once.
Afterwards the queue's counts must show every finished pair done once and at most one
task per worker still claimed (the pair a run's end cut short)."""

from brokers import Client, running_broker
from wrk_runner import run_wrk

CHANNEL = "bench-queue"
WORKERS = 8
# Tasks posted before the run: more than the run can work, so no taker waits for work.
PREFILL = 60000
BATCH = 500


def run(report, workdir, seconds=10):
    with running_broker(workdir, "queue") as broker:
        client = Client(broker.port)
        for start in range(0, PREFILL, BATCH):
            batch = [{"sender": "bench-poster", "message": f"task {n}"} for n in range(start, start + BATCH)]
            client.post_json(f"/messages/{CHANNEL}", batch)
        url = f"{broker.url}/queue/{CHANNEL}/take"
        result = run_wrk(url, "queue.lua", connections=WORKERS, threads=WORKERS, seconds=seconds)
        view = client.get_json(f"/queue/{CHANNEL}")
        client.close()
    counts = view["counts"]
    pairs = counts["done"]
    latency = result.latency_ms
    report.details["queue"] = {
        "workers": WORKERS,
        "wrk": result.as_dict(),
        "counts": counts,
        "prefill": PREFILL,
    }
    report.add(
        "take+done pairs, 8 workers",
        pairs / result.seconds,
        "pairs/s",
        1500,
        at_least=True,
        note=f"{pairs} tasks done in {result.seconds:.1f} s; a request's p50 {latency['50']:.1f} ms, "
        f"p99 {latency['99']:.1f} ms; {result.failed} errors",
    )
    report.add(
        "queue: errors, and tasks left claimed past one per worker",
        result.failed + max(0, counts["claimed"] - WORKERS),
        "",
        0,
        at_least=False,
        note=f"queue counts {counts}, {result.requests} requests",
    )
