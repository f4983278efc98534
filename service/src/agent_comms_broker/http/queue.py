"""Any channel worked as a task queue: take the oldest pending task (waiting for one like
a long-poll), claim one by id and extend its lease, finish it with a reply, release it,
and the queue's view. A task is a message that is not a reply."""

import functools
import math
import time

from bottle import HTTPError, response

from ..access import allow_read, allow_write, caller
from ..store import TaskRefused, stored_size
from .keys import check_signatures
from .messages import MESSAGE_PATH
from .validate import (
    LIMIT_MAX,
    bad_request,
    int_param,
    optional_json_object,
    validate_channel,
    validate_post,
    whole_number,
)
from .waiting import Wait

LEASE_DEFAULT = 300.0
LEASE_MAX = 86400.0
QUEUE_LIST_DEFAULT = 100
# A waiting take looks again at least this often: a release or an ended lease on another
# worker brings no new message to wake it.
TAKE_RECHECK = 1.0


def register(app, broker):
    app.post("/queue/<channel>/take", callback=functools.partial(take, broker), access="write")
    app.get("/queue/<channel>", callback=functools.partial(queue_view, broker))
    for action, callback in (("claim", claim), ("done", done), ("release", release)):
        path = f"{MESSAGE_PATH}/{action}"
        app.post(path, callback=functools.partial(callback, broker), access="write")


def worked_channel(channel):
    """Taking and finishing tasks reads the channel and writes to it: both grants needed."""
    validate_channel(channel)
    allow_read(channel)
    allow_write(channel)


def seconds(body, name, default, high):
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"{name} must be a number of seconds")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float, as JSON allows
        value = math.inf
    if not math.isfinite(value) or value < 0:
        raise bad_request(f"{name} must be a number of seconds")
    return min(value, high)


def lease_of(body):
    lease = seconds(body, "lease", LEASE_DEFAULT, math.inf)
    if not 1 <= lease <= LEASE_MAX:
        raise bad_request(f"lease must be from 1 to {LEASE_MAX:g} seconds")
    return lease


def claimed(message, lease):
    task = message.task
    return {
        "status": "success",
        **message.as_dict(),
        "claim": {"agent": task.agent, "expires": task.expires, "attempt": task.attempt, "lease": lease},
    }


def refused(error):
    """409 naming the task's state and holder; 400 when the message is not a task."""
    if error.not_a_task:
        raise bad_request(str(error))
    response.status = 409
    task = error.task
    if task is None:  # never claimed
        return {"error": str(error), "holder": None, "expires": None, "task": None}
    return {"error": str(error), "holder": task.agent, "expires": task.expires, "task": task.as_dict()}


def take(broker, channel):
    worked_channel(channel)
    body = optional_json_object(broker.settings.max_body)
    lease = lease_of(body)
    wait = seconds(body, "wait", 0, broker.settings.max_wait)
    agent = broker.acting_agent()
    message = counted(broker, channel, take_task(broker, channel, agent, lease, wait))
    if message is None:
        response.status = 204
        return ""
    return claimed(message, lease)


def counted(broker, channel, message):
    """A task taken, counted in the metrics as handed out again when it was before."""
    if message is not None and message.task.attempt > 1 and broker.metrics is not None:
        broker.metrics.redelivered(channel)
    return message


def take_task(broker, channel, agent, lease, wait, tried=False):
    """The task `agent` takes now, or within `wait` seconds (None if none came); `tried`:
    a take found none a moment ago, so start waiting."""
    store, run = broker.store, broker.committer.run
    message = None if tried else run(store.take_work(channel, agent, lease))
    if message is not None or not wait:
        return message
    with Wait(broker, channel) as waiting:
        deadline = time.monotonic() + wait
        while message is None and not waiting.over and waiting.allowed():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if waiting.wait(min(remaining, TAKE_RECHECK)):
                waiting.watcher.take()
            message = run(store.take_work(channel, agent, lease))
    try:
        waiting.recheck()
    except HTTPError:
        # The token went, or lost the channel, while the request waited: a task taken in
        # that last second goes back.
        if message is not None:
            run(store.release_work(channel, message.id, agent))
        raise
    return message


