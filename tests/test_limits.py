"""Abuse limits on real brokers with two workers: the rate limit and the stream cap hold
across workers, and every cap answers a clear JSON 4xx while storing nothing."""

import http.client
import os
import signal
import subprocess
import time

import pytest
import requests

from broker_process import BIN, sessions_on_two_workers


def fresh_get(url):
    """A request on a new connection, so that the two workers share the load."""
    return requests.get(url, timeout=10, headers={"Connection": "close"})


def bearer_for(broker, agent):
    """The Authorization header of a new token for `agent`, made with the admin CLI."""
    made = subprocess.run(
        [str(BIN / "agent-comms-broker"), "token", "add", agent, "--db", broker.db_path],
        capture_output=True,
        text=True,
        check=True,
    )
    return {"Authorization": f"Bearer {made.stdout.strip()}"}


def error_of(reply, status):
    assert reply.status_code == status, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    return reply.json()["error"]


def test_rate_limit_holds_across_workers_with_retry_after(own_broker):
    burst = 250
    broker = own_broker(env={"AGENT_COMMS_RATE_LIMIT": "2", "AGENT_COMMS_RATE_BURST": str(burst)}).start()
    started = time.monotonic()
    status = f"{broker.url}/status"
    # At most 200 of the burst go on finding the workers; with a bucket per worker, the
    # rest would still allow at least 300 more, past the bound below.
    first, second = sessions_on_two_workers(broker.url, tries=200)
    replies = ([], [])
    while time.monotonic() - started < 30 and not all(429 in [r.status_code for r in mine] for mine in replies):
        for session, mine in zip((first, second), replies, strict=True):
            mine.append(session.get(status, timeout=10))
    elapsed = time.monotonic() - started
    assert all(429 in [r.status_code for r in mine] for mine in replies), "both workers refuse"
    allowed = sum(r.status_code == 200 for mine in replies for r in mine)
    # One bucket for both workers: the burst plus what refilled meanwhile, not twice that.
    assert allowed <= burst + 2 * elapsed + 1
    refused = [r for mine in replies for r in mine if r.status_code == 429]
    for reply in refused:
        assert "rate limit" in error_of(reply, 429)
        assert int(reply.headers["Retry-After"]) >= 1
    time.sleep(int(refused[-1].headers["Retry-After"]))
    assert first.get(status, timeout=10).status_code == 200
    assert all(fresh_get(f"{broker.url}/healthz").status_code == 200 for _ in range(20)), "health is never limited"


def test_each_agent_has_its_own_bucket(own_broker):
    broker = own_broker(env={"AGENT_COMMS_RATE_LIMIT": "0.1", "AGENT_COMMS_RATE_BURST": "3"}).start()
    tokens = {agent: bearer_for(broker, agent) for agent in ("alpha", "beta")}
    alpha = [requests.get(f"{broker.url}/channels", headers=tokens["alpha"]).status_code for _ in range(5)]
    assert alpha == [200, 200, 200, 429, 429]
    assert requests.get(f"{broker.url}/channels", headers=tokens["beta"]).status_code == 200
    assert requests.get(f"{broker.url}/channels").status_code == 200, "anonymous callers count by address"


