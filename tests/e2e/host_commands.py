"""Commands on this host for the end-to-end tests: run one to its end, wait for a state,
and the rest of what the e2e tests share (packages: tests/debian_packages.py)."""

import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*command, timeout=120, env=None, check=True, cwd=ROOT, input=None):
    """Runs a command to its end within timeout, with input on its stdin if given; a
    failure shows the end of its output."""
    command = [str(part) for part in command]
    result = subprocess.run(command, cwd=cwd, env=env, input=input, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        output = f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{output}")
    return result


def last_lines(text, count=25):
    return "\n".join(text.splitlines()[-count:])


def wait_for(condition, timeout):
    """True as soon as condition() is; False if timeout seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def wait_until(condition, timeout, failure):
    """Returns as soon as condition() is true. If timeout seconds pass first, the test
    fails with failure(): what did not happen, and the output that shows why."""
    if not wait_for(condition, timeout):
        pytest.fail(failure(), pytrace=False)


def stop_process(process, grace):
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
