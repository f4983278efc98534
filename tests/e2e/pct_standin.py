#!/usr/bin/python3
"""Stand-ins for Proxmox's `pct` and `pveam`, for the end-to-end tests only (never deployed):
the subcommands the proxmox_lxc role and the proxmox_pct_remote connection use, done the
way pve-container does them, on plain LXC (lxc-start, lxc-stop, lxc-info, lxc-attach,
lxc-destroy). The test installs this file as /usr/sbin/pct and /usr/sbin/pveam (the name
it is called by picks the tool) and removes both afterwards.

As on Proxmox:
- `pveam download STORAGE NAME` puts a template archive into the storage's template
  directory. Proxmox fetches it from its appliance server; here the server is the
  directory REPOSITORY on this machine, where the test puts the archive it built.
- `pct create VMID STORAGE:vztmpl/NAME` extracts that archive into the container's root
  file system (tar, as pve-container's restore_tar_archive), then does what its
  post_create_hook does for Debian: removes the machine id (systemd makes a new one at
  first boot), keeps systemd-networkd off (Debian uses ifupdown), makes new SSH host keys
  with ssh-keygen on this host, and writes the network, host name and DNS settings into
  the container's files. It writes the LXC config itself, from the Proxmox config.
- A container is named by its VMID. Its Proxmox configuration (what `pct config` prints,
  what `pct set` changes) is applied the way Proxmox applies it: network, hostname and
  autostart to the LXC config and to /etc/network/interfaces, /etc/hostname, /etc/hosts
  and /etc/resolv.conf inside the container; cores (a cpuset) and memory to cgroup limits.

`unprivileged` and `features` are recorded and printed but the container runs
privileged: an unprivileged container needs an id-shifted root file system.
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
# The stand-in's appliance server: template archives `pveam download` can fetch.
REPOSITORY = Path("/var/cache/agent-comms-e2e/templates")
NODE = os.uname().nodename.split(".")[0]
LXC_COMMON_CONFIG = Path("/usr/share/lxc/config/common.conf")
# What `pct create` runs tar with, as pve-container (restore_tar_archive, COMMON_TAR_FLAGS).
TAR_FLAGS = [
    "--totals", "--sparse", "--numeric-owner", "--acls", "--xattrs",
    "--xattrs-include=user.*", "--xattrs-include=security.capability",
    "--warning=no-file-ignored", "--warning=no-xattr-write",
    "--skip-old-files", "--anchored", "--exclude", "./dev/*",
]  # fmt: skip
COMPRESSION = {".zst": "--zstd", ".gz": "-z", ".xz": "-J", ".bz2": "-j"}
SSH_HOST_KEYS = {"rsa": "ssh_host_rsa_key", "ecdsa": "ssh_host_ecdsa_key", "ed25519": "ssh_host_ed25519_key"}
PVE_SECTION = ("# --- BEGIN PVE ---", "# --- END PVE ---")


class PctError(Exception):
    pass


def run(*argv, check=True, **kwargs):
    result = subprocess.run(argv, **kwargs)
    if check and result.returncode != 0:
        output = "".join(text[-2000:] for text in (result.stdout, result.stderr) if isinstance(text, str))
        raise PctError(f"command '{' '.join(map(str, argv))}' failed: exit code {result.returncode}\n{output}")
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


def with_pve_section(text, section):
    """text with its `# --- BEGIN PVE ---` ... `# --- END PVE ---` part replaced by
    section (appended if it had none), as pve-container's ct_modify_file."""
    begin, end = PVE_SECTION
    kept, inside = [], False
    for line in text.splitlines():
        if line.strip() == begin:
            inside = True
        elif line.strip() == end:
            inside = False
        elif not inside:
            kept.append(line)
    return "\n".join([*kept, begin, *section, end]) + "\n"


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

    def file(self, path):
        """A file of the container's root file system (its directories are real ones in
        a Debian template, so no symlink leads out of it)."""
        return self.rootfs / path.lstrip("/")

    def write(self, path, text):
        """Writes a file of the container's; a symlink there is replaced, never followed
        (it could point at this host's own file)."""
        target = self.file(path)
        if target.is_symlink():
            target.unlink()
        target.write_text(text)

    def apply(self, values):
        """The Proxmox config into the LXC config and the container's own files."""
        self.lxc_conf.write_text(self.lxc_config(values))
        net = split_list(values.get("net0", ""))
        hostname = values["hostname"]
        self.write("/etc/hostname", hostname.split(".")[0] + "\n")
        address = net.get("ip", "dhcp").split("/")[0]
        name = address if address not in ("dhcp", "manual") else "127.0.1.1"
        hosts = self.file("/etc/hosts")
        old_hosts = hosts.read_text() if hosts.is_file() and not hosts.is_symlink() else ""
        self.write("/etc/hosts", with_pve_section(old_hosts, [f"{name} {hostname}"]))
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
            self.write("/etc/network/interfaces", "auto lo\niface lo inet loopback\n\n" + "\n".join(stanza) + "\n")
        # DNS: the configured server, else this host's (Proxmox's lookup_dns_conf).
        if values.get("nameserver"):
            dns = [f"nameserver {server}" for server in values["nameserver"].split()]
        else:
            dns = [line for line in Path("/etc/resolv.conf").read_text().splitlines() if line.startswith("nameserver")]
        if values.get("searchdomain"):
            dns.insert(0, f"search {values['searchdomain']}")
        self.write("/etc/resolv.conf", with_pve_section("", dns))

    def lxc_config(self, values):
        """The LXC config of this Proxmox config, rewritten whole on every change as
        Proxmox does (its debian.common.conf is common.conf without /dev/lxc ttys)."""
        lines = [
            "# Written by the pct stand-in from pct.conf; rewritten on every change.",
            f"lxc.include = {LXC_COMMON_CONFIG}",
            "lxc.tty.dir =",
            f"lxc.arch = {values.get('arch', 'amd64')}",
            f"lxc.rootfs.path = dir:{self.rootfs}",
            f"lxc.uts.name = {values['hostname']}",
            f"lxc.start.auto = {values.get('onboot', '0')}",
            "lxc.tty.max = 2",
        ]
        net = split_list(values.get("net0", ""))
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
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2 only
            lines.append(f"lxc.cgroup2.cpuset.cpus = 0-{cores - 1}")
            lines.append(f"lxc.cgroup2.memory.max = {memory}M")
        else:
            lines.append(f"lxc.cgroup.cpuset.cpus = 0-{cores - 1}")
            lines.append(f"lxc.cgroup.memory.limit_in_bytes = {memory}M")
        if "nesting=1" in values.get("features", ""):
            lines.append("lxc.include = /usr/share/lxc/config/nesting.conf")
        return "\n".join(lines) + "\n"

    def extract(self, archive):
        """The template archive into the root file system, as pve-container does."""
        suffix = archive.suffix if archive.name.endswith(f".tar{archive.suffix}") else ""
        if not archive.name.endswith(".tar") and suffix not in COMPRESSION:
            raise PctError(f"file does not look like a template archive: {archive}")
        compression = [COMPRESSION[suffix]] if suffix else []
        self.rootfs.mkdir(parents=True)
        print(f"extracting archive '{archive}'")
        run("tar", "xpf", archive, *compression, *TAR_FLAGS, "-C", self.rootfs, capture_output=True, text=True)
        if not self.file("/etc/debian_version").exists():
            raise PctError("unable to detect OS distribution (the stand-in knows Debian only)")
        init = self.file("/sbin/init")
        if not (init.exists() or init.is_symlink()):
            raise PctError(f"the template has no /sbin/init: {archive}")

    def post_create(self, hostname):
        """What pve-container's post_create_hook does for a new Debian container."""
        for machine_id in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
            if not self.file(machine_id).is_symlink():
                self.file(machine_id).unlink(missing_ok=True)
        self.file("/etc/systemd/system-preset").mkdir(parents=True, exist_ok=True)
        self.write("/etc/systemd/system-preset/00-proxmox.preset", "disable systemd-networkd.service\n")
        ssh = self.file("/etc/ssh")
        if not ssh.is_dir():
            return
        with tempfile.TemporaryDirectory() as keys:
            for key_type, name in SSH_HOST_KEYS.items():
                key = Path(keys, name)
                print(f"Creating SSH host key '{name}' - this may take some time ...")
                run("ssh-keygen", "-q", "-f", key, "-t", key_type, "-N", "", "-C", f"root@{hostname.split('.')[0]}")
                for path, mode in ((key, 0o600), (key.with_name(f"{name}.pub"), 0o644)):
                    target = ssh / path.name
                    target.unlink(missing_ok=True)
                    target.write_bytes(path.read_bytes())
                    target.chmod(mode)


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


