r"""agent-chat: send, read and watch messages on an agent-comms broker, and work its
channels as task queues.

Usage:
  agent-chat [options] send CHANNEL MESSAGE [--reply-to ID] [--priority N] [--tag T]...
                                            [--meta JSON] [--wait-reply [--timeout SECONDS]]
  agent-chat [options] read CHANNEL [--limit N] [--since TIMESTAMP | --after ID]
                                    [--thread ID] [--unread] [--require-signed]
  agent-chat [options] watch CHANNEL [--interval SECONDS] [--after ID] [--count N]
                                     [--until REGEX] [--timeout SECONDS] [--resume]
                                     [--require-signed]
  agent-chat [options] search QUERY [--channel C] [--limit N]
  agent-chat [options] channels
  agent-chat [options] agents
  agent-chat [options] status
  agent-chat [options] take CHANNEL [--lease D] [--wait SECONDS]
  agent-chat [options] done CHANNEL ID [MESSAGE]
  agent-chat [options] release CHANNEL ID [--dead]
  agent-chat [options] queue CHANNEL
  agent-chat [options] inbox [--unread] [--watch] [--require-signed]
  agent-chat [options] keys (init [--passphrase] [--force] | publish | show [AGENT] | trust AGENT)
  agent-chat [options] work CHANNEL [--lease D] [--count N] [--require-signed] -- COMMAND [ARG...]
  agent-chat [options] mcp [--http HOST:PORT [--tls-cert FILE --tls-key FILE]]
  agent-chat (-h | --help | --version)

Commands:
  send       Post MESSAGE to CHANNEL and print the stored message's id.
             MESSAGE - reads the message from standard input (any UTF-8, many lines).
             CHANNEL @AGENT is that agent's inbox: a direct message, sealed so only
             AGENT can read it if AGENT published an encryption key (keys publish).
             With your keys (keys init) the message is signed.
             With --wait-reply it prints the first reply to it instead, once it comes.
  read       Print the latest messages of CHANNEL, oldest first; or the messages
             that follow a time (--since), a message id (--after) or your read
             position (--unread).
  watch      Print CHANNEL's new messages as they arrive (the broker's live stream; no
             polling), until interrupted, --count, --until or --timeout. A broker
             restart is survived: it reconnects from the last message seen.
  search     Print the messages whose text holds every word of QUERY, newest first,
             of the channels you may read (--channel: of one), each with its channel
             and id. "A phrase" in quotes matches those words in that order; word*
             matches words that start so. Case and accents do not count.
  channels   List the channels with their message counts and last activity.
  agents     List the agents, the most recently seen first, with first and last seen,
             messages sent, and activity.
  status     Show the broker's status and statistics.
  take       Claim CHANNEL's oldest pending task and print it with its id; it is yours
             for --lease. Exit 124 if there was none (within --wait).
  done       Mark task ID, which you hold, done; MESSAGE (- for standard input) is
             posted as its reply.
  release    Give task ID back: pending again, its attempt counted; --dead gives up on
             it for good.
  queue      Show how many of CHANNEL's tasks are pending, claimed, done and dead, and
             who holds which until when.
  inbox      Print your inbox, the channel @<your agent id> (--watch: follow it).
             Messages sealed to you are opened.
  keys       init: make your signing (Ed25519) and encryption (X25519) keys, in
             $AGENT_COMMS_KEY_DIR, else ~/.config/agent-comms/keys (0600; sealed
             under a passphrase with the option of that name, the passphrase from
             $AGENT_COMMS_KEY_PASSPHRASE or asked). publish: give the broker their public halves (with your token
             where tokens are used). show: an agent's keys, current and replaced, and
             which you pinned. trust: pin AGENT's current key after it changed.
             Messages you read are checked against the keys you pinned the first time
             you met their sender: [verified], [BAD SIGNATURE], [KEY CHANGED];
             unsigned ones show no mark (with --json: "verification").
  work       Take CHANNEL's tasks one at a time and run COMMAND for each, with the
             message on its standard input (opened, if sealed to you) and
             AGENT_COMMS_TASK_ID, AGENT_COMMS_TASK_CHANNEL, AGENT_COMMS_TASK_SENDER and
             AGENT_COMMS_TASK_VERIFICATION (verified, unsigned, bad, key-changed) in its
             environment; with --require-signed a task not verified is given up on (dead).
             While it runs the lease is renewed every third of --lease. Exit 0: the
             task is done, COMMAND's output its reply; else it is released. Prints a
             line per task. Without --count it waits for tasks without end; SIGTERM
             stops COMMAND, releases its task and ends work with status 0.
  mcp        Serve the broker as MCP tools (send, read, wait, wait_reply, take,
             done, release, inbox, search, channels, agents, status) to an agent: over
             stdio, for a local agent's MCP config; with --http, over Streamable
             HTTP at http://HOST:PORT/mcp, where each request's own Authorization
             (and X-Agent-ID) header is passed to the broker. Needs the mcp extra:
             pip install 'agent-comms-chat[mcp]' (Python 3.10 or newer).

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
  --limit N             How many messages read and search print [default: 10].
  --channel C           search: only in channel C.
  --since TIMESTAMP     Messages after this time: unix seconds, or ISO 8601 (UTC).
  --after ID            Messages after this message id (e.g. the id `send` printed).
  --interval SECONDS    Accepted for old scripts; watch is live and ignores it.
  --count N             watch: exit 0 after N messages. work: after N tasks.
  --until REGEX         watch: exit 0 after printing a message that matches REGEX.
  --timeout SECONDS     watch, send --wait-reply: exit 124 if it has not ended by
                        then (seconds, or with a unit: 30s, 5m, 1h).
  --reply-to ID         send: the message replies to message ID of CHANNEL.
  --priority N          send: 1 (lowest) to 5 (highest); the broker's default is 3.
  --tag T               send: a tag of the message; again for more (at most 10).
  --meta JSON           send: a JSON object the message carries (types, routing).
  --wait-reply          send: wait for the first reply to the message and print it.
  --thread ID           read: only message ID's thread: its first message and replies.
  --unread              read, inbox: what follows your read position, which then
                        moves to the last message printed. inbox --watch: start there.
  --resume              watch: start at your read position and move it as messages
                        print, so a watcher restarted anywhere goes on where it was.
  --lease D             take, work: how long a task is yours before the broker may
                        hand it to another: seconds, or 30s, 5m, 1h [default: 300].
  --wait SECONDS        take: wait this long for a task to come [default: 0].
  --dead                release: the task is given up on: never handed out again.
  --watch               inbox: follow it live.
  --require-signed      read, watch, inbox: print only verified messages; each one
                        dropped is reported on stderr. work: run only verified tasks.
  --passphrase          keys init: seal the keys under a passphrase.
  --force               keys init: replace the keys you have.
  --http HOST:PORT      mcp: serve Streamable HTTP on this address (0.0.0.0:8081 for
                        every address) instead of stdio.
  --tls-cert FILE       mcp --http: serve HTTPS with this certificate (PEM, its chain)...
  --tls-key FILE        ...and this private key.
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
  3    the broker refused: no token, a bad token, or no permission (401, 403);
       or your keys cannot be read or used
  124  a time-out: watch --timeout ran out, send --wait-reply got no reply in time,
       take found no task
  130  interrupted (Ctrl-C)

Waiting for a reply in a script:
  agent-chat send tasks "Download media file: movie.mkv" --wait-reply --timeout 1h

A worker:
  agent-chat work tasks --lease 5m -- ./handle-task.sh
"""

