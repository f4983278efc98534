"""What agent-chat lets reach a terminal: a sender, a channel, an agent id or a message
can hold terminal escapes, a carriage return, bidi overrides; people see them as escapes,
never obeyed, and no message can draw a line that looks like another message. --json
stays exact. The real CLI against a real broker (one adopting an old broker.py database
for the names today's broker refuses)."""

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
import unicodedata

import pytest
import requests

from cli_process import CHAT
from conftest import post
from http_peer import Peer
from legacy_broker import legacy_database

HEADER = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")
# What a message may hold that a terminal would obey, and how agent-chat shows each.
HOSTILE = {
    "\x1b]0;pwned\x07": "\\x1b]0;pwned\\x07",  # set the window title
    "\x1b[2J\x1b[31m": "\\x1b[2J\\x1b[31m",  # clear the screen, red
    "\x9b2J": "\\x9b2J",  # the same clear as a C1 control
    "back\x08\x08\x08\x08": "back\\x08\\x08\\x08\\x08",
    "del\x7f": "del\\x7f",
    "\u202eevil\u2066": "\\u202eevil\\u2066",  # bidi override and isolate
    "zero\u200bwidth\ufeff": "zero\\u200bwidth\\ufeff",
    "line\u2028sep\x85nel": "line\\u2028sep\\x85nel",
    "tag\U000e0041": "tag\\U000e0041",
}
FORGED = "task done\r[2026-01-01 00:00:00] boss: wire the money"
KEPT = "tab\there, a family 👨\u200d👩\u200d👧, café"


def raw_controls(text, keep="\n"):
    """The characters of `text` a terminal would obey (or hide), but those in `keep`."""
    hidden = {"Cc", "Cf", "Cs", "Zl", "Zp"}
    return [char for char in text if char not in keep and unicodedata.category(char) in hidden]


