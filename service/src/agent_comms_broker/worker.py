"""The gunicorn worker class: gevent, with what the broker asks of every connection.

gevent because watchers (SSE streams, long-polls) hold their connection for minutes: a
greenlet costs a few KiB where a thread or a process would cost far more. On top of
gunicorn's gevent worker:

- gunicorn's own answers to malformed requests (bad request line, bad header, headers
  too large) are JSON like every other error;
- a client has AGENT_COMMS_REQUEST_TIMEOUT for a request's head and again for its body
  (408 after that), and a client that takes nothing of a reply for
  AGENT_COMMS_SEND_TIMEOUT is dropped;
- a body the broker did not read (a 413, a 401) is read and thrown away, up to a bound,
  before the connection closes: a client that sends its whole body before it reads the
  answer gets the answer, not a connection reset;
- a reserve of connections is kept free: when a worker nears AGENT_COMMS_WORKER_CONNECTIONS,
  the connections that have waited longest on their client (for a head or a body) are
  closed, so a flood of slow clients never locks out /healthz or clients that send at a
  normal pace;
- a worker that holds more connections than the others lets them accept a burst of new
  ones (balance.py).
"""

import contextlib
import ctypes
import errno
import itertools
import json
import os
import signal
import socket
import ssl
import time

import gevent
import gevent.events

# What gevent's monkey.patch_all (run by each worker as it starts) puts in place of the
# standard modules, imported here in the master, before the fork, without patching
# anything: the workers then share these modules' pages instead of each importing them
# (2 MB less in all, measured with the idle benchmark).
import gevent.monkey
import gevent.os
import gevent.select
import gevent.selectors
import gevent.signal
import gevent.ssl
import gevent.subprocess
import gevent.thread
import gevent.threading
import gevent.time
from gevent.hub import Hub
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.workers import ggevent
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

# gunicorn's master imports this before a worker forks and gevent patches the threading
# module: nothing here may import Bottle, whose request and response objects would then
# be one per thread, not one per greenlet.
from . import balance
from .accesslog import AccessLogger, keep_flushing
from .config import Settings
from .headers import security_headers
from .http.body import RequestBody
from .live import Parked

# Set by the worker from its config: HSTS too when it serves TLS.
_refusal_headers = security_headers(tls=False)
# Connections kept free for clients that send at a normal pace: a sixteenth, at least 16.
RESERVE_SHARE, RESERVE_MIN = 16, 16
# Only a connection that has waited on its client at least this long is closed for the
# reserve: the others are still arriving at a normal pace. With 4,096 connections a worker
# so takes in some 16,000 new connections a second however many wait on slow clients.
READER_MIN_AGE = 0.25
RESERVE_CHECK = 0.25
# The worker's memory is read this often (/proc/self/statm: some microseconds): heads that
# never end can bring tens of MiB a second into a worker between two reads.
MEMORY_CHECK = 0.05
# Bytes of replies the kernel holds per connection (the rest waits in the worker, counted
# against its agent's bytes in flight): enough for a fast LAN, little for a reader that
# never reads.
SEND_BUFFER = 128 << 10
RECEIVE_BUFFER = 128 << 10
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# mallopt's parameter for the size from which glibc maps buffers on their own.
M_MMAP_THRESHOLD = -3


def write_json_error(sock, status_int, reason, mesg):
    if status_int == 501:  # an unknown Transfer-Encoding: the client's mistake, not the broker's
        status_int, reason = 400, "Bad Request"
    body = json.dumps({"error": f"{reason.lower()}: {mesg}"}).encode()
    security = "".join(f"{name}: {value}\r\n" for name, value in _refusal_headers)
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n{security}Cache-Control: no-store\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


