"""Live delivery inside one gunicorn worker: group commit, the watcher hub, retention.

Every worker runs one hub greenlet. It learns of new commits two ways: at once when
this worker commits, and, for commits by the other workers, by asking SQLite's
`PRAGMA data_version` every `wakeup_interval` (a read of a counter in shared memory; it
changes whenever another connection commits). On a change it reads the new rows once
and hands them to every watcher of their channel, so N watchers cost one query.
"""

import collections
import logging
import random
import time

import gevent
import orjson
from gevent.event import AsyncResult, Event

from .store import AgentLimit, ChannelLimit, KeyConflict, StoreBusy, StoreUnavailable, Unstorable

log = logging.getLogger("agent_comms_broker.live")

# A watcher that falls this far behind (in messages, or in bytes of frames: four pages)
# stops queueing and re-reads from the store, page by page.
WATCHER_QUEUE_LIMIT = 1000
WATCHER_QUEUE_PAGES = 4
HUB_READ_BATCH = 1000
# Posts (or coordination writes) merged into one transaction at most.
GROUP_COMMIT_LIMIT = 1000
# Parked streams are looked after (keep-alives, token re-checks when due) this often, in
# seconds: a revoked token ends a parked stream as soon as a waiting one would end.
PARKED_TICK = 0.25
# What a group commit merges: posts, or coordination writes; a group holds one kind.
POSTS, WORK = "posts", "work"
# What refuses one post of a group: the others are then committed one by one.
REFUSED = (ChannelLimit, AgentLimit, KeyConflict, Unstorable)


def sse_frame(message):
    """The Server-Sent Events frame of one message; event id = message id."""
    return b"id: %d\ndata: %s\n\n" % (message.id, orjson.dumps(message.as_dict()))


class Parked(BaseException):
    """Raised through gunicorn by an event stream that is caught up: its connection is
    handed to the hub (a Stream of http/streams.py), and the greenlet that served it
    ends. Not an Exception: gunicorn would take it for an error and cut the connection."""


class Watcher:
    """One SSE stream or long-poll: the messages delivered to it and a wake-up event; or,
    for a parked stream (`direct`), the stream that writes each message at once."""

    __slots__ = ("channel", "closed", "direct", "event", "max_bytes", "overflowed", "pending", "pending_bytes")

    def __init__(self, channel, max_bytes):
        self.channel = channel
        self.max_bytes = max_bytes
        self.pending = []
        self.pending_bytes = 0
        self.event = Event()
        self.overflowed = False
        self.closed = False
        self.direct = None

    def deliver(self, message, frame):
        if self.direct is not None:
            self.direct.push(message, frame)
            return
        if not self.overflowed:
            if len(self.pending) >= WATCHER_QUEUE_LIMIT or self.pending_bytes + len(frame) > self.max_bytes:
                self.overflowed = True
                self.pending.clear()
                self.pending_bytes = 0
            else:
                self.pending.append((message, frame))
                self.pending_bytes += len(frame)
        self.event.set()

    def take(self):
        """What has arrived since the last take, and whether some of it was dropped."""
        items = self.pending
        self.pending = []
        self.pending_bytes = 0
        overflowed, self.overflowed = self.overflowed, False
        self.event.clear()
        return items, overflowed

    def close(self):
        self.closed = True
        self.event.set()
        if self.direct is not None:
            self.direct.finish()


