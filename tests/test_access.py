"""Tokens and the three access modes, on real brokers: the admin CLI makes and revokes
tokens, agent-chat and plain HTTP use them, and every refusal says what is missing."""

import json
import os
import sqlite3
import subprocess
import time

import pytest
import requests

from broker_process import BIN
from postgres_server import ensure_installed
from sse_client import EventStream


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def broker_backend(request):
    """Every test here runs on both store backends."""
    return request.param


ADMIN = str(BIN / "agent-comms-broker")
CHAT = str(BIN / "agent-chat")


def admin(target, *args, stdin=None, check=True):
    """The admin command on a broker's database (or a SQLite file's path)."""
    names = target.store_args if hasattr(target, "store_args") else ["--db", str(target)]
    done = subprocess.run([ADMIN, *args, *names], input=stdin, capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def dump_database(broker):
    """Everything the broker's database holds, as text."""
    if broker.database_url:
        return subprocess.run(
            [ensure_installed() / "pg_dump", "--data-only", broker.database_url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    with sqlite3.connect(broker.db_path) as db:
        return "\n".join(db.iterdump())


def add_token(broker, agent, *options):
    return admin(broker, "token", "add", agent, *options).stdout.strip()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def chat(broker, *args, token=None, env=None):
    """agent-chat with this environment only: no config file of the machine's is read."""
    environment = {
        "AGENT_COMMS_BROKER": broker.url,
        "AGENT_COMMS_CONFIG": os.devnull,
        "PATH": "/usr/bin:/bin",
        **(env or {}),
    }
    if token:
        environment["AGENT_COMMS_TOKEN"] = token
    return subprocess.run([CHAT, *args], capture_output=True, text=True, env=environment, timeout=30)


@pytest.fixture
def broker_in(own_broker):
    def start(mode):
        return own_broker(env={"AGENT_COMMS_AUTH": mode}).start()

    return start


# -- the admin CLI -------------------------------------------------------------------------


def test_token_add_shows_the_secret_once_and_keeps_only_its_hash(own_broker):
    broker = own_broker().start()
    done = admin(broker, "token", "add", "warp-ct200", "--write", "tasks, team-*", "--note", "ct200")
    secret = done.stdout.strip()
    assert secret.startswith("acm_") and len(secret) >= 40
    assert "shown only now" in done.stderr
    assert secret not in dump_database(broker)
    listed = json.loads(admin(broker, "token", "list", "--json").stdout)
    assert [(t["agent"], t["read"], t["write"], t["note"], t["state"]) for t in listed] == [
        ("warp-ct200", "*", "tasks,team-*", "ct200", "active")
    ]
    table = admin(broker, "token", "list").stdout
    assert "warp-ct200" in table and secret not in table


def test_token_add_from_stdin_is_idempotent(own_broker):
    broker = own_broker().start()
    secret = "s3cret-chosen-by-the-operator-0123456789"
    assert admin(broker, "token", "add", "ops", "--secret-stdin", stdin=secret + "\n").stdout.startswith("added ")
    again = admin(broker, "token", "add", "ops", "--secret-stdin", stdin=secret)
    assert again.stdout.startswith("unchanged ")
    narrowed = admin(broker, "token", "add", "ops", "--write", "alerts", "--secret-stdin", stdin=secret)
    assert narrowed.stdout.startswith("updated ")
    assert (
        requests.post(f"{broker.url}/messages/tasks", json={"message": "x"}, headers=bearer(secret)).status_code == 403
    )
    other = admin(broker, "token", "add", "mallory", "--secret-stdin", stdin=secret, check=False)
    assert other.returncode == 1 and "already registered to agent ops" in other.stderr
    short = admin(broker, "token", "add", "ops", "--secret-stdin", stdin="short", check=False)
    assert short.returncode == 1 and "32 to 512" in short.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["token", "add", "a b\x01"], "AGENT must be"),
        (["token", "add", "ok", "--read", "bad/pattern"], "is not a channel pattern"),
        (["token", "add", "ok", "--expires", "soon"], "--expires"),
        (["token", "revoke", "nothere"], "no token with id nothere"),
    ],
)
def test_admin_mistakes_get_one_line_and_exit_1(own_broker, args, expected):
    broker = own_broker().start()
    done = admin(broker, *args, check=False)
    assert done.returncode == 1
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_admin_needs_an_existing_database(tmp_path):
    done = admin(tmp_path / "absent.db", "token", "list", check=False)
    assert done.returncode == 1 and "no database at" in done.stderr
    assert "make run` keeps ./data/messages.db" in done.stderr  # the local broker's, for a new user
    done = admin(tmp_path / "absent.db", "backup", str(tmp_path / "copy.db"), check=False)
    assert done.returncode == 1 and "make run` keeps ./data/messages.db" in done.stderr


