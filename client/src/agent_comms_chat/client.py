"""A small client of the agent-comms broker's HTTP API, apart from any printing, so other
Python code can use it:

    from agent_comms_chat.client import BrokerClient
    broker = BrokerClient("http://192.168.122.86:8080", agent_id="warp-ct200")
    broker.send("tasks", "Task completed successfully")
    for message in broker.watch("tasks", after=broker.latest_cursor("tasks")):
        ...

Each method is one call of the API; how requests travel, what is retried and how failures
read is transport.py's job."""

from .transport import TIMEOUT, BrokerError, Transport, route

__all__ = ["BrokerClient", "BrokerError"]

# The channels and agents listings are read page after page (1000 rows each), up to this
# many pages.
LISTING_PAGES = 100


class BrokerClient(Transport):
    # -- messages -------------------------------------------------------------------------

    def send(self, channel, message, sender=None):
        """Post one message; returns the stored message (with its id)."""
        post = {"message": message}
        if sender or self.agent_id:
            post["sender"] = sender or self.agent_id
        path = route("messages", channel)
        answer = self.write("POST", path, post)
        if answer is None:
            raise BrokerError(f"POST {self.url}{path} answered 204 with something that is not a JSON object")
        self.expect(answer, path, "id", int)
        return answer

    def read(self, channel, limit=None, since=None, after=None, wait=None):
        """One page: {"messages": [...], "cursor": ..., "gap": ..., "more": ...}."""
        params = {"limit": limit, "since": since, "after": after, "wait": wait}
        timeout = (TIMEOUT[0], TIMEOUT[1] + float(wait or 0))
        path = route("messages", channel)
        page = self.call("GET", path, timeout=timeout, params=params)
        self.expect(page, path, "messages", list)
        return page

    def latest_cursor(self, channel):
        """The cursor of the channel's newest message: watch after it for what comes next."""
        return self.expect(self.read(channel, limit=1), route("messages", channel), "cursor", int)

    def watch(self, channel, after, deadline=None, on_gap=None):
        """Yield the channel's messages after the cursor as they arrive, from its Server-Sent
        Events stream. A dropped connection (a broker restart) is reopened from the last id
        seen, so nothing is lost or repeated. Returns when `deadline` (time.monotonic())
        passes; raises BrokerError for an answer that retrying cannot fix (4xx)."""
        return self.stream(route("stream", channel), after, deadline=deadline, on_gap=on_gap)

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
