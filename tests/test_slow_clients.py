"""Clients that are slow on purpose, on real brokers: a body that trickles in gets 408, a
flood of such clients leaves room for /healthz and for clients that send at a normal pace,
a client that never reads its reply holds little of a worker's memory and is dropped, and
one that goes away frees its stream slot at once."""

import json
import socket
import threading
import time
import urllib.parse

import pytest
import requests

from broker_process import BrokerProcess
from test_hostile_input import raw_request


def connect(url):
    parts = urllib.parse.urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def slow_post(url, channel, length=100):
    """A connection that has sent a post's head and one byte of its body."""
    conn = connect(url)
    conn.sendall(
        f"POST /messages/{channel} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n{{".encode()
    )
    return conn


def read_reply(conn, timeout):
    """Everything the broker sends until it closes the connection (or timeout passes)."""
    conn.settimeout(timeout)
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def worker_memory(broker):
    """Resident memory of each worker, in bytes."""
    sizes = []
    for pid in broker.worker_pids():
        with open(f"/proc/{pid}/status") as status:
            line = next(line for line in status if line.startswith("VmRSS:"))
        sizes.append(int(line.split()[1]) * 1024)
    return sizes


def test_a_body_that_trickles_in_gets_408_and_the_connection_closes(own_broker):
    broker = own_broker(env={"AGENT_COMMS_REQUEST_TIMEOUT": "1.5"}).start()
    conn = slow_post(broker.url, "slow")
    started = time.monotonic()
    for _ in range(3):  # a byte now and then is not enough
        time.sleep(0.4)
        conn.sendall(b" ")
    reply = read_reply(conn, 10)
    assert time.monotonic() - started < 5
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:200]
    assert "did not arrive within 1.5 s" in json.loads(body)["error"]
    assert requests.get(f"{broker.url}/messages/slow", timeout=10).json()["count"] == 0


def test_a_head_that_trickles_in_is_cut_too(own_broker):
    broker = own_broker(env={"AGENT_COMMS_REQUEST_TIMEOUT": "1"}).start()
    conn = connect(broker.url)
    conn.sendall(b"GET /status HTTP/1.1\r\n")
    started = time.monotonic()
    assert read_reply(conn, 10) == b""  # closed, no answer to half a request
    assert time.monotonic() - started < 4


def test_a_flood_of_slow_clients_leaves_room_for_everyone_else(own_broker):
    """Far more slow posts than the workers hold connections: /healthz and posts sent at a
    normal pace are still answered at once, and the broker logs no file-limit errors."""
    broker = own_broker(
        env={"AGENT_COMMS_WORKER_CONNECTIONS": "128", "AGENT_COMMS_REQUEST_TIMEOUT": "30"}, workers=2
    ).start()
    slow, stop = [], threading.Event()

    def flood():
        while not stop.is_set() and len(slow) < 1500:
            try:
                slow.append(slow_post(broker.url, "flooded"))
            except OSError:
                time.sleep(0.05)

    flooders = [threading.Thread(target=flood) for _ in range(4)]
    for thread in flooders:
        thread.start()
    try:
        time.sleep(3)  # the flood outnumbers the 2 x 128 connections many times over
        assert len(slow) > 600
        timings = []
        for n in range(10):
            started = time.monotonic()
            assert requests.get(f"{broker.url}/healthz", timeout=10).status_code == 200
            reply = requests.post(f"{broker.url}/messages/normal", json={"sender": "a", "message": str(n)}, timeout=10)
            assert reply.status_code == 201
            timings.append(time.monotonic() - started)
        assert max(timings) < 2, timings
    finally:
        stop.set()
        for thread in flooders:
            thread.join(30)
        for conn in slow:
            conn.close()
    assert requests.get(f"{broker.url}/messages/normal", timeout=10).json()["count"] == 10
    assert "Too many open files" not in broker.log()


class LimitedBroker(BrokerProcess):
    """A broker whose limit on open files (soft and hard) is `files`."""

    def __init__(self, *args, files, **kwargs):
        super().__init__(*args, **kwargs)
        self.files = files

    def command(self):
        return ["prlimit", f"--nofile={self.files}:{self.files}", *super().command()]


def test_a_file_limit_below_the_connections_means_fewer_connections_not_errors(tmp_path):
    """Each worker is told to hold 4,096 connections but may open only 256 files: it holds
    fewer (and says so at start), and a flood of idle connections past that still leaves
    /healthz answering, with no "Too many open files" in the log."""
    broker = LimitedBroker(tmp_path / "messages.db", files=256, env={"AGENT_COMMS_REQUEST_TIMEOUT": "30"}).start()
    try:
        assert "the limit on open files is 256: each worker holds 192 connections" in broker.log()
        idle = [connect(broker.url) for _ in range(600)]
        try:
            time.sleep(2)
            for _ in range(5):
                assert requests.get(f"{broker.url}/healthz", timeout=5).status_code == 200
        finally:
            for conn in idle:
                conn.close()
        assert "Too many open files" not in broker.log()
    finally:
        broker.stop()


