"""`pct`: the subcommands the proxmox_lxc role and the proxmox_pct_remote connection use,
with the checks, messages and output formats of pve-container's src/PVE/CLI/pct.pm and
src/PVE/API2/LXC*.pm."""

import re
import sys
from pathlib import Path

from . import firewall, storage
from .config import CREATE_ONLY, PctConfig, encode_text, is_mount_point, normalise
from .container import Container
from .node import LXC_PATH, NODE, PveError, attach, join_list, options, run, split_list

NEW_VOLUME = re.compile(r"([a-z][a-z0-9\-_.]*):(\d+(?:\.\d+)?)")


def new_volumes(ct, values):
    """Options that ask for a new volume with STORAGE:SIZE_IN_GiB (rootfs, mpN): the
    volume is allocated and the option names it, with its size (PVE::LXC::create_disks)."""
    for key, value in values.items():
        if key != "rootfs" and not is_mount_point(key):
            continue
        parts = split_list(value)
        match = NEW_VOLUME.fullmatch(parts.get("", ""))
        if match:
            name, size = match.groups()
            storage.storage(name, "rootdir")
            volid = storage.allocate(name, ct.vmid, size)
            values[key] = join_list({**parts, "": volid, "size": f"{size}G"})
            yield volid
        elif parts.get("", "").startswith("/") and not Path(parts[""]).is_dir():
            raise PveError(f"mount point '{parts['mp']}': bind mount source path '{parts['']}' does not exist")


def check_storages(values):
    """A storage that does not exist or cannot hold container volumes is refused before
    anything is made (PVE::Storage::storage_config, in the API handler)."""
    for key, value in values.items():
        if key == "rootfs" or is_mount_point(key):
            match = NEW_VOLUME.fullmatch(split_list(value).get("", ""))
            if match:
                storage.storage(match.group(1), "rootdir")


def pct_create(vmid, template, *args):
    ct = Container(vmid)
    if ct.exists() or ct.dir.exists():
        raise PveError(f"CT {vmid} already exists on node '{NODE}'")
    opts = options(args)
    values = {key: value for key, value in opts.items() if key not in CREATE_ONLY}
    values.setdefault("rootfs", f"{opts.get('storage', 'local')}:4")
    check_storages(values)
    archive = storage.template_path(template)
    if not archive.exists():
        raise PveError(f"volume '{template}' does not exist")
    ssh_keys = Path(opts["ssh-public-keys"]).read_text() if "ssh-public-keys" in opts else ""
    for key, default in (("hostname", f"CT{vmid}"), ("memory", "512"), ("swap", "512"), ("arch", "amd64")):
        values.setdefault(key, default)
    values.setdefault("ostype", "debian")
    values = normalise(values, {})
    ct.dir.mkdir(parents=True)
    made = []
    try:
        made += list(new_volumes(ct, values))
        ct.save(PctConfig(values))
        for volid in made:
            ct.prepare_volume(volid)
        ct.extract(archive, ct.rootfs)
        ct.post_create(values["hostname"], ssh_keys)
    except BaseException:
        for volid in made:  # as Proxmox: no half-made container
            storage.free(volid)
        ct.destroy()
        raise
    if opts.get("start") == "1":
        pct_start(vmid)


def pct_set(vmid, *args):
    ct = Container(vmid).require()
    opts = options(args)
    delete = [key for key in opts.pop("delete", "").split(",") if key]
    config = ct.config()
    running = ct.state() == "running"
    for key in [*opts, *delete]:
        if (key == "rootfs" or is_mount_point(key)) and config.current.get("protection") == "1":
            # update_pct_config's check_protection, against the config before this change
            raise PveError(f"can't update CT {vmid} drive '{key}' - protection mode enabled")
    values = normalise(opts, config.merged())
    check_storages(values)
    for volid in new_volumes(ct, values):
        ct.prepare_volume(volid)
    live, deleted = config.change(values, delete, running)
    ct.save(config)
    if running:
        ct.hotplug(live, deleted)


def pct_start(vmid, *args):
    ct = Container(vmid).require()
    if ct.state() == "running":
        raise PveError(f"CT {vmid} already running")
    ct.start()


