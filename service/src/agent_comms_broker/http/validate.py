"""Request parsing and validation: channels, agent ids, cursors, query values and bodies.
Every refusal is an HTTPError with a message a client can act on."""

import datetime
import json
import math
import re
import unicodedata

import orjson
from bottle import HTTPError, request

from ..store import Post
from ..store.model import DEFAULT_PRIORITY
from .body import BodyError

# Matched in full (fullmatch): `$` would also match before a final newline.
# A channel, or an agent's inbox: '@' and the agent's id (ids that fit this pattern only).
CHANNEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}|@[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
AGENT_ID_MAX = 128
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Unicode categories a name may not hold: controls (C0, DEL, C1), invisible format
# characters (bidi overrides and isolates, zero-width spaces...), line and paragraph
# separators, surrogates. Each could hide or reorder text, or break a line.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# Format characters emoji sequences and some scripts need: zero-width (non-)joiners.
_JOINERS = frozenset("\u200c\u200d")
_DIGITS = re.compile(r"[0-9]{1,20}")
LIMIT_DEFAULT = 50
LIMIT_MAX = 1000
# SQLite's largest integer: no cursor can be past it.
ID_MAX = 2**63 - 1


def bad_request(text):
    return HTTPError(400, text)


def validate_channel(channel):
    if not CHANNEL_PATTERN.fullmatch(channel):
        raise bad_request(
            "invalid channel name: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(or '@' and an agent id of up to 128 of them, for its inbox)"
        )
    return channel


def validate_agent_id(value, what):
    if not isinstance(value, str):
        raise bad_request(f"{what} must be a string")
    if not value or len(value) > AGENT_ID_MAX or not _printable_name(value):
        raise bad_request(
            f"{what} must be 1 to {AGENT_ID_MAX} characters, without control characters or invisible "
            "formatting (bidi overrides, zero-width spaces, line separators)"
        )
    if value != value.strip():
        raise bad_request(f"{what} must not begin or end with spaces")
    return value


# Characters that show as nothing (Unicode's default-ignorable code points), and blanks
# that are not spaces to str.isspace (Hangul fillers, the braille blank): a name differs
# from another by them without looking different.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)


_SPACES = re.compile(r"\s+")


def look_alike(name):
    """What a name looks like: compatibility forms folded (NFKC), case folded, what shows
    as nothing or as blank removed, runs of spaces made one. Two names that give the same
    are look-alikes."""
    folded = _INVISIBLE.sub("", unicodedata.normalize("NFKC", name).casefold())
    return _SPACES.sub(" ", folded).strip()


def _printable_name(value):
    if value.isascii():
        return _ASCII_CONTROL.search(value) is None
    return not any(unicodedata.category(ch) in _REFUSED_CATEGORIES and ch not in _JOINERS for ch in value)


def _require_unicode(value, what):
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{what} is not valid Unicode (lone surrogate)") from None


def whole_number(raw, name, low, high=ID_MAX):
    value = int(raw) if _DIGITS.fullmatch(raw) else None
    if value is None or not low <= value <= high:
        raise bad_request(f"{name} must be a whole number from {low} to {high}")
    return value


def given_cursor(store, cursor, name):
    """A cursor the broker can have given: not past the largest id it ever gave. One past
    it would silently skip every message until ids caught up (a made-up cursor, or one
    kept from before a database was restored from an older backup)."""
    if cursor is not None and cursor > (last := store.last_given_id()):
        raise bad_request(
            f"{name} {cursor} is past the newest message id this broker has given ({last}): continue "
            "from a cursor it gave you, or start again without one (was the database restored?)"
        )
    return cursor


def header(name):
    """A request header as text, or None. HTTP carries bytes: one that is not UTF-8 is the
    client's mistake (400), never the broker's."""
    try:
        return request.headers.get(name)
    except UnicodeDecodeError:
        raise bad_request(f"the {name} header is not valid UTF-8") from None


def text_param(name, longest=AGENT_ID_MAX):
    """A query parameter as text (UTF-8 in the URL), or None."""
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = raw.encode("latin-1").decode("utf-8")  # the WSGI server decoded it as latin-1
    except UnicodeError:
        raise bad_request(f"{name} is not valid UTF-8") from None
    if len(value) > longest:
        raise bad_request(f"{name} must be at most {longest} characters")
    return value


def int_param(name, low, high=ID_MAX):
    raw = request.query.get(name)
    return None if raw is None else whole_number(raw, name, low, high)


def parse_timestamp(raw, name="since"):
    """Unix seconds as a number, or an ISO 8601 time (naive means UTC, as the seed's were)."""
    try:
        value = float(raw)
    except ValueError:
        try:
            moment = datetime.datetime.fromisoformat(raw.strip())
        except ValueError:
            raise bad_request(f"{name} must be unix seconds (e.g. 1732406400.5) or an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        value = moment.timestamp()
    if not math.isfinite(value) or value < 0:
        raise bad_request(f"{name} must be a finite number of 0 or more (1970 or later)")
    return value


def wait_param(max_wait):
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise bad_request("wait must be a number of seconds, 0 or more")
    return min(value, max_wait)


def read_json_body(max_body):
    """The request body parsed as JSON, within the size limit."""
    length = request.content_length
    if length > max_body:
        raise HTTPError(413, f"request body is over the limit of {max_body} bytes")
    stream = request.environ["wsgi.input"]
    try:
        raw = stream.read(length) if length >= 0 else stream.read(max_body + 1)
    except BodyError as error:
        raise HTTPError(error.status, str(error)) from None
    if len(raw) > max_body:
        raise HTTPError(413, f"request body is over the limit of {max_body} bytes")
    if not raw.strip():
        raise bad_request('request body is empty: send JSON {"sender": "...", "message": "..."}')
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise bad_request(f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise bad_request("request body is not valid JSON: nested too deeply") from None


def optional_json_object(max_body):
    """The JSON object a request may send; none sent: {}."""
    if request.content_length == 0 or (request.content_length < 0 and not request.headers.get("Transfer-Encoding")):
        return {}
    body = read_json_body(max_body)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


# Optional fields of a post.
MAX_TAGS = 10
TAG_MAX = 32
META_MAX = 4096
KEY_MAX = 128
PRIORITY_RANGE = (1, 5)


def validate_post(item, max_message, channel, caller=None, where=""):
    """The Post of one post's JSON. With a token the sender is the token's agent: it may be
    left out, and naming another agent is refused."""
    if not isinstance(item, dict):
        raise bad_request(f'{where}must be a JSON object {{"sender": "...", "message": "..."}}')
    if "sender" not in item and caller is None:
        raise bad_request(f"{where}missing field: sender")
    if "message" not in item:
        raise bad_request(f"{where}missing field: message")
    if "sender" in item:
        sender = validate_agent_id(item["sender"], f"{where}sender")
        if caller is not None and sender != caller.agent:
            raise HTTPError(403, f"{where}this token belongs to agent {caller.agent!r}: it cannot post as {sender!r}")
    else:
        sender = caller.agent
    text = item["message"]
    if not isinstance(text, str):
        raise bad_request(f"{where}message must be a string")
    if not text:
        raise bad_request(f"{where}message must not be empty")
    _require_unicode(text, f"{where}message")
    if len(text) > max_message // 4 and len(text.encode()) > max_message:
        raise HTTPError(413, f"{where}message is over the limit of {max_message} bytes")
    return Post(
        channel,
        sender,
        text,
        reply_to=_optional_int(item, "reply_to", 1, ID_MAX, where),
        priority=_optional_int(item, "priority", *PRIORITY_RANGE, where) or DEFAULT_PRIORITY,
        tags=validate_tags(item.get("tags"), where),
        meta=_meta(item.get("meta"), where),
        key=validate_key(item.get("key"), f"{where}key"),
        signature=_signature(item.get("signature"), where),
    )


def _signature(envelope, where):
    """A post's signature, checked for form, as JSON text; None if it has none."""
    if envelope is None:
        return None
    from ..signing import SignatureError, envelope_text

    try:
        return envelope_text(envelope)
    except SignatureError as error:
        raise bad_request(f"{where}{error}") from None


def _optional_int(item, name, low, high, where):
    value = item.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"{where}{name} must be a whole number from {low} to {high}")
    return value


def validate_tags(tags, where=""):
    """A post's tags: up to MAX_TAGS names of 1 to TAG_MAX printable characters; repeats
    are kept once."""
    if tags is None:
        return ()
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise bad_request(f"{where}tags must be a list of at most {MAX_TAGS} strings")
    for tag in tags:
        validate_tag(tag, f"{where}tag")
    return tuple(dict.fromkeys(tags))


def validate_tag(tag, what="tag"):
    if not isinstance(tag, str) or not 1 <= len(tag) <= TAG_MAX or not _printable_name(tag) or tag != tag.strip():
        raise bad_request(
            f"{what} must be 1 to {TAG_MAX} characters, without control or invisible characters or spaces at either end"
        )
    return tag


def _meta(meta, where):
    """A post's meta object as compact JSON text, at most META_MAX bytes; None if none."""
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise bad_request(f"{where}meta must be a JSON object")
    try:
        encoded = orjson.dumps(meta)
    except orjson.JSONEncodeError as error:
        raise bad_request(f"{where}meta cannot be stored: {error}") from None
    if len(encoded) > META_MAX:
        raise bad_request(f"{where}meta is {len(encoded)} bytes as JSON, over the limit of {META_MAX}")
    return encoded.decode() if meta else None


def validate_key(key, what="key"):
    """An idempotency key: 1 to KEY_MAX printable characters (None: no key)."""
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= KEY_MAX or not _printable_name(key) or key != key.strip():
        raise bad_request(f"{what} must be 1 to {KEY_MAX} printable characters, without spaces at either end")
    return key
