"""A real broker for tests: `agent-comms-broker serve` (gunicorn, gevent workers) on a
free loopback port with its own SQLite file, or on a PostgreSQL database (database_url)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

BIN = Path(sys.executable).parent
TEST_ENV = {
    "AGENT_COMMS_GRACEFUL_TIMEOUT": "3",
    "AGENT_COMMS_RATE_LIMIT": "0",
    "AGENT_COMMS_BYTE_RATE": "0",
    "AGENT_COMMS_MAX_STREAMS": "0",
}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BrokerProcess:
    def __init__(self, db_path, workers=2, env=None, port=None, ca=None, database_url=None):
        self.db_path = str(db_path)
        self.database_url = database_url
        self.workers = workers
        self.extra_env = dict(env or {})
        self.port = port or free_port()
        scheme = "https" if self.extra_env.get("AGENT_COMMS_TLS_CERT") else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        # The CA file that verifies an HTTPS broker's certificate.
        self.verify = ca or True
        self.log_path = Path(self.db_path).with_suffix(f".{self.port}.log")
        self.process = None

    def command(self):
        return [
            str(BIN / "agent-comms-broker"),
            "serve",
            "--bind",
            f"127.0.0.1:{self.port}",
            *self.store_args,
            "--workers",
            str(self.workers),
        ]

    @property
    def store_args(self):
        """The options that name this broker's database, for agent-comms-broker commands."""
        return ["--database-url", self.database_url] if self.database_url else ["--db", self.db_path]

    def start(self, timeout=20):
        # Every test posts from 127.0.0.1: the per-address limits (requests, bytes, streams)
        # are off unless a test sets them (tests/test_limits.py does).
        env = {**os.environ, **TEST_ENV, **self.extra_env}
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"broker exited with {self.process.returncode}:\n{self.log()}")
            try:
                # Healthy once one worker answers; gunicorn forks the others a moment apart.
                healthy = requests.get(self.url + "/healthz", timeout=1, verify=self.verify).status_code == 200
                if healthy and len(self.worker_pids()) >= self.workers:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or its first answer slow under load: the deadline holds
            time.sleep(0.05)
        raise RuntimeError(f"broker did not become healthy with {self.workers} workers:\n{self.log()}")

    def worker_pids(self):
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.process is None or self.process.poll() is not None:
            return
        if sig == signal.SIGKILL:
            os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def restart(self):
        self.stop()
        return self.start()

    def log_with(self, text, count=1, timeout=5):
        """The log once it holds `text` `count` times (or once `timeout` has passed): each
        worker writes its access log lines a few times a second, not one by one."""
        deadline = time.monotonic() + timeout
        while (log := self.log()).count(text) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return log

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def sessions_on_two_workers(url, tries=200):
    """Two keep-alive sessions whose connections are served by different workers (each
    try is one GET /status)."""
    by_worker = {}
    for _ in range(tries):
        session = requests.Session()
        worker = session.get(f"{url}/status").json()["worker"]
        by_worker.setdefault(worker, session)
        if len(by_worker) == 2:
            return list(by_worker.values())
    raise AssertionError("every connection landed on one worker")