def test_revoked_and_expired_tokens_are_refused_at_once(broker_in):
    broker = broker_in("required")
    token = add_token(broker, "bot")
    brief = add_token(broker, "brief", "--expires", "1s")
    assert requests.get(f"{broker.url}/channels", headers=bearer(token)).status_code == 200
    token_id = json.loads(admin(broker, "token", "list", "--json").stdout)[0]["id"]
    assert admin(broker, "token", "revoke", token_id).stdout.strip() == f"revoked {token_id}"
    for _ in range(4):  # every worker refuses it from the next request
        reply = requests.get(f"{broker.url}/channels", headers=bearer(token))
        assert reply.status_code == 401 and "was revoked" in reply.json()["error"]
    time.sleep(1.2)
    reply = requests.get(f"{broker.url}/channels", headers=bearer(brief))
    assert reply.status_code == 401 and "has expired" in reply.json()["error"]
    states = {t["agent"]: t["state"] for t in json.loads(admin(broker, "token", "list", "--json").stdout)}
    assert states == {"bot": "revoked", "brief": "expired"}


# -- the three modes -----------------------------------------------------------------------


def test_open_mode_keeps_the_old_behaviour_and_still_honours_tokens(broker_in):
    broker = broker_in("open")
    assert requests.post(f"{broker.url}/messages/tasks", json={"sender": "anyone", "message": "hi"}).status_code == 201
    assert requests.get(f"{broker.url}/messages/tasks").json()["count"] == 1
    token = add_token(broker, "bot", "--write", "alerts")
    reply = requests.post(f"{broker.url}/messages/tasks", json={"message": "x"}, headers=bearer(token))
    assert reply.status_code == 403
    reply = requests.get(f"{broker.url}/status", headers=bearer("acm_not-a-real-token-at-all-0000000000"))
    assert reply.status_code == 401 and reply.headers["WWW-Authenticate"].startswith("Bearer")


def test_write_requires_token_mode(broker_in):
    broker = broker_in("write-requires-token")
    reply = requests.post(f"{broker.url}/messages/tasks", json={"sender": "anon", "message": "hi"})
    assert reply.status_code == 401
    assert "token is required to post" in reply.json()["error"]
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="agent-comms"'
    token = add_token(broker, "writer")
    posted = requests.post(f"{broker.url}/messages/tasks", json={"message": "hi"}, headers=bearer(token))
    assert posted.status_code == 201 and posted.json()["sender"] == "writer"
    assert requests.get(f"{broker.url}/messages/tasks").json()["messages"][0]["message"] == "hi"
    assert requests.get(f"{broker.url}/agents").status_code == 200


def test_required_mode_guards_everything_but_health(broker_in):
    broker = broker_in("required")
    for path in ("/messages/tasks", "/channels", "/agents", "/stream", "/stream/tasks"):
        reply = requests.get(broker.url + path, timeout=10)
        assert reply.status_code == 401, path
        assert "token is required" in reply.json()["error"]
    assert requests.get(f"{broker.url}/healthz").status_code == 200
    assert requests.get(f"{broker.url}/openapi.json").status_code == 200
    anonymous = requests.get(f"{broker.url}/status").json()
    assert anonymous["status"] == "running" and anonymous["auth"] == "required"
    assert not {"agents", "active_agents", "messages", "channels"} & anonymous.keys()
    token = add_token(broker, "bot")
    full = requests.get(f"{broker.url}/status", headers=bearer(token)).json()
    assert {"agents", "active_agents", "messages", "channels"} <= full.keys()


