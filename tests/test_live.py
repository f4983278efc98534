"""Live delivery: long-poll, Server-Sent Events, resume with Last-Event-ID across a restart,
and a post to one gunicorn worker waking watchers in the other."""

import threading
import time

import pytest
import requests

from broker_process import sessions_on_two_workers
from conftest import post
from sse_client import EventStream


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def broker_backend(request):
    """Every test here runs on both store backends."""
    return request.param


def post_later(url, channel, text, delay, session=None):
    def run():
        time.sleep(delay)
        (session or requests).post(f"{url}/messages/{channel}", json={"sender": "later", "message": text})

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_long_poll_returns_when_a_message_arrives(url, channel):
    cursor = requests.get(f"{url}/messages/{channel}").json()["cursor"]
    poster = post_later(url, channel, "wake up", 0.5)
    started = time.monotonic()
    reply = requests.get(f"{url}/messages/{channel}", params={"after": cursor, "wait": 30}, timeout=40).json()
    elapsed = time.monotonic() - started
    poster.join()
    assert [m["message"] for m in reply["messages"]] == ["wake up"]
    assert reply["cursor"] == reply["messages"][0]["id"]
    assert elapsed < 15, "the long-poll waited out its time instead of waking"


def test_long_poll_times_out_empty_with_the_same_cursor(url, channel):
    cursor = post(url, channel, "a", "before")["id"]
    reply = requests.get(f"{url}/messages/{channel}", params={"after": cursor, "wait": 1}, timeout=10).json()
    assert reply["messages"] == [] and reply["cursor"] == cursor


def test_long_poll_with_since(url, channel):
    stamp = post(url, channel, "a", "before")["timestamp"]
    poster = post_later(url, channel, "after", 0.3)
    reply = requests.get(f"{url}/messages/{channel}", params={"since": stamp, "wait": 20}, timeout=30).json()
    poster.join()
    assert [m["message"] for m in reply["messages"]] == ["after"]


def test_a_post_to_one_worker_wakes_a_long_poll_in_the_other(url, channel):
    waiting, posting = sessions_on_two_workers(url)
    cursor = waiting.get(f"{url}/messages/{channel}").json()["cursor"]
    poster = post_later(url, channel, "across workers", 0.5, session=posting)
    started = time.monotonic()
    reply = waiting.get(f"{url}/messages/{channel}", params={"after": cursor, "wait": 30}, timeout=40).json()
    poster.join()
    assert [m["message"] for m in reply["messages"]] == ["across workers"]
    assert time.monotonic() - started < 15


def test_a_post_to_one_worker_reaches_an_sse_stream_in_the_other(url, channel):
    watching, posting = sessions_on_two_workers(url)
    stream = EventStream(f"{url}/stream/{channel}", session=watching)
    try:
        for n in range(3):
            posting.post(f"{url}/messages/{channel}", json={"sender": "b", "message": f"m{n}"}).raise_for_status()
        assert [m["message"] for m in stream.messages(3)] == ["m0", "m1", "m2"]
    finally:
        stream.close()


def test_sse_event_ids_are_message_ids_and_resume_loses_nothing(url, channel):
    stream = EventStream(f"{url}/stream/{channel}")
    sent = [post(url, channel, "a", f"m{n}") for n in range(5)]
    events = []
    for event in stream.events():
        if "data" in event:
            events.append(event)
        if len(events) == 3:
            break
    stream.close()
    assert [int(e["id"]) for e in events] == [m["id"] for m in sent[:3]]
    resumed = EventStream(f"{url}/stream/{channel}", last_event_id=events[-1]["id"])
    later = post(url, channel, "a", "m5")
    got = resumed.messages(3)
    resumed.close()
    assert [m["id"] for m in got] == [sent[3]["id"], sent[4]["id"], later["id"]]


def test_sse_without_a_cursor_starts_with_new_messages(url, channel):
    post(url, channel, "a", "old")
    stream = EventStream(f"{url}/stream/{channel}")
    post(url, channel, "a", "new")
    assert [m["message"] for m in stream.messages(1)] == ["new"]
    stream.close()


def test_sse_after_query_parameter(url, channel):
    first = post(url, channel, "a", "one")
    post(url, channel, "a", "two")
    stream = EventStream(f"{url}/stream/{channel}", params={"after": first["id"]})
    assert [m["message"] for m in stream.messages(1)] == ["two"]
    stream.close()


def test_stream_of_every_channel(url, channel):
    stream = EventStream(f"{url}/stream")
    sent = [post(url, f"{channel}-{n % 3}", "a", f"m{n}") for n in range(6)]
    got = stream.messages(6)
    stream.close()
    assert [(m["id"], m["channel"]) for m in got] == [(m["id"], m["channel"]) for m in sent]


