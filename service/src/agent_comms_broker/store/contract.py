"""What a store backend must provide, and the guarantees of each method. The HTTP layer,
live delivery and access control use a store through these methods only; the SQLite
backend (sqlite.py) implements them, and a second backend (PostgreSQL) keeps the same
promises. Both build on shared.py's logic over statements of their own.

Every `now` parameter is unix seconds and defaults to the clock: tests pass it to control
time. Pages are model.Page, messages model.Message (with model.Task when ever claimed).
"""

import abc


class StoreContract(abc.ABC):
    # -- writes of messages -----------------------------------------------------------------

    @abc.abstractmethod
    def append(self, entries, now=None, max_channels=0, max_agents=0, max_database=0, capped=None):
        """Store Posts in one transaction, all or none; returns their Messages in order.
        Ids rise strictly in commit order across every writer, and timestamps rise with
        them (even if the clock steps back). A post repeated with its idempotency key
        within KEY_LIFETIME answers the first Message (`duplicate` set) and stores nothing;
        the key used for another channel raises KeyConflict. Caps raise ChannelLimit,
        AgentLimit, DatabaseFull; a full disk StoreFull; a lock held too long StoreBusy."""

    @abc.abstractmethod
    def append_gathered(self, gather, now=None, max_channels=0, max_agents=0, max_database=0):
        """append() of the posts gather() returns, as (entries, capped), called once the
        write lock is held (and only once, whatever is retried): posts that arrive while a
        writer waits for the lock go into its transaction."""

    @abc.abstractmethod
    def write_batch(self, works):
        """Run each work(db) (from the *_work methods) in one transaction, each isolated
        from the others' refusals (KeyConflict, NoSuchMessage, TaskRefused): [(result,
        None) or (None, refusal)] in order. Any other error fails the whole batch."""

    # -- reads of messages ------------------------------------------------------------------

    @abc.abstractmethod
    def message(self, channel, message_id, now=None):
        """One message of a channel, or None."""

    @abc.abstractmethod
    def latest(self, channel, limit, max_bytes=None, only=None):
        """The newest `limit` messages `only` (a Filter) keeps, oldest first, within
        `max_bytes` of text (always one); a cut page starts at the oldest of them."""

    @abc.abstractmethod
    def after_id(self, channel, after, limit, max_bytes=None, only=None):
        """Messages with id > after, oldest first; `gap` when retention removed any of
        them; `more` when another page waits. Never skips or repeats a committed message."""

    @abc.abstractmethod
    def after_time(self, channel, since, limit, max_bytes=None, only=None):
        """Messages with timestamp > since, oldest first; a page never ends between two
        messages sharing a timestamp."""

    @abc.abstractmethod
    def all_after_id(self, after, limit, max_bytes=None, granted=None):
        """Messages of every channel (or those `granted` patterns match, in bounded id
        windows) with id > after, oldest first."""

    @abc.abstractmethod
    def search(self, terms, channel=None, before=None, limit=50, visible=None):
        """A model.Found: messages whose text holds every SearchTerm (case and accents
        ignored), newest first, with id < before, in one channel or all (of those
        `visible`, a model.Visible, lets through): at most `limit`; cut short (`cut`) when
        it reaches its time budget. The index follows every post and every removal in
        their own transactions."""

    @abc.abstractmethod
    def set_search(self, enabled):
        """Keep the search index in step with the messages (rebuilding it if it was not
        kept), or stop keeping it and empty it. Whether anything changed."""

    @abc.abstractmethod
    def activity(self, since, slot, now=None):
        """{channel: [messages in each `slot` seconds from `since` to now]} of the channels
        that got any."""

    @abc.abstractmethod
    def pruned_after(self, after, channel=None):
        """Whether retention removed a message with id > after."""

    @abc.abstractmethod
    def max_id(self):
        """The newest id stored (0 if none)."""

    @abc.abstractmethod
    def last_given_id(self):
        """The largest id ever given, even if retention removed it."""

    # -- tasks ------------------------------------------------------------------------------

    @abc.abstractmethod
    def take_work(self, channel, agent, lease, now=None):
        """Work that claims the channel's oldest pending task (never claimed, released,
        or whose lease ended; a lapsed claim on its last attempt becomes dead instead) for
        `agent`; its Message, or None. At most one agent holds a task at any time, on any
        number of connections: each change must be a conditional write whose effect says
        whether it won."""

    @abc.abstractmethod
    def claim_work(self, channel, message_id, agent, lease, now=None):
        """Work that claims one task, or extends the lease `agent` holds (even lapsed, if
        no one took it since). NoSuchMessage; TaskRefused for a reply, a task another
        agent holds, or one done or dead."""

    @abc.abstractmethod
    def done_work(self, channel, message_id, agent, reply=None, now=None, max_agents=0, max_database=0):
        """Work that marks the task `agent` holds done and stores `reply` (a Post; the caps
        hold it as a post) in the same transaction: (Message, reply Message or None).
        Repeated by the agent that finished it: the same answer, nothing stored.
        TaskRefused otherwise; KeyConflict if the reply's key stored another message."""

    @abc.abstractmethod
    def release_work(self, channel, message_id, agent, dead=False, now=None):
        """Work that gives back the task `agent` holds: pending, or dead (with `dead`, or
        on its last attempt). TaskRefused if `agent` does not hold it."""

    @abc.abstractmethod
    def queue(self, channel, limit=100, now=None):
        """(counts by state, claimed (id, agent, expires, attempt), dead (id, agent,
        attempt)) as the tasks stand at `now`."""

    @abc.abstractmethod
    def queue_totals(self, now=None):
        """[(channel, {"pending", "claimed", "done", "dead": count})] of each channel a
        task was ever taken from, as `queue` counts them."""

    # -- notifications out -------------------------------------------------------------------

    @abc.abstractmethod
    def notify_rules(self):
        """{rule: (cursor, delivered, failures, last_error, next_try)}."""

    @abc.abstractmethod
    def add_notify_rules_work(self, names, now=None):
        """Work that records rules not seen before, each starting at the newest id given."""

    @abc.abstractmethod
    def notify_advance_work(self, rule, cursor, delivered, now=None):
        """Work that moves a rule's cursor forward (never back), adds to its delivered
        count and clears its failures."""

    @abc.abstractmethod
    def notify_failed_work(self, rule, error, next_try, now=None):
        """Work that records a failed delivery and when to try again."""

    @abc.abstractmethod
    def take_lease_work(self, name, owner, duration, now=None):
        """Work: whether `owner` holds lease `name` (taken or renewed) for `duration`."""

    @abc.abstractmethod
    def drop_lease_work(self, name, owner):
        """Work that gives up a lease `owner` holds."""

    # -- read positions ---------------------------------------------------------------------

    @abc.abstractmethod
    def move_cursor_work(self, agent, channel, read_id, now=None):
        """Work that moves an agent's read position forward (never back): (position, moved)."""

    @abc.abstractmethod
    def cursor(self, agent, channel):
        """An agent's read position (0 if none)."""

    @abc.abstractmethod
    def unread(self, agent, channel):
        """Messages after the agent's position."""

    @abc.abstractmethod
    def unread_counts(self, agent, listed):
        """{channel: unread} for (channel, message count) pairs."""

    @abc.abstractmethod
    def receipts(self, channel, message_id):
        """(agent, first time its position reached the message), earliest first."""

    # -- agents, channels, tokens, upkeep ---------------------------------------------------

    @abc.abstractmethod
    def touch_agent(self, agent_id, now=None, busy_deadline=0.5, max_agents=0, register=True):
        """Record an agent as seen; best effort."""

    @abc.abstractmethod
    def touch_agent_work(self, agent_id, now=None, max_agents=0, register=True):
        """touch_agent as a work for write_batch (the group commit)."""

    @abc.abstractmethod
    def channels(self, after="", limit=-1):
        """(name, message count, last activity) by name."""

    @abc.abstractmethod
    def agents(self, after="", limit=-1):
        """(id, first seen, last seen, messages sent) by id."""

    @abc.abstractmethod
    def totals(self, active_since):
        """(messages, channels, agents, active agents)."""

    @abc.abstractmethod
    def prune(self, max_age=0.0, max_messages=0, now=None):
        """Remove what retention no longer keeps, with the tags, tasks and read-position
        moves that hang on it, oldest first, in bounded batches; how many messages went."""

    @abc.abstractmethod
    def forget_idle_agents(self, idle_since):
        """Forget agents not seen since then that hold no token."""

    @abc.abstractmethod
    def forget_old_keys(self, now=None):
        """Forget idempotency keys past KEY_LIFETIME."""

    @abc.abstractmethod
    def token_by_hash(self, digest):
        """The Token with that SHA-256, or None."""

    @abc.abstractmethod
    def token_agents(self, now=None):
        """The agents that hold an active token."""

    @abc.abstractmethod
    def touch_token_work(self, token_id, now=None):
        """A work for write_batch recording a token's last use; best effort."""

    # -- agents' public keys (agent_keys.py) ----------------------------------------------

    @abc.abstractmethod
    def agent_keys(self, agent):
        """Every AgentKey the agent published, the current one first; none lost on a change."""

    @abc.abstractmethod
    def key_agents(self):
        """Every agent that ever published keys."""

    @abc.abstractmethod
    def current_key(self, agent):
        """The agent's current AgentKey, or None."""

    @abc.abstractmethod
    def publish_keys(self, agent, sign_key, box_key, box_sig, source, may_replace, now=None):
        """Make these the agent's current keys, atomically: ("added" | "changed" |
        "unchanged", AgentKey), or KeysRefused with nothing changed."""

    @abc.abstractmethod
    def healthy(self):
        """Whether the database answers with this broker's schema."""
