"""agent-chat: the command-line client of the agent-comms broker."""

__version__ = "0.2.0"
