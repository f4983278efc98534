"""One container on plain LXC, named by its VMID: its Proxmox config (config.py), the LXC
config written from it on every change as Proxmox does, its root file system and mount
points (storage.py), and the files inside that Proxmox sets up before each start
(pve-container's PVE::LXC::Setup: host name, /etc/hosts, network, DNS, time zone).

An unprivileged container runs as Proxmox runs one: its ids shifted by 100000 (lxc.idmap,
root:100000:65536 in /etc/subuid and /etc/subgid), its template unpacked through
lxc-usernsexec, its files owned by the shifted root."""

import ctypes
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import storage
from .config import PctConfig, is_interface, is_mount_point
from .node import LXC_COMMON_CONFIG, LXC_PATH, NODE, UNPRIVILEGED_BASE, UNPRIVILEGED_RANGE, PveError, run, split_list

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
ID_MAP = [f"u:0:{UNPRIVILEGED_BASE}:{UNPRIVILEGED_RANGE}", f"g:0:{UNPRIVILEGED_BASE}:{UNPRIVILEGED_RANGE}"]


# The new mount API (Linux 5.2): the same numbers on every architecture.
OPEN_TREE, MOVE_MOUNT = 428, 429
SETNS = 308 if os.uname().machine == "x86_64" else 268
AT_FDCWD, AT_RECURSIVE, OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH = -100, 0x8000, 1, 0x4
O_CLOEXEC, CLONE_NEWNS = 0o2000000, 0x20000
LIBC = ctypes.CDLL(None, use_errno=True)


def syscall(number, *args):
    result = LIBC.syscall(number, *args)
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return result


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


def check_id_map():
    """An unprivileged container needs the node's subordinate ids for root, as every
    Proxmox node has them."""
    for path in ("/etc/subuid", "/etc/subgid"):
        lines = Path(path).read_text().splitlines() if Path(path).exists() else []
        if f"root:{UNPRIVILEGED_BASE}:{UNPRIVILEGED_RANGE}" not in lines:
            raise PveError(f"{path} lacks root:{UNPRIVILEGED_BASE}:{UNPRIVILEGED_RANGE} (a Proxmox node has it)")


