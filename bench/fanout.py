"""Scenario: 1,000 SSE watchers of one channel (bench/watchers.py, in its own process) each
receive 100 messages posted at a steady rate; post-to-delivery latency, no message lost,
repeated or out of order; and the broker's memory while the watchers are connected (PSS of
the master and its workers, bench/memory.py). `fanout-10k` does the same with 10,000
watchers, with each worker's connections and the file limit raised as the README says."""

import json
import queue
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from brokers import Client, cpu_seconds, running_broker, worker_memory
from memory import pss_by_process

WATCHERS_CLIENT = Path(__file__).resolve().parent / "watchers.py"
CHANNEL = "bench-fanout"


class WatchersProcess:
    """bench/watchers.py as a child process, its JSON lines read by a thread."""

    def __init__(self, port, watchers, messages, timeout):
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(WATCHERS_CLIENT),
                "--port",
                str(port),
                "--channel",
                CHANNEL,
                "--watchers",
                str(watchers),
                "--messages",
                str(messages),
                "--timeout",
                str(timeout),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def next_report(self, timeout):
        try:
            report = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the watchers client said nothing for {timeout:.0f} s") from None
        if report is None:
            raise RuntimeError(f"the watchers client exited with {self.process.wait()}")
        return report

    def close(self):
        """Let the client drop its connections and exit; stopped if it is still busy."""
        self.say_close()
        self.stop()

    def say_close(self):
        try:
            self.process.stdin.write("close\n")
            self.process.stdin.close()
        except OSError:
            pass

    def stop(self):
        for stop in (None, self.process.terminate, self.process.kill):
            if stop is not None:
                stop()
            try:
                self.process.wait(5)
                return
            except subprocess.TimeoutExpired:
                continue


