"""Security headers on every kind of response, and CORS: off unless origins are configured."""

import socket

import pytest
import requests

from agent_comms_broker.headers import SECURITY_HEADERS

DASHBOARD = "https://dash.lan:3000"


def assert_secured(headers, what):
    for name, value in SECURITY_HEADERS:
        assert headers.get(name) == value, f"{name} missing on {what}"
    assert headers.get("Cache-Control"), f"Cache-Control missing on {what}"


def test_every_kind_of_response_carries_the_security_headers(url, channel, poster):
    poster(url, channel, "a", "m")
    replies = {
        "200 read": requests.get(f"{url}/messages/{channel}"),
        "201 post": requests.post(f"{url}/messages/{channel}", json={"sender": "a", "message": "m"}),
        "400": requests.get(f"{url}/messages/{channel}?limit=x"),
        "404": requests.get(f"{url}/nothing/here"),
        "405": requests.delete(f"{url}/messages/{channel}"),
        "413": requests.post(f"{url}/messages/{channel}", json={"sender": "a", "message": "m" * 70000}),
        "healthz": requests.get(f"{url}/healthz"),
        "openapi": requests.get(f"{url}/openapi.json"),
    }
    for what, reply in replies.items():
        assert_secured(reply.headers, what)
        assert reply.headers["Cache-Control"] == "no-store"
    with requests.get(f"{url}/stream/{channel}", stream=True, timeout=10) as stream:
        assert_secured(stream.headers, "event stream")
        assert stream.headers["Cache-Control"] == "no-cache"
    assert "Strict-Transport-Security" not in replies["200 read"].headers, "HSTS only over HTTPS"


def test_gunicorns_own_refusals_carry_them_too(broker):
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as connection:
        connection.sendall(b"NOT A REQUEST LINE\r\n\r\n")
        head = connection.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 400")
    for name, value in SECURITY_HEADERS:
        assert f"{name}: {value}\r\n" in head


def test_cors_is_off_by_default(url, channel):
    reply = requests.get(f"{url}/messages/{channel}", headers={"Origin": DASHBOARD})
    assert reply.status_code == 200
    assert not any(name.lower().startswith("access-control-") for name in reply.headers)
    preflight = requests.options(
        f"{url}/messages/{channel}", headers={"Origin": DASHBOARD, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 405
    assert "Access-Control-Allow-Origin" not in preflight.headers


@pytest.fixture(scope="module")
def cors_broker(tmp_path_factory):
    from broker_process import BrokerProcess

    process = BrokerProcess(
        tmp_path_factory.mktemp("cors") / "messages.db", env={"AGENT_COMMS_CORS_ORIGINS": f"{DASHBOARD}, http://x.lan"}
    ).start()
    yield process
    process.stop()


def test_cors_answers_configured_origins_only(cors_broker):
    url = cors_broker.url
    allowed = requests.get(f"{url}/status", headers={"Origin": DASHBOARD})
    assert allowed.headers["Access-Control-Allow-Origin"] == DASHBOARD
    assert "Origin" in allowed.headers["Vary"]
    assert "Retry-After" in allowed.headers["Access-Control-Expose-Headers"]
    other = requests.get(f"{url}/status", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers


def test_cors_preflight(cors_broker):
    url = f"{cors_broker.url}/messages/tasks"
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = requests.options(url, headers={"Origin": DASHBOARD, **asked})
    assert ok.status_code == 204
    assert ok.headers["Access-Control-Allow-Origin"] == DASHBOARD
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in ok.headers["Access-Control-Allow-Headers"]
    assert_secured(ok.headers, "preflight")
    refused = requests.options(url, headers={"Origin": "https://evil.example", **asked})
    assert refused.status_code == 403
    assert "may not call this broker" in refused.json()["error"]
    assert "Access-Control-Allow-Origin" not in refused.headers


def test_a_bad_cors_setting_stops_the_broker_with_one_line(own_broker):
    broker = own_broker(env={"AGENT_COMMS_CORS_ORIGINS": "dash.lan"})
    with pytest.raises(RuntimeError) as failed:
        broker.start(timeout=10)
    assert "AGENT_COMMS_CORS_ORIGINS: 'dash.lan' is not an origin" in str(failed.value)


def test_a_page_on_another_site_cannot_post_with_cors_off(url, channel):
    """A "simple" cross-site POST (text/plain, no preflight) from a browser carries its
    Origin: refused, and nothing is stored. Programs send no Origin; a page the broker
    itself served (the same origin) may post."""
    body = '{"sender": "victim", "message": "posted by evil.example"}'
    for origin in ("https://evil.example", "null", url.replace("127.0.0.1", "localhost")):
        reply = requests.post(
            f"{url}/messages/{channel}", data=body, headers={"Origin": origin, "Content-Type": "text/plain"}
        )
        assert reply.status_code == 403 and "may not call this broker" in reply.json()["error"], reply.text
        assert_secured(reply.headers, "cross-origin refusal")
    assert requests.get(f"{url}/messages/{channel}").json()["count"] == 0
    same = requests.post(f"{url}/messages/{channel}", data=body, headers={"Origin": url})
    assert same.status_code == 201, same.text
    assert requests.post(f"{url}/messages/{channel}", data=body).status_code == 201


def test_a_listed_origin_may_post(own_broker, channel):
    broker = own_broker(env={"AGENT_COMMS_CORS_ORIGINS": DASHBOARD}).start()
    body = {"sender": "dash", "message": "from the dashboard"}
    assert requests.post(f"{broker.url}/messages/{channel}", json=body, headers={"Origin": DASHBOARD}).ok
    other = requests.post(f"{broker.url}/messages/{channel}", json=body, headers={"Origin": "https://other.lan"})
    assert other.status_code == 403