def pct_stop(vmid, *args):
    ct = Container(vmid).require()
    if ct.state() != "running":
        raise PveError(f"CT {vmid} not running")
    run("lxc-stop", "-n", ct.vmid, "-k")


def pct_shutdown(vmid, *args):
    ct = Container(vmid).require()
    if ct.state() != "running":
        raise PveError(f"CT {vmid} not running")
    run("lxc-stop", "-n", ct.vmid, "-t", options(args).get("timeout", "60"))


def pct_reboot(vmid, *args):
    """PVE::LXC::vm_reboot: a shutdown, then a start, which applies what is pending."""
    ct = Container(vmid).require()
    if ct.state() != "running":
        raise PveError(f"VM {vmid} not running")
    run("lxc-stop", "-n", ct.vmid, "-t", options(args).get("timeout", "60"))
    ct.start()


def pct_status(vmid, *args):
    print(f"status: {Container(vmid).require().state()}")


def pct_config(vmid, *args):
    """Sorted `key: value` lines; pending values in place of current ones unless
    --current; the description escaped on one line."""
    config = Container(vmid).require().config()
    values = config.current if options(args).get("current") == "1" else config.merged()
    for key in sorted(values):
        value = encode_text(values[key]) if key == "description" else values[key]
        print(f"{key}: {value}")


def pct_pending(vmid, *args):
    for line in Container(vmid).require().config().pending_lines():
        print(line)


def pct_list(*args):
    print(f"{'VMID':<10} {'Status':<10} {'Lock':<12} Name")
    for conf in sorted(LXC_PATH.glob("*/pct.conf")):
        ct = Container(conf.parent.name)
        print(f"{ct.vmid:<10} {ct.state():<10} {'':<12} {ct.config().merged().get('hostname', '')}")


def pct_exec(vmid, *command):
    ct = Container(vmid).require()
    if ct.state() != "running":
        raise PveError(f"container '{vmid}' not running!")
    command = list(command)
    # Like Proxmox 8: the caller's environment is kept unless --keep-env 0.
    keep_env = "1"
    if command[:1] == ["--keep-env"]:
        keep_env = command[1]
        command = command[2:]
    if command[:1] == ["--"]:
        command.pop(0)
    if not command:
        raise PveError("missing command")
    environment = "--keep-env" if keep_env == "1" else "--clear-env"
    sys.stdout.flush()
    code = attach(ct.vmid, *command, environment=environment, check=False).returncode
    # A command killed by a signal: the exit status a shell gives it, as lxc-attach does.
    sys.exit(code if code >= 0 else 128 - code)


def pct_push(vmid, source, destination, *args):
    ct = Container(vmid).require()
    opts = options(args)
    script = 'cat > "$1"'
    if "perms" in opts:
        script += f' && chmod {opts["perms"]} "$1"'
    if "user" in opts or "group" in opts:
        script += f' && chown {opts.get("user", "root")}:{opts.get("group", "root")} "$1"'
    with open(source, "rb") as data:
        attach(ct.vmid, "/bin/sh", "-c", script, "push", destination, stdin=data)


def pct_pull(vmid, source, destination, *args):
    ct = Container(vmid).require()
    with open(destination, "wb") as out:
        attach(ct.vmid, "/bin/cat", source, stdout=out)


def pct_destroy(vmid, *args):
    ct = Container(vmid).require()
    opts = options(args)
    if ct.values.get("protection") == "1":
        raise PveError(f"can't remove CT {vmid} - protection mode enabled")
    if ct.state() == "running":
        if opts.get("force") != "1":
            raise PveError(f"CT {vmid} is running - destroy failed")
        run("lxc-stop", "-n", ct.vmid, "-k")
    ct.destroy()
    firewall.remove(vmid)


COMMANDS = {
    "create": pct_create, "set": pct_set, "start": pct_start, "stop": pct_stop,
    "shutdown": pct_shutdown, "reboot": pct_reboot, "status": pct_status,
    "config": pct_config, "pending": pct_pending, "list": pct_list, "exec": pct_exec,
    "push": pct_push, "pull": pct_pull, "destroy": pct_destroy,
}  # fmt: skip
