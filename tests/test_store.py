"""Unit tests of the store's edge cases: ordering, cursors, ties, retention, migration."""

import itertools
import sqlite3
import threading

import pytest

from agent_comms_broker.store import SCHEMA_VERSION, Filter, Post, Store
from legacy_broker import legacy_database


@pytest.fixture
def store(new_store):
    """A store on each backend."""
    return new_store()


def test_ids_and_timestamps_rise_even_when_the_clock_goes_back(store):
    first = store.append([("general", "a", "one")], now=2000.0)
    second = store.append([("general", "a", "two"), ("tasks", "b", "three")], now=1000.0)
    stored = first + second
    assert [m.id for m in stored] == sorted(m.id for m in stored)
    stamps = [m.timestamp for m in stored]
    assert all(later > earlier for earlier, later in itertools.pairwise(stamps))
    assert stamps[0] == 2000.0


def test_one_append_of_many_kinds_of_posts_answers_what_was_stored(store):
    """Plain posts go in several to a statement, a keyed post or a reply on its own after
    the rows before it: every Message answered is the row stored, ids in order."""
    earlier = store.append([Post("c", "a", "keyed earlier", key="k0")])[0]
    posts = [Post("c", "a", f"plain {n}", tags=("t",) if n % 3 == 0 else ()) for n in range(70)]
    posts[10] = Post("c", "a", "keyed", key="k1")
    posts[11] = Post("c", "a", "keyed again", key="k1")  # the same key in the same append
    posts[12] = Post("c", "a", "keyed before", key="k0")
    posts[13] = Post("c", "b", "a reply to plain 5", reply_to=earlier.id + 6)
    answered = store.append(posts)
    assert [m.duplicate for m in answered[10:13]] == [False, True, True]
    assert answered[11].id == answered[10].id and answered[12].id == earlier.id
    new = [m for m in answered if not m.duplicate]
    assert [m.id for m in new] == list(range(earlier.id + 1, earlier.id + 1 + len(new)))
    assert answered[13].thread == earlier.id + 6 and answered[13].reply_to == earlier.id + 6
    for message in new:
        assert store.message("c", message.id) == message
    tagged = store.latest("c", 100, only=Filter(tag="t")).messages
    assert [m.id for m in tagged] == [m.id for m in new if m.tags == ("t",)]


def test_latest_is_oldest_first_and_limited(store):
    for n in range(5):
        store.append([("general", "a", f"m{n}")])
    page = store.latest("general", 3)
    assert [m.message for m in page.messages] == ["m2", "m3", "m4"]
    assert page.cursor == page.messages[-1].id


def test_after_pages_through_everything_once(store):
    store.append([("general", "a", f"m{n}") for n in range(25)])
    seen, cursor = [], 0
    while True:
        page = store.after_id("general", cursor, 10)
        seen += [m.message for m in page.messages]
        cursor = page.cursor
        if not page.more:
            break
    assert seen == [f"m{n}" for n in range(25)]
    assert store.after_id("general", cursor, 10).messages == []


def test_since_pages_through_everything_once(store):
    for n in range(12):
        store.append([("general", "a", f"m{n}")])
    seen, since = [], 0.0
    while True:
        page = store.after_time("general", since, 5)
        seen += [m.message for m in page.messages]
        if not page.messages:
            break
        since = page.messages[-1].timestamp
    assert seen == [f"m{n}" for n in range(12)]


def test_adopts_the_legacy_database(tmp_path):
    path = str(tmp_path / "seed.db")
    legacy_database(
        path,
        [
            ("general", "warp-ct200", "Hello from agent!", "2025-08-03 18:42:28"),
            ("tasks", "warp-ct200", "Task completed successfully", "2025-08-03 18:42:29"),
            ("general", "monitor", "CPU usage: 45%", "2025-08-03 18:43:00"),
        ],
        agents=[("warp-ct200", "2025-08-03 18:42:29"), ("monitor", "2025-08-03 18:43:00")],
    )
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION
    page = store.latest("general", 10)
    assert [(m.id, m.sender, m.message) for m in page.messages] == [
        (1, "warp-ct200", "Hello from agent!"),
        (3, "monitor", "CPU usage: 45%"),
    ]
    assert page.messages[0].timestamp == 1754246548.0  # 2025-08-03 18:42:28 UTC
    assert store.channels() == [("general", 2, 1754246580.0), ("tasks", 1, 1754246549.0)]
    agents = {row[0]: row for row in store.agents()}
    assert agents["warp-ct200"] == ("warp-ct200", 1754246548.0, 1754246549.0, 2)
    new = store.append([("general", "a", "after the upgrade")])
    assert new[0].id == 4 and new[0].timestamp > 1754246580.0
    store.close()
    assert Store(path).latest("general", 10).messages[-1].message == "after the upgrade"


def test_since_never_splits_messages_sharing_a_timestamp(tmp_path):
    """Seed data has one-second timestamps: a page must not cut such a group in two."""
    path = str(tmp_path / "seed.db")
    legacy_database(
        path,
        [("general", "a", f"m{n}", "2025-08-03 18:42:28") for n in range(4)]
        + [("general", "a", "last", "2025-08-03 18:42:30")],
    )
    store = Store(path)
    page = store.after_time("general", 0, 2)
    assert [m.message for m in page.messages] == ["m0", "m1", "m2", "m3"]
    assert page.more
    rest = store.after_time("general", page.messages[-1].timestamp, 2)
    assert [m.message for m in rest.messages] == ["last"] and not rest.more


