"""Debian packages the tests install for themselves (Prometheus, Chromium, and for the
end-to-end tests LXC, Docker, debootstrap): checked by the files a test uses, not by
package names, and installed by one test process at a time (pytest-xdist runs two)."""

import fcntl
import os
import subprocess
from pathlib import Path

import pytest

# apt-get and dpkg take locks of their own, and fail rather than wait for them.
LOCK = Path("/tmp/agent-comms-tests-apt.lock")


def _run(*command, timeout, env=None):
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _last_lines(text, count=25):
    return "\n".join(text.splitlines()[-count:])


def require_files(files, what):
    """Makes sure every file of `files` ({path: Debian package that brings it}) is on this
    host, installing the packages of the missing ones (without recommends, which bring
    nothing a test uses). The files are checked, not the packages: a package can be
    installed and still not bring what a test runs."""
    if all(Path(path).exists() for path in files):
        return
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = {path: package for path, package in files.items() if not Path(path).exists()}
        if not missing:
            return  # another test process installed them meanwhile
        packages = sorted(set(missing.values()))
        updated = _run("apt-get", "update", "-qq", timeout=300)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        installed = _run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages, env=env, timeout=600)
    still_missing = [path for path in missing if not Path(path).exists()]
    if still_missing:
        pytest.fail(
            f"{what} needs {', '.join(still_missing)} on this host; `apt-get install {' '.join(packages)}` "
            f"(exit {installed.returncode}; apt-get update exit {updated.returncode}) did not bring it:\n"
            f"{_last_lines(updated.stdout + updated.stderr, 10)}\n{_last_lines(installed.stdout + installed.stderr)}",
            pytrace=False,
        )
