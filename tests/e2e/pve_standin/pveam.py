"""`pveam`: the appliance manager, as pve-manager's PVE/CLI/pveam.pm and PVE/APLInfo.pm
behave: `update` fetches the index (and on failure says so on stderr, yet exits 0),
`available` lists what the index names, `download` fetches only a name it lists."""

import os
import shutil
import sys

from . import storage
from .node import REPOSITORY, ParameterError, PveError, options


def pveam_update(*args):
    if storage.UPDATE_FAILS.exists():
        sys.stderr.write("update failed - see /var/log/pveam.log for details\n")
        return
    storage.fetch_index()
    print("update successful")


def pveam_available(*args):
    section = options(args).get("section")
    for row_section, template in sorted(storage.index()):
        if section in (None, row_section):
            print(f"{row_section:<15} {template}")


def pveam_download(name, template, *args):
    if template not in [known for _, known in storage.index()]:
        raise ParameterError({"template": "no such template"}, "pveam download <storage> <template>")
    target = storage.template_dir(name) / template
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {template} to {name}")
    partial = target.with_name(f"{template}.tmp.{os.getpid()}")
    shutil.copyfile(REPOSITORY / template, partial)
    partial.rename(target)
    print("TASK OK")


def pveam_list(name, *args):
    directory = storage.template_dir(name)
    print(f"{'NAME':<60} {'SIZE':<6}")
    for path in sorted(directory.glob("*")) if directory.exists() else []:
        print(f"{name + ':vztmpl/' + path.name:<60} {path.stat().st_size / 2**20:<4.2f}MB")


def pveam_remove(volid, *args):
    path = storage.template_path(volid)
    if not path.exists():
        raise PveError(f"volume '{volid}' does not exist")
    path.unlink()


COMMANDS = {
    "update": pveam_update, "available": pveam_available, "download": pveam_download,
    "list": pveam_list, "remove": pveam_remove,
}  # fmt: skip