def test_malformed_authorization_is_401(broker_in):
    broker = broker_in("open")
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "acm_token-without-a-scheme"):
        reply = requests.get(f"{broker.url}/status", headers={"Authorization": header})
        assert reply.status_code == 401, header
        assert reply.json()["error"]


# -- what a token grants -----------------------------------------------------------------------


def test_a_token_cannot_post_as_another_agent(broker_in):
    broker = broker_in("required")
    token = add_token(broker, "warp-ct200")
    reply = requests.post(
        f"{broker.url}/messages/tasks", json={"sender": "boss", "message": "x"}, headers=bearer(token)
    )
    assert reply.status_code == 403 and "belongs to agent 'warp-ct200'" in reply.json()["error"]
    batch = [{"sender": "warp-ct200", "message": "ok"}, {"sender": "boss", "message": "spoof"}]
    reply = requests.post(f"{broker.url}/messages/tasks", json=batch, headers=bearer(token))
    assert reply.status_code == 403 and reply.json()["error"].startswith("item 1: ")
    same = requests.post(
        f"{broker.url}/messages/tasks", json={"sender": "warp-ct200", "message": "y"}, headers=bearer(token)
    )
    assert same.status_code == 201
    assert [
        m["message"] for m in requests.get(f"{broker.url}/messages/tasks", headers=bearer(token)).json()["messages"]
    ] == ["y"]


def test_wildcard_grants_for_read_and_write(broker_in):
    broker = broker_in("required")
    admin_token = add_token(broker, "admin")
    token = add_token(broker, "team-bot", "--read", "team-*,alerts", "--write", "team-*")
    for channel in ("team-a", "team-b", "alerts", "secrets"):
        requests.post(f"{broker.url}/messages/{channel}", json={"message": channel}, headers=bearer(admin_token))
    assert (
        requests.post(f"{broker.url}/messages/team-x", json={"message": "m"}, headers=bearer(token)).status_code == 201
    )
    refused = requests.post(f"{broker.url}/messages/alerts", json={"message": "m"}, headers=bearer(token))
    assert refused.status_code == 403 and "may not post to channel 'alerts'" in refused.json()["error"]
    assert requests.get(f"{broker.url}/messages/alerts", headers=bearer(token)).status_code == 200
    refused = requests.get(f"{broker.url}/messages/secrets", headers=bearer(token))
    assert refused.status_code == 403 and "may not read channel 'secrets'" in refused.json()["error"]
    assert requests.get(f"{broker.url}/stream/secrets", headers=bearer(token)).status_code == 403
    listed = [c["name"] for c in requests.get(f"{broker.url}/channels", headers=bearer(token)).json()["channels"]]
    assert listed == ["alerts", "team-a", "team-b", "team-x"]


def test_the_all_channels_stream_carries_only_granted_channels(broker_in):
    broker = broker_in("required")
    admin_token = add_token(broker, "admin")
    token = add_token(broker, "reader", "--read", "team-*")
    session = requests.Session()
    session.headers.update(bearer(token))
    stream = EventStream(f"{broker.url}/stream", last_event_id=0, session=session)
    try:
        for channel in ("secrets", "team-a", "secrets", "team-b"):
            requests.post(f"{broker.url}/messages/{channel}", json={"message": channel}, headers=bearer(admin_token))
        messages = stream.messages(2)
    finally:
        stream.close()
    assert [m["channel"] for m in messages] == ["team-a", "team-b"]


