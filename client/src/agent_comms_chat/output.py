"""How agent-chat prints: lines and aligned tables for people, JSON for programs."""

import json
import sys
import time


def _when(timestamp):
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _table(headers, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


class Printer:
    def __init__(self, as_json=False, stream=None):
        self.as_json = as_json
        self.stream = stream or sys.stdout

    def _json(self, value):
        print(json.dumps(value, ensure_ascii=False), file=self.stream, flush=True)

    def sent(self, stored):
        if self.as_json:
            self._json(stored)
        else:
            print(stored["id"], file=self.stream)

    def message(self, message):
        if self.as_json:
            self._json(message)
            return
        text = message["message"].replace("\n", "\n    ")
        print(f"[{_when(message['timestamp'])}] {message['sender']}: {text}", file=self.stream, flush=True)

    def messages(self, messages):
        for message in messages:
            self.message(message)

    def channels(self, reply):
        if self.as_json:
            return self._json(reply)
        rows = [(c["name"], c["message_count"], _when(c["last_activity"])) for c in reply["channels"]]
        _table(("CHANNEL", "MESSAGES", "LAST ACTIVITY"), rows)

    def agents(self, reply):
        if self.as_json:
            return self._json(reply)
        rows = [
            (
                a["id"],
                "active" if a.get("active") else "idle",
                a.get("message_count", 0),
                _when(a.get("first_seen")),
                _when(a["last_seen"]),
            )
            for a in reply["agents"]
        ]
        _table(("AGENT", "STATUS", "MESSAGES", "FIRST SEEN", "LAST SEEN"), rows)

    def status(self, reply):
        if self.as_json:
            return self._json(reply)
        width = max(len(key) for key in reply) + 1
        for key, value in reply.items():
            print(f"{key + ':':<{width}}  {value}", file=self.stream)
