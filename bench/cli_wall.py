"""Scenario: the wall time of one `agent-chat send` and one `agent-chat read` on loopback,
start to exit, as an agent's script pays it (a new Python process each time), with the
bytecode cache a pip-installed copy has (PYTHONDONTWRITEBYTECODE is dropped, and one run
of each fills the cache before the timed ones). Beside them, in the same rounds, the floor
of any Python command: the same interpreter starting and exiting (`python -c pass`)."""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from brokers import fill_channel, running_broker

RUNS = 30
AGENT_CHAT = Path(sys.executable).parent / "agent-chat"
TARGETS_MS = {"send": 60, "read": 90}


def p90(walls):
    ordered = sorted(walls)
    return ordered[int(len(ordered) * 0.9) - 1]


def run(report, workdir, runs=RUNS):
    with running_broker(workdir, "cli") as broker:
        fill_channel(broker.port, "bench-cli", 100, "a message of some sixty characters, as agents post them.")
        env = {**os.environ, "AGENT_COMMS_BROKER": broker.url, "AGENT_COMMS_AGENT_ID": "bench-cli"}
        env["AGENT_COMMS_CONFIG"] = "/dev/null"
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        commands = {
            "send": [str(AGENT_CHAT), "send", "bench-cli", "timing one send"],
            "read": [str(AGENT_CHAT), "read", "bench-cli"],
            "interpreter": [sys.executable, "-c", "pass"],
        }
        for command in commands.values():  # the page cache and the bytecode cache
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=30)
        walls = {name: [] for name in commands}
        for _ in range(runs):  # interleaved, so all three see the same machine
            for name, command in commands.items():
                started = time.perf_counter()
                subprocess.run(command, env=env, check=True, capture_output=True, timeout=30)
                walls[name].append((time.perf_counter() - started) * 1000)
    report.details["cli"] = {"runs": runs, "wall_ms": dict(walls)}
    floor = walls.pop("interpreter")
    for name, times in walls.items():
        report.add(
            f"agent-chat {name} wall time (p90 of {runs})",
            p90(times),
            "ms",
            TARGETS_MS[name],
            at_least=False,
            note=f"median {statistics.median(times):.0f} ms, min {min(times):.0f} ms"
            + ("; read prints the latest 50 of 100" if name == "read" else "")
            + f"; the interpreter alone: p90 {p90(floor):.0f} ms, median {statistics.median(floor):.0f}",
        )
