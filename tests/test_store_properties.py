"""Property tests of the store (issue 5): hypothesis runs random sequences of posts, clock
moves, retention passes, agent sightings and reads against a real SQLite file, and checks
every answer against a plain Python model of what must be stored: cursor pages in order
with nothing skipped or repeated, limits and `more`, timestamps rising with the ids, the
gap flag around retention, and the channel and agent counts (after every step).

Two runs: one with a clock that only moves on, one whose clock also steps back to a time it
showed before. PROPERTY_EXAMPLES (default 200) is the number of sequences per run, each of
up to 50 steps. The runs are derandomized, so CI and a local run try the same sequences.
"""

import itertools
import os

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from agent_comms_broker.http.validate import ID_MAX, LIMIT_MAX
from agent_comms_broker.store import Unstorable, text_size

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=50, deadline=None, derandomize=True, database=None)
# On PostgreSQL each step is several round trips to a server: fewer sequences (the same
# derandomized ones, first), PROPERTY_EXAMPLES_POSTGRES of them.
POSTGRES_SETTINGS = settings(SETTINGS, max_examples=int(os.environ.get("PROPERTY_EXAMPLES_POSTGRES", "10")))

CHANNELS = ["general", "tasks", "ops.alerts"]
SENDERS = ["planner-1", "worker-2", "monitor"]
# Any Unicode text but lone surrogates (the HTTP layer refuses those before the store).
TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)
ENTRY = st.tuples(st.sampled_from(CHANNELS), st.sampled_from(SENDERS), TEXT)
LIMIT = st.integers(1, 6) | st.just(LIMIT_MAX)
# A page's budget in bytes of text: small enough to cut pages of these short messages.
BUDGET = st.none() | st.integers(1, 80)
# Clock moves and retention ages: round numbers make "everything expired" and "nothing did"
# as likely as the cases in between.
SECONDS = st.sampled_from([0.0, 1.0, 60.0, 3600.0]) | st.floats(0, 7200)
START = 1_750_000_000.0  # a present-day clock: timestamps keep the float resolution they have in use


