"""GET /search: messages whose text holds the words asked for, newest first, of the
channels the caller may read."""

import functools
import re

from ..access import allow_read, readable
from ..store import SearchTerm, text_size
from .validate import LIMIT_MAX, bad_request, int_param, text_param, validate_channel

QUERY_MAX = 500
TERMS_MAX = 16
SEARCH_LIMIT_DEFAULT = 20
# A search of every channel reads at most this many matches (newest first) to fill a page
# with those the caller may read; `before` then says where to go on.
SCAN_MAX = 2000
# A word, a "quoted phrase", either ending in * for a prefix.
TERM = re.compile(r'"([^"]*)"(\*?)|(\S+)')


def register(app, broker):
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


def search(broker, terms, channel, before, limit):
    """(messages the caller may read, newest first; where the next page starts; whether
    one may follow): at most `limit` and the page budget of text (always one), from at
    most SCAN_MAX matches."""
    store, budget = broker.store, broker.settings.page_bytes
    found, spent, scanned = [], 0, 0
    while scanned < SCAN_MAX:
        batch = min(max(limit - len(found), 50), SCAN_MAX - scanned)
        matches = store.search(terms, channel, before, batch)
        scanned += len(matches)
        last = len(matches) < batch  # no match older than these
        for index, message in enumerate(matches):
            before = message.id
            if channel is None and not readable(message.channel):
                continue
            spent += text_size(message.channel, message.sender, message.message)
            found.append(message)
            if len(found) == limit or spent >= budget:
                more = not last or index < len(matches) - 1
                return found, before if more else None, more
        if last:
            return found, None, False
    return found, before, True