import math
import os
import sys
import time

from . import __version__
from .config import ConfigError, resolve
from .output import visible
from .plainline import PlainLines

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
    args = PlainLines(__doc__).read(argv)
    return _run(args) if args is not None else _docopt_command_line(argv)


def _docopt_command_line(argv):
    """A command line that is not plain (plainline.py), read by docopt."""
    from docopt import DocoptExit, DocoptLanguageError, docopt

    try:
        args = _quick_parse(argv) or docopt(__doc__, argv=argv, version=__version__)
    except (DocoptExit, DocoptLanguageError):
        from .usage import Usage

        say(Usage(__doc__).explain(argv))
        return EXIT_USAGE
    except SystemExit as done:  # --help or --version, printed
        return done.code or 0
    return _run(args)


def _run(args):
    """`run`, with a usage mistake found in the values said in one line."""
    try:
        return run(args)
    except UsageError as error:
        say(str(error))
        return EXIT_USAGE


def _quick_parse(argv):
    """docopt's reading of argv, in a fraction of its time; or None, and docopt reads argv
    against the whole usage text (and prints --help, or agent-chat says what is wrong).

    Most of docopt's time goes on relating the options in each usage line's [options] to
    those of every other line. Here only the lines of the commands that argv names keep
    their [options], which changes what no command line means: [options] still stands for
    the options that no usage line names, nothing becomes repeatable or stops being so, and
    a line without its [options] matches only a command line without such options, as it
    would with them, to the same result. So what is read here reads the same against the
    whole text. Left to the whole text: --help, --version, and an option that no usage
    line names given again and again (docopt gathers its values once more for every usage
    line it tries)."""
    from docopt import DocoptExit, DocoptLanguageError, docopt

    head, heading, usage = __doc__.partition("\nUsage:\n")
    lines, blank, rest = usage.partition("\n\n")
    shortcut = "agent-chat [options] "
    words = set(argv)
    quick = []
    for line in lines.splitlines():
        start, _, command = line.partition(shortcut)
        if command and command.split(" ", 1)[0] not in words:
            line = f"{start}agent-chat {command}"
        quick.append(line)
    quick = "\n".join(quick)
    try:
        args = docopt(f"{head}{heading}{quick}{blank}{rest}", argv=argv, default_help=False)
    except (DocoptExit, DocoptLanguageError):
        return None
    import re

    named = {word.partition("=")[0] for word in re.split(r"[\s\[\]()|]+|\.\.\.", lines)}
    repeated = [key for key, value in args.items() if key.startswith("-") and isinstance(value, list)]
    if args["--help"] or args["--version"] or any(key not in named for key in repeated):
        return None
    return args


