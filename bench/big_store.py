"""Scenario: reads of a store holding 1,000,000 messages against the same reads of a small
one: a cursor read near a channel's end (after=ID) and the latest 50, timed one after
another over keep-alive connections to both brokers, in interleaved rounds."""

import statistics
import time

from agent_comms_broker.store import Store
from brokers import Client, running_broker

BATCH = 10_000
MESSAGE_BYTES = 256
ROUNDS = 10
READS_PER_ROUND = 100
TARGET_RATIO = 1.5


def build_store(path, total, channels):
    """A database of `total` messages spread round-robin over `channels` channels, written
    straight through the broker's Store (far faster than posting them)."""
    store = Store(str(path), "NORMAL")
    text = ("stored history " * (MESSAGE_BYTES // 15 + 1))[:MESSAGE_BYTES]
    try:
        for start in range(0, total, BATCH):
            store.append(
                [(channel_name(i % channels), f"agent-{i % 50}", text) for i in range(start, min(total, start + BATCH))]
            )
    finally:
        store.close()


def channel_name(number):
    return f"bench-history-{number:02d}"


class Reads:
    """The two reads of one channel of one broker, and their timings (ms)."""

    def __init__(self, broker, channel):
        self.client = Client(broker.port)
        oldest_of_51 = self.client.get_json(f"/messages/{channel}?limit=51")["messages"][0]["id"]
        self.paths = {
            "cursor": f"/messages/{channel}?after={oldest_of_51}&limit=50",
            "latest": f"/messages/{channel}?limit=50",
        }
        for path in self.paths.values():
            if self.client.get_json(path)["count"] != 50:
                raise RuntimeError(f"GET {path} did not return 50 messages")
        self.timings = {kind: [] for kind in self.paths}

    def round(self, reads):
        for kind, path in self.paths.items():
            for _ in range(reads):
                start = time.perf_counter()
                status, _ = self.client.request("GET", path)
                self.timings[kind].append((time.perf_counter() - start) * 1000)
                if status != 200:
                    raise RuntimeError(f"GET {path}: {status}")

    def medians(self):
        return {kind: statistics.median(times) for kind, times in self.timings.items()}


def run(report, workdir, total=1_000_000, small=1_000):
    started = time.monotonic()
    big_db = workdir / "big-store" / "messages.db"
    small_db = workdir / "small-store" / "messages.db"
    for path in (big_db, small_db):
        path.parent.mkdir(parents=True, exist_ok=True)
    build_store(big_db, total, channels=20)
    build_store(small_db, small, channels=5)
    built = time.monotonic() - started
    print(f"  built {total:,} + {small:,} message stores in {built:.1f} s", flush=True)
    with (
        running_broker(workdir, "big-store", db_path=big_db) as big,
        running_broker(workdir, "small-store", db_path=small_db) as tiny,
    ):
        big_reads, small_reads = Reads(big, channel_name(7)), Reads(tiny, channel_name(3))
        for reads in (big_reads, small_reads):
            reads.round(20)  # warm-up
            reads.timings = {kind: [] for kind in reads.paths}
        for _ in range(ROUNDS):
            small_reads.round(READS_PER_ROUND)
            big_reads.round(READS_PER_ROUND)
    big_ms, small_ms = big_reads.medians(), small_reads.medians()
    report.details["big_store"] = {
        "messages": total,
        "small_messages": small,
        "message_bytes": MESSAGE_BYTES,
        "build_seconds": round(built, 1),
        "reads_each": ROUNDS * READS_PER_ROUND,
        "median_ms": {"big": big_ms, "small": small_ms},
        "p90_ms": {"big": _p90(big_reads), "small": _p90(small_reads)},
    }
    for kind, label in (("cursor", "cursor read (after=ID, 50)"), ("latest", "latest-50 read")):
        big, tiny = big_ms[kind], small_ms[kind]
        report.add(
            f"1M store: {label} time vs small store",
            big / tiny,
            "x",
            TARGET_RATIO,
            at_least=False,
            note=f"median {big:.2f} ms vs {tiny:.2f} ms (~{1000 / big:.0f} vs ~{1000 / tiny:.0f} sequential reads/s)",
        )


def _p90(reads):
    return {kind: statistics.quantiles(times, n=10)[-1] for kind, times in reads.timings.items()}
