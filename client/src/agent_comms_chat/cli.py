r"""agent-chat: send, read and watch messages on an agent-comms broker.

Usage:
  agent-chat [options] send CHANNEL MESSAGE
  agent-chat [options] read CHANNEL [--limit N] [--since TIMESTAMP | --after ID]
  agent-chat [options] watch CHANNEL [--interval SECONDS] [--after ID] [--count N]
                                     [--until REGEX] [--timeout SECONDS]
  agent-chat [options] channels
  agent-chat [options] agents
  agent-chat [options] status
  agent-chat (-h | --help | --version)

Commands:
  send       Post MESSAGE to CHANNEL and print the stored message's id.
             MESSAGE - reads the message from standard input (any UTF-8, many lines).
  read       Print the latest messages of CHANNEL, oldest first; or the messages
             that follow a time (--since) or a message id (--after).
  watch      Print CHANNEL's new messages as they arrive (the broker's live stream; no
             polling), until interrupted, --count, --until or --timeout. A broker
             restart is survived: it reconnects from the last message seen.
  channels   List the channels with their message counts and last activity.
  agents     List the agents, the most recently seen first, with first and last seen,
             messages sent, and activity.
  status     Show the broker's status and statistics.

Options:
  --broker URL          Broker to use, http://HOST:PORT or https://HOST:PORT. Else
                        $AGENT_COMMS_BROKER, else `broker` in the config file, else
                        http://192.168.122.86:8080.
  --agent-id ID         Who you are: the sender of what you send. Else
                        $AGENT_COMMS_AGENT_ID, else `agent_id` in the config file,
                        else agent-<short host name>.
  --token TOKEN         Bearer token for a broker that requires one. Else
                        $AGENT_COMMS_TOKEN, else `token` in the config file. With a
                        token and no agent id, the broker names you: the token's agent.
  --ca FILE             CA certificate(s) to verify an https:// broker with. Else
                        $AGENT_COMMS_CA, else `ca` in the config file, else the system's
                        trusted CAs. Verification is never turned off.
  --config FILE         Read the settings above from FILE only (INI, a section
                        [agent-comms] with broker, agent_id, token, ca). Else
                        $AGENT_COMMS_CONFIG, else ~/.config/agent-comms/config.ini
                        (under $XDG_CONFIG_HOME if set), then /etc/agent-comms/chat.ini.
                        AGENT_COMMS_CONFIG=/dev/null reads no file at all.
  --json                Print JSON (one message per line for read and watch).
  --limit N             How many messages read prints [default: 10].
  --since TIMESTAMP     Messages after this time: unix seconds, or ISO 8601 (UTC).
  --after ID            Messages after this message id (e.g. the id `send` printed).
  --interval SECONDS    Accepted for old scripts; watch is live and ignores it.
  --count N             watch: exit 0 after N messages.
  --until REGEX         watch: exit 0 after printing a message that matches REGEX.
  --timeout SECONDS     watch: exit 124 if it has not ended by then.
  -h --help             Show this text.
  --version             Show the version.

Output:
  A message prints as "[time] sender: text", each further line of it indented by 4
  spaces (on a terminal, long lines are folded the same way). What the broker sends is
  shown, never obeyed: control characters (ESC, CR, BEL, DEL, C1), Unicode format
  characters (bidi overrides, zero-width spaces) and line separators in a message, a
  sender, a channel or an agent id print as escapes such as \x1b, \x0d or \u202e. A
  tab, and the zero-width joiners emoji and some scripts need, stay in message text; a
  backslash prints as itself. With --json they are JSON escapes, which decode exactly.

Exit status:
  0    success (watch: --count reached or --until matched); also when the reader of
       the output stops early (agent-chat read tasks | head -1)
  1    usage error: the command line, the broker URL, the agent id or a config file
  2    the broker is unreachable or answered with an error (one line on stderr)
  3    the broker refused: no token, a bad token, or no permission (401, 403)
  124  watch --timeout ran out
  130  interrupted (Ctrl-C)

Waiting for a reply in a script:
  id=$(agent-chat send tasks "Download media file: movie.mkv")
  agent-chat watch tasks --after "$id" --until '✅ Download completed' --timeout 3600
"""

import os
import sys
import time

from docopt import DocoptExit, DocoptLanguageError, docopt

