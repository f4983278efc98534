"""GET /search: messages whose text holds the words asked for, newest first, of the
channels the caller may read."""

import functools
import re

from bottle import HTTPError, request

from .. import auth
from ..access import PRIVATE_INBOXES, allow_read, caller
from ..store import SearchTerm, Visible, text_size
from .validate import LIMIT_MAX, bad_request, int_param, text_param, validate_channel

QUERY_MAX = 500
TERMS_MAX = 16
SEARCH_LIMIT_DEFAULT = 20
# A word or phrase ending in * matches the words that start with it: at least this many
# characters of it, and at most PREFIXES_MAX such terms (each may stand for thousands of
# words, which the index reads and merges).
PREFIX_MIN = 3
PREFIXES_MAX = 4
# A word, a "quoted phrase", either ending in * for a prefix.
TERM = re.compile(r'"([^"]*)"(\*?)|(\S+)')


def register(app, broker):
    if broker.settings.search:
        app.get("/search", callback=functools.partial(get_search, broker))


def parse_query(query):
    """Search terms from what a person types: words, all of which must match; "a phrase"
    in quotes, whose words must follow each other; a trailing * for words that start so.
    Case and accents do not count. Punctuation alone is no word, and is dropped."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in query):
        raise bad_request("q must not hold control characters")
    terms = []
    for phrase, phrase_star, word in TERM.findall(query):
        text, prefix = (phrase, bool(phrase_star)) if not word else (word.rstrip("*"), word.endswith("*"))
        if any(ch.isalnum() for ch in text):
            terms.append(SearchTerm(text, prefix))
    if not terms:
        raise bad_request("q holds no word to search for (letters or digits)")
    prefixes = [term for term in terms if term.prefix]
    if any(sum(ch.isalnum() for ch in term.text) < PREFIX_MIN for term in prefixes):
        raise bad_request(f"a word ending in * needs at least {PREFIX_MIN} letters or digits before the *")
    if len(prefixes) > PREFIXES_MAX:
        raise bad_request(f"q holds at most {PREFIXES_MAX} words ending in *")
    if len(terms) > TERMS_MAX:
        raise bad_request(f"q holds at most {TERMS_MAX} words or phrases")
    return terms


def get_search(broker):
    query = text_param("q", QUERY_MAX)
    if query is None or not query.strip():
        raise bad_request("give q: the words to search for, e.g. /search?q=deploy+failed")
    terms = parse_query(query)
    channel = text_param("channel")
    if channel is not None:
        validate_channel(channel)
        allow_read(channel)
    limit = int_param("limit", 1, LIMIT_MAX) or SEARCH_LIMIT_DEFAULT
    before = int_param("before", 1)
    broker.touch_reader()
    found, before, more = search(broker, terms, channel, before, limit)
    return {
        "query": query,
        "channel": channel,
        "messages": [message.as_dict() for message in found],
        "count": len(found),
        "before": before,
        "more": more,
    }


def visible_to_caller():
    """What a search of every channel may return to this request: its token's read
    grants (an inbox only by a pattern naming inboxes, or its own), or without a token
    every channel and, where inboxes are private, no inbox."""
    who = caller()
    if who is not None:
        patterns = [pattern for pattern in who.read.split(",") if pattern]
        return Visible(
            channels=tuple(p for p in patterns if not p.startswith(auth.INBOX)),
            inboxes=tuple(p for p in patterns if p.startswith(auth.INBOX)),
            own=(auth.INBOX + who.agent,),
        )
    private = request.environ.get(PRIVATE_INBOXES)
    return Visible(channels=("*",), inboxes=() if private else ("@*",))


def search(broker, terms, channel, before, limit):
    """(messages the caller may read, newest first; where the next page starts; whether
    one may follow): at most `limit` and the page budget of text (always one). Only what
    the caller may read is ever looked at, so nothing of the reply tells of the rest."""
    visible = None if channel is not None else visible_to_caller()
    found = broker.store.search(terms, channel, before, limit + 1, visible)
    if found.cut and not found.messages:
        raise HTTPError(
            400,
            "this search found nothing within the time a search may take: add words, make * prefixes longer, "
            "or give channel=",
        )
    page, spent = [], 0
    for message in found.messages[:limit]:
        page.append(message)
        spent += text_size(message.channel, message.sender, message.message)
        if spent >= broker.settings.page_bytes:
            break
    more = found.cut or len(found.messages) > len(page)
    return page, page[-1].id if more else None, more
