"""Scenario: the wall time of one `agent-chat send` on loopback, start to exit, as an
agent's script pays it (a new Python process each time)."""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from brokers import running_broker

RUNS = 30
AGENT_CHAT = Path(sys.executable).parent / "agent-chat"


def run(report, workdir, runs=RUNS):
    with running_broker(workdir, "cli-send") as broker:
        env = {**os.environ, "AGENT_COMMS_BROKER": broker.url, "AGENT_COMMS_AGENT_ID": "bench-cli"}
        command = [str(AGENT_CHAT), "send", "bench-cli", "timing one send"]
        subprocess.run(command, env=env, check=True, capture_output=True)  # warm the page cache
        walls = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=30)
            walls.append((time.perf_counter() - started) * 1000)
    walls.sort()
    p90 = walls[int(len(walls) * 0.9) - 1]
    report.details["cli_send"] = {"runs": runs, "wall_ms": walls}
    report.add(
        "agent-chat send wall time (p90 of 30)",
        p90,
        "ms",
        150,
        at_least=False,
        note=f"median {statistics.median(walls):.0f} ms, min {walls[0]:.0f} ms",
    )
