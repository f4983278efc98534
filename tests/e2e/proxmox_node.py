"""This machine as a Proxmox VE node, for the LXC end-to-end tests: the stand-ins for its
tools (tests/e2e/pve_standin, installed as /usr/sbin/pct, pveam, pvesm and /usr/bin/pvesh
for the tests only), templates built as Proxmox builds its own, a bridge and subnet of the
test's own, an sshd of the test's own on loopback as the node's SSH server, and `make`
run the way a user runs it against a test inventory.

Nothing here sends anything beyond loopback and the containers on the test's bridge."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from debian_rootfs import CACHE, debootstrap, debootstrap_command
from host_commands import ROOT, last_lines, run, stop_process, wait_for
from testinfra.backend.base import BaseBackend

from broker_process import free_port

BIN = Path(sys.executable).parent
STANDIN_PACKAGE = Path(__file__).with_name("pve_standin")
STANDIN_MARK = "Stand-in for Proxmox VE's"
TOOLS = {"pct": Path("/usr/sbin/pct"), "pveam": Path("/usr/sbin/pveam"), "pvesm": Path("/usr/sbin/pvesm"),
         "pvesh": Path("/usr/bin/pvesh")}  # fmt: skip
PCT = TOOLS["pct"]
STANDIN_STATE = Path("/var/lib/pct-standin")
# The stand-in's appliance server (its download.proxmox.com): templates the tests build.
REPOSITORY = CACHE / "templates"
WHEELHOUSE = ROOT / "build" / "e2e-wheelhouse"
# Root's ids in an unprivileged container, as every Proxmox node has them.
SUBORDINATE_IDS = "root:100000:65536"

BRIDGE = "acbr0"
GATEWAY = "10.250.77.1"
PREFIX = 24

# What this machine needs as the Proxmox node, by the file used, with the package that
# brings it (checked by file: a package can be there without what a test runs).
NODE_FILES = {
    "/usr/bin/lxc-start": "lxc",
    "/usr/bin/lxc-attach": "lxc",
    "/usr/bin/lxc-usernsexec": "lxc",  # unpacks an unprivileged container's template
    "/usr/share/lxc/config/common.conf": "lxc",  # the stand-in's LXC config includes it
    "/usr/bin/newuidmap": "uidmap",  # LXC maps an unprivileged container's ids with it
    "/usr/bin/nsenter": "util-linux",  # a container's addresses and mounts, from outside
    "/usr/sbin/debootstrap": "debootstrap",  # builds the templates
    "/usr/bin/zstd": "zstd",  # packs and unpacks them: .tar.zst, as Proxmox's
    "/usr/bin/ip": "iproute2",  # the bridge
    "/usr/sbin/sshd": "openssh-server",  # Ansible reaches "the node" over SSH
    "/usr/bin/ssh": "openssh-client",
    "/usr/bin/ssh-keygen": "openssh-client",  # the test's keys, the containers' host keys
    "/usr/bin/openssl": "openssl",  # throwaway CAs and the API's certificate
    "/usr/bin/sudo": "sudo",  # the node's non-root user, allowed only the Proxmox tools
    "/usr/sbin/dnsmasq": "dnsmasq-base",  # a DHCP server on the test's bridge
}


def template_files(python):
    """What a container needs from its template, by file: it reaches no mirror, so it all
    comes in the template (Proxmox's own has no python3; the role would apt-get it)."""
    return {
        "/sbin/init": "systemd-sysv",  # systemd as PID 1
        "/usr/bin/python3": "python3",  # Ansible's modules, broker.py's stand-in, chat.py
        f"/usr/lib/python{python}/ensurepip/__init__.py": "python3-venv",  # the broker's venv
        "/usr/sbin/sshd": "openssh-server",  # agent_comms_connection=ssh
        "/usr/sbin/ifup": "ifupdown",  # the /etc/network/interfaces pct writes
        "/usr/bin/ip": "iproute2",
        "/usr/bin/ss": "iproute2",  # the tests wait for broker.py's port with it
        "/usr/bin/ps": "procps",  # the tests list the broker's processes
        "/usr/share/zoneinfo/Europe/Berlin": "tzdata",  # proxmox_lxc_timezone
    }


# -- templates ----------------------------------------------------------------------------


def build_template(name, suite, python, extra_files=None):
    """The template `name` on the stand-in's appliance server: Debian `suite` from
    debootstrap, packed as Proxmox packs its templates (a .tar.zst of the root file system,
    without SSH host keys, which `pct create` makes for each container, and without
    package caches). Built once, then kept until its recipe changes."""
    files = {**template_files(python), **(extra_files or {})}
    archive = REPOSITORY / name
    recipe_file = archive.with_name(f"{archive.name}.recipe")
    recipe = json.dumps({"debootstrap": debootstrap_command("ROOTFS", files, suite=suite), "files": files})
    if archive.exists() and recipe_file.exists() and recipe_file.read_text() == recipe:
        return archive
    REPOSITORY.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="template-", dir=CACHE) as work:
        rootfs = Path(work, "rootfs")
        debootstrap(rootfs, files, suite=suite)
        for path in [
            *rootfs.glob("etc/ssh/ssh_host_*"),
            *rootfs.glob("var/cache/apt/archives/*.deb"),
            *rootfs.glob("var/lib/apt/lists/*_*"),
        ]:
            path.unlink()
        packed = Path(work, archive.name)
        run("tar", "--zstd", "-C", rootfs, "--numeric-owner", "--xattrs", "--acls", "-cpf", packed, ".", timeout=300)
        packed.replace(archive)
    recipe_file.write_text(recipe)
    return archive