def test_a_forwarded_for_header_does_not_buy_a_new_bucket(own_broker):
    broker = own_broker(env={"AGENT_COMMS_RATE_LIMIT": "0.1", "AGENT_COMMS_RATE_BURST": "2"}).start()
    statuses = [
        requests.get(f"{broker.url}/channels", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(4)
    ]
    assert statuses == [200, 200, 429, 429]


def test_agent_chat_send_waits_out_a_short_rate_limit(own_broker, monkeypatch):
    broker = own_broker(env={"AGENT_COMMS_RATE_LIMIT": "1", "AGENT_COMMS_RATE_BURST": "1"}).start()
    monkeypatch.setenv("AGENT_COMMS_BROKER", broker.url)
    chat = str(BIN / "agent-chat")
    first = subprocess.run([chat, "send", "tasks", "one"], capture_output=True, text=True, timeout=30)
    second = subprocess.run([chat, "send", "tasks", "two"], capture_output=True, text=True, timeout=30)
    assert (first.returncode, second.returncode) == (0, 0), second.stderr
    time.sleep(1.1)  # the bucket refills before the check reads
    texts = [m["message"] for m in requests.get(f"{broker.url}/messages/tasks").json()["messages"]]
    assert texts == ["one", "two"], "retried after Retry-After, stored once"


def open_raw(url):
    return requests.get(url, stream=True, timeout=10, headers={"Connection": "close"})


def test_open_streams_are_capped_per_agent_across_workers(own_broker):
    broker = own_broker(env={"AGENT_COMMS_MAX_STREAMS": "3", "AGENT_COMMS_KEEPALIVE": "0.5"}).start()
    streams = [open_raw(f"{broker.url}/stream/tasks") for _ in range(3)]
    try:
        assert [s.status_code for s in streams] == [200, 200, 200]
        # Counted per worker, some of these would reach a worker holding fewer than 3.
        for _ in range(6):
            with open_raw(f"{broker.url}/stream/other") as refused:
                assert "too many open streams" in error_of(refused, 429)
                assert refused.headers["Retry-After"]
        streams.pop().close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = open_raw(f"{broker.url}/stream/tasks")
            if probe.status_code == 200:
                streams.append(probe)
                break
            probe.close()
            time.sleep(0.3)
        else:
            pytest.fail("a closed stream's slot was never given back")
    finally:
        for stream in streams:
            stream.close()


def test_waiting_long_polls_count_as_streams(own_broker):
    from concurrent.futures import ThreadPoolExecutor

    broker = own_broker(env={"AGENT_COMMS_MAX_STREAMS": "2"}).start()
    with ThreadPoolExecutor(2) as pool:
        waiting = [
            pool.submit(requests.get, f"{broker.url}/messages/quiet?after=0&wait=3", timeout=10) for _ in range(2)
        ]
        time.sleep(1)
        refused = requests.get(f"{broker.url}/messages/quiet?after=0&wait=3", timeout=10)
        assert "too many open streams and long-polls" in error_of(refused, 429)
        assert requests.get(f"{broker.url}/messages/quiet?after=0", timeout=10).status_code == 200, "no wait, no slot"
        assert [future.result().status_code for future in waiting] == [200, 200]
    assert requests.get(f"{broker.url}/messages/quiet?after=0&wait=0.2", timeout=10).status_code == 200


def test_a_killed_workers_streams_no_longer_count(own_broker):
    broker = own_broker(env={"AGENT_COMMS_MAX_STREAMS": "2"}).start()
    streams = [open_raw(f"{broker.url}/stream/tasks") for _ in range(2)]
    with open_raw(f"{broker.url}/stream/tasks") as refused:
        assert refused.status_code == 429
    for pid in broker.worker_pids():
        os.kill(pid, signal.SIGKILL)
    for stream in streams:
        stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            probe = requests.get(f"{broker.url}/stream/tasks", stream=True, timeout=5)
        except requests.ConnectionError:
            time.sleep(0.2)
            continue
        status = probe.status_code
        probe.close()
        if status == 200:
            return
        time.sleep(0.2)
    pytest.fail("the streams of killed workers still counted")


def test_channel_cap_refuses_new_channels_only(own_broker):
    broker = own_broker(env={"AGENT_COMMS_MAX_CHANNELS": "2"}).start()
    for channel in ("one", "two"):
        assert (
            requests.post(f"{broker.url}/messages/{channel}", json={"sender": "a", "message": "m"}).status_code == 201
        )
    refused = requests.post(f"{broker.url}/messages/three", json={"sender": "a", "message": "m"})
    assert "limit of 2 channels" in error_of(refused, 409)
    assert requests.post(f"{broker.url}/messages/one", json={"sender": "a", "message": "m"}).status_code == 201
    assert [c["name"] for c in requests.get(f"{broker.url}/channels").json()["channels"]] == ["one", "two"]
    assert requests.get(f"{broker.url}/messages/three").json()["count"] == 0


def test_concurrent_posts_to_new_channels_past_the_cap_fail_alone(own_broker):
    """Posts that share a group commit: the one over the cap is refused, the rest stored."""
    from concurrent.futures import ThreadPoolExecutor

    broker = own_broker(env={"AGENT_COMMS_MAX_CHANNELS": "5"}, workers=1).start()

    def post(i):
        return requests.post(f"{broker.url}/messages/ch-{i}", json={"sender": "a", "message": str(i)}).status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(post, range(12)))
    assert sorted(statuses) == [201] * 5 + [409] * 7
    assert len(requests.get(f"{broker.url}/channels").json()["channels"]) == 5