def test_no_read_grant_means_no_channel(broker_in):
    broker = broker_in("required")
    token = add_token(broker, "sender-only", "--read", "")
    assert requests.post(f"{broker.url}/messages/out", json={"message": "m"}, headers=bearer(token)).status_code == 201
    assert requests.get(f"{broker.url}/messages/out", headers=bearer(token)).status_code == 403
    assert requests.get(f"{broker.url}/channels", headers=bearer(token)).json()["channels"] == []


# -- agent-chat with tokens ------------------------------------------------------------------------


def test_agent_chat_with_a_token_sends_as_the_tokens_agent(broker_in):
    broker = broker_in("required")
    token = add_token(broker, "warp-ct200", "--write", "tasks")
    sent = chat(broker, "send", "tasks", "hello", token=token)
    assert sent.returncode == 0, sent.stderr
    read = chat(broker, "read", "tasks", "--json", token=token)
    assert json.loads(read.stdout)["sender"] == "warp-ct200"
    assert chat(broker, "--token", token, "read", "tasks").returncode == 0  # the flag works too


def test_agent_chat_refusals_exit_3_with_one_line(broker_in):
    broker = broker_in("required")
    token = add_token(broker, "warp-ct200", "--write", "tasks")
    cases = [
        (chat(broker, "send", "tasks", "hi"), "401"),
        (chat(broker, "send", "other", "hi", token=token), "403"),
        (chat(broker, "--agent-id", "boss", "send", "tasks", "hi", token=token), "403"),
        (chat(broker, "read", "tasks", token="acm_wrong-token-wrong-token-wrong-0000"), "401"),
        (chat(broker, "watch", "tasks", "--timeout", "5"), "401"),
    ]
    for done, status in cases:
        assert done.returncode == 3, done.stderr
        assert f"answered {status}" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_agent_chat_reads_the_token_from_its_config_file(broker_in, tmp_path):
    broker = broker_in("required")
    token = add_token(broker, "from-config")
    config = tmp_path / "config.ini"
    config.write_text(f"[agent-comms]\ntoken = {token}\n")
    done = chat(broker, "send", "tasks", "hi", env={"AGENT_COMMS_CONFIG": str(config)})
    assert done.returncode == 0, done.stderr
    assert (
        requests.get(f"{broker.url}/messages/tasks", headers=bearer(token)).json()["messages"][0]["sender"]
        == "from-config"
    )


def test_expiry_by_date_and_a_rerun_does_not_extend_a_duration(own_broker):
    broker = own_broker().start()
    secret = "a-chosen-secret-for-expiry-checks-0123456789"
    admin(broker, "token", "add", "dated", "--expires", "2020-01-01")
    admin(broker, "token", "add", "ops", "--expires", "30d", "--secret-stdin", stdin=secret)
    first = {t["agent"]: t for t in json.loads(admin(broker, "token", "list", "--json").stdout)}
    assert first["dated"]["state"] == "expired" and first["dated"]["expires"] == 1577836800
    time.sleep(1.1)
    rerun = admin(broker, "token", "add", "ops", "--expires", "30d", "--secret-stdin", stdin=secret)
    assert rerun.stdout.startswith("unchanged ")
    second = {t["agent"]: t for t in json.loads(admin(broker, "token", "list", "--json").stdout)}
    assert second["ops"]["expires"] == first["ops"]["expires"]
    moved = admin(broker, "token", "add", "ops", "--expires", "2030-06-01", "--secret-stdin", stdin=secret)
    assert moved.stdout.startswith("updated ")
    bad = admin(broker, "token", "add", "x", "--expires", "someday", check=False)
    assert bad.returncode == 1 and "is not a duration" in bad.stderr


