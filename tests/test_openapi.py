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
    """The reply has a documented media type, the documented required headers and a valid body."""
    media = reply.headers.get("Content-Type", "").split(";")[0].strip()
    assert media in response["content"], f"{media!r} is not documented ({pointer})"
    for name, header in response.get("headers", {}).items():
        if header.get("required"):
            assert name in reply.headers, f"{name} header missing ({pointer})"
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
        if route.method != "HEAD"
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
        for media, content in response["content"].items():
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


class Chunks:
    """A body requests sends chunked (it has no length), fresh on every send."""

    def __init__(self, *parts):
        self.parts = parts

    def __iter__(self):
        return iter(self.parts)


# In a case's params: the id of the message the test posts first.
POSTED_ID = object()


def case(name, method, template, status, path=None, **kwargs):
    return pytest.param(method, template, status, path, kwargs, id=name)


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
    case("read-slash-in-channel", "get", MESSAGES, 404, path="/messages/a%2Fb"),
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
    case("post-slash-in-channel", "post", MESSAGES, 404, path="/messages/a%2Fb", json=ONE),
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
    case("openapi", "get", "/openapi.json", 200),
]


@pytest.mark.parametrize(("method", "template", "status", "path", "kwargs"), CASES)
def test_reply_matches_the_document(url, channel, poster, method, template, status, path, kwargs):
    posted = poster(url, channel, "openapi-tester", "so a channel, an agent and a message exist")
    if "params" in kwargs:  # a cursor at the newest message, where the case asks for one
        kwargs = {**kwargs, "params": {k: posted["id"] if v is POSTED_ID else v for k, v in kwargs["params"].items()}}
    target = url + (path or template.replace("{channel}", channel))
    with requests.request(method.upper(), target, timeout=15, stream=True, **kwargs) as reply:
        check(method, template, reply, status)
    body = kwargs.get("json")
    if method == "post" and path is None and body is not None and status in (201, 400):
        # The request schema accepts exactly the bodies the broker takes.
        request_schema = f"/paths/{escape(template)}/post/requestBody/content/application~1json/schema"
        assert validator(request_schema).is_valid(body) == (status == 201)


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
    assert message == {key: posted[key] for key in ("id", "channel", "sender", "message", "timestamp")}


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
    reply = requests.delete(url + template.replace("{channel}", channel), timeout=10)
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


BUSY_CALLS = [("post", MESSAGES, {"json": ONE}), ("post", MESSAGES, {"json": [ONE, ONE]})]
READS = [("get", "/status"), ("get", "/channels"), ("get", "/agents"), ("get", MESSAGES)]


def test_locked_database_answers_documented_503(own_broker):
    """With the write lock held elsewhere, posts give up after the broker's 10 s deadline
    with 503 and Retry-After, while reads naming an agent still answer (recording the
    agent as seen is best effort)."""
    broker = own_broker().start()

    def call(operation):
        method, template, kwargs = operation
        target = broker.url + template.replace("{channel}", "busy")
        with requests.request(method.upper(), target, timeout=40, **kwargs) as reply:
            check(method, template, reply, 503)
            return reply.headers["Retry-After"]

    db = sqlite3.connect(broker.db_path, isolation_level=None, timeout=0)
    db.execute("BEGIN IMMEDIATE")
    try:
        for method, template in READS:
            target = broker.url + template.replace("{channel}", "busy")
            reply = requests.request(method.upper(), target, headers={"X-Agent-ID": "busy-reader"}, timeout=10)
            check(method, template, reply, 200)
        with ThreadPoolExecutor(len(BUSY_CALLS)) as pool:
            retry_after = list(pool.map(call, BUSY_CALLS))
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert set(retry_after) == {"1"}
    assert requests.post(f"{broker.url}/messages/busy", json=ONE, timeout=10).status_code == 201


# -- (d) refusals of access control and limits -------------------------------------------------

OTHER_TOKEN = "Bearer acm_this-token-was-never-made-by-the-broker"


def operation_call(method, template, channel, **kwargs):
    path = template.replace("{channel}", channel)
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
    """408: the body did not arrive within AGENT_COMMS_REQUEST_TIMEOUT."""
    import socket

    broker = own_broker(env={"AGENT_COMMS_REQUEST_TIMEOUT": "1"}).start()
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as conn:
        conn.sendall(b"POST /messages/slow HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n{")
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
    check("post", MESSAGES, reply, 408)
    REFUSED.add(("post", MESSAGES, "408"))


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