def publish(archive, *names):
    """The same archive on the appliance server under other build names too (a hard link
    each), as when a release has had several builds."""
    for name in names:
        link = REPOSITORY / name
        link.unlink(missing_ok=True)
        os.link(archive, link)


def unpublish(*names):
    for name in names:
        (REPOSITORY / name).unlink(missing_ok=True)


# -- the stand-in's tools -------------------------------------------------------------------


def launcher(tool):
    return (
        # -IS: no site packages (the stand-in needs only the standard library), for a
        # quicker start.
        f"#!/usr/bin/python3 -IS\n# {STANDIN_MARK} `{tool}`, for the end-to-end tests only: tests/e2e/pve_standin.\n"
        f"import sys\nsys.path.insert(0, {str(STANDIN_PACKAGE.parent)!r})\n"
        "from pve_standin.cli import main\nsys.exit(main(sys.argv))\n"
    )


def is_standin(path):
    return path.exists() and STANDIN_MARK in path.read_text(errors="replace")


def install_standin():
    """The tools at the paths the role and the pct connection call, and what a node has
    for unprivileged containers (root's subordinate ids). Skips where real Proxmox tools
    are installed."""
    for tool in TOOLS.values():
        if tool.exists() and not is_standin(tool):
            pytest.skip(f"{tool} is a real Proxmox tool: this test only runs where there is none")
    for name, tool in TOOLS.items():
        tool.write_text(launcher(name))
        tool.chmod(0o755)
    added = []
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        lines = path.read_text().splitlines() if path.exists() else []
        if SUBORDINATE_IDS not in lines:
            path.write_text("\n".join([*lines, SUBORDINATE_IDS]) + "\n")
            added.append(path)
    shutil.rmtree(STANDIN_STATE, ignore_errors=True)
    return added


def remove_standin(added):
    shutil.rmtree(STANDIN_STATE, ignore_errors=True)
    for tool in TOOLS.values():
        if is_standin(tool):
            tool.unlink()
    for path in added:
        lines = [line for line in path.read_text().splitlines() if line != SUBORDINATE_IDS]
        path.write_text("".join(f"{line}\n" for line in lines))


