"""Search on SQLite: message text through the FTS5 index schema.py keeps in step with the
messages table. Part of the Store (a mixin of it); every statement here."""

import time

from .sqlite_rows import PAGE_COLUMNS, messages_of

# Matches of a MATCH expression, newest first, below an id; {channel} narrows to one channel.
SELECT_MATCHES = f"""
SELECT {PAGE_COLUMNS} FROM message_text CROSS JOIN messages AS m ON m.id = message_text.rowid
WHERE message_text MATCH ? AND message_text.rowid < ?{{channel}}
ORDER BY message_text.rowid DESC LIMIT ?"""
IN_CHANNEL = " AND m.channel = ?"
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


class Search:
    def search(self, terms, channel=None, before=None, limit=50):
        expression = match_expression(terms)
        statement = SELECT_MATCHES.format(channel=IN_CHANNEL if channel is not None else "")
        params = [expression, NEWEST if before is None else before]
        if channel is not None:
            params.append(channel)
        params.append(limit)

        def work(db):
            rows = db.execute(statement, params).fetchall()
            return messages_of(db, rows, time.time(), self.max_attempts)

        return self._read(work)
