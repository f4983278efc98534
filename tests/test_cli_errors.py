"""agent-chat's answers to mistakes: a command line that does not match its usage, a
broker URL that is not one, http:// to an HTTPS broker and back, a reader that goes away,
input that is not text. Each is one line on stderr and the documented exit status, never
a traceback. The real CLI, against real brokers on loopback."""

import datetime
import os
import subprocess

import pytest
import trustme
from docopt import docopt

from agent_comms_chat import cli
from agent_comms_chat.config import ConfigError, resolve
from broker_process import BrokerProcess, free_port
from cli_process import CHAT
from conftest import post
from http_peer import Peer


def chat(*args, env=None, stdin=None, timeout=30):
    return subprocess.run(
        [*CHAT, *args], input=stdin, capture_output=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def one_line(done, status, *fragments):
    """The single stderr line of a finished agent-chat, checked for `status` and fragments."""
    stderr = done.stderr.decode()
    assert done.returncode == status, (done.returncode, done.stdout, stderr)
    assert len(stderr.splitlines()) == 1 and stderr.startswith("agent-chat: "), stderr
    for fragment in fragments:
        assert fragment in stderr
    return stderr


# -- the command line --------------------------------------------------------------------

USAGE_READ = "usage: agent-chat [options] read CHANNEL [--limit N] [--since TIMESTAMP | --after ID]"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["read", "general", "--after", "1", "--since", "0"], ["--since and --after exclude each other", USAGE_READ]),
        (["read", "general", "--limit", "1", "--limit", "2"], ["--limit is given twice", USAGE_READ]),
        (["read", "general", "--limit"], ["--limit needs a value"]),
        (["read", "general", "--limt", "3"], ["unknown option --limt (did you mean --limit?)"]),
        (["send", "general"], ["send needs MESSAGE", "usage: agent-chat [options] send CHANNEL MESSAGE"]),
        (["send", "general", "two", "words"], ["'words' is one too many (quote"]),
        (
            ["send", "general", "x", "--count", "2"],
            ["--count is not an option of send (it is an option of watch, work)"],
        ),
        (["watch"], ["watch needs CHANNEL"]),
        (["frobnicate"], ["unknown command 'frobnicate': the commands are send, read, watch, search, channels"]),
        ([], ["no command given: the commands are send, read"]),
        (
            ["--t", "x", "status"],
            ["--t is ambiguous: it could be --tag, --thread, --timeout, --tls-cert, --tls-key, --token"],
        ),
        (["--json=yes", "status"], ["--json takes no value"]),
        (["status", "extra"], ["status takes no arguments: 'extra' is one too many"]),
        (["--agent-id", "", "take", "tasks"], ["--agent-id is empty"]),
    ],
)
def test_a_command_line_off_the_usage_is_explained_in_one_line(args, fragments):
    one_line(chat(*args), 1, *fragments)


@pytest.mark.parametrize(
    "args",
    [
        ["send", "tasks", "x", "--reply-to", "4", "--priority", "5", "--tag", "a", "--tag=b", "--meta", "{}"],
        ["--json", "--broker", "http://127.0.0.1:1", "send", "tasks", "-", "--wait-reply", "--timeout", "5m"],
        ["--config", "f", "send", "read", "read"],  # a message that is another command's name
        ["read", "tasks", "--limit", "3", "--since", "0", "--thread", "1", "--unread", "--agent-id", "a"],
        ["watch", "tasks", "--after", "1", "--count", "2", "--until", "x", "--interval", "5", "--resume"],
        ["channels", "--json"],
        ["agents"],
        ["--token=t", "status"],
        ["take", "tasks", "--lease", "10m", "--wait", "30"],
        ["done", "tasks", "41", "ok", "--ca", "ca.pem"],
        ["release", "tasks", "41", "--dead"],
        ["queue", "tasks"],
        ["inbox", "--unread", "--watch"],
        ["work", "tasks", "--count", "1", "--", "sh", "-c", "cat --json"],
        ["mcp", "--http", "127.0.0.1:8081", "--tls-cert", "c", "--tls-key", "k"],
    ],
)
def test_a_command_line_is_read_as_against_the_whole_usage(args):
    """For speed, agent-chat has docopt read a command line with [options] only in the
    usage lines of the commands it names: it must come out exactly as docopt reads it
    against the whole usage text; and help, the version and mistakes go to that."""
    assert cli._quick_parse(args) == docopt(cli.__doc__, argv=args)
    for before in (["--help"], ["-h"], ["--version"], ["--limt", "1"], ["--count", "2", "--dead"]):
        assert cli._quick_parse([*before, *args]) is None