class Container:
    def __init__(self, vmid):
        if not str(vmid).isdigit() or not 100 <= int(vmid) <= 999999999:
            raise PveError(f"400 Parameter verification failed.\nvmid: invalid format - value must be >= 100: '{vmid}'")
        self.vmid = str(vmid)
        self.dir = LXC_PATH / self.vmid
        self.pct_conf = self.dir / "pct.conf"
        self.lxc_conf = self.dir / "config"

    # -- the Proxmox config ---------------------------------------------------------------

    def exists(self):
        return self.pct_conf.exists()

    def require(self):
        if not self.exists():
            raise PveError(f"Configuration file 'nodes/{NODE}/lxc/{self.vmid}.conf' does not exist")
        return self

    def config(self):
        return PctConfig.load(self.pct_conf)

    def save(self, config):
        config.save(self.pct_conf)
        self.lxc_conf.write_text(self.lxc_config(config.current))

    @property
    def values(self):
        return self.config().current

    @property
    def unprivileged(self):
        return self.values.get("unprivileged") == "1"

    @property
    def root_ids(self):
        """Root of the container, as this node sees it."""
        return (UNPRIVILEGED_BASE, UNPRIVILEGED_BASE) if self.unprivileged else (0, 0)

    def volumes(self, values=None):
        """{key: volume id} of the root disk and mount points that are volumes of a
        storage (not bind mounts of node directories), and unused disks."""
        values = self.values if values is None else values
        found = {}
        for key, value in values.items():
            if key == "rootfs" or is_mount_point(key) or key.startswith("unused"):
                volume = split_list(value).get("", value)
                if not volume.startswith("/"):
                    found[key] = volume
        return found

    @property
    def rootfs(self):
        return storage.volume_path(self.volumes()["rootfs"])

    # -- state ----------------------------------------------------------------------------

    def state(self):
        out = run("lxc-info", "-n", self.vmid, "-s", "-H", capture_output=True, text=True, check=False)
        return "running" if out.stdout.strip() == "RUNNING" else "stopped"

    def pid(self):
        return run("lxc-info", "-n", self.vmid, "-p", "-H", capture_output=True, text=True).stdout.strip()

    def start(self):
        config = self.config()
        config.apply_pending()  # PVE::LXC::vm_start applies what is pending first
        self.save(config)
        self.set_up_files(config.current)
        log = self.dir / "start.log"
        started = run("lxc-start", "-n", self.vmid, "-l", "INFO", "-o", log, check=False)
        if started.returncode != 0:
            lines = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            raise PveError(f"startup for container '{self.vmid}' failed:\n" + "\n".join(lines))
        run("lxc-wait", "-n", self.vmid, "-s", "RUNNING", "-t", "30")

    def interfaces(self):
        """The addresses of its interfaces, as /nodes/{node}/lxc/{vmid}/interfaces gives
        them (PVE::LXC::get_interfaces: `ip --json a` in its network namespace)."""
        if self.state() != "running":
            raise PveError(f"CT {self.vmid} not running")
        out = run("nsenter", "-t", self.pid(), "--net", "--", "ip", "--json", "a", capture_output=True, text=True)
        found = []
        for link in json.loads(out.stdout):
            entry = {"name": link["ifname"], "hwaddr": link.get("address", "")}
            for address in link.get("addr_info", []):
                family = "inet" if address["family"] == "inet" else "inet6"
                entry.setdefault(family, f"{address['local']}/{address['prefixlen']}")
            found.append(entry)
        return found

    # -- files inside ---------------------------------------------------------------------

    def file(self, path):
        """A file of the container's root file system (its directories are real ones in
        a Debian template, so no symlink leads out of it)."""
        return self.rootfs / path.lstrip("/")

    def write(self, path, text, mode=0o644):
        """Writes a file of the container's as its root; a symlink there is replaced,
        never followed (it could point at this host's own file)."""
        target = self.file(path)
        if target.is_symlink():
            target.unlink()
        target.write_text(text)
        target.chmod(mode)
        os.chown(target, *self.root_ids)

    def set_up_files(self, values):
        """What pve-container's setup does in the root file system before a start: host
        name and /etc/hosts, the network, DNS, the time zone."""
        net = split_list(values.get("net0", ""))
        hostname = values["hostname"]
        self.write("/etc/hostname", hostname.split(".")[0] + "\n")
        address = net.get("ip", "dhcp").split("/")[0]
        name = address if address not in ("dhcp", "manual") else "127.0.1.1"
        hosts = self.file("/etc/hosts")
        old_hosts = hosts.read_text() if hosts.is_file() and not hosts.is_symlink() else ""
        self.write("/etc/hosts", with_pve_section(old_hosts, [f"{name} {hostname}"]))
        if net:
            self.write_network(net)
        # DNS: the configured servers, else this host's (Proxmox's lookup_dns_conf).
        if values.get("nameserver"):
            dns = [f"nameserver {server}" for server in values["nameserver"].split()]
        else:
            dns = [line for line in Path("/etc/resolv.conf").read_text().splitlines() if line.startswith("nameserver")]
        if values.get("searchdomain"):
            dns.insert(0, f"search {values['searchdomain']}")
        self.write("/etc/resolv.conf", with_pve_section("", dns))
        zone = values.get("timezone")
        if zone:
            zone = Path("/etc/timezone").read_text().strip() if zone == "host" else zone
            localtime = self.file("/etc/localtime")
            if localtime.is_symlink() or localtime.exists():
                localtime.unlink()
            localtime.symlink_to(f"/usr/share/zoneinfo/{zone}")
            os.lchown(localtime, *self.root_ids)
            self.write("/etc/timezone", f"{zone}\n")

    def write_network(self, net):
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

    # -- the LXC config -------------------------------------------------------------------

    def lxc_config(self, values):
        """The LXC config of this Proxmox config, rewritten whole on every change as
        Proxmox does (its debian.common.conf is common.conf without /dev/lxc ttys)."""
        lines = [
            "# Written by the pct stand-in from pct.conf; rewritten on every change.",
            f"lxc.include = {LXC_COMMON_CONFIG}",
        ]
        if values.get("unprivileged") == "1":
            lines += [
                f"lxc.include = {LXC_COMMON_CONFIG.with_name('userns.conf')}",
                f"lxc.idmap = u 0 {UNPRIVILEGED_BASE} {UNPRIVILEGED_RANGE}",
                f"lxc.idmap = g 0 {UNPRIVILEGED_BASE} {UNPRIVILEGED_RANGE}",
            ]
        if "nesting=1" in values.get("features", ""):
            lines.append(f"lxc.include = {LXC_COMMON_CONFIG.with_name('nesting.conf')}")
        rootfs = split_list(values["rootfs"])[""]
        lines += [
            "lxc.tty.dir =",
            f"lxc.arch = {values.get('arch', 'amd64')}",
            f"lxc.rootfs.path = dir:{storage.volume_path(rootfs)}",
            f"lxc.uts.name = {values['hostname']}",
            f"lxc.start.auto = {values.get('onboot', '0')}",
            "lxc.tty.max = 2",
        ]
        for key in sorted(key for key in values if is_interface(key)):
            net, number = split_list(values[key]), key[3:]
            lines += [
                f"lxc.net.{number}.type = veth",
                f"lxc.net.{number}.link = {net['bridge']}",
                f"lxc.net.{number}.veth.pair = veth{self.vmid}i{number}",
                f"lxc.net.{number}.flags = up",
                f"lxc.net.{number}.name = {net.get('name', 'eth0')}",
                f"lxc.net.{number}.hwaddr = {net['hwaddr']}",
            ]
        for key in sorted(key for key in values if is_mount_point(key)):
            lines.append(self.mount_entry(values[key]))
        cores = min(int(values.get("cores", os.cpu_count())), os.cpu_count())
        memory = int(values.get("memory", 512))
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2 only
            lines.append(f"lxc.cgroup2.cpuset.cpus = 0-{cores - 1}")
            lines.append(f"lxc.cgroup2.memory.max = {memory}M")
        else:
            lines.append(f"lxc.cgroup.cpuset.cpus = 0-{cores - 1}")
            lines.append(f"lxc.cgroup.memory.limit_in_bytes = {memory}M")
        return "\n".join(lines) + "\n"

    def mount_source(self, value):
        volume = split_list(value)[""]
        return Path(volume) if volume.startswith("/") else storage.volume_path(volume)

    def mount_entry(self, value):
        target = split_list(value)["mp"].strip("/")
        return f"lxc.mount.entry = {self.mount_source(value)} {target} none rbind,create=dir 0 0"

    # -- creating -------------------------------------------------------------------------

    def extract(self, archive, rootfs):
        """The template archive into the root file system, as pve-container does: through
        lxc-usernsexec with the container's id map when it is unprivileged."""
        suffix = archive.suffix if archive.name.endswith(f".tar{archive.suffix}") else ""
        if not archive.name.endswith(".tar") and suffix not in COMPRESSION:
            raise PveError(f"file does not look like a template archive: {archive}")
        compression = [COMPRESSION[suffix]] if suffix else []
        print(f"extracting archive '{archive}'")
        tar = ["tar", "xpf", archive, *compression, *TAR_FLAGS, "-C", rootfs]
        if self.unprivileged:
            check_id_map()
            os.chown(rootfs, *self.root_ids)
            tar = ["lxc-usernsexec", *(f"-m{mapping}" for mapping in ID_MAP), "--", *tar]
        run(*tar, capture_output=True, text=True)
        if not self.file("/etc/debian_version").exists():
            raise PveError("unable to detect OS distribution (the stand-in knows Debian only)")
        init = self.file("/sbin/init")
        if not (init.exists() or init.is_symlink()):
            raise PveError(f"the template has no /sbin/init: {archive}")

    def post_create(self, hostname, ssh_keys):
        """What pve-container's post_create_hook does for a new Debian container."""
        for machine_id in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
            if not self.file(machine_id).is_symlink():
                self.file(machine_id).unlink(missing_ok=True)
        self.file("/etc/systemd/system-preset").mkdir(parents=True, exist_ok=True)
        self.write("/etc/systemd/system-preset/00-proxmox.preset", "disable systemd-networkd.service\n")
        if ssh_keys:
            self.file("/root/.ssh").mkdir(mode=0o700, exist_ok=True)
            os.chown(self.file("/root/.ssh"), *self.root_ids)
            self.write("/root/.ssh/authorized_keys", ssh_keys if ssh_keys.endswith("\n") else ssh_keys + "\n", 0o600)
        if not self.file("/etc/ssh").is_dir():
            return
        with tempfile.TemporaryDirectory() as keys:
            for key_type, name in SSH_HOST_KEYS.items():
                key = Path(keys, name)
                print(f"Creating SSH host key '{name}' - this may take some time ...")
                run("ssh-keygen", "-q", "-f", key, "-t", key_type, "-N", "", "-C", f"root@{hostname.split('.')[0]}")
                for path, mode in ((key, 0o600), (key.with_name(f"{name}.pub"), 0o644)):
                    target = self.file(f"/etc/ssh/{path.name}")
                    target.unlink(missing_ok=True)
                    self.write(f"/etc/ssh/{path.name}", path.read_text(), mode)

    def prepare_volume(self, volid):
        """A new volume's root belongs to the container's root (PVE::LXC::mkfs and the
        unprivileged chown of its top directory)."""
        os.chown(storage.volume_path(volid), *self.root_ids)

    # -- changes while running ------------------------------------------------------------

    def hotplug(self, changes, deleted):
        """What pve-container does at once on a running container for the changes
        config.py says are hot-pluggable."""
        if {"memory", "swap"} & set(changes):
            memory = int(self.values.get("memory", 512))
            name = "memory.max" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "memory.limit_in_bytes"
            run("lxc-cgroup", "-n", self.vmid, name, f"{memory}M")
        for key, value in changes.items():
            if is_interface(key):
                self.update_interface(key, value)
            elif is_mount_point(key):
                self.hotplug_mount(value)
        for key in deleted:
            if is_interface(key):
                run("ip", "link", "delete", f"veth{self.vmid}i{key[3:]}", check=False)

    def update_interface(self, key, value):
        """PVE::LXC::update_net: a new bridge is plugged at once, a new address set with
        `ip` in the container's network namespace and written to its network config."""
        net = split_list(value)
        host_side = f"veth{self.vmid}i{key[3:]}"
        run("ip", "link", "set", host_side, "master", net["bridge"])
        inside = ["nsenter", "-t", self.pid(), "--net", "--", "ip"]
        name = net.get("name", "eth0")
        run(*inside, "-4", "addr", "flush", "dev", name)
        if net.get("ip") not in (None, "dhcp", "manual"):
            run(*inside, "addr", "add", net["ip"], "dev", name)
            if net.get("gw"):
                run(*inside, "route", "replace", "default", "via", net["gw"])
        self.write_network(net)

    def hotplug_mount(self, value):
        """A new mount point into the running container, as pve-container's
        mountpoint_hotplug does on current kernels: the source cloned as a detached mount
        tree (open_tree) in this namespace, then moved (move_mount) into the container's
        mount namespace, which a plain `mount --bind` from outside cannot reach."""
        source, target = self.mount_source(value), "/" + split_list(value)["mp"].strip("/")
        self.file(target).mkdir(parents=True, exist_ok=True)
        os.chown(self.file(target), *self.root_ids)
        namespace = os.open(f"/proc/{self.pid()}/ns/mnt", os.O_RDONLY)
        child = os.fork()
        if child == 0:  # setns changes the calling process: do it in a child of its own
            code = 1
            try:
                tree = syscall(OPEN_TREE, AT_FDCWD, os.fsencode(source), OPEN_TREE_CLONE | O_CLOEXEC | AT_RECURSIVE)
                syscall(SETNS, namespace, CLONE_NEWNS)
                syscall(MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH)
                code = 0
            except OSError as error:
                print(f"unable to hotplug mount point {target}: {error}", file=sys.stderr)
            finally:
                os._exit(code)
        os.close(namespace)
        if os.waitpid(child, 0)[1] != 0:
            raise PveError(f"unable to hotplug mount point {target}")

    def destroy(self):
        """Its volumes (not bind-mounted node directories) and its configs."""
        for volid in {*self.volumes().values(), *storage.owned_volumes(self.vmid)}:
            storage.free(volid)
        shutil.rmtree(self.dir, ignore_errors=True)