def test_an_open_stream_ends_when_its_token_is_revoked(own_broker):
    """At its next keep-alive or message after the token's re-check (every second)."""
    broker = own_broker(env={"AGENT_COMMS_AUTH": "required", "AGENT_COMMS_KEEPALIVE": "0.5"}).start()
    token = add_token(broker, "watcher")
    token_id = json.loads(admin(broker, "token", "list", "--json").stdout)[0]["id"]
    reply = requests.get(f"{broker.url}/stream/tasks", headers=bearer(token), stream=True, timeout=10)
    assert reply.status_code == 200
    admin(broker, "token", "revoke", token_id)
    started = time.monotonic()
    with reply:
        for _ in reply.iter_content(chunk_size=None):  # keep-alives until the stream ends
            assert time.monotonic() - started < 10, "the stream outlived its token"
    assert time.monotonic() - started < 10
    assert requests.get(f"{broker.url}/stream/tasks", headers=bearer(token), timeout=10).status_code == 401


def test_a_narrowed_grant_applies_to_an_open_stream(own_broker):
    broker = own_broker(env={"AGENT_COMMS_AUTH": "required", "AGENT_COMMS_KEEPALIVE": "0.3"}).start()
    secret = "a-chosen-secret-for-the-stream-grant-test-0123"
    admin(broker, "token", "add", "reader", "--secret-stdin", stdin=secret)
    poster = add_token(broker, "poster")
    session = requests.Session()
    session.headers.update(bearer(secret))
    stream = EventStream(f"{broker.url}/stream", last_event_id=0, session=session)
    try:
        requests.post(f"{broker.url}/messages/team-a", json={"message": "before"}, headers=bearer(poster))
        assert [m["message"] for m in stream.messages(1)] == ["before"]
        admin(broker, "token", "add", "reader", "--read", "ops", "--secret-stdin", stdin=secret)
        time.sleep(1.5)  # past the stream's token re-check
        for channel, text in (("team-a", "hidden"), ("ops", "shown")):
            requests.post(f"{broker.url}/messages/{channel}", json={"message": text}, headers=bearer(poster))
        assert [m["message"] for m in stream.messages(1)] == ["shown"]
    finally:
        stream.close()


def test_a_revoked_secret_cannot_be_registered_again(own_broker):
    broker = own_broker().start()
    secret = "a-chosen-secret-that-will-leak-0123456789"
    admin(broker, "token", "add", "ops", "--secret-stdin", stdin=secret)
    token_id = json.loads(admin(broker, "token", "list", "--json").stdout)[0]["id"]
    admin(broker, "token", "revoke", token_id)
    again = admin(broker, "token", "add", "ops", "--secret-stdin", stdin=secret, check=False)
    assert again.returncode == 1 and "was revoked: choose a new secret" in again.stderr
    assert requests.get(f"{broker.url}/status", headers=bearer(secret)).status_code == 401


def test_anonymous_status_in_required_mode_records_no_agent(broker_in):
    broker = broker_in("required")
    token = add_token(broker, "admin")
    assert requests.get(f"{broker.url}/status", headers={"X-Agent-ID": "fake-admin"}).status_code == 200
    agents = [a["id"] for a in requests.get(f"{broker.url}/agents", headers=bearer(token)).json()["agents"]]
    assert "fake-admin" not in agents


def test_status_says_who_the_broker_takes_the_caller_for(broker_in):
    broker = broker_in("write-requires-token")
    token = add_token(broker, "status-bot")
    assert requests.get(f"{broker.url}/status", headers=bearer(token)).json()["agent"] == "status-bot"
    assert requests.get(f"{broker.url}/status", headers={"X-Agent-ID": "someone"}).json()["agent"] == "someone"
    assert requests.get(f"{broker.url}/status").json()["agent"] is None


def test_the_all_channels_stream_needs_some_read_grant(broker_in):
    broker = broker_in("required")
    token = add_token(broker, "writer-only", "--read", "")
    reply = requests.get(f"{broker.url}/stream", headers=bearer(token), timeout=10)
    assert reply.status_code == 403 and "may not read any channel" in reply.json()["error"]


