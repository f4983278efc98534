"""Property tests of task claims (issue 10): hypothesis runs random sequences of posts,
takes, claims, heartbeats, dones, releases, clock moves and retention passes against a
real SQLite file, and checks every answer against a plain model of the rules: one holder
at most, the oldest pending task first, leases that end, attempts that run out, done and
dead tasks never handed out again, and the queue's counts after every step.

PROPERTY_EXAMPLES (default 200) sequences of up to 40 steps, derandomized like
test_store_properties.py.
"""

import os
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from agent_comms_broker.store import Post, TaskRefused

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None, derandomize=True, database=None)
# Fewer on PostgreSQL, whose steps are round trips to a server (test_store_properties.py).
POSTGRES_SETTINGS = settings(SETTINGS, max_examples=int(os.environ.get("PROPERTY_EXAMPLES_POSTGRES", "10")))
MAX_ATTEMPTS = 3
CHANNEL = "tasks"
AGENTS = st.sampled_from(["a", "b", "c"])
LEASES = st.sampled_from([1.0, 5.0, 30.0])
START = 1_750_000_000.0


@dataclass
class Modelled:
    """What the rules say of one task: its stored state (a claim whose lease ended is still
    'claimed' here; `now_state` says what it is now)."""

    state: str = "new"
    holder: str | None = None
    expires: float = 0.0
    attempt: int = 0
    failures: int = 0

    def now_state(self, now):
        if self.state == "claimed" and self.expires <= now:
            return "dead" if self.failures + 1 >= MAX_ATTEMPTS else "pending"
        return "pending" if self.state == "new" else self.state

    def lapsed(self, now):
        return self.state == "claimed" and self.expires <= now

    def held_by(self, agent, now):
        """`agent` may still extend, finish or release it: its claim, even past the lease,
        unless that lease was the last attempt (then it shows, and stays, dead)."""
        return self.state == "claimed" and self.holder == agent and self.now_state(now) != "dead"


