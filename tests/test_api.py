"""Every endpoint of the broker and every error it answers, against a real broker."""

import json
import socket
import time

import pytest
import requests

from conftest import post


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def broker_backend(request):
    """Every test here runs on both store backends."""
    return request.param


def test_post_answers_201_with_the_stored_message(url, channel):
    reply = requests.post(f"{url}/messages/{channel}", json={"sender": "warp-ct200", "message": "hi"})
    assert reply.status_code == 201
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert body["status"] == "success"
    assert body["channel"] == channel and body["sender"] == "warp-ct200" and body["message"] == "hi"
    assert isinstance(body["id"], int) and isinstance(body["timestamp"], float)
    assert abs(body["timestamp"] - time.time()) < 5


def test_get_returns_the_latest_oldest_first(url, channel):
    ids = [post(url, channel, "a", f"m{n}")["id"] for n in range(60)]
    default = requests.get(f"{url}/messages/{channel}").json()
    assert [m["id"] for m in default["messages"]] == ids[-50:]
    assert default["count"] == 50 and default["cursor"] == ids[-1] and default["gap"] is False
    limited = requests.get(f"{url}/messages/{channel}", params={"limit": 10}).json()
    assert [m["message"] for m in limited["messages"]] == [f"m{n}" for n in range(50, 60)]
    assert set(limited["messages"][0]) >= {"id", "channel", "sender", "message", "timestamp"}


def test_unicode_and_multiline_messages_round_trip(url, channel):
    text = "✅ Download completed: movie.mkv\nline two\t⚠️ 日本語 🚀"
    post(url, channel, "warp-ct200", text)
    assert requests.get(f"{url}/messages/{channel}").json()["messages"][-1]["message"] == text


def test_batch_publish_is_one_transaction(url, channel):
    batch = [{"sender": "a", "message": f"b{n}"} for n in range(20)]
    reply = requests.post(f"{url}/messages/{channel}", json=batch)
    assert reply.status_code == 201
    stored = reply.json()["messages"]
    assert reply.json()["count"] == 20
    assert [m["message"] for m in stored] == [f"b{n}" for n in range(20)]
    assert [m["id"] for m in stored] == list(range(stored[0]["id"], stored[0]["id"] + 20))
    bad = [*batch, {"sender": "a"}]
    reply = requests.post(f"{url}/messages/{channel}", json=bad)
    assert reply.status_code == 400 and "item 20" in reply.json()["error"]
    assert requests.get(f"{url}/messages/{channel}", params={"limit": 100}).json()["count"] == 20


def test_channels_lists_counts_and_last_activity(url, channel):
    post(url, channel, "a", "one")
    last = post(url, channel, "a", "two")
    listing = requests.get(f"{url}/channels").json()["channels"]
    mine = next(entry for entry in listing if entry["name"] == channel)
    assert mine["message_count"] == 2
    assert mine["last_activity"] == last["timestamp"]


def test_agents_register_by_posting_and_by_reading(url, channel):
    sender = f"sender-{channel}"
    reader = f"reader-{channel}"
    first = post(url, channel, sender, "one")
    post(url, channel, sender, "two")
    requests.get(f"{url}/messages/{channel}", headers={"X-Agent-ID": reader}).raise_for_status()
    agents = {a["id"]: a for a in requests.get(f"{url}/agents").json()["agents"]}
    assert agents[sender]["message_count"] == 2
    assert agents[sender]["first_seen"] == first["timestamp"]
    assert agents[sender]["last_seen"] >= first["timestamp"]
    assert agents[sender]["active"] is True and agents[sender]["status"] == "online"
    assert agents[reader]["message_count"] == 0 and agents[reader]["active"] is True
    relay = f"relay-{channel}"
    requests.post(
        f"{url}/messages/{channel}", json={"sender": sender, "message": "x"}, headers={"X-Agent-ID": relay}
    ).raise_for_status()
    agents = {a["id"]: a for a in requests.get(f"{url}/agents").json()["agents"]}
    assert agents[relay]["message_count"] == 0 and agents[relay]["active"] is True
    before = agents[reader]["last_seen"]
    time.sleep(1.1)
    requests.get(f"{url}/status", headers={"X-Agent-ID": reader}).raise_for_status()
    agents = {a["id"]: a for a in requests.get(f"{url}/agents").json()["agents"]}
    assert agents[reader]["last_seen"] > before


