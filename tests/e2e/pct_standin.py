#!/usr/bin/python3
"""Stand-ins for Proxmox's `pct` and `pveam`, for the end-to-end tests only (never deployed):
the subcommands the proxmox_lxc role and the proxmox_pct_remote connection use, mapped onto
plain LXC (lxc-create, lxc-start, lxc-stop, lxc-info, lxc-attach, lxc-destroy). The test
installs this file as /usr/sbin/pct and /usr/sbin/pveam (the name it is called by picks the
tool) and removes both afterwards.

As on Proxmox, a container is named by its VMID, and its Proxmox configuration (what
`pct config` prints, what `pct set` changes) is applied the way Proxmox applies it: the
network, hostname and autostart to the LXC config and to /etc/network/interfaces,
/etc/hostname and /etc/hosts inside the container; cores (a cpuset) and memory to cgroup
limits. `unprivileged` and `features` are recorded and printed but the container runs
privileged: an unprivileged container needs an id-shifted root filesystem, which
lxc-create's debian template does not make.

Templates are names only: `pveam download` records one, and `pct create` from a Debian 12
template builds Debian 12 with lxc-create's debian template (debootstrap on this host,
cached in /var/cache/lxc), with the packages in $PCT_STANDIN_PACKAGES, since the container
cannot reach a package registry later.
"""

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LXC_PATH = Path("/var/lib/lxc")
STATE = Path(os.environ.get("PCT_STANDIN_STATE", "/var/lib/pct-standin"))
PACKAGES = os.environ.get("PCT_STANDIN_PACKAGES", "python3,python3-venv,iproute2")
NODE = os.uname().nodename.split(".")[0]
AVAILABLE = ["debian-12-standard_12.12-1_amd64.tar.zst"]
# Keys of the LXC config that follow the Proxmox config; rewritten on every change.
NESTING = "lxc.include = /usr/share/lxc/config/nesting.conf"
MANAGED_LXC_KEYS = ("lxc.net.0.", "lxc.uts.name", "lxc.start.auto", "lxc.cgroup.", NESTING)


class PctError(Exception):
    pass


def run(*argv, check=True, **kwargs):
    result = subprocess.run(argv, **kwargs)
    if check and result.returncode != 0:
        raise PctError(f"command '{' '.join(argv)}' failed: exit code {result.returncode}")
    return result


def options(args):
    """`--key value` pairs (Proxmox also takes `-key value`) into a dict."""
    parsed = {}
    args = list(args)
    while args:
        key = args.pop(0)
        if not key.startswith("-"):
            raise PctError(f"unexpected argument '{key}'")
        parsed[key.lstrip("-")] = args.pop(0) if args and not args[0].startswith("--") else "1"
    return parsed


def split_list(value):
    """'name=eth0,bridge=vmbr0' -> {'name': 'eth0', 'bridge': 'vmbr0'}"""
    return dict(item.split("=", 1) for item in value.split(",") if item)


def join_list(values, first=("name",)):
    keys = [key for key in first if key in values] + sorted(key for key in values if key not in first)
    return ",".join(f"{key}={values[key]}" for key in keys)


# -- one container ---------------------------------------------------------------------


class Container:
    def __init__(self, vmid):
        if not re.fullmatch(r"[1-9][0-9]{2,8}", str(vmid)):
            raise PctError(f"invalid vmid '{vmid}'")
        self.vmid = str(vmid)
        self.dir = LXC_PATH / self.vmid
        self.pct_conf = self.dir / "pct.conf"
        self.lxc_conf = self.dir / "config"
        self.rootfs = self.dir / "rootfs"

    def exists(self):
        return self.pct_conf.exists()

    def require(self):
        if not self.exists():
            sys.stderr.write(f"Configuration file 'nodes/{NODE}/lxc/{self.vmid}.conf' does not exist\n")
            raise SystemExit(2)
        return self

    def config(self):
        values = {}
        for line in self.pct_conf.read_text().splitlines():
            key, _, value = line.partition(": ")
            values[key] = value
        return values

    def write_config(self, values):
        self.pct_conf.write_text("".join(f"{key}: {values[key]}\n" for key in sorted(values)))
        self.apply(values)

    def state(self):
        out = run("lxc-info", "-n", self.vmid, "-s", "-H", capture_output=True, text=True, check=False)
        return "running" if out.stdout.strip() == "RUNNING" else "stopped"

    def apply(self, values):
        """The Proxmox config into the LXC config and the container's own files."""
        net = split_list(values.get("net0", ""))
        lines = [
            line
            for line in self.lxc_conf.read_text().splitlines()
            if not line.startswith(MANAGED_LXC_KEYS) and line != "# managed by the pct stand-in"
        ]
        lines.append("# managed by the pct stand-in")
        lines.append(f"lxc.uts.name = {values['hostname']}")
        lines.append(f"lxc.start.auto = {values.get('onboot', '0')}")
        if net:
            lines += [
                "lxc.net.0.type = veth",
                f"lxc.net.0.link = {net['bridge']}",
                "lxc.net.0.flags = up",
                f"lxc.net.0.name = {net.get('name', 'eth0')}",
                f"lxc.net.0.hwaddr = {net['hwaddr']}",
            ]
        cores = min(int(values.get("cores", os.cpu_count())), os.cpu_count())
        memory = int(values.get("memory", 512))
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2, as on Debian 12
            lines.append(f"lxc.cgroup2.cpuset.cpus = 0-{cores - 1}")
            lines.append(f"lxc.cgroup2.memory.max = {memory}M")
        else:
            lines.append(f"lxc.cgroup.cpuset.cpus = 0-{cores - 1}")
            lines.append(f"lxc.cgroup.memory.limit_in_bytes = {memory}M")
        if "nesting=1" in values.get("features", ""):
            lines.append(NESTING)
        self.lxc_conf.write_text("\n".join(lines) + "\n")

        hostname = values["hostname"]
        etc = self.rootfs / "etc"
        (etc / "hostname").write_text(hostname + "\n")
        hosts = [line for line in (etc / "hosts").read_text().splitlines() if not line.startswith("127.0.1.1")]
        (etc / "hosts").write_text("\n".join([*hosts, f"127.0.1.1\t{hostname}"]) + "\n")
        if net:
            interface = net.get("name", "eth0")
            stanza = [f"auto {interface}"]
            if net.get("ip") in (None, "dhcp"):
                stanza.append(f"iface {interface} inet dhcp")
            else:
                stanza.append(f"iface {interface} inet static")
                stanza.append(f"\taddress {net['ip']}")
                if net.get("gw"):
                    stanza.append(f"\tgateway {net['gw']}")
            (etc / "network" / "interfaces").write_text(
                "auto lo\niface lo inet loopback\n\n" + "\n".join(stanza) + "\n"
            )