def remove_container(vmid):
    """Removes a test's container, also one left by a run that died (the stand-in marks
    its containers with a pct.conf; any other container of that name is not touched)."""
    container = Path("/var/lib/lxc") / str(vmid)
    if not container.exists():
        return
    if not (container / "pct.conf").exists():
        pytest.fail(f"{container} exists and was not made by the pct stand-in: not touching it")
    run("lxc-stop", "-n", vmid, "-k", check=False, timeout=60)
    shutil.rmtree(container)


def storage_layout(text):
    """The node's storages, as /etc/pve/storage.cfg lists them."""
    STANDIN_STATE.mkdir(parents=True, exist_ok=True)
    (STANDIN_STATE / "storage.cfg").write_text(text)


def pct(*args, check=True, timeout=120):
    return run(PCT, *map(str, args), check=check, timeout=timeout)


# -- the network ----------------------------------------------------------------------------


def make_bridge():
    """The containers' network: a bridge with the gateway's address, this machine's side.
    Returns whether it was made here (and so is to be removed)."""
    addresses = run("ip", "-o", "-4", "addr", "show").stdout
    taken = [line for line in addresses.splitlines() if f" {GATEWAY.rsplit('.', 1)[0]}." in line]
    if any(f" {BRIDGE} " not in line for line in taken):
        pytest.skip(f"10.250.77.0/24 is in use on this machine: {taken}")
    created = run("ip", "link", "show", BRIDGE, check=False).returncode != 0
    if created:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
    if not taken:
        run("ip", "addr", "add", f"{GATEWAY}/{PREFIX}", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    return created


def listening(port, host="127.0.0.1"):
    with socket.socket() as probe:
        return probe.connect_ex((host, port)) == 0


def start_dhcp_server(directory):
    """dnsmasq handing out addresses on the test's bridge only (no DNS: port 0)."""
    leases = directory / "dnsmasq.leases"
    command = [
        "/usr/sbin/dnsmasq", "--keep-in-foreground", "--port=0", f"--interface={BRIDGE}", "--bind-interfaces",
        "--except-interface=lo", "--dhcp-range=10.250.77.100,10.250.77.150,255.255.255.0,1h",
        f"--dhcp-leasefile={leases}", f"--pid-file={directory / 'dnsmasq.pid'}", "--log-dhcp",
        # No ping of an address before offering it: dnsmasq does not answer a new
        # client's first DHCPDISCOVER while it waits for that ping, and every container
        # then waited for its client's next one. The range is the test bridge's alone.
        "--no-ping",
    ]  # fmt: skip
    log = (directory / "dnsmasq.log").open("ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    if not wait_for(lambda: process.poll() is not None or Path(directory / "dnsmasq.pid").exists(), 20):
        stop_process(process, 5)
    if process.poll() is not None:
        pytest.fail(f"dnsmasq on {BRIDGE} did not start:\n{(directory / 'dnsmasq.log').read_text()}", pytrace=False)
    return process


# -- the node's SSH server --------------------------------------------------------------------


def start_sshd(directory):
    """An sshd of the test's own on a loopback port: its own host key, config and
    authorized key, so the machine's own SSH setup and root's ~/.ssh are left alone."""
    for name in ("host_key", "client_key"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "agent-comms-e2e", "-f", directory / name)
    (directory / "authorized_keys").write_text((directory / "client_key.pub").read_text())
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host_key'}\n"
        # Root's key in the test's own file; another user's in its own home (sshd reads a
        # user's authorized keys as that user, who cannot read the test's directory).
        f"AuthorizedKeysFile {directory / 'authorized_keys'} .ssh/authorized_keys\nPidFile {directory / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\n"
    )
    host_key = (directory / "host_key.pub").read_text().split()
    known = f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n"
    (directory / "known_hosts").write_text(known)
    privsep = Path("/run/sshd")
    made_privsep = not privsep.exists()
    privsep.mkdir(mode=0o755, exist_ok=True)
    log = (directory / "sshd.log").open("ab")
    process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", config], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    if not wait_for(lambda: process.poll() is not None or listening(port), 20) or process.poll() is not None:
        if process.poll() is None:
            stop_process(process, 5)
        log = (directory / "sshd.log").read_text()
        pytest.fail(
            f"the test's sshd did not listen on 127.0.0.1:{port} (exit {process.returncode}):\n{log}", pytrace=False
        )
    return {
        "process": process, "port": port, "key": directory / "client_key", "known_hosts": directory / "known_hosts",
        "known_line": known, "made_privsep": made_privsep, "directory": directory,
    }  # fmt: skip


def stop_sshd(sshd):
    stop_process(sshd["process"], 20)
    if sshd["made_privsep"]:
        shutil.rmtree("/run/sshd", ignore_errors=True)


# -- make, as a user runs it ----------------------------------------------------------------------


def ansible_failures(output):
    """The tasks that failed in ansible-playbook's output, each with its error: the part of
    a long output that says what broke."""
    blocks = re.split(r"\n(?=TASK \[|RUNNING HANDLER \[|PLAY RECAP)", output)
    failed = [block.strip()[:4000] for block in blocks if re.search(r"^(fatal|failed): ", block, re.MULTILINE)]
    return "\n\n".join(failed)


def recap(output):
    """{host: {'ok': n, 'changed': n, ...}} from ansible-playbook's PLAY RECAP."""
    lines = output[output.rindex("PLAY RECAP") :].splitlines()[1:]
    return {
        line.split()[0]: {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line)}
        for line in lines
        if re.search(r"\bok=\d+", line)
    }