def test_status_reports_counts(url, channel):
    post(url, channel, "status-agent", "x")
    status = requests.get(f"{url}/status").json()
    assert status["status"] == "running"
    assert status["messages"] >= 1 and status["channels"] >= 1 and status["agents"] >= 1
    assert status["active_agents"] >= 1 and status["database_size"] > 0
    assert status["uptime"] >= 0 and status["version"]


def test_an_empty_channel_reads_empty_with_cursor_zero(url, channel):
    page = requests.get(f"{url}/messages/{channel}").json()
    assert page == {"channel": channel, "messages": [], "count": 0, "cursor": 0, "gap": False, "more": False}


def test_status_timestamp_is_utc_with_its_offset(url):
    assert requests.get(f"{url}/status").json()["timestamp"].endswith("+00:00")


def test_healthz(url):
    reply = requests.get(f"{url}/healthz")
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}


def test_since_accepts_unix_seconds_and_iso_times(url, channel):
    first = post(url, channel, "a", "one")
    second = post(url, channel, "a", "two")
    after_first = requests.get(f"{url}/messages/{channel}", params={"since": first["timestamp"]}).json()
    assert [m["id"] for m in after_first["messages"]] == [second["id"]]
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(first["timestamp"] - 60))
    assert requests.get(f"{url}/messages/{channel}", params={"since": iso}).json()["count"] == 2


def _error(reply, status):
    assert reply.status_code == status, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"error"} and body["error"]
    assert "Traceback" not in reply.text
    return body["error"]


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b'{"sender": "a", "message": ', "not valid JSON"),
        (b"", "empty"),
        (b"\xff\xfe", "not valid JSON"),
        (b'"just a string"', "JSON object"),
        (b'{"message": "x"}', "missing field: sender"),
        (b'{"sender": "a"}', "missing field: message"),
        (b'{"sender": 5, "message": "x"}', "sender must be a string"),
        (b'{"sender": "a", "message": ["x"]}', "message must be a string"),
        (b'{"sender": "a", "message": ""}', "must not be empty"),
        (b'{"sender": "", "message": "x"}', "sender must be 1 to 128"),
        (b'{"sender": "a\\nb", "message": "x"}', "control characters"),
        (b'{"sender": "a", "message": "\\ud800"}', "not valid Unicode"),
        (b"[]", "at least one"),
    ],
)
def test_bad_posts_get_400_and_store_nothing(url, channel, body, fragment):
    reply = requests.post(f"{url}/messages/{channel}", data=body, headers={"Content-Type": "application/json"})
    assert fragment in _error(reply, 400)
    assert requests.get(f"{url}/messages/{channel}").json()["count"] == 0


@pytest.mark.parametrize("name", ["-leading-dash", "has space", "x" * 65, "semi;colon", "ünï"])
def test_invalid_channel_names_get_400(url, name):
    assert "invalid channel name" in _error(requests.get(f"{url}/messages/{name}"), 400)
    reply = requests.post(f"{url}/messages/{name}", json={"sender": "a", "message": "x"})
    assert "invalid channel name" in _error(reply, 400)


def test_body_over_the_limit_gets_413(url, channel):
    reply = requests.post(f"{url}/messages/{channel}", json={"sender": "a", "message": "x" * 70000})
    assert "limit of 65536" in _error(reply, 413)


def test_chunked_body_over_the_limit_gets_413(url, channel):
    def chunks():
        yield b'{"sender": "a", "message": "'
        for _ in range(80):
            yield b"x" * 1000
        yield b'"}'

    reply = requests.post(f"{url}/messages/{channel}", data=chunks(), headers={"Content-Type": "application/json"})
    _error(reply, 413)


def test_chunked_body_within_the_limit_is_stored(url, channel):
    reply = requests.post(f"{url}/messages/{channel}", data=iter([b'{"sender": "a", ', b'"message": "chunked"}']))
    assert reply.status_code == 201 and reply.json()["message"] == "chunked"


def test_batch_over_the_cap_gets_413(url, channel):
    batch = [{"sender": "a", "message": "x"}] * 501
    assert "at most 500" in _error(requests.post(f"{url}/messages/{channel}", json=batch), 413)


