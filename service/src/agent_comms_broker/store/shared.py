"""What both SQL backends share: the store's logic over statements that each backend
keeps in one module of its own (`sql`: sqlite_sql.py, postgres_sql.py). A backend
subclass brings its connections and transactions (`_write`, `_read`), the insert of new
rows (`_insert_rows`), its checks of free space and database size, and search.

Ids rise strictly in commit order: each backend lets one write transaction at a time
give ids. Timestamps are assigned inside the same write transaction and also rise
strictly (each at least 1 microsecond after the last), so `since=` can never skip a
later commit.
"""

import dataclasses
import time
from dataclasses import dataclass

import orjson

from .agent_keys import AgentKeys
from .contract import StoreContract
from .coordination import Coordination
from .model import (
    AgentLimit,
    ChannelLimit,
    DatabaseFull,
    KeyConflict,
    NoSuchMessage,
    Page,
    Post,
    TaskRefused,
    Token,
    Unstorable,
    text_size,
)
from .notify_records import NotifyRecords
from .rows import message_of, messages_of

# Strictly rising timestamps: the next is at least this far after the last.
TIMESTAMP_STEP = 1e-6
PRUNE_BATCH = 2000
# What one write of a batch may be refused with, leaving the others be.
REFUSALS = (AgentLimit, ChannelLimit, DatabaseFull, KeyConflict, NoSuchMessage, TaskRefused, Unstorable)
# A post repeated with its idempotency key within this many seconds stores nothing.
KEY_LIFETIME = 24 * 3600
# Tasks: a release or an expired lease counts as a failure; this many make a task dead.
DEFAULT_MAX_ATTEMPTS = 5

# A granted read looks at this many ids at most: reading past messages it may not see
# costs one bounded step at a time, never one long scan of the whole table.
GRANTED_WINDOW = 20000


@dataclass(frozen=True, slots=True)
class Filter:
    """What a channel read keeps: one thread, one tag, a lowest priority (None: all)."""

    thread: int | None = None
    tag: str | None = None
    min_priority: int | None = None

    def sql(self, channel, statements):
        """The statement's `{only}` and its parameters, in a backend's `statements`."""
        parts, params = [], []
        if self.thread is not None:
            parts.append(statements.ONLY_THREAD)
            params += [self.thread, self.thread]
        if self.tag is not None:
            parts.append(statements.ONLY_TAG)
            params += [channel, self.tag]
        if self.min_priority is not None:
            parts.append(statements.ONLY_PRIORITY)
            params.append(self.min_priority)
        return " ".join(parts), params


EVERYTHING = Filter()


def _text_size(row):
    return text_size(row[1], row[2], row[3])


def _listing_bound(after):
    """A listing's `after` cut at its first U+0000 (which PostgreSQL's text cannot hold):
    no name holds one, so the names after both are the same."""
    return after.partition("\x00")[0]


def _take(rows, limit, max_bytes):
    """The first rows that fit in `limit` and in `max_bytes` of text (always one, if there
    is one), read one at a time so no more are held; and whether any row is left."""
    taken, size = [], 0
    for row in rows:
        if len(taken) == limit:
            return taken, True
        size += _text_size(row)
        if taken and max_bytes is not None and size > max_bytes:
            return taken, True
        taken.append(row)
    return taken, False