def test_sse_sends_keep_alive_comments(own_broker):
    broker = own_broker(env={"AGENT_COMMS_KEEPALIVE": "0.3"}).start()
    stream = EventStream(f"{broker.url}/stream/quiet")
    first = next(stream.events())
    assert first == {"retry": "2000"}
    deadline = time.monotonic() + 5
    lines = stream._lines()
    while not stream.comments and time.monotonic() < deadline:
        line = next(lines)
        if line.startswith(":"):
            stream.comments.append(line)
    stream.close()
    assert stream.comments and stream.comments[0] == ": keep-alive"


def test_a_watching_agent_stays_active(own_broker):
    """An agent that only watches is refreshed on every keep-alive, so it never goes offline."""
    broker = own_broker(env={"AGENT_COMMS_KEEPALIVE": "0.5"}).start()
    watching = requests.get(
        f"{broker.url}/stream/quiet",
        headers={"Accept": "text/event-stream", "X-Agent-ID": "watcher-7"},
        stream=True,
        timeout=10,
    )

    def last_seen():
        agents = requests.get(f"{broker.url}/agents").json()["agents"]
        return next(a["last_seen"] for a in agents if a["id"] == "watcher-7")

    first = last_seen()
    deadline = time.monotonic() + 8
    while last_seen() == first:
        assert time.monotonic() < deadline, "last_seen did not move while the agent watched"
        time.sleep(0.3)
    watching.close()


def test_sse_resumes_across_a_broker_restart(own_broker):
    broker = own_broker().start()
    url = broker.url
    stream = EventStream(f"{url}/stream/tasks", timeout=30)
    first = [post(url, "tasks", "a", f"m{n}") for n in range(5)]
    got = stream.messages(5)
    last_id = got[-1]["id"]
    broker.stop()
    # The stream ends with the broker instead of hanging.
    assert list(stream.events()) == []
    broker.start()
    while_away = [post(url, "tasks", "a", f"away{n}") for n in range(5)]
    resumed = EventStream(f"{url}/stream/tasks", last_event_id=last_id)
    after = post(url, "tasks", "a", "live")
    got += resumed.messages(6)
    resumed.close()
    expected = [m["id"] for m in first + while_away] + [after["id"]]
    assert [m["id"] for m in got] == expected


def test_retention_gap_is_flagged(own_broker):
    broker = own_broker(env={"AGENT_COMMS_RETENTION_MAX_MESSAGES": "3", "AGENT_COMMS_PRUNE_INTERVAL": "0.2"}).start()
    url = broker.url
    sent = [post(url, "alerts", "a", f"m{n}") for n in range(10)]
    deadline = time.monotonic() + 10
    while requests.get(f"{url}/channels").json()["channels"][0]["message_count"] > 3:
        assert time.monotonic() < deadline, "retention did not prune"
        time.sleep(0.1)
    page = requests.get(f"{url}/messages/alerts", params={"after": 0}).json()
    assert page["gap"] is True
    assert [m["id"] for m in page["messages"]] == [m["id"] for m in sent[-3:]]
    assert requests.get(f"{url}/messages/alerts", params={"after": sent[-4]["id"]}).json()["gap"] is False
    assert requests.get(f"{url}/messages/alerts", params={"since": 0}).json()["gap"] is True
    stream = EventStream(f"{url}/stream/alerts", last_event_id=0)
    events = stream.events()
    assert next(events) == {"retry": "2000"}
    assert next(events) == {"event": "gap", "data": '{"cursor": 0}'}
    assert [m["id"] for m in stream.messages(3)] == [m["id"] for m in sent[-3:]]
    stream.close()


def test_streams_park_and_each_gets_every_message_in_order(own_broker):
    """A caught-up stream is parked: its request is over (the access log has its line while
    the stream is still open) and the worker's hub writes each new message to it. Each of
    40 gets every message once, in order, small ones and ones too large for one write."""
    broker = own_broker().start()
    streams = [EventStream(f"{broker.url}/stream/parked", timeout=30) for _ in range(40)]
    deadline = time.monotonic() + 10
    while broker.log().count("GET /stream/parked") < 40:
        assert time.monotonic() < deadline, "the streams were not parked"
        time.sleep(0.1)
    texts = [f"m{n}" for n in range(20)] + [f"{n}" * 60000 for n in range(5)] + ["last"]
    for text in texts:
        post(broker.url, "parked", "a", text)
    for stream in streams:
        assert [m["message"] for m in stream.messages(len(texts))] == texts
        stream.close()


def test_posts_that_arrive_while_the_writer_waits_for_the_lock_share_its_commit(tmp_path):
    """The group committer takes its posts once it holds the write lock: while another
    writer holds it, the posts that come in join the waiting transaction, one commit."""
    import fcntl

    import gevent
    from gevent.threadpool import ThreadPool

    from agent_comms_broker.live import GroupCommitter
    from agent_comms_broker.store import Post, Store

    path = str(tmp_path / "m.db")
    writer = Store(path, writers_queue=True, thread=ThreadPool(1))
    commits = []
    committer = GroupCommitter(writer, commits.append)
    other = open(path + "-writers", "rb")  # another worker, committing
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        first = gevent.spawn(committer.append, [Post("c", "a", "first")])
        gevent.sleep(0.2)  # the committer's thread now waits for the lock
        later = [gevent.spawn(committer.append, [Post("c", "a", f"later {n}")]) for n in range(3)]
        gevent.sleep(0.2)
        assert not first.ready()
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        other.close()
    gevent.joinall([first, *later], timeout=10, raise_error=True)
    ids = [greenlet.value[0].id for greenlet in (first, *later)]
    assert ids == [1, 2, 3, 4] and commits == [4]
    writer.close()


