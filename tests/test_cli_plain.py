"""agent-chat reads its plain command lines (send CHANNEL MESSAGE, read CHANNEL...) from
its usage text without docopt (plainline.py), for the speed of a short command: each such
reading must be exactly docopt's against the whole usage text, and every other command
line must be left to docopt."""

import json
import random
import subprocess
import sys

import pytest
from docopt import docopt

from agent_comms_chat import cli
from agent_comms_chat.plainline import PlainLines

PLAIN = PlainLines(cli.__doc__)


def typed(reading):
    """A reading with each value's type beside it: True == 1 and False == 0 in Python, and
    docopt gives a count where an option repeats."""
    return reading if not isinstance(reading, dict) else {key: (type(value), value) for key, value in reading.items()}


def docopt_reading(argv):
    """What docopt makes of `argv` against the whole usage, or the reason it refused it."""
    try:
        return docopt(cli.__doc__, argv=argv, default_help=False)
    except SystemExit as refused:  # DocoptExit: not a command line of the usage
        return f"refused: {refused}"


def test_what_is_not_given_reads_as_docopt_reads_it():
    """Every command, argument and option, at docopt's value for one not on the command
    line: False, None, [] for what repeats, an option's [default: ...]."""
    assert typed(PLAIN.empty) == typed({**docopt(cli.__doc__, argv=["status"]), "status": False})
    assert PLAIN.empty["--limit"] == "10" and PLAIN.empty["--tag"] == [] and PLAIN.empty["ARG"] == []


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "tasks", "hello"],
        ["send", "tasks", "-"],  # the message from standard input
        ["send", "tasks", ""],
        ["--config", "f", "send", "read", "read"],  # a message that is another command's name
        ["send", "tasks", "x", "--reply-to", "4", "--priority", "5", "--tag", "a", "--tag=b", "--meta", "{}"],
        ["--json", "--broker=http://127.0.0.1:1", "send", "--agent-id", "a b", "tasks", "x y"],
        ["read", "tasks"],
        ["read", "tasks", "--limit", "3", "--thread", "1", "--unread", "--require-signed", "--token", "t"],
        ["read", "--limit=0", "tasks", "--json"],
        ["watch", "tasks", "--after", "1", "--count", "2", "--until", "x", "--interval", "5", "--resume"],
        ["search", "two words", "--channel", "c", "--limit", "5"],
        ["channels", "--json"],
        ["agents"],
        ["--token=t", "status"],
        ["take", "tasks", "--lease", "10m", "--wait", "30"],
        ["release", "tasks", "41", "--dead"],
        ["queue", "tasks"],
        ["inbox", "--unread", "--watch", "--require-signed"],
        ["mcp"],
    ],
)
def test_a_plain_command_line_reads_as_docopt_reads_it(argv):
    reading = PLAIN.read(argv)
    assert reading is not None, "a plain command line, read without docopt"
    assert typed(reading) == typed(docopt_reading(argv))


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["send", "-h"],
        ["--version"],
        ["send", "tasks", "x", "--wait-reply"],  # nested: [--wait-reply [--timeout SECONDS]]
        ["read", "tasks", "--since", "0"],  # alternatives: [--since TIMESTAMP | --after ID]
        ["read", "tasks", "--lim", "3"],  # shortened: docopt completes it
        ["send", "tasks", "-5"],  # a short option, or a number: docopt's to say
        ["send", "tasks", "x", "--meta", "-"],  # a value that starts with -
        ["send", "tasks", "x", "--priority"],  # a value missing
        ["--json=yes", "status"],
        ["read", "tasks", "--limit", "1", "--limit", "2"],  # not repeatable
        ["--json", "--json", "status"],
        ["status", "extra"],
        ["send", "tasks"],
        ["done", "tasks", "41", "ok"],  # an optional argument: [MESSAGE]
        ["keys", "init"],
        ["work", "tasks", "--", "sh"],
        ["read", "tasks", "--dead"],  # another command's option
        ["--", "status"],
        [],
    ],
)
def test_any_other_command_line_is_left_to_docopt(argv):
    assert PLAIN.read(argv) is None


