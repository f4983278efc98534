"""Search on PostgreSQL: a GIN index of each message's words (the 'simple' text search
configuration over agent_comms_words(): lower case, accents removed, punctuation a
separator, no stemming, no stop words, as SQLite's unicode61 tokenizer), kept by
PostgreSQL itself in every transaction that inserts or deletes. Part of the
PostgresStore (a mixin of it); every statement here.

A query is built from each term by the same functions, never from text pasted into
tsquery syntax: a phrase is phraseto_tsquery of its words, and a prefix term matches its
last word as a prefix (`word:*`, the word a literal quoted by quote_literal).
"""

import time

from .model import Found
from .postgres_schema import SEARCH_CHARS
from .postgres_sql import PAGE_COLUMNS, like
from .rows import messages_of

CONFIG = "simple"
DOCUMENT = f"to_tsvector('{CONFIG}', agent_comms_words(left(message, {SEARCH_CHARS})))"
CREATE_INDEX = f"CREATE INDEX IF NOT EXISTS message_text ON messages USING gin ({DOCUMENT})"
DROP_INDEX = "DROP INDEX IF EXISTS message_text"
SEARCH_KEPT = "SELECT kept FROM search_index"
SET_SEARCH_KEPT = "INSERT INTO search_index (kept) VALUES (%s)"
CLEAR_SEARCH_KEPT = "DELETE FROM search_index"
INDEX_EXISTS = """
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_indexes
               WHERE schemaname = current_schema() AND indexname = 'message_text')"""
# One term: the words before a prefix as a phrase, followed by the prefix.
PHRASE = f"phraseto_tsquery('{CONFIG}', agent_comms_words(%s))"
PREFIX = f"to_tsquery('{CONFIG}', quote_literal(agent_comms_words(%s)) || ':*')"
FOLLOWED_BY = "tsquery_phrase({}, {})"
# Matches, newest first, with ids from %s up to below %s; {query} is the terms' tsquery,
# {where} narrows them. The matches are found first, through the GIN index (a
# materialized CTE: a plain ORDER BY id DESC LIMIT let the planner walk the primary key
# backwards, computing every row's words, and a word said mostly long ago timed out on
# 300,000 messages), then sorted.
SELECT_MATCHES = f"""
WITH found AS MATERIALIZED (
    SELECT m.id FROM messages AS m
    WHERE to_tsvector('{CONFIG}', agent_comms_words(left(m.message, {SEARCH_CHARS}))) @@ ({{query}})
      AND m.id >= %s AND m.id < %s{{where}}
)
SELECT {PAGE_COLUMNS} FROM messages AS m JOIN found ON found.id = m.id ORDER BY m.id DESC LIMIT %s"""
IN_CHANNEL = " AND m.channel = %s"
LAST_ID = "SELECT coalesce(max(id), 0) FROM messages"
# A search stops after this long (statement_timeout), so that none holds a connection
# for long. When the whole range takes longer (a word in most messages), it looks again
# window by window from the newest, for as long again, and answers what those found
# (marked cut when time ran out first: the client pages on with `before`).
SEARCH_MILLISECONDS = 100
SEARCH_WINDOW = 5000
NEWEST = 1 << 62


def term_query(term):
    """A term's tsquery expression and its parameters."""
    words = term.text.split()
    if not term.prefix or not words:
        return PHRASE, [term.text]
    if len(words) == 1:
        return PREFIX, [words[-1]]
    return FOLLOWED_BY.format(PHRASE, PREFIX), [" ".join(words[:-1]), words[-1]]


def visible_sql(visible):
    """The SQL condition (and its parameters) that keeps the channels of a model.Visible:
    channels by pattern (never an inbox), inboxes by pattern or by name."""
    condition = """ AND ((left(m.channel, 1) != '@' AND m.channel LIKE ANY(%s))
        OR (left(m.channel, 1) = '@' AND (m.channel LIKE ANY(%s) OR m.channel = ANY(%s))))"""
    return condition, [
        [like(pattern) for pattern in visible.channels],
        [like(pattern) for pattern in visible.inboxes],
        list(visible.own),
    ]


class PostgresSearch:
    def set_search(self, enabled):
        """Keep the search index (made from the messages when it was not), or drop it.
        Whether anything changed."""

        def work(db):
            kept = db.execute(SEARCH_KEPT).fetchone()
            exists = db.execute(INDEX_EXISTS).fetchone()[0]
            if kept is not None and kept[0] == enabled and exists == enabled:
                return False
            db.execute(CREATE_INDEX if enabled else DROP_INDEX)
            db.execute(CLEAR_SEARCH_KEPT)
            db.execute(SET_SEARCH_KEPT, (enabled,))
            return True

        return self._write(work)

    def search(self, terms, channel=None, before=None, limit=50, visible=None):
        parts, params = [], []
        for term in terms:
            expression, values = term_query(term)
            parts.append(f"({expression})")
            params += values
        where, extra = (IN_CHANNEL, [channel]) if channel is not None else ("", [])
        if visible is not None:
            condition, more_params = visible_sql(visible)
            where, extra = where + condition, extra + more_params
        statement = SELECT_MATCHES.format(query=" && ".join(parts), where=where)
        below = NEWEST if before is None else before

        def matches(db, start, end, wanted, milliseconds):
            """The matches with ids in [start, end), or None when time ran out."""
            db.execute(f"SET LOCAL statement_timeout = {max(1, int(milliseconds))}")
            db.execute("SAVEPOINT search")
            try:
                return db.execute(statement, [*params, start, end, *extra, wanted]).fetchall()
            except self._psycopg.errors.QueryCanceled:
                db.execute("ROLLBACK TO search")
                return None

        def work(db):
            rows = matches(db, 0, below, limit, SEARCH_MILLISECONDS)
            if rows is not None:
                return Found(messages_of(db, self.sql, rows, time.time(), self.max_attempts), False)
            started = time.monotonic()  # the windows get as long again
            rows, end = [], min(below, db.execute(LAST_ID).fetchone()[0] + 1)
            while end > 0 and len(rows) < limit:
                left = SEARCH_MILLISECONDS - 1000 * (time.monotonic() - started)
                found = matches(db, max(0, end - SEARCH_WINDOW), end, limit - len(rows), left) if left >= 1 else None
                if found is None:
                    break
                rows += found
                end -= SEARCH_WINDOW
            # Cut when time ran out before the oldest window and the page was not full.
            cut = end > 0 and len(rows) < limit
            return Found(messages_of(db, self.sql, rows, time.time(), self.max_attempts), cut)

        return self._read(work)
