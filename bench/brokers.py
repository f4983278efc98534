"""Real brokers for the benchmarks (tests/broker_process.py's BrokerProcess: gunicorn,
gevent workers, a free loopback port, its own SQLite file), a keep-alive JSON client for
them, and the resident memory of their workers."""

import contextlib
import http.client
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from broker_process import BrokerProcess


@contextlib.contextmanager
def running_broker(workdir, name, env=None, db_path=None, database_url=None):
    """A started broker on `db_path` (default: a new database in workdir/name), or on the
    PostgreSQL database at `database_url`; stopped on exit."""
    home = Path(workdir) / name
    home.mkdir(parents=True, exist_ok=True)
    broker = BrokerProcess(db_path or home / "messages.db", workers=2, env=env, database_url=database_url)
    broker.log_path = home / "broker.log"
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


class Client:
    """One keep-alive HTTP/1.1 connection to a broker on 127.0.0.1."""

    def __init__(self, port, timeout=30):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method, path, body=None):
        """(status, raw reply body)."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        payload = json.dumps(body).encode() if body is not None else None
        self.connection.request(method, path, body=payload, headers=headers)
        reply = self.connection.getresponse()
        return reply.status, reply.read()

    def get_json(self, path):
        status, raw = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {raw[:200]!r}")
        return json.loads(raw)

    def post_json(self, path, body):
        status, raw = self.request("POST", path, body)
        if status != 201:
            raise RuntimeError(f"POST {path}: {status} {raw[:200]!r}")
        return json.loads(raw)

    def close(self):
        self.connection.close()


def stored_messages(port):
    """The broker's message count, from GET /status."""
    client = Client(port)
    try:
        return client.get_json("/status")["messages"]
    finally:
        client.close()


def fill_channel(port, channel, count, text, sender="bench-filler", max_body=65536):
    """Post `count` messages to a channel in batches within the broker's limits (max_batch
    500 messages, max_body 64 KiB)."""
    per_batch = max(1, min(500, max_body // (len(text.encode()) + len(sender) + 64)))
    client = Client(port)
    try:
        done = 0
        while done < count:
            batch = min(per_batch, count - done)
            client.post_json(f"/messages/{channel}", [{"sender": sender, "message": text}] * batch)
            done += batch
    finally:
        client.close()


def worker_memory(broker):
    """{worker pid: {"rss_mb": resident MB, "sockets": open sockets}} for each gunicorn worker."""
    found = {}
    for pid in broker.worker_pids():
        try:
            found[pid] = {"rss_mb": _rss_mb(pid), "sockets": sockets(pid)}
        except OSError:
            continue  # the worker ended between listing and reading
    return found


def cpu_seconds(pid):
    """User plus system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no VmRSS for pid {pid}")


def sockets(pid):
    """How many sockets the process holds."""
    fd_dir = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if fd.readlink().name.startswith("socket:"):
                count += 1
    return count
