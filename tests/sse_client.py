"""A small Server-Sent Events reader over requests, for tests: yields (field dict) events
and the comment lines it saw, so keep-alives can be asserted."""

import json

import requests


class EventStream:
    def __init__(self, url, last_event_id=None, session=None, timeout=10, params=None):
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self.response = (session or requests).get(url, headers=headers, stream=True, timeout=timeout, params=params)
        self.response.raise_for_status()
        self._chunks = self.response.iter_content(chunk_size=None)
        self._buffer = b""
        self.comments = []

    def _lines(self):
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                yield line.decode()
            chunk = next(self._chunks, None)
            if chunk is None:
                if self._buffer:
                    yield self._buffer.decode()
                return
            self._buffer += chunk

    def events(self):
        """Each event as a dict of its fields ('id', 'event', 'data', 'retry')."""
        event = {}
        for line in self._lines():
            if line == "":
                if event:
                    yield event
                event = {}
            elif line.startswith(":"):
                self.comments.append(line)
            else:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                event[field] = event[field] + "\n" + value if field == "data" and field in event else value

    def messages(self, count):
        """The next `count` message events, decoded."""
        found = []
        for event in self.events():
            if "data" in event and event.get("event", "message") == "message":
                found.append(json.loads(event["data"]))
                if len(found) == count:
                    break
        return found

    def close(self):
        self.response.close()