def template_path(volume):
    storage, _, name = volume.partition(":vztmpl/")
    return STATE / "template" / storage / name


# -- pct -------------------------------------------------------------------------------

CREATE_ONLY = {"start", "storage", "password", "ssh-public-keys", "unique", "restore", "force", "pool"}


def pct_create(vmid, template, *args):
    ct = Container(vmid)
    if ct.exists() or ct.dir.exists():
        raise PctError(f"CT {vmid} already exists on node '{NODE}'")
    archive = template_path(template)
    if not archive.exists():
        raise PctError(f"volume '{template}' does not exist")
    opts = options(args)
    values = {key: value for key, value in opts.items() if key not in CREATE_ONLY}
    values.setdefault("hostname", f"CT{vmid}")
    values.setdefault("memory", "512")
    values.setdefault("swap", "512")
    values.setdefault("arch", "amd64")
    values.setdefault("ostype", "debian")
    values = normalise(values, vmid)
    try:
        ct.extract(archive)
        ct.post_create(values["hostname"])
        ct.write_config(values)
    except BaseException:
        shutil.rmtree(ct.dir, ignore_errors=True)  # as Proxmox: no half-made container
        raise
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
    log = ct.dir / "start.log"
    started = run("lxc-start", "-n", ct.vmid, "-l", "INFO", "-o", log, check=False)
    if started.returncode != 0:
        lines = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        raise PctError(f"startup for container '{vmid}' failed:\n" + "\n".join(lines))
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
    run("lxc-destroy", "-n", ct.vmid, capture_output=True, text=True)
    print(f"CT {vmid} destroyed")


