"""Backups and restores (agent_comms_broker.backup) on real SQLite files made by the real
Store, and an online backup taken while a real broker takes posts, restored and served."""

import os
import re
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

from agent_comms_broker.backup import BackupError, backup_database, check_database, restore_database
from agent_comms_broker.store import SCHEMA_VERSION, Store
from broker_process import BIN

# Anything a writer in these tests may do quickly, without the broker's rate limit.
UNLIMITED = {"AGENT_COMMS_RATE_LIMIT": "0"}


def make_database(path, texts, channel="general"):
    """A database the way the broker leaves it: the Store's schema, WAL mode."""
    store = Store(str(path))
    stored = store.append([(channel, "maker", text) for text in texts])
    store.close()
    return [(m.id, m.channel, m.sender, m.message) for m in stored]


def rows(path):
    """Every message of a database file, read with plain sqlite3 (read-only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT id, channel, sender, message FROM messages ORDER BY id").fetchall()
    finally:
        db.close()


def pragma(path, name):
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        db.close()


def left_open_by_a_killed_process(path, texts):
    """A database whose last commits are only in its -wal (the process that wrote them
    died without closing it), as a broker leaves it after SIGKILL or a power cut."""
    code = (
        "import os, sys\n"
        "from agent_comms_broker.store import Store\n"
        "Store(sys.argv[1]).append([('general', 'maker', t) for t in sys.argv[2:]])\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), *texts], check=True, timeout=30)
    assert os.path.getsize(f"{path}-wal") > 0


def corrupt(path, page):
    """Overwrite one page (not the schema's) of a database file with garbage."""
    size = pragma(path, "page_size")
    with open(path, "r+b") as file:
        file.seek((page - 1) * size)
        file.write(bytes(range(256)) * (size // 256))


# -- backup -------------------------------------------------------------------------------


def test_backup_is_one_private_checked_file(tmp_path):
    db = tmp_path / "messages.db"
    make_database(db, ["first"])
    store = Store(str(db))  # open, as the broker's workers keep it: the newest commits are in the -wal
    store.append([("tasks", "warp-ct200", f"task {n} ✅") for n in range(50)])
    assert os.path.getsize(f"{db}-wal") > 0
    backups = tmp_path / "backups"
    backups.mkdir()
    dest = backups / "copy.db"
    try:
        assert backup_database(db, dest) == 51
    finally:
        store.close()
    assert sorted(os.listdir(backups)) == ["copy.db"], "a companion or temporary file was left"
    assert os.stat(dest).st_mode & 0o777 == 0o600
    assert pragma(dest, "journal_mode") == "delete"
    assert pragma(dest, "user_version") == SCHEMA_VERSION
    assert rows(dest) == rows(db)
    assert check_database(dest) == 51


def test_a_failed_backup_leaves_nothing(tmp_path):
    db = tmp_path / "messages.db"
    make_database(db, [f"message {n} " + "x" * 500 for n in range(400)])
    assert os.path.getsize(db) > 40 * 4096
    corrupt(db, page=20)
    backups = tmp_path / "backups"
    backups.mkdir()
    with pytest.raises(BackupError, match="fails its integrity check") as refused:
        backup_database(db, backups / "copy.db")
    assert "\n" not in str(refused.value)
    assert os.listdir(backups) == []
    with pytest.raises(BackupError, match="fails its integrity check"):
        check_database(db)


def refusal_cases(tmp_path):
    good = tmp_path / "good.db"
    make_database(good, ["kept"])
    text = tmp_path / "notes.txt"
    text.write_text("not a database, but long enough to look like one? no.\n" * 200)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE things (id INTEGER PRIMARY KEY)")
    newer = tmp_path / "newer.db"
    make_database(newer, ["from the future"])
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    return {
        "missing": (tmp_path / "nothing.db", "no database at"),
        "a directory": (tmp_path, "is not a file"),
        "a text file": (text, "is not an agent-comms database"),
        "another program's database": (foreign, "is not an agent-comms database: it has no messages table"),
        "a newer schema": (newer, f"schema {SCHEMA_VERSION + 1}, newer than this broker's"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "a directory", "a text file", "another program's database", "a newer schema"]
)
def test_backup_check_and_restore_refuse_what_is_not_a_usable_database(tmp_path, case):
    path, fragment = refusal_cases(tmp_path)[case]
    backups = tmp_path / "backups"
    backups.mkdir()
    db = tmp_path / "good.db"
    before = rows(db)
    for attempt in (
        lambda: backup_database(path, backups / "copy.db"),
        lambda: check_database(path),
        lambda: restore_database(path, db),
    ):
        with pytest.raises(BackupError) as refused:
            attempt()
        assert fragment in str(refused.value) and "\n" not in str(refused.value)
    assert os.listdir(backups) == []
    assert rows(db) == before
    assert not [name for name in os.listdir(tmp_path) if "before-restore" in name]


def test_backup_never_overwrites(tmp_path):
    db = tmp_path / "messages.db"
    make_database(db, ["a"])
    dest = tmp_path / "copy.db"
    dest.write_text("an older backup")
    with pytest.raises(BackupError, match="exists already"):
        backup_database(db, dest)
    assert dest.read_text() == "an older backup"
    with pytest.raises(BackupError, match="exists already"):
        backup_database(db, db)
    with pytest.raises(BackupError, match="no directory"):
        backup_database(db, tmp_path / "absent" / "copy.db")
    assert rows(db) == [(1, "general", "maker", "a")]


# -- restore ------------------------------------------------------------------------------


def test_restore_keeps_the_replaced_database_and_its_wal(tmp_path):
    source = tmp_path / "source.db"
    backup = tmp_path / "backup.db"
    make_database(source, [f"backed up {n}" for n in range(7)])
    assert backup_database(source, backup) == 7
    backup_bytes = backup.read_bytes()
    db = tmp_path / "messages.db"
    make_database(db, ["old 1"])
    left_open_by_a_killed_process(db, ["old 2, only in the wal"])

    count, kept = restore_database(backup, db)

    assert count == 7
    assert re.fullmatch(re.escape(str(db)) + r"\.before-restore-\d{8}T\d{6}Z", kept), kept
    # The replaced database, with the commits only its -wal held, is all there.
    assert [row[3] for row in rows(kept)] == ["old 1", "old 2, only in the wal"]
    assert not os.path.exists(f"{db}-wal") or os.path.getsize(f"{db}-wal") == 0
    assert rows(db) == rows(source)
    assert backup.read_bytes() == backup_bytes, "the backup itself changed"
    store = Store(str(db))
    try:
        assert [m.message for m in store.after_id("general", 0, 100).messages] == [f"backed up {n}" for n in range(7)]
        assert store.append([("general", "after", "new")])[0].id == 8
    finally:
        store.close()


def test_a_second_restore_in_the_same_second_keeps_both(tmp_path):
    backup = tmp_path / "backup.db"
    make_database(backup, ["b"])
    db = tmp_path / "messages.db"
    make_database(db, ["first db"])
    _, first = restore_database(backup, db)
    _, second = restore_database(backup, db)
    assert first != second
    assert [row[3] for row in rows(first)] == ["first db"]
    assert [row[3] for row in rows(second)] == ["b"]


def test_restore_refuses_a_database_in_use(tmp_path):
    backup = tmp_path / "backup.db"
    make_database(backup, ["b"])
    db = tmp_path / "messages.db"
    make_database(db, ["live"])
    store = Store(str(db))
    try:
        with pytest.raises(BackupError, match="in use"):
            restore_database(backup, db)
        assert [m.message for m in store.latest("general", 10).messages] == ["live"]
    finally:
        store.close()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".") or "before-restore" in name]


def test_restore_onto_a_new_host(tmp_path):
    backup = tmp_path / "backup.db"
    make_database(backup, ["b1", "b2"])
    db = tmp_path / "state" / "messages.db"
    with pytest.raises(BackupError, match="no directory"):
        restore_database(backup, db)
    db.parent.mkdir()
    assert restore_database(backup, db) == (2, None)
    assert rows(db) == rows(backup)
    with pytest.raises(BackupError, match="is the database itself"):
        restore_database(db, db)


# -- online, against a real broker ----------------------------------------------------------


def write_until(url, channel, stop, acked, problems, deadline):
    """Post to one channel as fast as the broker answers; record each acknowledged message,
    and stop at the first post that is not."""
    session = requests.Session()
    for n in range(100_000):
        if stop.is_set() or time.monotonic() > deadline:
            break
        text = f"{channel} message {n}"
        try:
            reply = session.post(f"{url}/messages/{channel}", json={"sender": channel, "message": text}, timeout=10)
        except requests.RequestException as error:
            problems.append(f"{text}: {error!r}")
            break
        if reply.status_code != 201:
            problems.append(f"{text}: {reply.status_code} {reply.text}")
            break
        acked[reply.json()["id"]] = (channel, channel, text)
    session.close()


def test_online_backup_while_writers_post_then_restore(own_broker, tmp_path):
    broker = own_broker(env=UNLIMITED).start()
    stop = threading.Event()
    acked = {}  # id -> (channel, sender, message); dict writes are atomic under the GIL
    problems = []
    deadline = time.monotonic() + 30
    writers = [
        threading.Thread(
            target=write_until, args=(broker.url, f"writer-{n}", stop, acked, problems, deadline), daemon=True
        )
        for n in range(3)
    ]
    for writer in writers:
        writer.start()
    while len(acked) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    before_backup = dict(acked)
    backup = tmp_path / "backup.db"
    count = backup_database(broker.db_path, backup)
    while len(acked) < len(before_backup) + count // 2 + 50 and time.monotonic() < deadline:
        time.sleep(0.05)  # the writers go on while and after the backup is taken
    stop.set()
    for writer in writers:
        writer.join(20)
    assert not any(writer.is_alive() for writer in writers)
    assert problems == []

    copied = {row[0]: row[1:] for row in rows(backup)}
    assert len(copied) == count == check_database(backup)
    assert len(before_backup) >= 300, "the writers did not get going"
    # Every message acknowledged before the backup began is in it, unchanged.
    assert {key: copied.get(key) for key in before_backup} == before_backup
    # One snapshot: ids 1..n with no hole, each one a message some writer had acknowledged.
    assert sorted(copied) == list(range(1, count + 1))
    assert all(acked[key] == value for key, value in copied.items())
    assert len(acked) > count, "no post landed after the backup: it did not run alongside writers"

    broker.stop()
    restored, kept = restore_database(backup, broker.db_path)
    assert restored == count
    assert {row[0]: row[1:] for row in rows(kept)} == acked  # nothing of the replaced database lost
    broker.start()
    for n in range(3):
        channel = f"writer-{n}"
        page = requests.get(f"{broker.url}/messages/{channel}", params={"after": 0, "limit": 1000}, timeout=10).json()
        served = [(m["id"], m["channel"], m["sender"], m["message"]) for m in page["messages"]]
        assert not page["more"]
        assert served == [(key, *value) for key, value in sorted(copied.items()) if value[0] == channel]
    status = requests.get(f"{broker.url}/status", timeout=10).json()
    assert status["messages"] == count


def test_backup_and_restore_commands(own_broker, tmp_path):
    """`agent-comms-broker backup` while the broker runs, `restore` once it is stopped."""
    broker = own_broker().start()
    for n in range(3):
        requests.post(f"{broker.url}/messages/cli", json={"sender": "a", "message": f"m{n}"}, timeout=10)
    command = [str(BIN / "agent-comms-broker")]
    copy = tmp_path / "copy.db"
    done = subprocess.run([*command, "backup", str(copy), "--db", broker.db_path], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("3 messages backed up"), done.stderr
    again = subprocess.run([*command, "backup", str(copy), "--db", broker.db_path], capture_output=True, text=True)
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1
    checked = subprocess.run([*command, "check", str(copy)], capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.startswith("3 messages in"), checked.stderr
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("hello")
    refused = subprocess.run([*command, "check", str(not_a_db)], capture_output=True, text=True)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    busy = subprocess.run([*command, "restore", str(copy), "--db", broker.db_path], capture_output=True, text=True)
    assert busy.returncode == 1 and "in use" in busy.stderr
    requests.post(f"{broker.url}/messages/cli", json={"sender": "a", "message": "after the backup"}, timeout=10)
    broker.stop()
    done = subprocess.run([*command, "restore", str(copy), "--db", broker.db_path], capture_output=True, text=True)
    assert done.returncode == 0 and "3 messages restored" in done.stdout and "kept as" in done.stdout, done.stderr
    broker.start()
    texts = [m["message"] for m in requests.get(f"{broker.url}/messages/cli", timeout=10).json()["messages"]]
    assert texts == ["m0", "m1", "m2"]
