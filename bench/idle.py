"""Scenario: how fast a broker starts and how little it holds when idle, with its default
settings (limits on).

Cold start: `agent-comms-broker serve` started on a new database until GET /healthz answers
200, polled every 5 ms; the slowest of RUNS. Idle memory: PSS summed over the master and
its workers (bench/memory.py) after a few posts, reads and /status calls served by both
workers, the largest of the runs; beside it, the floor's idle memory (the same stack
answering a hello POST)."""

import http.client
import os
import signal
import subprocess
import time
from pathlib import Path

import floor
from broker_process import BIN, free_port
from brokers import Client, sockets
from memory import children, pss_by_process

RUNS = 5
# The broker's own defaults, not the relaxed limits the tests start it with.
DEFAULTS = {"AGENT_COMMS_RATE_LIMIT": "100", "AGENT_COMMS_BYTE_RATE": "64k", "AGENT_COMMS_MAX_STREAMS": "64"}


def healthy(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def start(home, port):
    env = {**os.environ, **DEFAULTS}
    for name in ("AGENT_COMMS_WORKERS", "AGENT_COMMS_ACCESS_LOG", "AGENT_COMMS_SYNCHRONOUS"):
        env.pop(name, None)
    log = open(home / "broker.log", "ab")
    command = [str(BIN / "agent-comms-broker"), "serve", "--bind", f"127.0.0.1:{port}", "--db", str(home / "m.db")]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return process


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def serve_on_both_workers(master, port, connections=8, attempts=5):
    """A few posts, reads and /status calls on each of `connections` keep-alive
    connections, held open together so that the workers share them (balance.py); retried
    until every worker held one. A worker that never served anything is smaller than one
    in use, and the figure is of a broker in use."""
    workers = children(master)
    baseline = {pid: sockets(pid) for pid in workers}
    for _ in range(attempts):
        clients = [Client(port) for _ in range(connections)]
        try:
            for client in clients:
                client.connection.connect()
            time.sleep(0.2)  # accepted by now
            held = {pid: sockets(pid) - baseline[pid] for pid in workers}
            for seq in range(20):
                client = clients[seq % connections]
                client.post_json("/messages/bench-idle", {"sender": "bench-idle", "message": f"hello {seq}"})
                client.get_json("/messages/bench-idle?limit=5")
                client.get_json("/status")
        finally:
            for client in clients:
                client.close()
        deadline = time.monotonic() + 5  # the workers close their ends
        while any(sockets(pid) > baseline[pid] for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        if all(count > 0 for count in held.values()):
            return held
    raise RuntimeError(f"the connections did not reach every worker in {attempts} tries: {held}")


def one_run(home):
    port = free_port()
    started = time.perf_counter()
    process = start(home, port)
    try:
        deadline = started + 10
        while not healthy(port):
            if process.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"the broker did not start (see {home}/broker.log)")
            time.sleep(0.005)
        cold = time.perf_counter() - started
        while len(pss_by_process(process.pid)) < 3:
            time.sleep(0.05)
        # Both workers up, each having served something, as in use, then left alone.
        serve_on_both_workers(process.pid, port)
        time.sleep(1.0)
        return cold, pss_by_process(process.pid)
    finally:
        stop(process)


def run(report, workdir, runs=RUNS):
    colds, memories = [], []
    for attempt in range(runs):
        home = Path(workdir) / f"idle-{attempt}"
        home.mkdir(parents=True, exist_ok=True)
        cold, memory = one_run(home)
        colds.append(cold)
        memories.append(memory)
    with floor.running_floor(workdir) as hello:
        time.sleep(1.0)
        floor_memory = pss_by_process(hello.pid)
    totals = [sum(memory.values()) for memory in memories]
    worst = memories[totals.index(max(totals))]
    report.details["idle"] = {
        "cold_start_s": [round(cold, 3) for cold in colds],
        "pss_mb": [{str(pid): round(mb, 1) for pid, mb in memory.items()} for memory in memories],
        "floor_pss_mb": {str(pid): round(mb, 1) for pid, mb in floor_memory.items()},
    }
    report.add(
        "cold start: serve until /healthz answers",
        max(colds),
        "s",
        1.5,
        at_least=False,
        note=f"slowest of {runs}; fastest {min(colds):.2f} s",
    )
    report.add(
        "idle memory, PSS of master + 2 workers",
        max(totals),
        "MB",
        50,
        at_least=False,
        note=f"largest of {runs} ({' + '.join(f'{mb:.1f}' for mb in worst.values())}); "
        f"the floor idle: {sum(floor_memory.values()):.1f} MB",
    )