# -- pveam -----------------------------------------------------------------------------


def pveam_update(*args):
    print("update successful")


def pveam_available(*args):
    for archive in sorted(REPOSITORY.glob("*.tar*")):
        print(f"{'system':<15} {archive.name}")


def pveam_download(storage, name, *args):
    source = REPOSITORY / name
    if not source.is_file():
        raise PctError(
            f"400 Parameter verification failed.\ntemplate: no such template '{name}'\n"
            f"(the stand-in's appliance server is {REPOSITORY}: the test builds the template there)"
        )
    path = template_path(f"{storage}:vztmpl/{name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {name} to {storage}")
    partial = path.with_name(f"{name}.tmp.{os.getpid()}")
    shutil.copyfile(source, partial)
    partial.rename(path)
    print("TASK OK")


def pveam_list(storage, *args):
    print(f"{'NAME':<60} SIZE")
    for path in sorted((STATE / "template" / storage).glob("*")):
        print(f"{storage + ':vztmpl/' + path.name:<60} {path.stat().st_size / 2**20:.2f}MB")


def pveam_remove(volume, *args):
    template_path(volume).unlink(missing_ok=True)


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
    if not shutil.which("lxc-start") or not LXC_COMMON_CONFIG.exists():
        sys.stderr.write(f"{tool}: LXC is not installed (no lxc-start or {LXC_COMMON_CONFIG})\n")
        return 255
    try:
        commands[argv[1]](*argv[2:])
    except (PctError, TypeError) as error:
        sys.stderr.write(f"{error}\n")
        return 255
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
