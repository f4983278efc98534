"""How agent-chat prints: lines and aligned tables for people, JSON for programs.

Everything a broker sends is untrusted: a sender, a channel name or a message could carry
terminal escapes (ESC, BEL, C1 controls), a carriage return that redraws a line, or Unicode
bidi overrides that reorder it. People see such characters as escapes (\\x1b, \\u202e);
JSON output escapes them too (\\u001b, \\u202e), which JSON parsers read back exactly."""

import json
import re
import sys
import time
import unicodedata

# Unicode categories never printed raw: controls (C0, DEL, C1), format characters (bidi
# overrides and isolates, zero-width characters, tags), lone surrogates, and the line and
# paragraph separators.
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# In message text only: the zero-width non-joiner and joiner shape Persian and Indic scripts
# and join emoji sequences; they cannot move the cursor or reorder anything.
MESSAGE_KEEPS = frozenset("\t\u200c\u200d")
# A message's own lines (and lines folded to the terminal's width) are indented by this, so
# no line of a message can start where a "[time] sender: ..." line starts.
INDENT = "    "
# The states of a task, in the order `queue` prints their counts.
TASK_STATES = ("pending", "claimed", "done", "dead")

_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
_NOT_ASCII_OR_DEL = re.compile(r"[^\x00-\x7e]")
_LINE_BREAK = re.compile(r"\r\n|\n")
_hidden_cache = {}


def _hidden(char):
    hidden = _hidden_cache.get(char)
    if hidden is None:
        hidden = _hidden_cache[char] = unicodedata.category(char) in HIDDEN_CATEGORIES
    return hidden


def _escape(char):
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text, keep=frozenset()):
    """`text` with every control, format or separator character shown as an escape."""
    text = str(text)
    if text.isprintable():  # the common case, at C speed: nothing to escape
        return text

    def shown(found):
        char = found.group()
        return _escape(char) if char not in keep and _hidden(char) else char

    return _NOT_PRINTABLE_ASCII.sub(shown, text)


