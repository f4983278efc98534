import itertools
import os
import signal
import time

import pytest
import requests

from broker_process import BrokerProcess

# Under CI=true a skipped e2e or reliability test is a failure (tests/ci_skip_rule.py).
pytest_plugins = ["ci_skip_rule"]

_channel_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One broker for the tests that only need one: 2 gevent workers, loopback, temp db."""
    process = BrokerProcess(tmp_path_factory.mktemp("broker") / "messages.db").start()
    yield process
    process.stop()


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, for restarts and settings; started by the test."""
    started = []

    def make(**kwargs):
        process = BrokerProcess(tmp_path / "messages.db", **kwargs)
        started.append(process)
        return process

    yield make
    # A quick stop (gunicorn's SIGQUIT): the test is over, and a graceful one waits for
    # every open connection, up to the graceful timeout, after nearly every test.
    for process in started:
        process.stop(signal.SIGQUIT)


@pytest.fixture
def url(broker):
    return broker.url


@pytest.fixture
def channel(request):
    """A channel name no other test uses."""
    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:40].strip("-")
    return f"{base}-{next(_channel_numbers)}"


@pytest.fixture(autouse=True)
def _no_default_broker(monkeypatch, broker, tmp_path):
    """No command a test runs can fall back to the deployed broker, or read a config file
    of the machine (the user's or /etc/agent-comms/chat.ini): AGENT_COMMS_CONFIG names the
    only file agent-chat reads, and /dev/null holds nothing."""
    monkeypatch.setenv("AGENT_COMMS_BROKER", broker.url)
    monkeypatch.setenv("AGENT_COMMS_CONFIG", os.devnull)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    for variable in ("AGENT_COMMS_AGENT_ID", "AGENT_COMMS_TOKEN", "AGENT_COMMS_CA"):
        monkeypatch.delenv(variable, raising=False)


def post(url, channel, sender, message, **kwargs):
    reply = requests.post(
        f"{url}/messages/{channel}", json={"sender": sender, "message": message}, timeout=10, **kwargs
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def until(condition, timeout=15, what="the condition"):
    """Returns as soon as condition() is true; fails once `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def poster():
    return post


os.environ.setdefault("AGENT_COMMS_GRACEFUL_TIMEOUT", "3")
