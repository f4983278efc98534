"""The message store. contract.py says what a backend must provide and promise; `Store` is
the SQLite backend (sqlite.py and sqlite_coordination.py; its schema and migrations in
schema.py); model.py holds what every backend hands out and refuses with."""

from .model import (
    AgentLimit,
    ChannelLimit,
    DatabaseFull,
    Found,
    KeyConflict,
    Message,
    NoSuchMessage,
    Page,
    Post,
    SearchTerm,
    StoreBusy,
    StoreFull,
    Task,
    TaskRefused,
    Token,
    Visible,
    stored_size,
    text_size,
)
from .schema import SCHEMA_VERSION
from .sqlite import EVERYTHING, GRANTED_WINDOW, Filter, Store

__all__ = [
    "EVERYTHING",
    "GRANTED_WINDOW",
    "SCHEMA_VERSION",
    "AgentLimit",
    "ChannelLimit",
    "DatabaseFull",
    "Filter",
    "Found",
    "KeyConflict",
    "Message",
    "NoSuchMessage",
    "Page",
    "Post",
    "SearchTerm",
    "Store",
    "StoreBusy",
    "StoreFull",
    "Task",
    "TaskRefused",
    "Token",
    "Visible",
    "stored_size",
    "text_size",
]