def test_unknown_route_gets_404_and_wrong_method_405(url):
    assert "no such route" in _error(requests.get(f"{url}/nowhere"), 404)
    assert "no such route" in _error(requests.get(f"{url}/messages/general/extra/parts"), 404)
    assert "not allowed" in _error(requests.delete(f"{url}/messages/general"), 405)
    assert "not allowed" in _error(requests.post(f"{url}/status"), 405)


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"limit": "ten"}, "limit"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": -1}, "limit"),
        ({"after": "x"}, "after"),
        ({"after": -5}, "after"),
        ({"after": 2**63}, "after"),
        ({"after": "+7"}, "after"),
        ({"after": "1_0"}, "after"),
        ({"limit": " 7"}, "limit"),
        ({"since": "1969-12-31T00:00:00"}, "since"),
        ({"after": "9" * 30}, "after"),
        ({"after": "1.5"}, "after"),
        ({"since": "yesterday"}, "since"),
        ({"since": "nan"}, "since"),
        ({"since": "-1"}, "since"),
        ({"after": 1, "since": 1}, "either after or since"),
        ({"wait": "soon", "after": 1}, "wait"),
        ({"wait": 5}, "wait needs a cursor"),
    ],
)
def test_bad_read_parameters_get_400(url, channel, params, fragment):
    assert fragment in _error(requests.get(f"{url}/messages/{channel}", params=params), 400)


def test_bad_agent_header_gets_400(url, channel):
    reply = requests.get(f"{url}/messages/{channel}", headers={"X-Agent-ID": "x" * 200})
    assert "X-Agent-ID" in _error(reply, 400)


def test_bad_last_event_id_gets_400(url, channel):
    assert "Last-Event-ID" in _error(requests.get(f"{url}/stream/{channel}", headers={"Last-Event-ID": "abc"}), 400)


def test_huge_last_event_id_gets_400(url, channel):
    reply = requests.get(f"{url}/stream/{channel}", headers={"Last-Event-ID": "9" * 30})
    assert "Last-Event-ID" in _error(reply, 400)


def raw_request(url, data):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1"), body


@pytest.mark.parametrize(
    "data, status",
    [
        (b"POST /messages/general HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nx", 400),
        (b"GET /status HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n", 400),
        (b"GET /" + b"a" * 4100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /status HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 120 + b"\r\n", 431),
    ],
)
def test_malformed_http_gets_a_json_error(url, data, status):
    """gunicorn itself answers these before the app runs: still JSON, never HTML."""
    code, head, body = raw_request(url, data)
    assert code == status
    assert "Content-Type: application/json" in head
    assert json.loads(body)["error"]


def test_agents_and_channels_come_in_pages(own_broker):
    broker = own_broker().start()
    batch = [{"sender": f"agent-{n:02}", "message": "m"} for n in range(25)]
    for name in ("c-a", "c-b", "c-c"):
        assert requests.post(f"{broker.url}/messages/{name}", json=batch, timeout=10).status_code == 201
    for path, key, field, total in (("agents", "agents", "id", 25), ("channels", "channels", "name", 3)):
        seen, after = [], None
        for _ in range(total + 1):
            params = {"limit": 2} | ({"after": after} if after is not None else {})
            page = requests.get(f"{broker.url}/{path}", params=params, timeout=10).json()
            assert page["count"] == len(page[key]) <= 2
            seen += [entry[field] for entry in page[key]]
            after = page["cursor"]
            if not page["more"]:
                break
        assert seen == sorted(seen) and len(seen) == len(set(seen)) == total, seen
        whole = requests.get(f"{broker.url}/{path}", timeout=10).json()
        assert [entry[field] for entry in whole[key]] == seen and whole["more"] is False
    past = requests.get(f"{broker.url}/agents", params={"after": "zzz"}, timeout=10).json()
    assert past == {"agents": [], "count": 0, "more": False, "cursor": "zzz"}
    assert requests.get(f"{broker.url}/agents", params={"limit": 1001}, timeout=10).status_code == 400


def test_status_shows_the_durability_the_connection_runs(own_broker, request):
    """README: synchronous=FULL by default, read back from the worker's SQLite connection;
    on PostgreSQL, the server's synchronous_commit (the test server runs it off)."""
    default = own_broker().start()
    if default.database_url:
        shown = requests.get(f"{default.url}/status", timeout=10).json()
        server = request.getfixturevalue("postgres_server").psql("SHOW synchronous_commit").strip()
        assert (shown["database"], shown["synchronous"]) == ("postgresql", server.upper())
        return
    assert requests.get(f"{default.url}/status", timeout=10).json()["synchronous"] == "FULL"
    default.stop()
    normal = own_broker(env={"AGENT_COMMS_SYNCHRONOUS": "NORMAL"}).start()
    assert requests.get(f"{normal.url}/status", timeout=10).json()["synchronous"] == "NORMAL"


