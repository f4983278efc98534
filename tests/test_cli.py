"""agent-chat as agents and people run it: the real CLI in a subprocess against a real
broker, under both entry points (`agent-chat` and the old `python3 client/chat.py`)."""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from agent_comms_chat.config import DEFAULT_BROKER, SYSTEM_CONFIG, config_paths, resolve
from broker_process import BrokerProcess, free_port
from cli_process import CHAT, ENTRY_POINTS, ROOT, Running, until_watching
from conftest import post
from http_peer import Peer


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
    """`watch tasks --interval 5`: live, not a poll every 5 s; what was posted before it
    started is not printed."""
    post(url, channel, "warp-ct200", "posted before the watcher")
    with Running([*chat.entry, "watch", channel, "--interval", "5"]) as watcher:
        probes = until_watching(watcher, lambda text: post(url, channel, "probe", text))
        post(url, channel, "warp-ct200", "Download media file: movie.mkv")
        started = time.monotonic()
        line = watcher.line(timeout=4)
        assert time.monotonic() - started < 4, "watch polled instead of following the stream"
        assert "warp-ct200: Download media file: movie.mkv" in line
        assert not any("posted before" in seen for seen in probes)


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
    with Running([*chat.entry, "watch", channel, "--until", "✅ Download completed", "--timeout", "30"]) as watcher:
        until_watching(watcher, lambda text: post(url, channel, "probe", text))
        post(url, channel, "a", "Download started")
        post(url, channel, "a", "✅ Download completed: movie.mkv")
        post(url, channel, "a", "after the match")
        assert watcher.wait(30) == 0
        printed = watcher.rest()
    assert [line.split(": ", 1)[1] for line in printed] == ["Download started", "✅ Download completed: movie.mkv"]


def test_watch_interrupted_exits_130(chat, url, channel):
    """Ctrl-C (SIGINT) while watching: exit status 130, nothing on stderr."""
    with Running([*chat.entry, "watch", channel]) as watcher:
        until_watching(watcher, lambda text: post(url, channel, "probe", text))
        watcher.process.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 130
        assert watcher.rest() == [] and watcher.stderr() == ""


def test_watch_timeout_exits_124(chat, channel):
    started = time.monotonic()
    result = chat("watch", channel, "--timeout", "1.5")
    assert result.returncode == 124 and result.stdout == ""
    assert 1.4 < time.monotonic() - started < 15


def test_watch_survives_a_broker_restart(chat, own_broker):
    broker = own_broker().start()
    env = {**os.environ, "AGENT_COMMS_BROKER": broker.url}
    cursor = post(broker.url, "tasks", "a", "before")["id"]
    command = [*chat.entry, "watch", "tasks", "--after", str(cursor), "--count", "6", "--json", "--timeout", "60"]
    with Running(command, env=env) as watcher:
        sent = [post(broker.url, "tasks", "a", f"m{n}") for n in range(3)]
        printed = [json.loads(watcher.line())["id"] for _ in range(3)]
        broker.stop()
        time.sleep(1.0)  # the watcher retries against a broker that is down
        broker.start()
        sent += [post(broker.url, "tasks", "a", f"m{n}") for n in range(3, 6)]
        assert watcher.wait(60) == 0
        printed += [json.loads(line)["id"] for line in watcher.rest()]
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


