"""Debian root file systems (12 unless said) for the end-to-end tests' hosts (the LXC container's
template, the Docker base image), built on this host with debootstrap from its own Debian
mirror: no image registry or template server is reachable here, and the hosts themselves
reach no mirror later, so everything they need comes in now.

debootstrap can exit 0 having installed less than asked, so what was asked for is
checked file by file afterwards. Its downloads are kept in CACHE for the next run."""

import os
from pathlib import Path, PurePosixPath

import pytest
from host_commands import last_lines, run

CACHE = Path("/var/cache/agent-comms-e2e")
DEBOOTSTRAP_CACHE = CACHE / "debootstrap"
SUITE = "bookworm"


def inside(rootfs, path):
    """Where `path` of a root file system is on this host, its symlinks followed as the
    system in it sees them (an absolute link points into rootfs, not at this host's own
    files); None for a link loop."""
    todo = [part for part in PurePosixPath(path).parts if part != "/"]
    done = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            done = done[:-1]
            continue
        host = Path(rootfs, *done, part)
        if host.is_symlink():
            links += 1
            if links > 40:
                return None
            target = PurePosixPath(os.readlink(host))
            if target.is_absolute():
                done = []
            todo = [part for part in target.parts if part != "/"] + todo
        else:
            done.append(part)
    return Path(rootfs, *done)


def missing_files(rootfs, paths):
    return [path for path in paths if (found := inside(rootfs, path)) is None or not found.exists()]


def unmount_below(directory):
    """debootstrap mounts /proc and /sys in its target and may leave them if it fails."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{directory}/")), reverse=True):
        run("umount", "--lazy", mount, check=False)


def debootstrap_command(target, files, variant=None, suite=SUITE, cache_name=None):
    """The debootstrap command that installs Debian `suite` with the packages that bring
    `files` ({path: package}). `cache_name`: a download cache of its own (the Docker
    images' packages apart from the LXC templates')."""
    packages = ",".join(sorted(set(files.values())))
    variant_option = [f"--variant={variant}"] if variant else []
    cache = DEBOOTSTRAP_CACHE if suite == SUITE else DEBOOTSTRAP_CACHE.with_name(f"debootstrap-{suite}")
    if cache_name:
        cache = cache.with_name(f"{cache.name}-{cache_name}")
    return ["debootstrap", *variant_option, f"--include={packages}", f"--cache-dir={cache}", suite, target]


def debootstrap(target, files, variant=None, timeout=900, suite=SUITE, cache_name=None):
    """Debian `suite` (12 unless said) into the directory `target`, with every file of
    `files` ({path as the system sees it: the package that brings it}); fails saying
    which are missing."""
    command = debootstrap_command(target, files, variant, suite, cache_name)
    Path(command[-3].removeprefix("--cache-dir=")).mkdir(parents=True, exist_ok=True)
    try:
        result = run(*command, timeout=timeout, check=False)
    finally:
        unmount_below(target)
    output = result.stdout + result.stderr
    log = Path(target, "debootstrap", "debootstrap.log")  # left there when it fails
    if log.exists():
        output += f"\n{log}:\n{last_lines(log.read_text(errors='replace'))}"
    missing = missing_files(target, files)
    if result.returncode != 0 or missing:
        what = f"exited {result.returncode}" if result.returncode else f"did not produce {', '.join(missing)}"
        pytest.fail(f"{' '.join(map(str, command))} {what}:\n{last_lines(output)}", pytrace=False)
