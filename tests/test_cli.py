"""agent-chat as agents and people run it: the real CLI in a subprocess against a real
broker, under both entry points (`agent-chat` and the old `python3 client/chat.py`)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from agent_comms_chat.client import BrokerClient
from agent_comms_chat.config import DEFAULT_BROKER, resolve
from broker_process import BIN, BrokerProcess, free_port
from conftest import post

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "agent-chat": [str(BIN / "agent-chat")],
    "chat.py": [sys.executable, str(ROOT / "client" / "chat.py")],
}


@pytest.fixture(params=list(ENTRY_POINTS))
def chat(request):
    """Runs the CLI (one entry point per parametrisation); returns the CompletedProcess."""
    entry = ENTRY_POINTS[request.param]

    def run(*args, stdin=None, env=None, timeout=30):
        return subprocess.run(
            [*entry, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    run.entry = entry
    return run


def one_line_error(result, code, *fragments):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agent-chat: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def latest(url, channel):
    return requests.get(f"{url}/messages/{channel}", params={"limit": 1000}).json()["messages"]


# -- the seed README's commands, verbatim ------------------------------------------------

SEED_COMMANDS = [
    'send general "Hello from agent!"',
    '--agent-id "warp-ct200" send tasks "Task completed successfully"',
    "read general",
    "read general --limit 20",
    "channels",
    "agents",
    "status",
    "send alerts 'Alexa service started'",
    "read alerts",
    'send tasks "Download media file: movie.mkv"',
    'send tasks "✅ Download completed: movie.mkv"',
    'send monitoring "CPU usage: 45%, Memory: 67%"',
    'send alerts "⚠️  High memory usage detected"',
    '--broker "$BROKER_URL" --agent-id "$AGENT_ID" send general "Agent started"',
    '--broker "$BROKER_URL" --agent-id "$AGENT_ID" read tasks --limit 5',
]


def test_the_seed_readme_commands(chat, url):
    """Each `python3 chat.py ...` line of the old README, with only the program swapped."""
    program = " ".join(f"'{part}'" for part in chat.entry)
    env = {"BROKER_URL": url, "AGENT_ID": f"warp-test-{os.getpid()}"}
    for command in SEED_COMMANDS:
        result = subprocess.run(
            ["bash", "-c", f"{program} {command}"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
        )
        assert result.returncode == 0, (command, result.stderr)
        assert "Traceback" not in result.stderr
    assert "Hello from agent!" in chat("read", "general", "--limit", "50").stdout
    tasks = [m["message"] for m in latest(url, "tasks")]
    assert "✅ Download completed: movie.mkv" in tasks and "Task completed successfully" in tasks
    agents = {a["id"] for a in requests.get(f"{url}/agents").json()["agents"]}
    assert {"warp-ct200", env["AGENT_ID"]} <= agents


def test_seed_watch_command_prints_new_messages(chat, url, channel):
    """`watch tasks --interval 5`: live, not a poll every 5 s."""
    watcher = subprocess.Popen([*chat.entry, "watch", channel, "--interval", "5"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # let it connect; what was posted before it started is not printed
        post(url, channel, "warp-ct200", "Download media file: movie.mkv")
        started = time.monotonic()
        line = watcher.stdout.readline()
        assert "warp-ct200: Download media file: movie.mkv" in line
        assert time.monotonic() - started < 4, "watch polled instead of following the stream"
    finally:
        watcher.terminate()
        watcher.wait(10)


def test_old_path_with_the_system_python(url, tmp_path):
    """`python3 /opt/agent-comms/chat.py ...` under a Python without requests or docopt:
    chat.py finds the virtualenv installed beside it and runs there."""
    system_python = Path("/usr/bin/python3")
    assert system_python.exists(), "Debian's python3 is part of every machine this runs on"
    home = tmp_path / "opt-agent-comms"
    home.mkdir()
    (home / "chat.py").write_text((ROOT / "client" / "chat.py").read_text())
    (home / "venv").symlink_to(sys.prefix)
    result = subprocess.run(
        [str(system_python), str(home / "chat.py"), "--agent-id", "old-script", "send", "general", "still works"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert latest(url, "general")[-1]["sender"] == "old-script"


# -- send -------------------------------------------------------------------------------


def test_send_prints_the_stored_id(chat, url, channel):
    result = chat("--agent-id", "cli-agent", "send", channel, "hello")
    assert result.returncode == 0, result.stderr
    stored = latest(url, channel)[-1]
    assert result.stdout.strip() == str(stored["id"])
    assert (stored["sender"], stored["message"]) == ("cli-agent", "hello")


def test_send_reads_stdin_with_dash(chat, url, channel):
    text = "line one\nline two ✅ 🚀\n\tindented ünïcode"
    result = chat("send", channel, "-", stdin=text + "\n")
    assert result.returncode == 0, result.stderr
    assert latest(url, channel)[-1]["message"] == text


def test_send_json(chat, channel):
    stored = json.loads(chat("send", channel, "x", "--json").stdout)
    assert stored["message"] == "x" and stored["channel"] == channel


def test_empty_stdin_is_a_usage_error(chat, channel):
    one_line_error(chat("send", channel, "-", stdin=""), 1, "empty")


# -- read -------------------------------------------------------------------------------


def test_read_human_format(chat, url, channel):
    post(url, channel, "warp-ct200", "first")
    post(url, channel, "monitor", "second\nmore")
    lines = chat("read", channel).stdout.splitlines()
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] warp-ct200: first", lines[0])
    assert lines[1].endswith("monitor: second") and lines[2] == "    more"


def test_read_limit_since_after_and_json(chat, url, channel):
    sent = [post(url, channel, "a", f"m{n}") for n in range(15)]
    default = chat("read", channel, "--json").stdout.splitlines()
    assert [json.loads(line)["message"] for line in default] == [f"m{n}" for n in range(5, 15)]
    limited = chat("read", channel, "--limit", "3", "--json").stdout.splitlines()
    assert [json.loads(line)["id"] for line in limited] == [m["id"] for m in sent[-3:]]
    after = chat("read", channel, "--after", str(sent[11]["id"]), "--json").stdout.splitlines()
    assert [json.loads(line)["id"] for line in after] == [m["id"] for m in sent[12:]]
    since = chat("read", channel, "--since", repr(sent[12]["timestamp"]), "--json").stdout.splitlines()
    assert [json.loads(line)["id"] for line in since] == [m["id"] for m in sent[13:]]


# -- watch ------------------------------------------------------------------------------


def test_watch_count_exits_after_n(chat, url, channel):
    cursor = post(url, channel, "a", "before")["id"]
    for n in range(3):
        post(url, channel, "a", f"m{n}")
    result = chat("watch", channel, "--after", str(cursor), "--count", "2", "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["message"] for line in result.stdout.splitlines()] == ["m0", "m1"]


def test_watch_until_exits_zero_on_a_match(chat, url, channel):
    watcher = subprocess.Popen(
        [*chat.entry, "watch", channel, "--until", "✅ Download completed", "--timeout", "30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    post(url, channel, "a", "Download started")
    post(url, channel, "a", "✅ Download completed: movie.mkv")
    post(url, channel, "a", "after the match")
    assert watcher.wait(30) == 0
    printed = watcher.stdout.read()
    assert "Download started" in printed and "✅ Download completed: movie.mkv" in printed
    assert "after the match" not in printed


def test_watch_timeout_exits_124(chat, channel):
    started = time.monotonic()
    result = chat("watch", channel, "--timeout", "1.5")
    assert result.returncode == 124 and result.stdout == ""
    assert 1.4 < time.monotonic() - started < 15


def test_watch_survives_a_broker_restart(chat, own_broker):
    broker = own_broker().start()
    env = {**os.environ, "AGENT_COMMS_BROKER": broker.url}
    cursor = post(broker.url, "tasks", "a", "before")["id"]
    watcher = subprocess.Popen(
        [*chat.entry, "watch", "tasks", "--after", str(cursor), "--count", "6", "--json", "--timeout", "60"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    sent = [post(broker.url, "tasks", "a", f"m{n}") for n in range(3)]
    deadline = time.monotonic() + 10
    while len(latest(broker.url, "tasks")) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    broker.stop()
    time.sleep(1.0)  # the watcher retries against a broker that is down
    broker.start()
    sent += [post(broker.url, "tasks", "a", f"m{n}") for n in range(3, 6)]
    assert watcher.wait(60) == 0
    printed = [json.loads(line)["id"] for line in watcher.stdout.read().splitlines()]
    assert printed == [m["id"] for m in sent], "lost or repeated messages across the restart"


def test_watch_reports_a_retention_gap(chat, own_broker):
    broker = own_broker(env={"AGENT_COMMS_RETENTION_MAX_MESSAGES": "2", "AGENT_COMMS_PRUNE_INTERVAL": "0.2"}).start()
    for n in range(6):
        post(broker.url, "alerts", "a", f"m{n}")
    deadline = time.monotonic() + 10
    while len(latest(broker.url, "alerts")) > 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    result = chat("watch", "alerts", "--after", "0", "--count", "2", env={"AGENT_COMMS_BROKER": broker.url})
    assert result.returncode == 0
    assert "retention removed messages of alerts after id 0" in result.stderr
    assert [line.split(": ", 1)[1] for line in result.stdout.splitlines()] == ["m4", "m5"]


# -- tables -----------------------------------------------------------------------------


def test_channels_agents_status_tables_and_json(chat, url, channel):
    post(url, channel, "table-agent", "x")
    channels = chat("channels").stdout.splitlines()
    assert channels[0].split() == ["CHANNEL", "MESSAGES", "LAST", "ACTIVITY"]
    row = next(line for line in channels if line.startswith(channel + " "))
    assert row.split()[1] == "1"
    assert row[channels[0].index("MESSAGES") :].startswith("1 ")  # aligned columns
    agents = chat("agents").stdout.splitlines()
    assert agents[0].split()[:3] == ["AGENT", "STATUS", "MESSAGES"]
    assert any(line.startswith("table-agent ") and " active " in line for line in agents)
    status = chat("status").stdout
    assert re.search(r"^status:\s+running$", status, re.M)
    for command in ("channels", "agents", "status"):
        assert isinstance(json.loads(chat(command, "--json").stdout), dict)


# -- errors and exit codes --------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["send", "general", "x"], ["read", "general"], ["watch", "general"], ["channels"], ["agents"], ["status"]],
)
def test_unreachable_broker_is_one_line_and_exit_2(chat, args):
    dead = f"http://127.0.0.1:{free_port()}"
    result = chat("--broker", dead, *args)
    one_line_error(result, 2, dead, "connection refused")


def test_http_error_is_one_line_and_exit_2(chat, url):
    one_line_error(chat("read", "bad name!"), 2, f"{url}/messages/bad name!", "400", "invalid channel name")


def test_invalid_broker_url_is_one_line(chat):
    one_line_error(chat("--broker", "not-a-url", "status"), 2, "not-a-url")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["send", "general"],
        ["read"],
        ["frobnicate"],
        ["read", "general", "--limit", "many"],
        ["read", "general", "--after", "1", "--since", "1"],
        ["watch", "general", "--until", "("],
        ["watch", "general", "--timeout", "soon"],
    ],
)
def test_usage_errors_exit_1(chat, args):
    result = chat(*args)
    assert result.returncode == 1, result
    assert result.stderr.startswith("agent-chat: ") and "Traceback" not in result.stderr


def test_help_documents_commands_and_exit_codes(chat):
    result = chat("--help")
    assert result.returncode == 0
    for text in ("send CHANNEL MESSAGE", "watch CHANNEL", "124", "broker is unreachable"):
        assert text in result.stdout
    assert chat("--version").stdout.strip() == "0.2.0"


# -- configuration ----------------------------------------------------------------------


def test_config_order_flag_env_file(chat, url, tmp_path, channel):
    config_dir = tmp_path / "xdg-config" / "agent-comms"
    config_dir.mkdir(parents=True)
    (config_dir / "config.ini").write_text(f"[agent-comms]\nbroker = {url}\nagent_id = from-file\n")
    env = {key: value for key, value in os.environ.items() if key != "AGENT_COMMS_BROKER"}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    run = chat.entry

    def send(*args, extra=None):
        result = subprocess.run([*run, *args], capture_output=True, text=True, env={**env, **(extra or {})})
        assert result.returncode == 0, result.stderr
        return latest(url, channel)[-1]["sender"]

    assert send("send", channel, "x") == "from-file"
    assert send("send", channel, "x", extra={"AGENT_COMMS_AGENT_ID": "from-env"}) == "from-env"
    assert send("--agent-id", "from-flag", "send", channel, "x", extra={"AGENT_COMMS_AGENT_ID": "from-env"}) == (
        "from-flag"
    )


def test_resolution_order_and_defaults(tmp_path):
    system = tmp_path / "chat.ini"
    system.write_text("[agent-comms]\nbroker = http://system:1\nagent_id = system-agent\ntoken = s\n")
    user = tmp_path / "config.ini"
    user.write_text("[agent-comms]\nbroker = http://user:1\n")
    found = resolve({}, environ={}, paths=[str(user), str(system)])
    assert found == {"broker": "http://user:1", "agent_id": "system-agent", "token": "s", "ca": None}
    # With a token and no agent id anywhere, there is none: the broker names the sender.
    assert resolve({"--token": "t"}, environ={}, paths=[])["agent_id"] is None
    found = resolve({"--broker": "http://flag:1/"}, environ={"AGENT_COMMS_BROKER": "http://env:1"}, paths=[])
    assert found["broker"] == "http://flag:1"
    defaults = resolve({}, environ={}, paths=[str(tmp_path / "missing.ini")])
    assert defaults["broker"] == DEFAULT_BROKER and defaults["token"] is None
    assert defaults["agent_id"].startswith("agent-") and defaults["agent_id"] == resolve({}, {}, [])["agent_id"]


def test_token_is_sent_as_a_bearer_token():
    client = BrokerClient("http://127.0.0.1:9", agent_id="a", token="s3cret")
    assert client.headers["Authorization"] == "Bearer s3cret"  # on sends (http.client)
    assert client.session.headers["Authorization"] == "Bearer s3cret"  # on reads (requests)
    assert client.session.headers["X-Agent-ID"] == "a"


@pytest.mark.parametrize("command", [["status", "--json"], ["send", "late", "posted once"]])
def test_retries_until_a_starting_broker_answers(chat, tmp_path, command):
    """A read or a send started just before the broker comes up retries opening its
    connection with backoff and succeeds; the send is stored exactly once."""
    broker = BrokerProcess(tmp_path / "late.db", port=free_port())
    started = subprocess.Popen([*chat.entry, "--broker", broker.url, *command], stdout=subprocess.PIPE, text=True)
    try:
        broker.start()
        assert started.wait(30) == 0
        printed = started.stdout.read()
        if command[0] == "send":
            assert [m["message"] for m in latest(broker.url, "late")] == ["posted once"]
            assert printed.strip() == str(latest(broker.url, "late")[0]["id"])
        else:
            assert json.loads(printed)["status"] == "running"
    finally:
        broker.stop()
