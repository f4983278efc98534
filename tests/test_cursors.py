"""Cursor correctness under concurrency: 8 writers and 8 readers on one channel across two
workers; every reader, whether it follows `after=ID` or `since=TIMESTAMP`, sees every
message exactly once and in order."""

import itertools
import threading
import time

import pytest
import requests


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def broker_backend(request):
    """Every test here runs on both store backends."""
    return request.param


WRITERS = 8
PER_WRITER = 60


def write(url, channel, n, errors):
    session = requests.Session()
    try:
        for i in range(PER_WRITER):
            reply = session.post(
                f"{url}/messages/{channel}", json={"sender": f"w{n}", "message": f"{n}:{i}"}, timeout=10
            )
            assert reply.status_code == 201, reply.text
    except Exception as error:  # reported by the test thread
        errors.append(error)


def read(url, channel, mode, seen, done, errors):
    """Poll with the cursor of the last message received, as an agent script does."""
    session = requests.Session()
    cursor = {"after": 0} if mode == "after" else {"since": 0}
    try:
        while True:
            finished = done.is_set()
            page = session.get(f"{url}/messages/{channel}", params={**cursor, "limit": 7}, timeout=10).json()
            seen.extend(page["messages"])
            if page["messages"]:
                last = page["messages"][-1]
                cursor = {"after": last["id"]} if mode == "after" else {"since": last["timestamp"]}
            elif finished:
                return
    except Exception as error:
        errors.append(error)


def test_concurrent_writers_and_readers_lose_and_repeat_nothing(url, channel):
    errors, done = [], threading.Event()
    readers = {f"{mode}-{n}": [] for mode in ("after", "since") for n in range(4)}
    reader_threads = [
        threading.Thread(target=read, args=(url, channel, name.split("-")[0], seen, done, errors))
        for name, seen in readers.items()
    ]
    writer_threads = [threading.Thread(target=write, args=(url, channel, n, errors)) for n in range(WRITERS)]
    for thread in reader_threads + writer_threads:
        thread.start()
    for thread in writer_threads:
        thread.join(120)
    done.set()
    for thread in reader_threads:
        thread.join(120)
    assert not errors, errors

    stored = []
    cursor = 0
    while True:
        page = requests.get(f"{url}/messages/{channel}", params={"after": cursor, "limit": 1000}).json()
        stored += page["messages"]
        cursor = page["cursor"]
        if not page["more"]:
            break
    assert len(stored) == WRITERS * PER_WRITER
    ids = [m["id"] for m in stored]
    stamps = [m["timestamp"] for m in stored]
    assert ids == sorted(set(ids))
    assert all(later > earlier for earlier, later in itertools.pairwise(stamps)), (
        "timestamps must rise in commit (id) order"
    )
    for n in range(WRITERS):
        assert [m["message"] for m in stored if m["sender"] == f"w{n}"] == [f"{n}:{i}" for i in range(PER_WRITER)]
    for name, seen in readers.items():
        assert [m["id"] for m in seen] == ids, f"reader {name} lost or repeated messages"


def test_long_poll_followers_see_every_message(url, channel):
    """Readers blocking on wait= while writers post: the same exactly-once guarantee."""
    errors, seen_by = [], [[] for _ in range(4)]
    total = 4 * 30

    def follow(seen):
        session, cursor = requests.Session(), 0
        deadline = time.monotonic() + 60
        while len(seen) < total and time.monotonic() < deadline:
            page = session.get(f"{url}/messages/{channel}", params={"after": cursor, "wait": 5}, timeout=15).json()
            seen.extend(m["id"] for m in page["messages"])
            cursor = page["cursor"]

    def post_some(n):
        session = requests.Session()
        for i in range(30):
            if (
                session.post(f"{url}/messages/{channel}", json={"sender": "w", "message": f"{n}:{i}"}).status_code
                != 201
            ):
                errors.append((n, i))

    followers = [threading.Thread(target=follow, args=(seen,)) for seen in seen_by]
    writers = [threading.Thread(target=post_some, args=(n,)) for n in range(4)]
    for thread in followers + writers:
        thread.start()
    for thread in followers + writers:
        thread.join(90)
    assert not errors
    everything = [
        m["id"]
        for m in requests.get(f"{url}/messages/{channel}", params={"after": 0, "limit": 1000}).json()["messages"]
    ]
    assert len(everything) == total
    for seen in seen_by:
        assert seen == everything


def test_a_cursor_past_every_id_given_is_refused_not_silently_ahead(own_broker):
    """A cursor no reply gave (made up, or kept from before the database was restored from
    an older backup) would skip every message until the ids caught up: it is a 400."""
    broker = own_broker(env={"AGENT_COMMS_RETENTION_MAX_AGE": "1", "AGENT_COMMS_PRUNE_INTERVAL": "0.2"}).start()
    posted = requests.post(f"{broker.url}/messages/ahead", json={"sender": "a", "message": "m"}, timeout=10).json()
    last = posted["id"]
    for params, headers, path in (
        ({"after": last + 40}, {}, "/messages/ahead"),
        ({"after": last + 1, "wait": "1"}, {}, "/messages/ahead"),
        ({}, {"Last-Event-ID": str(last + 40)}, "/stream/ahead"),
        ({"after": last + 40}, {}, "/stream"),
    ):
        reply = requests.get(broker.url + path, params=params, headers=headers, timeout=10)
        assert reply.status_code == 400 and "past the newest message id" in reply.json()["error"], reply.text
    # The newest id given stays a valid cursor, also once retention has removed it.
    deadline = time.monotonic() + 20
    while requests.get(f"{broker.url}/status", timeout=10).json()["messages"] and time.monotonic() < deadline:
        time.sleep(0.2)
    page = requests.get(f"{broker.url}/messages/ahead", params={"after": last}, timeout=10).json()
    assert page["messages"] == [] and page["cursor"] == last
