"""Runs wrk (HTTP load with keep-alive connections) with one of bench/lua's scripts and
reads back the figures that lua/report.lua prints.

wrk's latency percentiles (those of --latency, and those its Lua done() sees) are
corrected for coordinated omission: a reply slower than the run's mean interval per
connection also counts for the requests that connection could not send meanwhile. So a
few long stalls weigh more in p99 than their own count, and the mean is above what
requests/s and connections alone imply."""

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA = Path(__file__).resolve().parent / "lua"
MARKER = "bench-report "


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    errors: dict
    latency_ms: dict  # "mean", "max", "50", "75", "90", "99", "99.9"

    @property
    def rate(self):
        return self.requests / self.seconds

    @property
    def failed(self):
        return sum(self.errors.values())

    def as_dict(self):
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1),
            "bytes": self.bytes,
            "errors": self.errors,
            "latency_ms": self.latency_ms,
        }


def require_wrk():
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed (make bench installs it: apt-get install -y wrk)")


def run_wrk(url, script="report.lua", args=(), connections=32, threads=1, seconds=10):
    """One wrk run against url; bounded by its duration (and killed 30 s past it)."""
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA / script),
        url,
    ]
    if args:
        command += ["--", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
    report = next((line[len(MARKER) :] for line in done.stdout.splitlines() if line.startswith(MARKER)), None)
    if done.returncode != 0 or report is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    figures = json.loads(report)
    return WrkResult(
        requests=figures["requests"],
        seconds=figures["duration_us"] / 1e6,
        bytes=figures["bytes"],
        errors=figures["errors"],
        latency_ms={name: round(us / 1000, 3) for name, us in figures["latency_us"].items()},
    )