def claim(broker, channel, message_id):
    worked_channel(channel)
    task_id = whole_number(message_id, "message id", 1)
    lease = lease_of(optional_json_object(broker.settings.max_body))
    agent = broker.acting_agent()
    try:
        return claimed(broker.committer.run(broker.store.claim_work(channel, task_id, agent, lease)), lease)
    except TaskRefused as error:
        return refused(error)


def done(broker, channel, message_id):
    """Finish a task (with its optional reply); with `"next": {"lease": ..., "wait": ...}`
    take the next task in the same request, and in the same transaction when one is there:
    a worker's loop is then one request per task."""
    worked_channel(channel)
    task_id = whole_number(message_id, "message id", 1)
    body = optional_json_object(broker.settings.max_body)
    following = body.get("next")
    if following is not None and not isinstance(following, dict):
        raise bad_request('next must be an object: {"lease": SECONDS, "wait": SECONDS}')
    if following is not None:
        lease = lease_of(following)
        wait = seconds(following, "wait", 0, broker.settings.max_wait)
    agent = broker.acting_agent()
    reply = None
    if body.get("message") is not None:
        item = {**body, "sender": agent, "reply_to": task_id}
        reply = validate_post(item, broker.settings.max_message, channel, caller())
        check_signatures(broker, [reply])
        broker.access.spend_bytes(stored_size(channel, agent, reply.message, reply.tags, reply.meta, reply.signature))
    settings, store = broker.settings, broker.store
    caps = {"max_agents": settings.max_agents if caller() is None else 0, "max_database": settings.max_database}
    finish = store.done_work(channel, task_id, agent, reply, **caps)
    if following is None:
        work = finish
    else:
        take_next = store.take_work(channel, agent, lease)

        def work(db):
            return finish(db), take_next(db)

    try:
        outcome = broker.committer.run(work)
    except TaskRefused as error:
        return refused(error)
    (message, answer), taken = outcome if following is not None else (outcome, None)
    if answer is not None and broker.metrics is not None:
        broker.metrics.stored(channel)
    reply_body = {"status": "success", "task": message.task.as_dict(), "reply": answer.as_dict() if answer else None}
    if following is not None:
        taken = counted(broker, channel, taken or take_task(broker, channel, agent, lease, wait, tried=True))
        reply_body["next"] = claimed(taken, lease) if taken else None
    return reply_body


def release(broker, channel, message_id):
    worked_channel(channel)
    task_id = whole_number(message_id, "message id", 1)
    dead = optional_json_object(broker.settings.max_body).get("dead", False)
    if not isinstance(dead, bool):
        raise bad_request("dead must be true or false")
    agent = broker.acting_agent()
    try:
        message = broker.committer.run(broker.store.release_work(channel, task_id, agent, dead))
    except TaskRefused as error:
        return refused(error)
    if message.task.state == "dead" and broker.metrics is not None:
        broker.metrics.given_up(channel)
    return {"status": "success", "task": message.task.as_dict()}


def queue_view(broker, channel):
    validate_channel(channel)
    allow_read(channel)
    limit = int_param("limit", 1, LIMIT_MAX) or QUEUE_LIST_DEFAULT
    broker.touch_reader()
    counts, holding, dead = broker.store.queue(channel, limit)
    return {
        "channel": channel,
        "counts": counts,
        "claimed": [
            {"id": task_id, "agent": agent, "expires": expires, "attempt": attempt}
            for task_id, agent, expires, attempt in holding
        ],
        "dead": [{"id": task_id, "agent": agent, "attempt": attempt} for task_id, agent, attempt in dead],
    }
