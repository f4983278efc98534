"""The request body as the app reads it (wsgi.input): gunicorn's reader of the socket,
within a deadline. Used by the worker, so nothing here imports Bottle (see worker.py)."""

import time

from gunicorn.http.errors import NoMoreData, ParseException

# A body the application left unread is read and thrown away up to this many bytes (and
# within the request timeout) before the connection closes; past it, it just closes.
DRAIN_MAX = 64 << 20


class BodyError(Exception):
    """Reading the request body failed: too slow (408) or malformed (400). The app
    answers it; the worker closes the connection after the answer."""

    def __init__(self, status, text):
        super().__init__(text)
        self.status = status


class RequestBody:
    """gunicorn's body reader within a deadline: a client too slow (or a malformed body)
    is a BodyError the app answers with 408 (or 400). `connection` is the worker's record
    of the connection (`evicted` is set when the worker closes its reading side), and
    `waiting_on(connection, timeout)` the worker's context for a wait on the client."""

    def __init__(self, body, deadline, timeout, connection, waiting_on):
        self.body = body
        self.deadline = deadline
        self.timeout = timeout
        self.connection = connection
        self.waiting_on = waiting_on
        self.failed = False

    def read(self, size=None):
        return self._guarded(self.body.read, size)

    def readline(self, size=None):
        return self._guarded(self.body.readline, size)

    def readlines(self, hint=None):
        return self._guarded(self.body.readlines, hint)

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _guarded(self, read, size):
        remaining = self.deadline - time.monotonic()
        if self.failed or remaining <= 0 or self.connection.evicted:
            self.failed = True
            raise self._too_slow()
        try:
            with self.waiting_on(self.connection, remaining):
                return read(size)
            self.failed = True
            raise self._too_slow()
        except (ParseException, NoMoreData, OSError) as error:
            self.failed = True
            if self.connection.evicted or isinstance(error, TimeoutError):
                raise self._too_slow() from None
            raise BodyError(400, f"the request body is malformed or incomplete: {error}") from None

    def _too_slow(self):
        return BodyError(408, f"the request body did not arrive within {self.timeout:g} s")

    def drain(self):
        """Read what the app left of the body and throw it away (within the deadline and
        DRAIN_MAX). True if the body is all read, so the connection can serve another."""
        if self.failed:
            return False
        taken = 0
        try:
            with self.waiting_on(self.connection, max(0.0, self.deadline - time.monotonic())):
                while taken <= DRAIN_MAX:
                    data = self.body.read(65536)
                    if not data:
                        return True
                    taken += len(data)
        except (ParseException, NoMoreData, OSError):
            pass
        return False