@pytest.fixture
def big_messages(own_broker):
    """A broker holding 200 messages of 64 KiB of \\x01 (each ~393 KB as JSON)."""
    broker = own_broker(env={"AGENT_COMMS_SEND_TIMEOUT": "3"}).start()
    text = "\x01" * 65536
    for _ in range(100):
        batch = [{"sender": "big", "message": text}] * 2  # 786 KB of JSON: within the body limit
        reply = requests.post(f"{broker.url}/messages/big", data=json.dumps(batch), timeout=30)
        assert reply.status_code == 201, reply.text
    return broker


def hold_unread(url, request, count):
    """`count` connections that send a request and never read the reply."""
    conns = []
    for _ in range(count):
        conn = connect(url)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.sendall(request)
        conns.append(conn)
    return conns


@pytest.mark.parametrize(
    ("request_line", "count"),
    [
        (b"GET /messages/big?limit=1000", 6),
        (b"GET /messages/big?after=0&limit=1000", 6),
        (b"GET /stream/big?after=0", 4),
    ],
)
def test_readers_that_never_read_hold_little_memory(big_messages, request_line, count):
    """Before pages and stream writes had a byte budget, 6 such reads took each worker past
    a gigabyte; now each holds about one page (256 KiB of text, at most 1.5 MiB as JSON)."""
    broker = big_messages
    before = sum(worker_memory(broker))
    conns = hold_unread(broker.url, request_line + b" HTTP/1.1\r\nHost: t\r\n\r\n", count)
    try:
        time.sleep(1.5)
        grown = sum(worker_memory(broker)) - before
        assert grown < count * 8 * 2**20, f"workers grew by {grown / 2**20:.1f} MiB"
    finally:
        for conn in conns:
            conn.close()
    assert requests.get(f"{broker.url}/healthz", timeout=10).status_code == 200


def test_a_stream_reader_that_stops_reading_is_dropped(big_messages):
    """Its backlog (78 MB of JSON) cannot fit in the sockets' buffers: once the broker has
    waited AGENT_COMMS_SEND_TIMEOUT (3 s) for it to take more, it closes the connection."""
    broker = big_messages
    conns = hold_unread(broker.url, b"GET /stream/big?after=0 HTTP/1.1\r\nHost: t\r\n\r\n", 2)
    try:
        deadline = time.monotonic() + 20
        while broker.log().count("it took nothing of its reply for 3 s") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert broker.log().count("it took nothing of its reply for 3 s") == 2, broker.log()[-2000:]
    finally:
        for conn in conns:
            conn.close()


def test_a_parked_stream_whose_reader_stops_is_dropped_and_frees_its_slot(own_broker):
    """A caught-up stream is parked: the worker's hub writes to it, with no greenlet of its
    own. When its client stops reading and new messages no longer fit in the sockets'
    buffers, a greenlet takes it over and drops it after the send timeout (1 s); its one
    slot (AGENT_COMMS_MAX_STREAMS=1) is then free for the next stream."""
    broker = own_broker(env={"AGENT_COMMS_SEND_TIMEOUT": "1", "AGENT_COMMS_MAX_STREAMS": "1"}).start()
    conn = hold_unread(broker.url, b"GET /stream/flood HTTP/1.1\r\nHost: t\r\n\r\n", 1)[0]
    try:
        deadline = time.monotonic() + 10
        while "GET /stream/flood" not in broker.log():  # parked: its request is over and logged
            assert time.monotonic() < deadline, "the stream was not parked"
            time.sleep(0.1)
        for n in range(40):  # 2.4 MB: far more than the sockets' buffers take
            reply = requests.post(f"{broker.url}/messages/flood", json={"sender": "f", "message": str(n % 10) * 60000})
            assert reply.status_code == 201
        deadline = time.monotonic() + 15
        while "it took nothing of its reply for 1 s" not in broker.log():
            assert time.monotonic() < deadline, broker.log()[-2000:]
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while (reply := requests.get(f"{broker.url}/stream/flood", stream=True, timeout=10)).status_code == 429:
            reply.close()
            assert time.monotonic() < deadline, "the dropped stream kept its slot"
            time.sleep(0.2)
        assert reply.status_code == 200
        reply.close()
    finally:
        conn.close()


def test_a_page_stops_at_its_byte_budget_and_says_more(big_messages):
    broker = big_messages
    page = requests.get(f"{broker.url}/messages/big?after=0&limit=1000", timeout=30).json()
    assert 1 <= page["count"] < 200 and page["more"] is True
    seen, cursor = page["count"], page["cursor"]
    while page["more"]:
        page = requests.get(f"{broker.url}/messages/big", params={"after": cursor, "limit": 1000}, timeout=30).json()
        seen, cursor = seen + page["count"], page["cursor"]
    assert seen == 200
    latest = requests.get(f"{broker.url}/messages/big?limit=1000", timeout=30).json()
    assert latest["more"] is True and latest["messages"][0]["id"] == 1
    assert len(json.dumps(latest)) < 4 * 2**20


