"""agent-chat work: a channel worked as a task queue by a command. Tasks are taken one at
a time; the command gets each on its standard input, its lease is renewed while the
command runs, and the outcome goes back to the broker: done with the command's output as
the reply, or released for another try."""

import os
import signal
import subprocess
import threading
import time

from .transport import BrokerError

# A take waits this long for a task before it asks again (a long-poll: no polling).
TAKE_WAIT = 30
# A command told to stop (SIGTERM to its process group) has this long before SIGKILL.
STOP_GRACE = 5.0
# After a take cut short, how long the broker may still take to commit its claim.
ORPHAN_SETTLE = 0.5
# The longest reply work posts: the broker's default AGENT_COMMS_MAX_MESSAGE.
REPLY_MAX = 65536
# How often a running command is checked on (its exit, a stop, the next heartbeat).
TICK = 0.1
# The most of a command's output kept; past it the output is read and dropped.
OUTPUT_MAX = 1 << 20
# Pauses between tries while the broker cannot be reached.
RETRY_FIRST, RETRY_MAX = 0.5, 10.0
EXIT_INTERRUPTED = 130


class Stopped(Exception):
    """SIGTERM or SIGINT arrived while work waited for a task."""


class Worker:
    def __init__(self, broker, out, channel, command, lease, count, say):
        self.broker = broker
        self.out = out
        self.channel = channel
        self.command = command
        self.lease = lease
        self.count = count
        self.say = say
        self.stopping = None  # the signal that stops work, once one came
        # While a take waits, a stop interrupts it at once. A task whose answer was on its
        # way then stays claimed until its lease ends, as if this worker had vanished.
        self.taking = False
        # The next task, taken by the done of the last one (one request for both).
        self.following = None
        self.worked = 0

    def run(self):
        """Works tasks until --count of them are done or released, or a signal stops it;
        the exit status."""
        handlers = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.count is None or self.worked < self.count:
                task, self.following = self.following or self._next_task(), None
                if task is None:
                    break
                if self.stopping is not None:  # stopped with the next task in hand
                    self._report(task["id"], None, self._release(task["id"]), "stopped before it ran")
                    break
                self._work(task)
                self.worked += 1
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return EXIT_INTERRUPTED if self.stopping == signal.SIGINT else 0

    def _stop(self, signum, frame):
        self.stopping = signum
        if self.taking:
            raise Stopped()

    def _next_task(self):
        """The next task taken, waiting as long as it takes; None once stopped. While the
        broker cannot be reached (a restart), it is asked again and again."""
        pause, told = RETRY_FIRST, False
        while self.stopping is None:
            started = time.time()
            try:
                self.taking = True
                try:
                    task = self.broker.take(self.channel, lease=self.lease, wait=TAKE_WAIT)
                finally:
                    self.taking = False
            except Stopped:
                self._release_orphan(started)
                return None
            except BrokerError as error:
                if not _transient(error):
                    raise
                if not told:
                    self.say(f"{error}: trying again")
                    told = True
                self._pause(pause)
                pause = min(pause * 2, RETRY_MAX)
                continue
            if task is None:
                continue
            if self.stopping is not None:  # the stop came with the task
                self._report(task["id"], None, self._release(task["id"]), "stopped before it ran")
                return None
            return task
        return None

    def _release_orphan(self, started):
        """A stop cut a take short: the broker may have claimed a task for it whose answer
        never came. Such a claim is this agent's, made since the take began (its lease ends
        after started + lease): give it back, rather than leave it claimed to the end."""
        time.sleep(ORPHAN_SETTLE)  # a take the broker was still committing lands first
        try:
            agent = self.broker.get_cursor(self.channel)["agent"]
            claimed = self.broker.queue(self.channel, limit=1000)["claimed"]
        except (BrokerError, KeyError, TypeError):
            return
        for task in claimed:
            if task.get("agent") == agent and task.get("expires", 0) >= started + self.lease - 1:
                self._report(task["id"], None, self._release(task["id"]), "stopped before it ran")

    def _pause(self, seconds):
        end = time.monotonic() + seconds
        while self.stopping is None and time.monotonic() < end:
            time.sleep(min(TICK, end - time.monotonic()))

    def _work(self, task):
        """Runs the command on one task and tells the broker how it went. The task is
        checked (and opened, if it was sealed to this agent) first; with --require-signed
        one that is not verified is given up on (dead), never run."""
        task_id = task["id"]
        reading = self.out.reading
        checked = reading(task) if reading is not None else task
        if checked is None:
            answer = self._release(task_id, dead=True)
            self._report(task_id, None, answer, "not run: its signature is not verified (--require-signed)")
            return
        task = checked
        env = {
            **os.environ,
            "AGENT_COMMS_TASK_ID": str(task_id),
            "AGENT_COMMS_TASK_CHANNEL": self.channel,
            "AGENT_COMMS_TASK_SENDER": str(task.get("sender")),
            # verified, unsigned, bad or key-changed: whether the sender really wrote it.
            "AGENT_COMMS_TASK_VERIFICATION": str(task.get("verification", "unsigned")),
        }
        try:
            # Its own process group, so that stopping it stops what it started too.
            process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True
            )
        except OSError as error:
            self._report(task_id, None, self._release(task_id), f"cannot run {self.command[0]}: {error.strerror}")
            return
        output = _Output(process.stdout)
        threading.Thread(target=_feed, args=(process.stdin, str(task.get("message"))), daemon=True).start()
        status, why = self._wait(process, task_id)
        output.finish(STOP_GRACE)
        if why == "lost":
            return
        if status == 0:
            self._finish(task_id, output.text())
        else:
            self._report(task_id, status, self._release(task_id), why or _exit_text(self.command[0], status))

    def _wait(self, process, task_id):
        """(exit status, why it ended early or None), renewing the lease while it runs."""
        beat = time.monotonic() + self.lease / 3
        while True:
            try:
                return process.wait(TICK), None
            except subprocess.TimeoutExpired:
                pass
            if self.stopping is not None:
                name = signal.Signals(self.stopping).name
                return _end(process), f"stopped by {name}"
            if time.monotonic() >= beat:
                try:
                    self.broker.claim(self.channel, task_id, lease=self.lease)
                except BrokerError as error:
                    if error.status == 409:  # the lease ended and another agent has it
                        _end(process)
                        self.say(f"task {task_id}: {self.command[0]} stopped: the task is no longer ours: {error}")
                        return None, "lost"
                    self.say(f"task {task_id}: the lease was not renewed: {error}")
                beat = time.monotonic() + self.lease / 3

    def _finish(self, task_id, reply):
        more = self.stopping is None and (self.count is None or self.worked + 1 < self.count)
        try:
            answer = self.broker.done(self.channel, task_id, reply or None, next_lease=self.lease if more else None)
        except BrokerError as error:
            self.say(f"task {task_id}: not marked done: {error}")
            if error.status != 409:  # still ours: give it back rather than hold it to the lease's end
                self._report(task_id, 0, self._release(task_id), "not marked done")
            return
        self.following = answer.pop("next", None)
        self._report(task_id, 0, answer, None)

    def _release(self, task_id, dead=False):
        """The broker's answer to the release, or None if it could not be released (the
        lease ends it then)."""
        try:
            return self.broker.release(self.channel, task_id, dead=dead)
        except BrokerError as error:
            self.say(f"task {task_id}: not released: {error}")
            return None

    def _report(self, task_id, status, answer, why):
        if answer is not None:
            self.out.task_state(task_id, {"id": task_id, "exit": status, **answer}, why)


