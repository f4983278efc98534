"""agent-chat against a peer that is not a broker and answers without end: an endless
reply, one that trickles in, a stream line that never ends. Each is cut (exit 2, one
line), never read into memory without bound or waited on for ever. The peer is a loopback
socket server of the test's own: no broker can be made to answer so."""

import socket
import subprocess
import threading
import time

import pytest

from broker_process import BIN


class Misbehaving:
    """Answers every connection with `answer(conn)` on a loopback port, in a thread."""

    def __init__(self, answer):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.answer = answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self):
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn):
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)  # the request
                self.answer(conn, self.stop)
            except OSError:
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


def endless(media_type, byte):
    """An answer of `media_type`, chunked, that goes on (for at most 30 s) with `byte`."""

    def answer(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % media_type)
        chunk = byte * 65536
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    return answer


endless_chunks = endless(b"application/json", b"[")
endless_stream_line = endless(b"text/event-stream", b"x")


def trickle(conn, stop):
    conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
    deadline = time.monotonic() + 40
    while not stop.is_set() and time.monotonic() < deadline:
        time.sleep(0.5)
        conn.sendall(b" ")


def chat(url, *args, timeout=60):
    env = {"AGENT_COMMS_BROKER": url, "AGENT_COMMS_CONFIG": "/dev/null", "PATH": "/usr/bin:/bin"}
    started = time.monotonic()
    done = subprocess.run([str(BIN / "agent-chat"), *args], capture_output=True, text=True, env=env, timeout=timeout)
    return done, time.monotonic() - started


@pytest.mark.parametrize(
    ("answer", "args", "expected", "within"),
    [
        (endless_chunks, ["read", "general"], "answered more than", 20),
        (endless_chunks, ["status"], "answered more than", 20),
        (trickle, ["send", "general", "hello"], "did not finish its answer in time", 25),
        (endless_stream_line, ["watch", "general", "--after", "0", "--timeout", "30"], "a line of more than", 25),
    ],
)
def test_a_reply_without_end_is_cut_with_one_line(answer, args, expected, within):
    with Misbehaving(answer) as peer:
        done, took = chat(peer.url, *args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert took < within, took