class StoreMachine(RuleBasedStateMachine):
    """A Store and the model of it. `clock` is the time the next call passes as `now`."""

    clock_may_step_back = False
    # Opens a store on a new database (the new_store fixture's).
    open_store = None

    def __init__(self):
        super().__init__()
        # A fresh database per sequence; NORMAL: no fsync per commit, which only a power cut tells apart.
        self.store = type(self).open_store(fresh=True, synchronous="NORMAL")
        self.clock = START
        self.clock_readings = [START]
        self.appended = []  # every Message ever stored, in id order
        self.kept = {}  # id -> Message, what retention has not removed
        self.removed = []  # Messages retention removed
        self.last_activity = {}  # channel -> timestamp of its latest post
        self.sent = {}  # agent -> messages posted
        self.last_seen = {}  # agent -> latest time seen

    def teardown(self):
        self.store.close()

    # -- the model -------------------------------------------------------------------------

    def kept_in(self, channel):
        return [m for m in sorted(self.kept.values(), key=lambda m: m.id) if m.channel == channel]

    def removed_in(self, channel):
        return [m for m in self.removed if m.channel == channel]

    def saw(self, agent, when):
        self.last_seen[agent] = max(self.last_seen.get(agent, when), when)

    def expected_after_id(self, channel, after, limit):
        following = [m for m in self.kept_in(channel) if m.id > after]
        page = following[:limit]
        gap = any(m.id > after for m in self.removed_in(channel))
        return page, (page[-1].id if page else after), gap, len(following) > limit

    def expected_after_time(self, channel, since, limit):
        following = sorted((m for m in self.kept_in(channel) if m.timestamp > since), key=lambda m: (m.timestamp, m.id))
        page = following[:limit]
        if len(following) > limit:
            # A page is never split between messages sharing a timestamp.
            page += [m for m in following[limit:] if m.timestamp == page[-1].timestamp]
        more = bool(page) and any(m.timestamp > page[-1].timestamp for m in following)
        gap = any(m.timestamp > since for m in self.removed_in(channel))
        newest = self.kept_in(channel)
        cursor = page[-1].id if page else (newest[-1].id if newest else 0)
        return page, cursor, gap, more

    # -- steps ---------------------------------------------------------------------------------

    @rule(seconds=SECONDS)
    def clock_moves_on(self, seconds):
        self.clock += seconds
        self.clock_readings.append(self.clock)

    @precondition(lambda self: self.clock_may_step_back)
    @rule(data=st.data())
    def clock_steps_back(self, data):
        """Back to a time it showed before, as when NTP undoes a jump into the future."""
        self.clock = data.draw(st.sampled_from(self.clock_readings), label="clock")

    @rule(entries=st.lists(ENTRY, min_size=1, max_size=6))
    def post(self, entries):
        if not self.store.stores_nul and any("\x00" in entry[2] for entry in entries):
            # PostgreSQL's text cannot hold U+0000: the whole append is refused, nothing stored.
            with pytest.raises(Unstorable):
                self.store.append(entries, now=self.clock)
            return
        stored = self.store.append(entries, now=self.clock)
        assert [(m.channel, m.sender, m.message) for m in stored] == entries
        previous = self.appended[-1] if self.appended else None
        for earlier, later in itertools.pairwise(([previous] if previous else []) + stored):
            # Ids are never reused, even after retention; timestamps rise with them, even
            # when the clock went back.
            assert later.id > earlier.id, (earlier, later)
            assert later.timestamp > earlier.timestamp, (earlier, later)
        assert stored[0].timestamp >= self.clock
        self.appended += stored
        for message in stored:
            self.kept[message.id] = message
            self.last_activity[message.channel] = message.timestamp
            self.sent[message.sender] = self.sent.get(message.sender, 0) + 1
            self.saw(message.sender, message.timestamp)

    @rule(agent=st.sampled_from([*SENDERS, "reader-9"]))
    def agent_is_seen(self, agent):
        self.store.touch_agent(agent, now=self.clock)
        self.saw(agent, self.clock)

    @rule(max_messages=st.integers(0, 8), data=st.data())
    def retention(self, max_messages, data):
        # An age of some stored message puts the cutoff exactly on it: that one is kept.
        ages = [self.clock - m.timestamp for m in self.kept.values() if m.timestamp < self.clock]
        exact = [st.sampled_from(ages)] if ages else []
        max_age = data.draw(st.one_of(st.sampled_from([0.0, 0.5]), SECONDS.filter(bool), *exact), label="max_age")
        gone = []
        if max_age > 0:
            cutoff = self.clock - max_age
            gone += [m for m in self.kept.values() if m.timestamp < cutoff]
        if max_messages > 0:
            for channel in CHANNELS:
                survivors = [m for m in self.kept_in(channel) if m not in gone]
                gone += survivors[: max(0, len(survivors) - max_messages)]
        assert self.store.prune(max_age=max_age, max_messages=max_messages, now=self.clock) == len(gone)
        for message in gone:
            del self.kept[message.id]
        self.removed += gone
        for channel in {m.channel for m in gone}:
            removed = self.removed_in(channel)
            # A reader whose cursor is before what went is told; one past it is not.
            first, last = min(m.id for m in gone if m.channel == channel), max(m.id for m in removed)
            assert self.store.after_id(channel, first - 1, LIMIT_MAX).gap
            assert not self.store.after_id(channel, last, LIMIT_MAX).gap
            assert self.store.pruned_after(first - 1, channel) and not self.store.pruned_after(last, channel)
            newest_removed = max(m.timestamp for m in removed)
            assert self.store.after_time(channel, 0, LIMIT_MAX).gap
            assert not self.store.after_time(channel, newest_removed, LIMIT_MAX).gap
        if gone:
            assert self.store.pruned_after(min(m.id for m in gone) - 1)
        assert not self.store.pruned_after(max((m.id for m in self.removed), default=0))

    # -- reads ---------------------------------------------------------------------------------
    # One rule does every read, so the writes that set up hard cases (a post, the clock
    # moving, retention) are drawn as often as the reads.

    @rule(channel=st.sampled_from(CHANNELS), limit=LIMIT, data=st.data())
    def read(self, channel, limit, data):
        self.every_message_once_by_id(channel, limit)
        self.every_message_once_by_time(channel, limit)
        budget = data.draw(BUDGET, label="max_bytes")
        self.every_message_once_within_a_budget(channel, limit, budget)
        self.latest_within_a_budget(channel, limit, budget)
        known_ids = [0, ID_MAX] + [m.id + step for m in self.appended for step in (-1, 0, 1)]
        after = data.draw(st.sampled_from(known_ids) | st.integers(0, len(self.appended) + 2), label="after")
        page = self.store.after_id(channel, after, limit)
        assert (page.messages, page.cursor, page.gap, page.more) == self.expected_after_id(channel, after, limit)
        known_times = [0.0, self.clock] + [m.timestamp for m in self.appended]
        since = data.draw(st.sampled_from(known_times) | st.floats(0, self.clock + 10), label="since")
        page = self.store.after_time(channel, since, limit)
        assert (page.messages, page.cursor, page.gap, page.more) == self.expected_after_time(channel, since, limit)
        newest = self.kept_in(channel)[-limit:]
        page = self.store.latest(channel, limit)
        assert page.messages == newest and page.cursor == (newest[-1].id if newest else 0)
        assert not page.gap and not page.more
        everywhere = [m for m in sorted(self.kept.values(), key=lambda m: m.id) if m.id > after][:limit]
        assert self.store.all_after_id(after, limit).messages == everywhere

    @staticmethod
    def within(messages, budget):
        """A page a budget allows: one message, or several holding at most `budget` bytes."""
        size = sum(text_size(m.channel, m.sender, m.message) for m in messages)
        return budget is None or len(messages) <= 1 or size <= budget

    def every_message_once_within_a_budget(self, channel, limit, budget):
        """after_id and all_after_id pages with max_bytes, each cursor passed back: every
        message once, in order, and each page within the budget and as full as it allows."""
        everything = sorted(self.kept.values(), key=lambda m: m.id)
        for read, expected in (
            (lambda cursor: self.store.after_id(channel, cursor, limit, budget), self.kept_in(channel)),
            (lambda cursor: self.store.all_after_id(cursor, limit, budget), everything),
        ):
            seen, cursor = [], 0
            while True:
                page = read(cursor)
                assert len(page.messages) <= limit and self.within(page.messages, budget)
                following = [m for m in expected if m.id > cursor]
                assert page.messages == following[: len(page.messages)]
                assert page.more == (len(following) > len(page.messages))
                if page.more:  # it stopped only because the next would not fit
                    assert len(page.messages) == limit or not self.within(following[: len(page.messages) + 1], budget)
                seen += page.messages
                cursor = page.cursor
                if not page.more:
                    break
            assert seen == expected

    def latest_within_a_budget(self, channel, limit, budget):
        """latest with max_bytes: the newest `limit` if they fit; else a page from the oldest
        of them, `more` set, from whose cursor after_id gives the rest."""
        newest = self.kept_in(channel)[-limit:]
        page = self.store.latest(channel, limit, budget)
        if self.within(newest, budget):
            assert page.messages == newest and not page.more
            return
        assert page.more and self.within(page.messages, budget)
        assert page.messages == newest[: len(page.messages)] and page.cursor == page.messages[-1].id
        rest = self.store.after_id(channel, page.cursor, limit, None).messages
        assert rest[: len(newest) - len(page.messages)] == newest[len(page.messages) :]

    def every_message_once_by_id(self, channel, limit):
        """after_id pages walked from 0, each cursor passed back: every message once, in order."""
        seen, cursor = [], 0
        while True:
            page = self.store.after_id(channel, cursor, limit)
            assert (page.messages, page.cursor, page.gap, page.more) == self.expected_after_id(channel, cursor, limit)
            assert len(page.messages) <= limit
            assert page.messages or not page.more
            seen += page.messages
            cursor = page.cursor
            if not page.more:
                break
        assert seen == self.kept_in(channel)

    def every_message_once_by_time(self, channel, limit):
        """after_time pages walked from 0 with the last timestamp received: none skipped or repeated."""
        seen, since = [], 0.0
        while True:
            page = self.store.after_time(channel, since, limit)
            assert (page.messages, page.cursor, page.gap, page.more) == self.expected_after_time(channel, since, limit)
            seen += page.messages
            if not page.messages:
                break
            since = page.messages[-1].timestamp
        assert len(seen) == len({m.id for m in seen})
        assert sorted(seen, key=lambda m: m.id) == self.kept_in(channel)

    @invariant()
    def channels_and_agents_are_counted(self):
        counts = {channel: len(self.kept_in(channel)) for channel in CHANNELS}
        assert self.store.channels() == [
            (channel, counts[channel], self.last_activity[channel]) for channel in sorted(CHANNELS) if counts[channel]
        ]
        agents = self.store.agents()
        assert [row[0] for row in agents] == sorted(self.last_seen)
        if agents:
            assert self.store.agents(agents[0][0], 1) == agents[1:2]
        for agent, first_seen, last_seen, sent in agents:
            assert (last_seen, sent) == (self.last_seen[agent], self.sent.get(agent, 0))
            assert first_seen <= last_seen
        assert self.store.max_id() == max(self.kept, default=0)
        for active_since in {self.clock - 300, *self.last_seen.values()}:
            active = sum(1 for seen in self.last_seen.values() if seen >= active_since)
            assert self.store.totals(active_since) == (
                len(self.kept),
                sum(1 for count in counts.values() if count),
                len(self.last_seen),
                active,
            )


def run(new_store, clock_may_step_back, backend):
    machine = type("Machine", (StoreMachine,), {"open_store": new_store, "clock_may_step_back": clock_may_step_back})
    run_state_machine_as_test(machine, settings=POSTGRES_SETTINGS if backend == "postgres" else SETTINGS)


def test_store_keeps_its_promises_with_a_clock_that_only_moves_on(new_store, backend):
    run(new_store, clock_may_step_back=False, backend=backend)


def test_store_keeps_its_promises_when_the_clock_steps_back(new_store, backend):
    """The README: "a clock stepped backwards cannot reorder anything", also across retention."""
    run(new_store, clock_may_step_back=True, backend=backend)