def _transient(error):
    """Whether a failure may pass by itself: no answer, or the broker busy or restarting."""
    return error.status is None or error.status == 429 or error.status >= 500


def _end(process):
    """Stops the command and what it started: SIGTERM, then SIGKILL after STOP_GRACE."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return process.wait(grace)
        except subprocess.TimeoutExpired:
            continue


def _exit_text(program, status):
    if status < 0:
        return f"{program} was killed by {signal.Signals(-status).name}"
    return f"{program} exited with status {status}"


def _feed(stdin, message):
    """Writes the message to the command's standard input, which it need not read."""
    try:
        stdin.write(message.encode("utf-8", "replace"))
        stdin.close()
    except OSError:
        pass


class _Output:
    """A command's standard output, read as it comes (so it never blocks on a full pipe)."""

    def __init__(self, stream):
        self.data = bytearray()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for chunk in iter(lambda: stream.read1(65536), b""):
            if len(self.data) < OUTPUT_MAX:
                self.data += chunk[: OUTPUT_MAX - len(self.data)]
        stream.close()

    def finish(self, timeout):
        """Waits for the end of the output (something the command started may hold it)."""
        self.thread.join(timeout)

    def text(self):
        """The output without its final newlines, as the shell's $(...) gives it; past
        REPLY_MAX bytes (what a broker takes in one message by default), its start and a
        line saying how much was cut."""
        data = bytes(self.data).rstrip(b"\n")
        if len(data) <= REPLY_MAX:
            return data.decode("utf-8", "replace")
        kept = data[: REPLY_MAX - 200].decode("utf-8", "ignore")
        return f"{kept}\n[agent-chat work: {len(data) - len(kept.encode())} more bytes of output cut]"