class SQLStore(AgentKeys, Coordination, NotifyRecords, StoreContract):
    """The logic of a store over its backend's statements (`sql`)."""

    sql = None
    # What /status calls the backend, and whether its text holds U+0000.
    database = None
    stores_nul = True

    def append(self, entries, now=None, max_channels=0, max_agents=0, max_database=0, capped=None):
        """Store Posts (or (channel, sender, message) tuples) in one transaction; returns
        their Messages. A post repeated with its idempotency key answers the Message stored
        the first time (marked `duplicate`) and stores nothing; a key used for another
        channel raises KeyConflict. With max_channels or max_agents, a post that would
        create a channel or register an agent past the cap stores nothing; `capped`
        (default: all of `entries`) are the entries the caps hold. With max_database,
        nothing is stored once the database's pages in use hold that many bytes."""
        return self.append_gathered(
            lambda: (entries, entries if capped is None else capped), now, max_channels, max_agents, max_database
        )

    def append_gathered(self, gather, now=None, max_channels=0, max_agents=0, max_database=0):
        self._check_free_space()
        gathered = []

        def work(db):
            if not gathered:  # a retried transaction stores the same posts
                entries, capped = gather()
                posts = [Post.of(entry) for entry in entries]
                gathered.append((posts, posts if capped is entries else [Post.of(entry) for entry in capped]))
            posts, capped = gathered[0]
            if max_database:
                self._check_database_size(db, max_database)
            if max_channels and capped:
                self._check_channel_cap(db, {post.channel for post in capped}, max_channels)
            if max_agents and capped:
                self._check_agent_cap(db, {post.sender for post in capped}, max_agents)
            return self._insert(db, posts, time.time() if now is None else now)

        return self._write(work)

    def write_batch(self, works):
        """Run each work(db) in one transaction (one commit), each in a savepoint of its
        own: one that is refused (a task's state, a missing message, a reused key) is
        undone alone. [(result, None) or (None, the refusal)] in order."""
        self._check_free_space()

        def transaction(db):
            outcomes = []
            for work in works:
                db.execute("SAVEPOINT work")
                try:
                    outcomes.append((work(db), None))
                except REFUSALS as error:
                    db.execute("ROLLBACK TO work")
                    outcomes.append((None, error))
                db.execute("RELEASE work")
            return outcomes

        return self._write(transaction)

    def _insert(self, db, posts, clock):
        """Insert posts inside the caller's transaction (see append)."""
        # The newest message is never pruned while any other is kept, so only an empty
        # table needs the pruned timestamps: either way a clock stepped back cannot give a
        # new message a time a reader with `since=` has already passed.
        row = db.execute(self.sql.LAST_TIMESTAMP).fetchone() or db.execute(self.sql.LAST_PRUNED_TIMESTAMP).fetchone()
        stamp = clock if row is None or row[0] is None else max(clock, row[0] + TIMESTAMP_STEP)
        stored, per_channel, per_agent, keyed, signed = [], {}, {}, {}, set()
        rows = []  # posts not inserted yet: (their place in `stored`, row, tags)
        for post in posts:
            if not self.stores_nul and "\x00" in post.message:
                raise Unstorable(f"{self.database} cannot store the character U+0000 in a message's text")
            if post.key is not None or post.reply_to is not None:
                # What these look up may be among the rows waiting: insert those first.
                self._insert_rows(db, rows, stored)
            if post.key is not None:
                first = keyed.get((post.sender, post.key)) or self._keyed(db, post, clock)
                if first is not None:
                    if first.channel != post.channel:
                        raise KeyConflict(
                            f"idempotency key {post.key!r} of {post.sender!r} was used for a post to "
                            f"channel {first.channel!r} (message {first.id}); use a new key"
                        )
                    stored.append(dataclasses.replace(first, duplicate=True))
                    continue
            if post.signature is not None:
                self._check_unrepeated(db, post, signed)
            thread = None
            if post.reply_to is not None:
                target = db.execute(self.sql.SELECT_REPLY_TARGET, (post.reply_to,)).fetchone()
                # Checked before the post was queued; pruned since, it still names the thread.
                thread = post.reply_to if target is None or target[1] is None else target[1]
            tags = orjson.dumps(list(post.tags)).decode() if post.tags else None
            row = (
                post.channel,
                post.sender,
                post.message,
                stamp,
                post.reply_to,
                thread,
                post.priority,
                tags,
                post.meta,
                post.signature,
            )
            rows.append((len(stored), row, post.tags))
            stored.append(None)
            if post.key is not None:
                self._insert_rows(db, rows, stored)
                message = stored[-1]
                db.execute(self.sql.RECORD_KEY, (post.sender, post.key, message.id, post.channel, clock))
                keyed[(post.sender, post.key)] = message
            per_channel[post.channel] = (per_channel.get(post.channel, (0,))[0] + 1, stamp)
            per_agent[post.sender] = (per_agent.get(post.sender, (0,))[0] + 1, stamp)
            stamp += TIMESTAMP_STEP
        self._insert_rows(db, rows, stored)
        for channel, (added, last) in per_channel.items():
            db.execute(self.sql.UPSERT_CHANNEL, (channel, added, last))
        for sender, (sent, last) in per_agent.items():
            db.execute(self.sql.UPSERT_AGENT_SENT, (sender, last, last, sent))
        return stored

    def _check_unrepeated(self, db, post, signed):
        """A signature is good for one post: a repeat of a signed message stored before (by
        anyone: the signature is public once read) is refused, so no one can replay an
        agent's signed words, a task for instance. A retry with the post's idempotency key
        was answered above, with the first message. `signed`: the signatures of this
        call's posts, some of them still waiting to be inserted."""
        if post.signature in signed:
            raise KeyConflict("two posts carry the same signature: a signature is good for one post")
        found = db.execute(self.sql.SELECT_SIGNED, (post.signature,)).fetchone()
        if found is not None:
            raise KeyConflict(
                f"this signed message was posted already (message {found[0]}): a signature is good for one post"
            )
        signed.add(post.signature)

    def _keyed(self, db, post, now):
        """The message a sender's idempotency key stored within KEY_LIFETIME, if it is kept."""
        row = db.execute(self.sql.SELECT_KEYED, (post.sender, post.key, now - KEY_LIFETIME)).fetchone()
        if row is None:
            return None
        found = db.execute(self.sql.SELECT_ONE, row).fetchone()
        return None if found is None else message_of(found, now, self.max_attempts)

    def forget_old_keys(self, now=None):
        """Forget idempotency keys older than KEY_LIFETIME; returns how many went."""
        before = (time.time() if now is None else now) - KEY_LIFETIME
        return self._write(lambda db: db.execute(self.sql.DELETE_OLD_KEYS, (before,)).rowcount)

    def _check_channel_cap(self, db, channels, max_channels):
        new = [name for name in channels if db.execute(self.sql.CHANNEL_EXISTS, (name,)).fetchone() is None]
        if new and db.execute(self.sql.COUNT_ALL_CHANNELS).fetchone()[0] + len(new) > max_channels:
            raise ChannelLimit(f"the broker holds its limit of {max_channels} channels; {new[0]!r} would be one more")

    def _check_agent_cap(self, db, senders, max_agents):
        new = sorted(name for name in senders if db.execute(self.sql.AGENT_EXISTS, (name,)).fetchone() is None)
        if new and db.execute(self.sql.COUNT_AGENTS).fetchone()[0] + len(new) > max_agents:
            raise AgentLimit(f"the broker holds its limit of {max_agents} agents; {new[0]!r} would be one more")

    def touch_agent(self, agent_id, now=None, busy_deadline=0.5, max_agents=0, register=True):
        """Record that an agent was seen (it read, or watched). Best effort: it gives up
        on a locked database sooner than a post does."""
        self._write(self.touch_agent_work(agent_id, now, max_agents, register), busy_deadline)

    def touch_agent_work(self, agent_id, now=None, max_agents=0, register=True):
        """An agent not known yet is registered only with `register`, and with max_agents
        only while the cap is not reached."""
        seen = time.time() if now is None else now

        def work(db):
            if db.execute(self.sql.UPDATE_AGENT_SEEN, (seen, agent_id)).rowcount or not register:
                return
            if not max_agents or db.execute(self.sql.COUNT_AGENTS).fetchone()[0] < max_agents:
                db.execute(self.sql.UPSERT_AGENT_SEEN, (agent_id, seen, seen))

        return work

    def forget_idle_agents(self, idle_since):
        """Forget the agents not seen since `idle_since` that no token names; returns how
        many went. Their messages stay, under their names."""
        return self._write(lambda db: db.execute(self.sql.DELETE_IDLE_AGENTS, (idle_since,)).rowcount)

    def prune(self, max_age=0.0, max_messages=0, now=None):
        """Remove what retention no longer keeps; returns how many messages went."""
        removed = 0
        if max_age > 0:
            cutoff = (time.time() if now is None else now) - max_age
            while True:
                gone = self._write(lambda db: self._prune_expired(db, cutoff))
                removed += gone
                if gone < PRUNE_BATCH:
                    break
        if max_messages > 0:
            overfull = self._read(lambda db: db.execute(self.sql.SELECT_OVERFULL_CHANNELS, (max_messages,)).fetchall())
            for channel, _ in overfull:
                while True:
                    gone = self._write(lambda db, ch=channel: self._prune_excess(db, ch, max_messages))
                    removed += gone
                    if gone < PRUNE_BATCH:
                        break
        return removed

    def _prune_expired(self, db, cutoff):
        groups = db.execute(self.sql.SELECT_EXPIRED, (cutoff, PRUNE_BATCH)).fetchall()
        if not groups:
            return 0
        for statement in (self.sql.DELETE_TAGS_OF, self.sql.DELETE_TASKS_OF):
            db.execute(statement.format(ids=self.sql.EXPIRED_IDS), (cutoff, PRUNE_BATCH))
        db.execute(self.sql.DELETE_EXPIRED, (cutoff, PRUNE_BATCH))
        for channel, gone, last_id, last_stamp in groups:
            db.execute(self.sql.RECORD_PRUNED, (gone, last_id, last_stamp, channel))
            db.execute(self.sql.DELETE_PASSED_MOVES, (channel, last_id))
        return sum(group[1] for group in groups)

    def _prune_excess(self, db, channel, keep):
        row = db.execute(self.sql.SELECT_NTH_NEWEST_ID, (channel, keep)).fetchone()
        if row is None:
            return 0
        gone, last_id, last_stamp = db.execute(self.sql.SELECT_EXCESS, (channel, row[0], PRUNE_BATCH)).fetchone()
        if not gone:
            return 0
        for statement in (self.sql.DELETE_TAGS_OF, self.sql.DELETE_TASKS_OF):
            db.execute(statement.format(ids=self.sql.EXCESS_IDS), (channel, row[0], PRUNE_BATCH))
        db.execute(self.sql.DELETE_EXCESS, (channel, row[0], PRUNE_BATCH))
        db.execute(self.sql.RECORD_PRUNED, (gone, last_id, last_stamp, channel))
        db.execute(self.sql.DELETE_PASSED_MOVES, (channel, last_id))
        return gone

    def _messages(self, db, rows):
        return messages_of(db, self.sql, rows, time.time(), self.max_attempts)

    def message(self, channel, message_id, now=None):
        """One message of a channel (its task as it stands at `now`), or None."""
        row = self._read(lambda db: db.execute(self.sql.SELECT_ONE, (message_id, channel)).fetchone())
        stamp = time.time() if now is None else now
        return None if row is None else message_of(row, stamp, self.max_attempts)

    def latest(self, channel, limit, max_bytes=None, only=EVERYTHING):
        """The newest `limit` messages of a channel (those `only` keeps), oldest first; the
        cursor is the newest one's id (0 if there is none). If they hold more than
        `max_bytes` of text, the page starts at the oldest of them and stops within the
        budget, like an after_id page (`more` set, the cursor its last id), so paging on
        from the cursor gets the rest."""
        where, params = only.sql(channel, self.sql)

        def work(db):
            rows = db.execute(self.sql.SELECT_LATEST.format(only=where), (channel, *params, limit))
            rows, cut = _take(rows, limit, max_bytes)
            if cut:
                statement = self.sql.SELECT_LATEST_WINDOW_START.format(only=where)
                start = db.execute(statement, (channel, *params, limit)).fetchone()[0]
                return self._after_id(db, channel, start - 1, limit, max_bytes, only)
            rows.reverse()
            cursor = rows[-1][0] if rows else 0
            return Page(self._messages(db, rows), cursor, False, False)

        return self._read(work)

    def after_id(self, channel, after, limit, max_bytes=None, only=EVERYTHING):
        """Messages of a channel with id > after (those `only` keeps), oldest first: at
        most `limit`, and no more than `max_bytes` of text (but always one)."""
        return self._read(lambda db: self._after_id(db, channel, after, limit, max_bytes, only))

    def _after_id(self, db, channel, after, limit, max_bytes, only):
        where, params = only.sql(channel, self.sql)
        statement = self.sql.SELECT_AFTER_ID.format(only=where)
        rows, more = _take(db.execute(statement, (channel, after, *params, limit + 1)), limit, max_bytes)
        pruned = db.execute(self.sql.SELECT_CHANNEL_PRUNED, (channel,)).fetchone()
        gap = pruned is not None and pruned[0] > after
        cursor = rows[-1][0] if rows else after
        return Page(self._messages(db, rows), cursor, gap, more)

    def after_time(self, channel, since, limit, max_bytes=None, only=EVERYTHING):
        """Messages of a channel with timestamp > since, oldest first, within `limit` and
        `max_bytes` as after_id. A page is extended past both rather than split between
        messages sharing one timestamp (possible only in data adopted from the seed, whose
        timestamps had one-second resolution)."""
        where, params = only.sql(channel, self.sql)
        after_time = self.sql.SELECT_AFTER_TIME.format(only=where)

        def work(db):
            rows, more = _take(db.execute(after_time, (channel, since, *params, limit + 1)), limit, max_bytes)
            if more:
                last = rows[-1]
                same = self.sql.SELECT_SAME_TIME.format(only=where)
                rows += db.execute(same, (channel, last[4], last[0], *params)).fetchall()
                more = db.execute(after_time, (channel, rows[-1][4], *params, 1)).fetchone() is not None
            pruned = db.execute(self.sql.SELECT_CHANNEL_PRUNED, (channel,)).fetchone()
            gap = pruned is not None and pruned[1] > since
            if rows:
                cursor = rows[-1][0]
            else:
                # Nothing newer than `since`: continue from the channel's newest message.
                cursor = db.execute(self.sql.SELECT_CHANNEL_LAST_ID, (channel,)).fetchone()[0]
            return Page(self._messages(db, rows), cursor, gap, more)

        return self._read(work)

    def all_after_id(self, after, limit, max_bytes=None, granted=None):
        """Messages of every channel with id > after, oldest first, within `limit` and
        `max_bytes` as after_id (a Page whose `gap` is always False). With `granted` (channel
        patterns such as 'tasks,team-*'), only the channels they match, read over at most
        GRANTED_WINDOW ids: `more` is then also set when ids past the window remain, and the
        cursor moves past the window's end when none of it was granted."""

        def work(db):
            if granted is None or "*" in granted.split(","):
                rows, more = _take(db.execute(self.sql.SELECT_ALL_AFTER_ID, (after, limit + 1)), limit, max_bytes)
                return Page(self._messages(db, rows), rows[-1][0] if rows else after, False, more)
            patterns = granted.split(",")
            end = after + GRANTED_WINDOW
            condition, params = self.sql.granted(patterns)
            statement = self.sql.SELECT_GRANTED_AFTER_ID.format(granted=condition)
            rows, cut = _take(db.execute(statement, (after, end, *params, limit + 1)), limit, max_bytes)
            if cut:
                return Page(self._messages(db, rows), rows[-1][0], False, True)
            last = db.execute(self.sql.LAST_GIVEN_ID).fetchone()[0]
            return Page(self._messages(db, rows), min(end, max(last, after)), False, end < last)

        return self._read(work)

    def activity(self, since, slot, now=None):
        """{channel: [count of messages in each `slot` seconds from `since` to now]}."""
        end = time.time() if now is None else now
        slots = max(1, int((end - since) // slot) + (1 if (end - since) % slot else 0))

        def work(db):
            row = db.execute(self.sql.LAST_ID_AT, (since,)).fetchone()
            return db.execute(self.sql.COUNT_BY_SLOT, (since, slot, row[0] if row else 0)).fetchall()

        counts = {}
        for channel, index, count in self._read(work):
            if 0 <= index < slots:
                counts.setdefault(channel, [0] * slots)[index] = count
        return counts

    def pruned_after(self, after, channel=None):
        """Whether retention removed any message with id > after (in one channel, or any)."""
        if channel is None:
            return self._read(lambda db: db.execute(self.sql.SELECT_MAX_PRUNED_ID).fetchone()[0]) > after
        row = self._read(lambda db: db.execute(self.sql.SELECT_CHANNEL_PRUNED, (channel,)).fetchone())
        return row is not None and row[0] > after

    def max_id(self):
        return self._read(lambda db: db.execute(self.sql.MAX_ID).fetchone()[0])

    def last_given_id(self):
        """The largest id this database ever gave a message, even if retention removed it."""
        return self._read(lambda db: db.execute(self.sql.LAST_GIVEN_ID).fetchone()[0])

    def channels(self, after="", limit=-1):
        """(name, message count, last activity) of the channels that hold messages, by
        name: those after `after`, at most `limit` (-1: all)."""
        bound = _listing_bound(after)
        return self._read(lambda db: db.execute(self.sql.SELECT_CHANNELS, (bound, limit)).fetchall())

    def agents(self, after="", limit=-1):
        """(id, first seen, last seen, messages sent) of the agents, by id: those after
        `after`, at most `limit` (-1: all)."""
        bound = _listing_bound(after)
        return self._read(lambda db: db.execute(self.sql.SELECT_AGENTS, (bound, limit)).fetchall())

    def totals(self, active_since):
        """(messages, channels, agents, active agents)."""
        return self._read(lambda db: db.execute(self.sql.SELECT_TOTALS, (active_since,)).fetchone())

    def add_token(self, token_id, digest, agent, read, write, note="", expires=None, now=None):
        created = time.time() if now is None else now
        row = (token_id, digest, agent, read, write, note, created, expires)
        self._write(lambda db: db.execute(self.sql.INSERT_TOKEN, row))
        return self.token_by_hash(digest)

    def update_token(self, token_id, read, write, note, expires):
        """New grants and expiry for a token (a revoked one stays revoked)."""
        self._write(lambda db: db.execute(self.sql.UPDATE_TOKEN_GRANTS, (read, write, note, expires, token_id)))

    def token_by_hash(self, digest):
        row = self._read(lambda db: db.execute(self.sql.SELECT_TOKEN_BY_HASH, (digest,)).fetchone())
        return None if row is None else Token(*row)

    def tokens(self):
        return [Token(*row) for row in self._read(lambda db: db.execute(self.sql.SELECT_TOKENS).fetchall())]

    def revoke_token(self, token_id, now=None):
        """True if the token was active and is now revoked; None if there is no such token."""
        stamp = time.time() if now is None else now

        def work(db):
            if db.execute(self.sql.SELECT_TOKEN_IDS, (token_id,)).fetchone() is None:
                return None
            return db.execute(self.sql.REVOKE_TOKEN, (stamp, token_id)).rowcount == 1

        return self._write(work)

    def token_agents(self, now=None):
        """The agents that hold a token that is neither revoked nor expired."""
        stamp = time.time() if now is None else now
        return {row[0] for row in self._read(lambda db: db.execute(self.sql.SELECT_TOKEN_AGENTS, (stamp,)).fetchall())}

    def touch_token_work(self, token_id, now=None):
        """Record a token's last use (best effort: the broker waits for it briefly)."""
        stamp = time.time() if now is None else now
        return lambda db: db.execute(self.sql.TOUCH_TOKEN, (stamp, token_id)).rowcount