def test_the_access_log_names_the_token_and_its_agent(broker_in):
    broker = broker_in("required")
    token = add_token(broker, "logged-agent")
    token_id = json.loads(admin(broker, "token", "list", "--json").stdout)[0]["id"]
    requests.get(f"{broker.url}/channels", headers={**bearer(token), "X-Agent-ID": "claims-to-be-someone"})
    deadline = time.monotonic() + 10
    while f"token={token_id}(logged-agent)" not in broker.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"agent='claims-to-be-someone' token={token_id}(logged-agent)" in broker.log()
    assert secret_free(broker.log(), token)


def test_an_agent_id_cannot_forge_a_field_of_the_access_log(broker_in):
    broker = broker_in("open")
    forged = "bob token=5e25413a(alice)"
    requests.get(f"{broker.url}/status", headers={"X-Agent-ID": forged}, timeout=10)
    requests.get(f"{broker.url}/status", headers={"X-Agent-ID": "x' token=5e25413a(alice) '"}, timeout=10)
    deadline = time.monotonic() + 10
    while broker.log().count("GET /status") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    # Each worker writes its lines in batches (accesslog.py): two workers' may come in
    # either order.
    lines = [line for line in broker.log().splitlines() if "GET /status" in line]
    lines.sort(key=lambda line: "x\\'" in line)
    assert "agent='bob token=5e25413a(alice)' token=-" in lines[0]
    assert "agent='x\\' token=5e25413a(alice) \\'' token=-" in lines[1], lines[1]


def secret_free(text, secret):
    return secret not in text


def test_a_long_poll_answers_401_if_its_token_goes_while_it_waits(broker_in):
    from concurrent.futures import ThreadPoolExecutor

    broker = broker_in("required")
    token = add_token(broker, "poller")
    token_id = json.loads(admin(broker, "token", "list", "--json").stdout)[0]["id"]
    url = f"{broker.url}/messages/quiet?after=0&wait=20"
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(requests.get, url, headers=bearer(token), timeout=30)
        time.sleep(0.5)
        admin(broker, "token", "revoke", token_id)
        revoked = time.monotonic()
        reply = waiting.result()
        answered = time.monotonic() - revoked
    assert reply.status_code == 401 and "while the request waited" in reply.json()["error"]
    # Within a second or so of the revocation (the README), not when its 20 s wait ends.
    assert answered < 3, answered


def test_a_long_poll_answers_403_soon_after_its_grant_narrows(broker_in):
    from concurrent.futures import ThreadPoolExecutor

    broker = broker_in("required")
    secret = "s" * 40
    admin(broker, "token", "add", "narrowed", "--secret-stdin", stdin=secret)
    url = f"{broker.url}/messages/quiet?after=0&wait=20"
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(requests.get, url, headers=bearer(secret), timeout=30)
        time.sleep(0.5)
        admin(broker, "token", "add", "narrowed", "--read", "other", "--secret-stdin", stdin=secret)
        changed = time.monotonic()
        reply = waiting.result()
    assert reply.status_code == 403 and "may not read channel 'quiet'" in reply.json()["error"]
    assert time.monotonic() - changed < 3


def test_an_open_stream_ends_within_seconds_of_its_token_being_revoked(own_broker):
    """Not at its next keep-alive (15 s by default): within about a second."""
    broker = own_broker(env={"AGENT_COMMS_AUTH": "required"}).start()
    token = add_token(broker, "watcher")
    token_id = json.loads(admin(broker, "token", "list", "--json").stdout)[0]["id"]
    with requests.get(f"{broker.url}/stream/quiet", headers=bearer(token), stream=True, timeout=30) as reply:
        assert reply.status_code == 200
        chunks = reply.iter_content(chunk_size=None)
        assert next(chunks).startswith(b"retry:")
        admin(broker, "token", "revoke", token_id)
        revoked = time.monotonic()
        assert list(chunks) == []  # the broker ends the stream
    assert time.monotonic() - revoked < 3


# -- an agent that holds a token is that token ---------------------------------------------


