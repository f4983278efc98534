"""Docker end to end, the compose `cluster` profile: PostgreSQL, two broker nodes and
HAProxy in front, on a real Docker engine. A post through the balancer is read back from
each node; with one node stopped the balancer sends everything to the other; with
PostgreSQL stopped both nodes answer 503 on /healthz, Docker marks them unhealthy and the
balancer has nothing to send to; with it back, they serve again by themselves, every
acknowledged message kept.

The images of PostgreSQL and HAProxy are the official ones for users; here, with no
registry, one Debian bookworm image with the postgresql and haproxy packages, made with
debootstrap (kept as a cache, as the broker's base image is)."""

import json
import os
import secrets
import time
from pathlib import Path

import pytest
import requests
from host_commands import run, wait_for
from steps import setup_takes_up_to
from test_docker import HEALTH_FORMAT, Stack, base_image, build_image, compose, docker_engine  # noqa: F401

from broker_process import free_port

# With test_docker.py, on one pytest worker (it starts and stops the one dockerd).
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installs and starts Docker: needs root"),
]
CLUSTER_IMAGE = "agent-comms-test-cluster:bookworm"
CLUSTER_FILES = {
    "/usr/lib/postgresql/15/bin/postgres": "postgresql-15",
    "/usr/sbin/haproxy": "haproxy",
    "/usr/sbin/runuser": "util-linux",
}
NODES = ("node-a", "node-b")


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def cluster_image(docker_engine):  # noqa: F811
    if run("docker", "image", "inspect", CLUSTER_IMAGE, check=False).returncode != 0:
        build_image(CLUSTER_IMAGE, CLUSTER_FILES, "the cluster image")
    return CLUSTER_IMAGE


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
@setup_takes_up_to(600)
def wheelhouse():
    """build/wheelhouse as test_docker.py makes it, made again only when a source file of
    the broker or agent-chat is newer than its wheels (test_docker.py ran just before)."""
    wheels = list((ROOT / "build" / "wheelhouse").glob("agent_comms_*.whl"))
    sources = [path for part in ("service", "client") for path in (ROOT / part / "src").rglob("*")]
    sources += [ROOT / part / "pyproject.toml" for part in ("service", "client")]
    kept = [
        path
        for path in sources
        if path.is_file() and not any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts)
    ]
    newest = max((path.stat().st_mtime for path in kept), default=0)
    if len(wheels) < 2 or min(wheel.stat().st_mtime for wheel in wheels) < newest:
        run("make", "wheelhouse", timeout=600)


class Cluster(Stack):
    def __init__(self, compose, base_image, cluster_image):  # noqa: F811
        super().__init__(compose, base_image)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env |= {
            "COMPOSE_PROFILES": "cluster",
            "COMPOSE_PROJECT_NAME": "agent-comms-e2e-cluster",
            "AGENT_COMMS_CLUSTER_PUBLISH": f"127.0.0.1:{self.port}",
            "AGENT_COMMS_POSTGRES_IMAGE": cluster_image,
            "AGENT_COMMS_HAPROXY_IMAGE": cluster_image,
            "AGENT_COMMS_POSTGRES_PASSWORD": secrets.token_hex(16),
            "AGENT_COMMS_BROKER": self.url,
        }

    def health(self, service):
        return run("docker", "inspect", "--format", HEALTH_FORMAT, self.container(service)).stdout.split()[0]

    def wait_healthy(self, timeout=180):
        for service in ("postgres", *NODES, "broker"):
            if not wait_for(lambda service=service: self.health(service) == "healthy", timeout):
                pytest.fail(f"{service} was not healthy within {timeout} s:\n{self.logs()}")
        if not wait_for(lambda: self.get("/healthz").status_code == 200, 60):
            pytest.fail(f"the balancer did not answer within 60 s:\n{self.logs()}")

    def get(self, path):
        try:
            return requests.get(self.url + path, timeout=10)
        except requests.RequestException as error:
            return type("Refused", (), {"status_code": type(error).__name__})()

    def post(self, channel, text):
        reply = requests.post(f"{self.url}/messages/{channel}", json={"sender": "e2e", "message": text}, timeout=30)
        assert reply.status_code == 201, reply.text
        return reply.json()["id"]

    def read_on(self, node, channel):
        """The channel's messages as a node answers them, from inside its container."""
        script = (
            "import urllib.request; "
            f"print(urllib.request.urlopen('http://127.0.0.1:8080/messages/{channel}?limit=1000', timeout=10).read()"
            ".decode())"
        )
        answer = self.run("exec", "-T", node, "python", "-c", script).stdout
        return [message["message"] for message in json.loads(answer)["messages"]]


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def cluster(compose, base_image, cluster_image, wheelhouse):  # noqa: F811
    cluster = Cluster(compose, base_image, cluster_image)
    cluster.remove_everything()
    cluster.up("--build")
    yield cluster
    cluster.remove_everything()


def test_two_nodes_behind_the_balancer_share_one_postgresql(cluster):
    status = cluster.get("/status").json()
    assert status.get("database") == "postgresql", (status, cluster.logs())
    texts = [f"through the balancer {n}" for n in range(6)]
    ids = [cluster.post("cluster", text) for text in texts]
    assert ids == sorted(ids)
    for node in NODES:
        assert cluster.read_on(node, "cluster")[-6:] == texts


def test_a_stopped_node_leaves_the_other_serving(cluster):
    cluster.run("stop", "node-a")
    try:
        kept = [cluster.post("one-node", f"while node-a is stopped {n}") for n in range(20)]
        assert len(kept) == 20
        assert cluster.read_on("node-b", "one-node")[-20:] == [f"while node-a is stopped {n}" for n in range(20)]
    finally:
        cluster.run("start", "node-a")
    cluster.wait_healthy()


def test_without_postgresql_the_nodes_are_taken_out_and_come_back_by_themselves(cluster):
    before = cluster.post("outage", "before the outage")
    cluster.run("stop", "postgres")
    try:
        for node in NODES:
            if not wait_for(lambda node=node: cluster.health(node) == "unhealthy", 90):
                pytest.fail(f"{node} stayed {cluster.health(node)} without its database:\n{cluster.logs()}")
        assert wait_for(lambda: cluster.get("/healthz").status_code == 503, 30)
    finally:
        cluster.run("start", "postgres")
    cluster.wait_healthy()
    deadline = time.monotonic() + 60
    while cluster.get("/healthz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)
    after = cluster.post("outage", "after the outage")
    assert after > before
    for node in NODES:
        assert cluster.read_on(node, "outage")[-2:] == ["before the outage", "after the outage"]
