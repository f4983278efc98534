"""Prometheus metrics (issue 14): /metrics summed over both workers, as a real Prometheus
server (Debian's package, started here on a loopback port) scrapes and queries them;
who may read them (AGENT_COMMS_METRICS); the cap on channel labels."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests

from broker_process import BIN, free_port
from debian_packages import require_files
from sse_client import EventStream

PROMETHEUS = "/usr/bin/prometheus"
DASHBOARD = Path(__file__).resolve().parent.parent / "service" / "grafana" / "agent-comms.json"
ADMIN = str(BIN / "agent-comms-broker")


def add_token(broker, agent, *options):
    made = subprocess.run(
        [ADMIN, "token", "add", agent, *options, "--db", broker.db_path], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def fresh(url, method="GET", **kwargs):
    """One request on a connection of its own, so the workers share the requests out."""
    with requests.Session() as session:
        return session.request(method, url, timeout=10, headers={"Connection": "close", **kwargs.pop("headers", {})},
                               **kwargs)  # fmt: skip


def samples(text):
    """{(name, frozenset of labels): value} of a /metrics text."""
    found = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = (
            frozenset(tuple(pair.split("=", 1)) for pair in labels.rstrip("}").split(",") if pair)
            if labels
            else frozenset()
        )
        found[name, frozenset((key, raw.strip('"')) for key, raw in pairs)] = float(value)
    return found


def value(found, name, **labels):
    return found.get((name, frozenset(labels.items())))


# -- a real Prometheus ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_binary():
    if not Path(PROMETHEUS).exists() and os.geteuid() != 0:
        pytest.skip("Debian's prometheus package is not installed, and installing it needs root")
    require_files({PROMETHEUS: "prometheus"}, "the metrics test")
    return PROMETHEUS


class Prometheus:
    def __init__(self, binary, directory, target, token_file=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        auth = f"    authorization:\n      credentials_file: {token_file}\n" if token_file else ""
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            f"scrape_configs:\n  - job_name: broker\n{auth}    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = open(directory / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"prometheus did not get ready:\n{(directory / 'prometheus.log').read_text()[-3000:]}")

    def series(self, expression):
        reply = requests.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=5).json()
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def query(self, expression):
        result = self.series(expression)
        return float(result[0]["value"][1]) if result else None

    def until(self, expression, expected, timeout=20):
        """The query's value once it is `expected` (fails with what it was at the end)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.query(expression)
            if got == expected or time.monotonic() > deadline:
                assert got == expected, f"{expression}: {got}, expected {expected}"
                return got
            time.sleep(0.5)

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


