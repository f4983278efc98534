"""Commands on this host for the end-to-end tests: run one to its end, wait for a state,
install what a test needs (checked by the files it uses, not by package names)."""

import os
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


def require_files(files, what):
    """Makes sure every file of `files` ({path: Debian package that brings it}) is on this
    host, installing the packages of the missing ones (without recommends, which bring
    nothing a test uses). The files are checked, not the packages: a package can be
    installed and still not bring what a test runs."""
    missing = {path: package for path, package in files.items() if not Path(path).exists()}
    if not missing:
        return
    packages = sorted(set(missing.values()))
    updated = run("apt-get", "update", "-qq", timeout=300, check=False)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    installed = run(
        "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages, env=env, timeout=600, check=False
    )  # fmt: skip
    still_missing = [path for path in missing if not Path(path).exists()]
    if still_missing:
        pytest.fail(
            f"{what} needs {', '.join(still_missing)} on this host; `apt-get install {' '.join(packages)}` "
            f"(exit {installed.returncode}; apt-get update exit {updated.returncode}) did not bring it:\n"
            f"{last_lines(updated.stdout + updated.stderr, 10)}\n{last_lines(installed.stdout + installed.stderr)}",
            pytrace=False,
        )