@pytest.mark.parametrize(
    ("env", "body", "expected"),
    [
        ({"AGENT_COMMS_MAX_MESSAGE": "1000"}, {"sender": "a", "message": "x" * 1001}, "limit of 1000 bytes"),
        ({"AGENT_COMMS_MAX_MESSAGE": "1000"}, {"sender": "a", "message": "€" * 334}, "limit of 1000 bytes"),
        ({"AGENT_COMMS_MAX_BATCH": "3"}, [{"sender": "a", "message": "m"}] * 4, "at most 3 messages"),
        ({"AGENT_COMMS_MAX_BODY": "2000"}, [{"sender": "a", "message": "m" * 500}] * 4, "limit of 2000 bytes"),
    ],
)
def test_size_caps_answer_413_and_store_nothing(own_broker, env, body, expected):
    broker = own_broker(env=env).start()
    assert expected in error_of(requests.post(f"{broker.url}/messages/caps", json=body), 413)
    assert requests.get(f"{broker.url}/messages/caps").json()["count"] == 0
    if "€" in str(body):
        fits = {"sender": "a", "message": "€" * 333}
        assert requests.post(f"{broker.url}/messages/caps", json=fits).status_code == 201


def raw_request(broker, head):
    connection = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
    connection.connect()
    connection.sock.sendall(head.encode())
    reply = http.client.HTTPResponse(connection.sock)
    reply.begin()
    body = reply.read()
    connection.close()
    return reply, body


def test_header_caps_answer_431_as_json(own_broker):
    broker = own_broker(env={"AGENT_COMMS_MAX_HEADER": "1024", "AGENT_COMMS_MAX_HEADERS": "10"}).start()
    long_header = f"GET /status HTTP/1.1\r\nHost: x\r\nX-Agent-ID: {'a' * 2000}\r\n\r\n"
    many_headers = "GET /status HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-N{i}: v\r\n" for i in range(20)) + "\r\n"
    for head in (long_header, many_headers):
        reply, body = raw_request(broker, head)
        assert reply.status == 431, body
        assert reply.getheader("Content-Type") == "application/json"
        assert b"error" in body and reply.getheader("X-Content-Type-Options") == "nosniff"
    assert requests.get(f"{broker.url}/status", headers={"X-Agent-ID": "a" * 100}).status_code == 200


# -- what one client may store ---------------------------------------------------------------


def test_agent_cap_refuses_new_senders_only(own_broker):
    broker = own_broker(env={"AGENT_COMMS_MAX_AGENTS": "3"}).start()
    url = f"{broker.url}/messages/agents-cap"
    batch = [{"sender": f"agent-{n}", "message": "m"} for n in range(3)]
    assert requests.post(url, json=batch, timeout=10).status_code == 201
    refused = requests.post(url, json=[{"sender": "agent-0", "message": "m"}, {"sender": "new", "message": "m"}])
    assert "limit of 3 agents" in error_of(refused, 409)
    assert requests.post(url, json={"sender": "agent-1", "message": "known agents still post"}).status_code == 201
    # A read that names a new agent is answered, and does not register it.
    assert requests.get(f"{broker.url}/status", headers={"X-Agent-ID": "reader"}, timeout=10).status_code == 200
    agents = requests.get(f"{broker.url}/agents", timeout=10).json()
    assert [a["id"] for a in agents["agents"]] == ["agent-0", "agent-1", "agent-2"]
    assert requests.get(url, timeout=10).json()["count"] == 4


def test_batches_of_new_senders_cannot_make_agents_without_bound(own_broker):
    """The attack of issue 9: batches of 500 items, each a new sender."""
    broker = own_broker(env={"AGENT_COMMS_MAX_AGENTS": "1000"}).start()
    statuses = []
    for round_ in range(4):
        batch = [{"sender": f"spam-{round_}-{n}", "message": "x"} for n in range(500)]
        statuses.append(requests.post(f"{broker.url}/messages/spam", json=batch, timeout=30).status_code)
    assert statuses == [201, 201, 409, 409]
    assert requests.get(f"{broker.url}/status", timeout=10).json()["agents"] == 1000