class Hub:
    def __init__(self, store, wakeup_interval, page_bytes, alive=lambda: True):
        self.store = store
        self.wakeup_interval = wakeup_interval
        # What one read of new messages holds at most, in bytes of text.
        self.page_bytes = page_bytes
        self.alive = alive
        self.by_channel = collections.defaultdict(set)
        self.everything = set()
        self.last_id = store.max_id()
        self._committed_id = self.last_id
        self.data_version = store.data_version()
        # Parked event streams (no greenlet of their own), looked after every PARKED_TICK.
        self.parked = set()
        self._looked_after = time.monotonic()
        self._kick = Event()
        self._greenlet = gevent.spawn(self._run)

    def watch(self, channel=None):
        """A new Watcher of one channel (None: of every channel)."""
        watcher = Watcher(channel, WATCHER_QUEUE_PAGES * self.page_bytes)
        if not self.alive():
            watcher.close()
        elif channel is None:
            self.everything.add(watcher)
        else:
            self.by_channel[channel].add(watcher)
        return watcher

    def unwatch(self, watcher):
        if watcher.channel is None:
            self.everything.discard(watcher)
            return
        watchers = self.by_channel.get(watcher.channel)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self.by_channel[watcher.channel]

    def committed(self, last_id=None):
        """This worker committed (messages up to `last_id`, if it stored any): deliver
        without waiting for the next poll."""
        if last_id is not None and last_id > self._committed_id:
            self._committed_id = last_id
        self._kick.set()

    def _run(self):
        while self.alive():
            self._kick.wait(self.wakeup_interval)
            kicked = self._kick.is_set()
            self._kick.clear()
            try:
                if self.parked and time.monotonic() - self._looked_after >= PARKED_TICK:
                    self._look_after_parked()
                if kicked:
                    # No need to ask whether the database changed: this worker changed it.
                    self._deliver_new(kicked)
                    continue
                version = self.store.data_version()
                if version != self.data_version:
                    self.data_version = version
                    self._deliver_new()
            except StoreUnavailable as error:
                # This node lost its database: its streams end, so that their clients
                # reconnect (through a load balancer, to a node that has it).
                ended = self._close_watchers()
                if ended:
                    log.warning("the database is gone, ending %d streams: %s", ended, error)
                gevent.sleep(1)
            except StoreBusy as error:
                log.warning("live delivery waits for the database: %s", error)
                gevent.sleep(1)
            except Exception:  # keep delivering after a transient database error
                log.exception("live delivery failed; retrying")
                gevent.sleep(1)
        self._close_all()

    def _deliver_new(self, kicked=False):
        if not self.everything and not self.by_channel:
            # Nobody to deliver to: only where a later watcher starts moves. After this
            # worker's own commit the id it wrote is known; otherwise ask (another worker
            # committed, and the ids it gave are not).
            if kicked:
                self.last_id = max(self.last_id, self._committed_id)
            else:
                self.last_id = self.store.max_id()
            return
        while True:
            page = self.store.all_after_id(self.last_id, HUB_READ_BATCH, self.page_bytes)
            messages = page.messages
            for message in messages:
                targets = self.by_channel.get(message.channel)
                if not targets and not self.everything:
                    continue
                frame = sse_frame(message)
                # Copies: a parked stream whose client went leaves the set as it is handed a frame.
                for watcher in tuple(targets) if targets else ():
                    watcher.deliver(message, frame)
                for watcher in tuple(self.everything):
                    watcher.deliver(message, frame)
            self.last_id = page.cursor
            if not page.more:
                return

    def _look_after_parked(self):
        """Keep-alives and token re-checks of the parked streams (each decides if due)."""
        now = self._looked_after = time.monotonic()
        for stream in list(self.parked):
            stream.tick(now)

    def _close_all(self):
        """The worker is stopping: end every stream so clients reconnect elsewhere."""
        self._close_watchers()

    def _close_watchers(self):
        """End every stream and long-poll; how many there were."""
        watchers = [*self.everything, *(watcher for group in self.by_channel.values() for watcher in group)]
        for watcher in watchers:
            watcher.close()
        return len(watchers)


