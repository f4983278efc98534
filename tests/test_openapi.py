"""The OpenAPI description (agent_comms_broker/openapi.json) and the broker agree: the same
routes, the document served as it is, and real replies, successes and errors, have a status
the document lists for their operation and a body its schema accepts."""

import json
import re
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from urllib.parse import quote

import pytest
import requests
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import agent_comms_broker
from agent_comms_broker.config import Settings
from agent_comms_broker.http.app import create_app
from broker_process import BIN

DOCUMENT_FILE = resources.files("agent_comms_broker").joinpath("openapi.json")
DOCUMENT = json.loads(DOCUMENT_FILE.read_bytes())
DOCUMENT_URI = "urn:agent-comms:openapi.json"
REGISTRY = Registry().with_resource(DOCUMENT_URI, Resource(contents=DOCUMENT, specification=DRAFT202012))
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Statuses the document lists that no test here can cause: a full disk.
NOT_TRIGGERED = {"507"}


def operations():
    return {
        (method, path): operation
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def escape(segment):
    return segment.replace("~", "~0").replace("/", "~1")


def at(pointer):
    node = DOCUMENT
    for part in pointer.split("/")[1:]:
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def follow(pointer):
    """The object at a JSON pointer into the document, through its $refs: (object, pointer)."""
    node = at(pointer)
    while "$ref" in node:
        pointer = node["$ref"].removeprefix("#")
        node = at(pointer)
    return node, pointer


def validator(pointer):
    """A validator for the schema at a pointer; its "#/components/..." refs resolve in the document."""
    return Draft202012Validator({"$ref": f"{DOCUMENT_URI}#{quote(pointer, safe='/~')}"}, registry=REGISTRY)


def assert_valid(pointer, instance):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(pointer).iter_errors(instance)]
    assert not errors, f"{instance!r} does not match {pointer}: {errors}"


def documented_response(method, template, status):
    responses = f"/paths/{escape(template)}/{method}/responses"
    assert str(status) in at(responses), f"{method.upper()} {template} answered {status}, not documented"
    return follow(f"{responses}/{status}")


def check_reply(reply, response, pointer):
    """The reply has a documented media type, the documented required headers and a valid body
    (none where the document gives no content: 204)."""
    for name, header in response.get("headers", {}).items():
        if header.get("required"):
            assert name in reply.headers, f"{name} header missing ({pointer})"
    if "content" not in response:
        assert reply.content == b"" and "Content-Type" not in reply.headers, f"a body where {pointer} has none"
        return
    media = reply.headers.get("Content-Type", "").split(";")[0].strip()
    assert media in response["content"], f"{media!r} is not documented ({pointer})"
    if media == "application/json":
        assert_valid(f"{pointer}/content/{escape(media)}/schema", reply.json())


def check(method, template, reply, status):
    assert reply.status_code == status, reply.text
    response, pointer = documented_response(method, template, status)
    check_reply(reply, response, pointer)


# -- (a) the routes ----------------------------------------------------------------------


def test_every_route_is_documented_and_every_operation_served():
    app = create_app(Settings(), runtime=None)
    served = {
        (route.method.lower(), re.sub(r"<(\w+)(?::[^>]*)?>", r"{\1}", route.rule))
        for route in app.routes
        # The dashboard's page, script and style are no operations of the API.
        if route.method != "HEAD" and not route.rule.startswith("/ui")
    }
    assert served == set(operations())


def test_document_is_openapi_3_1_with_valid_schemas():
    assert DOCUMENT["openapi"] == "3.1.0"
    assert DOCUMENT["info"]["version"] == agent_comms_broker.__version__
    for name, schema in DOCUMENT["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
        validator(f"/components/schemas/{name}").is_valid(None)  # every $ref on the way resolves
    ids = [operation["operationId"] for operation in operations().values()]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("method", "template"), sorted(operations()))
def test_operation_declares_its_path_parameters_and_references_resolve(method, template):
    item = DOCUMENT["paths"][template]
    parameters = [
        follow(p["$ref"].removeprefix("#"))[0] if "$ref" in p else p
        for p in item.get("parameters", []) + item[method].get("parameters", [])
    ]
    in_path = {p["name"] for p in parameters if p["in"] == "path"}
    assert in_path == set(re.findall(r"{(\w+)}", template))
    for status in item[method]["responses"]:
        response, pointer = documented_response(method, template, status)
        for media, content in response.get("content", {}).items():
            if "schema" in content:
                validator(f"{pointer}/content/{escape(media)}/schema").is_valid(None)


# -- (b) the served document -----------------------------------------------------------------


def test_broker_serves_the_file(url):
    reply = requests.get(f"{url}/openapi.json", timeout=10)
    check("get", "/openapi.json", reply, 200)
    assert reply.content == DOCUMENT_FILE.read_bytes()
    assert reply.json() == DOCUMENT
    assert reply.json()["info"]["version"] == agent_comms_broker.__version__


# -- (c) real replies ------------------------------------------------------------------------

AGENT = {"X-Agent-ID": "openapi-tester"}
BAD_AGENT = {"X-Agent-ID": "x" * 129}
ONE = {"sender": "openapi-tester", "message": "hello"}
MESSAGES = "/messages/{channel}"
ONE_MESSAGE = "/messages/{channel}/{message_id}"
RECEIPTS = "/messages/{channel}/{message_id}/receipts"
CLAIM = "/messages/{channel}/{message_id}/claim"
DONE = "/messages/{channel}/{message_id}/done"
RELEASE = "/messages/{channel}/{message_id}/release"
TAKE = "/queue/{channel}/take"
QUEUE = "/queue/{channel}"
CURSOR = "/cursors/{channel}"
KEYS = "/agents/{agent}/keys"
# Two public keys (32 bytes each, base64), and a step that publishes the first for the case's agent.
KEY_A = "eu7AVcnuASbdjq/wG2drcKD2I6QyR6can9m7/DBvEYA="
KEY_B = "ShqgUmjS7o8BUHKR/YI7rTU0noZ6Xipw6KozH9bQgQU="
PUBLISHED = ("put", "/agents/k-{channel}/keys", {"json": {"sign": KEY_A}})
# No message has this id (a path's {message_id} is the message the test posts first).
MISSING = "1000000000000"
WORKER = {"X-Agent-ID": "openapi-worker"}
OTHER = {"X-Agent-ID": "openapi-other"}
# Idempotency keys name the case's channel: the same sender's key for another channel is a 409.
KEYED = {"Idempotency-Key": "key-{channel}"}
KEYED_BATCH = [{**ONE, "key": "a-{channel}"}, {**ONE, "key": "b-{channel}"}]


