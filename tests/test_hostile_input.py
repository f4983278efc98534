"""Input an attacker (or a broken client) sends, on real brokers: every answer is a JSON
4xx that says what was wrong, nothing is stored, and a name can never smuggle a newline,
a control character or a bidi override past validation."""

import json
import socket
import urllib.error
import urllib.parse
import urllib.request

import pytest
import requests

from test_access import add_token, bearer


def raw_request(url, head, body=b""):
    """Send bytes as they are (headers requests would refuse to send); return (status, JSON)."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as conn:
        conn.sendall(head + b"\r\nHost: test\r\nConnection: close\r\n\r\n" + body)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


def test_deeply_nested_json_is_a_400(url, channel):
    reply = requests.post(f"{url}/messages/{channel}", data=b"[" * 100_000, timeout=10)
    assert reply.status_code == 400 and "nested too deeply" in reply.json()["error"]
    balanced = b"[" * 50_000 + b"]" * 50_000
    assert requests.post(f"{url}/messages/{channel}", data=balanced, timeout=10).status_code == 400


@pytest.mark.parametrize("mode", ["open", "required"])
@pytest.mark.parametrize("header", ["Authorization", "X-Agent-ID", "Last-Event-ID"])
@pytest.mark.parametrize("target", ["GET /status", "GET /messages/general", "GET /stream/general", "GET /stream"])
def test_a_header_that_is_not_utf8_is_a_4xx(own_broker, mode, header, target):
    """Refused where the broker reads the header; never a 5xx. (/status in mode required
    ignores an anonymous X-Agent-ID, and only streams read Last-Event-ID.)"""
    broker = own_broker(env={"AGENT_COMMS_AUTH": mode}).start()
    value = b"Bearer \xff\xfe" if header == "Authorization" else b"\xff\xfeagent"
    status, answer = raw_request(broker.url, f"{target} HTTP/1.1\r\n{header}: ".encode() + value)
    ignored = (header == "X-Agent-ID" and target == "GET /status" and mode == "required") or (
        header == "Last-Event-ID" and "/stream" not in target
    )
    if ignored:
        assert status in (200, 401), (status, answer)  # 401: anonymous in mode required
    else:
        assert 400 <= status < 500 and answer["error"], (status, answer)


def test_a_non_utf8_agent_id_names_the_header(url):
    status, answer = raw_request(url, b"GET /status HTTP/1.1\r\nX-Agent-ID: caf\xe9")
    assert status == 400 and "X-Agent-ID header is not valid UTF-8" in answer["error"]


@pytest.mark.parametrize("path", ["/messages/tasks%0A", "/messages/tasks%0D", "/stream/tasks%0A"])
def test_a_name_cannot_end_in_a_newline(url, path):
    method = "POST" if path.startswith("/messages") else "GET"
    reply = requests.request(method, url + path, json={"sender": "a", "message": "m"}, timeout=10)
    assert reply.status_code == 400 and "invalid channel name" in reply.json()["error"]
    names = [c["name"] for c in requests.get(f"{url}/channels", timeout=10).json()["channels"]]
    assert not [name for name in names if name != name.strip()]


@pytest.mark.parametrize("param", ["after=5%0A", "limit=5%0A", "after=%205"])
def test_a_number_cannot_carry_a_newline_or_space(url, param):
    reply = requests.get(f"{url}/messages/general?{param}", timeout=10)
    assert reply.status_code == 400, reply.text


@pytest.mark.parametrize(
    "sender",
    [
        "bad\u0085next",  # NEL, a C1 control: some terminals start a new line
        "bad\u009b31m",  # CSI, a C1 control: terminal escape sequences
        "evil\u202egnp.exe",  # right-to-left override: the name reads backwards
        "a\u2066b\u2069",  # bidi isolates
        "zero\u200bwidth",  # zero-width space: looks like "zerowidth"
        "line\u2028sep",  # line separator
        "\ufeffbom",  # zero-width no-break space
        "tag\U000e0041",  # a tag character (Cf, beyond the BMP)
    ],
)
def test_a_sender_cannot_hold_control_or_invisible_formatting(url, channel, sender):
    reply = requests.post(f"{url}/messages/{channel}", json={"sender": sender, "message": "m"}, timeout=10)
    assert reply.status_code == 400 and "control characters" in reply.json()["error"], reply.text
    header = requests.get(f"{url}/status", headers={"X-Agent-ID": sender.encode().decode("latin-1")}, timeout=10)
    assert header.status_code == 400
    assert requests.get(f"{url}/messages/{channel}", timeout=10).json()["count"] == 0


@pytest.mark.parametrize("sender", ["ägent 🚀", "👩\u200d💻 dev", "ماهان\u200cسازی", "⚠️ monitor"])
def test_names_in_any_script_and_emoji_are_welcome(url, channel, sender):
    reply = requests.post(f"{url}/messages/{channel}", json={"sender": sender, "message": "m"}, timeout=10)
    assert reply.status_code == 201, reply.text
    assert reply.json()["sender"] == sender


def test_the_admin_cli_refuses_such_an_agent_name(own_broker):
    from test_access import admin

    broker = own_broker().start()
    done = admin(broker.db_path, "token", "add", "evil\u202eexe", check=False)
    assert done.returncode == 1 and "control characters" in done.stderr


@pytest.mark.parametrize("size", [2 << 20, 10 << 20])
def test_an_oversized_body_gets_its_413_also_from_a_client_that_sends_it_all_first(url, channel, size):
    """urllib sends the whole body before it reads the answer, and says Connection: close:
    the broker reads and throws away the rest, so the client gets the 413, not a reset."""
    body = json.dumps({"sender": "a", "message": "x" * size}).encode()
    for _ in range(5):
        request = urllib.request.Request(
            f"{url}/messages/{channel}", data=body, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413
        assert "over the limit" in json.loads(refused.value.read())["error"]


def test_a_refusal_before_the_body_is_read_reaches_such_a_client_too(own_broker):
    """A 401 in mode required comes before the broker reads the body: the same holds."""
    broker = own_broker(env={"AGENT_COMMS_AUTH": "required"}).start()
    body = json.dumps([{"sender": "a", "message": "x" * 60000}] * 16).encode()
    request = urllib.request.Request(f"{broker.url}/messages/general", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    token = add_token(broker, "writer")
    reply = requests.post(f"{broker.url}/messages/general", json={"message": "ok"}, headers=bearer(token), timeout=10)
    assert reply.status_code == 201


@pytest.mark.parametrize("coding", ["xchunked", "br", "foo"])
def test_an_unknown_transfer_coding_is_a_400_not_a_501(url, coding):
    status, answer = raw_request(url, f"POST /messages/x HTTP/1.1\r\nTransfer-Encoding: {coding}".encode())
    assert status == 400 and "transfer" in answer["error"].lower(), answer