def run(args):
    try:
        settings = resolve(args)
    except ConfigError as error:
        raise UsageError(str(error)) from None
    # Validate every option before any request is made.
    channel = _text(args["CHANNEL"], "CHANNEL") if args["CHANNEL"] is not None else None
    if channel == "":
        raise UsageError("CHANNEL is empty: name a channel")
    limit = _number(args, "--limit")
    after = _number(args, "--after", low=0)
    since = args["--since"]
    count = _number(args, "--count")
    timeout = _duration(args, "--timeout", low=0)
    _number(args, "--interval", float, low=0)
    until = _compile(args["--until"])
    task_id = _number(args, "ID")
    thread = _number(args, "--thread")
    lease = _duration(args, "--lease")
    wait = _duration(args, "--wait", low=0)
    _exclusive(args, "--unread", "--after", "--since")
    _exclusive(args, "--resume", "--after")
    if args["send"] and timeout is not None and not args["--wait-reply"]:
        raise UsageError("--timeout needs --wait-reply (send waits for nothing else)")
    if args["inbox"]:
        channel = _inbox(settings)
    if args["work"]:
        command = _command(args)
    if args["mcp"]:
        return serve_mcp(args, settings)

    from .client import BrokerClient, BrokerError
    from .keys import KeysError
    from .output import Printer
    from .signed import Reading, keys_command

    broker = BrokerClient(settings["broker"], settings["agent_id"], settings["token"], settings["ca"])
    reading = Reading(broker, settings["agent_id"], say, require_signed=args["--require-signed"])
    out = Printer(as_json=args["--json"], reading=reading)
    try:
        if args["keys"]:
            return keys_command(args, settings["agent_id"], broker, out, say)
        if args["send"] or args["done"] or args["work"]:
            from .signed import own_keys

            broker.keys = own_keys(settings["agent_id"])
        if args["send"]:
            return send(broker, out, channel, _message(args["MESSAGE"]), args, timeout)
        elif args["read"] or (args["inbox"] and not args["--watch"]):
            if args["--unread"]:
                read_unread(broker, out, channel, limit, thread)
            else:
                out.messages(broker.read(channel, limit=limit, since=since, after=after, thread=thread)["messages"])
        elif args["watch"] or args["inbox"]:
            resume = args["--resume"] or args["--unread"]
            return watch(broker, out, channel, after, count, until, timeout, resume)
        elif args["search"]:
            search(broker, out, _text(args["QUERY"], "QUERY"), args["--channel"], limit)
        elif args["channels"]:
            out.channels(_complete(broker.channels(), "channels"))
        elif args["agents"]:
            out.agents(_complete(broker.agents(), "agents"))
        elif args["status"]:
            out.status(broker.status())
        elif args["take"]:
            return take(broker, out, channel, lease, wait)
        elif args["done"]:
            reply = _message(args["MESSAGE"]) if args["MESSAGE"] is not None else None
            out.task_state(task_id, broker.done(channel, task_id, reply))
        elif args["release"]:
            out.task_state(task_id, broker.release(channel, task_id, dead=args["--dead"]))
        elif args["queue"]:
            out.queue(broker.queue(channel))
        elif args["work"]:
            from .work import Worker

            return Worker(broker, out, channel, command, lease=lease, count=count, say=say).run()
    except BrokerError as error:
        say(str(error))
        return EXIT_REFUSED if error.status in (401, 403) else EXIT_BROKER
    except KeysError as error:
        say(str(error))
        return EXIT_REFUSED
    return 0


