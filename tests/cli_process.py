"""agent-chat as the tests run it: the real CLI in a subprocess, under both entry points,
and a long-running command (watch) whose output is read with a time limit, so a late or
stuck process fails its own test instead of hanging the suite."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from broker_process import BIN

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "agent-chat": [str(BIN / "agent-chat")],
    "chat.py": [sys.executable, str(ROOT / "client" / "chat.py")],
}
CHAT = ENTRY_POINTS["agent-chat"]


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Running:
    """A started agent-chat command. Its stdout lines arrive through a queue filled by a
    thread, so every read waits at most its timeout; stderr is collected the same way."""

    def __init__(self, command, env=None):
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            # Ctrl-C as a terminal sends it, even when the tests run in a background job
            # of a shell without job control, whose commands start with SIGINT ignored
            # (Python then never raises KeyboardInterrupt).
            preexec_fn=_default_sigint,
        )
        self._lines = queue.Queue()
        self._stderr = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self._lines.put), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self._stderr.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, keep):
        for line in stream:
            keep(line)
        keep(None)

    def line(self, timeout=15):
        """The next line printed (without its newline); fails if none comes in time."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"agent-chat printed nothing within {timeout} s; stderr: {self.stderr()}") from None
        if line is None:
            self._lines.put(None)
            raise AssertionError(f"agent-chat exited ({self.process.poll()}) first; stderr: {self.stderr()}")
        return line.rstrip("\n")

    def wait(self, timeout=30):
        """The exit status, once it exits (fails after `timeout`)."""
        return self.process.wait(timeout)

    def rest(self, timeout=10):
        """Every line not read yet, once the process has exited."""
        self.wait(timeout)
        lines = []
        deadline = time.monotonic() + timeout
        while True:
            line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                return lines
            lines.append(line.rstrip("\n"))

    def stderr(self):
        return "".join(text for text in self._stderr if text is not None)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for reader in self._readers:
            reader.join(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def until_watching(watcher, post, tries=50, pause=0.3):
    """Returns once `watcher` (a Running watch of a channel) prints what `post(text)`
    posts to that channel: it is then connected and past its starting cursor. Posts a
    numbered probe every `pause` s until one is printed, then reads up to the last one,
    so the next line is whatever is posted next. Returns the lines read."""
    seen = []
    for number in range(tries):
        post(f"<probe {number}>")
        try:
            seen.append(watcher.line(timeout=pause))
        except AssertionError:
            if watcher.process.poll() is not None:
                raise
            continue
        while f"<probe {number}>" not in seen[-1]:
            seen.append(watcher.line())
        return seen
    raise AssertionError(f"the watcher printed none of {tries} probes; stderr: {watcher.stderr()}")