def agent_seen(broker, agent):
    """The agent's last-seen, as /agents lists it (read anonymously: no one is seen)."""
    agents = requests.get(f"{broker.url}/agents", timeout=10).json()["agents"]
    return next((a["last_seen"] for a in agents if a["id"] == agent), None)


@pytest.mark.parametrize("mode", ["open", "write-requires-token"])
def test_an_anonymous_x_agent_id_cannot_make_a_token_holder_look_online(broker_in, mode):
    broker = broker_in(mode)
    token = add_token(broker, "alice")
    requests.get(f"{broker.url}/status", headers=bearer(token), timeout=10)
    before = agent_seen(broker, "alice")
    assert before is not None
    time.sleep(1.2)  # past the broker's once-a-second refresh of last-seen
    for path in ("/status", "/channels", "/agents", "/messages/general", "/messages/general?after=0&wait=0.1"):
        assert requests.get(broker.url + path, headers={"X-Agent-ID": "alice"}, timeout=10).status_code == 200
    assert agent_seen(broker, "alice") == before
    # Other agents are still seen by their X-Agent-ID (registered only where anonymous
    # callers may write); alice by her token.
    requests.get(f"{broker.url}/status", headers={"X-Agent-ID": "bob"}, timeout=10)
    assert (agent_seen(broker, "bob") is not None) == (mode == "open")
    requests.get(f"{broker.url}/status", headers=bearer(token), timeout=10)
    assert agent_seen(broker, "alice") > before


def test_no_one_posts_as_a_token_holder_without_its_token(broker_in):
    broker = broker_in("open")
    token = add_token(broker, "alice")
    for body in (
        {"sender": "alice", "message": "spoofed"},
        [{"sender": "bob", "message": "x"}, {"sender": "alice", "message": "y"}],
    ):
        reply = requests.post(f"{broker.url}/messages/general", json=body, timeout=10)
        assert reply.status_code == 403 and "has a token" in reply.json()["error"], reply.text
    assert requests.get(f"{broker.url}/messages/general", timeout=10).json()["count"] == 0
    assert requests.post(f"{broker.url}/messages/general", json={"sender": "bob", "message": "ok"}).status_code == 201
    assert (
        requests.post(f"{broker.url}/messages/general", json={"message": "mine"}, headers=bearer(token)).status_code
        == 201
    )
    # A revoked token gives the name back.
    token_id = json.loads(admin(broker, "token", "list", "--json").stdout)[0]["id"]
    admin(broker, "token", "revoke", token_id)
    time.sleep(1.2)  # the broker re-reads who holds tokens at most once a second
    assert requests.post(f"{broker.url}/messages/general", json={"sender": "alice", "message": "x"}).status_code == 201


@pytest.mark.parametrize(
    ("sender", "status", "fragment"),
    [
        ("alice ", 400, "must not begin or end with spaces"),
        ("alice\u00a0", 400, "must not begin or end with spaces"),
        ("\u3000alice", 400, "must not begin or end with spaces"),
        ("Alice", 403, "looks like agent 'alice'"),
        ("alice\ufe0f", 403, "looks like agent 'alice'"),
        ("alice\u034f", 403, "looks like agent 'alice'"),
        ("alice\u3164", 403, "looks like agent 'alice'"),
        ("alice\u2800", 403, "looks like agent 'alice'"),
        ("alice\U000e0100", 403, "looks like agent 'alice'"),
        ("\uff41\uff4c\uff49\uff43\uff45", 403, "looks like agent 'alice'"),  # fullwidth letters
    ],
)
def test_no_one_posts_as_a_look_alike_of_a_token_holder(broker_in, sender, status, fragment):
    broker = broker_in("open")
    add_token(broker, "alice")
    reply = requests.post(f"{broker.url}/messages/general", json={"sender": sender, "message": "m"}, timeout=10)
    assert reply.status_code == status and fragment in reply.json()["error"], reply.text
    assert requests.post(f"{broker.url}/messages/general", json={"sender": "alicia", "message": "m"}).ok
