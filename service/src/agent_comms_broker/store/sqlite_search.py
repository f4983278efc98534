"""Search on SQLite: message text through the FTS5 index schema.py keeps in step with the
messages table. Part of the Store (a mixin of it); every statement here."""

import sqlite3
import time

from .model import Found
from .rows import messages_of
from .schema import (
    EMPTY_SEARCH,
    INDEX_NEW,
    REBUILD_SEARCH,
    SEARCH_TRIGGER_NAMES,
    SEARCH_TRIGGERS,
    START_SEARCH_INDEX,
)
from .sqlite_sql import PAGE_COLUMNS

# Matches of a MATCH expression, newest first, below an id; {where} narrows them: to one
# channel, or to the channels a caller may read.
SELECT_MATCHES = f"""
SELECT {PAGE_COLUMNS} FROM message_text CROSS JOIN messages AS m ON m.id = message_text.rowid
WHERE message_text MATCH ? AND message_text.rowid < ?{{where}}
ORDER BY message_text.rowid DESC LIMIT ?"""
IN_CHANNEL = " AND m.channel = ?"
# A search stops once SQLite has run this many thousand steps of its program (the
# progress handler's count), so that no search holds a worker for long: about 0.1 s.
SEARCH_STEPS = 4000
# No id is this large: the first page of a search starts below it.
NEWEST = 1 << 62


def match_expression(terms):
    """An FTS5 MATCH expression for search terms (model.SearchTerm): each term a quoted
    string, so nothing a user types reads as FTS5 syntax; all of them must match."""
    parts = []
    for term in terms:
        quoted = '"' + term.text.replace('"', '""') + '"'
        parts.append(quoted + " *" if term.prefix else quoted)
    return " AND ".join(parts)


def visible_sql(visible):
    """The SQL condition (and its parameters) that keeps the channels of a model.Visible:
    channels by pattern (never an inbox), inboxes by pattern or by name."""
    channels = " OR ".join(["m.channel GLOB ?"] * len(visible.channels)) or "0"
    inboxes = " OR ".join(["m.channel GLOB ?"] * len(visible.inboxes) + ["m.channel = ?"] * len(visible.own))
    inboxes = inboxes or "0"
    condition = (
        f" AND ((substr(m.channel, 1, 1) != '@' AND ({channels})) OR (substr(m.channel, 1, 1) = '@' AND ({inboxes})))"
    )
    return condition, [*visible.channels, *visible.inboxes, *visible.own]


PRESENT_TRIGGERS = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name IN (?, ?, ?)"
SEARCH_IS_ON = "SELECT count(*) FROM search_index"


class Search:
    def set_search(self, enabled):
        """Keep the search index (its triggers and its search_index row in place; rebuilt
        from the messages when they were not), or not (triggers dropped, index emptied:
        posts skip its cost). Whether anything changed."""

        def work(db):
            present = {row[0] for row in db.execute(PRESENT_TRIGGERS, SEARCH_TRIGGER_NAMES)}
            rows = db.execute(SEARCH_IS_ON).fetchone()[0]
            if enabled and present == set(SEARCH_TRIGGER_NAMES) and rows == 1:
                return False
            if not enabled and not present and rows == 0:
                return False
            for name in present:
                db.execute(f"DROP TRIGGER {name}")
            db.execute("DELETE FROM search_index")
            if enabled:
                for statement in SEARCH_TRIGGERS:
                    db.execute(statement)
                db.execute(REBUILD_SEARCH)
                db.execute(START_SEARCH_INDEX)
            else:
                db.execute(EMPTY_SEARCH)
            return True

        return self._write(work)

    def _index_new(self, db):
        """Add the messages the index does not hold yet (this transaction's), when search
        is on: the store runs this just before committing a transaction that inserted."""
        for statement in INDEX_NEW:
            db.execute(statement)

    def search(self, terms, channel=None, before=None, limit=50, visible=None):
        expression = match_expression(terms)
        where, extra = (IN_CHANNEL, [channel]) if channel is not None else ("", [])
        if visible is not None:
            condition, more_params = visible_sql(visible)
            where, extra = where + condition, extra + more_params
        statement = SELECT_MATCHES.format(where=where)
        params = [expression, NEWEST if before is None else before, *extra, limit]

        def work(db):
            steps = [0]

            def over():
                steps[0] += 1
                return steps[0] > SEARCH_STEPS

            rows, cut = [], False
            db.set_progress_handler(over, 1000)
            try:
                for row in db.execute(statement, params):
                    rows.append(row)
            except sqlite3.OperationalError:
                if steps[0] <= SEARCH_STEPS:
                    raise
                cut = True  # the search took its time: what it found so far
            finally:
                db.set_progress_handler(None, 0)
            return Found(messages_of(db, self.sql, rows, time.time(), self.max_attempts), cut)

        return self._read(work)