def _committers_store(path):
    """A worker's committer store as wsgi.Runtime opens it: a connection of its own, the
    workers' turn file, and a thread for its waits (without fsync here: a commit's time
    is the pause the tests put before it)."""
    from gevent.threadpool import ThreadPool

    from agent_comms_broker.store import Store

    return Store(path, synchronous="OFF", writers_queue=True, thread=ThreadPool(1))


def test_a_committers_store_waits_for_the_lock_in_its_thread_and_commits_there_only_on_a_slow_disk(tmp_path):
    """While another worker holds the write lock the committer's store waits for it in
    its thread (the worker's event loop goes on); a quick commit runs where the
    statements do, and commits that take a millisecond or more (a slow disk's fsync,
    stood in for by a pause before each COMMIT) go to the thread too, until they are
    quick again."""
    import fcntl

    import gevent

    from agent_comms_broker.store import Post

    path = str(tmp_path / "m.db")
    store = _committers_store(path)
    caller = threading.get_ident()
    ran, pause = [], [0.0]

    def traced(statement):  # runs in the thread that runs the statement
        if statement in ("BEGIN IMMEDIATE", "COMMIT"):
            ran.append((statement, "caller" if threading.get_ident() == caller else "thread"))
        if statement == "COMMIT":
            time.sleep(pause[0])

    store._db.set_trace_callback(traced)

    def post(text):
        ran.clear()
        store.append([Post("c", "a", text)])
        return dict(ran)

    assert post("quick") == {"BEGIN IMMEDIATE": "caller", "COMMIT": "caller"}

    other = open(path + "-writers", "rb")  # another worker, committing
    fcntl.flock(other, fcntl.LOCK_EX)
    ran.clear()
    waiting = gevent.spawn(store.append, [Post("c", "a", "after the other")])
    gevent.sleep(0.2)
    assert not waiting.ready() and ran == []  # the thread waits; this loop runs on
    fcntl.flock(other, fcntl.LOCK_UN)
    other.close()
    waiting.get(timeout=10)
    assert dict(ran) == {"BEGIN IMMEDIATE": "thread", "COMMIT": "caller"}

    pause[0] = 0.005
    slow = [post(f"slow {n}") for n in range(4)]
    assert slow[0] == {"BEGIN IMMEDIATE": "caller", "COMMIT": "caller"}  # measured so far: quick
    assert slow[-1] == {"BEGIN IMMEDIATE": "thread", "COMMIT": "thread"}
    pause[0] = 0.0
    quick = [post(f"quick again {n}") for n in range(20)]
    assert quick[0] == {"BEGIN IMMEDIATE": "thread", "COMMIT": "thread"}
    assert quick[-1] == {"BEGIN IMMEDIATE": "caller", "COMMIT": "caller"}
    assert len(store.latest("c", 100).messages) == 26
    store.close()


def test_a_write_stopped_while_it_waits_for_the_lock_leaves_the_lock_free(tmp_path):
    """A write whose greenlet is killed while its thread waits for the lock (a worker
    stopping) does not keep the lock once the thread gets it: another worker writes, and
    the store still does, also at once, while its thread still has the stopped write's
    steps to finish (twenty times); the stopped post is not stored."""
    import fcntl

    import gevent

    from agent_comms_broker.store import Post, Store

    for n in range(20):
        path = str(tmp_path / f"{n}.db")
        store = _committers_store(path)
        other = open(path + "-writers", "rb")
        fcntl.flock(other, fcntl.LOCK_EX)
        waiting = gevent.spawn(store.append, [Post("c", "a", "stopped")])
        gevent.sleep(0.02)
        waiting.kill()
        fcntl.flock(other, fcntl.LOCK_UN)
        store.append([Post("c", "a", "this worker at once", tags=("t1", "t2"))])
        deadline = time.monotonic() + 5
        while True:  # the lock is free again
            gevent.sleep(0.01)
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the stopped write kept the workers' turn"
        fcntl.flock(other, fcntl.LOCK_UN)
        other.close()
        another = Store(path, busy_deadline=2)  # StoreBusy if SQLite's lock were still held
        another.append([Post("c", "b", "another worker")])
        store.append([Post("c", "a", "this worker again")])
        texts = [message.message for message in another.latest("c", 10).messages]
        assert texts == ["this worker at once", "another worker", "this worker again"]
        another.close()
        store.close()