def test_retention_by_count_flags_a_gap_for_old_cursors(store):
    store.append([("general", "a", f"m{n}") for n in range(10)])
    store.append([("tasks", "a", "kept")])
    assert store.prune(max_messages=4) == 6
    page = store.after_id("general", 0, 50)
    assert [m.message for m in page.messages] == ["m6", "m7", "m8", "m9"]
    assert page.gap
    assert not store.after_id("general", page.messages[0].id - 1, 50).gap
    assert not store.after_id("tasks", 0, 50).gap
    assert store.channels()[0][:2] == ("general", 4)
    assert store.after_time("general", 0, 50).gap


def test_retention_by_age(store):
    store.append([("general", "a", "old")], now=1000.0)
    store.append([("general", "a", "new")], now=5000.0)
    assert store.prune(max_age=100, now=5050.0) == 1
    page = store.after_id("general", 0, 50)
    assert [m.message for m in page.messages] == ["new"] and page.gap
    assert store.pruned_after(0) and not store.pruned_after(page.messages[0].id)


def test_ids_never_reused_after_retention_empties_a_channel(store):
    last = store.append([("general", "a", "x")])[0]
    store.prune(max_age=1, now=last.timestamp + 10)
    assert store.append([("general", "a", "y")])[0].id > last.id


def test_concurrent_writers_commit_in_id_and_timestamp_order(new_store):
    """Eight connections (as eight workers would) writing at once: no id or time inversions."""
    new_store().close()
    errors = []

    def write(n):
        own = new_store()
        try:
            for i in range(100):
                own.append([("general", f"writer-{n}", f"{n}-{i}")])
        except Exception as error:
            errors.append(error)
        finally:
            own.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    reader = new_store()
    messages = reader.after_id("general", 0, 1000).messages
    assert len(messages) == 800
    stamps = [m.timestamp for m in messages]
    assert all(later > earlier for earlier, later in itertools.pairwise(stamps))
    for n in range(8):
        mine = [m.message for m in messages if m.sender == f"writer-{n}"]
        assert mine == [f"{n}-{i}" for i in range(100)]


def test_refuses_a_newer_schema(tmp_path):
    path = str(tmp_path / "future.db")
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(path)


def test_opening_needs_no_write_lock_once_migrated(tmp_path):
    """A worker starting while another process holds the write lock can still read."""
    path = str(tmp_path / "store.db")
    Store(path).append([("general", "a", "x")])
    holder = sqlite3.connect(path, isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        opened = Store(path, busy_deadline=0.2)
        assert [m.message for m in opened.latest("general", 10).messages] == ["x"]
    finally:
        holder.execute("ROLLBACK")


def test_a_granted_read_of_every_channel_steps_through_ids_it_may_not_see(store):
    """A reader granted some channels only walks the ids in bounded windows: each read
    looks at GRANTED_WINDOW ids at most, and walking on from each cursor finds exactly the
    granted messages, in order."""
    from agent_comms_broker import store as store_module

    store.append([("other", "a", f"o{n}") for n in range(store_module.GRANTED_WINDOW * 2 + 5)])
    granted = store.append([("team-a", "a", "one"), ("tasks", "a", "two"), ("team-b", "a", "three")])
    store.append([("other", "a", "after")])
    first = store.all_after_id(0, 500, None, "team-*,tasks")
    assert first.messages == [] and first.more and first.cursor == store_module.GRANTED_WINDOW
    seen, cursor, steps = [], 0, 0
    while True:
        page = store.all_after_id(cursor, 2, None, "team-*,tasks")
        seen += page.messages
        cursor, steps = page.cursor, steps + 1
        if not page.more:
            break
    assert seen == granted and steps <= 5
    assert store.all_after_id(0, 10, None, "").messages == []
    assert len(store.all_after_id(0, 10, None, "*").messages) == 10


def test_a_write_that_waits_past_its_deadline_is_refused_busy_and_stores_nothing(new_store, backend):
    """Another writer holds the write lock (SQLite's, or PostgreSQL's writer row) past the
    store's busy deadline: StoreBusy (a 503), and nothing stored; once it lets go, posts go in."""
    import time

    from agent_comms_broker.store import StoreBusy

    store = new_store(busy_deadline=0.5)
    store.append([("c", "s", "first")])
    if backend == "postgres":
        import psycopg

        holder = psycopg.connect(store.url, autocommit=True)
        holder.execute("BEGIN")
        holder.execute("SELECT last_id FROM writer FOR UPDATE")
    else:
        holder = sqlite3.connect(store.path, isolation_level=None, timeout=0)
        holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreBusy):
            store.append([("c", "s", "refused")])
        assert 0.4 < time.monotonic() - started < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [m.message for m in store.latest("c", 10).messages] == ["first"]
    assert store.append([("c", "s", "after")])[0].message == "after"
