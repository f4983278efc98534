"""Replies, priorities, tags, meta, idempotency keys, read positions, receipts and inboxes,
against the real broker."""

import subprocess
import threading
import time

import pytest
import requests

from broker_process import BIN, sessions_on_two_workers


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def broker_backend(request):
    """Every test here runs on both store backends."""
    return request.param


def send(url, channel, body, status=201, **kwargs):
    reply = requests.post(f"{url}/messages/{channel}", json=body, timeout=10, **kwargs)
    assert reply.status_code == status, reply.text
    return reply.json()


def read(url, channel, headers=None, **params):
    reply = requests.get(f"{url}/messages/{channel}", params=params, headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def agent(name):
    return {"X-Agent-ID": name}


# -- replies and threads --------------------------------------------------------------------


def test_a_reply_names_its_thread_and_a_thread_reads_oldest_first(url, channel):
    root = send(url, channel, {"sender": "poster", "message": "download the dataset"})
    assert root["reply_to"] is None and root["thread"] is None
    send(url, channel, {"sender": "other", "message": "unrelated"})
    first = send(url, channel, {"sender": "worker", "message": "on it", "reply_to": root["id"]})
    assert first["reply_to"] == root["id"] and first["thread"] == root["id"]
    # A reply to a reply stays in the thread of the first message.
    second = send(url, channel, {"sender": "poster", "message": "thanks", "reply_to": first["id"]})
    assert second["reply_to"] == first["id"] and second["thread"] == root["id"]
    thread = read(url, channel, thread=root["id"])["messages"]
    assert [m["id"] for m in thread] == [root["id"], first["id"], second["id"]]
    # Paged on with a cursor, and waited on like any read.
    after = read(url, channel, thread=root["id"], after=first["id"])["messages"]
    assert [m["id"] for m in after] == [second["id"]]


def test_reply_to_must_name_an_earlier_message_of_the_same_channel(url, channel):
    elsewhere = send(url, channel + "-other", {"sender": "a", "message": "x"})
    for reply_to in (elsewhere["id"], 10**12, 0, -1, True, "1", 1.5):
        refused = requests.post(f"{url}/messages/{channel}", json={"sender": "a", "message": "r", "reply_to": reply_to})
        assert refused.status_code == 400, (reply_to, refused.text)
        assert "reply_to" in refused.json()["error"]
    assert read(url, channel)["messages"] == []


def test_a_long_poll_on_a_thread_returns_the_first_reply(url, channel):
    root = send(url, channel, {"sender": "poster", "message": "question"})
    got = {}

    def waiter():
        got["page"] = read(url, channel, thread=root["id"], after=root["id"], wait=10)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    send(url, channel, {"sender": "chatter", "message": "not an answer"})
    time.sleep(0.3)
    assert thread.is_alive(), "a message outside the thread ended the wait"
    answer = send(url, channel, {"sender": "worker", "message": "answer", "reply_to": root["id"]})
    thread.join(10)
    assert [m["id"] for m in got["page"]["messages"]] == [answer["id"]]


def test_one_message_by_id(url, channel):
    posted = send(url, channel, {"sender": "a", "message": "hello", "tags": ["x"]})
    one = requests.get(f"{url}/messages/{channel}/{posted['id']}")
    assert one.status_code == 200 and one.json() == {k: v for k, v in posted.items() if k != "status"}
    assert requests.get(f"{url}/messages/{channel}-nope/{posted['id']}").status_code == 404
    assert requests.get(f"{url}/messages/{channel}/{posted['id'] + 10**6}").status_code == 404
    assert requests.get(f"{url}/messages/{channel}/abc").status_code == 404


# -- priority, tags, meta --------------------------------------------------------------------


def test_priority_tags_and_meta_are_stored_shown_and_filtered(url, channel):
    low = send(url, channel, {"sender": "a", "message": "fyi", "priority": 1})
    alert = send(
        url,
        channel,
        {"sender": "a", "message": "disk full", "priority": 5, "tags": ["alert", "disk"], "meta": {"host": "ct-200"}},
    )
    plain = send(url, channel, {"sender": "a", "message": "plain"})
    assert (low["priority"], plain["priority"], alert["priority"]) == (1, 3, 5)
    assert alert["tags"] == ["alert", "disk"] and alert["meta"] == {"host": "ct-200"}
    assert plain["tags"] == [] and plain["meta"] == {}
    assert [m["id"] for m in read(url, channel, tag="disk")["messages"]] == [alert["id"]]
    assert [m["id"] for m in read(url, channel, min_priority=3)["messages"]] == [alert["id"], plain["id"]]
    assert [m["id"] for m in read(url, channel, min_priority=4, tag="alert", after=0)["messages"]] == [alert["id"]]
    assert read(url, channel, tag="nothing")["messages"] == []
    # Every read shows the fields.
    latest = read(url, channel)["messages"][1]
    assert (latest["priority"], latest["tags"], latest["meta"]) == (5, ["alert", "disk"], {"host": "ct-200"})


@pytest.mark.parametrize(
    "extra",
    [
        {"priority": 0},
        {"priority": 6},
        {"priority": True},
        {"priority": "5"},
        {"tags": "alert"},
        {"tags": [f"t{n}" for n in range(11)]},
        {"tags": ["x" * 33]},
        {"tags": [""]},
        {"tags": ["a\nb"]},
        {"tags": [7]},
        {"meta": []},
        {"meta": "text"},
        {"meta": {"blob": "x" * 4100}},
        {"key": ""},
        {"key": 5},
        {"key": "k" * 129},
    ],
)
def test_invalid_optional_fields_are_400_and_store_nothing(url, channel, extra):
    refused = requests.post(f"{url}/messages/{channel}", json={"sender": "a", "message": "m", **extra})
    assert refused.status_code == 400, refused.text
    assert read(url, channel)["messages"] == []


def test_invalid_filters_are_400(url, channel):
    for params in ({"min_priority": 0}, {"min_priority": 6}, {"thread": "x"}, {"tag": "x" * 33}, {"unread": "maybe"}):
        assert requests.get(f"{url}/messages/{channel}", params=params).status_code == 400, params


# -- idempotency keys ------------------------------------------------------------------------


def test_a_post_repeated_with_its_key_stores_nothing_and_answers_the_first(url, channel):
    body = {"sender": "a", "message": "deploy v2", "key": "deploy-v2"}
    first = send(url, channel, body)
    again = send(url, channel, body, status=200)
    assert again["id"] == first["id"] and again["duplicate"] is True and "duplicate" not in first
    # The header works the same; the key is the sender's own.
    header = {"Idempotency-Key": "hdr-1"}
    by_header = send(url, channel, {"sender": "a", "message": "x"}, headers=header)
    assert send(url, channel, {"sender": "a", "message": "x"}, status=200, headers=header)["id"] == by_header["id"]
    other_sender = send(url, channel, {"sender": "b", "message": "deploy v2", "key": "deploy-v2"})
    assert other_sender["id"] != first["id"]
    assert [m["id"] for m in read(url, channel)["messages"]] == [first["id"], by_header["id"], other_sender["id"]]
    # The same key for another channel is a mistake the sender should hear of.
    conflict = requests.post(f"{url}/messages/{channel}-2", json=body)
    assert conflict.status_code == 409 and "deploy-v2" in conflict.json()["error"]
    mismatch = requests.post(f"{url}/messages/{channel}", json=body, headers={"Idempotency-Key": "other"})
    assert mismatch.status_code == 400


def test_keys_in_a_batch_are_per_item(url, channel):
    first = send(url, channel, [{"sender": "a", "message": "one", "key": "b1"}, {"sender": "a", "message": "two"}])
    assert first["duplicates"] == 0
    again = send(url, channel, [{"sender": "a", "message": "one", "key": "b1"}, {"sender": "a", "message": "three"}])
    assert again["duplicates"] == 1 and again["messages"][0]["id"] == first["messages"][0]["id"]
    repeat = send(url, channel, [{"sender": "a", "message": "one", "key": "b1"}], status=200)
    assert repeat["duplicates"] == 1
    same_twice = [{"sender": "a", "message": "x", "key": "k"}, {"sender": "a", "message": "y", "key": "k"}]
    assert requests.post(f"{url}/messages/{channel}", json=same_twice).status_code == 400
    # Keys are the sender's own: two senders may use the same one in a batch.
    two_senders = [{"sender": "c", "message": "three", "key": "k"}, {"sender": "d", "message": "three", "key": "k"}]
    assert send(url, channel, two_senders)["duplicates"] == 0
    header_batch = requests.post(
        f"{url}/messages/{channel}", json=[{"sender": "a", "message": "x"}], headers={"Idempotency-Key": "h"}
    )
    assert header_batch.status_code == 400
    assert [m["message"] for m in read(url, channel)["messages"]] == ["one", "two", "three", "three", "three"]


def test_the_same_key_posted_at_once_on_both_workers_is_stored_once(url, channel):
    sessions = sessions_on_two_workers(url) * 4
    answers = []
    barrier = threading.Barrier(len(sessions))

    def poster(session):
        barrier.wait(10)
        reply = session.post(
            f"{url}/messages/{channel}", json={"sender": "a", "message": "m", "key": "race"}, timeout=10
        )
        answers.append((reply.status_code, reply.json()["id"]))

    threads = [threading.Thread(target=poster, args=(session,)) for session in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert sorted(status for status, _ in answers) == [200] * 7 + [201]
    assert len({message_id for _, message_id in answers}) == 1
    assert len(read(url, channel)["messages"]) == 1


# -- read positions and receipts -------------------------------------------------------------


def test_read_positions_move_forward_only_and_count_unread(url, channel):
    ids = [send(url, channel, {"sender": "a", "message": f"m{n}"})["id"] for n in range(4)]
    cursor_url = f"{url}/cursors/{channel}"
    assert requests.get(cursor_url, headers=agent("reader")).json() == {
        "channel": channel,
        "agent": "reader",
        "read": 0,
        "unread": 4,
    }
    moved = requests.put(cursor_url, json={"read": ids[1]}, headers=agent("reader")).json()
    assert moved == {"channel": channel, "agent": "reader", "read": ids[1], "moved": True}
    back = requests.put(cursor_url, json={"read": ids[0]}, headers=agent("reader")).json()
    assert back["read"] == ids[1] and back["moved"] is False
    unread = read(url, channel, headers=agent("reader"), unread=1)["messages"]
    assert [m["id"] for m in unread] == ids[2:]
    listed = {c["name"]: c for c in requests.get(f"{url}/channels", headers=agent("reader")).json()["channels"]}
    assert listed[channel]["unread"] == 2
    # Each agent has its own; without an agent there is no position.
    assert len(read(url, channel, headers=agent("someone-else"), unread=1)["messages"]) == 4
    assert requests.get(f"{url}/messages/{channel}", params={"unread": 1}).status_code == 400
    assert requests.put(cursor_url, json={"read": ids[1]}).status_code == 400
    assert requests.put(cursor_url, json={"read": ids[-1] + 10**6}, headers=agent("reader")).status_code == 400
    assert requests.put(cursor_url, json={"read": "x"}, headers=agent("reader")).status_code == 400
    assert requests.get(f"{url}/messages/{channel}", params={"unread": 1, "after": 0}).status_code == 400


def test_read_positions_and_receipts_survive_a_restart(own_broker, channel):
    broker = own_broker().start()
    url = broker.url
    alert = send(url, channel, {"sender": "monitor", "message": "disk full", "priority": 5})["id"]
    later = send(url, channel, {"sender": "monitor", "message": "disk ok"})["id"]
    before = time.time()
    requests.put(f"{url}/cursors/{channel}", json={"read": alert}, headers=agent("ops-1"))
    time.sleep(0.05)
    requests.put(f"{url}/cursors/{channel}", json={"read": later}, headers=agent("ops-2"))
    requests.put(f"{url}/cursors/{channel}", json={"read": later}, headers=agent("ops-1"))
    broker.restart()
    receipts = requests.get(f"{url}/messages/{channel}/{alert}/receipts").json()
    assert [r["agent"] for r in receipts["receipts"]] == ["ops-1", "ops-2"] and receipts["count"] == 2
    first_read = receipts["receipts"][0]["read_at"]
    assert before <= first_read <= receipts["receipts"][1]["read_at"]
    # ops-1 reached `later` on its second move: that is when it read it.
    on_later = requests.get(f"{url}/messages/{channel}/{later}/receipts").json()["receipts"]
    assert [r["agent"] for r in on_later] == ["ops-2", "ops-1"]
    assert requests.get(f"{url}/cursors/{channel}", headers=agent("ops-1")).json()["read"] == later
    assert read(url, channel, headers=agent("ops-1"), unread=1)["messages"] == []
    assert requests.get(f"{url}/messages/{channel}/{later + 10**6}/receipts").status_code == 404


# -- inboxes -----------------------------------------------------------------------------------


def admin(broker, *args):
    done = subprocess.run(
        [str(BIN / "agent-comms-broker"), *args, *broker.store_args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("mode", ["write-requires-token", "required"])
def test_an_inbox_is_read_only_by_its_agent_or_an_inbox_grant(own_broker, mode):
    broker = own_broker(env={"AGENT_COMMS_AUTH": mode}).start()
    url = broker.url
    bob = admin(broker, "token", "add", "bob")
    alice = admin(broker, "token", "add", "alice")  # read and write '*'
    auditor = admin(broker, "token", "add", "auditor", "--read", "@*", "--write", "")
    narrow = admin(broker, "token", "add", "narrow", "--write", "tasks")
    sent = send(url, "@bob", {"message": "for bob only"}, headers=bearer(alice))
    assert sent["sender"] == "alice"
    assert requests.post(f"{url}/messages/@bob", json={"message": "x"}, headers=bearer(narrow)).status_code == 403
    # Posting to an inbox does not let a writer learn which ids it holds.
    probe = requests.post(f"{url}/messages/@bob", json={"message": "p", "reply_to": sent["id"]}, headers=bearer(alice))
    assert probe.status_code == 403
    assert [m["id"] for m in read(url, "@bob", headers=bearer(bob))["messages"]] == [sent["id"]]
    assert [m["id"] for m in read(url, "@bob", headers=bearer(auditor))["messages"]] == [sent["id"]]
    assert requests.get(f"{url}/messages/@bob", headers=bearer(alice)).status_code == 403
    assert requests.get(f"{url}/messages/@bob/{sent['id']}", headers=bearer(alice)).status_code == 403
    assert requests.get(f"{url}/messages/@bob").status_code == 401
    assert requests.get(f"{url}/stream/@bob", headers=bearer(alice), timeout=5).status_code == 403

    # Listings and the stream of every channel leave out inboxes the caller may not read.
    def names(headers):
        return [c["name"] for c in requests.get(f"{url}/channels", headers=headers).json()["channels"]]

    assert "@bob" in names(bearer(bob)) and "@bob" not in names(bearer(alice))
    if mode == "write-requires-token":
        assert "@bob" not in names({})
    with requests.get(f"{url}/stream", params={"after": 0}, headers=bearer(alice), stream=True, timeout=5) as stream:
        send(url, "general", {"message": "public"}, headers=bearer(alice))
        seen = b""
        for chunk in stream.iter_content(None):
            seen += chunk
            if b"public" in seen:
                break
    assert b"for bob only" not in seen


def test_in_open_mode_inboxes_are_private_by_convention_only(url):
    sent = send(url, "@carol", {"sender": "dave", "message": "psst"})
    assert sent["channel"] == "@carol"
    assert [m["message"] for m in read(url, "@carol")["messages"]] == ["psst"]
    for bad in ("@", "@-x", "@a.b c", "@" + "x" * 129):
        refused = requests.post(f"{url}/messages/{bad}", json={"sender": "d", "message": "m"})
        assert refused.status_code == 400 and "inbox" in refused.json()["error"], bad


# -- upgrades and backups ----------------------------------------------------------------------


def test_a_broker_py_database_upgrades_in_place_and_works_as_a_queue(own_broker, tmp_path):
    """On SQLite in place; on PostgreSQL after `migrate-to-postgres`."""
    from legacy_broker import legacy_database

    db = tmp_path / "messages.db"
    legacy_database(str(db), [("tasks", "warp-ct200", "Download movie.mkv", "2025-08-03 18:42:28")])
    broker = own_broker()
    if broker.database_url:
        moved = subprocess.run(
            [str(BIN / "agent-comms-broker"), "migrate-to-postgres", "--from", str(db), "--to", broker.database_url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert moved.returncode == 0, moved.stderr
    broker.start()
    assert broker.db_path == str(db)
    old = read(broker.url, "tasks")["messages"][0]
    assert (old["id"], old["message"], old["priority"], old["tags"], old["thread"]) == (
        1,
        "Download movie.mkv",
        3,
        [],
        None,
    )
    got = requests.post(f"{broker.url}/queue/tasks/take", json={}, headers=agent("w"), timeout=10)
    assert got.status_code == 200 and got.json()["id"] == 1
    done = requests.post(f"{broker.url}/messages/tasks/1/done", json={"message": "ok"}, headers=agent("w"))
    assert done.json()["reply"]["thread"] == 1


def test_backups_hold_tasks_positions_and_keys(own_broker, tmp_path):
    broker = own_broker().start()
    url = broker.url
    task = send(url, "jobs", {"sender": "p", "message": "job", "key": "job-1"})["id"]
    requests.post(f"{url}/queue/jobs/take", json={"lease": 3600}, headers=agent("w"), timeout=10)
    requests.put(f"{url}/cursors/jobs", json={"read": task}, headers=agent("reader"), timeout=10)
    copy = tmp_path / "copy.db"
    admin_bin = str(BIN / "agent-comms-broker")
    done = subprocess.run([admin_bin, "backup", str(copy), *broker.store_args], capture_output=True, text=True)
    if broker.database_url:  # PostgreSQL has pg_dump: the command says so, in one line
        assert done.returncode == 1 and "pg_dump" in done.stderr and len(done.stderr.splitlines()) == 1
        return
    assert done.returncode == 0, done.stderr
    requests.post(f"{url}/messages/jobs/{task}/release", json={}, headers=agent("w"), timeout=10)
    broker.stop()
    restored = subprocess.run([admin_bin, "restore", str(copy), "--db", broker.db_path], capture_output=True, text=True)
    assert restored.returncode == 0, restored.stderr
    broker.start()
    shown = requests.get(f"{url}/messages/jobs/{task}", timeout=10).json()
    assert shown["task"]["state"] == "claimed" and shown["task"]["agent"] == "w"
    assert requests.get(f"{url}/cursors/jobs", headers=agent("reader"), timeout=10).json()["read"] == task
    assert send(url, "jobs", {"sender": "p", "message": "job", "key": "job-1"}, status=200)["id"] == task


def test_a_schema_2_database_upgrades_to_coordination(tmp_path):
    from agent_comms_broker.store import Post, Store
    from agent_comms_broker.store.schema import SCHEMA_VERSION
    from legacy_broker import older_schema_database

    path = str(tmp_path / "v2.db")
    older_schema_database(path, 2, [("tasks", "a", "old task", 1.0)])
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION
    task = store.take("tasks", "w", 60)
    assert (task.id, task.message, task.priority, task.tags) == (1, "old task", 3, ())
    _, reply = store.done("tasks", 1, "w", Post("tasks", "w", "done", reply_to=1))
    assert reply.thread == 1
    store.close()