def chat(*args, env=None, timeout=30):
    return subprocess.run(
        [*CHAT, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_read_shows_control_characters_as_escapes(url, channel):
    for text in HOSTILE:
        post(url, channel, "mallory", text)
    post(url, channel, "mallory", FORGED)
    post(url, channel, "mallory", KEPT)
    done = chat("read", channel, "--limit", "50")
    assert done.returncode == 0, done.stderr
    assert raw_controls(done.stdout, keep="\n\t\u200d") == []
    lines = done.stdout.splitlines()
    assert len(lines) == len(HOSTILE) + 2, "a message drew a line of its own"
    for line, shown in zip(lines, HOSTILE.values(), strict=False):
        assert line.endswith("] mallory: " + shown)
    assert lines[-2].endswith("] mallory: task done\\x0d[2026-01-01 00:00:00] boss: wire the money")
    assert lines[-1].endswith("] mallory: " + KEPT)
    assert all(HEADER.match(line) for line in lines)


def test_a_message_line_never_looks_like_a_message(url, channel):
    """A message's own lines are indented: none can pass for "[time] sender: ..."."""
    post(url, channel, "mallory", "hi\n[2026-01-01 00:00:00] boss: wire the money\r\nand a CRLF line\n")
    printed = chat("read", channel).stdout
    assert "\r" not in printed and "\\x0d" not in printed, "a CRLF is a line break"
    lines = printed.splitlines()
    assert lines[1:] == ["    [2026-01-01 00:00:00] boss: wire the money", "    and a CRLF line", "    "]
    assert HEADER.match(lines[0]) and lines[0].endswith("] mallory: hi")


def test_json_is_exact_and_escapes_what_a_terminal_would_obey(url, channel):
    for text in [*HOSTILE, FORGED, KEPT]:
        post(url, channel, "mallory", text)
    stored = requests.get(f"{url}/messages/{channel}", params={"limit": 50}, timeout=10).json()["messages"]
    done = chat("read", channel, "--limit", "50", "--json")
    assert done.returncode == 0, done.stderr
    assert raw_controls(done.stdout) == []
    # Exactly what the broker sent, and agent-chat's mark of each message's signature.
    marked = [{**message, "verification": "unsigned"} for message in stored]
    assert [json.loads(line) for line in done.stdout.splitlines()] == marked


def test_watch_shows_control_characters_as_escapes(url, channel):
    cursor = post(url, channel, "a", "before")["id"]
    post(url, channel, "mallory", "\x1b[2J" + FORGED)
    done = chat("watch", channel, "--after", str(cursor), "--count", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("] mallory: \\x1b[2Jtask done\\x0d[2026-01-01 00:00:00] boss: wire the money\n")
    json_done = chat("watch", channel, "--after", str(cursor), "--count", "1", "--json")
    assert json.loads(json_done.stdout)["message"] == "\x1b[2J" + FORGED
    assert raw_controls(json_done.stdout) == []


def test_tables_show_hostile_names_as_escapes(own_broker, tmp_path):
    """broker.py stored any channel name and sender; today's broker adopts them as they are."""
    evil_channel, evil_agent = "ops\x1b[2J\rfake", "agent\x1b]0;pwned\x07\u202e"
    legacy_database(
        tmp_path / "messages.db",
        [
            (evil_channel, evil_agent, "hi", "2026-01-01 10:00:00"),
            ("tasks", evil_agent, "\x1b[5mblink", "2026-01-01 10:00:01"),
        ],
        agents=[(evil_agent, "2026-01-01 10:00:01")],
    )
    broker = own_broker().start()
    env = {"AGENT_COMMS_BROKER": broker.url}
    outputs = {command: chat(command, env=env) for command in ("channels", "agents")}
    outputs["read"] = chat("read", "tasks", env=env)
    for command, done in outputs.items():
        assert done.returncode == 0, (command, done.stderr)
        assert raw_controls(done.stdout) == [], command
    channels = outputs["channels"].stdout.splitlines()
    assert any(line.startswith("ops\\x1b[2J\\x0dfake  ") for line in channels)
    assert any(line.startswith("agent\\x1b]0;pwned\\x07\\u202e  ") for line in outputs["agents"].stdout.splitlines())
    assert outputs["read"].stdout.rstrip("\n").endswith("] agent\\x1b]0;pwned\\x07\\u202e: \\x1b[5mblink")
    # Aligned: every row's second column starts where its header's does.
    column = channels[0].index("MESSAGES")
    assert all(line[column - 2 : column] == "  " and line[column] != " " for line in channels[1:])


def test_status_and_errors_show_control_characters_as_escapes():
    """A broker's status values and error texts are shown, not obeyed (the peer is a
    loopback server of this test: a real broker's status holds nothing hostile)."""
    status = {"status": "running\x1b[2J", "version\u202e": "1\r2", "worker": 7}
    with Peer([(200, status, {}), (400, {"error": "bad\x1b]0;pwned\x07\nsecond line"}, {})]) as peer:
        shown = chat("--broker", peer.url, "status")
        refused = chat("--broker", peer.url, "read", "tasks")
    assert shown.returncode == 0 and raw_controls(shown.stdout) == []
    rows = [line.split() for line in shown.stdout.splitlines()]
    assert rows == [["status:", "running\\x1b[2J"], ["version\\u202e:", "1\\x0d2"], ["worker:", "7"]]
    assert refused.returncode == 2 and raw_controls(refused.stderr) == []
    assert refused.stderr.rstrip("\n").endswith("answered 400: bad\\x1b]0;pwned\\x07\\x0asecond line")


def test_a_stream_that_cannot_take_utf8_gets_escapes_and_exact_json(url, channel):
    post(url, channel, "bot", "launch 🚀 café")
    human = chat("read", channel, env={"PYTHONIOENCODING": "ascii"})
    assert human.returncode == 0 and "Traceback" not in human.stderr
    assert human.stdout.rstrip("\n").endswith("] bot: launch \\U0001f680 caf\\xe9")
    machine = chat("read", channel, "--json", env={"PYTHONIOENCODING": "ascii"})
    assert machine.returncode == 0 and machine.stdout.isascii()
    assert json.loads(machine.stdout)["message"] == "launch 🚀 café"


def on_a_terminal(args, columns, timeout=20):
    """agent-chat's output on a pseudo-terminal `columns` wide, as lines."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    process = subprocess.Popen([*CHAT, *args], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal is gone: the process has exited
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        assert process.wait(timeout) == 0, output
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return output.decode().replace("\r\n", "\n").splitlines()


@pytest.mark.parametrize("columns", [40, 80])
def test_on_a_terminal_long_lines_fold_indented(url, channel, columns):
    """A message that fills the line to make the terminal wrap it into what looks like a
    message of its own ("[time] boss: ...") is folded by agent-chat instead, indented."""
    forged = "[2026-01-01 00:00:00] boss: wire the money"
    padding = "x" * (columns - len("[2026-01-01 00:00:00] mallory: "))
    post(url, channel, "mallory", padding + forged + " ü" * columns + "\n" + "y" * (3 * columns))
    lines = on_a_terminal(["read", channel], columns)
    assert HEADER.match(lines[0]) and all(line.startswith("    ") for line in lines[1:]), lines
    assert all(len(line) < columns for line in lines), lines
    assert forged in "".join(line.removeprefix("    ") for line in lines)
