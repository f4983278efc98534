"""What /usr/sbin/pct, pveam, pvesm and pvesh run: the tool is the name it is called by.
Errors go to stderr with exit code 255, as Proxmox's CLI handlers report an uncaught die."""

import importlib
import os
import shutil
import sys

from .node import LXC_COMMON_CONFIG, PveError

TOOLS = ("pct", "pveam", "pvesm", "pvesh")


def main(argv):
    tool = os.path.basename(argv[0]).removesuffix(".py")
    # Only the tool called is imported: Ansible's pct connection runs `pct exec` several
    # times for each task, and pvesh's API server alone took half of every start.
    commands = importlib.import_module(f".{tool if tool in TOOLS else 'pct'}", __package__).COMMANDS
    if len(argv) < 2 or argv[1] not in commands:
        sys.stderr.write(f"usage: {tool} {{{'|'.join(commands)}}} ... (stand-in for tests)\n")
        return 2
    if not shutil.which("lxc-start") or not LXC_COMMON_CONFIG.exists():
        sys.stderr.write(f"{tool}: LXC is not installed (no lxc-start or {LXC_COMMON_CONFIG})\n")
        return 255
    try:
        commands[argv[1]](*argv[2:])
    except (PveError, TypeError) as error:
        sys.stdout.flush()
        sys.stderr.write(f"{error}\n")
        return 255
    return 0
