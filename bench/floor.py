"""The floor of the stack, measured in the same run as the broker: floor_app.py (a Bottle
hello POST, no storage) under gunicorn with 2 gevent workers, loaded by the same wrk
script as `publish`, and the memory of that stack idle."""

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import requests

from broker_process import free_port
from memory import pss_mb
from wrk_runner import run_wrk

HERE = Path(__file__).resolve().parent
GUNICORN = Path(sys.executable).parent / "gunicorn"


@contextlib.contextmanager
def _serving(command, workdir, name, probe, cwd=None):
    """`command` (a server on a free port, given as PORT in it) started and its log in
    workdir/name.log; yields its process, with `url`, once probe(url) is true."""
    port = free_port()
    log = open(Path(workdir) / f"{name}.log", "ab")
    process = subprocess.Popen(
        [part.replace("PORT", str(port)) for part in command], cwd=cwd, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start (see {workdir}/{name}.log)")
            with contextlib.suppress(requests.ConnectionError):
                if probe(url):
                    break
            time.sleep(0.05)
        process.url = url
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def running_floor(workdir, workers=2):
    command = [str(GUNICORN), "-k", "gevent", "-w", str(workers), "-b", "127.0.0.1:PORT", "floor_app:app"]
    return _serving(
        command,
        workdir,
        "floor",
        lambda url: requests.post(f"{url}/messages/probe", data=b"{}", timeout=1).status_code == 201,
        cwd=HERE,
    )


def measure(workdir, seconds, threads, message_bytes, connections):
    """The floor's publish rate (wrk) and its idle memory (PSS of master and workers)."""
    with running_floor(workdir) as floor:
        url = f"{floor.url}/messages/bench-floor"
        time.sleep(0.5)
        idle = pss_mb(floor.pid)
        run_wrk(url, "publish.lua", [message_bytes, "bench-warmup"], connections=connections, seconds=1)
        load = [message_bytes, "bench-floor"]
        result = run_wrk(url, "publish.lua", load, connections=connections, threads=threads, seconds=seconds)
    return result, idle


def running_old_design(workdir):
    """bench/old_design.py (the replaced broker.py's design) on a free port."""
    command = [sys.executable, str(HERE / "old_design.py"), "--port", "PORT", "--db", str(Path(workdir) / "old.db")]
    return _serving(
        command,
        workdir,
        "old-design",
        _answers,
    )


def _answers(url):
    """Whether the server answers a post at all (old_design.py answers 200, not 201)."""
    requests.post(f"{url}/messages/probe", json={"sender": "p", "message": "p"}, timeout=1)
    return True


def measure_old_design(workdir, seconds, threads, message_bytes, connections):
    """The replaced design under the same load: its rate and latency, and its PSS."""
    with running_old_design(workdir) as old:
        url = f"{old.url}/messages/bench-old"
        result = run_wrk(
            url, "publish.lua", [message_bytes, "bench-old"], connections=connections, threads=threads, seconds=seconds
        )
        memory = pss_mb(old.pid)
    return result, memory