class Connection:
    """One client connection, and since when it has been waiting on its client (None
    while the broker is working on its request or writing to it)."""

    __slots__ = ("evicted", "sock", "waiting_since")

    def __init__(self, sock):
        self.sock = sock
        self.waiting_since = None
        self.evicted = False

    def evict(self):
        """Close its reading side: a read waiting on the client ends at once, and the
        answer to it (a 408, if any) can still be written."""
        self.evicted = True
        # On the file descriptor itself: shutdown() of an SSLSocket would unwrap it.
        raw = socket.socket(fileno=self.sock.fileno())
        try:
            raw.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        finally:
            raw.detach()


def return_freed_memory():
    """Fix glibc's mmap threshold at 128 KiB: every larger buffer (a page of messages, a
    reply, a request body) is then mapped on its own and given back to the system when it
    is freed. Left dynamic, glibc raises the threshold after the first such free and keeps
    later large buffers in its heap, so a worker that once held many stays that large."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 << 10)
    except Exception:  # not glibc (its allocator decides), or ctypes kept from loading it
        pass


def trim_free_memory():
    """Give the system back the free pages of glibc's heap (malloc_trim). Run by the master
    before each fork: a free page the master kept would be copied into the worker that
    reuses it, and stay in the master as well, once both workers have written to it.
    Measured with the idle benchmark: 0.3 to 0.6 MB less in all."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except Exception:  # not glibc: its allocator decides
        pass


def resident_memory():
    """This process's resident memory in bytes (Linux), or 0 if it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


class DateOfTheSecond:
    """gunicorn's Date header (util.http_date) formatted once a second, not for every
    reply: email.utils.formatdate took 1.3% of a worker under the publish load. The
    header has whole seconds, so the text is the same."""

    def __init__(self, http_date):
        self.http_date = http_date
        self.second = None
        self.text = ""

    def __call__(self, timestamp=None):
        if timestamp is not None:
            return self.http_date(timestamp)
        second = int(time.time())
        if second != self.second:
            self.text, self.second = self.http_date(second), second
        return self.text


class WaitingOn:
    """While the broker waits for bytes from a connection's client: the connection is
    among the worker's waiting ones (the reserve closes the longest waiting first), and,
    with `timeout`, the wait ends quietly after it (gevent.Timeout(timeout, False)). A
    class, not a generator's context manager: it is entered for every request."""

    __slots__ = ("connection", "timeout", "waiting")

    def __init__(self, waiting, connection, timeout=None):
        self.waiting = waiting
        self.connection = connection
        self.timeout = None if timeout is None else gevent.Timeout(timeout, False)

    def __enter__(self):
        self.connection.waiting_since = time.monotonic()
        self.waiting[self.connection] = None
        if self.timeout is not None:
            self.timeout.start()
        return self

    def __exit__(self, kind, error, trace):
        self.connection.waiting_since = None
        self.waiting.pop(self.connection, None)
        if self.timeout is not None:
            self.timeout.close()
            # As gevent.Timeout(seconds, False) does: its own expiry ends the block quietly.
            return error is self.timeout
        return False


class LazyHandshake:
    """The TLS context (gunicorn.conf.py's ssl_context hook) whose connections do their
    handshake in the worker's handle(), where the connection is tracked: a client that
    connects and never finishes its handshake is then cut after the request timeout, or
    closed for the reserve, like one that never sends its request."""

    def __init__(self, context):
        self._context = context

    def wrap_socket(self, sock, **kwargs):
        return self._context.wrap_socket(sock, **{**kwargs, "do_handshake_on_connect": False})

    def __getattr__(self, name):
        return getattr(self._context, name)


class BalancedServer(StreamServer):
    """gevent's server, asking the worker before each accept whether to let the other
    workers take this connection (balance.py)."""

    worker = None  # set by BrokerWorker.run

    def do_read(self):
        worker = self.worker
        if worker is not None and worker.balance.should_defer(worker.held()):
            self.stop_accepting()
            self._timer = self.loop.timer(balance.DEFER)
            self._timer.start(self._accept_again)
            return None
        return super().do_read()

    def _accept_again(self):
        if not self.closed:
            self.start_accepting()