from . import __version__
from .config import ConfigError, resolve
from .output import visible

EXIT_USAGE, EXIT_BROKER, EXIT_REFUSED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 124, 130


class UsageError(Exception):
    pass


def _number(args, option, kind=int, low=1):
    raw = args[option]
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value < low or value != value:
        raise UsageError(f"{option} must be a number of {low} or more, not {raw!r}")
    return value


def _text(value, what):
    """A command-line text, which the shell may have handed over as bytes that are not UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8 text") from None
    return value


def say(text):
    """One line on stderr, with what came from outside made visible rather than obeyed."""
    try:
        print(f"agent-chat: {visible(text)}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        pass  # nobody reads stderr; the exit status still tells


def main(argv=None):
    """agent-chat's command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    # A terminal or pipe that cannot take some character gets an escape for it, not a traceback.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        status = _command_line(argv)
        sys.stdout.flush()  # so that a closed pipe shows here, not at exit
        return status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader has gone (`agent-chat read tasks | head -1`) and had what it wanted.
        # Python would complain again when it flushes stdout at exit: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _command_line(argv):
    try:
        args = docopt(__doc__, argv=argv, version=__version__)
    except (DocoptExit, DocoptLanguageError):
        from .usage import Usage

        say(Usage(__doc__).explain(argv))
        return EXIT_USAGE
    except SystemExit as done:  # --help or --version, printed
        return done.code or 0
    try:
        return run(args)
    except UsageError as error:
        say(str(error))
        return EXIT_USAGE


def run(args):
    try:
        settings = resolve(args)
    except ConfigError as error:
        raise UsageError(str(error)) from None
    # Validate every option before any request is made.
    channel = _text(args["CHANNEL"], "CHANNEL") if args["CHANNEL"] is not None else None
    limit = _number(args, "--limit")
    after = _number(args, "--after", low=0)
    since = args["--since"]
    count = _number(args, "--count")
    timeout = _number(args, "--timeout", float, low=0)
    _number(args, "--interval", float, low=0)
    until = _compile(args["--until"])

    from .client import BrokerClient, BrokerError
    from .output import Printer

    broker = BrokerClient(settings["broker"], settings["agent_id"], settings["token"], settings["ca"])
    out = Printer(as_json=args["--json"])
    try:
        if args["send"]:
            out.sent(broker.send(channel, _message(args["MESSAGE"])))
        elif args["read"]:
            out.messages(broker.read(channel, limit=limit, since=since, after=after)["messages"])
        elif args["watch"]:
            return watch(broker, out, channel, after, count, until, timeout)
        elif args["channels"]:
            out.channels(_complete(broker.channels(), "channels"))
        elif args["agents"]:
            out.agents(_complete(broker.agents(), "agents"))
        elif args["status"]:
            out.status(broker.status())
    except BrokerError as error:
        say(str(error))
        return EXIT_REFUSED if error.status in (401, 403) else EXIT_BROKER
    return 0


def _complete(listing, key):
    if listing["more"]:
        say(f"listed the first {listing['count']} {key}; there are more (after {listing['cursor']!r})")
    return listing


def _message(argument):
    """MESSAGE, or with "-" standard input without its final newline (as the shell's $(...)
    drops it: `echo hi |` sends "hi")."""
    if argument == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("the message on standard input is not UTF-8 text") from None
        text = text[:-1] if text.endswith("\n") else text
    else:
        text = _text(argument, "MESSAGE")
    if not text:
        raise UsageError("the message is empty")
    return text


def _compile(pattern):
    if pattern is None:
        return None
    import re

    try:
        return re.compile(pattern)
    except re.error as error:
        raise UsageError(f"--until is not a valid regular expression: {error}") from None


def watch(broker, out, channel, after, count, until, timeout):
    deadline = None if timeout is None else time.monotonic() + timeout
    if after is None:
        after = broker.latest_cursor(channel)

    def gap(cursor):
        say(f"retention removed messages of {channel} after id {cursor} before they were read")

    seen = 0
    for message in broker.watch(channel, after, deadline=deadline, on_gap=gap):
        out.message(message)
        seen += 1
        if until is not None and until.search(str(message.get("message"))):
            return 0
        if count is not None and seen >= count:
            return 0
    return EXIT_TIMEOUT
