"""The fan-out client, run in its own process: opens many SSE watchers of one channel over
plain asyncio (HTTP/1.1, chunked encoding and SSE parsed by sse_wire.py), reports once all
are connected, records when each message reaches each watcher, and checks every watcher
got every message once, in order.

Usage: watchers.py --port PORT --channel NAME [--watchers 1000] [--messages 100] [--timeout 60]

Prints one JSON line when all watchers are connected ({"event": "connected", ...}), one
when all messages arrived or --timeout passed ({"event": "delivered", ...}), then keeps
the watchers connected until a line (or end of file) on standard input.
"""

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time

from sse_wire import ChunkedDecoder, EventParser, StreamError, parse_head

CONNECTING_AT_ONCE = 100
READ_SIZE = 65536


class Watcher(asyncio.BufferedProtocol):
    """One SSE connection, and what arrived on it: (receipt time, id, data) per message.

    A protocol rather than a StreamReader: 1,000 watchers each woken for every message cost
    the client more CPU than the broker (a coroutine switch and a fresh 256 KiB recv buffer
    per read), and that wait would be counted as delivery latency."""

    # One read buffer for every watcher: each read is copied out before the next.
    _view = memoryview(bytearray(READ_SIZE))

    def __init__(self, port, channel, expected):
        loop = asyncio.get_running_loop()
        self.request = (
            f"GET /stream/{channel} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\nX-Agent-ID: bench-watcher\r\n\r\n"
        ).encode()
        self.expected = expected
        self.connected = loop.create_future()
        self.finished = loop.create_future()
        self.arrivals = []
        self.other_events = []
        self.error = None
        self.transport = None
        self._head = b""
        self._decoder = None  # set once the response head is read
        self._parser = EventParser()

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def get_buffer(self, sizehint):
        return self._view

    def buffer_updated(self, nbytes):
        received = time.time()
        try:
            self._consume(received, bytes(self._view[:nbytes]))
        except (StreamError, UnicodeDecodeError, ValueError) as error:
            self.fail(f"{type(error).__name__}: {error}")

    def _consume(self, received, data):
        if self._decoder is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status, headers = parse_head(self._head[:end])
            if status != 200 or not headers.get("content-type", "").startswith("text/event-stream"):
                raise StreamError(f"the stream answered {status} {headers.get('content-type')}")
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            self._decoder = ChunkedDecoder() if chunked else IdentityDecoder()
            data = self._head[end + 4 :]
        for event in self._parser.feed(self._decoder.feed(data)):
            if "retry" in event and not self.connected.done():
                self.connected.set_result(True)
            elif "data" in event and event.get("event", "message") == "message":
                self.arrivals.append((received, event.get("id"), event["data"]))
            else:
                self.other_events.append(event)
        if len(self.arrivals) >= self.expected and not self.finished.done():
            self.finished.set_result(True)
        if self._decoder.finished:
            raise StreamError("the stream ended")

    def connection_lost(self, exc):
        if not self.finished.done():
            self.fail(f"the broker closed the stream ({exc or 'EOF'})")

    def fail(self, error):
        self.error = self.error or error
        for future in (self.connected, self.finished):
            if not future.done():
                future.set_result(False)
        if self.transport is not None:
            self.transport.close()

    def close(self):
        if self.transport is not None:
            self.transport.close()


class IdentityDecoder:
    """A stream without Transfer-Encoding: its bytes are the payload."""

    finished = False

    def feed(self, data):
        return data


def check(watcher):
    """This watcher's verdict and its latencies (ms): after post, and after commit."""
    ids, sequence, after_post, after_commit = [], [], [], []
    for received, event_id, data in watcher.arrivals:
        message = json.loads(data)
        body = json.loads(message["message"])
        if event_id != str(message["id"]):
            watcher.other_events.append({"mismatched_id": event_id})
        ids.append(message["id"])
        sequence.append(body["seq"])
        after_post.append((received - body["sent"]) * 1000)
        after_commit.append((received - message["timestamp"]) * 1000)
    seen = set(sequence)
    verdict = {
        "received": len(ids),
        "missing": len(set(range(watcher.expected)) - seen),
        "repeated": len(sequence) - len(seen),
        "out_of_order": sum(1 for a, b in itertools.pairwise(ids) if b <= a),
        "complete": sequence == list(range(watcher.expected)) and ids == sorted(set(ids)),
    }
    return verdict, ids, after_post, after_commit


def percentiles(values):
    if not values:
        return {}
    ordered = sorted(values)

    def at(p):
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)

    return {"50": at(50), "90": at(90), "99": at(99), "max": round(ordered[-1], 2), "samples": len(ordered)}


def histogram(values):
    """{whole milliseconds: count}: what the reports of several client processes merge by."""
    counts = {}
    for value in values:
        bucket = int(value)
        counts[bucket] = counts.get(bucket, 0) + 1
    return counts


def summarize(watchers, expected):
    totals = {
        "watchers": len(watchers),
        "complete": 0,
        "missing": 0,
        "repeated": 0,
        "out_of_order": 0,
        "other_events": 0,
        "errors": 0,
    }
    id_sequences, after_post, after_commit, errors = set(), [], [], []
    for watcher in watchers:
        verdict, ids, post_ms, commit_ms = check(watcher)
        totals["complete"] += verdict["complete"]
        for name in ("missing", "repeated", "out_of_order"):
            totals[name] += verdict[name]
        totals["other_events"] += len(watcher.other_events)
        if watcher.error:
            totals["errors"] += 1
            errors.append(watcher.error)
        id_sequences.add(tuple(ids))
        after_post += post_ms
        after_commit += commit_ms
    return {
        "event": "delivered",
        "expected_per_watcher": expected,
        **totals,
        "distinct_id_sequences": len(id_sequences),
        "latency_after_post_ms": percentiles(after_post),
        "latency_after_commit_ms": percentiles(after_commit),
        "histogram_after_post_ms": histogram(after_post),
        "first_errors": sorted(set(errors))[:5],
    }


def raise_open_files(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def emit(document):
    print(json.dumps(document), flush=True)


async def open_watcher(watcher, port, gate):
    """Connect, then wait for the stream's first frame; at most CONNECTING_AT_ONCE at a time."""
    async with gate:
        try:
            await asyncio.get_running_loop().create_connection(lambda: watcher, "127.0.0.1", port)
        except OSError as error:
            watcher.fail(f"{type(error).__name__}: {error}")
        return await watcher.connected


async def main(args):
    raise_open_files(args.watchers + 100)
    gate = asyncio.Semaphore(CONNECTING_AT_ONCE)
    started = time.monotonic()
    watchers = [Watcher(args.port, args.channel, args.messages) for _ in range(args.watchers)]
    opening = asyncio.gather(*(open_watcher(watcher, args.port, gate) for watcher in watchers))
    try:
        await asyncio.wait_for(opening, args.timeout)
    except TimeoutError:
        pass
    connected = sum(1 for w in watchers if w.connected.done() and w.connected.result())
    errors = sorted({w.error for w in watchers if w.error})[:5]
    emit(
        {
            "event": "connected",
            "watchers": connected,
            "wanted": args.watchers,
            "seconds": round(time.monotonic() - started, 2),
            "first_errors": errors,
        }
    )
    await asyncio.wait([watcher.finished for watcher in watchers], timeout=args.timeout)
    emit(summarize(watchers, args.messages))
    # The broker's memory is measured with the watchers still connected.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for watcher in watchers:
        watcher.close()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the connections, and again for the messages"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
