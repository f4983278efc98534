"""What the store hands out and refuses with, whatever backend holds the data: messages,
pages, tokens, the errors a write can end in, and what a message weighs."""

from dataclasses import dataclass, field

import orjson

# A message that does not say its priority has this one (1 lowest, 5 highest).
DEFAULT_PRIORITY = 3


class StoreBusy(Exception):
    """The database stayed locked by other writers past the deadline."""


class StoreUnavailable(StoreBusy):
    """The database cannot be reached (PostgreSQL down, or the connection to it lost)."""


class StoreFull(Exception):
    """The disk or filesystem holding the database is full."""


class DatabaseFull(StoreFull):
    """The database holds as much as AGENT_COMMS_MAX_DATABASE allows."""


class ChannelLimit(Exception):
    """A post would create a channel past the broker's cap on channels."""


class AgentLimit(Exception):
    """A post would register an agent past the broker's cap on agents."""


class KeyConflict(Exception):
    """An idempotency key the sender already used for a post to another channel."""


class Unstorable(Exception):
    """A post the backend cannot store as it is: PostgreSQL's text cannot hold U+0000."""


class KeysRefused(Exception):
    """Keys an agent may not publish: it has others, which only its token holder (or the
    operator, for keys the operator pinned) replaces."""


class NoSuchMessage(Exception):
    """No message with that id in that channel."""


class TaskRefused(Exception):
    """A claim, done or release the task's state does not allow: `task` is the task as it
    stands (a Task; None if it was never claimed). `not_a_task`: the message is a reply."""

    def __init__(self, text, task=None, not_a_task=False):
        super().__init__(text)
        self.task = task
        self.not_a_task = not_a_task


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    hash: str
    agent: str
    read: str
    write: str
    note: str
    created: float
    expires: float | None
    revoked: float | None
    last_used: float | None

    def state(self, now):
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and self.expires <= now:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class AgentKey:
    """A public key pair an agent published (base64): `sign` Ed25519, `box` X25519 (None
    if it gave none) with `box_sig`, the signature `sign` made over it; `source` "agent"
    or "operator"; `replaced` when a newer pair took its place (None: the current one)."""

    sign: str
    box: str | None
    box_sig: str | None
    source: str
    added: float
    replaced: float | None

    def as_dict(self):
        return {
            "sign": self.sign,
            "box": self.box,
            "box_sig": self.box_sig,
            "source": self.source,
            "added": self.added,
            "replaced": self.replaced,
        }


@dataclass(frozen=True, slots=True)
class Task:
    """A message worked as a task: pending, claimed (by `agent` until `expires`), done (by
    `agent`, with the reply `reply`) or dead. `attempt` counts its claims."""

    state: str
    agent: str | None
    expires: float | None
    attempt: int
    reply: int | None = None

    def as_dict(self):
        return {
            "state": self.state,
            "agent": self.agent,
            "expires": self.expires,
            "attempt": self.attempt,
            "reply": self.reply,
        }


@dataclass(frozen=True, slots=True)
class Post:
    """A message to store: its text and optional fields (`meta` as JSON text, `key` an
    idempotency key, `signature` its author's signature as JSON text: signing.py)."""

    channel: str
    sender: str
    message: str
    reply_to: int | None = None
    priority: int = DEFAULT_PRIORITY
    tags: tuple = ()
    meta: str | None = None
    key: str | None = None
    signature: str | None = None

    @classmethod
    def of(cls, entry):
        """A Post from a Post or a (channel, sender, message) tuple."""
        return entry if isinstance(entry, Post) else cls(*entry)


# Not frozen: a page builds up to a thousand of these, and a frozen dataclass sets each
# field through object.__setattr__. Treat it as read-only all the same.
@dataclass(slots=True, unsafe_hash=True)
class Message:
    id: int
    channel: str
    sender: str
    message: str
    timestamp: float
    reply_to: int | None = None
    thread: int | None = None
    priority: int = DEFAULT_PRIORITY
    tags: tuple = ()
    meta: str | None = None
    # Its author's signature (JSON text), if it was signed.
    signature: str | None = None
    # Only on a message that was ever claimed.
    task: Task | None = None
    # Set on what a post repeated with its idempotency key answers: stored before, not now.
    duplicate: bool = field(default=False, compare=False)

    def as_dict(self):
        reply = {
            "id": self.id,
            "channel": self.channel,
            "sender": self.sender,
            "message": self.message,
            "timestamp": self.timestamp,
            "reply_to": self.reply_to,
            "thread": self.thread,
            "priority": self.priority,
            "tags": list(self.tags),
            "meta": orjson.loads(self.meta) if self.meta else {},
        }
        if self.signature is not None:
            reply["signature"] = orjson.loads(self.signature)
        if self.task is not None:
            reply["task"] = self.task.as_dict()
        return reply


@dataclass(frozen=True, slots=True)
class SearchTerm:
    """A word (or a phrase, words in this order) that a searched message must hold;
    `prefix`: any word that starts with the last one counts."""

    text: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Visible:
    """The channels a search may return: those matching `channels` (patterns, never an
    inbox), and the inboxes matching `inboxes` (patterns starting with @) or named in
    `own` (exact names)."""

    channels: tuple = ()
    inboxes: tuple = ()
    own: tuple = ()


@dataclass(frozen=True, slots=True)
class Found:
    """A search's matches, newest first; `cut` when it stopped at its time budget."""

    messages: list
    cut: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    """One read of a channel: messages oldest first, the cursor to continue from, and
    whether retention removed messages the caller's cursor had not seen yet."""

    messages: list
    cursor: int
    gap: bool
    more: bool


# What a message takes on disk, at most, for an agent's byte budget: its row (text,
# sender, channel, id, timestamp) and two index entries that repeat the channel, plus the
# room B-tree pages leave free. Measured: 1-byte messages with long names took 1.7 times
# text + names + 64; this counts more than that.
MESSAGE_OVERHEAD = 96
STORED_SLACK = 1.5


def _utf8_len(text):
    return len(text) if text.isascii() else len(text.encode())


def text_size(channel, sender, text):
    """Bytes of a message's text and names in UTF-8: what a page's budget counts."""
    return _utf8_len(text) + _utf8_len(sender) + len(channel)


def stored_size(channel, sender, text, tags=(), meta=None, signature=None):
    """What storing the message takes at most: what an agent's byte budget counts. Each
    tag is kept twice (in the row, and in the tag index with the channel)."""
    names = _utf8_len(sender) + 3 * len(channel)
    extra = sum(2 * _utf8_len(tag) + len(channel) + 16 for tag in tags) + (len(meta) if meta else 0)
    extra += len(signature) if signature else 0
    return int(STORED_SLACK * (_utf8_len(text) + names + extra)) + MESSAGE_OVERHEAD
