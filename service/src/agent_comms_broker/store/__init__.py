"""The message store. `Store` is the SQLite backend (sqlite.py; its schema and migrations
in schema.py); model.py holds what every backend hands out and refuses with."""

from .model import (
    AgentLimit,
    ChannelLimit,
    DatabaseFull,
    Message,
    Page,
    StoreBusy,
    StoreFull,
    Token,
    stored_size,
    text_size,
)
from .schema import SCHEMA_VERSION
from .sqlite import GRANTED_WINDOW, Store

__all__ = [
    "GRANTED_WINDOW",
    "SCHEMA_VERSION",
    "AgentLimit",
    "ChannelLimit",
    "DatabaseFull",
    "Message",
    "Page",
    "Store",
    "StoreBusy",
    "StoreFull",
    "Token",
    "stored_size",
    "text_size",
]
