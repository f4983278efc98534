"""A small client of the agent-comms broker's HTTP API, apart from any printing, so other
Python code can use it:

    from agent_comms_chat.client import BrokerClient
    broker = BrokerClient("http://192.168.122.86:8080", agent_id="warp-ct200")
    broker.send("tasks", "Task completed successfully")
    for message in broker.watch("tasks", after=broker.latest_cursor("tasks")):
        ...

Each method is one call of the API; how requests travel, what is retried and how failures
read is transport.py's job."""

import os
import time

from .transport import TIMEOUT, BrokerError, Transport, route

__all__ = ["BrokerClient", "BrokerError"]

# The channels and agents listings are read page after page (1000 rows each), up to this
# many pages.
LISTING_PAGES = 100
# A long-poll for a reply asks for this many seconds at a time (the broker may cut it shorter).
LONG_POLL = 60


class BrokerClient(Transport):
    # This agent's keys (keys.AgentKeys): with them, what it posts is signed.
    keys = None

    # -- messages -------------------------------------------------------------------------

    def send(self, channel, message, sender=None, reply_to=None, priority=None, tags=None, meta=None, key=None):
        """Post one message; returns the stored message (with its id). It carries an
        idempotency key (a new uuid4 unless `key` is given): the broker stores a repeat
        of it once and answers it with the first message, so a post whose answer was lost
        is safely sent again. With `keys`, it is signed."""
        post = {"message": message}
        if sender or self.agent_id or self.keys is not None:
            post["sender"] = sender or self.agent_id or self.keys.agent
        post.update(_optional(reply_to=reply_to, priority=priority, tags=tags or None, meta=meta))
        self._sign(post, channel)
        post["key"] = key or _new_key()
        path = route("messages", channel)
        answer = self.write("POST", path, post, retry_lost=True)
        if answer is None:
            raise BrokerError(f"POST {self.url}{path} answered 204 with something that is not a JSON object")
        self.expect(answer, path, "id", int)
        return answer

    def read(
        self,
        channel,
        limit=None,
        since=None,
        after=None,
        wait=None,
        thread=None,
        tag=None,
        min_priority=None,
        unread=False,
    ):
        """One page: {"messages": [...], "cursor": ..., "gap": ..., "more": ...}. `thread`,
        `tag` and `min_priority` keep only the matching messages; `unread` starts after the
        caller's read position (not with `after` or `since`)."""
        params = {"limit": limit, "since": since, "after": after, "wait": wait}
        params.update(_optional(thread=thread, tag=tag, min_priority=min_priority, unread=1 if unread else None))
        timeout = (TIMEOUT[0], TIMEOUT[1] + float(wait or 0))
        path = route("messages", channel)
        page = self.call("GET", path, timeout=timeout, params=params)
        self.expect(page, path, "messages", list)
        return page

    def search(self, query, channel=None, limit=None, before=None):
        """Messages whose text holds every word of `query`, newest first, of the channels
        the caller may read (or of `channel`): {"messages", "count", "before", "more"};
        go on to older ones with before=<before>."""
        params = {"q": query, "channel": channel, "limit": limit, "before": before}
        found = self.call("GET", "/search", params=params)
        self.expect(found, "/search", "messages", list)
        return found

    def message(self, channel, message_id):
        """One message of the channel (BrokerError with status 404 if it has none of that id)."""
        path = route("messages", channel, message_id)
        answer = self.call("GET", path)
        self.expect(answer, path, "id", int)
        return answer

    def receipts(self, channel, message_id):
        """{"receipts": [{"agent", "read_at"}], "count"}: the agents whose read position
        has passed the message."""
        path = route("messages", channel, message_id, "receipts")
        answer = self.call("GET", path)
        self.expect(answer, path, "receipts", list)
        return answer

    def first_reply(self, channel, stored, deadline=None):
        """The first message that replies to `stored` (a message as send returns it), by
        long-polls on its thread; None once `deadline` (time.monotonic()) passes."""
        root = stored.get("thread") or stored["id"]
        cursor = stored["id"]
        while True:
            wait = LONG_POLL if deadline is None else min(LONG_POLL, deadline - time.monotonic())
            if wait <= 0:
                return None
            page = self.read(channel, thread=root, after=cursor, wait=round(wait, 3), limit=1000)
            for message in page["messages"]:
                if message.get("reply_to") == stored["id"]:
                    return message
            if isinstance(page.get("cursor"), int):
                cursor = max(cursor, page["cursor"])

    def latest_cursor(self, channel):
        """The cursor of the channel's newest message: watch after it for what comes next."""
        return self.expect(self.read(channel, limit=1), route("messages", channel), "cursor", int)

    def watch(self, channel, after, deadline=None, on_gap=None):
        """Yield the channel's messages after the cursor as they arrive, from its Server-Sent
        Events stream. A dropped connection (a broker restart) is reopened from the last id
        seen, so nothing is lost or repeated. Returns when `deadline` (time.monotonic())
        passes; raises BrokerError for an answer that retrying cannot fix (4xx)."""
        return self.stream(route("stream", channel), after, deadline=deadline, on_gap=on_gap)

    # -- task queues ----------------------------------------------------------------------

    def take(self, channel, lease=None, wait=None):
        """Claim the channel's oldest pending task for this agent, waiting up to `wait`
        seconds for one: the message with its `task` and `claim`, or None if none came.
        Not sent twice: a take whose answer was lost may hold a task until its lease ends."""
        path = route("queue", channel, "take")
        timeout = (TIMEOUT[0], TIMEOUT[1] + float(wait or 0))
        answer = self.write("POST", path, _optional(lease=lease, wait=wait), timeout=timeout)
        if answer is not None:
            self.expect(answer, path, "id", int)
        return answer

    def take_waiting(self, channel, lease=None, wait=0):
        """take, asked again when the broker cuts a long wait short (at its
        AGENT_COMMS_MAX_WAIT), until `wait` seconds have passed: the task, or None."""
        deadline = time.monotonic() + wait
        while True:
            taken = self.take(channel, lease=lease, wait=round(max(0.0, deadline - time.monotonic()), 3))
            if taken is not None or time.monotonic() >= deadline - 0.01:
                return taken

    def claim(self, channel, task_id, lease=None):
        """Claim that task, or extend this agent's lease of it (a heartbeat): as take."""
        path = route("messages", channel, task_id, "claim")
        answer = self.write("POST", path, _optional(lease=lease), retry_lost=True)
        self.expect(answer or {}, path, "claim", dict)
        return answer

    def done(self, channel, task_id, message=None, priority=None, tags=None, meta=None, next_lease=None):
        """Mark the task this agent holds done, posting `message` (if any) as its reply in
        the same step: {"task": {...}, "reply": message or None}. The broker answers a
        repeat with the same, so a lost answer is asked again. With `next_lease`, the same
        request takes this agent's next task (without waiting): "next" is it, or None (a
        lost answer asked again may leave the task it took claimed to its lease's end)."""
        post = _optional(priority=priority, tags=tags or None, meta=meta)
        if message is not None:
            post.update(message=message)
            if self.keys is not None:  # the reply the broker stores: from this agent, to the task
                self._sign({**post, "sender": self.keys.agent, "reply_to": task_id}, channel, into=post)
            post["key"] = _new_key()
        if next_lease is not None:
            post["next"] = {"lease": next_lease}
        path = route("messages", channel, task_id, "done")
        answer = self.write("POST", path, post, retry_lost=True)
        self.expect(answer or {}, path, "task", dict)
        return answer

    def release(self, channel, task_id, dead=False):
        """Give the task this agent holds back (pending again, its attempt counted), or up
        for good with `dead`: {"task": {...}}."""
        path = route("messages", channel, task_id, "release")
        answer = self.write("POST", path, {"dead": True} if dead else {})
        self.expect(answer or {}, path, "task", dict)
        return answer

    def queue(self, channel, limit=None):
        """{"counts": {"pending", "claimed", "done", "dead"}, "claimed": [...], "dead": [...]}."""
        path = route("queue", channel)
        answer = self.call("GET", path, params=_optional(limit=limit))
        self.expect(answer, path, "counts", dict)
        return answer

    # -- read positions -------------------------------------------------------------------

    def get_cursor(self, channel):
        """This agent's read position in the channel: {"read": id, "unread": n, ...}."""
        path = route("cursors", channel)
        answer = self.call("GET", path)
        self.expect(answer, path, "read", int)
        return answer

    def put_cursor(self, channel, read):
        """Move this agent's read position forward to message `read` (never back):
        {"read": the position now, "moved": whether it moved}."""
        path = route("cursors", channel)
        answer = self.write("PUT", path, {"read": read}, retry_lost=True)
        self.expect(answer or {}, path, "read", int)
        return answer

    # -- listings and status --------------------------------------------------------------

    def _listing(self, path, key):
        """Every row of a paged listing (GET /channels, /agents), page after page for at
        most LISTING_PAGES pages: {key: rows, "count": n, "more": whether rows were left
        unread, "cursor": where the next page would start}. A broker that does not page
        answers once, without `more`."""
        rows, after, reply = [], None, {}
        for _ in range(LISTING_PAGES):
            reply = self.call("GET", path, params=None if after is None else {"after": after})
            rows += self.expect(reply, path, key, list)
            cursor = reply.get("cursor")
            if reply.get("more") is not True or not isinstance(cursor, str) or cursor == after:
                break
            after = cursor
        return {key: rows, "count": len(rows), "more": reply.get("more") is True, "cursor": reply.get("cursor")}

    def channels(self):
        """Every channel, in the broker's order (by name)."""
        return self._listing("/channels", "channels")

    def agents(self):
        """Every agent, the most recently seen first."""
        listing = self._listing("/agents", "agents")

        def recent_first(agent):
            seen = agent.get("last_seen")
            return (-seen if isinstance(seen, (int, float)) else float("inf"), str(agent.get("id")))

        listing["agents"].sort(key=recent_first)
        return listing

    def status(self):
        return self.call("GET", "/status")

    # -- agents' public keys --------------------------------------------------------------

    def _sign(self, post, channel, into=None):
        if self.keys is not None and post.get("sender", self.keys.agent) == self.keys.agent:
            (post if into is None else into)["signature"] = self.keys.sign(post, channel)

    def agent_keys(self, agent):
        """{"agent", "current", "keys": [...], "changes"}: the keys `agent` published, the
        current one first; None if it has published none."""
        path = route("agents", agent, "keys")
        try:
            answer = self.call("GET", path)
        except BrokerError as error:
            if error.status == 404:
                return None
            raise
        self.expect(answer, path, "keys", list)
        return answer

    def publish_keys(self, agent, public):
        """Give the broker this agent's public keys ({"sign", "box", "box_sig"}):
        {"status": "added" | "changed" | "unchanged", ...} as agent_keys."""
        path = route("agents", agent, "keys")
        answer = self.write("PUT", path, public, retry_lost=True)
        self.expect(answer or {}, path, "status", str)
        return answer


def _optional(**fields):
    """The fields given (not None), for a request body or query."""
    return {name: value for name, value in fields.items() if value is not None}


def _new_key():
    """An idempotency key: unique to this one post, however often it is sent. A random
    (version 4) UUID in its usual form, made here: importing uuid costs a send more than
    this."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    digits = raw.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