def test_a_real_prometheus_sums_both_workers(own_broker, prometheus_binary, tmp_path):
    limited = {"AGENT_COMMS_RATE_LIMIT": "20", "AGENT_COMMS_RATE_BURST": "60"}
    broker = own_broker(env={"AGENT_COMMS_AUTH": "required", **limited}).start()
    token = add_token(broker, "ops", "--read", "*", "--write", "*")
    flood = {"Authorization": f"Bearer {add_token(broker, 'flood')}"}
    scraper = add_token(broker, "prometheus", "--read", "", "--write", "")
    auth = {"Authorization": f"Bearer {token}"}
    (tmp_path / "token").write_text(scraper)

    # Known traffic, each request on a connection of its own.
    for n in range(7):
        assert fresh(f"{broker.url}/messages/alpha", "POST", json={"message": f"a{n}"}, headers=auth).status_code == 201
    batch = [{"message": f"b{n}"} for n in range(5)]
    assert fresh(f"{broker.url}/messages/beta", "POST", json=batch, headers=auth).status_code == 201
    workers = {fresh(f"{broker.url}/status", headers=auth).json()["worker"] for _ in range(20)}
    assert len(workers) == 2, "both workers must have served some of the requests"
    assert fresh(f"{broker.url}/no-such-route", headers=auth).status_code == 404
    # A task handed out again, then given up on.
    fresh(f"{broker.url}/messages/jobs", "POST", json=[{"message": "t1"}, {"message": "t2"}], headers=auth)
    task = fresh(f"{broker.url}/queue/jobs/take", "POST", json={}, headers=auth).json()["id"]
    fresh(f"{broker.url}/messages/jobs/{task}/release", "POST", json={}, headers=auth)
    assert fresh(f"{broker.url}/queue/jobs/take", "POST", json={}, headers=auth).json()["claim"]["attempt"] == 2
    fresh(f"{broker.url}/messages/jobs/{task}/release", "POST", json={"dead": True}, headers=auth)
    with requests.Session() as session:  # one agent past its bucket
        codes = [session.get(f"{broker.url}/channels", headers=flood, timeout=10).status_code for _ in range(150)]
    refused = codes.count(429)
    assert refused >= 1 and codes.count(200) == 150 - refused
    streams = []
    for _ in range(3):
        session = requests.Session()
        session.headers.update(auth)
        streams.append(EventStream(f"{broker.url}/stream/alpha", session=session))
    for stream in streams:
        stream.response.raw.read(1)  # the stream has begun

    prometheus = Prometheus(prometheus_binary, tmp_path, f"127.0.0.1:{broker.port}", tmp_path / "token")
    try:
        prometheus.until('up{job="broker"}', 1.0)
        prometheus.until('sum(agent_comms_messages_stored_total{channel="alpha"})', 7.0)
        prometheus.until('sum(agent_comms_messages_stored_total{channel="beta"})', 5.0)
        prometheus.until('sum(agent_comms_http_requests_total{route="/status",status="200"})', 20.0)
        prometheus.until('sum(agent_comms_rate_limited_requests_total{route="/channels"})', float(refused))
        prometheus.until('sum(agent_comms_http_requests_total{route="unmatched",status="404"})', 1.0)
        prometheus.until('sum(agent_comms_http_request_duration_seconds_count{route="/messages/<channel>"})', 9.0)
        prometheus.until('sum(agent_comms_open_waits{kind="stream"})', 3.0)
        prometheus.until('sum(agent_comms_task_redeliveries_total{channel="jobs"})', 1.0)
        prometheus.until('sum(agent_comms_tasks_given_up_total{channel="jobs"})', 1.0)
        prometheus.until('agent_comms_queue_tasks{channel="jobs",state="dead"}', 1.0)
        prometheus.until('agent_comms_queue_tasks{channel="jobs",state="pending"}', 1.0)
        prometheus.until("agent_comms_messages", 14.0)
        prometheus.until("agent_comms_agents_active", 2.0)  # ops and flood; the scraper is not an agent at work
        assert prometheus.query("agent_comms_database_bytes") > 0
        # Every query of the Grafana dashboard that ships with the broker finds its series.
        dashboard = json.loads(DASHBOARD.read_text())
        expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
        assert len(expressions) >= 12
        deadline = time.monotonic() + 15  # rate() needs two scrapes in its window
        for expression in expressions:
            while not prometheus.series(expression) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert prometheus.series(expression), f"the dashboard's {expression} finds nothing"
        for stream in streams:
            stream.response.close()
        prometheus.until('sum(agent_comms_open_waits{kind="stream"})', 0.0)
    finally:
        prometheus.stop()


# -- who may read them, and what they hold -------------------------------------------------


