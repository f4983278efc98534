"""Scenario: a post's latency while the broker is busy: 1,000 SSE watchers of one channel
receive every post (bench/watchers.py), and a reader pages through a channel of 1,000,000
messages (`after=` cursor, 500 a page, from the start again when it reaches the end), all
at once. The posts go at a steady rate, each timed from send to its 201."""

import statistics
import threading
import time

import fanout
from big_store import build_store
from brokers import Client, running_broker

HISTORY = "bench-history-00"
WATCHERS, MESSAGES, RATE = 1000, 200, 20.0
PAGE = 500


class Pager(threading.Thread):
    """Pages through the history channel until told to stop."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.stopping = threading.Event()
        self.pages = 0
        self.error = None

    def run(self):
        client = Client(self.port)
        cursor = 0
        try:
            while not self.stopping.is_set():
                page = client.get_json(f"/messages/{HISTORY}?after={cursor}&limit={PAGE}")
                self.pages += 1
                cursor = page["cursor"] if page["messages"] else 0
        except Exception as error:  # reported with the figures
            self.error = f"{type(error).__name__}: {error}"
        finally:
            client.close()


def run(report, workdir, total=1_000_000):
    db = workdir / "busy-post" / "messages.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    build_store(db, total, channels=1)
    print(f"  built a channel of {total:,} messages in {time.monotonic() - started:.1f} s", flush=True)
    timeout = MESSAGES / RATE + 30
    with running_broker(workdir, "busy-post", db_path=db) as broker:
        watchers = fanout.WatchersProcess(broker.port, WATCHERS, MESSAGES, timeout)
        pager = Pager(broker.port)
        try:
            connected = watchers.next_report(timeout + 10)
            pager.start()
            time.sleep(1.0)
            post_ms = fanout.post_steadily(broker.port, MESSAGES, RATE)
            delivered = watchers.next_report(timeout + 10)
        finally:
            pager.stopping.set()
            watchers.close()
            pager.join(10)
    post_ms.sort()
    p99 = post_ms[int(len(post_ms) * 0.99) - 1]
    report.details["busy_post"] = {
        "connected": connected,
        "delivered": {name: value for name, value in delivered.items() if not name.startswith("histogram")},
        "post_ms": [round(ms, 2) for ms in post_ms],
        "reader_pages": pager.pages,
        "reader_error": pager.error,
    }
    if pager.error:
        report.errors.append(f"busy-post: the reader failed: {pager.error}")
    report.add(
        "post p99 while 1,000 watchers receive and a reader pages 1M messages",
        p99,
        "ms",
        25,
        at_least=False,
        note=f"{MESSAGES} posts at {RATE:g}/s, median {statistics.median(post_ms):.1f} ms; the reader read "
        f"{pager.pages} pages of {PAGE}; watchers with every post once, in order: "
        f"{delivered['complete']} of {WATCHERS}",
    )
    report.add(
        "busy-post: watchers with every post once, in order",
        delivered["complete"],
        "watchers",
        WATCHERS,
        at_least=True,
    )