def json_line(value, ascii_only=False):
    """`value` as one line of JSON, with the characters `visible` escapes written as JSON
    escapes, so the line is safe on a terminal and decodes to exactly `value`. Those
    characters can only occur inside JSON strings, where an escape means the same."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    if text.isascii() and "\x7f" not in text:
        return text

    def escaped(found):
        char = found.group()
        if not _hidden(char):
            return char
        data = char.encode("utf-16-be", "surrogatepass")
        return "".join(f"\\u{int.from_bytes(data[i : i + 2], 'big'):04x}" for i in range(0, len(data), 2))

    return _NOT_ASCII_OR_DEL.sub(escaped, text)


def _columns(char, column):
    """Terminal columns `char` takes at `column`, never fewer than a terminal uses: an
    ASCII character one, a tab up to the next multiple of 8, anything else two."""
    if char == "\t":
        return 8 - column % 8
    return 1 if " " <= char <= "~" else 2


def fold(line, width):
    """`line` cut into pieces of at most `width` terminal columns, the pieces after the
    first indented: the terminal never wraps a line itself, so a long message cannot
    wrap into what looks like a line of its own."""
    width = max(width, len(INDENT) + 8)
    pieces, piece, column = [], [], 0
    for char in line:
        taken = _columns(char, column)
        if column + taken > width and column > len(INDENT):
            pieces.append("".join(piece))
            piece, column = [INDENT], len(INDENT)
            taken = _columns(char, column)
        piece.append(char)
        column += taken
    pieces.append("".join(piece))
    return pieces


def _when(timestamp):
    if timestamp is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    except (TypeError, ValueError, OverflowError, OSError):
        return visible(timestamp)


def _utf8(stream):
    return (getattr(stream, "encoding", None) or "").lower().replace("-", "") in ("utf8", "utf8sig")


# What a message's line shows after its sender: its signature's mark (signed.py), and
# whether it was sealed. An unsigned message shows none, as before signatures.
MARKS = {"verified": " [verified]", "bad": " [BAD SIGNATURE]", "key-changed": " [KEY CHANGED]"}
SEALED_MARKS = {"opened": " [sealed]"}


class Printer:
    def __init__(self, as_json=False, stream=None, reading=None):
        self.as_json = as_json
        self.stream = stream or sys.stdout
        # Applied to each message before it prints: marks, opens, or drops it (None).
        self.reading = reading
        # A message is folded to the terminal's width only on a terminal.
        self.width = None
        if not as_json and self.stream.isatty():
            import shutil

            self.width = shutil.get_terminal_size().columns - 1

    def _print(self, text):
        print(text, file=self.stream, flush=True)

    def _json(self, value):
        # On a stream that cannot take UTF-8, every non-ASCII character is escaped: still exact.
        self._print(json_line(value, ascii_only=not _utf8(self.stream)))

    def _table(self, headers, rows):
        rows = [[visible(cell) for cell in row] for row in rows]
        widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
        for row in [headers, *rows]:
            self._print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

    def sent(self, stored):
        if self.as_json:
            self._json(stored)
        else:
            self._print(visible(stored["id"]))

    def message(self, message, where=False):
        """A message; with `where`, its channel and id after the time. Returns it as
        printed (checked, opened), or None if it was dropped (reading)."""
        if self.reading is not None:
            message = self.reading(message)
            if message is None:
                return None
        if self.as_json:
            self._json(message)
        else:
            self._show(message, where)
        return message

    def _show(self, message, where=False):
        """A message, checked already, as lines for people."""
        header = f"[{_when(message.get('timestamp'))}] "
        if where:
            header += f"{visible(message.get('channel'))} #{visible(message.get('id'))} "
        marks = MARKS.get(message.get("verification"), "") + SEALED_MARKS.get(message.get("sealed"), "")
        header += f"{visible(message.get('sender'))}{marks}: "
        text = message.get("message")
        if message.get("sealed") == "locked":
            text = f"(sealed for {(message.get('meta') or {}).get('sealed', {}).get('to')}: it does not open here)"
        lines = _LINE_BREAK.split(str(text))
        shown = [header + visible(lines[0], MESSAGE_KEEPS)]
        shown += [INDENT + visible(line, MESSAGE_KEEPS) for line in lines[1:]]
        if self.width is not None:
            shown = [piece for line in shown for piece in fold(line, self.width)]
        self._print("\n".join(shown))

    def messages(self, messages):
        for message in messages:
            self.message(message)

    def found(self, messages):
        """Search results, newest first, each with where it was said."""
        for message in messages:
            self.message(message, where=True)

    def line(self, text):
        """A line of a command's own (keys), in JSON as {"note": text}."""
        if self.as_json:
            return self._json({"note": text})
        self._print(visible(text))

    def keys(self, reply, line=None, pinned=None):
        """An agent's keys: the current one and those it replaced; `pinned`: the keys this
        reader pinned for it."""
        if self.as_json:
            return self._json(reply if pinned is None else {**reply, "pinned": pinned})
        if line:
            self._print(visible(line))
        rows = []
        for key in reply.get("keys") or []:
            state = "current" if key.get("replaced") is None else f"replaced {_when(key.get('replaced'))}"
            trusted = "-" if pinned is None else ("yes" if key.get("sign") in pinned else "NO")
            rows.append(
                (key.get("sign"), key.get("box") or "-", key.get("source"), _when(key.get("added")), state, trusted)
            )
        self._table(("SIGN KEY", "BOX KEY", "FROM", "ADDED", "STATE", "PINNED"), rows)
        if reply.get("changes"):
            self._print(visible(f"{reply.get('agent')}'s keys changed {reply['changes']} time(s)"))

    def channels(self, reply):
        if self.as_json:
            return self._json(reply)
        rows = [(c["name"], c["message_count"], _when(c["last_activity"])) for c in reply["channels"]]
        self._table(("CHANNEL", "MESSAGES", "LAST ACTIVITY"), rows)

    def agents(self, reply):
        if self.as_json:
            return self._json(reply)
        rows = [
            (
                a["id"],
                "active" if a.get("active") else "idle",
                a.get("message_count", 0),
                _when(a.get("first_seen")),
                _when(a.get("last_seen")),
            )
            for a in reply["agents"]
        ]
        self._table(("AGENT", "STATUS", "MESSAGES", "FIRST SEEN", "LAST SEEN"), rows)

    def status(self, reply):
        if self.as_json:
            return self._json(reply)
        keys = {key: visible(key) + ":" for key in reply}
        width = max((len(key) for key in keys.values()), default=0) + 1
        for key, value in reply.items():
            self._print(f"{keys[key]:<{width}}  {visible(value)}")

    def task(self, taken):
        """A task handed to this agent (take): a line on its claim, then the message."""
        if self.reading is not None:
            taken = self.reading(taken)
            if taken is None:
                return
        if self.as_json:
            return self._json(taken)
        claim = taken.get("claim") or {}
        self._print(
            f"task {visible(taken.get('id'))} of {visible(taken.get('channel'))}: "
            f"attempt {visible(claim.get('attempt'))}, yours until {_when(claim.get('expires'))}"
        )
        self._show(taken)

    def task_state(self, task_id, answer, why=None):
        """Where a task stands after done or release: "task 42: done, reply 57"."""
        if self.as_json:
            return self._json(answer)
        task = answer.get("task") or {}
        line = f"task {visible(task_id)}: {visible(task.get('state'))}"
        reply = answer.get("reply")
        if isinstance(reply, dict):
            line += f", reply {visible(reply.get('id'))}"
        elif task.get("state") != "done":
            line += f", attempt {visible(task.get('attempt'))}"
        self._print(line + (f" ({visible(why)})" if why else ""))

    def queue(self, reply):
        """A queue's counts by state, then its claimed and dead tasks."""
        if self.as_json:
            return self._json(reply)
        counts = reply.get("counts") or {}
        self._print("  ".join(f"{state} {visible(counts.get(state, 0))}" for state in TASK_STATES))
        rows = [
            (t.get("id"), "claimed", t.get("agent"), _when(t.get("expires")), t.get("attempt"))
            for t in reply.get("claimed") or []
        ]
        rows += [(t.get("id"), "dead", t.get("agent") or "-", "-", t.get("attempt")) for t in reply.get("dead") or []]
        if rows:
            self._table(("TASK", "STATE", "AGENT", "EXPIRES", "ATTEMPT"), rows)
