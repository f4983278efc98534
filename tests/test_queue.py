"""Task queues against the real broker (2 gevent workers, a SQLite file): exactly one agent
holds a task at a time, a done task is never handed out again, leases end and redeliver,
attempts run out, a waiting take wakes for new and released tasks, and a SIGKILL of every
process loses no acknowledged claim, done or release."""

import signal
import threading
import time

import pytest
import requests

from broker_process import sessions_on_two_workers


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def broker_backend(request):
    """Every test here runs on both store backends."""
    return request.param


DEADLINE = 120


def take(session, url, channel, agent, **body):
    return session.post(f"{url}/queue/{channel}/take", json=body, headers={"X-Agent-ID": agent}, timeout=70)


def act(session, url, channel, task_id, what, agent, **body):
    return session.post(
        f"{url}/messages/{channel}/{task_id}/{what}", json=body, headers={"X-Agent-ID": agent}, timeout=10
    )


def post_tasks(url, channel, count, sender="poster"):
    ids = []
    for start in range(0, count, 500):
        batch = [{"sender": sender, "message": f"task {n}"} for n in range(start, min(count, start + 500))]
        reply = requests.post(f"{url}/messages/{channel}", json=batch, timeout=30)
        assert reply.status_code == 201, reply.text
        ids += [m["id"] for m in reply.json()["messages"]]
    return ids


