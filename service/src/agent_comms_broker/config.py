"""The broker's settings: one table of names, environment variables and defaults.

Flags of `agent-comms-broker serve` are written into the environment, so the gunicorn
config file, the WSGI app and every worker read the same values from one place.
"""

import os
import re
from dataclasses import dataclass, fields

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(ValueError):
    """A setting has a value the broker cannot use."""


def duration(text):
    """Seconds from '90', '90s', '15m', '12h' or '30d'."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 30, 15m, 12h or 7d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def synchronous(text):
    value = str(text).strip().upper()
    if value not in ("NORMAL", "FULL"):
        raise ValueError(f"{text!r} is not NORMAL or FULL")
    return value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError(f"{text!r} is not a whole number of 1 or more")
    return value


def count(text):
    value = int(text)
    if value < 0:
        raise ValueError(f"{text!r} is not a whole number of 0 or more")
    return value


def positive_duration(text):
    value = duration(text)
    if value <= 0:
        raise ValueError(f"{text!r} is not a duration above zero")
    return value


@dataclass(frozen=True)
class Settings:
    """Every setting, with its default. The environment variable is AGENT_COMMS_<NAME>."""

    bind: str = "0.0.0.0:8080"
    db: str = "/opt/agent-comms/messages.db"
    workers: int = 2
    # gevent connections one worker holds at once: watchers plus requests in flight.
    worker_connections: int = 4096
    # FULL: a 2xx survives a power cut (fsync per group commit). NORMAL: survives a killed
    # process; a power cut may drop the last commits, never corrupt the file.
    synchronous: str = "FULL"
    max_body: int = 65536
    max_batch: int = 500
    max_wait: float = 60.0
    keepalive: float = 15.0
    active_window: float = 300.0
    retention_max_age: float = 0.0
    retention_max_messages: int = 0
    prune_interval: float = 60.0
    wakeup_interval: float = 0.02
    graceful_timeout: float = 10.0
    log_level: str = "info"
    access_log: str = "-"

    @classmethod
    def from_env(cls, environ=None):
        environ = os.environ if environ is None else environ
        values = {}
        for field in fields(cls):
            name = "AGENT_COMMS_" + field.name.upper()
            raw = environ.get(name)
            if raw is None or raw == "":
                continue
            try:
                values[field.name] = _PARSERS[field.name](raw)
            except ValueError as error:
                raise ConfigError(f"{name}: {error}") from None
        return cls(**values)


_PARSERS = {
    "bind": str,
    "db": str,
    "workers": positive_int,
    "worker_connections": positive_int,
    "synchronous": synchronous,
    "max_body": positive_int,
    "max_batch": positive_int,
    "max_wait": duration,
    "keepalive": positive_duration,
    "active_window": positive_duration,
    "retention_max_age": duration,
    "retention_max_messages": count,
    "prune_interval": positive_duration,
    "wakeup_interval": positive_duration,
    "graceful_timeout": duration,
    "log_level": str,
    "access_log": str,
}
