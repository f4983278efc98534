"""`pvesm status`, as pve-storage's PVE/CLI/pvesm.pm prints it: sizes in KiB, one row per
storage sorted by name, `--content` keeping those that hold that content."""

from . import storage
from .node import options


def pvesm_status(*args):
    content = options(args).get("content")
    storages = {name: config for name, config in storage.storages().items() if content in (None, *config["content"])}
    width = max((len(name) for name in storages), default=4) + 1
    print(f"{'Name':<{width}} {'Type':>10} {'Status':>10} {'Total':>15} {'Used':>15} {'Available':>15} {'%':>8}")
    total, used, available = storage.usage()
    for name in sorted(storages):
        percent = f"{used / total * 100: 7.2f}%"
        print(
            f"{name:<{width}} {storages[name]['type']:>10} {'active':>10} "
            f"{total // 1024:>15} {used // 1024:>15} {available // 1024:>15} {percent}"
        )


COMMANDS = {"status": pvesm_status}