def queue(url, channel):
    reply = requests.get(f"{url}/queue/{channel}", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def message(url, channel, task_id):
    return requests.get(f"{url}/messages/{channel}/{task_id}", timeout=10).json()


def test_eight_takers_on_two_workers_drain_the_queue_each_task_done_exactly_once(own_broker, channel, broker_backend):
    # 2,000 tasks; 500 on PostgreSQL, where test_postgres.py drains 2,000 with eight takers
    # on two nodes.
    count = 2000 if broker_backend == "sqlite" else 500
    broker = own_broker().start()
    ids = post_tasks(broker.url, channel, count)
    # Eight keep-alive sessions, four on each worker.
    sessions = [session for _ in range(4) for session in sessions_on_two_workers(broker.url)]
    taken, finished, problems = [], [], []
    lock = threading.Lock()
    stop_at = time.monotonic() + DEADLINE

    def worker(number, session):
        agent = f"taker-{number}"
        while time.monotonic() < stop_at:
            reply = take(session, broker.url, channel, agent, lease=120)
            if reply.status_code == 204:
                return
            if reply.status_code != 200:
                problems.append(reply.text)
                return
            task = reply.json()
            with lock:
                taken.append((task["id"], agent, task["claim"]["attempt"]))
            done = act(session, broker.url, channel, task["id"], "done", agent, message=f"done by {agent}")
            if done.status_code != 200:
                problems.append(done.text)
                return
            with lock:
                finished.append((task["id"], done.json()["reply"]["id"]))

    threads = [threading.Thread(target=worker, args=(n, s)) for n, s in enumerate(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE + 10)
    assert not problems, problems[:3]
    # Each task handed out once (no lease ended: nothing was redelivered), and done once.
    assert sorted(task_id for task_id, _, _ in taken) == ids
    assert {attempt for _, _, attempt in taken} == {1}
    assert sorted(task_id for task_id, _ in finished) == ids
    assert len({agent for _, agent, _ in taken}) == 8
    view = queue(broker.url, channel)
    assert view["counts"] == {"pending": 0, "claimed": 0, "done": count, "dead": 0}
    # One reply per task, each naming its task, in the same channel; none of them a task.
    replies = {reply_id: task_id for task_id, reply_id in finished}
    assert len(replies) == count
    for task_id in (ids[0], ids[count // 2], ids[-1]):
        shown = message(broker.url, channel, task_id)
        assert shown["task"]["state"] == "done" and replies[shown["task"]["reply"]] == task_id
    assert take(requests, broker.url, channel, "late").status_code == 204


def test_a_lease_that_ends_hands_the_task_to_the_next_taker(url, channel, poster):
    task_id = poster(url, channel, "poster", "flaky download")["id"]
    first = take(requests, url, channel, "slow-agent", lease=1)
    assert first.status_code == 200 and first.json()["id"] == task_id
    assert first.json()["claim"]["attempt"] == 1
    # Held: no one else gets it, by take or by claim.
    assert take(requests, url, channel, "other").status_code == 204
    refused = act(requests, url, channel, task_id, "claim", "other")
    assert refused.status_code == 409
    assert refused.json()["holder"] == "slow-agent" and refused.json()["expires"] > time.time()
    time.sleep(1.3)
    second = take(requests, url, channel, "other", lease=60)
    assert second.status_code == 200 and second.json()["id"] == task_id
    assert second.json()["claim"] == {
        "agent": "other",
        "expires": second.json()["task"]["expires"],
        "attempt": 2,
        "lease": 60.0,
    }
    # The first holder lost it: it can neither finish nor release it now.
    late = act(requests, url, channel, task_id, "done", "slow-agent", message="finished late")
    assert late.status_code == 409 and late.json()["holder"] == "other"
    assert act(requests, url, channel, task_id, "release", "slow-agent").status_code == 409
    assert act(requests, url, channel, task_id, "done", "other", message="ok").status_code == 200
    view = queue(url, channel)
    assert view["counts"]["done"] == 1 and view["claimed"] == []


def test_the_holder_claiming_again_extends_its_lease(url, channel, poster):
    task_id = poster(url, channel, "poster", "long job")["id"]
    first = act(requests, url, channel, task_id, "claim", "worker", lease=2)
    assert first.status_code == 200, first.text
    time.sleep(1.2)
    beat = act(requests, url, channel, task_id, "claim", "worker", lease=2)
    assert beat.status_code == 200
    assert beat.json()["claim"]["attempt"] == 1
    assert beat.json()["claim"]["expires"] > first.json()["claim"]["expires"] + 1
    time.sleep(1.2)  # past the first lease, within the second
    assert take(requests, url, channel, "other").status_code == 204
    listed = queue(url, channel)["claimed"]
    assert [(t["id"], t["agent"], t["attempt"]) for t in listed] == [(task_id, "worker", 1)]


def test_releases_and_ended_leases_count_until_the_task_is_dead(own_broker, channel):
    broker = own_broker(env={"AGENT_COMMS_MAX_ATTEMPTS": "3"}).start()
    url = broker.url
    task_id = post_tasks(url, channel, 1)[0]
    for attempt in (1, 2):
        got = take(requests, url, channel, f"w{attempt}", lease=30)
        assert got.json()["claim"]["attempt"] == attempt
        released = act(requests, url, channel, task_id, "release", f"w{attempt}")
        assert released.json()["task"]["state"] == "pending", released.text
    got = take(requests, url, channel, "w3", lease=1)
    assert got.json()["claim"]["attempt"] == 3
    time.sleep(1.3)  # the third failure: its lease ends
    assert queue(url, channel)["dead"] == [{"id": task_id, "agent": "w3", "attempt": 3}]
    assert take(requests, url, channel, "w4").status_code == 204
    assert message(url, channel, task_id)["task"]["state"] == "dead"
    refused = act(requests, url, channel, task_id, "claim", "w4")
    assert refused.status_code == 409 and refused.json()["task"]["state"] == "dead"
    # Its last holder cannot bring it back either: a task shown dead stays dead.
    for what, body in (("claim", {}), ("done", {"message": "late"}), ("release", {})):
        assert act(requests, url, channel, task_id, what, "w3", **body).status_code == 409, what
    assert queue(url, channel)["counts"] == {"pending": 0, "claimed": 0, "done": 0, "dead": 1}


def test_a_task_released_as_dead_is_never_handed_out(url, channel, poster):
    task_id = poster(url, channel, "poster", "poison")["id"]
    assert take(requests, url, channel, "w").status_code == 200
    gone = act(requests, url, channel, task_id, "release", "w", dead=True)
    assert gone.status_code == 200 and gone.json()["task"] == {
        "state": "dead",
        "agent": "w",
        "expires": None,
        "attempt": 1,
        "reply": None,
    }
    assert take(requests, url, channel, "w2").status_code == 204


def test_a_done_task_is_never_handed_out_again_and_done_repeats_safely(url, channel, poster):
    task_id = poster(url, channel, "poster", "once")["id"]
    assert take(requests, url, channel, "w").json()["id"] == task_id
    done = act(requests, url, channel, task_id, "done", "w", message="result", tags=["ok"])
    assert done.status_code == 200
    reply = done.json()["reply"]
    assert reply["reply_to"] == task_id and reply["thread"] == task_id and reply["tags"] == ["ok"]
    # The same done again (an answer lost, a retry): the same reply, nothing stored twice.
    again = act(requests, url, channel, task_id, "done", "w", message="result")
    assert again.status_code == 200 and again.json()["reply"]["id"] == reply["id"]
    assert take(requests, url, channel, "w2").status_code == 204
    assert act(requests, url, channel, task_id, "claim", "w2").status_code == 409
    assert act(requests, url, channel, task_id, "done", "w2", message="me too").status_code == 409
    thread = requests.get(f"{url}/messages/{channel}", params={"thread": task_id}).json()["messages"]
    assert [m["id"] for m in thread] == [task_id, reply["id"]]


def test_replies_are_not_tasks_and_unknown_tasks_are_404(url, channel, poster):
    task_id = poster(url, channel, "poster", "task")["id"]
    reply = requests.post(
        f"{url}/messages/{channel}", json={"sender": "x", "message": "a comment", "reply_to": task_id}
    ).json()
    assert act(requests, url, channel, reply["id"], "claim", "w").status_code == 400
    assert act(requests, url, channel, 10**9, "claim", "w").status_code == 404
    assert take(requests, url, channel, "w").json()["id"] == task_id
    assert take(requests, url, channel, "w2").status_code == 204
    assert act(requests, url, channel, task_id, "claim", "w", lease=0).status_code == 400
    assert act(requests, url, channel, task_id, "claim", "w", lease="soon").status_code == 400
    nobody = requests.post(f"{url}/queue/{channel}/take", json={}, timeout=10)
    assert nobody.status_code == 400 and "X-Agent-ID" in nobody.json()["error"]


def test_a_waiting_take_gets_a_task_posted_while_it_waits(url, channel, poster):
    got = {}

    def waiter():
        started = time.monotonic()
        reply = take(requests, url, channel, "patient", wait=10)
        got["reply"], got["after"] = reply, time.monotonic() - started

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)
    task_id = poster(url, channel, "poster", "arrives later")["id"]
    thread.join(15)
    assert got["reply"].status_code == 200 and got["reply"].json()["id"] == task_id
    assert 0.4 < got["after"] < 3
    started = time.monotonic()
    assert take(requests, url, channel, "patient", wait=1).status_code == 204
    assert 0.9 < time.monotonic() - started < 3


def test_a_waiting_take_on_one_worker_gets_a_task_released_on_the_other(url, channel, poster):
    first, second = sessions_on_two_workers(url)
    task_id = poster(url, channel, "poster", "handed back")["id"]
    assert take(first, url, channel, "a").json()["id"] == task_id
    got = {}
    thread = threading.Thread(target=lambda: got.update(reply=take(second, url, channel, "b", wait=10)))
    thread.start()
    time.sleep(0.5)
    released_at = time.monotonic()
    assert act(first, url, channel, task_id, "release", "a").status_code == 200
    thread.join(15)
    assert got["reply"].status_code == 200 and got["reply"].json()["claim"]["attempt"] == 2
    assert time.monotonic() - released_at < 3


def test_claimed_tasks_show_their_state_in_reads_and_old_reads_are_unchanged(url, channel, poster):
    plain = poster(url, channel, "poster", "never claimed")
    claimed_id = poster(url, channel, "poster", "claimed")["id"]
    assert act(requests, url, channel, claimed_id, "claim", "w", lease=30).status_code == 200
    page = requests.get(f"{url}/messages/{channel}").json()["messages"]
    assert "task" not in page[0] and page[0]["id"] == plain["id"]
    assert page[1]["task"]["state"] == "claimed" and page[1]["task"]["agent"] == "w"
    # The seed's fields are there as they were.
    assert {"id", "channel", "sender", "message", "timestamp"} <= set(page[0])


def test_sigkill_of_every_process_loses_no_acknowledged_claim_done_or_release(own_broker, channel):
    broker = own_broker()
    broker.start()
    ids = post_tasks(broker.url, channel, 400)
    acked = {}  # task id -> (what, agent, attempt): the last acknowledged action on it
    lock = threading.Lock()
    running = threading.Event()
    running.set()

    def worker(number):
        agent = f"k{number}"
        session = requests.Session()
        step = 0
        while running.is_set():
            try:
                got = take(session, broker.url, channel, agent, lease=300)
                if got.status_code != 200:
                    return
                task = got.json()
                attempt = task["claim"]["attempt"]
                with lock:
                    acked[task["id"]] = ("claimed", agent, attempt)
                step += 1
                what = "release" if step % 3 == 0 else "done"
                body = {"message": f"done {task['id']}"} if what == "done" else {}
                answer = act(session, broker.url, channel, task["id"], what, agent, **body)
                if answer.status_code == 200:
                    with lock:
                        acked[task["id"]] = (what, agent, attempt)
            except requests.RequestException:
                return

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(acked) >= 60, "the takers stalled before the kill"
    broker.stop(signal.SIGKILL)
    running.clear()
    for thread in threads:
        thread.join(15)
    with lock:
        acknowledged = dict(acked)

    broker.start()
    for task_id, (what, agent, attempt) in acknowledged.items():
        task = message(broker.url, channel, task_id)["task"]
        if what == "done":
            assert task["state"] == "done" and task["agent"] == agent, (task_id, task)
            reply = message(broker.url, channel, task["reply"])
            assert reply["reply_to"] == task_id and reply["message"] == f"done {task_id}"
        elif what == "release":
            # Given back: pending (dead, if that was its last attempt), or taken since by a
            # later claim (a higher attempt).
            assert task["state"] in ("pending", "dead") or task["attempt"] > attempt, (task_id, task)
        else:
            # Claimed; the done or release that followed may have been stored with its
            # answer cut off by the kill.
            held = task["state"] == "claimed" and task["agent"] == agent and task["attempt"] == attempt
            finished = task["state"] == "done" and task["agent"] == agent
            given_back = task["state"] == "pending" or task["attempt"] > attempt
            assert held or finished or given_back, (task_id, task)
    # Every task is in exactly one state, and the counts add up.
    counts = queue(broker.url, channel)["counts"]
    assert sum(counts.values()) == len(ids)
    done_ids = [i for i in ids if message(broker.url, channel, i).get("task", {}).get("state") == "done"]
    thread_sizes = [
        len(requests.get(f"{broker.url}/messages/{channel}", params={"thread": i}).json()["messages"])
        for i in done_ids[:50]
    ]
    assert set(thread_sizes) <= {2}, "a done task got more than one reply"


def test_done_with_next_takes_the_following_task_in_the_same_request(url, channel, poster):
    first = poster(url, channel, "poster", "one")["id"]
    second = poster(url, channel, "poster", "two")["id"]
    assert take(requests, url, channel, "w").json()["id"] == first
    done = act(requests, url, channel, first, "done", "w", message="ok 1", next={"lease": 30})
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["task"]["state"] == "done" and body["reply"]["reply_to"] == first
    assert body["next"]["id"] == second and body["next"]["claim"]["agent"] == "w"
    assert body["next"]["claim"]["lease"] == 30.0
    # Nothing left: next is null at once, or after its wait when a task arrives meanwhile.
    last = act(requests, url, channel, second, "done", "w", next={"lease": 30})
    assert last.json()["next"] is None and last.json()["task"]["state"] == "done"
    assert act(requests, url, channel, second, "done", "w", next="soon").status_code == 400
    third = {}

    def later():
        time.sleep(0.5)
        third["id"] = requests.post(f"{url}/messages/{channel}", json={"sender": "p", "message": "three"}).json()["id"]

    poster_thread = threading.Thread(target=later)
    poster_thread.start()
    fourth = poster(url, channel, "poster", "four")["id"]
    assert take(requests, url, channel, "w").json()["id"] == fourth
    waited = act(requests, url, channel, fourth, "done", "w", next={"lease": 30, "wait": 5})
    poster_thread.join(5)
    assert waited.json()["next"]["id"] == third["id"]
    # A refused done takes nothing.
    refused = act(requests, url, channel, fourth, "done", "intruder", next={"lease": 30})
    assert refused.status_code == 409 and "next" not in refused.json()