# -- the broker URL ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "fragments"),
    [
        ("127.0.0.1:8080", ["'127.0.0.1:8080' (--broker) has no scheme: write http://127.0.0.1:8080"]),
        ("localhost:8080", ["has no scheme: write http://localhost:8080 (or https://localhost:8080"]),
        ("ftp://127.0.0.1:21", ["must start with http:// or https://"]),
        ("http://", ["names no host"]),
        ("http://127.0.0.1:99999", ["Port out of range"]),
        ("http://127.0.0.1:1/?token=x", ["must not have a query"]),
        ("http://someone:s3cret@127.0.0.1:1", ["must not hold a user or password"]),
        (f"http://{'a' * 64}.invalid:8080", ["has a host name that is not valid"]),  # a label over 63
    ],
)
@pytest.mark.parametrize("command", [["send", "tasks", "x"], ["status"]])
def test_a_broker_url_that_is_not_one_is_a_usage_error(address, fragments, command):
    stderr = one_line(chat("--broker", address, *command), 1, *fragments)
    assert "s3cret" not in stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--agent-id", b"\xff", "status"], "the agent id (--agent-id) is not valid UTF-8 text"),
        (["--token", b"t\xff", "status"], "the token (--token) is not valid UTF-8 text"),
        (["read", ""], "CHANNEL is empty"),
        (["send", "", "x"], "CHANNEL is empty"),
    ],
)
def test_an_agent_id_token_or_channel_that_cannot_be_sent_is_a_usage_error(args, fragment):
    """Bytes that are not UTF-8 in a header value (a traceback before), an empty channel
    (asked of the broker before, and a 404)."""
    one_line(chat(*args), 1, fragment)


def test_the_broker_url_error_names_where_the_url_came_from(tmp_path):
    one_line(chat("status", env={"AGENT_COMMS_BROKER": "localhost:8080"}), 1, "(AGENT_COMMS_BROKER) has no scheme")
    config = tmp_path / "chat.ini"
    config.write_text("[agent-comms]\nbroker = localhost:8080\n")
    with pytest.raises(ConfigError, match=f"broker in {config}. has no scheme"):
        resolve({}, environ={}, paths=[str(config)])


def test_a_broker_url_with_a_path_is_pointed_at_its_root(url):
    for command in (["status"], ["send", "tasks", "x"]):
        one_line(
            chat("--broker", f"{url}/messages/tasks", *command),
            2,
            "404",
            f"has a path, /messages/tasks: is the broker at {url}?",
        )


def test_a_server_that_is_not_a_broker_gets_one_line():
    with Peer([(200, {"hello": "world"}, {})]) as peer:
        for command in (["read", "tasks"], ["channels"], ["agents"], ["watch", "tasks"], ["send", "tasks", "x"]):
            one_line(chat("--broker", peer.url, *command), 2, "is it an agent-comms broker?")


