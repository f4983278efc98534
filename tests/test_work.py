"""`agent-chat work CHANNEL -- COMMAND`: the worker loop, run as a subprocess against a
real broker with real commands (sh scripts): one that succeeds, one that fails, one killed
mid-task, a SIGTERM to work itself, lease renewal while a command runs, and a worker that
keeps taking tasks without --count."""

import json
import os
import signal
import subprocess
import threading
import time

import requests

from cli_process import CHAT, Running
from conftest import until


def post(url, channel, sender, message):
    reply = requests.post(f"{url}/messages/{channel}", json={"sender": sender, "message": message}, timeout=10)
    assert reply.status_code == 201, reply.text
    return reply.json()


def message(url, channel, message_id):
    reply = requests.get(f"{url}/messages/{channel}/{message_id}", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def queue(url, channel):
    return requests.get(f"{url}/queue/{channel}", timeout=10).json()["counts"]


def work(channel, *command, agent="worker", options=(), timeout=60):
    """Runs work to its end; (exit status, stdout lines, stderr)."""
    done = subprocess.run(
        [*CHAT, "--agent-id", agent, "work", channel, *options, "--", *command],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout.splitlines(), done.stderr


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_command_that_succeeds_marks_each_task_done_with_its_output(url, channel):
    first = post(url, channel, "poster", "convert song.flac")
    second = post(url, channel, "poster", "convert talk.wav")
    script = 'echo "$AGENT_COMMS_TASK_ID $AGENT_COMMS_TASK_CHANNEL $AGENT_COMMS_TASK_SENDER: $(cat)"'
    status, lines, stderr = work(channel, "sh", "-c", script, options=["--count", "2"])
    assert (status, stderr) == (0, "")
    for task, line in zip((first, second), lines, strict=True):
        done = message(url, channel, task["id"])
        assert done["task"]["state"] == "done" and done["task"]["agent"] == "worker"
        reply = message(url, channel, done["task"]["reply"])
        assert line == f"task {task['id']}: done, reply {reply['id']}"
        assert reply["message"] == f"{task['id']} {channel} poster: {task['message']}"
        assert (reply["reply_to"], reply["sender"]) == (task["id"], "worker")
    assert queue(url, channel) == {"pending": 0, "claimed": 0, "done": 2, "dead": 0}


def test_a_command_that_fails_releases_its_task_with_the_attempt_counted(url, channel):
    task = post(url, channel, "poster", "flaky job")
    status, lines, _ = work(channel, "sh", "-c", "cat >/dev/null; exit 3", options=["--count", "1"])
    assert status == 0
    assert lines == [f"task {task['id']}: pending, attempt 1 (sh exited with status 3)"]
    state = message(url, channel, task["id"])["task"]
    assert (state["state"], state["attempt"], state["reply"]) == ("pending", 1, None)
    # The next worker gets it again, as its second attempt; --json prints the broker's answer.
    status, lines, _ = work(channel, "sh", "-c", "exit 1", options=["--count", "1", "--json"], agent="worker-2")
    assert status == 0
    answer = json.loads(lines[0])
    assert (answer["id"], answer["exit"], answer["task"]["state"], answer["task"]["attempt"]) == (
        task["id"],
        1,
        "pending",
        2,
    )


def test_a_command_killed_mid_task_releases_it(url, channel, tmp_path):
    task = post(url, channel, "poster", "long job")
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}; exec sleep 60"
    with Running([*CHAT, "--agent-id", "worker", "work", channel, "--count", "1", "--", "sh", "-c", script]) as worker:
        until(lambda: pid_file.exists() and pid_file.read_text().strip())
        assert message(url, channel, task["id"])["task"]["state"] == "claimed"
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        assert worker.wait(20) == 0, worker.stderr()
        assert worker.rest() == [f"task {task['id']}: pending, attempt 1 (sh was killed by SIGKILL)"]
    assert message(url, channel, task["id"])["task"]["state"] == "pending"


def test_sigterm_stops_the_command_releases_the_task_and_exits_cleanly(url, channel, tmp_path):
    task = post(url, channel, "poster", "interrupted job")
    pid_file = tmp_path / "pid"
    # The command starts a child of its own: stopping work stops it too.
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    with Running([*CHAT, "--agent-id", "worker", "work", channel, "--", "sh", "-c", script]) as worker:
        until(lambda: pid_file.exists() and pid_file.read_text().strip())
        child = int(pid_file.read_text())
        started = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0, worker.stderr()
        assert time.monotonic() - started < 10
        assert worker.rest() == [f"task {task['id']}: pending, attempt 1 (stopped by SIGTERM)"]
        assert worker.stderr() == ""
    until(lambda: not alive(child), timeout=5)
    assert message(url, channel, task["id"])["task"]["state"] == "pending"
    assert queue(url, channel) == {"pending": 1, "claimed": 0, "done": 0, "dead": 0}


def test_sigterm_while_waiting_for_a_task_exits_at_once(channel):
    with Running([*CHAT, "--agent-id", "worker", "work", channel, "--", "cat"]) as worker:
        time.sleep(1)  # into its long-poll
        started = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0, worker.stderr()
        assert time.monotonic() - started < 3
        assert worker.rest() == [] and worker.stderr() == ""


def test_the_lease_is_renewed_while_the_command_runs(url, channel):
    """With --lease 1 the command outlives its lease three times over; the heartbeat keeps
    the task its own, so no other agent can claim it, and done still succeeds."""
    task = post(url, channel, "poster", "slow job")
    with Running(
        [*CHAT, "--agent-id", "worker", "work", channel, "--lease", "1", "--count", "1", "--", "sleep", "3"]
    ) as worker:
        until(lambda: message(url, channel, task["id"]).get("task", {}).get("state") == "claimed")
        for _ in range(5):
            time.sleep(0.5)
            refused = requests.post(
                f"{url}/messages/{channel}/{task['id']}/claim", json={"lease": 60}, headers={"X-Agent-ID": "thief"}
            )
            if message(url, channel, task["id"])["task"]["state"] == "done":
                break
            assert refused.status_code == 409, refused.text
            assert refused.json()["holder"] == "worker"
        assert worker.wait(20) == 0, worker.stderr()
        assert worker.rest()[0].startswith(f"task {task['id']}: done")
    state = message(url, channel, task["id"])["task"]
    assert (state["state"], state["attempt"]) == ("done", 1)


def test_without_count_work_keeps_taking_tasks_as_they_come(url, channel):
    with Running([*CHAT, "--agent-id", "worker", "work", channel, "--", "tr", "a-z", "A-Z"]) as worker:
        for text in ("first", "second", "third"):
            task = post(url, channel, "poster", text)
            line = worker.line(timeout=15)
            reply = message(url, channel, message(url, channel, task["id"])["task"]["reply"])
            assert line == f"task {task['id']}: done, reply {reply['id']}"
            assert reply["message"] == text.upper()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0, worker.stderr()


def test_the_command_gets_the_message_exactly(url, channel, tmp_path):
    """Many lines, emoji and control characters reach the command as they were stored."""
    text = "line 1\nline 2 ✅\n\ttabbed \x1b[31m"
    task = post(url, channel, "poster", text)
    copy = tmp_path / "copy"
    status, _, stderr = work(channel, "sh", "-c", f"cat > {copy}", options=["--count", "1"])
    assert (status, stderr) == (0, "")
    assert copy.read_bytes() == text.encode()
    # Empty output: done without a reply.
    assert message(url, channel, task["id"])["task"]["reply"] is None


def test_work_refuses_a_program_it_cannot_run_before_taking_a_task(url, channel):
    post(url, channel, "poster", "task")
    status, lines, stderr = work(channel, "/nonexistent/program", options=["--count", "1"])
    assert status == 1 and lines == []
    assert stderr.startswith("agent-chat: cannot run '/nonexistent/program'") and len(stderr.splitlines()) == 1
    assert queue(url, channel)["pending"] == 1


def test_work_waits_out_a_broker_restart(own_broker):
    """A broker that stops under a waiting worker is waited for: one line on stderr, and
    the task posted after the restart is worked."""
    broker = own_broker()
    broker.start()
    command = [*CHAT, "--broker", broker.url, "--agent-id", "worker", "work", "restarts", "--", "cat"]
    with Running(command) as worker:
        time.sleep(1)  # into its long-poll
        broker.restart()
        task = post(broker.url, "restarts", "poster", "after the restart")
        line = worker.line(timeout=30)
        reply_id = message(broker.url, "restarts", task["id"])["task"]["reply"]
        assert line == f"task {task['id']}: done, reply {reply_id}"
        assert message(broker.url, "restarts", reply_id)["message"] == "after the restart"
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0, worker.stderr()
        assert len(worker.stderr().splitlines()) <= 1 and "Traceback" not in worker.stderr()


def test_each_done_takes_the_next_task_in_the_same_request(own_broker, channel):
    """A worker's loop is one request per task: the done of one takes the next."""
    broker = own_broker().start()
    ids = [post(broker.url, channel, "poster", f"job {n}")["id"] for n in range(4)]
    env = {**os.environ, "AGENT_COMMS_BROKER": broker.url}
    done = subprocess.run(
        [*CHAT, "--agent-id", "w", "work", channel, "--count", "4", "--", "cat"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert [message(broker.url, channel, i)["task"]["state"] for i in ids] == ["done"] * 4
    log = broker.log_with("/done HTTP", 4)
    assert log.count(f"POST /queue/{channel}/take") == 1
    assert log.count("/done HTTP") == 4
    assert queue(broker.url, channel) == {"pending": 0, "claimed": 0, "done": 4, "dead": 0}


def test_a_long_output_is_cut_to_fit_one_reply_and_the_task_is_done(url, channel):
    task_id = post(url, channel, "poster", "make noise")["id"]
    status, _, stderr = work(channel, "sh", "-c", "head -c 200000 /dev/zero | tr '\\0' a", options=["--count", "1"])
    assert status == 0, stderr
    shown = message(url, channel, task_id)
    assert shown["task"]["state"] == "done"
    reply = message(url, channel, shown["task"]["reply"])["message"]
    assert reply.startswith("a" * 1000) and reply.endswith("more bytes of output cut]")
    assert len(reply.encode()) <= 65536


def test_sigterm_while_a_take_waits_leaves_no_task_claimed(url, channel):
    """A stop can cut a take short just as the broker claims a task for it: work gives
    such a claim back before it exits."""
    stuck = 0
    for attempt in range(6):
        name = f"{channel}-{attempt}"
        process = subprocess.Popen([*CHAT, "--agent-id", "wk", "work", name, "--", "cat"], stdout=subprocess.DEVNULL)
        time.sleep(0.8)
        poster = threading.Thread(target=post, args=(url, name, "p", "x"))
        poster.start()
        time.sleep(0.01 * (attempt % 3))
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        poster.join(5)
        time.sleep(0.3)
        stuck += queue(url, name)["claimed"]
    assert stuck == 0
