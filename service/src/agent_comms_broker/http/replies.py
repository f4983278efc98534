"""JSON replies, encoded once with orjson (replies are mostly lists of messages, and the
standard library's json took a third of a worker's time). A large reply counts against its
agent's bytes in flight (AGENT_COMMS_MAX_INFLIGHT) while it is written, so clients that
never read cannot make the broker hold their replies without bound."""

import orjson
from bottle import response

# Replies smaller than this are sent as they are: only large ones are worth counting.
LARGE_REPLY = 64 << 10
PIECE = 64 << 10


class JsonReplies:
    name = "json_replies"
    api = 2

    def __init__(self, broker):
        self.broker = broker

    def apply(self, callback, route):
        def wrapper(*args, **kwargs):
            reply = callback(*args, **kwargs)
            if not isinstance(reply, dict):
                return reply
            body = orjson.dumps(reply)
            response.content_type = "application/json"
            if len(body) < LARGE_REPLY:
                return body
            holding = self.broker.holding(len(body))
            holding.__enter__()  # 429 now, before anything is sent
            response.set_header("Content-Length", str(len(body)))
            return pieces(body, holding)

        return wrapper


def pieces(body, holding):
    """The reply in pieces, each written before the next; the bytes stop counting once
    the last is written or the client is gone."""
    try:
        view = memoryview(body)
        for start in range(0, len(body), PIECE):
            yield bytes(view[start : start + PIECE])
    finally:
        holding.__exit__(None, None, None)