def test_channels_and_agents_follow_every_page(own_broker):
    """Past the broker's 1000 rows a page, the whole listing; agents most recently seen first."""
    broker = own_broker().start()
    session = requests.Session()
    for first in range(0, 1203, 401):
        batch = [{"sender": f"agent-{n:04}", "message": "m"} for n in range(first, first + 401)]
        assert session.post(f"{broker.url}/messages/tasks", json=batch, timeout=30).status_code == 201
    for n in range(1002):
        assert session.post(f"{broker.url}/messages/ch-{n:04}", json={"sender": "a", "message": "m"}).status_code == 201
    time.sleep(1.1)  # last-seen has a resolution of one second
    session.get(f"{broker.url}/status", headers={"X-Agent-ID": "seen-last"}, timeout=10)
    env = {**os.environ, "AGENT_COMMS_BROKER": broker.url, "AGENT_COMMS_AGENT_ID": "lister"}
    agents = json.loads(subprocess.run([*CHAT, "agents", "--json"], capture_output=True, env=env, timeout=60).stdout)
    ids = [agent["id"] for agent in agents["agents"]]
    assert len(ids) == len(set(ids)) == agents["count"] == 1203 + 3 and not agents["more"]
    assert ids[:2] == ["lister", "seen-last"]  # lister: seen by the request itself
    seen = [agent["last_seen"] for agent in agents["agents"]]
    assert seen == sorted(seen, reverse=True)
    channels = json.loads(
        subprocess.run([*CHAT, "channels", "--json"], capture_output=True, env=env, timeout=60).stdout
    )
    names = [channel["name"] for channel in channels["channels"]]
    assert names == sorted(names) and len(names) == channels["count"] == 1002 + 1
    table = subprocess.run([*CHAT, "agents"], capture_output=True, text=True, env=env, timeout=60).stdout.splitlines()
    assert len(table) == 1 + 1206 and table[2].startswith("seen-last ")


def test_a_listing_stops_after_100_pages_and_says_so():
    def page(number, path):
        row = {"id": f"a{number:05}", "first_seen": 1.0, "last_seen": 1.0 + number, "message_count": 0}
        return 200, {"agents": [row], "count": 1, "more": True, "cursor": row["id"]}, {}

    with Peer(page) as peer:
        done = subprocess.run([*CHAT, "--broker", peer.url, "agents"], capture_output=True, text=True, timeout=60)
    assert len(peer.requests) == 100 and peer.requests[1][1] == "/agents?after=a00000"
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1 + 100
    one_line_error(done, 0, "listed the first 100 agents; there are more (after 'a00099')")


# -- errors and exit codes --------------------------------------------------------------


UNREACHABLE_COMMANDS = [
    ["send", "general", "x"],
    ["read", "general"],
    ["watch", "general"],
    ["channels"],
    ["agents"],
    ["status"],
]


def test_unreachable_broker_is_one_line_and_exit_2(chat):
    """Each command tries to connect for some 4.5 s (a restarting broker is waited for):
    they run side by side."""
    dead = f"http://127.0.0.1:{free_port()}"
    with concurrent.futures.ThreadPoolExecutor(len(UNREACHABLE_COMMANDS)) as pool:
        results = list(pool.map(lambda args: chat("--broker", dead, *args), UNREACHABLE_COMMANDS))
    for result in results:
        one_line_error(result, 2, dead, "connection refused")


def test_http_error_is_one_line_and_exit_2(chat, url):
    one_line_error(chat("read", "bad name!"), 2, f"{url}/messages/bad%20name%21", "400", "invalid channel name")


def test_invalid_broker_url_is_one_line_and_exit_1(chat):
    one_line_error(chat("--broker", "not-a-url", "status"), 1, "not-a-url", "http://not-a-url")


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
    one_line_error(chat(*args), 1)


def test_help_documents_commands_and_exit_codes(chat):
    result = chat("--help")
    assert result.returncode == 0
    for text in ("send CHANNEL MESSAGE", "watch CHANNEL", "124", "130", "broker is unreachable", "AGENT_COMMS_CONFIG"):
        assert text in result.stdout
    assert chat("--version").stdout.strip() == "0.2.0"


# -- configuration ----------------------------------------------------------------------


def test_config_order_flag_env_file(chat, url, tmp_path, channel):
    """The flag beats the environment, which beats the config file (here the one
    AGENT_COMMS_CONFIG names), which beats the default."""
    named = tmp_path / "named.ini"
    named.write_text(f"[agent-comms]\nbroker = http://127.0.0.1:{free_port()}\nagent_id = from-file\n")

    def sender(*args, **env):
        result = chat(*args, env={"AGENT_COMMS_CONFIG": str(named), **env})
        assert result.returncode == 0, result.stderr
        return latest(url, channel)[-1]["sender"]

    assert sender("send", channel, "x") == "from-file"  # and the broker of the environment
    assert sender("send", channel, "x", AGENT_COMMS_AGENT_ID="from-env") == "from-env"
    assert sender("--agent-id", "from-flag", "send", channel, "x", AGENT_COMMS_AGENT_ID="from-env") == "from-flag"


