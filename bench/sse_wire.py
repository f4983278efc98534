"""The wire format of a broker stream as asyncio streams hand it over: an HTTP/1.1 response
head, chunked transfer encoding, and Server-Sent Events inside it."""


class StreamError(Exception):
    """The reply is not a readable event stream."""


def parse_head(raw):
    """(status, {lower-case header: value}) from the bytes up to the blank line."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise StreamError(f"not an HTTP/1.x status line: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class ChunkedDecoder:
    """Undoes Transfer-Encoding: chunked, whatever the read boundaries."""

    def __init__(self):
        self._buffer = bytearray()
        self._left = 0  # payload bytes of the current chunk still to come
        self._crlf = False  # the current chunk's payload is done; its CRLF is due
        self.finished = False

    def feed(self, data):
        """The payload bytes that `data` completes."""
        self._buffer += data
        out = bytearray()
        while not self.finished:
            if self._crlf:
                if len(self._buffer) < 2:
                    break
                if self._buffer[:2] != b"\r\n":
                    raise StreamError("chunk not followed by CRLF")
                del self._buffer[:2]
                self._crlf = False
            elif self._left:
                if not self._buffer:
                    break
                taken = self._buffer[: self._left]
                del self._buffer[: len(taken)]
                out += taken
                self._left -= len(taken)
                self._crlf = self._left == 0
            else:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    break
                size_text = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
                del self._buffer[: end + 2]
                try:
                    self._left = int(size_text, 16)
                except ValueError:
                    raise StreamError(f"bad chunk size {size_text!r}") from None
                self.finished = self._left == 0
        return bytes(out)


class EventParser:
    """Server-Sent Events from a byte stream: each event a dict of its fields."""

    def __init__(self):
        self._buffer = b""
        self._event = {}
        self.comments = 0

    def feed(self, data):
        """The events that `data` completes."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for raw in lines:
            line = raw.decode("utf-8").rstrip("\r")
            if not line:
                if self._event:
                    events.append(self._event)
                    self._event = {}
            elif line.startswith(":"):
                self.comments += 1
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data" and "data" in self._event:
                    value = self._event["data"] + "\n" + value
                self._event[name] = value
        return events