def test_the_byte_budget_stops_one_client_filling_the_disk(own_broker):
    broker = own_broker(env={"AGENT_COMMS_BYTE_RATE": "1000", "AGENT_COMMS_BYTE_BURST": "150k"}).start()
    url = f"{broker.url}/messages/budget"
    post = {"sender": "filler", "message": "x" * 30000}
    assert [requests.post(url, json=post, timeout=10).status_code for _ in range(3)] == [201] * 3
    refused = requests.post(url, json=post, timeout=10)
    assert "storage budget" in error_of(refused, 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert requests.get(url, timeout=10).json()["count"] == 3
    # Another agent (with a token: its own bucket) still posts.
    headers = bearer_for(broker, "other")
    assert requests.post(url, json={"message": "x" * 30000}, headers=headers, timeout=10).status_code == 201


def test_the_byte_budget_counts_many_small_messages_too(own_broker):
    broker = own_broker(env={"AGENT_COMMS_BYTE_RATE": "100", "AGENT_COMMS_BYTE_BURST": "20k"}).start()
    batch = [{"sender": "s", "message": "x"} for _ in range(500)]  # 500 rows of ~70 bytes each
    # The first batch is more than the whole bucket: it may pass once, on a full bucket.
    assert requests.post(f"{broker.url}/messages/small", json=batch, timeout=10).status_code == 201
    refused = requests.post(f"{broker.url}/messages/small", json=batch[:300], timeout=10)
    assert refused.status_code == 429 and "storage budget" in refused.json()["error"]


def test_max_database_refuses_posts_before_the_disk_is_full(own_broker):
    broker = own_broker(env={"AGENT_COMMS_MAX_DATABASE": "300k"}).start()
    url = f"{broker.url}/messages/capped"
    statuses = [
        requests.post(url, json={"sender": "s", "message": "x" * 50000}, timeout=10).status_code for _ in range(12)
    ]
    assert 201 in statuses and statuses[-1] == 507, statuses
    assert statuses == sorted(statuses, key=lambda status: status == 507)  # once refused, refused
    refused = requests.post(url, json={"sender": "s", "message": "x"}, timeout=10)
    assert "AGENT_COMMS_MAX_DATABASE" in error_of(refused, 507)
    assert requests.get(f"{broker.url}/status", timeout=10).json()["messages"] == statuses.count(201)
    assert requests.get(f"{broker.url}/healthz", timeout=10).status_code == 200


def test_anonymous_floods_of_the_caps_do_not_lock_out_token_holders(own_broker):
    broker = own_broker(env={"AGENT_COMMS_MAX_AGENTS": "5", "AGENT_COMMS_MAX_CHANNELS": "3"}).start()
    flood = [{"sender": f"filler-{n}", "message": "x"} for n in range(5)]
    assert requests.post(f"{broker.url}/messages/c1", json=flood, timeout=10).status_code == 201
    for name in ("c2", "c3"):
        assert requests.post(f"{broker.url}/messages/{name}", json=flood[:1], timeout=10).status_code == 201
    assert requests.post(f"{broker.url}/messages/c4", json=flood[:1], timeout=10).status_code == 409
    assert requests.post(f"{broker.url}/messages/c1", json={"sender": "new", "message": "x"}).status_code == 409
    # A token made after the flood: its agent posts, also to a new channel.
    headers = bearer_for(broker, "newbot")
    for name in ("c1", "alerts"):
        reply = requests.post(f"{broker.url}/messages/{name}", json={"message": "m"}, headers=headers, timeout=10)
        assert reply.status_code == 201, reply.text


@pytest.mark.parametrize("mode", ["write-requires-token", "required"])
def test_anonymous_readers_register_no_agents_where_they_may_not_write(own_broker, mode):
    broker = own_broker(env={"AGENT_COMMS_AUTH": mode}).start()
    token = bearer_for(broker, "watcher")
    for n in range(20):
        requests.get(f"{broker.url}/status", headers={"X-Agent-ID": f"ghost-{n}"}, timeout=10)
    agents = requests.get(f"{broker.url}/agents", headers=token, timeout=10).json()["agents"]
    assert [agent["id"] for agent in agents] == ["watcher"]


def test_the_byte_budget_counts_at_least_what_the_disk_takes(own_broker):
    """Tiny messages with long names cost the database more than their bytes: the budget
    must count at least what they take, or one client fills the disk faster than promised."""
    import sqlite3

    broker = own_broker(env={"AGENT_COMMS_BYTE_RATE": "1", "AGENT_COMMS_BYTE_BURST": "2m"}).start()

    def used():
        with sqlite3.connect(f"file:{broker.db_path}?mode=ro", uri=True) as db:
            pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
            size = db.execute("PRAGMA page_size").fetchone()[0]
        return pages * size

    before = used()
    channel = "c" * 64
    batch = [{"sender": "s" * 128, "message": "x"} for _ in range(500)]
    for _ in range(200):
        if requests.post(f"{broker.url}/messages/{channel}", json=batch, timeout=30).status_code == 429:
            break
    else:
        raise AssertionError("the budget never ran out")
    assert used() - before <= 2 << 20, used() - before
