"""Who is calling and what they may do: bearer tokens, channel patterns and the three
access modes. The HTTP layer asks; the store keeps the tokens (as hashes only)."""

import base64
import fnmatch
import hashlib
import re
import secrets
from dataclasses import dataclass

TOKEN_PREFIX = "acm_"
# Secrets chosen by an operator (`token add --secret-stdin`) must be at least this long.
SECRET_MIN = 32
SECRET_MAX = 512
# Matched in full (fullmatch): `$` would also match before a final newline.
# A channel pattern, or an inbox pattern ('@alice', '@*').
_PATTERN = re.compile(r"[A-Za-z0-9._*-]{1,64}|@[A-Za-z0-9._*-]{1,128}")
INBOX = "@"
_SECRET_CHARS = re.compile(r"[\x21-\x7e]+")


class TokenError(ValueError):
    """A token, a secret or a channel pattern the broker cannot accept."""


def new_secret():
    """A fresh token: 256 random bits, URL-safe, recognisable by its prefix."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def new_token_id():
    return secrets.token_hex(4)


def check_secret(secret):
    if not SECRET_MIN <= len(secret) <= SECRET_MAX or not _SECRET_CHARS.fullmatch(secret):
        raise TokenError(f"a token must be {SECRET_MIN} to {SECRET_MAX} printable ASCII characters without spaces")
    return secret


def digest(secret):
    """What the store keeps of a secret. A plain SHA-256 is enough: secrets are random and
    long, so there is no dictionary to try (a slow password hash would only slow requests)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_patterns(text):
    """'tasks, team-*' -> 'tasks,team-*'; '' grants nothing."""
    patterns = [part.strip() for part in text.split(",") if part.strip()]
    for pattern in patterns:
        if not _PATTERN.fullmatch(pattern):
            raise TokenError(
                f"{pattern!r} is not a channel pattern (letters, digits, '.', '_', '-' and '*'; '@' first for inboxes)"
            )
    return ",".join(patterns)


def matches(patterns, channel):
    return any(fnmatch.fnmatchcase(channel, pattern) for pattern in patterns.split(",") if pattern)


@dataclass(frozen=True)
class Caller:
    """The agent a valid token speaks for, and its grants."""

    agent: str
    token_id: str
    read: str
    write: str
    digest: str

    @classmethod
    def of(cls, token):
        """The caller a valid store.Token speaks for."""
        return cls(token.agent, token.id, token.read, token.write, token.hash)

    def may_read(self, channel):
        """An inbox ('@AGENT') is read by its agent, or by a token whose read grant names
        inboxes ('@AGENT', '@*'): '*' alone does not reach into other agents' inboxes."""
        if channel.startswith(INBOX):
            inboxes = ",".join(pattern for pattern in self.read.split(",") if pattern.startswith(INBOX))
            return channel[1:] == self.agent or matches(inboxes, channel)
        return matches(self.read, channel)

    def may_write(self, channel):
        return matches(self.write, channel)


@dataclass(frozen=True)
class Policy:
    """What anonymous callers may do in each mode."""

    mode: str

    @property
    def anonymous_read(self):
        return self.mode != "required"

    @property
    def anonymous_write(self):
        return self.mode == "open"
