"""Abuse limits every gunicorn worker shares: token buckets per agent (or address), of
requests and of bytes stored, and what each agent holds: its open streams and the bytes of
its requests and replies in flight.

The counters live in one shared memory file the master makes before it forks, so a limit
holds however many workers there are. A process-shared semaphore (multiprocessing's Lock)
guards it: taken and given back in user space when no other worker holds it, with no
system call and without letting go of the interpreter lock (a POSIX record lock cost two
system calls per use, six uses per post). A worker that dies holding it cannot give it
back: after LOCK_WAIT the others take it over, as no worker holds it that long otherwise.
"""

import functools
import hashlib
import logging
import math
import mmap
import multiprocessing
import os
import resource
import struct
import time

log = logging.getLogger("agent_comms_broker.limits")

# One slot: key (a 64-bit hash; 0 = free), owner pid (streams only), two numbers.
_SLOT = struct.Struct("<Qqdd")
BUCKET_SETS = 4096
BUCKET_WAYS = 8
STREAM_SETS = 1024
STREAM_WAYS = 16
# No worker holds the lock for more than microseconds: one that waited this long for it
# takes it over from a worker that died holding it.
LOCK_WAIT = 0.5


@functools.lru_cache(maxsize=4096)
def key_of(text):
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return value or 1


class SharedLimits:
    def __init__(self):
        size = _SLOT.size * (BUCKET_SETS * BUCKET_WAYS + STREAM_SETS * STREAM_WAYS)
        self._fd = os.memfd_create("agent-comms-limits", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)
        self._view = memoryview(self._map)
        self._streams_base = BUCKET_SETS * BUCKET_WAYS
        self._mutex = multiprocessing.get_context("fork").Lock()

    # -- locking and slots ----------------------------------------------------------------

    def _lock(self):
        if self._mutex.acquire(False) or self._mutex.acquire(True, LOCK_WAIT):
            return
        log.warning("the shared limits' lock was held for %g s: taking it over from a worker that died", LOCK_WAIT)
        try:
            self._mutex.release()
        except ValueError:  # another worker took it over first
            pass
        self._mutex.acquire()

    def _unlock(self):
        self._mutex.release()

    def _slots(self, first, ways):
        """(index, slot) for the `ways` slots from `first`, unpacked in one pass."""
        start = first * _SLOT.size
        return enumerate(_SLOT.iter_unpack(self._view[start : start + ways * _SLOT.size]), first)

    def _put(self, index, key, owner, a, b):
        _SLOT.pack_into(self._map, index * _SLOT.size, key, owner, a, b)

    # -- rate -------------------------------------------------------------------------------

    def take(self, name, rate, burst, cost=1, now=None):
        """Spend `cost` (one request, or bytes) from `name`'s bucket. Returns 0 if allowed,
        else the seconds until it would be."""
        now = time.monotonic() if now is None else now
        key = key_of(name)
        first = (key % BUCKET_SETS) * BUCKET_WAYS
        self._lock()
        try:
            chosen, tokens = None, float(burst)
            oldest, oldest_time = None, math.inf
            for index, (slot_key, _, level, updated) in self._slots(first, BUCKET_WAYS):
                if slot_key == key:
                    chosen, tokens = index, min(float(burst), level + (now - updated) * rate)
                    break
                # A free slot, else the one idle longest (its bucket has long refilled).
                stamp = -math.inf if slot_key == 0 else updated
                if stamp < oldest_time:
                    oldest, oldest_time = index, stamp
            if chosen is None:
                chosen = oldest
            if tokens >= cost:
                self._put(chosen, key, 0, tokens - cost, now)
                return 0.0
            self._put(chosen, key, 0, tokens, now)
            return (cost - tokens) / rate
        finally:
            self._unlock()

    # -- holdings: open streams, bytes in flight ----------------------------------------

    def _stream_set(self, name):
        """`name`'s key and the first slot of the set its holdings live in."""
        key = key_of(name)
        return key, self._streams_base + (key % STREAM_SETS) * STREAM_WAYS

    def hold(self, name, cap, amount=1, pid=None):
        """Count `amount` more held by `name` (one open stream, or bytes in flight) if that
        keeps its total, across workers, within `cap`; False if not. Each worker's share is
        a slot of its own, so the master can forget a worker that died."""
        pid = os.getpid() if pid is None else pid
        key, first = self._stream_set(name)
        self._lock()
        try:
            total, mine, free = 0, None, None
            for index, (slot_key, owner, count, _) in self._slots(first, STREAM_WAYS):
                if slot_key == key:
                    total += count
                    if owner == pid:
                        mine = (index, count)
                elif slot_key == 0 and free is None:
                    free = index
            if total + amount > cap or (mine is None and free is None):
                return False
            index, count = mine if mine is not None else (free, 0)
            self._put(index, key, pid, count + amount, 0.0)
            return True
        finally:
            self._unlock()

    def release(self, name, amount=1, pid=None):
        pid = os.getpid() if pid is None else pid
        key, first = self._stream_set(name)
        self._lock()
        try:
            for index, (slot_key, owner, count, _) in self._slots(first, STREAM_WAYS):
                if slot_key == key and owner == pid:
                    if count <= amount:
                        self._put(index, 0, 0, 0.0, 0.0)
                    else:
                        self._put(index, key, pid, count - amount, 0.0)
                    return
        finally:
            self._unlock()

    def forget_worker(self, pid):
        """A worker exited: its holdings are gone, whether it said so or was killed."""
        self._lock()
        try:
            for index, (slot_key, owner, _, _) in self._slots(self._streams_base, STREAM_SETS * STREAM_WAYS):
                if slot_key and owner == pid:
                    self._put(index, 0, 0, 0.0, 0.0)
        finally:
            self._unlock()


# Files a worker holds beyond its connections: the database and its -wal and -shm, the
# listening sockets, gunicorn's pipes and heartbeat file, the shared limits.
FILES_BESIDE_CONNECTIONS = 64


def connections_within_file_limit(wanted):
    """The connections a worker can hold with this process's limit on open files (every
    connection is one), raising the soft limit towards the hard one when it is too low.
    If even the hard limit is too low, fewer connections, and a warning that says so."""
    needed = wanted + FILES_BESIDE_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (OSError, ValueError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        allowed = max(1, soft - FILES_BESIDE_CONNECTIONS)
        log.warning(
            "the limit on open files is %d: each worker holds %d connections, not %d "
            "(AGENT_COMMS_WORKER_CONNECTIONS); raise it (LimitNOFILE=, ulimit -n)",
            soft,
            allowed,
            wanted,
        )
        return allowed
    return wanted


_shared = None


def shared():
    """This broker's table. Made in the gunicorn master (gunicorn.conf.py) so that every
    worker forked from it inherits the same memory."""
    global _shared
    if _shared is None:
        _shared = SharedLimits()
    return _shared