@pytest.mark.parametrize(
    ("env", "anonymous", "with_token"),
    [
        ({"AGENT_COMMS_AUTH": "required"}, 401, 200),
        ({"AGENT_COMMS_AUTH": "write-requires-token"}, 401, 200),
        ({"AGENT_COMMS_AUTH": "required", "AGENT_COMMS_METRICS": "open"}, 200, 200),
        ({"AGENT_COMMS_AUTH": "open"}, 200, 200),
        ({"AGENT_COMMS_AUTH": "open", "AGENT_COMMS_METRICS": "token"}, 401, 200),
        ({"AGENT_COMMS_METRICS": "off"}, 404, 404),
    ],
)
def test_who_may_read_the_metrics(own_broker, env, anonymous, with_token):
    broker = own_broker(env=env, workers=1).start()
    token = add_token(broker, "prometheus", "--read", "", "--write", "")
    bare = requests.get(f"{broker.url}/metrics", timeout=10)
    assert bare.status_code == anonymous, bare.text
    if anonymous == 401:
        assert "metrics need a token" in bare.json()["error"] or "token is required" in bare.json()["error"]
        assert bare.headers["WWW-Authenticate"].startswith("Bearer")
    held = requests.get(f"{broker.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert held.status_code == with_token
    if with_token == 200:
        assert held.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "# TYPE agent_comms_http_requests_total counter" in held.text


def test_an_address_named_may_scrape_without_a_token(own_broker):
    named = own_broker(env={"AGENT_COMMS_AUTH": "required", "AGENT_COMMS_METRICS_FROM": "10.9.0.0/16, 127.0.0.1"})
    assert requests.get(f"{named.start().url}/metrics", timeout=10).status_code == 200
    named.stop()
    other = own_broker(env={"AGENT_COMMS_AUTH": "required", "AGENT_COMMS_METRICS_FROM": "10.9.0.0/16"}).start()
    assert requests.get(f"{other.url}/metrics", timeout=10).status_code == 401
    # Only /metrics: the rest still needs a token.
    assert requests.get(f"{other.url}/channels", timeout=10).status_code == 401


def test_channel_labels_are_capped_and_inboxes_never_named(own_broker):
    broker = own_broker(env={"AGENT_COMMS_METRICS_CHANNELS": "2"}, workers=1).start()
    for channel in ("c1", "c2", "c3", "c4", "c4", "@alice"):
        assert requests.post(f"{broker.url}/messages/{channel}", json={"sender": "x", "message": "m"}, timeout=10).ok
    found = samples(requests.get(f"{broker.url}/metrics", timeout=10).text)
    stored = {labels: count for (name, labels), count in found.items() if name == "agent_comms_messages_stored_total"}
    assert stored == {
        frozenset({("channel", "c1")}): 1.0,
        frozenset({("channel", "c2")}): 1.0,
        frozenset({("channel", "other")}): 3.0,
        frozenset({("channel", "@inbox")}): 1.0,
    }
    assert "alice" not in requests.get(f"{broker.url}/metrics", timeout=10).text


def test_rate_limited_requests_are_counted(own_broker):
    broker = own_broker(env={"AGENT_COMMS_RATE_LIMIT": "2", "AGENT_COMMS_RATE_BURST": "2"}, workers=1).start()
    refused = sum(requests.get(f"{broker.url}/channels", timeout=10).status_code == 429 for _ in range(10))
    assert refused >= 5
    time.sleep(1.2)  # the scrape's own request is in the same bucket
    found = samples(requests.get(f"{broker.url}/metrics", timeout=10).text)
    assert value(found, "agent_comms_rate_limited_requests_total", route="/channels") == refused
    assert value(found, "agent_comms_http_requests_total", route="/channels", method="GET", status="429") == refused


def test_a_repeated_key_is_not_counted_again(own_broker):
    broker = own_broker(workers=1).start()
    post = {"sender": "x", "message": "once", "key": "k1"}
    assert requests.post(f"{broker.url}/messages/keyed", json=post, timeout=10).status_code == 201
    assert requests.post(f"{broker.url}/messages/keyed", json=post, timeout=10).status_code == 200
    found = samples(requests.get(f"{broker.url}/metrics", timeout=10).text)
    assert value(found, "agent_comms_messages_stored_total", channel="keyed") == 1.0
    assert value(found, "agent_comms_messages") == 1.0


def test_a_made_up_method_counts_as_other(own_broker):
    import socket

    broker = own_broker(workers=1).start()
    for n in range(3):
        with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as conn:
            conn.sendall(f"M{n:05d}X /messages/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            while conn.recv(65536):
                pass
    text = requests.get(f"{broker.url}/metrics", timeout=10).text
    assert "M0000" not in text
    found = samples(text)
    assert sum(v for (name, labels), v in found.items() if name == "agent_comms_http_requests_total"
               and ("method", "other") in labels) == 3  # fmt: skip