class GroupCommitter:
    """Merges the writes that arrive while one transaction runs into the next one, so
    many share one commit (and one fsync) without any waiting on a timer: posts, and the
    coordination writes (takes, claims, dones, releases, read positions), each of which
    runs in a savepoint of its own so that one refused leaves the others be.

    On SQLite `store` is a connection of the committer's own, which waits for the write
    lock and commits in a thread (store/sqlite.py): the worker's event loop keeps reading
    requests and writing replies while the other worker writes and while SQLite fsyncs,
    and those requests join the next group."""

    def __init__(self, store, on_commit, max_channels=0, max_agents=0, max_database=0):
        self.store = store
        self.on_commit = on_commit
        self.caps = {"max_channels": max_channels, "max_agents": max_agents, "max_database": max_database}
        self._queue = collections.deque()
        self._ready = Event()
        self._greenlet = gevent.spawn(self._run)

    def append(self, entries, capped=True):
        """Store entries; returns their Messages once committed, or raises the error.
        `capped`: the caps on channels and agents hold these entries (posts without a
        token); a token holder's posts always go in."""
        return self._submit(POSTS, entries, capped)

    def run(self, work, timeout=None):
        """Run work(db) (a store's *_work) in the next group's transaction; returns what
        it returned once committed, or raises what it raised. With `timeout`, StoreBusy
        if it is not committed within that many seconds (it stays queued: for writes
        that are best effort)."""
        return self._submit(WORK, [work], None, timeout)

    def _submit(self, kind, items, capped, timeout=None):
        result = AsyncResult()
        self._queue.append((kind, items, result, capped))
        self._ready.set()
        if timeout is not None:
            result.wait(timeout)  # its value may be None: ready() tells
            if not result.ready():
                raise StoreBusy(f"not committed within {timeout:g} s")
        return result.get()

    def _run(self):
        while True:
            self._ready.wait()
            self._ready.clear()
            while self._queue:
                if self._queue[0][0] == POSTS:
                    self._commit_gathered()
                else:
                    self._commit_work(self._group(WORK))

    def _group(self, kind):
        """The next writes of a kind, taken from the queue (for posts, once the committer
        holds the write lock)."""
        group, size = [], 0
        while (
            self._queue
            and self._queue[0][0] == kind
            and (not group or size + len(self._queue[0][1]) <= GROUP_COMMIT_LIMIT)
        ):
            item = self._queue.popleft()
            group.append(item)
            size += len(item[1])
        return group

    def _commit_gathered(self):
        """Commit the posts queued by the time the write lock is held: while another
        worker commits, the posts that arrive here join this worker's next transaction
        (measured, 3,800 posts a second became some 4,500 with both workers posting)."""
        group = []

        def gather():
            group.extend(self._group(POSTS))
            return self._batch(group)

        try:
            stored = self.store.append_gathered(gather, **self.caps)
        except REFUSED as error:
            self._refused(group, error)
            return
        except BaseException as error:
            for _, _, result, _ in group or self._group(POSTS):  # refused before it gathered
                result.set_exception(error)
            return
        self._committed(group, stored)

    @staticmethod
    def _batch(group):
        """The posts of a group, and those the caps hold."""
        batch = [entry for _, entries, _, _ in group for entry in entries]
        capped = [entry for _, entries, _, is_capped in group if is_capped for entry in entries]
        return batch, capped

    def _refused(self, group, error):
        if len(group) == 1:
            group[0][2].set_exception(error)
            return
        # One post's new channel or agent (or reused key) must not fail the others:
        # commit them one by one.
        for item in group:
            self._commit([item])

    def _committed(self, group, stored):
        # The posters first, then the hub: greenlets run in the order they were woken, and
        # the hub's fan-out (to hundreds of streams) must not hold up the posts' replies.
        start = 0
        for _, entries, result, _ in group:
            result.set(stored[start : start + len(entries)])
            start += len(entries)
        self.on_commit(max((message.id for message in stored), default=None))

    def _commit(self, group):
        """Commit this group of posts (one post, when a group was refused)."""
        try:
            stored = self._append(*self._batch(group))
        except REFUSED as error:
            self._refused(group, error)
            return
        except BaseException as error:
            for _, _, result, _ in group:
                result.set_exception(error)
            return
        self._committed(group, stored)

    def _append(self, batch, capped):
        return self.store.append(batch, capped=capped, **self.caps)

    def _commit_work(self, group):
        try:
            outcomes = self.store.write_batch([item[1][0] for item in group])
        except BaseException as error:
            for _, _, result, _ in group:
                result.set_exception(error)
            return
        for (_, _, result, _), (value, error) in zip(group, outcomes, strict=True):
            if error is not None:
                result.set_exception(error)
            else:
                result.set(value)
        self.on_commit()


def run_retention(store, settings, alive=lambda: True, clock=time.time):
    """Prune in the background, forever: messages retention no longer keeps, agents idle
    past their expiry, idempotency keys past their 24 hours. Each worker does it, at
    jittered times."""
    retention = settings.retention_max_age > 0 or settings.retention_max_messages > 0

    def loop():
        while alive():
            gevent.sleep(settings.prune_interval * random.uniform(0.5, 1.0))
            try:
                if retention:
                    removed = store.prune(settings.retention_max_age, settings.retention_max_messages)
                    if removed:
                        log.info("retention removed %d messages", removed)
                if settings.agent_expiry > 0:
                    forgotten = store.forget_idle_agents(clock() - settings.agent_expiry)
                    if forgotten:
                        log.info("forgot %d agents idle for %s s", forgotten, f"{settings.agent_expiry:g}")
                store.forget_old_keys(clock())
            except StoreBusy as error:  # the database busy or gone: said in one line
                log.warning("retention skipped, will retry: %s", error)
            except Exception:
                log.exception("retention failed; will retry")

    return gevent.spawn(loop)
