"""Notifications out: messages that match a rule of AGENT_COMMS_NOTIFY_FILE go to ntfy,
Gotify or a webhook (the rules and the allow-list: notify_rules.py).

Delivery is at least once and in id order per rule. Each rule keeps a cursor in the
database, moved past a message only once its receiver answered 2xx; a failure (refused,
timed out, any other answer) keeps the cursor, and the rule is tried again after a
backoff that doubles from retry_min to retry_max. So a message is never skipped, across
restarts too, and one may be sent twice when an answer is lost: webhooks carry an
X-Agent-Comms-Delivery id for that. Posts never wait for any of it.

Every worker runs a Notifier, and the one holding the database lease "notify" delivers,
each rule in a greenlet of its own; a worker that dies lets its lease lapse (LEASE
seconds, or twice the longest rule timeout) and another takes over.
"""

import hashlib
import hmac
import http.client
import logging
import os
import random
import socket
import time
from urllib.parse import urlsplit

import gevent
import orjson

from .notify_rules import redacted

log = logging.getLogger("agent_comms_broker.notify")

LEASE_NAME = "notify"
LEASE = 10.0
# How often the notifier looks for new messages, and a page of them.
POLL = 0.25
PAGE = 100
# What a notification's text holds at most (ntfy turns longer ones into attachments).
TEXT_MAX = 4000
# Gotify's priorities are 0 to 10: ours 1 to 5 spread over them.
GOTIFY_PRIORITY = {1: 1, 2: 3, 3: 5, 4: 8, 5: 10}
ERROR_MAX = 300


class DeliveryError(Exception):
    pass


def backoff(failures, retry_min, retry_max):
    """Seconds before the next try after `failures` failures in a row (jittered by 10%)."""
    delay = min(retry_max, retry_min * 2 ** min(failures - 1, 30))
    return delay * random.uniform(0.9, 1.1)


def title(message):
    return f"{message.sender} in {message.channel}"


def request_of(rule, message, now):
    """(url, body bytes, headers) of the POST that carries `message` for `rule`."""
    text = message.message if len(message.message) <= TEXT_MAX else message.message[: TEXT_MAX - 1] + "…"
    headers = {"Content-Type": "application/json"}
    if rule.kind == "ntfy":
        body = {"topic": rule.topic, "message": text, "title": title(message), "priority": message.priority}
        if message.tags:
            body["tags"] = list(message.tags)
        if rule.token:
            headers["Authorization"] = f"Bearer {rule.token}"
        return rule.url, orjson.dumps(body), headers
    if rule.kind == "gotify":
        body = {"title": title(message), "message": text, "priority": GOTIFY_PRIORITY[message.priority]}
        headers["X-Gotify-Key"] = rule.token
        return rule.url, orjson.dumps(body), headers
    body = orjson.dumps({"rule": rule.name, "message": message.as_dict()})
    stamp = str(int(now))
    signature = hmac.new(rule.secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    headers["X-Agent-Comms-Timestamp"] = stamp
    headers["X-Agent-Comms-Signature"] = f"sha256={signature}"
    headers["X-Agent-Comms-Delivery"] = f"{rule.name}-{message.id}"
    return rule.url, body, headers


class Notifier:
    def __init__(self, rules, store, run, metrics=None, alive=lambda: True):
        """`run`: the group committer's run (the notifier's writes share its commits)."""
        self.rules = rules
        self.store = store
        self.run = run
        self.metrics = metrics
        self.alive = alive
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        # The lease outlasts any one delivery twice over, and is renewed at its half: a
        # holder never sends past its lease, so two workers never deliver at once.
        self.lease = max(LEASE, 2 * max((rule.timeout for rule in rules.rules), default=0) + 5)
        self.leader = False
        self._lease_until = 0.0

    def start(self):
        """The lease keeper, and one greenlet per rule: a rule whose receiver hangs holds
        up no other."""
        greenlets = [gevent.spawn(self._keep_lease)]
        greenlets += [gevent.spawn(self._rule_loop, rule) for rule in self.rules.rules]
        return greenlets

    def _keep_lease(self):
        while self.alive():
            try:
                self._hold_lease()
            except Exception:
                log.exception("notifications: could not take or renew the lease; trying again")
                self.leader = False
            gevent.sleep(POLL)
        if self.leader:
            self.leader = False
            self.run(self.store.drop_lease_work(LEASE_NAME, self.owner))

    def _hold_lease(self):
        now = time.time()
        if self.leader and now < self._lease_until - self.lease / 2:
            return True
        held = self.run(self.store.take_lease_work(LEASE_NAME, self.owner, self.lease, now))
        self._lease_until = now + self.lease if held else 0.0
        self.leader = held
        return held

    def may_send(self, rule):
        """Whether this worker holds the lease for longer than one delivery of `rule`."""
        return self.leader and time.time() + rule.timeout + 1 < self._lease_until

    def _rule_loop(self, rule):
        while self.alive():
            try:
                if self.leader:
                    self.deliver_due(rule)
            except Exception:
                log.exception("notification rule %s: a round failed; trying again", rule.name)
            gevent.sleep(POLL)

    def deliver_due(self, rule):
        """If the rule's retry is due, go through what follows its cursor."""
        cursor, _, failures, _, next_try = self.store.notify_rules()[rule.name]
        if next_try > time.time() or cursor >= self.store.last_given_id():
            return
        while self.alive() and self.may_send(rule):
            page = self.store.all_after_id(cursor, PAGE)
            for message in page.messages:
                if not rule.matches(message):
                    continue
                if not self.may_send(rule):
                    return
                try:
                    self._send(rule, message)
                except DeliveryError as error:
                    self._failed(rule, message, failures + 1, str(error))
                    return
                cursor = message.id
                self.run(self.store.notify_advance_work(rule.name, cursor, 1))
                if self.metrics is not None:
                    self.metrics.notified(rule.name, "delivered")
            if page.cursor > cursor:
                cursor = page.cursor
                self.run(self.store.notify_advance_work(rule.name, cursor, 0))
            if not page.more:
                return

    def _failed(self, rule, message, failures, error):
        delay = backoff(failures, self.rules.retry_min, self.rules.retry_max)
        text = f"message {message.id}: {error}"[:ERROR_MAX]
        self.run(self.store.notify_failed_work(rule.name, text, time.time() + delay))
        if self.metrics is not None:
            self.metrics.notified(rule.name, "failed")
        log.warning("notification rule %s: %s; trying again in %.1f s", rule.name, text, delay)

    def _send(self, rule, message):
        """One POST, within the rule's timeout all told; redirects are not followed (a 3xx
        is a failure), and no proxy from the environment is used."""
        url, body, headers = request_of(rule, message, time.time())
        shown = redacted(url)  # errors are shown in /status: no path or query of the URL
        parts = urlsplit(url)
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=rule.timeout)
        else:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=rule.timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            with gevent.Timeout(rule.timeout, DeliveryError(f"no answer from {shown} within {rule.timeout:g} s")):
                connection.request("POST", target, body=body, headers=headers)
                answer = connection.getresponse()
                answer.read(65536)
        except DeliveryError:
            raise
        except (OSError, http.client.HTTPException) as error:
            raise DeliveryError(f"{shown}: {type(error).__name__}: {error}") from None
        finally:
            connection.close()
        if not 200 <= answer.status < 300:
            raise DeliveryError(f"{shown} answered {answer.status}")