class Watchers:
    """The watchers spread over `processes` client processes (one process reading 10,000
    streams would measure its own delay more than the broker's); their reports merged."""

    def __init__(self, port, watchers, messages, timeout, processes=1):
        shares = [watchers // processes + (1 if n < watchers % processes else 0) for n in range(processes)]
        self.clients = [WatchersProcess(port, share, messages, timeout) for share in shares]
        self.pids = [client.process.pid for client in self.clients]

    def next_report(self, timeout):
        reports = [client.next_report(timeout) for client in self.clients]
        if len(reports) == 1:
            return reports[0]
        merged = dict(reports[0])
        for name, value in reports[0].items():
            if isinstance(value, int) and name not in ("expected_per_watcher", "distinct_id_sequences"):
                merged[name] = sum(report[name] for report in reports)
            elif isinstance(value, float):
                merged[name] = max(report[name] for report in reports)
            elif isinstance(value, list):
                merged[name] = [item for report in reports for item in report[name]][:5]
        if "histogram_after_post_ms" in merged:
            counts = {}
            for report in reports:
                for bucket, count in report["histogram_after_post_ms"].items():
                    counts[int(bucket)] = counts.get(int(bucket), 0) + count
            merged["histogram_after_post_ms"] = counts
            merged["latency_after_post_ms"] = _percentiles_of(counts)
        return merged

    def close(self):
        for client in self.clients:
            client.say_close()
        for client in self.clients:
            client.stop()


def _percentiles_of(counts):
    """p50, p90, p99 and max (upper edges of the 1 ms buckets) of a merged histogram."""
    total = sum(counts.values())
    found, seen = {}, 0
    wanted = [("50", 0.5), ("90", 0.9), ("99", 0.99)]
    for bucket in sorted(counts):
        seen += counts[bucket]
        while wanted and seen >= wanted[0][1] * total:
            found[wanted.pop(0)[0]] = bucket + 1
    found["max"] = max(counts) + 1
    found["samples"] = total
    return found


def post_steadily(port, count, rate):
    """Post `count` messages, one every 1/rate s, each carrying its sequence number and send
    time; returns how long each post took, in ms."""
    client = Client(port)
    took = []
    start = time.monotonic()
    try:
        for seq in range(count):
            pause = start + seq / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            sent = time.time()
            client.post_json(
                f"/messages/{CHANNEL}", {"sender": "bench-poster", "message": json.dumps({"seq": seq, "sent": sent})}
            )
            took.append((time.time() - sent) * 1000)
    finally:
        client.close()
    return took


class CpuMeter:
    """The share of one CPU each named process used since this meter was made."""

    def __init__(self, pids):
        self.pids = pids
        self.started = time.monotonic()
        self.before = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def read(self):
        elapsed = time.monotonic() - self.started
        return {name: round((cpu_seconds(pid) - self.before[name]) / elapsed, 3) for name, pid in self.pids.items()}


def run(
    report, workdir, watchers=1000, messages=100, rate=20.0, pss_target=64, env=None, processes=1, database_url=None
):
    """With database_url, on PostgreSQL: the figures are named so, and have no targets."""
    timeout = messages / rate + 30
    name = "fanout" if watchers <= 1000 else f"fanout-{watchers // 1000}k"
    on = ""
    if database_url:
        name, on, pss_target = f"{name}-postgresql", " on PostgreSQL", None
    with running_broker(workdir, name, env=env, database_url=database_url) as broker:
        at_start = worker_memory(broker)
        client = Watchers(broker.port, watchers, messages, timeout, processes)
        try:
            connected = client.next_report(timeout + 10)
            print(f"  {connected['watchers']} of {watchers} watchers connected in {connected['seconds']} s", flush=True)
            time.sleep(1.0)  # let the connection burst settle before measuring memory
            idle = worker_memory(broker)
            pss_idle = pss_by_process(broker.process.pid)
            clients = {f"watchers client {pid}": pid for pid in client.pids}
            busy = CpuMeter({**{f"worker {pid}": pid for pid in idle}, **clients})
            post_ms = post_steadily(broker.port, messages, rate)
            delivered = client.next_report(timeout + 10)
            cpu = busy.read()
            after = worker_memory(broker)
            pss_after = pss_by_process(broker.process.pid)
        finally:
            client.close()
    report.details[name] = {
        "watchers": watchers,
        "messages": messages,
        "post_rate_per_s": rate,
        "connected": connected,
        "delivered": {name: value for name, value in delivered.items() if not name.startswith("histogram")},
        "post_ms_max": round(max(post_ms), 2),
        "cpu_while_delivering": cpu,
        "memory": {"at_start": at_start, "idle_watchers": idle, "after_delivery": after},
        "pss_mb": {"idle_watchers": pss_idle, "after_delivery": pss_after},
    }
    latency = delivered["latency_after_post_ms"]
    report.add(
        f"fan-out p99 post-to-delivery ({watchers:,} watchers){on}",
        latency.get("99"),
        "ms",
        None if on else 250,
        at_least=False,
        note=f"{watchers} SSE watchers x {messages} msgs at {rate:g}/s; p50 {latency.get('50')} ms, "
        f"max {latency.get('max')} ms",
    )
    report.add(
        f"fan-out watchers with every message once, in order ({watchers:,}){on}",
        delivered["complete"],
        "watchers",
        watchers,
        at_least=True,
        note=f"missing {delivered['missing']}, repeated {delivered['repeated']}, "
        f"out of order {delivered['out_of_order']}, errors {delivered['errors']}",
    )
    pss = max(sum(pss_idle.values()), sum(pss_after.values()))
    sockets = "/".join(str(worker["sockets"]) for worker in idle.values())
    report.add(
        f"memory with {watchers:,} watchers, PSS of master + workers{on}",
        pss,
        "MB",
        pss_target,
        at_least=False,
        note=f"holding them {_pss(pss_idle)}, after delivering {_pss(pss_after)}; worker RSS before watchers "
        f"{_rss(at_start)}, holding them {_rss(idle)}; sockets per worker (its watchers + 1) {sockets}",
    )


def _pss(memory):
    return " + ".join(f"{mb:.1f}" for mb in memory.values()) + " MB"


def _rss(memory):
    return "/".join(f"{worker['rss_mb']:.1f}" for worker in memory.values()) + " MB"


# 10,000 watchers: 5,000 and more a worker, so each worker may hold 8,192 connections and
# the file limit is raised to hold them (as the README says for this many watchers); the
# posts come slower, as each is 10,000 frames to write.
WIDE = {"AGENT_COMMS_WORKER_CONNECTIONS": "8192"}
WIDE_WATCHERS, WIDE_MESSAGES, WIDE_RATE = 10_000, 40, 4.0


def run_10k(report, workdir):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WIDE_WATCHERS + 2048  # for each child: the client holds every watcher, a worker half
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise RuntimeError(f"the hard limit on open files is {hard}: {wanted} are needed (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    run(report, workdir, WIDE_WATCHERS, WIDE_MESSAGES, WIDE_RATE, pss_target=128, env=WIDE, processes=2)