class Chunks:
    """A body requests sends chunked (it has no length), fresh on every send."""

    def __init__(self, *parts):
        self.parts = parts

    def __iter__(self):
        return iter(self.parts)


# In a case's request (path, params, body, headers): POSTED_ID and "{message_id}" are the id of
# the message the test posts first, "{last_id}" the id of the message its last `before` step
# made or answered (a post, a take, a done's reply), "{channel}" the test's channel.
POSTED_ID = object()


def case(name, method, template, status, path=None, before=(), body_valid=None, **kwargs):
    """A request and the documented status it must get. `before`: (method, path, kwargs) steps
    that must succeed first. `body_valid`: whether the request schema takes the JSON body (by
    default: only when the status is 2xx; checked for 2xx and 400 answers, and when given)."""
    return pytest.param(method, template, status, path, before, body_valid, kwargs, id=name)


def posted_by(headers, template=CLAIM, **kwargs):
    return ("post", template, {"headers": headers, **kwargs})


CLAIMED = posted_by(WORKER)
CLAIMED_BY_OTHER = posted_by(OTHER)
TAKEN = posted_by(WORKER, TAKE)
A_REPLY = ("post", MESSAGES, {"json": {**ONE, "reply_to": POSTED_ID}})
READ_UP_TO_IT = ("put", CURSOR, {"json": {"read": POSTED_ID}, "headers": AGENT})