def hold_the_write_lock(broker):
    """A connection holding the broker's write lock (roll it back to let go), and a
    function that counts the transactions that stored messages so far."""
    if broker.database_url:
        import psycopg

        def count():
            with psycopg.connect(broker.database_url) as db:
                return db.execute("SELECT count(DISTINCT xmin::text) FROM messages").fetchone()[0]

        lock = psycopg.connect(broker.database_url, autocommit=True)
        lock.execute("BEGIN")
        lock.execute("SELECT last_id FROM writer FOR UPDATE")
        return lock, count
    import sqlite3

    lock = sqlite3.connect(broker.db_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    return lock, lambda: wal_commits(broker.db_path + "-wal")


def wal_commits(path):
    """How many transactions the write-ahead log holds: frames whose header marks a commit
    (a database size after the commit, not 0), from the file format SQLite documents."""
    import struct

    with open(path, "rb") as wal:
        data = wal.read()
    if len(data) < 32:
        return 0
    page_size = struct.unpack(">I", data[8:12])[0]
    commits, offset = 0, 32
    while offset + 24 + page_size <= len(data):
        commits += struct.unpack(">I", data[offset + 4 : offset + 8])[0] != 0
        offset += 24 + page_size
    return commits


def test_a_group_commit_serves_many_posts_with_one_transaction(own_broker):
    """README: posts that arrive while a commit runs share the next one. The test holds the
    database's write lock while 100 posts arrive, so they all wait on one commit; then
    lets go and counts the transactions they took (SQLite: commit frames in the write-ahead
    log; PostgreSQL: the transaction ids that inserted the rows)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    broker = own_broker(workers=1).start()
    url = f"{broker.url}/messages/grouped"
    requests.post(url, json={"sender": "s", "message": "first"}, timeout=10)
    lock, count_commits = hold_the_write_lock(broker)  # the broker's next commit waits for this
    before = count_commits()
    sent = threading.Semaphore(0)

    def post(n):
        session = requests.Session()
        session.get(f"{broker.url}/healthz", timeout=10)
        sent.release()
        return session.post(url, json={"sender": "s", "message": str(n)}, timeout=30).status_code

    try:
        with ThreadPoolExecutor(100) as pool:
            statuses = pool.map(post, range(100))
            for _ in range(100):
                assert sent.acquire(timeout=10)
            time.sleep(1)  # the posts reach the broker and queue behind the lock
            lock.execute("ROLLBACK")
            assert list(statuses) == [201] * 100
    finally:
        lock.close()
    commits = count_commits() - before
    assert 1 <= commits <= 5, commits
    assert requests.get(url, params={"limit": 1000}, timeout=10).json()["count"] == 101


def test_listings_after_a_name_holding_nul_answer_as_after_the_part_before_it(url, poster):
    """No name holds U+0000, so after=b<NUL>x lists what after=b lists (PostgreSQL's text
    cannot hold the character: this was a 500 there)."""
    for channel in ("nul-a", "nul-b", "nul-c"):
        poster(url, channel, f"agent-{channel}", "x")
    for listing, key in (("channels", "name"), ("agents", "id")):
        cut = requests.get(f"{url}/{listing}", params={"after": "nul-b\x00zz"}, timeout=10)
        plain = requests.get(f"{url}/{listing}", params={"after": "nul-b"}, timeout=10)
        assert cut.status_code == 200, cut.text
        assert [item[key] for item in cut.json()[listing]] == [item[key] for item in plain.json()[listing]]


def test_a_read_that_records_its_agent_waits_at_most_half_a_second_for_the_write_lock(own_broker):
    """Recording the agent of a read (X-Agent-ID) is best effort and goes in with the
    group commit: with the write lock held by another connection the read still answers
    at once (within the half second it may wait), the agent's next reads within the
    second queue no more records and do not wait, and the agent is recorded once the
    lock is free, with nothing more asked of it."""
    broker = own_broker(workers=1).start()
    assert requests.get(f"{broker.url}/messages/seen", timeout=10).status_code == 200
    lock, _ = hold_the_write_lock(broker)
    try:
        started = time.monotonic()
        replies = [
            requests.get(f"{broker.url}/messages/seen", headers={"X-Agent-ID": "seen-later"}, timeout=30)
            for _ in range(5)
        ]
        took = time.monotonic() - started
    finally:
        lock.rollback() if broker.database_url else lock.execute("ROLLBACK")
        lock.close()
    assert [reply.status_code for reply in replies] == [200] * 5 and took < 1.5, took
    deadline = time.monotonic() + 10
    while "seen-later" not in [
        agent["id"] for agent in requests.get(f"{broker.url}/agents", timeout=10).json()["agents"]
    ]:
        assert time.monotonic() < deadline, "the agent was not recorded once the lock was free"
        time.sleep(0.1)
