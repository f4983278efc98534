"""The stand-in node's paths and the pieces every tool shares: errors as Proxmox prints
them, running a command, command-line options and Proxmox property strings."""

import os
import signal
import subprocess
import time
from pathlib import Path

LXC_PATH = Path("/var/lib/lxc")
# What the tools keep between calls: storages, volumes, templates, the appliance index,
# firewall files. The test removes it at the end.
STATE = Path(os.environ.get("PCT_STANDIN_STATE", "/var/lib/pct-standin"))
# The stand-in's appliance server (download.proxmox.com): template archives the test built.
REPOSITORY = Path(os.environ.get("PCT_STANDIN_REPOSITORY", "/var/cache/agent-comms-e2e/templates"))
NODE = os.uname().nodename.split(".")[0]
LXC_COMMON_CONFIG = Path("/usr/share/lxc/config/common.conf")
# The ids root in an unprivileged container has on the node (Proxmox's default map,
# root:100000:65536 in /etc/subuid and /etc/subgid).
UNPRIVILEGED_BASE = 100000
UNPRIVILEGED_RANGE = 65536


class PveError(Exception):
    """A failure as Proxmox reports it: the message on stderr, exit code 255."""


class ParameterError(PveError):
    """`400 Parameter verification failed.` with one line per parameter, as pve-common's
    PVE::Exception prints a raise_param_exc."""

    def __init__(self, errors, usage=""):
        self.errors = errors
        lines = ["400 Parameter verification failed."]
        lines += [f"{key}: {message}" for key, message in sorted(errors.items())]
        super().__init__("\n".join(lines + ([usage] if usage else [])))


def run(*argv, check=True, **kwargs):
    result = subprocess.run([str(part) for part in argv], **kwargs)
    if check and result.returncode != 0:
        output = "".join(text[-2000:] for text in (result.stdout, result.stderr) if isinstance(text, str))
        raise PveError(f"command '{' '.join(map(str, argv))}' failed: exit code {result.returncode}\n{output}")
    return result


def attach(vmid, *command, environment="--keep-env", check=True, **kwargs):
    """A command in a running container with lxc-attach, as pve-container's `pct exec`,
    push and pull run it. Debian's lxc-attach re-executes itself from a memory file before
    its main() (LXC's guard against CVE-2019-5736); under load here that step has been seen
    to die with SIGSEGV ("Device or resource busy - Failed to rexec as memfd"), before
    anything ran in the container. Only such an attempt is made again, at most twice."""
    argv = ["lxc-attach", "-n", str(vmid), environment, "--", *command]
    for attempt in range(3):
        if attempt and hasattr(kwargs.get("stdin"), "seek"):
            kwargs["stdin"].seek(0)
        result = subprocess.run(argv, **kwargs)
        if result.returncode != -signal.SIGSEGV:
            break
        time.sleep(0.2 * (attempt + 1))
    if check and result.returncode != 0:
        raise PveError(f"command '{' '.join(argv)}' failed: exit code {result.returncode}")
    return result


def options(args):
    """`--key value` pairs (Proxmox also takes `-key value`) into a dict; a flag without a
    value is '1'. Values may start with '-' only when given as --key=value."""
    parsed = {}
    args = list(args)
    while args:
        key = args.pop(0)
        if not key.startswith("-"):
            raise PveError(f"unexpected argument '{key}'")
        key, equals, value = key.lstrip("-").partition("=")
        if not equals:
            value = args.pop(0) if args and not args[0].startswith("-") else "1"
        parsed[key] = value
    return parsed


def split_list(value):
    """A property string as a dict: 'name=eth0,bridge=vmbr0' -> {'name': 'eth0', ...}; a
    part without '=' is the option's default key (a mount point's volume), kept as ''."""
    parsed = {}
    for item in (value or "").split(","):
        if item:
            key, equals, rest = item.partition("=")
            parsed.update({key: rest} if equals else {"": item})
    return parsed


def join_list(values, first=("", "name", "mp")):
    """The property string pct prints: the default key, the required keys, then the rest
    sorted (PVE::JSONSchema::print_property_string)."""
    keys = [key for key in first if key in values] + sorted(key for key in values if key not in first)
    return ",".join(values[key] if key == "" else f"{key}={values[key]}" for key in keys)
