"""`agent-comms-broker serve`, a plain gunicorn run and `make run`: how the broker starts,
and the one clear line it gives when it cannot."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from agent_comms_broker.config import ConfigError, Settings
from broker_process import BIN, free_port

ROOT = Path(__file__).resolve().parent.parent


def run_serve(*args, env=None, timeout=30):
    return subprocess.run(
        [str(BIN / "agent-comms-broker"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_clear_line(result, fragment):
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and fragment in lines[0], result.stderr
    assert lines[0].startswith("agent-comms-broker: ")
    assert "Traceback" not in result.stderr + result.stdout


def wait_healthy(url, process, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError("broker did not become healthy")


def test_defaults_match_the_deployed_broker():
    settings = Settings.from_env({})
    assert settings.bind == "0.0.0.0:8080"
    assert settings.db == "/opt/agent-comms/messages.db"
    assert settings.workers == 2


def test_every_setting_comes_from_the_environment():
    settings = Settings.from_env(
        {
            "AGENT_COMMS_BIND": "127.0.0.1:9000",
            "AGENT_COMMS_DB": "/tmp/x.db",
            "AGENT_COMMS_WORKERS": "4",
            "AGENT_COMMS_RETENTION_MAX_AGE": "30d",
            "AGENT_COMMS_MAX_WAIT": "2m",
            "AGENT_COMMS_SYNCHRONOUS": "normal",
        }
    )
    assert (settings.bind, settings.db, settings.workers) == ("127.0.0.1:9000", "/tmp/x.db", 4)
    assert settings.retention_max_age == 30 * 86400 and settings.max_wait == 120
    assert settings.synchronous == "NORMAL"
    with pytest.raises(ConfigError, match="AGENT_COMMS_WORKERS"):
        Settings.from_env({"AGENT_COMMS_WORKERS": "0"})


def test_metrics_settings():
    assert Settings.from_env({}).metrics_access == "open"
    assert Settings.from_env({"AGENT_COMMS_AUTH": "required"}).metrics_access == "token"
    assert Settings.from_env({"AGENT_COMMS_AUTH": "required", "AGENT_COMMS_METRICS": "OFF"}).metrics_access == "off"
    named = Settings.from_env({"AGENT_COMMS_METRICS_FROM": "192.168.122.10, 10.0.0.0/24,::1"}).metrics_from
    assert [str(network) for network in named] == ["192.168.122.10/32", "10.0.0.0/24", "::1/128"]
    with pytest.raises(ConfigError, match="AGENT_COMMS_METRICS: 'on' is not one of off, open, token"):
        Settings.from_env({"AGENT_COMMS_METRICS": "on"})
    with pytest.raises(ConfigError, match=r"AGENT_COMMS_METRICS_FROM: 'prometheus\.lan' is not an address"):
        Settings.from_env({"AGENT_COMMS_METRICS_FROM": "prometheus.lan"})


def test_unwritable_database_path_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_serve("serve", "--bind", f"127.0.0.1:{free_port()}", "--db", str(blocker / "messages.db"))
    assert_one_clear_line(result, "cannot create the database directory")


def test_database_that_is_not_sqlite_is_one_line(tmp_path):
    bogus = tmp_path / "messages.db"
    bogus.write_bytes(b"this is not a database" * 100)
    result = run_serve("serve", "--bind", f"127.0.0.1:{free_port()}", "--db", str(bogus))
    assert_one_clear_line(result, "cannot open the database")


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("serve", "--bind", f"127.0.0.1:{port}", "--db", str(tmp_path / "m.db"))
    assert_one_clear_line(result, "address already in use")


def test_bad_setting_is_one_line(tmp_path):
    result = run_serve("serve", "--db", str(tmp_path / "m.db"), env={"AGENT_COMMS_WORKERS": "many"})
    assert_one_clear_line(result, "AGENT_COMMS_WORKERS")
    # Given as a flag, the line names the flag.
    result = run_serve("serve", "--db", str(tmp_path / "m.db"), "--workers", "0")
    assert_one_clear_line(result, "--workers (AGENT_COMMS_WORKERS: '0' is not a whole number of 1 or more)")


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("18081", "give HOST:PORT, such as 127.0.0.1:18081"),
        ("127.0.0.1:99999", "the port must be a number from 0 to 65535"),
        ("127.0.0.1:", "the port must be a number from 0 to 65535"),
    ],
)
def test_a_bind_address_that_is_not_host_port_is_one_line(tmp_path, bind, expected):
    result = run_serve("serve", "--bind", bind, "--db", str(tmp_path / "m.db"))
    assert_one_clear_line(result, expected)


def test_make_run_takes_the_brokers_own_variables(tmp_path):
    planned = subprocess.run(
        ["make", "-n", "run", f"VENV={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "AGENT_COMMS_BIND": "127.0.0.1:18123", "AGENT_COMMS_DB": "/srv/x.db"},
        check=True,
    ).stdout
    assert "serve --bind 127.0.0.1:18123 --db /srv/x.db" in planned


def test_usage_and_version():
    assert "serve [--bind HOST:PORT] [--db PATH | --database-url URL] [--workers N]" in run_serve("--help").stdout
    assert run_serve("--version").stdout.strip() == "0.2.0"
    wrong = run_serve("serve", "--no-such-flag")
    assert wrong.returncode == 1 and "Usage:" in wrong.stdout + wrong.stderr


def test_plain_gunicorn_with_the_shared_config(tmp_path):
    """The documented `gunicorn -c "$(agent-comms-broker config-path)"` invocation."""
    conf = run_serve("config-path").stdout.strip()
    assert conf.endswith("gunicorn.conf.py") and Path(conf).is_file()
    port = free_port()
    env = {**os.environ, "AGENT_COMMS_BIND": f"127.0.0.1:{port}", "AGENT_COMMS_DB": str(tmp_path / "m.db")}
    process = subprocess.Popen([str(BIN / "gunicorn"), "-c", conf], env=env, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        reply = requests.post(f"http://127.0.0.1:{port}/messages/general", json={"sender": "g", "message": "hi"})
        assert reply.status_code == 201
        deadline = time.monotonic() + 20  # healthy once one worker is up; gunicorn forks the next a moment later
        while len(subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()) < 2:
            assert time.monotonic() < deadline, "gunicorn did not start the 2 workers of the shared config"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert process.returncode == 0


def test_make_run(tmp_path):
    """`make run` starts the broker in the foreground on the address and database given,
    and Ctrl-C (SIGINT to the whole process group: make, the master and its workers)
    stops it without a traceback."""
    port = free_port()
    db = tmp_path / "data" / "messages.db"
    process = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"BIND=127.0.0.1:{port}", f"DB={db}", f"VENV={sys.prefix}"],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, timeout=120)
        assert db.exists()
        requests.get(f"http://127.0.0.1:{port}/status", timeout=5)
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    assert "Shutting down: Master" in output, output
    assert "Traceback" not in output and "SystemExit" not in output, output
    # What make run prints first: how to reach this broker from another shell.
    assert f"AGENT_COMMS_BROKER=http://127.0.0.1:{port}" in output
    assert f"token add NAME --db {db}" in output


def test_make_run_installs_only_what_serving_needs(tmp_path):
    planned = subprocess.run(
        ["make", "-n", "run", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "pip install --quiet -e ./service -e ./client\n" in planned
    assert "requirements.txt" not in planned and "ansible" not in planned


def test_make_help_shows_the_values_it_names():
    shown = subprocess.run(["make", "help", "BIND=127.0.0.1:9999"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "127.0.0.1:9999 with ./data/messages.db" in shown
    assert "$(" not in shown
    # The targets that drive the deployed broker say so.
    for target in ("start", "stop", "restart", "status", "logs", "backup", "restore"):
        line = next(line for line in shown.splitlines() if line.startswith(f"  make {target} "))
        assert "CT-950" in line, line


def test_the_database_files_are_private_whatever_the_umask(tmp_path):
    db = tmp_path / "data" / "messages.db"
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "agent-comms-broker"), "serve", "--bind", f"127.0.0.1:{port}", "--db", str(db)],
        preexec_fn=lambda: os.umask(0o022),
        start_new_session=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        assert requests.post(f"http://127.0.0.1:{port}/messages/x", json={"sender": "a", "message": "m"}).ok
        for suffix in ("", "-wal", "-shm"):
            mode = (db.parent / (db.name + suffix)).stat().st_mode & 0o777
            assert mode == 0o600, (suffix, oct(mode))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def connections_per_worker(broker):
    """{worker pid: established connections to the broker's port it holds}, from /proc."""
    port = f":{broker.port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[1].endswith(port) and fields[3] == "01":  # local address, ESTABLISHED
                    inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in broker.worker_pids():
        held = 0
        for descriptor in os.listdir(f"/proc/{pid}/fd"):
            try:
                held += os.readlink(f"/proc/{pid}/fd/{descriptor}") in inodes
            except OSError:
                pass  # closed meanwhile
        counts[pid] = held
    return counts


def burst_of_connections(port, count=32):
    """`count` keep-alive connections opened at once, then a post sent on each (as wrk or a
    client's pool does), each answered and held open."""
    body = json.dumps({"sender": "burst", "message": "x" * 1000}).encode()
    head = f"POST /messages/burst HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    time.sleep(0.002)  # connected (loopback)
    for sock in sockets:
        sock.setblocking(True)
        sock.settimeout(10)
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
    for sock in sockets:
        assert sock.recv(4096).startswith(b"HTTP/1.1 201")
    return sockets


def both_up(broker):
    """Wait until both workers serve (each holds one of some connections opened in turn)."""
    held = []
    try:
        for _ in range(200):
            held += burst_of_connections(broker.port, 1)
            if min(connections_per_worker(broker).values()) > 0:
                return
            time.sleep(0.02)
        raise AssertionError("one worker never served a connection")
    finally:
        for sock in held:
            sock.close()
        time.sleep(0.3)


def test_a_burst_of_connections_is_spread_over_the_workers(own_broker):
    """Whichever worker the kernel woke first used to take a whole burst: in half of the
    benchmark's runs all 32 connections landed on one worker, the other idle. Three bursts
    in a row, and one more after a worker was killed and replaced (its row in the shared
    table freed and given to the new one), each spread over both workers."""
    broker = own_broker(workers=2).start()
    both_up(broker)
    for burst in range(4):
        if burst == 3:
            victim = broker.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while not (len(pids := broker.worker_pids()) == 2 and victim not in pids):
                assert time.monotonic() < deadline, "the killed worker was not replaced"
                time.sleep(0.1)
            both_up(broker)
        sockets = burst_of_connections(broker.port)
        try:
            counts = connections_per_worker(broker)
            assert sum(counts.values()) == 32 and min(counts.values()) >= 13, (burst, counts)
        finally:
            for sock in sockets:
                sock.close()
        time.sleep(0.3)  # the workers see the connections close


def test_database_urls_are_shown_without_their_password():
    from agent_comms_broker.config import redacted, redacted_error

    assert redacted("postgresql://agent:pw@db.lan/x") == "postgresql://agent:***@db.lan/x"
    assert redacted("postgresql://agent:p@ss@db.lan/x") == "postgresql://agent:***@db.lan/x"
    assert redacted("postgresql://agent@db.lan/x?password=pw&sslmode=require") == (
        "postgresql://agent@db.lan/x?password=***&sslmode=require"
    )
    url = "postgresql://agent:pw@[::1/x"
    error = ValueError(f'invalid URI query parameter: "{url}"\n  password=pw')
    assert "pw" not in redacted_error(error, url).replace("password=***", "")


def test_a_stop_that_reaches_workers_still_starting_is_not_lost(own_broker):
    """SIGHUP then SIGTERM at once (a reload, then a stop): the master forks new workers
    and tells them to stop while they are still starting. gunicorn's worker lost a signal
    that came before its own handlers were in place, and served on until the master's
    graceful timeout (60 s here) ran out and killed it."""
    broker = own_broker(workers=2, env={"AGENT_COMMS_GRACEFUL_TIMEOUT": "60"}).start()
    for attempt in range(2):
        broker.process.send_signal(signal.SIGHUP)
        time.sleep(0.05)  # the master forks the new workers
        broker.process.send_signal(signal.SIGTERM)
        assert broker.process.wait(20) == 0
        if attempt == 0:
            broker.start()


# A worker's runtime started by many greenlets at once, in a process of its own (importing
# the WSGI app makes it): `_start` stands in for the store's opening, which on PostgreSQL
# waits for the server.
RUNTIME_STARTS = """
import sys, gevent
from agent_comms_broker import wsgi

runtime, calls = wsgi.runtime, []

def start(outcome):
    def _start():
        calls.append(outcome)
        gevent.sleep(0.05)
        if outcome == "fails":
            raise OSError("the server does not answer")
        if outcome == "started":
            runtime.pid = wsgi.os.getpid()
    return _start

def results(greenlets):
    gevent.joinall(greenlets)
    return [type(g.exception).__name__ if g.exception else "ok" for g in greenlets]

runtime._start = start("fails")
first = results([gevent.spawn(runtime) for _ in range(50)])
runtime._start = start("started")
killed = gevent.spawn(runtime)
gevent.sleep(0.01)
waiting = [gevent.spawn(runtime) for _ in range(20)]
gevent.sleep(0.01)
killed.kill()
second = results(waiting)
print(calls, sorted(set(first)), first.count("OSError"), sorted(set(second)))
"""


def test_a_worker_starts_once_for_the_requests_that_come_while_it_starts(tmp_path):
    """Fifty first requests at once: one start, whose failure all fifty get (503s), and
    the next request starts again; a start whose greenlet is killed is taken over by one
    of the requests waiting for it, and the others wait for that one."""
    env = {**os.environ, "AGENT_COMMS_DB": str(tmp_path / "m.db"), "AGENT_COMMS_METRICS": "off"}
    done = subprocess.run([sys.executable, "-c", RUNTIME_STARTS], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "['fails', 'started', 'started'] ['OSError'] 50 ['ok']"