CASES = [
    case("health", "get", "/healthz", 200),
    case("status", "get", "/status", 200, headers=AGENT),
    case("status-bad-agent", "get", "/status", 400, headers=BAD_AGENT),
    case("channels", "get", "/channels", 200, headers=AGENT),
    case("channels-bad-agent", "get", "/channels", 400, headers=BAD_AGENT),
    case("agents", "get", "/agents", 200, headers=AGENT),
    case("agents-bad-agent", "get", "/agents", 400, headers=BAD_AGENT),
    case("read-latest", "get", MESSAGES, 200, headers=AGENT),
    case("read-after", "get", MESSAGES, 200, params={"after": 0, "limit": 1}),
    case("read-since-number", "get", MESSAGES, 200, params={"since": "0.5", "limit": 1}),
    case("read-since-iso", "get", MESSAGES, 200, params={"since": "2000-01-01T00:00:00Z"}),
    case("read-since-naive-iso", "get", MESSAGES, 200, params={"since": "2000-01-01 00:00:00"}),
    case("read-long-poll", "get", MESSAGES, 200, params={"after": POSTED_ID, "wait": "0.2"}),
    case("read-after-past-the-newest-id", "get", MESSAGES, 400, params={"after": 10**12}),
    case("stream-past-the-newest-id", "get", "/stream", 400, headers={"Last-Event-ID": str(10**12)}),
    case("read-bad-channel", "get", MESSAGES, 400, path="/messages/-bad"),
    case("read-long-channel", "get", MESSAGES, 400, path="/messages/" + "c" * 65),
    case("read-limit-0", "get", MESSAGES, 400, params={"limit": 0}),
    case("read-limit-1001", "get", MESSAGES, 400, params={"limit": 1001}),
    case("read-limit-text", "get", MESSAGES, 400, params={"limit": "ten"}),
    case("read-after-negative", "get", MESSAGES, 400, params={"after": -1}),
    case("read-after-past-ids", "get", MESSAGES, 400, params={"after": 2**63}),
    case("read-since-garbage", "get", MESSAGES, 400, params={"since": "yesterday"}),
    case("read-since-negative", "get", MESSAGES, 400, params={"since": "-5"}),
    case("read-after-and-since", "get", MESSAGES, 400, params={"after": 1, "since": 1}),
    case("read-wait-without-cursor", "get", MESSAGES, 400, params={"wait": 1}),
    case("read-wait-negative", "get", MESSAGES, 400, params={"after": 0, "wait": -1}),
    case("read-bad-agent", "get", MESSAGES, 400, headers=BAD_AGENT),
    case("read-slash-in-channel", "get", MESSAGES, 404, path="/messages/a%2Fb%2Fc"),
    case("read-empty-channel", "get", MESSAGES, 404, path="/messages/"),
    case("post-one", "post", MESSAGES, 201, json=ONE),
    case("post-batch", "post", MESSAGES, 201, json=[ONE, {"sender": "other", "message": "two", "extra": 1}]),
    case("post-unicode", "post", MESSAGES, 201, json={"sender": "ägent 🚀", "message": "line\nline\t✅"}),
    case("post-bad-channel", "post", MESSAGES, 400, path="/messages/_bad", json=ONE),
    case("post-empty-body", "post", MESSAGES, 400, data=b""),
    case("post-blank-body", "post", MESSAGES, 400, data=b"  \n"),
    case("post-bad-json", "post", MESSAGES, 400, data=b'{"sender": "a",'),
    case("post-not-utf8", "post", MESSAGES, 400, data=b'{"sender": "\xff", "message": "m"}'),
    case("post-not-an-object", "post", MESSAGES, 400, json="hello"),
    case("post-missing-sender", "post", MESSAGES, 400, json={"message": "m"}),
    case("post-missing-message", "post", MESSAGES, 400, json={"sender": "a"}),
    case("post-sender-not-string", "post", MESSAGES, 400, json={"sender": 7, "message": "m"}),
    case("post-sender-empty", "post", MESSAGES, 400, json={"sender": "", "message": "m"}),
    case("post-sender-too-long", "post", MESSAGES, 400, json={"sender": "s" * 129, "message": "m"}),
    case("post-sender-control", "post", MESSAGES, 400, json={"sender": "a\nb", "message": "m"}),
    case("post-message-not-string", "post", MESSAGES, 400, json={"sender": "a", "message": ["m"]}),
    case("post-message-empty", "post", MESSAGES, 400, json={"sender": "a", "message": ""}),
    case("post-lone-surrogate", "post", MESSAGES, 400, data=b'{"sender": "a", "message": "\\ud800"}'),
    case("post-empty-batch", "post", MESSAGES, 400, json=[]),
    case("post-bad-batch-item", "post", MESSAGES, 400, json=[ONE, {"sender": "a"}]),
    case("post-slash-in-channel", "post", MESSAGES, 404, path="/messages/a%2Fb%2Fc", json=ONE),
    case("post-body-too-big", "post", MESSAGES, 413, json={"sender": "a", "message": "m" * 65537}),
    case("post-chunked-too-big", "post", MESSAGES, 413, data=Chunks(b"[" + b" " * 1_100_000, b"]")),
    case("post-batch-too-long", "post", MESSAGES, 413, json=[ONE] * 501),
    case("stream-bad-after", "get", "/stream", 400, params={"after": "x"}),
    case("stream-bad-last-event-id", "get", "/stream", 400, headers={"Last-Event-ID": "-1"}),
    case("stream-last-event-id-past-ids", "get", "/stream", 400, headers={"Last-Event-ID": str(2**63)}),
    case("stream-bad-agent", "get", "/stream", 400, headers=BAD_AGENT),
    case("stream-channel-bad-channel", "get", "/stream/{channel}", 400, path="/stream/.x"),
    case("stream-channel-bad-after", "get", "/stream/{channel}", 400, params={"after": "1.5"}),
    case("stream-channel-bad-agent", "get", "/stream/{channel}", 400, headers=BAD_AGENT),
    case("stream-channel-slash", "get", "/stream/{channel}", 404, path="/stream/a%2Fb"),
    # -- coordination (issue 10): posts with options and idempotency keys
    case(
        "post-with-options",
        "post",
        MESSAGES,
        201,
        json={**ONE, "priority": 5, "tags": ["build", "ci"], "meta": {"kind": "build", "n": [1]}, "key": "k-{channel}"},
    ),
    case(
        "post-options-null",
        "post",
        MESSAGES,
        201,
        json={**ONE, "reply_to": None, "priority": None, "tags": None, "meta": None, "key": None},
    ),
    case("post-reply", "post", MESSAGES, 201, json={**ONE, "reply_to": POSTED_ID}),
    case("post-to-an-inbox", "post", MESSAGES, 201, path="/messages/@openapi-inbox", json=ONE),
    case("post-batch-with-keys", "post", MESSAGES, 201, json=KEYED_BATCH),
    case(
        "post-repeated-key-header",
        "post",
        MESSAGES,
        200,
        before=[("post", MESSAGES, {"json": ONE, "headers": KEYED})],
        json=ONE,
        headers=KEYED,
    ),
    case(
        "post-repeated-key-body",
        "post",
        MESSAGES,
        200,
        before=[("post", MESSAGES, {"json": {**ONE, "key": "k-{channel}"}})],
        json={**ONE, "message": "another text", "key": "k-{channel}"},
    ),
    case(
        "post-repeated-batch",
        "post",
        MESSAGES,
        200,
        before=[("post", MESSAGES, {"json": KEYED_BATCH})],
        json=KEYED_BATCH,
    ),
    case(
        "post-batch-partly-repeated",
        "post",
        MESSAGES,
        201,
        before=[("post", MESSAGES, {"json": KEYED_BATCH[:1]})],
        json=KEYED_BATCH,
    ),
    case(
        "post-key-of-another-channel",
        "post",
        MESSAGES,
        409,
        before=[("post", "/messages/{channel}-b", {"json": ONE, "headers": KEYED})],
        json=ONE,
        headers=KEYED,
    ),
    case("post-reply-to-no-message", "post", MESSAGES, 400, body_valid=True, json={**ONE, "reply_to": 10**12}),
    case("post-reply-to-0", "post", MESSAGES, 400, json={**ONE, "reply_to": 0}),
    case("post-priority-0", "post", MESSAGES, 400, json={**ONE, "priority": 0}),
    case("post-priority-6", "post", MESSAGES, 400, json={**ONE, "priority": 6}),
    case("post-priority-text", "post", MESSAGES, 400, json={**ONE, "priority": "high"}),
    case("post-priority-true", "post", MESSAGES, 400, json={**ONE, "priority": True}),
    case("post-tags-not-a-list", "post", MESSAGES, 400, json={**ONE, "tags": "build"}),
    case("post-tags-11", "post", MESSAGES, 400, json={**ONE, "tags": [f"t{n}" for n in range(11)]}),
    case("post-tag-too-long", "post", MESSAGES, 400, json={**ONE, "tags": ["t" * 33]}),
    case("post-tag-empty", "post", MESSAGES, 400, json={**ONE, "tags": [""]}),
    case("post-tag-spaces", "post", MESSAGES, 400, json={**ONE, "tags": [" build"]}),
    case("post-tag-not-a-string", "post", MESSAGES, 400, json={**ONE, "tags": [1]}),
    case("post-meta-not-an-object", "post", MESSAGES, 400, json={**ONE, "meta": [1]}),
    case("post-meta-too-big", "post", MESSAGES, 400, body_valid=True, json={**ONE, "meta": {"x": "m" * 4100}}),
    case("post-meta-huge-integer", "post", MESSAGES, 400, body_valid=True, json={**ONE, "meta": {"n": 2**64}}),
    case("post-key-empty", "post", MESSAGES, 400, json={**ONE, "key": ""}),
    case("post-key-too-long", "post", MESSAGES, 400, json={**ONE, "key": "k" * 129}),
    case("post-key-not-a-string", "post", MESSAGES, 400, json={**ONE, "key": 5}),
    case("post-key-header-with-batch", "post", MESSAGES, 400, body_valid=True, json=[ONE], headers=KEYED),
    case(
        "post-key-header-and-body-differ",
        "post",
        MESSAGES,
        400,
        body_valid=True,
        json={**ONE, "key": "k"},
        headers=KEYED,
    ),
    case(
        "post-key-header-too-long",
        "post",
        MESSAGES,
        400,
        body_valid=True,
        json=ONE,
        headers={"Idempotency-Key": "k" * 129},
    ),
    case(
        "post-batch-same-key-twice",
        "post",
        MESSAGES,
        400,
        body_valid=True,
        json=[{**ONE, "key": "k"}, {**ONE, "key": "k"}],
    ),
    # reads: threads, tags, priorities, read positions, inboxes
    case("read-thread", "get", MESSAGES, 200, before=[A_REPLY], params={"thread": POSTED_ID}),
    case(
        "read-thread-long-poll", "get", MESSAGES, 200, params={"thread": POSTED_ID, "after": POSTED_ID, "wait": "0.2"}
    ),
    case(
        "read-tag",
        "get",
        MESSAGES,
        200,
        before=[("post", MESSAGES, {"json": {**ONE, "tags": ["t"]}})],
        params={"tag": "t"},
    ),
    case("read-min-priority", "get", MESSAGES, 200, params={"min_priority": 4, "after": 0}),
    case("read-unread", "get", MESSAGES, 200, headers=AGENT, params={"unread": "1"}),
    case(
        "read-unread-long-poll",
        "get",
        MESSAGES,
        200,
        before=[READ_UP_TO_IT],
        headers=AGENT,
        params={"unread": "true", "wait": "0.2"},
    ),
    case("read-unread-0", "get", MESSAGES, 200, params={"unread": "0"}),
    case("read-an-inbox", "get", MESSAGES, 200, path="/messages/@openapi-tester"),
    case("read-unread-without-agent", "get", MESSAGES, 400, params={"unread": "1"}),
    case("read-unread-and-after", "get", MESSAGES, 400, headers=AGENT, params={"unread": "1", "after": 0}),
    case("read-unread-yes", "get", MESSAGES, 400, headers=AGENT, params={"unread": "yes"}),
    case("read-thread-0", "get", MESSAGES, 400, params={"thread": 0}),
    case("read-thread-text", "get", MESSAGES, 400, params={"thread": "first"}),
    case("read-tag-too-long", "get", MESSAGES, 400, params={"tag": "t" * 33}),
    case("read-tag-spaces", "get", MESSAGES, 400, params={"tag": " t"}),
    case("read-min-priority-0", "get", MESSAGES, 400, params={"min_priority": 0}),
    case("read-min-priority-6", "get", MESSAGES, 400, params={"min_priority": 6}),
    case("read-bad-inbox", "get", MESSAGES, 400, path="/messages/@-x"),
    # one message, its receipts
    case("message", "get", ONE_MESSAGE, 200, headers=AGENT),
    case("message-claimed", "get", ONE_MESSAGE, 200, before=[TAKEN]),
    case("message-missing", "get", ONE_MESSAGE, 404, path="/messages/{channel}/" + MISSING),
    case("message-of-another-channel", "get", ONE_MESSAGE, 404, path="/messages/{channel}-b/{message_id}"),
    case("message-id-0", "get", ONE_MESSAGE, 400, path="/messages/{channel}/0"),
    case("message-id-text", "get", ONE_MESSAGE, 404, path="/messages/{channel}/one"),
    case("message-id-too-large", "get", ONE_MESSAGE, 400, path=f"/messages/{{channel}}/{2**63}"),
    case("message-bad-channel", "get", ONE_MESSAGE, 400, path="/messages/-bad/1"),
    case("message-bad-agent", "get", ONE_MESSAGE, 400, headers=BAD_AGENT),
    case("receipts", "get", RECEIPTS, 200, before=[READ_UP_TO_IT]),
    # search (issue 14)
    case("metrics", "get", "/metrics", 200),
    case("activity", "get", "/activity", 200, params={"minutes": 5}),
    case("activity-default", "get", "/activity", 200, headers=AGENT),
    case("activity-minutes-0", "get", "/activity", 400, params={"minutes": 0}),
    case("activity-bad-agent", "get", "/activity", 400, headers=BAD_AGENT),
    case("queues", "get", "/queues", 200, before=[TAKEN]),
    case("queues-bad-agent", "get", "/queues", 400, headers=BAD_AGENT),
    case("search", "get", "/search", 200, params={"q": "hello"}),
    case("search-channel", "get", "/search", 200, params={"q": "hel*", "channel": "{channel}", "limit": 1}),
    case("search-phrase-before", "get", "/search", 200, params={"q": '"hello" world', "before": POSTED_ID}),
    case("search-without-q", "get", "/search", 400),
    case("search-blank-q", "get", "/search", 400, params={"q": "  "}),
    case("search-punctuation-only", "get", "/search", 400, params={"q": '- * ""'}),
    case("search-control-character", "get", "/search", 400, params={"q": "a\x00b"}),
    case("search-q-too-long", "get", "/search", 400, params={"q": "w" * 501}),
    case("search-17-words", "get", "/search", 400, params={"q": " ".join(["w"] * 17)}),
    case("search-bad-channel", "get", "/search", 400, params={"q": "hello", "channel": "-bad"}),
    case("search-limit-0", "get", "/search", 400, params={"q": "hello", "limit": 0}),
    case("search-before-0", "get", "/search", 400, params={"q": "hello", "before": 0}),
    case("search-bad-agent", "get", "/search", 400, params={"q": "hello"}, headers=BAD_AGENT),
    case("receipts-none", "get", RECEIPTS, 200),
    case("receipts-missing", "get", RECEIPTS, 404, path=f"/messages/{{channel}}/{MISSING}/receipts"),
    case("receipts-id-0", "get", RECEIPTS, 400, path="/messages/{channel}/0/receipts"),
    case("receipts-id-negative", "get", RECEIPTS, 404, path="/messages/{channel}/-1/receipts"),
    case("receipts-bad-agent", "get", RECEIPTS, 400, headers=BAD_AGENT),
    # task queues
    case("take", "post", TAKE, 200, headers=WORKER),
    case("take-with-lease-and-wait", "post", TAKE, 200, headers=WORKER, json={"lease": 60.5, "wait": 1}),
    case("take-none-pending", "post", TAKE, 204, before=[TAKEN], headers=WORKER),
    case("take-waits-for-none", "post", TAKE, 204, before=[TAKEN], headers=WORKER, json={"wait": 0.3}),
    case(
        "take-after-a-lease-ends",
        "post",
        TAKE,
        200,
        before=[posted_by(WORKER, TAKE, json={"lease": 1})],
        headers=OTHER,
        json={"wait": 3},
    ),
    case("take-no-agent", "post", TAKE, 400),
    case("take-bad-agent", "post", TAKE, 400, headers=BAD_AGENT),
    case("take-lease-0", "post", TAKE, 400, headers=WORKER, json={"lease": 0}),
    case("take-lease-too-long", "post", TAKE, 400, headers=WORKER, json={"lease": 86401}),
    case("take-lease-huge", "post", TAKE, 400, headers=WORKER, json={"lease": 10**400}),
    case("take-lease-text", "post", TAKE, 400, headers=WORKER, json={"lease": "300"}),
    case("take-wait-negative", "post", TAKE, 400, headers=WORKER, json={"wait": -1}),
    case("take-wait-text", "post", TAKE, 400, headers=WORKER, json={"wait": "1"}),
    case("take-not-an-object", "post", TAKE, 400, headers=WORKER, json=[{"lease": 1}]),
    case("take-bad-json", "post", TAKE, 400, headers=WORKER, data=b"{"),
    case("take-bad-channel", "post", TAKE, 400, path="/queue/-x/take", headers=WORKER),
    case("take-slash-in-channel", "post", TAKE, 404, path="/queue/a%2Fb/take", headers=WORKER),
    case("take-body-too-big", "post", TAKE, 413, headers=WORKER, json={"lease": 60, "padding": "p" * 1_100_000}),
    case("claim", "post", CLAIM, 200, headers=WORKER),
    case("claim-with-lease", "post", CLAIM, 200, headers=WORKER, json={"lease": 1}),
    case("claim-again-extends", "post", CLAIM, 200, before=[CLAIMED], headers=WORKER, json={"lease": 600}),
    case("claim-a-released-task", "post", CLAIM, 200, before=[CLAIMED, posted_by(WORKER, RELEASE)], headers=OTHER),
    case("claim-held-by-another", "post", CLAIM, 409, before=[CLAIMED_BY_OTHER], headers=WORKER),
    case("claim-a-done-task", "post", CLAIM, 409, before=[CLAIMED, posted_by(WORKER, DONE)], headers=WORKER),
    case(
        "claim-a-dead-task",
        "post",
        CLAIM,
        409,
        before=[CLAIMED, posted_by(WORKER, RELEASE, json={"dead": True})],
        headers=OTHER,
    ),
    case(
        "claim-a-reply",
        "post",
        CLAIM,
        400,
        path="/messages/{channel}/{last_id}/claim",
        before=[A_REPLY],
        headers=WORKER,
    ),
    case("claim-missing", "post", CLAIM, 404, path=f"/messages/{{channel}}/{MISSING}/claim", headers=WORKER),
    case("claim-id-0", "post", CLAIM, 400, path="/messages/{channel}/0/claim", headers=WORKER),
    case("claim-id-text", "post", CLAIM, 404, path="/messages/{channel}/x/claim", headers=WORKER),
    case("claim-bad-channel", "post", CLAIM, 400, path="/messages/_x/1/claim", headers=WORKER),
    case("claim-no-agent", "post", CLAIM, 400),
    case("claim-bad-agent", "post", CLAIM, 400, headers=BAD_AGENT),
    case("claim-lease-too-short", "post", CLAIM, 400, headers=WORKER, json={"lease": 0.5}),
    case("claim-not-an-object", "post", CLAIM, 400, headers=WORKER, json=1),
    case("claim-body-too-big", "post", CLAIM, 413, headers=WORKER, json={"padding": "p" * 1_100_000}),
    case(
        "done",
        "post",
        DONE,
        200,
        before=[CLAIMED],
        headers=WORKER,
        json={"message": "finished", "priority": 4, "tags": ["result"], "meta": {"exit": 0}, "key": "k-{channel}"},
    ),
    case("done-without-a-reply", "post", DONE, 200, before=[CLAIMED], headers=WORKER),
    case(
        "done-and-next",
        "post",
        DONE,
        200,
        before=[CLAIMED],
        headers=WORKER,
        json={"message": "m", "next": {"lease": 5}},
    ),
    case("done-next-not-an-object", "post", DONE, 400, before=[CLAIMED], headers=WORKER, json={"next": 5}),
    case("done-next-bad-lease", "post", DONE, 400, before=[CLAIMED], headers=WORKER, json={"next": {"lease": 0}}),
    case("done-null-message", "post", DONE, 200, before=[CLAIMED], headers=WORKER, json={"message": None, "tags": 1}),
    case(
        "done-again",
        "post",
        DONE,
        200,
        before=[CLAIMED, posted_by(WORKER, DONE, json={"message": "first"})],
        headers=WORKER,
        json={"message": "second"},
    ),
    # A task no one holds is refused with 409, whether never claimed or released since.
    case("done-never-claimed", "post", DONE, 409, headers=WORKER),
    case("done-released", "post", DONE, 409, before=[CLAIMED, posted_by(WORKER, RELEASE)], headers=WORKER),
    case("done-held-by-another", "post", DONE, 409, before=[CLAIMED_BY_OTHER], headers=WORKER, json={"message": "m"}),
    case(
        "done-reply-key-of-another-channel",
        "post",
        DONE,
        409,
        before=[
            ("post", "/messages/{channel}-b", {"json": {"sender": "openapi-worker", "message": "m"}, "headers": KEYED}),
            CLAIMED,
        ],
        headers=WORKER,
        json={"message": "r", "key": "key-{channel}"},
    ),
    case(
        "done-a-reply", "post", DONE, 400, path="/messages/{channel}/{last_id}/done", before=[A_REPLY], headers=WORKER
    ),
    case("done-missing", "post", DONE, 404, path=f"/messages/{{channel}}/{MISSING}/done", headers=WORKER),
    case("done-empty-message", "post", DONE, 400, before=[CLAIMED], headers=WORKER, json={"message": ""}),
    case("done-message-not-a-string", "post", DONE, 400, before=[CLAIMED], headers=WORKER, json={"message": 5}),
    case("done-bad-tags", "post", DONE, 400, before=[CLAIMED], headers=WORKER, json={"message": "m", "tags": [""]}),
    case("done-message-too-big", "post", DONE, 413, before=[CLAIMED], headers=WORKER, json={"message": "m" * 65537}),
    case("done-no-agent", "post", DONE, 400, body_valid=True, json={"message": "m"}),
    case("done-not-an-object", "post", DONE, 400, headers=WORKER, json=["m"]),
    case("release", "post", RELEASE, 200, before=[CLAIMED], headers=WORKER),
    case("release-dead", "post", RELEASE, 200, before=[CLAIMED], headers=WORKER, json={"dead": True}),
    case("release-never-claimed", "post", RELEASE, 409, headers=WORKER),
    case("release-released", "post", RELEASE, 409, before=[CLAIMED, posted_by(WORKER, RELEASE)], headers=WORKER),
    case("release-held-by-another", "post", RELEASE, 409, before=[CLAIMED_BY_OTHER], headers=WORKER),
    case("release-dead-yes", "post", RELEASE, 400, before=[CLAIMED], headers=WORKER, json={"dead": "yes"}),
    case("release-dead-null", "post", RELEASE, 400, before=[CLAIMED], headers=WORKER, json={"dead": None}),
    case("release-missing", "post", RELEASE, 404, path=f"/messages/{{channel}}/{MISSING}/release", headers=WORKER),
    case("release-no-agent", "post", RELEASE, 400),
    case("release-body-too-big", "post", RELEASE, 413, headers=WORKER, json={"padding": "p" * 1_100_000}),
    case("queue", "get", QUEUE, 200, headers=AGENT),
    case(
        "queue-with-tasks",
        "get",
        QUEUE,
        200,
        before=[
            ("post", MESSAGES, {"json": ONE}),
            TAKEN,
            TAKEN,
            posted_by(WORKER, "/messages/{channel}/{last_id}/release", json={"dead": True}),
        ],
        params={"limit": 1},
    ),
    case("queue-limit-0", "get", QUEUE, 400, params={"limit": 0}),
    case("queue-limit-1001", "get", QUEUE, 400, params={"limit": 1001}),
    case("queue-bad-channel", "get", QUEUE, 400, path="/queue/.x"),
    case("queue-bad-agent", "get", QUEUE, 400, headers=BAD_AGENT),
    case("queue-slash-in-channel", "get", QUEUE, 404, path="/queue/a%2Fb"),
    # read positions
    case("cursor-move", "put", CURSOR, 200, headers=AGENT, json={"read": POSTED_ID}),
    case("cursor-move-back", "put", CURSOR, 200, before=[READ_UP_TO_IT], headers=AGENT, json={"read": 0}),
    case(
        "cursor-move-in-an-inbox", "put", CURSOR, 200, path="/cursors/@openapi-tester", headers=AGENT, json={"read": 0}
    ),
    case("cursor-move-without-read", "put", CURSOR, 400, headers=AGENT, json={}),
    case("cursor-move-read-text", "put", CURSOR, 400, headers=AGENT, json={"read": "1"}),
    case("cursor-move-read-negative", "put", CURSOR, 400, headers=AGENT, json={"read": -1}),
    case("cursor-move-past-the-newest-id", "put", CURSOR, 400, body_valid=True, headers=AGENT, json={"read": 10**12}),
    case("cursor-move-no-agent", "put", CURSOR, 400, body_valid=True, json={"read": 0}),
    case("cursor-move-bad-agent", "put", CURSOR, 400, body_valid=True, headers=BAD_AGENT, json={"read": 0}),
    case("cursor-move-empty-body", "put", CURSOR, 400, headers=AGENT, data=b""),
    case("cursor-move-bad-json", "put", CURSOR, 400, headers=AGENT, data=b"{"),
    case("cursor-move-bad-channel", "put", CURSOR, 400, path="/cursors/-x", headers=AGENT, json={"read": 0}),
    case("cursor-move-slash-in-channel", "put", CURSOR, 404, path="/cursors/a%2Fb", headers=AGENT, json={"read": 0}),
    case("cursor-move-body-too-big", "put", CURSOR, 413, headers=AGENT, json={"read": 0, "padding": "p" * 1_100_000}),
    case("cursor", "get", CURSOR, 200, headers=AGENT),
    case("cursor-no-agent", "get", CURSOR, 400),
    case("cursor-bad-agent", "get", CURSOR, 400, headers=BAD_AGENT),
    case("cursor-bad-channel", "get", CURSOR, 400, path="/cursors/-x", headers=AGENT),
    case("cursor-slash-in-channel", "get", CURSOR, 404, path="/cursors/a%2Fb", headers=AGENT),
    case("openapi", "get", "/openapi.json", 200),
    # agents' public keys
    case("keys-publish", "put", KEYS, 201, path="/agents/k-{channel}/keys", json={"sign": KEY_A}),
    case(
        "keys-publish-again",
        "put",
        KEYS,
        200,
        path="/agents/k-{channel}/keys",
        before=[PUBLISHED],
        json={"sign": KEY_A},
    ),
    case(
        "keys-replace-without-a-token",
        "put",
        KEYS,
        409,
        path="/agents/k-{channel}/keys",
        before=[PUBLISHED],
        body_valid=True,
        json={"sign": KEY_B},
    ),
    case("keys-publish-bad-key", "put", KEYS, 400, path="/agents/k-{channel}/keys", json={"sign": "nope"}),
    case("keys-publish-no-sign", "put", KEYS, 400, path="/agents/k-{channel}/keys", json={"box": KEY_B}),
    case(
        "keys-publish-box-unsigned",
        "put",
        KEYS,
        400,
        path="/agents/k-{channel}/keys",
        json={"sign": KEY_A, "box": KEY_B},
    ),
    case("keys-publish-other-field", "put", KEYS, 400, path="/agents/k-{channel}/keys", json={"sign": KEY_A, "x": 1}),
    case("keys-publish-bad-json", "put", KEYS, 400, path="/agents/k-{channel}/keys", data=b"{"),
    case("keys-publish-bad-agent", "put", KEYS, 400, path="/agents/%20k/keys", body_valid=True, json={"sign": KEY_A}),
    case("keys-publish-slash-in-agent", "put", KEYS, 404, path="/agents/a%2Fb/keys", json={"sign": KEY_A}),
    case(
        "keys-publish-body-too-big", "put", KEYS, 413, path="/agents/k-{channel}/keys", json={"sign": "p" * 1_100_000}
    ),
    case("keys", "get", KEYS, 200, path="/agents/k-{channel}/keys", before=[PUBLISHED]),
    case("keys-none", "get", KEYS, 404, path="/agents/k-{channel}/keys"),
    case("keys-bad-agent", "get", KEYS, 400, path="/agents/%20k/keys"),
    case("keys-slash-in-agent", "get", KEYS, 404, path="/agents/a%2Fb/keys"),
]