def test_config_named_by_agent_comms_config_or_config_is_the_only_one(chat, url, tmp_path, channel):
    user = Path(os.environ["XDG_CONFIG_HOME"]) / "agent-comms" / "config.ini"
    user.parent.mkdir(parents=True)
    user.write_text("[agent-comms]\nagent_id = from-user-config\n")
    named, flagged = tmp_path / "named.ini", tmp_path / "flagged.ini"
    named.write_text("[agent-comms]\nagent_id = from-named-config\n")
    flagged.write_text("[agent-comms]\nagent_id = from-config-flag\n")

    def sender(*args):
        result = chat(*args, env={"AGENT_COMMS_CONFIG": str(named)})
        assert result.returncode == 0, result.stderr
        return latest(url, channel)[-1]["sender"]

    assert sender("send", channel, "x") == "from-named-config"
    assert sender("--config", str(flagged), "send", channel, "x") == "from-config-flag"
    missing = chat("send", channel, "x", env={"AGENT_COMMS_CONFIG": str(tmp_path / "absent.ini")})
    one_line_error(missing, 1, "absent.ini", "No such file")
    broken = tmp_path / "broken.ini"
    broken.write_text("agent_id = no section\n")
    one_line_error(chat("--config", str(broken), "send", channel, "x"), 1, "broken.ini", "no section headers")
    assert "%" in sender("--config", str(_config(tmp_path, "agent_id = 100%-raw")), "send", channel, "x")


def _config(folder, line):
    path = folder / "one.ini"
    path.write_text(f"[agent-comms]\n{line}\n")
    return path


# Runs agent-chat's main() in this Python with an audit hook that records every file
# opened (configparser opens each path it tries, there or not), written to $OPENED.
AUDITED_CHAT = """
import json, os, sys
opened = []
sys.addaudithook(lambda event, args: event == "open" and isinstance(args[0], str) and opened.append(args[0]))
from agent_comms_chat.cli import main
status = main(sys.argv[1:])
with open(os.environ["OPENED"], "w") as record:
    json.dump(opened, record)
sys.exit(status)
"""


