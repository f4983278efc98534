import itertools
import os
import signal
import time

import pytest
import requests

from broker_process import BrokerProcess
from postgres_server import PostgresServer

# Under CI=true a skipped e2e or reliability test is a failure (tests/ci_skip_rule.py).
pytest_plugins = ["ci_skip_rule"]

_channel_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def broker_backend():
    """The store backend of a module's brokers. A module whose tests run on both backends
    overrides it: @pytest.fixture(scope="module", params=["sqlite", "postgres"])."""
    return "sqlite"


@pytest.fixture(scope="module")
def broker(request, broker_backend):
    """The shared broker of the module's backend."""
    return request.getfixturevalue(f"{broker_backend}_broker")


@pytest.fixture(scope="session")
def sqlite_broker(tmp_path_factory):
    """One broker for the tests that only need one: 2 gevent workers, loopback, temp db."""
    process = BrokerProcess(tmp_path_factory.mktemp("broker") / "messages.db").start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def postgres_broker(tmp_path_factory, postgres_server):
    """One broker on PostgreSQL for the tests of the modules that run on both backends."""
    directory = tmp_path_factory.mktemp("postgres-broker")
    process = BrokerProcess(directory / "messages.db", database_url=postgres_server.new_database()).start()
    yield process
    process.stop()


@pytest.fixture
def own_broker(request, tmp_path, broker_backend):
    """A broker of this test's own, for restarts and settings; started by the test. Every
    one a test makes uses the same database (of the module's backend)."""
    started, databases = [], []

    def make(**kwargs):
        if broker_backend == "postgres" and "database_url" not in kwargs:
            if not databases:
                databases.append(request.getfixturevalue("postgres_server").new_database())
            kwargs["database_url"] = databases[0]
        process = BrokerProcess(tmp_path / "messages.db", **kwargs)
        started.append(process)
        return process

    yield make
    # A quick stop (gunicorn's SIGQUIT): the test is over, and a graceful one waits for
    # every open connection, up to the graceful timeout, after nearly every test.
    for process in started:
        process.stop(signal.SIGQUIT)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for this test process, started the first time a test asks."""
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request):
    """Each test that takes it runs on both store backends."""
    return request.param


@pytest.fixture
def new_store(request, backend, tmp_path):
    """new_store(**options) opens a store on a new database of the test's backend (one
    database per call with fresh=True, else the test's one); closed after the test."""
    from agent_comms_broker.store import Store

    opened, databases = [], []

    def make(fresh=False, **options):
        if backend == "postgres":
            from agent_comms_broker.store.postgres import PostgresStore

            if not databases:
                databases.append(request.getfixturevalue("postgres_server").new_database())
            elif fresh:
                _empty_postgres(databases[-1])  # a new database costs ten times more
            options.pop("synchronous", None)
            store = PostgresStore(databases[-1], **options)
        else:
            if fresh or not databases:
                databases.append(str(tmp_path / f"store-{len(databases)}.db"))
            store = Store(databases[-1], **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def _empty_postgres(url):
    """Empty every table of a PostgreSQL store's database, as new."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        tables = [
            row[0]
            for row in connection.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename NOT IN ('broker_schema', 'writer', 'search_index')"
            )
        ]
        connection.execute(f"TRUNCATE {', '.join(tables)}")
        connection.execute("UPDATE writer SET last_id = 0")


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