def filled(value, names):
    """A case's request with its placeholders (POSTED_ID, "{channel}", "{message_id}",
    "{last_id}") replaced by what `names` holds."""
    if value is POSTED_ID:
        return names["message_id"]
    if isinstance(value, str):
        for name, known in names.items():
            value = value.replace("{" + name + "}", str(known))
        return value
    if isinstance(value, dict):
        return {key: filled(item, names) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [filled(item, names) for item in value]
    return value


def made_id(reply, known):
    """The id of the message a step made or answered: a post's, a take's, a done's reply's."""
    made = reply.json() if reply.content else {}
    return made.get("id") or (made.get("reply") or {}).get("id") or known


@pytest.mark.parametrize(("method", "template", "status", "path", "before", "body_valid", "kwargs"), CASES)
def test_reply_matches_the_document(url, channel, poster, method, template, status, path, before, body_valid, kwargs):
    posted = poster(url, channel, "openapi-tester", "so a channel, an agent and a message exist")
    names = {"channel": channel, "message_id": posted["id"], "last_id": posted["id"]}
    for step_method, step_path, step_kwargs in before:
        step = requests.request(
            step_method.upper(), url + filled(step_path, names), timeout=15, **filled(step_kwargs, names)
        )
        assert step.status_code < 300, step.text
        names["last_id"] = made_id(step, names["last_id"])
    kwargs = filled(kwargs, names)
    target = url + filled(path or template, names)
    with requests.request(method.upper(), target, timeout=15, stream=True, **kwargs) as reply:
        check(method, template, reply, status)
    body = kwargs.get("json")
    body_checked = body_valid is not None or status < 300 or status == 400
    if "requestBody" in DOCUMENT["paths"][template][method] and path is None and body is not None and body_checked:
        # The request schema accepts exactly the bodies the broker takes.
        request_schema = f"/paths/{escape(template)}/{method}/requestBody/content/application~1json/schema"
        assert validator(request_schema).is_valid(body) == (status < 300 if body_valid is None else body_valid)


def read_frames(reply, count):
    frames, buffer = [], b""
    for chunk in reply.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer and len(frames) < count:
            frame, buffer = buffer.split(b"\n\n", 1)
            frames.append(frame.decode())
        if len(frames) >= count:
            break
    return frames


@pytest.mark.parametrize("template", ["/stream", "/stream/{channel}"])
@pytest.mark.parametrize("resume", ["header", "query"])
def test_event_stream_matches_the_document(url, channel, poster, template, resume):
    posted = poster(url, channel, "openapi-tester", "streamed")
    cursor = str(posted["id"] - 1)
    headers = {**AGENT, "Accept": "text/event-stream"}
    params = {}
    if resume == "header":
        headers["Last-Event-ID"] = cursor
    else:
        params["after"] = cursor
    target = url + template.replace("{channel}", channel)
    with requests.get(target, headers=headers, params=params, stream=True, timeout=10) as reply:
        check("get", template, reply, 200)
        assert reply.headers["Content-Type"].split(";")[0] == "text/event-stream"
        frames = read_frames(reply, 2)
    assert re.fullmatch(r"retry: \d+", frames[0]), frames
    fields = dict(line.split(": ", 1) for line in frames[1].split("\n"))
    assert fields["id"] == str(posted["id"])
    message = json.loads(fields["data"])
    assert_valid("/components/schemas/Message", message)
    assert message == {key: value for key, value in posted.items() if key != "status"}


def test_posted_replies_read_back_as_documented_messages(url, channel, poster):
    one = poster(url, channel, "openapi-tester", "first")
    assert_valid("/components/schemas/PostedMessage", one)
    reply = requests.get(f"{url}/messages/{channel}", params={"after": one["id"] - 1}, timeout=10)
    check("get", MESSAGES, reply, 200)
    page = reply.json()
    assert page["messages"][0] == {key: one[key] for key in page["messages"][0]}
    assert page["cursor"] == one["id"] and page["more"] is False and page["gap"] is False


def test_unknown_route_answers_documented_not_found(url):
    reply = requests.get(f"{url}/no/such/route", timeout=10)
    assert reply.status_code == 404
    check_reply(reply, *follow("/components/responses/NotFound"))


@pytest.mark.parametrize("template", sorted(DOCUMENT["paths"]))
def test_other_methods_answer_documented_405_with_allow(url, channel, template):
    reply = requests.delete(url + template.replace("{channel}", channel).replace("{message_id}", "1"), timeout=10)
    assert reply.status_code == 405
    check_reply(reply, *follow("/components/responses/MethodNotAllowed"))
    allowed = {method.strip().lower() for method in reply.headers["Allow"].split(",")} - {"head"}
    assert allowed == {method for method in DOCUMENT["paths"][template] if method in HTTP_METHODS}


def test_health_answers_documented_503_for_a_foreign_schema(own_broker):
    broker = own_broker().start()
    db = sqlite3.connect(broker.db_path, isolation_level=None)
    try:
        db.execute("PRAGMA user_version = 99")
    finally:
        db.close()
    reply = requests.get(f"{broker.url}/healthz", timeout=10)
    check("get", "/healthz", reply, 503)


BUSY_CALLS = [
    ("post", MESSAGES, {"json": ONE}),
    ("post", MESSAGES, {"json": [ONE, ONE]}),
    ("post", TAKE, {"headers": WORKER}),
    ("post", CLAIM, {"headers": WORKER}),
    ("post", DONE, {"headers": WORKER, "json": {"message": "m"}}),
    ("post", RELEASE, {"headers": WORKER}),
    ("put", CURSOR, {"headers": WORKER, "json": {"read": 0}}),
    ("put", KEYS, {"json": {"sign": KEY_A}}),
]
READS = [
    ("get", "/status"),
    ("get", "/channels"),
    ("get", "/agents"),
    ("get", MESSAGES),
    ("get", QUEUE),
    ("get", CURSOR),
]


def test_locked_database_answers_documented_503(own_broker):
    """With the write lock held elsewhere, posts, task calls and moves of a read position give
    up after the broker's 10 s deadline with 503 and Retry-After, while reads naming an agent
    still answer (recording the agent as seen is best effort)."""
    broker = own_broker().start()

    def call(operation):
        method, template, kwargs = operation
        target = broker.url + template.replace("{channel}", "busy").replace("{message_id}", "1")
        with requests.request(method.upper(), target, timeout=40, **kwargs) as reply:
            check(method, template, reply, 503)
            return reply.headers["Retry-After"]

    def read(operation):
        method, template = operation
        target = broker.url + template.replace("{channel}", "busy")
        reply = requests.request(method.upper(), target, headers={"X-Agent-ID": "busy-reader"}, timeout=30)
        check(method, template, reply, 200)

    db = sqlite3.connect(broker.db_path, isolation_level=None, timeout=0)
    db.execute("BEGIN IMMEDIATE")
    try:
        # All at once: each waits out the 10 s deadline (a read, to record its agent).
        with ThreadPoolExecutor(len(BUSY_CALLS) + len(READS)) as pool:
            reads = [pool.submit(read, operation) for operation in READS]
            retry_after = list(pool.map(call, BUSY_CALLS))
            for done in reads:
                done.result()
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert set(retry_after) == {"1"}
    assert requests.post(f"{broker.url}/messages/busy", json=ONE, timeout=10).status_code == 201


# -- (d) refusals of access control and limits -------------------------------------------------

OTHER_TOKEN = "Bearer acm_this-token-was-never-made-by-the-broker"


def operation_call(method, template, channel, **kwargs):
    path = template.replace("{channel}", channel).replace("{message_id}", "1")
    body = {"json": {"message": "m"}} if method == "post" and "json" not in kwargs else {}
    return requests.request(method.upper(), BROKER_URL[0] + path, timeout=10, stream=True, **body, **kwargs)


BROKER_URL = [None]
REFUSED = set()


def refusal(method, template, status, reply):
    with reply:
        check(method, template, reply, status)
    REFUSED.add((method, template, str(status)))


def test_access_refusals_match_the_document(own_broker):
    broker = own_broker(env={"AGENT_COMMS_AUTH": "required", "AGENT_COMMS_MAX_CHANNELS": "1"}).start()
    BROKER_URL[0] = broker.url
    made = subprocess.run(
        [
            str(BIN / "agent-comms-broker"),
            "token",
            "add",
            "doc",
            "--read",
            "open-*",
            "--write",
            "open-*",
            "--db",
            broker.db_path,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    token = {"Authorization": f"Bearer {made.stdout.strip()}"}
    for method, template in operations():
        if template != "/healthz":
            refusal(
                method,
                template,
                401,
                operation_call(method, template, "open-a", headers={"Authorization": OTHER_TOKEN}),
            )
        if "{channel}" in template:
            refusal(method, template, 403, operation_call(method, template, "closed", headers=token))
    # Inboxes: its own is readable without a grant naming it; another agent's is not, nor
    # writable with a grant that does not match it.
    with operation_call("get", MESSAGES, "@doc", headers=token) as own:
        check("get", MESSAGES, own, 200)
    refusal("get", MESSAGES, 403, operation_call("get", MESSAGES, "@other", headers=token))
    refusal("post", MESSAGES, 403, operation_call("post", MESSAGES, "@other", headers=token))
    refusal("put", KEYS, 403, operation_call("put", "/agents/other/keys", "-", headers=token, json={"sign": KEY_A}))
    refusal(
        "get",
        "/search",
        403,
        operation_call("get", "/search", "-", params={"q": "m", "channel": "closed"}, headers=token),
    )
    blind = subprocess.run(
        [str(BIN / "agent-comms-broker"), "token", "add", "blind", "--read", "", "--db", broker.db_path],
        capture_output=True,
        text=True,
        check=True,
    )
    refusal(
        "get",
        "/stream",
        403,
        operation_call("get", "/stream", "-", headers={"Authorization": f"Bearer {blind.stdout.strip()}"}),
    )


def test_cap_refusals_match_the_document(own_broker):
    """409: an anonymous post that would create a channel, or register an agent, past the caps."""
    broker = own_broker(env={"AGENT_COMMS_MAX_CHANNELS": "1", "AGENT_COMMS_MAX_AGENTS": "1"}).start()
    BROKER_URL[0] = broker.url
    post = {"sender": "only", "message": "m"}
    assert operation_call("post", MESSAGES, "open-a", json=post).status_code == 201
    refusal("post", MESSAGES, 409, operation_call("post", MESSAGES, "open-b", json=post))
    refusal("post", MESSAGES, 409, operation_call("post", MESSAGES, "open-a", json={"sender": "two", "message": "m"}))


def test_rate_limit_refusals_match_the_document(own_broker):
    broker = own_broker(env={"AGENT_COMMS_RATE_LIMIT": "0.01", "AGENT_COMMS_RATE_BURST": "1"}).start()
    BROKER_URL[0] = broker.url
    assert requests.get(broker.url + "/status", timeout=10).status_code == 200  # the bucket's one request
    for method, template in operations():
        if template != "/healthz":
            refusal(method, template, 429, operation_call(method, template, "limited"))
    assert requests.get(broker.url + "/healthz", timeout=10).status_code == 200


def test_request_heads_over_the_limits_match_the_document(url):
    """gunicorn answers these before the broker sees the request, for every operation."""
    BROKER_URL[0] = url
    for method, template in operations():
        long_line = operation_call(method, template + "?padding=" + "p" * 4100, "heads")
        refusal(method, template, 414, long_line)
        many = {f"X-Extra-{n}": "1" for n in range(60)}
        refusal(method, template, 431, operation_call(method, template, "heads", headers=many))


def test_a_slow_body_matches_the_document(own_broker):
    """408: the body did not arrive within AGENT_COMMS_REQUEST_TIMEOUT, for every operation
    that reads one."""
    import socket

    broker = own_broker(env={"AGENT_COMMS_REQUEST_TIMEOUT": "1"}).start()
    for method, template in operations():
        if "requestBody" not in DOCUMENT["paths"][template][method]:
            continue
        path = template.replace("{channel}", "slow").replace("{message_id}", "1")
        with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as conn:
            conn.sendall(f"{method.upper()} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n{{".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        reply = requests.Response()
        reply.status_code = int(head.split()[1])
        reply.headers = requests.structures.CaseInsensitiveDict(
            line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:]
        )
        reply._content = body
        check(method, template, reply, 408)
        REFUSED.add((method, template, "408"))


# Last in the file: it counts the statuses the tests above caused.
def test_every_documented_status_is_exercised():
    exercised = {(c.values[0], c.values[1], str(c.values[2])) for c in CASES} | REFUSED
    exercised |= {("get", template, "200") for template in ("/stream", "/stream/{channel}")}
    exercised |= {("get", "/healthz", "503")}
    exercised |= {(method, template, "503") for method, template, _ in BUSY_CALLS}
    documented = {
        (method, path, status)
        for (method, path), operation in operations().items()
        for status in operation["responses"]
        if status not in NOT_TRIGGERED
    }
    assert documented - exercised == set()
