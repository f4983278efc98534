"""The message store. contract.py says what a backend must provide and promise; `Store` is
the SQLite backend (sqlite.py, its statements in sqlite_sql.py, its schema and migrations
in schema.py), over the logic shared.py, coordination.py, notify_records.py and agent_keys.py share
between backends; model.py holds what every backend hands out and refuses with."""

from .model import (
    AgentKey,
    AgentLimit,
    ChannelLimit,
    DatabaseFull,
    Found,
    KeyConflict,
    KeysRefused,
    Message,
    NoSuchMessage,
    Page,
    Post,
    SearchTerm,
    StoreBusy,
    StoreFull,
    StoreUnavailable,
    Task,
    TaskRefused,
    Token,
    Unstorable,
    Visible,
    stored_size,
    text_size,
)
from .schema import SCHEMA_VERSION
from .shared import EVERYTHING, GRANTED_WINDOW, Filter
from .sqlite import Store

__all__ = [
    "EVERYTHING",
    "GRANTED_WINDOW",
    "SCHEMA_VERSION",
    "AgentKey",
    "AgentLimit",
    "ChannelLimit",
    "DatabaseFull",
    "Filter",
    "Found",
    "KeyConflict",
    "KeysRefused",
    "Message",
    "NoSuchMessage",
    "Page",
    "Post",
    "SearchTerm",
    "Store",
    "StoreBusy",
    "StoreFull",
    "StoreUnavailable",
    "Task",
    "TaskRefused",
    "Token",
    "Unstorable",
    "Visible",
    "stored_size",
    "text_size",
]