def test_a_stream_that_goes_away_frees_its_slot_at_once(own_broker):
    broker = own_broker(env={"AGENT_COMMS_MAX_STREAMS": "3"}).start()  # keep-alives every 15 s
    for _ in range(3):
        streams = []
        for _ in range(3):
            reply = requests.get(f"{broker.url}/stream/quiet", stream=True, timeout=10)
            assert reply.status_code == 200
            streams.append(reply)
        for reply in streams:
            reply.close()
        time.sleep(0.3)
    for _ in range(3):  # long-polls hold slots the same way
        polls = [
            hold_unread(broker.url, b"GET /messages/quiet?after=0&wait=30 HTTP/1.1\r\nHost: t\r\n\r\n", 1)[0]
            for _ in range(3)
        ]
        time.sleep(0.2)
        for conn in polls:
            conn.close()
        time.sleep(0.3)
    status, answer = raw_request(broker.url, b"GET /messages/quiet?after=0&wait=0.5 HTTP/1.1")
    assert status == 200, answer


def test_many_readers_that_never_read_are_held_to_the_bytes_in_flight(big_messages):
    """One anonymous client sending page requests it never reads, at the rate limit: past
    AGENT_COMMS_MAX_INFLIGHT (16 MiB) of replies being written, the next get 429, so the
    workers hold a few dozen MiB, not gigabytes; once the client is gone they give it back."""
    broker = big_messages
    before = sum(worker_memory(broker))
    conns = hold_unread(broker.url, b"GET /messages/big?limit=1000 HTTP/1.1\r\nHost: t\r\n\r\n", 60)
    try:
        time.sleep(1.5)
        grown = sum(worker_memory(broker)) - before
        assert grown < 64 * 2**20, f"workers grew by {grown / 2**20:.1f} MiB"
        assert broker.log().count('"GET /messages/big?limit=1000 HTTP/1.1" 429') >= 30, broker.log()[-3000:]
    finally:
        for conn in conns:
            conn.close()
    deadline = time.monotonic() + 20
    while sum(worker_memory(broker)) - before > 32 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sum(worker_memory(broker)) - before <= 32 * 2**20, "the workers kept what the replies took"


def test_bodies_being_read_are_held_to_the_bytes_in_flight(own_broker):
    broker = own_broker(env={"AGENT_COMMS_MAX_INFLIGHT": "2m"}).start()
    stalled = [slow_post(broker.url, "inflight", length=1_000_000) for _ in range(2)]
    try:
        time.sleep(0.5)  # both are being read, 2 x 1 MB in flight
        third = slow_post(broker.url, "inflight", length=1_000_000)
        head, _, body = read_reply(third, 5).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429"), head
        assert "bytes in flight" in json.loads(body)["error"]
    finally:
        for conn in stalled:
            conn.close()
    time.sleep(0.5)  # the stalled posts are gone: their bytes no longer count
    big = {"sender": "a", "message": "m" * 60000}
    replies = [requests.post(f"{broker.url}/messages/inflight", json=[big] * 16, timeout=10) for _ in range(3)]
    assert [reply.status_code for reply in replies] == [201] * 3


def test_heads_that_never_end_are_closed_when_the_worker_grows(own_broker):
    """Connections that keep sending a large head and never end it: each holds what it
    sent in the worker's memory. Past AGENT_COMMS_WORKER_MEMORY the worker closes the
    longest waiting and gives the memory back; /healthz goes on being answered."""
    broker = own_broker(
        env={"AGENT_COMMS_WORKER_MEMORY": "96m", "AGENT_COMMS_REQUEST_TIMEOUT": "60"}, workers=1
    ).start()
    conns = []
    for _ in range(400):  # 400 x 320 KB: 125 MiB of heads, if the worker kept them all
        conn = connect(broker.url)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        conn.setblocking(False)
        conns.append(conn)
    highest, closed = 0, set()
    try:
        for n in range(40):  # a header line on each connection every 0.1 s or so
            for conn in conns:
                if conn in closed:
                    continue
                try:
                    conn.send(b"X-Padding-%d: " % n + b"p" * 7900 + b"\r\n")
                except BlockingIOError:
                    pass
                except OSError:
                    closed.add(conn)
            highest = max(highest, max(worker_memory(broker)))
            time.sleep(0.05)
        time.sleep(1)
        assert requests.get(f"{broker.url}/healthz", timeout=10).status_code == 200
        highest = max(highest, max(worker_memory(broker)))
        # The bound, plus what 400 connections bring in between two checks of the memory
        # (50 ms apart, later while the worker parses all their heads) and Python's own:
        # 96 to 105 MiB measured once, idle or with both cores busy; 99 to 150 MiB on a
        # slower evening of the same machine, the code before alike; 295 MiB without
        # the bound.
        assert highest < 2 * 96 * 2**20, f"the worker reached {highest / 2**20:.0f} MiB"
        for conn in conns:
            try:
                if conn.recv(1) == b"":
                    closed.add(conn)
            except BlockingIOError:
                pass
            except OSError:
                closed.add(conn)
        assert len(closed) > 100, len(closed)
    finally:
        for conn in conns:
            conn.close()