def test_an_edited_usage_still_reads_as_docopt_reads_it():
    """What today's usage text does not have, read as docopt reads it all the same: an
    option repeatable in one line and not in another (a list in both), one named twice
    in a line (a count: left to docopt), a default in capitals; and no reading shares a
    list with another."""
    doc = (
        cli.__doc__.replace("read CHANNEL [--limit N]", "read CHANNEL [--tag T] [--limit N]")
        .replace("release CHANNEL ID [--dead]", "release CHANNEL ID [--dead] [--dead]")
        .replace("[default: 10]", "[Default: 10]")
    )
    plain = PlainLines(doc)
    for argv in (["read", "tasks", "--tag", "a"], ["read", "tasks"], ["send", "tasks", "x", "--tag", "a"]):
        reading = plain.read(argv)
        assert reading is not None and typed(reading) == typed(docopt(doc, argv=argv)), argv
    assert plain.read(["release", "tasks", "1", "--dead"]) is None
    assert plain.read(["read", "tasks", "--tag", "a", "--tag", "b"]) is None  # docopt refuses it
    plain.read(["read", "tasks"])["--tag"].append("changed")
    assert plain.read(["read", "tasks"])["--tag"] == []


VOCABULARY = [
    *PLAIN.usage.patterns,  # the commands
    "tasks", "41", "-", "", "hello world", "--", "-h", "-5", "--help", "--version",
    *PLAIN.usage.takes_value,  # every option
    "--limit=3", "--tag=a", "--json=1", "--lim", "--dead=1", "--agent-id=", "x=y",
]  # fmt: skip


def test_random_command_lines_read_as_docopt_reads_them_or_go_to_docopt():
    """Command lines of random words of the usage (seeded): each one read here is exactly
    what docopt reads; and enough of them are plain for the comparison to mean something."""
    chooser = random.Random(20261208)
    read_here = 0
    for _ in range(400):
        command = chooser.choice(list(PLAIN.plain))
        arguments, alone = PLAIN.plain[command]
        argv = [command, *(chooser.choice(["tasks", "41", "-", "x y"]) for _ in arguments)]
        for _ in range(chooser.randrange(4)):  # options of its own, and the common ones
            mostly_fitting = [*alone, *PLAIN.usage.common] if chooser.random() < 0.8 else PLAIN.usage.takes_value
            option = chooser.choice(list(mostly_fitting))
            argv.insert(chooser.randrange(len(argv) + 1), option)
            if PLAIN.usage.takes_value.get(option):
                argv.insert(argv.index(option) + 1, chooser.choice(["3", "a", "x y", "-1"]))
        if chooser.random() < 0.3:  # a word of anything
            argv.insert(chooser.randrange(len(argv) + 1), chooser.choice(VOCABULARY))
        reading = PLAIN.read(argv)
        if reading is not None:
            read_here += 1
            assert typed(reading) == typed(docopt_reading(argv)), argv
    assert read_here >= 100, read_here


def test_send_and_read_run_without_docopt(url, channel):
    """The plain send and read of a real agent-chat against the broker: docopt is never
    imported (its import and reading were a third of a send's time)."""
    script = (
        "import sys; from agent_comms_chat.cli import main; status = main(sys.argv[1:]); "
        "print('docopt' in sys.modules, file=sys.stderr); sys.exit(status)"
    )
    for argv in (["send", channel, "plain"], ["--json", "read", channel, "--limit", "1"]):
        done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stderr.decode().split() == ["False"]
    assert json.loads(done.stdout)["message"] == "plain"
    # A command line that is not plain still goes to docopt, and works.
    done = subprocess.run(
        [sys.executable, "-c", script, "read", channel, "--after", "0"], capture_output=True, timeout=30
    )
    assert done.returncode == 0 and b"plain" in done.stdout and done.stderr.decode().split() == ["True"]