# -- TLS and plain HTTP mixed up -------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A throwaway CA; an HTTPS broker whose certificate names only 127.0.0.1; and the
    files of an expired certificate for 127.0.0.1 (a broker would not pass its own health
    check with it, so a loopback peer of the test serves it)."""
    folder = tmp_path_factory.mktemp("cli-tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    expired = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    files = {}
    for name, cert in (
        ("current", ca.issue_cert("127.0.0.1")),
        ("expired", ca.issue_cert("127.0.0.1", not_after=expired)),
    ):
        cert.private_key_pem.write_to_path(str(folder / f"{name}.key"))
        for blob in cert.cert_chain_pems:
            blob.write_to_path(str(folder / f"{name}.pem"), append=True)
        files[name] = (str(folder / f"{name}.pem"), str(folder / f"{name}.key"))
    env = {"AGENT_COMMS_TLS_CERT": files["current"][0], "AGENT_COMMS_TLS_KEY": files["current"][1]}
    broker = BrokerProcess(folder / "current.db", env=env, ca=str(folder / "ca.pem")).start()
    yield {"ca": str(folder / "ca.pem"), "current": broker, "expired_files": files["expired"]}
    broker.stop()


@pytest.mark.parametrize("command", [["status"], ["read", "tasks"], ["watch", "tasks"], ["send", "tasks", "x"]])
def test_https_to_a_plain_http_broker_says_to_use_http(url, command):
    https = url.replace("http://", "https://")
    one_line(chat("--broker", https, *command), 2, f"{https} does not speak TLS", f"use {url}")


@pytest.mark.parametrize(
    "command", [["status"], ["read", "tasks"], ["watch", "tasks"], ["watch", "tasks", "--after", "0"]]
)
def test_http_to_an_https_broker_says_to_use_https(tls, command):
    https = tls["current"].url
    plain = https.replace("https://", "http://")
    one_line(chat("--broker", plain, *command), 2, "the broker there speaks TLS", f"use {https}")


def test_a_send_over_http_to_an_https_broker_was_not_stored(tls):
    https = tls["current"].url
    plain = https.replace("https://", "http://")
    stderr = one_line(chat("--broker", plain, "send", "tasks", "x"), 2, "so nothing was stored", f"use {https}")
    assert "may have been stored" not in stderr


@pytest.mark.parametrize("command", [["status"], ["send", "tasks", "x"]])
def test_a_certificate_for_another_name_is_not_a_ca_problem(tls, command):
    by_name = tls["current"].url.replace("127.0.0.1", "localhost")
    stderr = one_line(chat("--broker", by_name, "--ca", tls["ca"], *command), 2, "is not for localhost")
    assert "--ca" not in stderr


@pytest.mark.parametrize("command", [["status"], ["send", "tasks", "x"]])
def test_an_expired_certificate_is_not_a_ca_problem(tls, command):
    with Peer([(200, {"status": "running"}, {})], tls=tls["expired_files"]) as peer:
        done = chat("--broker", peer.url, "--ca", tls["ca"], *command)
    assert "--ca" not in one_line(done, 2, "is not valid now", "expired")


# -- a reader that goes away, input that is not text ---------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["--help"],
        ["--version"],
        ["read", "{channel}"],
        ["read", "{channel}", "--json"],
        ["watch", "{channel}", "--after", "0", "--count", "1"],
        ["channels"],
        ["agents"],
        ["status"],
        ["send", "{channel}", "x"],
    ],
)
def test_output_to_a_closed_pipe_ends_quietly(url, channel, command):
    """`agent-chat --help | head` and the like: the reader has gone before agent-chat
    writes (the pipe's read end is closed here first, so the write always fails)."""
    post(url, channel, "a", "m")
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [*CHAT, *(arg.format(channel=channel) for arg in command)],
            stdout=writer,
            stderr=subprocess.PIPE,
            timeout=30,
        )
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (0, b"")


def test_a_message_that_is_not_utf8_is_a_usage_error(channel):
    one_line(chat("send", channel, "-", stdin=b"caf\xe9\n"), 1, "standard input is not UTF-8")
    done = subprocess.run([*CHAT, "send", channel, b"caf\xe9"], capture_output=True, timeout=30)
    one_line(done, 1, "MESSAGE is not valid UTF-8")


@pytest.mark.parametrize(
    ("agent_id", "fragment"),
    [("two\nlines", "contains control characters"), (" padded", "starts or ends with a space")],
)
def test_an_agent_id_a_header_cannot_carry_is_a_usage_error(channel, agent_id, fragment):
    one_line(chat("--agent-id", agent_id, "send", channel, "x"), 1, f"agent id (--agent-id) {fragment}")


def test_an_unreachable_port_is_named():
    dead = f"http://127.0.0.1:{free_port()}"
    one_line(chat("--broker", dead, "status"), 2, f"cannot reach {dead}/status: connection refused")
