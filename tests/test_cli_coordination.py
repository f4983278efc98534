"""agent-chat's coordination commands as agents run them: replies and --wait-reply, threads,
read positions (read --unread, watch --resume), task queues (take, done, release, queue)
and inboxes. The real CLI in a subprocess against a real broker on loopback."""

import json
import re
import socket
import struct
import subprocess
import threading
import time
import uuid

import pytest
import requests

from cli_process import CHAT, Running
from conftest import until

LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] (?P<sender>[^:]+): (?P<text>.*)$")


def chat(*args, agent=None, stdin=None, timeout=30):
    who = ["--agent-id", agent] if agent else []
    return subprocess.run([*CHAT, *who, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def ok(done):
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert done.stderr == ""
    return done.stdout.splitlines()


def one_line(done, status, *fragments):
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("agent-chat: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def shown(lines):
    """(sender, text) of each message line printed for people."""
    return [(found["sender"], found["text"]) for found in map(LINE.match, lines)]


def post(url, channel, sender, message, **fields):
    reply = requests.post(
        f"{url}/messages/{channel}", json={"sender": sender, "message": message, **fields}, timeout=10
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def get(url, path, agent=None, **params):
    reply = requests.get(f"{url}{path}", params=params, headers={"X-Agent-ID": agent} if agent else {}, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


# -- send --------------------------------------------------------------------------------


def test_send_with_reply_to_priority_tags_and_meta(url, channel):
    root = int(ok(chat("send", channel, "download movie.mkv", agent="poster"))[0])
    done = chat(
        "send", channel, "on it", "--reply-to", str(root), "--priority", "5", "--tag", "media", "--tag", "urgent",
        "--meta", '{"type": "ack", "eta": 30}', "--json", agent="worker",
    )  # fmt: skip
    printed = json.loads(ok(done)[0])
    stored = get(url, f"/messages/{channel}/{printed['id']}")
    assert printed == {"status": "success", **stored}
    assert (stored["reply_to"], stored["thread"], stored["priority"]) == (root, root, 5)
    assert (stored["tags"], stored["meta"], stored["sender"]) == (
        ["media", "urgent"],
        {"type": "ack", "eta": 30},
        "worker",
    )
    # Without the options the message has the broker's defaults.
    plain = get(url, f"/messages/{channel}/{root}")
    assert (plain["reply_to"], plain["priority"], plain["tags"], plain["meta"]) == (None, 3, [], {})


def test_send_to_an_agent_posts_to_its_inbox(url):
    bob = f"bob-{uuid.uuid4().hex[:8]}"
    stored = int(ok(chat("send", f"@{bob}", "lunch at noon?", agent="alice"))[0])
    messages = get(url, f"/messages/@{bob}")["messages"]
    assert [(m["id"], m["sender"], m["message"]) for m in messages] == [(stored, "alice", "lunch at noon?")]


class AnswerLosingProxy:
    """A loopback TCP relay to the broker that hands the broker the first `lose` requests
    whole, then resets the client's connection before the answer: a post that was stored
    but whose answer was lost. It records each request's body."""

    def __init__(self, target, lose=1):
        self.target = target
        self.lose = lose
        self.bodies = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone would not)
        self.server.close()
        self.thread.join(5)

    def _serve(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client):
        with client, socket.create_connection(self.target, timeout=10) as upstream:
            client.settimeout(10)
            try:
                request = _http_message(client)
            except OSError:
                return  # not HTTP: agent-chat probing whether the port speaks TLS
            self.bodies.append(request.split(b"\r\n\r\n", 1)[1])
            upstream.sendall(request)
            answer = _http_message(upstream)
            if len(self.bodies) <= self.lose:
                # SO_LINGER 0: close with a reset, as a broker killed mid-answer does.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                client.sendall(answer)


def _http_message(sock):
    """One HTTP request or response read whole (its body by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _received(sock)
        if data.startswith(b"\x16"):  # a TLS handshake: a broker answers it with a 400 and closes
            raise ConnectionError("not HTTP")
    head, body = data.split(b"\r\n\r\n", 1)
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        body += _received(sock)
    return head + b"\r\n\r\n" + body


def _received(sock):
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("closed mid-message")
    return chunk


def test_send_whose_answer_was_lost_is_sent_again_and_stored_once(broker, channel):
    """The post reached the broker and its answer was lost: agent-chat sends it again
    with the same idempotency key, the broker answers with the message it stored, and
    there is one message."""
    with AnswerLosingProxy(("127.0.0.1", broker.port)) as proxy:
        done = chat("--broker", proxy.url, "send", channel, "exactly once", agent="poster")
    printed = ok(done)
    messages = get(broker.url, f"/messages/{channel}")["messages"]
    assert [m["message"] for m in messages] == ["exactly once"]
    assert printed == [str(messages[0]["id"])]
    first, again = (json.loads(body) for body in proxy.bodies)
    assert first == again and uuid.UUID(first["key"]).version == 4


def test_every_send_has_its_own_key(url, channel):
    """Two sends of the same text are two messages: the key is per post, not per text."""
    ids = [ok(chat("send", channel, "same text", agent="poster"))[0] for _ in range(2)]
    assert len(set(ids)) == 2
    assert len(get(url, f"/messages/{channel}")["messages"]) == 2


# -- --wait-reply ------------------------------------------------------------------------


def test_wait_reply_prints_the_first_reply_and_exits_0(url, channel):
    with Running([*CHAT, "--agent-id", "poster", "send", channel, "convert song.flac", "--wait-reply"]) as sent:
        until(lambda: get(url, f"/messages/{channel}")["messages"], timeout=10)
        task = get(url, f"/messages/{channel}")["messages"][0]
        post(url, channel, "chatter", "not a reply")
        other = post(url, channel, "someone", "another question")
        post(url, channel, "worker", "answers the other one", reply_to=other["id"])
        post(url, channel, "worker", "✅ converted", reply_to=task["id"])
        post(url, channel, "worker", "a second reply", reply_to=task["id"])
        assert sent.wait(20) == 0, sent.stderr()
        assert shown(sent.rest()) == [("worker", "✅ converted")]
        assert sent.stderr() == ""


def test_wait_reply_gets_the_reply_of_done(url, channel):
    """The reply `done` posts for a task is the reply the poster waits for."""
    with Running([*CHAT, "--agent-id", "poster", "send", channel, "job", "--wait-reply", "--json"]) as sent:
        until(lambda: get(url, f"/messages/{channel}")["messages"], timeout=10)
        taken = json.loads(ok(chat("take", channel, "--json", agent="worker"))[0])
        ok(chat("done", channel, str(taken["id"]), "the result", agent="worker"))
        assert sent.wait(20) == 0, sent.stderr()
        reply = json.loads(sent.rest()[0])
        assert (reply["message"], reply["reply_to"], reply["sender"]) == ("the result", taken["id"], "worker")


def test_wait_reply_times_out_with_124(url, channel):
    started = time.monotonic()
    done = chat("send", channel, "anyone?", "--wait-reply", "--timeout", "1.5", agent="poster")
    assert 1.4 < time.monotonic() - started < 10
    stored = get(url, f"/messages/{channel}")["messages"][0]
    one_line(done, 124, f"no reply to message {stored['id']}")
    assert done.stdout == ""


# -- read --thread, read --unread --------------------------------------------------------


def test_read_thread_prints_the_first_message_and_its_replies(url, channel):
    root = post(url, channel, "poster", "question")
    post(url, channel, "other", "unrelated")
    first = post(url, channel, "worker", "answer", reply_to=root["id"])
    post(url, channel, "poster", "thanks", reply_to=first["id"])
    lines = ok(chat("read", channel, "--thread", str(root["id"])))
    assert shown(lines) == [("poster", "question"), ("worker", "answer"), ("poster", "thanks")]
    after = ok(chat("read", channel, "--thread", str(root["id"]), "--after", str(first["id"]), "--json"))
    assert [json.loads(line)["message"] for line in after] == ["thanks"]


def test_read_unread_prints_what_follows_the_read_position_and_moves_it(url, channel):
    for number in range(1, 4):
        post(url, channel, "poster", f"m{number}")
    assert shown(ok(chat("read", channel, "--unread", "--limit", "2", agent="reader"))) == [
        ("poster", "m1"),
        ("poster", "m2"),
    ]
    assert shown(ok(chat("read", channel, "--unread", agent="reader"))) == [("poster", "m3")]
    assert ok(chat("read", channel, "--unread", agent="reader")) == []
    newest = post(url, channel, "poster", "m4")
    assert shown(ok(chat("read", channel, "--unread", agent="reader"))) == [("poster", "m4")]
    assert get(url, f"/cursors/{channel}", agent="reader")["read"] == newest["id"]
    # Read positions are per agent: another reader has read nothing.
    assert len(ok(chat("read", channel, "--unread", agent="someone-else"))) == 4


# -- watch --resume ----------------------------------------------------------------------


def test_watch_resume_continues_where_the_last_watcher_stopped(url, channel):
    post(url, channel, "poster", "m1")
    post(url, channel, "poster", "m2")
    # From the read position (nothing read yet): both, and the position moves past them.
    assert shown(ok(chat("watch", channel, "--resume", "--count", "2", "--timeout", "20", agent="w"))) == [
        ("poster", "m1"),
        ("poster", "m2"),
    ]
    with Running([*CHAT, "--agent-id", "w", "watch", channel, "--resume"]) as watcher:
        m3 = post(url, channel, "poster", "m3")
        assert shown([watcher.line()]) == [("poster", "m3")]
        until(lambda: get(url, f"/cursors/{channel}", agent="w")["read"] == m3["id"], timeout=10)
    # Posted while no watcher ran: the next one starts with it, and prints nothing twice.
    post(url, channel, "poster", "m4")
    with Running([*CHAT, "--agent-id", "w", "watch", channel, "--resume", "--timeout", "20"]) as watcher:
        assert shown([watcher.line()]) == [("poster", "m4")]
        post(url, channel, "poster", "m5")
        assert shown([watcher.line()]) == [("poster", "m5")]


# -- take, done, release, queue ----------------------------------------------------------


def test_take_prints_the_task_with_its_claim(url, channel):
    task = post(url, channel, "poster", "Download media file: movie.mkv")
    lines = ok(chat("take", channel, agent="worker-1"))
    assert re.fullmatch(rf"task {task['id']} of {channel}: attempt 1, yours until \d{{4}}-.*", lines[0]), lines
    assert shown(lines[1:]) == [("poster", "Download media file: movie.mkv")]
    # Held: another worker gets nothing, at once (124), or after its --wait.
    one_line(chat("take", channel, agent="worker-2"), 124, f"no task came in {channel}")
    started = time.monotonic()
    one_line(chat("take", channel, "--wait", "1", agent="worker-2"), 124)
    assert 0.9 < time.monotonic() - started < 10


def test_take_json_is_the_broker_answer(url, channel):
    task = post(url, channel, "poster", "job")
    taken = json.loads(ok(chat("take", channel, "--lease", "1m", "--json", agent="worker"))[0])
    assert taken["id"] == task["id"] and taken["claim"]["lease"] == 60
    assert taken["claim"]["agent"] == "worker" and taken["task"]["state"] == "claimed"
    stored = get(url, f"/messages/{channel}/{task['id']}")
    assert {key: taken[key] for key in stored} == stored


def test_take_waits_for_a_task_to_come(url, channel):
    with Running([*CHAT, "--agent-id", "worker", "take", channel, "--wait", "20", "--json"]) as taking:
        time.sleep(0.5)
        task = post(url, channel, "poster", "late task")
        assert taking.wait(20) == 0, taking.stderr()
        assert json.loads(taking.rest()[0])["id"] == task["id"]


def test_take_waits_past_the_brokers_longest_wait(own_broker):
    """A broker cuts a long-poll at AGENT_COMMS_MAX_WAIT (here 1 s): take asks again until
    its own --wait is over."""
    broker = own_broker(env={"AGENT_COMMS_MAX_WAIT": "1"}).start()
    command = [*CHAT, "--broker", broker.url, "--agent-id", "worker", "take", "later", "--wait", "20s", "--json"]
    with Running(command) as taking:
        time.sleep(2.5)
        task = post(broker.url, "later", "poster", "posted after two cut waits")
        assert taking.wait(20) == 0, taking.stderr()
        assert json.loads(taking.rest()[0])["id"] == task["id"]
    started = time.monotonic()
    done = chat("--broker", broker.url, "take", "later", "--wait", "2.5", agent="worker")
    one_line(done, 124, "within 2.5 s")
    assert 2.4 < time.monotonic() - started < 10


def test_done_release_and_queue(url, channel):
    first = post(url, channel, "poster", "first")
    second = post(url, channel, "poster", "second")
    ok(chat("take", channel, agent="w"))
    ok(chat("take", channel, agent="w"))
    queue = json.loads(ok(chat("queue", channel, "--json"))[0])
    assert queue["counts"] == {"pending": 0, "claimed": 2, "done": 0, "dead": 0}
    assert [(t["id"], t["agent"], t["attempt"]) for t in queue["claimed"]] == [
        (first["id"], "w", 1),
        (second["id"], "w", 1),
    ]

    # Only the holder finishes it: one line, exit 2, naming the conflict.
    one_line(chat("done", channel, str(first["id"]), "stolen", agent="intruder"), 2, "answered 409")
    lines = ok(chat("done", channel, str(first["id"]), "✅ first done", agent="w"))
    reply = get(url, f"/messages/{channel}")["messages"][-1]
    assert lines == [f"task {first['id']}: done, reply {reply['id']}"]
    assert (reply["message"], reply["reply_to"]) == ("✅ first done", first["id"])

    assert ok(chat("release", channel, str(second["id"]), agent="w")) == [f"task {second['id']}: pending, attempt 1"]
    taken = json.loads(ok(chat("take", channel, "--json", agent="w2"))[0])
    assert (taken["id"], taken["claim"]["attempt"]) == (second["id"], 2)
    assert ok(chat("release", channel, str(second["id"]), "--dead", agent="w2")) == [
        f"task {second['id']}: dead, attempt 2"
    ]
    lines = ok(chat("queue", channel))
    assert lines[0] == "pending 0  claimed 0  done 1  dead 1"
    assert lines[1].split() == ["TASK", "STATE", "AGENT", "EXPIRES", "ATTEMPT"]
    assert lines[2].split() == [str(second["id"]), "dead", "w2", "-", "2"]
    # A dead task is never handed out again.
    one_line(chat("take", channel, agent="w3"), 124)


def test_done_without_a_message_posts_no_reply_and_reads_one_from_stdin(url, channel):
    quiet = post(url, channel, "poster", "quiet")
    loud = post(url, channel, "poster", "loud")
    for _ in range(2):
        ok(chat("take", channel, agent="w"))
    assert ok(chat("done", channel, str(quiet["id"]), agent="w")) == [f"task {quiet['id']}: done"]
    done = json.loads(ok(chat("done", channel, str(loud["id"]), "-", "--json", agent="w", stdin="line 1\nline 2\n"))[0])
    assert done["task"]["state"] == "done" and done["reply"]["message"] == "line 1\nline 2"
    assert [m["message"] for m in get(url, f"/messages/{channel}")["messages"]] == ["quiet", "loud", "line 1\nline 2"]


# -- inbox -------------------------------------------------------------------------------


def test_inbox_reads_unread_and_watches_the_agents_inbox(url):
    me = f"carol-{uuid.uuid4().hex[:8]}"
    post(url, f"@{me}", "alice", "first note")
    ok(chat("send", f"@{me}", "second note", agent="bob"))
    assert shown(ok(chat("inbox", agent=me))) == [("alice", "first note"), ("bob", "second note")]
    assert len(ok(chat("inbox", "--unread", agent=me))) == 2
    assert ok(chat("inbox", "--unread", agent=me)) == []
    with Running([*CHAT, "--agent-id", me, "inbox", "--watch", "--unread"]) as watching:
        post(url, f"@{me}", "alice", "third note")
        assert shown([watching.line()]) == [("alice", "third note")]


# -- usage errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["send", "c", "m", "--priority", "9"], ["--priority must be a number from 1 to 5"]),
        (["send", "c", "m", "--priority", "x"], ["--priority must be a number"]),
        (["send", "c", "m", "--reply-to", "0"], ["--reply-to must be a number of 1 or more"]),
        (["send", "c", "m", "--meta", "[1]"], ["--meta must be a JSON object"]),
        (["send", "c", "m", "--meta", "{nope"], ["--meta must be a JSON object"]),
        (["send", "c", "m", "--timeout", "3"], ["--timeout needs --wait-reply"]),
        (["send", "c", "m", "--wait-reply", "--timeout", "soon"], ["--timeout must be 0 s or more"]),
        (["read", "c", "--unread", "--after", "3"], ["--unread and --after exclude each other"]),
        (["read", "c", "--thread", "x"], ["--thread must be a number"]),
        (["watch", "c", "--resume", "--after", "3"], ["--resume and --after exclude each other"]),
        (["take", "c", "--lease", "0"], ["--lease must be 1 s or more"]),
        (["take", "c", "--lease", "5x"], ["--lease must be 1 s or more", "30s, 5m, 1h"]),
        (["take", "c", "--wait", "-1"], ["--wait must be 0 s or more"]),
        (["take"], ["take needs CHANNEL"]),
        (["done", "c"], ["done needs ID"]),
        (["done", "c", "seven"], ["ID must be a number"]),
        (["release", "c", "1", "--dead", "--dead"], ["--dead is given twice"]),
        (["queue"], ["queue needs CHANNEL"]),
        (["inbox", "extra"], ["inbox takes no arguments"]),
        (["work", "c"], ["work needs COMMAND"]),
        (["work", "c", "--", "no-such-program-here"], ["cannot run 'no-such-program-here'"]),
        (["work", "c", "--count", "0", "--", "true"], ["--count must be a number of 1 or more"]),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(args, fragments):
    one_line(chat(*args, agent="someone"), 1, *fragments)


def test_inbox_without_an_agent_id_is_a_usage_error():
    """With a token and no agent id, agent-chat does not know whose inbox to read."""
    one_line(chat("--token", "a-token", "inbox"), 1, "inbox needs your agent id")


def test_a_task_that_does_not_exist_is_one_line_and_exit_2(url, channel):
    one_line(chat("done", channel, "999999999", agent="w"), 2, "answered")