def test_the_tests_agent_chat_reads_no_config_of_the_host(url, channel, tmp_path):
    """Under the autouse fixture, a fake user config (where $XDG_CONFIG_HOME and $HOME
    point) does not reach agent-chat, and it opens neither ~/.config/agent-comms nor
    /etc/agent-comms/chat.ini. Without AGENT_COMMS_CONFIG the same run opens the user's
    config, and the system's where it exists."""
    fake = "[agent-comms]\nagent_id = leaked-from-a-user-config\n"
    home = tmp_path / "home"
    for folder in (Path(os.environ["XDG_CONFIG_HOME"]), home / ".config"):
        (folder / "agent-comms").mkdir(parents=True)
        (folder / "agent-comms" / "config.ini").write_text(fake)
    record = tmp_path / "opened.json"
    env = {**os.environ, "HOME": str(home), "OPENED": str(record)}
    command = [sys.executable, "-c", AUDITED_CHAT, "send", channel, "isolated"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert latest(url, channel)[-1]["sender"] != "leaked-from-a-user-config"
    opened = json.loads(record.read_text())
    assert not [path for path in opened if path.endswith("agent-comms/config.ini") or "/etc/agent-comms" in path]
    # The same run without AGENT_COMMS_CONFIG, stopped by a usage error before any request.
    del env["AGENT_COMMS_CONFIG"]
    done = subprocess.run([*command[:3], "read", channel, "--limit", "0"], env=env, capture_output=True, timeout=30)
    assert done.returncode == 1
    opened = json.loads(record.read_text())
    assert str(Path(env["XDG_CONFIG_HOME"]) / "agent-comms/config.ini") in opened
    # The system's file is opened where it exists (only files that exist are read).
    assert ("/etc/agent-comms/chat.ini" in opened) == os.path.exists("/etc/agent-comms/chat.ini")


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
    # Where the files are looked for: the user's (under XDG_CONFIG_HOME), then the system's;
    # or only the one that --config or AGENT_COMMS_CONFIG names.
    assert config_paths({}, {"XDG_CONFIG_HOME": "/x"}) == (["/x/agent-comms/config.ini", SYSTEM_CONFIG], False)
    assert config_paths({}, {"AGENT_COMMS_CONFIG": "/a.ini"}) == (["/a.ini"], True)
    assert config_paths({"--config": "/f.ini"}, {"AGENT_COMMS_CONFIG": "/a.ini"}) == (["/f.ini"], True)


def test_token_and_agent_id_are_sent_as_headers():
    """A token as `Authorization: Bearer ...`, an agent id (any Unicode) as X-Agent-ID in
    UTF-8, on sends (http.client) and reads (requests) alike."""
    stored = {"status": "success", "id": 1, "channel": "c", "sender": "café", "message": "m", "timestamp": 1.0}
    page = {"channel": "c", "messages": [], "count": 0, "cursor": 0, "gap": False, "more": False}
    with Peer([(201, stored, {}), (200, page, {})]) as peer:
        options = ["--broker", peer.url, "--token", "s3cret", "--agent-id", "café"]
        for command in (["send", "c", "m"], ["read", "c"]):
            done = subprocess.run([*CHAT, *options, *command], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
    for _method, _path, headers, _body, _when in peer.requests:
        assert headers["Authorization"] == "Bearer s3cret"
        assert headers["X-Agent-ID"].encode("latin-1").decode("utf-8") == "café"


@pytest.mark.parametrize("command", [["status", "--json"], ["send", "late", "posted once"]])
def test_retries_until_a_starting_broker_answers(chat, tmp_path, command):
    """A read or a send started just before the broker comes up retries opening its
    connection with backoff and succeeds; the send is stored exactly once."""
    broker = BrokerProcess(tmp_path / "late.db", port=free_port())
    with Running([*chat.entry, "--broker", broker.url, *command]) as started:
        try:
            broker.start()
            assert started.wait(30) == 0
            printed = started.rest()
            if command[0] == "send":
                assert [m["message"] for m in latest(broker.url, "late")] == ["posted once"]
                assert printed == [str(latest(broker.url, "late")[0]["id"])]
            else:
                assert json.loads(printed[0])["status"] == "running"
        finally:
            broker.stop()


def test_send_refused_with_503_is_sent_again_after_retry_after():
    """A post refused with 503 was not stored: agent-chat waits the Retry-After and sends
    it again (the peer is a loopback server of this test: a real broker answers 503 only
    when its database stays locked for 10 s)."""
    stored = {"status": "success", "id": 7, "channel": "tasks", "sender": "a", "message": "m", "timestamp": 1.0}
    replies = [(503, {"error": "database is busy"}, {"Retry-After": "1"}), (201, stored, {})]
    with Peer(replies) as peer:
        started = time.monotonic()
        done = subprocess.run(
            [*CHAT, "--broker", peer.url, "send", "tasks", "m"], capture_output=True, text=True, timeout=30
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, "7\n", "")
    posts = [request for request in peer.requests if request[0] == "POST"]
    assert len(posts) == 2 and posts[0][3] == posts[1][3] and json.loads(posts[0][3])["message"] == "m"
    assert posts[1][4] - posts[0][4] >= 0.95, "sent again before Retry-After"
    assert time.monotonic() - started < 10


def test_send_gives_up_when_retry_after_is_past_its_budget():
    with Peer([(503, {"error": "database is busy"}, {"Retry-After": "3600"})]) as peer:
        done = subprocess.run(
            [*CHAT, "--broker", peer.url, "send", "tasks", "m"], capture_output=True, text=True, timeout=30
        )
    one_line_error(done, 2, "answered 503", "database is busy")
    assert len(peer.requests) == 1


def test_read_refused_with_503_is_asked_again_after_retry_after():
    page = {"channel": "tasks", "messages": [], "count": 0, "cursor": 0, "gap": False, "more": False}
    with Peer([(503, {"error": "database is busy"}, {"Retry-After": "1"}), (200, page, {})]) as peer:
        done = subprocess.run(
            [*CHAT, "--broker", peer.url, "read", "tasks"], capture_output=True, text=True, timeout=30
        )
    assert (done.returncode, done.stderr) == (0, "")
    assert len(peer.requests) == 2 and peer.requests[1][4] - peer.requests[0][4] >= 0.95
