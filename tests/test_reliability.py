"""Reliability, proven against the real broker: an acknowledged post survives SIGKILL of
every process, a full disk refuses posts cleanly and loses nothing, and watchers (ours
and agent-chat) resume across restarts and reloads with every message exactly once."""

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time

import pytest
import requests

from broker_process import BIN, BrokerProcess
from conftest import until
from sse_client import EventStream

# Several writers from one address, as fast as the broker answers: no rate limit. Keep-alive
# comments every second, so a watcher's read timeout never fires on a quiet stream.
LOADED = {"AGENT_COMMS_RATE_LIMIT": "0", "AGENT_COMMS_KEEPALIVE": "1"}
END = "END"


def read_channel(url, channel, deadline=30):
    """Every message of a channel over HTTP, oldest first, paging by cursor."""
    found, cursor = [], 0
    stop = time.monotonic() + deadline
    while time.monotonic() < stop:
        page = requests.get(f"{url}/messages/{channel}", params={"after": cursor, "limit": 1000}, timeout=10)
        assert page.status_code == 200, page.text
        page = page.json()
        found += page["messages"]
        cursor = page["cursor"]
        if not page["more"]:
            return found
    raise AssertionError(f"could not read {channel} within {deadline} s")


def database_rows(broker, read_only=False):
    """(integrity check result, {id: (channel, sender, message)}) straight from the broker's
    database: SQLite's integrity_check of the file, or for PostgreSQL pg_amcheck of its
    tables and indexes (["ok"] when it finds nothing wrong)."""
    if broker.database_url:
        import psycopg

        from postgres_server import ensure_installed

        checked = subprocess.run(
            [ensure_installed() / "pg_amcheck", "--install-missing", "--heapallindexed", broker.database_url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        with psycopg.connect(broker.database_url) as db:
            rows = db.execute("SELECT id, channel, sender, message FROM messages").fetchall()
        integrity = ["ok"] if checked.returncode == 0 else [checked.stdout + checked.stderr]
        return integrity, {row[0]: row[1:] for row in rows}
    path = broker.db_path
    target = f"file:{path}?mode=ro" if read_only else f"file:{path}?mode=rw"
    db = sqlite3.connect(target, uri=True, timeout=10)
    try:
        integrity = [row[0] for row in db.execute("PRAGMA integrity_check")]
        rows = db.execute("SELECT id, channel, sender, message FROM messages").fetchall()
    finally:
        db.close()
    return integrity, {row[0]: row[1:] for row in rows}


def process_gone(pid):
    """Dead or a zombie (a killed worker's parent may be gone too, so none reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def reload_gracefully(broker, timeout=20):
    """SIGHUP to gunicorn's master: new workers start, the old ones finish and leave."""
    old = set(broker.worker_pids())
    broker.process.send_signal(signal.SIGHUP)

    def replaced():
        now = set(broker.worker_pids())
        return len(now) == broker.workers and not now & old

    until(replaced, timeout, f"new workers after SIGHUP:\n{broker.log()[-3000:]}")


class Flood:
    """Threads posting to their own channels as fast as the broker answers, with short
    timeouts, never retrying: each records what it got a 2xx for, and what failed."""

    def __init__(self, url, channels, seconds=30):
        self.url = url
        self.deadline = time.monotonic() + seconds
        self.acked = {}  # id -> (channel, sender, message); dict writes are atomic
        self.failed = []  # (channel, message, status code or exception name)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._post, args=(channel,), daemon=True) for channel in channels]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        assert not any(thread.is_alive() for thread in self._threads)

    def _post(self, channel):
        session = requests.Session()
        for n in range(1_000_000):
            if self._stop.is_set() or time.monotonic() > self.deadline:
                break
            text = f"{channel} {n}"
            try:
                reply = session.post(
                    f"{self.url}/messages/{channel}", json={"sender": channel, "message": text}, timeout=(1, 3)
                )
            except requests.RequestException as error:
                self.failed.append((channel, text, type(error).__name__))
                time.sleep(0.05)  # the broker is gone: do not spin
                continue
            if 200 <= reply.status_code < 300:
                self.acked[reply.json()["id"]] = (channel, channel, text)
            else:
                self.failed.append((channel, text, reply.status_code))
        session.close()


class Writer(threading.Thread):
    """Posts the given messages to one channel in order, each exactly once, through
    restarts: a post whose answer was lost is looked up before it is sent again."""

    def __init__(self, url, channel, texts, pause=0.01, seconds=60):
        super().__init__(daemon=True)
        self.url, self.channel, self.texts, self.pause = url, channel, texts, pause
        self.deadline = time.monotonic() + seconds
        self.acked = []  # (id, message)
        self.refused = []  # (status, body): anything but a 201, for the report
        self.dropped = 0  # posts that reached no broker or lost their answer

    def run(self):
        for text in self.texts:
            while time.monotonic() < self.deadline:
                stored_id = self._post(text)
                if stored_id is None:
                    stored_id = self._look_up(text)
                if stored_id is not None:
                    self.acked.append((stored_id, text))
                    break
                time.sleep(0.1)
            time.sleep(self.pause)

    def _post(self, text):
        try:
            reply = requests.post(
                f"{self.url}/messages/{self.channel}", json={"sender": "writer", "message": text}, timeout=(1, 5)
            )
        except requests.RequestException:
            self.dropped += 1
            return None
        if reply.status_code == 201:
            return reply.json()["id"]
        self.refused.append((reply.status_code, reply.text))
        return None

    def _look_up(self, text):
        """The id the text was stored under, or None; waits for a broker to answer."""
        while time.monotonic() < self.deadline:
            try:
                reply = requests.get(f"{self.url}/messages/{self.channel}", params={"limit": 50}, timeout=(1, 5))
            except requests.RequestException:
                time.sleep(0.1)
                continue
            if reply.status_code == 200:
                return next((m["id"] for m in reply.json()["messages"] if m["message"] == text), None)
            time.sleep(0.1)
        return None


class Watcher(threading.Thread):
    """Follows a stream the way agent-chat does: when the connection drops it reconnects
    with Last-Event-ID set to the last id it got. Ends at the message END."""

    def __init__(self, url, last_event_id=None, seconds=60):
        super().__init__(daemon=True)
        self.url = url
        self.cursor = last_event_id
        self.deadline = time.monotonic() + seconds
        self.got = []  # (id, message)
        self.connections = 0
        self.connected = threading.Event()

    def run(self):
        while time.monotonic() < self.deadline:
            stream = None
            try:
                stream = EventStream(self.url, last_event_id=self.cursor, timeout=(1, 5))
                self.connections += 1
                for event in stream.events():
                    self.connected.set()
                    if "data" in event and event.get("event", "message") == "message":
                        message = json.loads(event["data"])
                        self.got.append((message["id"], message["message"]))
                        self.cursor = message["id"]
                        if message["message"] == END:
                            return
                    if time.monotonic() > self.deadline:
                        return
            except requests.RequestException:
                pass  # refused, dropped or answered with an error: reconnect
            finally:
                if stream is not None:
                    stream.close()
            time.sleep(0.2)


# -- SIGKILL ------------------------------------------------------------------------------


def test_acknowledged_posts_survive_sigkill_of_every_process(own_broker):
    broker = own_broker(env=LOADED)
    acked, not_acked = {}, set()
    for round_number in range(3):
        broker.start()
        processes = [broker.process.pid, *broker.worker_pids()]
        assert len(processes) == 3
        with Flood(broker.url, [f"kill{round_number}-w{n}" for n in range(4)]) as flood:
            until(lambda flood=flood: len(flood.acked) >= 100, 20, "100 acknowledged posts")
            time.sleep(0.7)
            posted = len(flood.acked)
            time.sleep(0.3)
            assert len(flood.acked) > posted, "the writers stalled before the kill"
            broker.stop(signal.SIGKILL)
            until(lambda pids=processes: all(map(process_gone, pids)), 10, "every broker process to die")
            time.sleep(0.2)  # the posts in flight at the kill fail
        acked.update(flood.acked)
        not_acked |= {(channel, text) for channel, text, _ in flood.failed}

        # Restarted on the same file: every acknowledged message, as it was acknowledged.
        broker.start()
        served = {}
        for channel in {value[0] for value in acked.values()}:
            served |= {m["id"]: (m["channel"], m["sender"], m["message"]) for m in read_channel(broker.url, channel)}
        assert {key: served.get(key) for key in acked} == acked
        # Anything else stored is a post whose answer the kill cut off; nothing is there twice.
        assert {(channel, text) for key, (channel, _, text) in served.items() if key not in acked} <= not_acked
        assert len({value[2] for value in served.values()}) == len(served)
        integrity, _ = database_rows(broker, read_only=True)
        assert integrity == ["ok"]
        broker.stop(signal.SIGKILL)  # the next round starts from a killed broker too

    integrity, rows = database_rows(broker)
    assert integrity == ["ok"]
    assert {key: rows.get(key) for key in acked} == acked


# -- full disk ----------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path, size):
    """A tmpfs of `size` mounted at path (needs root, as in CI); unmounted afterwards."""
    path.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            check=True,
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or str(error)
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {detail!r}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=20).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


def file_sizes(directory):
    return {path.name: path.stat().st_size for path in sorted(directory.iterdir())}


def assert_refused_cleanly(reply):
    """A post the broker could not store: 507 (or 503), with a JSON error."""
    assert reply.status_code in (507, 503), (reply.status_code, reply.text)
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body


# 2 MiB fills up before SQLite first checkpoints the write-ahead log (at 1000 pages, about
# 4 MiB); 10 MiB fills up after checkpoints began copying the log into the database file.
# (filesystem size, space the test frees). The broker refuses posts while less than
# min(5 MiB, a quarter of the filesystem) is free, so that SQLite's checkpoint of a full
# write-ahead log (4 MiB) always fits; posting resumes once more than that is free. The
# 20 MiB case goes through two checkpoints before it fills up.
@pytest.mark.parametrize(("size", "freed"), [("2m", 512 * 1024), ("20m", 6 * 1024 * 1024)])
def test_a_full_disk_refuses_posts_cleanly_and_loses_nothing(tmp_path, size, freed):
    with small_filesystem(tmp_path / "small", size) as disk:
        filler = disk / "filler"
        filler.write_bytes(os.urandom(freed))  # deleted later: the space the test frees
        broker = BrokerProcess(disk / "messages.db", env=LOADED)
        broker.log_path = tmp_path / "broker.log"  # not on the disk that fills up
        try:
            broker.start()
            master, workers = broker.process.pid, set(broker.worker_pids())
            url = broker.url
            session = requests.Session()
            acked, refusals = {}, []
            for n in range(2000):
                text = f"fill {n} " + "x" * 20000
                reply = session.post(f"{url}/messages/fill", json={"sender": "filler", "message": text}, timeout=10)
                if reply.status_code == 201:
                    acked[reply.json()["id"]] = text
                    continue
                refusals.append(reply)
                if len(refusals) >= 5:
                    break
            assert len(acked) >= 10, "the disk was full before the test began"
            assert len(refusals) == 5, "the disk never filled up"
            for reply in refusals:
                assert_refused_cleanly(reply)
            small = session.post(f"{url}/messages/fill", json={"sender": "filler", "message": "small"}, timeout=10)
            if small.status_code == 201:
                acked[small.json()["id"]] = "small"
            else:
                assert_refused_cleanly(small)

            # Full: the broker stays up and every read still answers.
            assert broker.process.poll() is None
            assert set(broker.worker_pids()) == workers, f"a worker died:\n{broker.log()[-3000:]}"
            assert [(m["id"], m["message"]) for m in read_channel(url, "fill")] == sorted(acked.items())
            for path, headers in [
                ("/status", {}),
                ("/channels", {}),
                ("/healthz", {}),
                ("/agents", {}),
                ("/messages/fill?limit=1", {"X-Agent-ID": "reader"}),  # its last-seen cannot be written
            ]:
                reply = session.get(url + path, headers=headers, timeout=10)
                assert reply.status_code == 200, (path, reply.status_code, reply.text)
            assert requests.get(f"{url}/channels", timeout=10).json()["channels"][0]["message_count"] == len(acked)

            # Room again: posting works again, and nothing was lost.
            filler.unlink()
            for n in range(5):
                reply = session.post(
                    f"{url}/messages/fill", json={"sender": "filler", "message": f"after {n}"}, timeout=10
                )
                assert reply.status_code == 201, (
                    f"post {n} after freeing {freed} bytes: {reply.status_code} {reply.text}; files {file_sizes(disk)}"
                )
                acked[reply.json()["id"]] = f"after {n}"
            assert [(m["id"], m["message"]) for m in read_channel(url, "fill")] == sorted(acked.items())
            assert broker.process.pid == master and set(broker.worker_pids()) == workers
            assert "Traceback" not in broker.log(), broker.log()[-5000:]
            session.close()
            broker.stop()
            assert broker.process.returncode == 0, broker.log()[-3000:]
            integrity, rows = database_rows(broker)
            assert integrity == ["ok"]
            assert {key: value[2] for key, value in rows.items()} == acked
        finally:
            broker.stop(signal.SIGKILL)


# -- restarts under watchers ----------------------------------------------------------------


def test_watchers_resume_across_a_restart_and_a_reload_with_every_message_once(own_broker):
    broker = own_broker(env=LOADED).start()
    url = broker.url
    # Half start from "now", half from an explicit cursor; three follow every channel.
    watchers = [Watcher(f"{url}/stream/live", last_event_id=None if n % 2 else 0) for n in range(20)]
    watchers += [Watcher(f"{url}/stream", last_event_id=None if n % 2 else 0) for n in range(3)]
    for watcher in watchers:
        watcher.start()
    for watcher in watchers:
        assert watcher.connected.wait(20), "a watcher never connected"

    texts = [f"live {n}" for n in range(150)] + [END]
    writer = Writer(url, "live", texts)
    writer.start()
    until(lambda: len(writer.acked) >= 40, 30, "40 posts before the restart")
    broker.stop()  # SIGTERM: streams end, the writer's posts fail until it is back
    broker.start()
    until(lambda: len(writer.acked) >= 90, 30, "90 posts before the reload")
    reload_gracefully(broker)
    writer.join(60)
    assert not writer.is_alive() and len(writer.acked) == len(texts)
    for watcher in watchers:
        watcher.join(max(0.1, watcher.deadline - time.monotonic()))

    stored = [(m["id"], m["message"]) for m in read_channel(url, "live")]
    assert [text for _, text in stored] == texts, "the writer's messages are not each stored once"
    assert writer.acked == stored
    assert writer.refused == [], "the broker refused posts during the restarts"
    for watcher in watchers:
        assert watcher.got == stored, f"{watcher.url} from {watcher.connections} connections"
        assert watcher.connections >= 3, "the restarts did not cut this watcher's stream"


def test_agent_chat_watch_prints_every_message_once_across_a_restart_and_a_reload(own_broker):
    broker = own_broker(env=LOADED).start()
    texts = [f"task {n}" for n in range(60)]
    command = [str(BIN / "agent-chat"), "watch", "tasks", "--after", "0", "--count", str(len(texts))]
    watch = subprocess.Popen(
        [*command, "--json", "--timeout", "90"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "AGENT_COMMS_BROKER": broker.url},
    )
    try:
        writer = Writer(broker.url, "tasks", texts, pause=0.02)
        writer.start()
        until(lambda: len(writer.acked) >= 20, 30, "20 posts before the restart")
        broker.stop()
        broker.start()
        until(lambda: len(writer.acked) >= 40, 30, "40 posts before the reload")
        reload_gracefully(broker)
        writer.join(60)
        out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    assert watch.returncode == 0, (watch.returncode, err)
    printed = [json.loads(line) for line in out.splitlines()]
    stored = [(m["id"], m["message"]) for m in read_channel(broker.url, "tasks")]
    assert [text for _, text in stored] == texts
    assert [(m["id"], m["message"]) for m in printed] == stored, "lost or repeated messages"
    assert writer.refused == []