# Signals that stop a worker: SIGTERM gracefully, SIGINT and SIGQUIT at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class BrokerWorker(GeventWorker):
    def patch(self):
        """gunicorn's patch (monkey.patch_all), without gevent's plugins: at each of its
        events, patch_all looks for plugin entry points in every installed distribution's
        metadata, which left each worker some 0.9 MB larger (idle benchmark). The broker
        uses no gevent plugin; subscribers of the events (zope.event) still get them."""
        gevent.events.notify_and_call_entry_points = gevent.events.notify
        super().patch()

    def init_process(self):
        global _refusal_headers
        # Until gunicorn's init_signals(), a stop signal reaching this new worker would go
        # to the master's handlers, copied by the fork, and be lost: a worker told to stop
        # while it started (a restart or reload right after a start) served on until the
        # master's graceful timeout ran out and killed it. It is kept, and acted on as
        # soon as the worker's own handlers are in place.
        self.early_stop = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._keep_early_stop)
        _refusal_headers = security_headers(tls=bool(self.cfg.certfile))
        util.write_error = write_json_error
        if not isinstance(util.http_date, DateOfTheSecond):
            util.http_date = DateOfTheSecond(util.http_date)
        # A client that gives up on the TLS handshake (wrong CA, plain HTTP to the HTTPS
        # port) is the client's problem: no traceback in the broker's log for it.
        # Nor does a handshake that times out (a client that connects and sends nothing).
        Hub.NOT_ERROR = (*Hub.NOT_ERROR, ssl.SSLError, TimeoutError)
        self.settings = Settings.from_env()
        return_freed_memory()
        # Accepted sockets start with this timeout: a TLS handshake that never ends is cut.
        socket.setdefaulttimeout(self.settings.request_timeout)
        self.connections = {}  # greenlet -> Connection
        self.waiting = {}  # Connection -> None, longest waiting first
        self.reserve = max(RESERVE_MIN, self.worker_connections // RESERVE_SHARE)
        self.balance = balance.shared()
        self.balance.join(getattr(self, "balance_row", None))  # given by the master (pre_fork)
        self.streams_parked = lambda: 0  # set by post_worker_init
        super().init_process()

    def held(self):
        """The connections this worker holds: served, and event streams parked on its hub."""
        return len(self.connections) + self.streams_parked()

    def run(self):
        # gunicorn's gevent worker makes its servers from the module's StreamServer.
        ggevent.StreamServer = BalancedServer
        BalancedServer.worker = self
        gevent.spawn(self._keep_reserve)
        if isinstance(self.log, AccessLogger):
            gevent.spawn(keep_flushing, self.log, lambda: self.alive, gevent.sleep)
        super().run()

    def _keep_early_stop(self, sig, frame):
        if self.early_stop in (None, signal.SIGTERM):  # a quick stop wins over a graceful one
            self.early_stop = sig

    def init_signals(self):
        super().init_signals()
        if self.early_stop == signal.SIGTERM:
            self.handle_exit(self.early_stop, None)
        elif self.early_stop is not None:
            self.handle_quit(self.early_stop, None)

    def handle_exit(self, sig, frame):
        self.balance.stopping()
        super().handle_exit(sig, frame)

    def handle_quit(self, sig, frame):
        """A quick stop. Ctrl-C on a terminal sends SIGINT to the whole process group and
        the master then sends SIGQUIT too: a second stop, run while the worker is already
        exiting, would raise SystemExit inside gevent's shutdown and print a traceback."""
        if getattr(self, "_quitting", False):
            return
        self._quitting = True
        super().handle_quit(sig, frame)

    # -- connections and the reserve ------------------------------------------------------

    def handle(self, listener, client, addr):
        if listener.fileno() == -1:  # stopping: the listener closed under a connection just accepted
            client.close()
            return
        connection = Connection(client)
        current = gevent.getcurrent()
        self.connections[current] = connection
        self.balance.holding(self.held())
        if len(self.connections) > self.worker_connections - self.reserve:
            self._evict_waiting()
        try:
            client.settimeout(None)  # blocking: each wait has its own deadline
            # What the kernel holds for a client that does not read is bounded too, else
            # readers that never read would fill the whole host's TCP memory with replies.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            # And what it holds of what a client sends before the worker reads it.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            if isinstance(client, ssl.SSLSocket) and not self._handshake(connection):
                return
            AsyncWorker.handle(self, listener, client, addr)
        finally:
            self.waiting.pop(connection, None)
            del self.connections[current]
            self.balance.holding(self.held())

    def _handshake(self, connection):
        """The TLS handshake, within the request timeout; False if it failed (a client
        that gave up, or sent plain HTTP): the connection just closes."""
        with self.waiting_on(connection, self.settings.request_timeout):
            try:
                connection.sock.do_handshake()
                return True
            except (ssl.SSLError, OSError):
                return False
        return False

    def waiting_on(self, connection, timeout=None):
        """While the broker waits for bytes from this connection's client (at most
        `timeout`, if given)."""
        return WaitingOn(self.waiting, connection, timeout)

    def timeout_ctx(self):
        """Around reading each request's head (gunicorn's keepalive: the head must come
        within it, also after a previous request on the connection)."""
        connection = self.connections.get(gevent.getcurrent())
        if connection is None:
            return gevent.Timeout(self.cfg.keepalive, False)
        return self.waiting_on(connection, self.cfg.keepalive)

    def _evict_waiting(self, excess=None):
        """Close the connections that have waited longest on their clients: `excess` of
        them, by default until the reserve is free again (those waiting under
        READER_MIN_AGE are left alone)."""
        now = time.monotonic()
        if excess is None:
            excess = len(self.connections) - (self.worker_connections - self.reserve)
        while excess > 0 and self.waiting:
            oldest = next(iter(self.waiting))
            if now - oldest.waiting_since < READER_MIN_AGE:
                return
            del self.waiting[oldest]
            oldest.evict()
            excess -= 1

    def _keep_reserve(self):
        """Also when no new connection comes in to trigger it (the pool may be full); and
        when the worker's memory passes AGENT_COMMS_WORKER_MEMORY, what the connections
        waiting on their clients hold (the heads and bodies they have sent so far) is given
        back by closing them, the longest waiting first."""
        checks = round(RESERVE_CHECK / MEMORY_CHECK)
        for tick in itertools.count(1):
            if not self.alive:
                return
            gevent.sleep(MEMORY_CHECK)
            if tick % checks == 0 and len(self.connections) > self.worker_connections - self.reserve:
                self._evict_waiting()
            if self.settings.worker_memory and resident_memory() > self.settings.worker_memory:
                self._evict_waiting(max(1, len(self.waiting) // 4))

    # -- one request --------------------------------------------------------------------

    def handle_request(self, listener_name, req, sock, addr):
        connection = self.connections.get(gevent.getcurrent()) or Connection(sock)
        original = req.body
        timeout = self.settings.request_timeout
        deadline = time.monotonic() + timeout
        body = req.body = RequestBody(original, deadline, timeout, connection, self.waiting_on)
        closing = False
        sock.settimeout(self.settings.send_timeout)  # each write of the reply
        try:
            super().handle_request(listener_name, req, sock, addr)
        except Parked:  # an event stream took its own descriptor of the connection to the hub
            raise StopIteration() from None
        except StopIteration:
            closing = True
        except TimeoutError:
            self.log.info("closed the connection of %s: it took nothing of its reply for %g s", addr, sock.gettimeout())
            raise StopIteration() from None
        except OSError as error:
            if error.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise StopIteration() from None  # the client went away: nothing to tell it
            raise
        finally:
            req.body = original
            with contextlib.suppress(OSError):
                sock.settimeout(None)
        # A keep-alive connection goes on only once the whole body is read; one that
        # closes is drained too, so a client still sending it does not get a reset.
        if not body.drain() or closing:
            raise StopIteration()
        # A keep-alive client with its next request already buffered would otherwise be
        # served again at once, starving the other connections (p99 in the hundreds of ms).
        gevent.sleep(0)