def serve_mcp(args, settings):
    """agent-chat mcp: the MCP server, over stdio or (--http) Streamable HTTP."""
    address = _address(args["--http"]) if args["--http"] else None
    if (args["--tls-cert"] or args["--tls-key"]) and address is None:
        raise UsageError("--tls-cert and --tls-key are for mcp --http (stdio has no TLS)")
    if bool(args["--tls-cert"]) != bool(args["--tls-key"]):
        raise UsageError("HTTPS needs both --tls-cert and --tls-key")
    for option in ("--tls-cert", "--tls-key"):
        if args[option] is not None and not os.path.isfile(args[option]):
            raise UsageError(f"{option}: no such file {args[option]!r}")
    try:
        from . import mcp
    except ImportError as error:
        raise UsageError(
            f"agent-chat mcp needs the MCP SDK ({error}): pip install 'agent-comms-chat[mcp]' (Python 3.10 or newer)"
        ) from None
    if address is None:
        from .keys import KeysError
        from .signed import own_keys

        try:  # an agent's own keys: passphrase-protected ones need $AGENT_COMMS_KEY_PASSPHRASE
            keys = own_keys(settings["agent_id"])
        except KeysError as error:
            say(str(error))
            return EXIT_REFUSED
        bridge = mcp.Bridge(settings["broker"], settings["agent_id"], settings["token"], settings["ca"], keys=keys)
        mcp.serve_stdio(bridge)
        return 0
    if settings["token"]:
        say("mcp --http uses no token of its own: each caller's Authorization header goes to the broker")
    try:
        mcp.serve_http(
            mcp.Bridge(settings["broker"], ca=settings["ca"], pass_through=True),
            *address,
            certfile=args["--tls-cert"],
            keyfile=args["--tls-key"],
        )
    except mcp.StartError as error:
        raise UsageError(str(error)) from None
    return 0


def _address(raw):
    """(host, port) of --http HOST:PORT; [::1]:8081 for IPv6."""
    host, _, port = raw.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--http must be HOST:PORT, such as 127.0.0.1:8081 or 0.0.0.0:8081, not {raw!r}")
    return host, int(port)


def _exclusive(args, option, *others):
    for other in others:
        if args[option] and args[other] is not None:
            raise UsageError(f"{option} and {other} exclude each other: give one of them")


