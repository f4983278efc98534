"""Spreading connections over the workers.

Every worker accepts from the one listening socket the gunicorn master made, and the
worker the kernel wakes first takes the next connection. A burst of connections (32
clients opening their connections at once, agents reconnecting after a restart) could
land on one worker while the other stayed idle: in half of the publish benchmark's runs
all 32 went to one worker, which then served 2,700 to 3,300 posts a second on one core,
against some 3,900 on two when they were spread.

So each worker publishes how many connections it holds in a small table in memory
shared by the master's forks (the master gives each worker its row before it forks and
frees it when the worker is gone). A worker holding more than the least loaded other
worker that still accepts, by more than a margin, lets DEFER pass before it accepts
again, and the others take the connection meanwhile. It never refuses: after one
deferral it accepts the next connection whatever the counts, so a worker that is busy
or stuck slows accepting by at most DEFER a connection.
"""

import mmap
import os
import struct

# One row: the worker's pid (0: free; -1: given to a worker not yet started), the
# connections it holds, whether it accepts (0 once it is stopping).
_ROW = struct.Struct("<qqq")
ROWS = 32
DEFER = 0.001


def margin(least):
    """How many more connections than the least loaded worker a worker may hold before
    it defers: one, or an eighth."""
    return max(1, least // 8)


class Balance:
    def __init__(self, rows=ROWS):
        self.rows = rows
        descriptor = os.memfd_create("agent-comms-balance", os.MFD_CLOEXEC)
        try:
            os.ftruncate(descriptor, _ROW.size * rows)
            self._map = mmap.mmap(descriptor, _ROW.size * rows)
        finally:
            os.close(descriptor)
        self.row = None  # in a worker: its own
        self._deferred = False

    def _put(self, row, pid, held, accepting):
        _ROW.pack_into(self._map, row * _ROW.size, pid, held, accepting)

    # -- in the master --------------------------------------------------------------------

    def give_row(self):
        """A free row for the worker about to be forked, or None when all are taken (that
        worker then accepts as it comes, and no other waits for it)."""
        for row, (pid, _, _) in enumerate(_ROW.iter_unpack(self._map)):
            if pid == 0:
                self._put(row, -1, 0, 0)
                return row
        return None

    def free_row(self, row):
        if row is not None:
            self._put(row, 0, 0, 0)

    # -- in a worker ----------------------------------------------------------------------

    def join(self, row):
        self.row = row
        if row is not None:
            self._put(row, os.getpid(), 0, 1)

    def holding(self, held):
        """This worker now holds `held` connections."""
        if self.row is not None:
            self._put(self.row, os.getpid(), held, 1)

    def stopping(self):
        """This worker accepts no more connections: the others stop waiting for it."""
        if self.row is not None:
            self._put(self.row, os.getpid(), 0, 0)

    def should_defer(self, held):
        """Whether this worker, holding `held` connections, should let the others accept
        the next one (at most once in a row)."""
        if self.row is None or self._deferred:
            self._deferred = False
            return False
        least = None
        for row, (pid, others, accepting) in enumerate(_ROW.iter_unpack(self._map)):
            if row != self.row and pid > 0 and accepting and (least is None or others < least):
                least = others
        self._deferred = least is not None and held > least + margin(least)
        return self._deferred


_balance = None


def shared():
    """The table of this broker's workers: made in the gunicorn master (gunicorn.conf.py),
    so that every worker forked from it shares the same memory."""
    global _balance
    if _balance is None:
        _balance = Balance()
    return _balance