def normalise(values, vmid, previous=None):
    """Option values as `pct config` prints them."""
    previous = previous or {}
    if "net0" in values:
        net = {"name": "eth0", "type": "veth", **split_list(values["net0"])}
        old_mac = split_list(previous.get("net0", "")).get("hwaddr")
        net.setdefault("hwaddr", old_mac or "BC:24:11:" + ":".join(f"{random.randrange(256):02X}" for _ in range(3)))
        values["net0"] = join_list(net)
    if "rootfs" in values and ",size=" not in values["rootfs"]:
        storage, _, size = values["rootfs"].partition(":")
        values["rootfs"] = f"{storage}:vm-{vmid}-disk-0,size={size}G"
    if "features" in values:
        values["features"] = join_list(split_list(values["features"]), first=())
    return values


# -- pct -------------------------------------------------------------------------------

CREATE_ONLY = {"start", "storage", "password", "ssh-public-keys", "unique", "restore", "force", "pool"}


def pct_create(vmid, template, *args):
    ct = Container(vmid)
    if ct.exists() or ct.dir.exists():
        raise PctError(f"CT {vmid} already exists on node '{NODE}'")
    storage, _, name = template.partition(":vztmpl/")
    if not (STATE / "template" / storage / name).exists():
        raise PctError(f"volume '{template}' does not exist")
    if not name.startswith("debian-12-"):
        raise PctError(f"the stand-in builds Debian 12 only, not {name}")
    opts = options(args)
    values = {key: value for key, value in opts.items() if key not in CREATE_ONLY}
    values.setdefault("hostname", f"CT{vmid}")
    values.setdefault("memory", "512")
    values.setdefault("swap", "512")
    values.setdefault("arch", "amd64")
    values.setdefault("ostype", "debian")
    values = normalise(values, vmid)
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as base:
        base.write("lxc.net.0.type = empty\n")
        base.flush()
        created = run(
            "lxc-create", "-n", ct.vmid, "-f", base.name, "-t", "debian",
            "--", "-r", "bookworm", f"--packages={PACKAGES}",
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if created.returncode != 0:
        raise PctError(f"lxc-create failed:\n{created.stdout[-2000:]}{created.stderr[-2000:]}")
    ct.write_config(values)
    print(f"CT {vmid} created from {template}")
    if opts.get("start") == "1":
        pct_start(vmid)


def pct_set(vmid, *args):
    ct = Container(vmid).require()
    opts = options(args)
    values = ct.config()
    for key in opts.pop("delete", "").split(","):
        values.pop(key, None)
    unknown = set(opts) & CREATE_ONLY
    if unknown:
        raise PctError(f"pct set does not take {', '.join(sorted(unknown))}")
    values.update(normalise(opts, vmid, previous=values))
    ct.write_config(values)


def pct_start(vmid, *args):
    ct = Container(vmid).require()
    if ct.state() == "running":
        raise PctError(f"CT {vmid} already running")
    run("lxc-start", "-n", ct.vmid)
    run("lxc-wait", "-n", ct.vmid, "-s", "RUNNING", "-t", "30")


def pct_stop(vmid, *args):
    ct = Container(vmid).require()
    if ct.state() != "running":
        raise PctError(f"CT {vmid} not running")
    run("lxc-stop", "-n", ct.vmid, "-k")


def pct_shutdown(vmid, *args):
    ct = Container(vmid).require()
    timeout = options(args).get("timeout", "60")
    if ct.state() == "running":
        run("lxc-stop", "-n", ct.vmid, "-t", timeout)


def pct_reboot(vmid, *args):
    pct_shutdown(vmid, *args)
    pct_start(vmid)


def pct_status(vmid, *args):
    print(f"status: {Container(vmid).require().state()}")


def pct_config(vmid, *args):
    for key, value in sorted(Container(vmid).require().config().items()):
        print(f"{key}: {value}")


def pct_list(*args):
    print(f"{'VMID':<10} {'Status':<10} {'Lock':<12} Name")
    for conf in sorted(LXC_PATH.glob("*/pct.conf")):
        ct = Container(conf.parent.name)
        print(f"{ct.vmid:<10} {ct.state():<10} {'':<12} {ct.config().get('hostname', '')}")


def pct_exec(vmid, *command):
    ct = Container(vmid).require()
    if ct.state() != "running":
        raise PctError(f"CT {vmid} not running")
    command = list(command)
    # Like Proxmox 8: the caller's environment is kept unless --keep-env 0.
    keep_env = "1"
    if command[:1] == ["--keep-env"]:
        keep_env = command[1]
        command = command[2:]
    if command[:1] == ["--"]:
        command.pop(0)
    if not command:
        raise PctError("missing command")
    environment = "--keep-env" if keep_env == "1" else "--clear-env"
    sys.stdout.flush()
    os.execvp("lxc-attach", ["lxc-attach", "-n", ct.vmid, environment, "--", *command])


def pct_push(vmid, source, destination, *args):
    ct = Container(vmid).require()
    opts = options(args)
    script = 'cat > "$1"'
    if "perms" in opts:
        script += f' && chmod {opts["perms"]} "$1"'
    if "user" in opts or "group" in opts:
        script += f' && chown {opts.get("user", "root")}:{opts.get("group", "root")} "$1"'
    with open(source, "rb") as data:
        run("lxc-attach", "-n", ct.vmid, "--", "/bin/sh", "-c", script, "push", destination, stdin=data)


def pct_pull(vmid, source, destination, *args):
    ct = Container(vmid).require()
    with open(destination, "wb") as out:
        run("lxc-attach", "-n", ct.vmid, "--", "/bin/cat", source, stdout=out)


def pct_destroy(vmid, *args):
    ct = Container(vmid).require()
    opts = options(args)
    if ct.state() == "running":
        if opts.get("force") != "1":
            raise PctError(f"CT {vmid} is running - destroy failed")
        run("lxc-stop", "-n", ct.vmid, "-k")
    run("lxc-destroy", "-n", ct.vmid, capture_output=True)
    print(f"CT {vmid} destroyed")


# -- pveam -----------------------------------------------------------------------------


def pveam_update(*args):
    print("update successful")


def pveam_available(*args):
    for name in AVAILABLE:
        print(f"{'system':<15} {name}")


def pveam_download(storage, name, *args):
    if name not in AVAILABLE:
        raise PctError(f"400 Parameter verification failed.\ntemplate: no such template '{name}'")
    path = STATE / "template" / storage / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    print(f"downloading {name} to {storage}\nTASK OK")


def pveam_list(storage, *args):
    print(f"{'NAME':<60} SIZE")
    for path in sorted((STATE / "template" / storage).glob("*")):
        print(f"{storage + ':vztmpl/' + path.name:<60} 0.00MB")


def pveam_remove(volume, *args):
    storage, _, name = volume.partition(":vztmpl/")
    path = STATE / "template" / storage / name
    if path.exists():
        path.unlink()


TOOLS = {
    "pct": {
        "create": pct_create, "set": pct_set, "start": pct_start, "stop": pct_stop,
        "shutdown": pct_shutdown, "reboot": pct_reboot, "status": pct_status,
        "config": pct_config, "list": pct_list, "exec": pct_exec, "push": pct_push,
        "pull": pct_pull, "destroy": pct_destroy,
    },
    "pveam": {
        "update": pveam_update, "available": pveam_available, "download": pveam_download,
        "list": pveam_list, "remove": pveam_remove,
    },
}  # fmt: skip


def main(argv):
    tool = os.path.basename(argv[0]).removesuffix(".py")
    tool = tool if tool in TOOLS else "pct"
    commands = TOOLS[tool]
    if len(argv) < 2 or argv[1] not in commands:
        sys.stderr.write(f"usage: {tool} {{{'|'.join(commands)}}} ... (stand-in for tests)\n")
        return 2
    if not shutil.which("lxc-create"):
        sys.stderr.write(f"{tool}: LXC is not installed\n")
        return 255
    try:
        commands[argv[1]](*argv[2:])
    except (PctError, TypeError) as error:
        sys.stderr.write(f"{error}\n")
        return 255
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