def _duration(args, option, low=1):
    """Seconds, from a number of them or one with a unit: 30s, 5m, 1h, 1d."""
    raw = args[option]
    if raw is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (raw[:-1], units[raw[-1]]) if raw and raw[-1] in units else (raw, 1)
    try:
        value = float(number) * unit
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < low:
        raise UsageError(f"{option} must be {low} s or more: seconds, or with a unit (30s, 5m, 1h), not {raw!r}")
    return int(value) if value.is_integer() else value


def _command(args):
    """work's COMMAND and its arguments, COMMAND found on $PATH (or a path to a program)."""
    import shutil

    command = [_text(word, "COMMAND") for word in [args["COMMAND"], *args["ARG"]]]
    if shutil.which(command[0]) is None:
        raise UsageError(f"cannot run {command[0]!r}: no such program (or it is not executable)")
    return command


def _inbox(settings):
    """The channel of this agent's inbox: @<agent id>."""
    if not settings["agent_id"]:
        raise UsageError("inbox needs your agent id: give --agent-id (or AGENT_COMMS_AGENT_ID), also with a token")
    return "@" + settings["agent_id"]


def _send_options(args):
    """send's --reply-to, --priority, --tag and --meta as the client's keyword arguments."""
    priority = _number(args, "--priority")
    if priority is not None and priority > 5:
        raise UsageError(f"--priority must be a number from 1 to 5, not {args['--priority']!r}")
    meta = None
    if args["--meta"] is not None:
        import json

        try:
            meta = json.loads(args["--meta"])
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise UsageError(f'--meta must be a JSON object such as \'{{"type": "build"}}\', not {args["--meta"]!r}')
    tags = [_text(tag, "--tag") for tag in args["--tag"]]
    return {"reply_to": _number(args, "--reply-to"), "priority": priority, "tags": tags, "meta": meta}


def send(broker, out, channel, message, args, timeout):
    """Post; with --wait-reply, print the first reply to it instead of its id."""
    options = _send_options(args)
    from .signed import sealed_post

    message, options["meta"] = sealed_post(broker, channel, message, options["meta"], say)
    stored = broker.send(channel, message, **options)
    if not args["--wait-reply"]:
        out.sent(stored)
        return 0
    deadline = None if timeout is None else time.monotonic() + timeout
    reply = broker.first_reply(channel, stored, deadline)
    if reply is None:
        say(f"no reply to message {stored['id']} of {channel} within {timeout:g} s")
        return EXIT_TIMEOUT
    out.message(reply)
    return 0


def take(broker, out, channel, lease, wait):
    """Claims a task and prints it; waits for one up to `wait` seconds."""
    taken = broker.take_waiting(channel, lease=lease, wait=wait)
    if taken is None:
        say(f"no task came in {channel} within {wait:g} s")
        return EXIT_TIMEOUT
    out.task(taken)
    return 0


def read_unread(broker, out, channel, limit, thread):
    """What follows this agent's read position, printed; then the position moves to the
    last message printed."""
    messages = broker.read(channel, limit=limit, thread=thread, unread=True)["messages"]
    out.messages(messages)
    if messages:
        broker.put_cursor(channel, messages[-1]["id"])


def search(broker, out, query, channel, limit):
    found = broker.search(query, channel=channel, limit=limit)
    out.found(found["messages"])
    if found["more"]:
        say(f"printed the newest {found['count']} matches; older ones follow (raise --limit)")


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


def watch(broker, out, channel, after, count, until, timeout, resume=False):
    """Print the channel's messages as they come. With `resume`, from this agent's read
    position, which moves past each message printed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if resume:
        after = broker.get_cursor(channel)["read"]
    elif after is None:
        after = broker.latest_cursor(channel)

    def gap(cursor):
        say(f"retention removed messages of {channel} after id {cursor} before they were read")

    seen = 0
    for message in broker.watch(channel, after, deadline=deadline, on_gap=gap):
        printed = out.message(message)
        if resume:
            broker.put_cursor(channel, message["id"])
        if printed is None:  # dropped (--require-signed): it neither counts nor matches
            continue
        message = printed
        seen += 1
        if until is not None and until.search(str(message.get("message"))):
            return 0
        if count is not None and seen >= count:
            return 0
    return EXIT_TIMEOUT