def words(text):
    """Text with its white space folded: Ansible's YAML output folds long lines."""
    return " ".join(text.split())


class Make:
    """The Makefile's targets, as a user runs them, against a test inventory, with a home
    directory of the test's own (HOME: ~/.ssh/known_hosts, where the pct connection looks
    for the node's host key)."""

    def __init__(self, inventory, backups, control_path_dir, vault_password_file, home):
        self.backups = backups
        self.home = home
        self.variables = [
            f"INVENTORY={inventory}",
            f"WHEELHOUSE={WHEELHOUSE}",
            f"BACKUPS={backups}",
            f"VAULT_PASSWORD_FILE={vault_password_file}",
        ]
        self.control_path_dir = control_path_dir
        self.env = {
            **os.environ,
            "HOME": str(home),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            # Ansible's persistent SSH connections to the node, in a directory of the test's.
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_path_dir),
        }

    def __call__(self, target, *variables, timeout=300, check=True):
        result = run("make", target, *self.variables, *variables, env=self.env, timeout=timeout, check=False)
        if check and result.returncode != 0:
            detail = (
                ansible_failures(result.stdout) or f"{last_lines(result.stdout, 40)}\n{last_lines(result.stderr, 20)}"
            )
            pytest.fail(f"make {target} {' '.join(variables)} exited {result.returncode}:\n{detail}", pytrace=False)
        return result.stdout if check else result

    def fails(self, target, *variables, timeout=300):
        """Runs a target that must fail; returns its failing tasks' output, folded."""
        result = self(target, *variables, timeout=timeout, check=False)
        assert result.returncode != 0, f"make {target} {' '.join(variables)} did not fail:\n{result.stdout[-3000:]}"
        return words(ansible_failures(result.stdout) or result.stdout + result.stderr)

    def close_connections(self):
        for socket_path in self.control_path_dir.glob("*"):
            run("ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "node", check=False, timeout=30)


# -- inside a container ---------------------------------------------------------------------------


class PctBackend(BaseBackend):
    """testinfra in a container through `pct exec` on its node, as Ansible reaches it
    (testinfra's own lxc:// backend drives LXD's `lxc exec`, not LXC's)."""

    NAME = "pct"

    def __init__(self, vmid, *args, **kwargs):
        self.vmid = str(vmid)
        super().__init__(self.vmid, *args, **kwargs)

    def run(self, command, *args, **kwargs):
        command = self.get_command(command, *args)
        # --keep-env 0: the test's own environment (AGENT_COMMS_BROKER...) stays out.
        out = self.run_local(f"{PCT} exec %s --keep-env 0 -- /bin/sh -c %s", self.vmid, command)
        out.command = self.encode(command)
        return out
