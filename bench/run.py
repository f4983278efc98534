"""The benchmark suite (`make bench`): starts real brokers (gunicorn, 2 gevent workers,
loopback, temporary SQLite files), measures each figure against its target, prints a
summary table and writes bench/results/latest.json.

Usage: run.py [--only NAMES] [--seconds S] [--wrk-threads N] [--watchers N] [--messages N]
              [--rate R] [--big-store N] [--fsync-delay-ms MS] [--keep]

Scenarios, in order: idle (cold start, idle memory), cli (agent-chat send and read),
publish (beside the stack's floor: the same Bottle and gunicorn answering a hello POST,
and the replaced broker.py's design), publish-secured (a token as well), signing (what
signing, checking and sealing a message cost, and publish signed vs unsigned), batch (100
messages a post), read, fanout (1,000 SSE watchers: delivery and memory), fanout-10k
(10,000 watchers), busy-post (posts while watchers receive and a reader pages a
1M-message channel), big-store, queue (take+done pairs), mcp-send (an MCP send tool call
over stdio and Streamable HTTP), postgres (publish, publish on two nodes, read and fan-out
on PostgreSQL).
Exit status: 0 when every figure meets its target, 1 when one misses, 2 when a scenario
could not run.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import big_store
import busy_post
import cli_wall
import fanout
import idle
import latest_read
import mcp_send
import postgres
import publish
import queue_pairs
import signing
from figures import Report
from wrk_runner import require_wrk

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def scenarios(args):
    return {
        "idle": lambda report, workdir: idle.run(report, workdir),
        # Before the scenarios that write hundreds of MB: their write-back would be timed too.
        "cli": lambda report, workdir: cli_wall.run(report, workdir),
        "publish": lambda report, workdir: publish.run(report, workdir, args.seconds, args.wrk_threads),
        "publish-secured": lambda report, workdir: publish.run(
            report, workdir, args.seconds, args.wrk_threads, secured=True
        ),
        "signing": lambda report, workdir: signing.run(report, workdir, args.seconds, args.wrk_threads),
        "batch": lambda report, workdir: publish.run_batch(report, workdir, args.seconds, args.wrk_threads),
        "read": lambda report, workdir: latest_read.run(report, workdir, args.seconds, args.wrk_threads),
        "fanout": lambda report, workdir: fanout.run(report, workdir, args.watchers, args.messages, args.rate),
        "fanout-10k": lambda report, workdir: fanout.run_10k(report, workdir),
        "busy-post": lambda report, workdir: busy_post.run(report, workdir, args.big_store),
        "big-store": lambda report, workdir: big_store.run(report, workdir, args.big_store),
        "queue": lambda report, workdir: queue_pairs.run(report, workdir, args.seconds),
        "mcp-send": lambda report, workdir: mcp_send.run(report, workdir),
        "postgres": lambda report, workdir: postgres.run(report, workdir, args.seconds, args.wrk_threads),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated scenarios to run (default: all)")
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run [10]")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads [1]: the broker needs the cores")
    parser.add_argument("--watchers", type=int, default=1000, help="SSE watchers in the fan-out [1000]")
    parser.add_argument("--messages", type=int, default=100, help="messages posted in the fan-out [100]")
    parser.add_argument("--rate", type=float, default=20.0, help="fan-out posts per second [20]")
    parser.add_argument("--big-store", type=int, default=1_000_000, help="messages in the big store [1000000]")
    parser.add_argument(
        "--fsync-delay-ms",
        type=float,
        default=0.0,
        help="make every fsync of the run MS longer, as on a slow disk (bench/slow_fsync.c, built with cc) [0]",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (databases, logs)")
    return parser.parse_args(argv)


def slow_fsync(workdir, delay_ms):
    """Preload bench/slow_fsync.c into every process the run starts, so that each fsync
    and fdatasync takes `delay_ms` longer."""
    library = workdir / "slow_fsync.so"
    source = Path(__file__).resolve().parent / "slow_fsync.c"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("bench: --fsync-delay-ms needs a C compiler (apt-get install gcc)")
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True)
    os.environ["LD_PRELOAD"] = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), str(library)]))
    os.environ["BENCH_FSYNC_DELAY_US"] = str(round(delay_ms * 1000))


def stop_on_sigterm():
    """SIGTERM unwinds like Ctrl-C, so brokers, watchers and temporary files are cleaned up."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv=None):
    args = parse_args(argv)
    stop_on_sigterm()
    table = scenarios(args)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        raise SystemExit(f"bench: no scenario {', '.join(unknown)}; there are {', '.join(table)}")
    if {"publish", "publish-secured", "signing", "batch", "read", "postgres"} & set(chosen):
        require_wrk()
    report = Report()
    workdir = Path(tempfile.mkdtemp(prefix="agent-comms-bench-"))
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"agent-comms benchmark: {os.cpu_count()} CPUs, load average {load}; working in {workdir}", flush=True)
    if args.fsync_delay_ms:
        slow_fsync(workdir, args.fsync_delay_ms)
        print(f"every fsync made {args.fsync_delay_ms:g} ms longer (bench/slow_fsync.c)", flush=True)
    try:
        for name in chosen:
            print(f"\n[{name}]", flush=True)
            started = time.monotonic()
            try:
                table[name](report, workdir)
            except Exception as error:  # one broken scenario must not hide the others' figures
                traceback.print_exc()
                report.errors.append(f"{name}: {type(error).__name__}: {error}")
            print(f"  ({time.monotonic() - started:.1f} s)", flush=True)
    finally:
        if args.keep:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report.write_json(RESULTS)
    print("\nSummary\n" + report.table())
    print(f"\nwritten to {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")
    if report.errors:
        return 2
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
