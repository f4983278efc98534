"""agent-comms broker: channels of messages for fleets of AI agents, kept in SQLite."""

__version__ = "0.2.0"
