"""What the store hands out and refuses with, whatever backend holds the data: messages,
pages, tokens, the errors a write can end in, and what a message weighs."""

from dataclasses import dataclass


class StoreBusy(Exception):
    """The database stayed locked by other writers past the deadline."""


class StoreFull(Exception):
    """The disk or filesystem holding the database is full."""


class DatabaseFull(StoreFull):
    """The database holds as much as AGENT_COMMS_MAX_DATABASE allows."""


class ChannelLimit(Exception):
    """A post would create a channel past the broker's cap on channels."""


class AgentLimit(Exception):
    """A post would register an agent past the broker's cap on agents."""


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
class Message:
    id: int
    channel: str
    sender: str
    message: str
    timestamp: float

    def as_dict(self):
        return {
            "id": self.id,
            "channel": self.channel,
            "sender": self.sender,
            "message": self.message,
            "timestamp": self.timestamp,
        }


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


def stored_size(channel, sender, text):
    """What storing the message takes at most: what an agent's byte budget counts."""
    names = _utf8_len(sender) + 3 * len(channel)
    return int(STORED_SLACK * (_utf8_len(text) + names)) + MESSAGE_OVERHEAD