class ClaimMachine(RuleBasedStateMachine):
    # Opens a store on a new database (the new_store fixture's).
    open_store = None

    def __init__(self):
        super().__init__()
        self.store = type(self).open_store(fresh=True, synchronous="NORMAL", max_attempts=MAX_ATTEMPTS)
        self.clock = START
        self.tasks = {}  # id -> Modelled, tasks retention has not removed
        self.replies = set()

    def teardown(self):
        self.store.close()

    def claimed_by(self, task, agent, lease):
        if task.lapsed(self.clock):
            task.failures += 1
        task.state, task.holder, task.expires = "claimed", agent, self.clock + lease
        task.attempt += 1

    @rule(count=st.integers(1, 3))
    def post(self, count):
        stored = self.store.append([(CHANNEL, "poster", f"task {n}") for n in range(count)], now=self.clock)
        for message in stored:
            self.tasks[message.id] = Modelled()

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def reply(self, data):
        target = data.draw(st.sampled_from(sorted(self.tasks)))
        stored = self.store.append([Post(CHANNEL, "someone", "a comment", reply_to=target)], now=self.clock)
        self.replies.add(stored[0].id)

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.0, 10.0, 40.0]))
    def clock_moves_on(self, seconds):
        self.clock += seconds

    @rule(agent=AGENTS, lease=LEASES)
    def take(self, agent, lease):
        got = self.store.take(CHANNEL, agent, lease, now=self.clock)
        # Lapsed claims on their last attempt are buried on the way; the oldest pending wins.
        pending = sorted(i for i, task in self.tasks.items() if task.now_state(self.clock) == "pending")
        if not pending:
            assert got is None
            for task in self.tasks.values():
                if task.lapsed(self.clock):
                    task.state, task.failures, task.expires = "dead", task.failures + 1, 0.0
            return
        assert got is not None and got.id == pending[0]
        for task_id, task in self.tasks.items():
            if task_id < got.id and task.lapsed(self.clock):
                task.state, task.failures, task.expires = "dead", task.failures + 1, 0.0
        task = self.tasks[got.id]
        self.claimed_by(task, agent, lease)
        assert (got.task.state, got.task.agent, got.task.attempt) == ("claimed", agent, task.attempt)
        assert got.task.expires == task.expires

    @precondition(lambda self: self.tasks)
    @rule(agent=AGENTS, lease=LEASES, data=st.data())
    def claim(self, agent, lease, data):
        task_id = data.draw(st.sampled_from(sorted(self.tasks)))
        task = self.tasks[task_id]
        state = task.now_state(self.clock)
        try:
            got = self.store.claim(CHANNEL, task_id, agent, lease, now=self.clock)
        except TaskRefused:
            refused = True
        else:
            refused = False
        if task.held_by(agent, self.clock):  # a heartbeat, even past the lease
            assert not refused
            task.expires = self.clock + lease
        elif state == "pending":
            assert not refused
            self.claimed_by(task, agent, lease)
        else:
            assert refused, (state, task)
            return
        assert (got.task.state, got.task.agent, got.task.attempt) == ("claimed", agent, task.attempt)

    @precondition(lambda self: self.tasks)
    @rule(agent=AGENTS, data=st.data())
    def done(self, agent, data):
        task_id = data.draw(st.sampled_from(sorted(self.tasks)))
        task = self.tasks[task_id]
        may = task.held_by(agent, self.clock) or (task.state == "done" and task.holder == agent)
        try:
            message, reply = self.store.done(
                CHANNEL, task_id, agent, Post(CHANNEL, agent, "ok", reply_to=task_id), now=self.clock
            )
        except TaskRefused:
            assert not may, task
            return
        assert may, task
        if task.state != "done":
            task.state, task.expires = "done", 0.0
            self.replies.add(reply.id)
        assert message.task.state == "done" and message.task.reply is not None

    @precondition(lambda self: self.tasks)
    @rule(agent=AGENTS, dead=st.booleans(), data=st.data())
    def release(self, agent, dead, data):
        task_id = data.draw(st.sampled_from(sorted(self.tasks)))
        task = self.tasks[task_id]
        try:
            message = self.store.release(CHANNEL, task_id, agent, dead, now=self.clock)
        except TaskRefused:
            assert not task.held_by(agent, self.clock), task
            return
        assert task.held_by(agent, self.clock), task
        task.failures += 1
        if dead or task.failures >= MAX_ATTEMPTS:
            task.state = "dead"
        else:
            task.state, task.holder = "pending", None
        task.expires = 0.0
        assert message.task.state == task.state

    @rule(keep=st.integers(1, 4))
    def retention(self, keep):
        """Retention keeps the newest `keep` messages; their tasks go with them."""
        self.store.prune(max_messages=keep, now=self.clock)
        every = sorted([*self.tasks, *self.replies])
        kept = set(every[-keep:])
        self.tasks = {i: task for i, task in self.tasks.items() if i in kept}
        self.replies &= kept

    @invariant()
    def every_task_reads_as_modelled_and_the_counts_add_up(self):
        counts = {"pending": 0, "claimed": 0, "done": 0, "dead": 0}
        for task_id, task in self.tasks.items():
            state = task.now_state(self.clock)
            counts[state] += 1
            shown = self.store.message(CHANNEL, task_id, now=self.clock).task
            if task.state == "new":
                assert shown is None
                continue
            assert (shown.state, shown.attempt) == (state, task.attempt), (task_id, task, shown)
            if state == "claimed":
                assert shown.agent == task.holder and shown.expires == task.expires
        got, claimed, dead = self.store.queue(CHANNEL, 100, now=self.clock)
        assert got == counts
        assert [row[0] for row in claimed] == sorted(
            i for i, t in self.tasks.items() if t.now_state(self.clock) == "claimed"
        )
        assert [row[0] for row in dead] == sorted(i for i, t in self.tasks.items() if t.now_state(self.clock) == "dead")


def test_claims_keep_their_promises(new_store, backend):
    ClaimMachine.open_store = new_store
    run_state_machine_as_test(ClaimMachine, settings=POSTGRES_SETTINGS if backend == "postgres" else SETTINGS)
