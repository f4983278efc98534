"""Proxmox end to end: `make deploy` with a test inventory creates a real Debian 12 LXC
container with systemd and deploys the broker into it, the way it does CT-950 on the
homelab's Proxmox node; then the day-2 targets run against it.

After the day-2 targets, a second deploy turns on what issue 5 added, the way a user
would: auth `required`, HTTPS with a certificate from a throwaway CA, and two tokens whose
secrets (and the TLS key) are ansible-vault encrypted in host_vars beside the inventory.

This machine stands in for the Proxmox node: Ansible reaches it over SSH on loopback (an
sshd of the test's own, with a key of its own), and finds a `pct` and `pveam` there:
tests/e2e/pct_standin.py, which does what pve-container does on plain LXC (lxc-start,
lxc-attach...), installed as /usr/sbin/pct and /usr/sbin/pveam for the test only. The
template `pveam download` fetches is one the test builds first, as Proxmox builds its own:
Debian 12 from debootstrap (this machine's mirror) packed as a .tar.zst, with python3, venv,
systemd, sshd and iproute2, since the container reaches no mirror later. The container
sits on a bridge and subnet the test makes (acbr0, 10.250.77.0/24). Nothing is sent
anywhere else.

Needs root on Debian; installs what is missing (checked by the files it uses: lxc,
debootstrap, zstd, openssh-server, openssl) and removes what it made at the end: the
container, the bridge, the stand-ins, the sshd and its keys. It keeps caches for the next
run: the template and debootstrap's downloads (/var/cache/agent-comms-e2e) and the
wheelhouse (build/e2e-wheelhouse).

The tests are steps of one deployment: if a step fails (tools, template, bridge, deploy),
its error says what broke and the tests after it stop with one line each
(tests/e2e/conftest.py).
"""

import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from debian_rootfs import CACHE, debootstrap, debootstrap_command
from host_commands import ROOT, last_lines, require_files, run, stop_process, wait_for, wait_until
from pct_standin import REPOSITORY
from steps import setup_takes_up_to
from testinfra.backend.base import BaseBackend
from testinfra.host import Host

from broker_process import free_port
from legacy_broker import legacy_database

BIN = Path(sys.executable).parent
STANDIN = Path(__file__).with_name("pct_standin.py")
STANDIN_MARK = "Stand-ins for Proxmox's `pct` and `pveam`"
TOOLS = [Path("/usr/sbin/pct"), Path("/usr/sbin/pveam")]
STANDIN_STATE = Path("/var/lib/pct-standin")
WHEELHOUSE = ROOT / "build" / "e2e-wheelhouse"

BRIDGE = "acbr0"
GATEWAY = "10.250.77.1"
PREFIX = 24
CT_IP = "10.250.77.50"
VMID = 9950
HOST = "broker-e2e"
URL = f"http://{CT_IP}:8080"
SECURE_URL = f"https://{CT_IP}:8080"
SERVICE = "agent-comms-broker"
ADMIN = ["runuser", "-u", "agent-comms", "--", "/opt/agent-comms/venv/bin/agent-comms-broker"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creates LXC containers and a bridge: needs root"),
    pytest.mark.skipif(not Path("/etc/debian_version").exists(), reason="needs Debian (apt, debootstrap)"),
]

# What this machine needs as the Proxmox node, by the file used, with the package that
# brings it (checked by file: a package can be there without what a test runs).
NODE_FILES = {
    "/usr/bin/lxc-start": "lxc",
    "/usr/bin/lxc-attach": "lxc",
    "/usr/share/lxc/config/common.conf": "lxc",  # the stand-in's LXC config includes it
    "/usr/sbin/debootstrap": "debootstrap",  # builds the template
    "/usr/bin/zstd": "zstd",  # packs and unpacks it: a .tar.zst, as Proxmox's
    "/usr/bin/ip": "iproute2",  # the bridge
    "/usr/sbin/sshd": "openssh-server",  # Ansible reaches "the node" over SSH
    "/usr/bin/ssh": "openssh-client",
    "/usr/bin/ssh-keygen": "openssh-client",  # the test's keys, the container's host keys
    "/usr/bin/openssl": "openssl",  # the throwaway CA of the secure deploy
}

# What the container needs from its template, likewise: it reaches no mirror, so it all
# comes in the template (Proxmox's own has no python3; the role would apt-get it there).
TEMPLATE_FILES = {
    "/sbin/init": "systemd-sysv",  # systemd as PID 1
    "/usr/bin/python3": "python3",  # Ansible's modules, broker.py's stand-in, chat.py
    "/usr/lib/python3.11/ensurepip/__init__.py": "python3-venv",  # the broker's venv
    "/usr/sbin/sshd": "openssh-server",  # agent_comms_connection=ssh
    "/usr/sbin/ifup": "ifupdown",  # the /etc/network/interfaces pct writes
    "/usr/bin/ip": "iproute2",
    "/usr/bin/ss": "iproute2",  # the test waits for broker.py's port with it
    "/usr/bin/ps": "procps",  # the test lists the broker's processes
}
# The template the role creates the container from (its default).
TEMPLATE = yaml.safe_load((ROOT / "ansible/roles/proxmox_lxc/defaults/main.yml").read_text())["proxmox_lxc_template"]


def unique(text):
    return f"{text} {uuid.uuid4().hex[:8]}"


# -- the stand-in Proxmox node -------------------------------------------------------------


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def host_tools():
    """LXC, debootstrap, zstd, sshd and openssl on this machine, from apt if missing."""
    require_files(NODE_FILES, "the LXC end-to-end test")


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def template(host_tools):
    """The template the role asks for, on the stand-in's appliance server (REPOSITORY):
    Debian 12 from debootstrap with TEMPLATE_FILES, packed as Proxmox packs its templates
    (a .tar.zst of the root file system, without SSH host keys, which `pct create` makes
    for each container, and without package caches). Built once, then kept until the
    recipe changes."""
    archive = REPOSITORY / TEMPLATE
    recipe_file = archive.with_name(f"{archive.name}.recipe")
    recipe = json.dumps({"debootstrap": debootstrap_command("ROOTFS", TEMPLATE_FILES), "files": TEMPLATE_FILES})
    if archive.exists() and recipe_file.exists() and recipe_file.read_text() == recipe:
        return archive
    REPOSITORY.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="template-", dir=CACHE) as work:
        rootfs = Path(work, "rootfs")
        debootstrap(rootfs, TEMPLATE_FILES)
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


@pytest.fixture(scope="module")
def bridge(host_tools):
    """The container's network: a bridge with the gateway's address, this machine's side."""
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
    yield BRIDGE
    if created:
        run("ip", "link", "delete", BRIDGE, check=False)


def is_standin(path):
    return path.exists() and STANDIN_MARK in path.read_text(errors="replace")


def remove_container():
    """Removes the test's container, also one left by a run that died (the stand-in marks
    its containers with a pct.conf; any other container of that name is not touched)."""
    container = Path("/var/lib/lxc") / str(VMID)
    if not container.exists():
        return
    if not (container / "pct.conf").exists():
        pytest.fail(f"{container} exists and was not made by the pct stand-in: not touching it")
    run("lxc-stop", "-n", VMID, "-k", check=False, timeout=60)
    run("lxc-destroy", "-n", VMID, timeout=120)


@pytest.fixture(scope="module")
def standin(host_tools):
    """pct and pveam stand-ins at the paths Ansible's pct connection and the role call."""
    for tool in TOOLS:
        if tool.exists() and not is_standin(tool):
            pytest.skip(f"{tool} is a real Proxmox tool: this test only runs where there is none")
    for tool in TOOLS:
        shutil.copyfile(STANDIN, tool)
        tool.chmod(0o755)
    remove_container()
    shutil.rmtree(STANDIN_STATE, ignore_errors=True)
    yield
    remove_container()
    shutil.rmtree(STANDIN_STATE, ignore_errors=True)
    for tool in TOOLS:
        if is_standin(tool):
            tool.unlink()


@pytest.fixture(scope="module")
def sshd(host_tools, tmp_path_factory):
    """An sshd of the test's own on a loopback port: its own host key, config and
    authorized key, so the machine's own SSH setup and root's ~/.ssh are left alone."""
    directory = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "agent-comms-e2e", "-f", directory / name)
    (directory / "authorized_keys").write_text((directory / "client_key.pub").read_text())
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host_key'}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\nPidFile {directory / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\n"
    )
    host_key = (directory / "host_key.pub").read_text().split()
    (directory / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    privsep = Path("/run/sshd")
    made_privsep = not privsep.exists()
    privsep.mkdir(mode=0o755, exist_ok=True)
    log = (directory / "sshd.log").open("ab")
    process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", config], stdout=log, stderr=subprocess.STDOUT)
    log.close()

    def listening():
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    if not wait_for(lambda: process.poll() is not None or listening(), 20) or process.poll() is not None:
        if process.poll() is None:
            stop_process(process, 5)
        log = (directory / "sshd.log").read_text()
        pytest.fail(
            f"the test's sshd did not listen on 127.0.0.1:{port} (exit {process.returncode}):\n{log}", pytrace=False
        )
    yield {"port": port, "key": directory / "client_key", "known_hosts": directory / "known_hosts"}
    stop_process(process, 20)
    if made_privsep:
        shutil.rmtree(privsep, ignore_errors=True)


@pytest.fixture(scope="module")
def inventory(sshd, tmp_path_factory):
    """The homelab inventory's shape, pointing at this machine's test hosts."""
    path = tmp_path_factory.mktemp("inventory") / "e2e.yml"
    inventory = {
        "all": {
            "vars": {"ansible_private_key_file": str(sshd["key"])},
            "children": {
                "proxmox": {
                    "hosts": {
                        "node": {
                            "ansible_host": "127.0.0.1",
                            "ansible_port": sshd["port"],
                            "ansible_user": "root",
                            "ansible_ssh_common_args": f"-o UserKnownHostsFile={sshd['known_hosts']}",
                            # Debian's Python, not whatever else is first on root's PATH.
                            "ansible_python_interpreter": "/usr/bin/python3",
                        }
                    }
                },
                "agent_comms": {
                    "hosts": {
                        HOST: {
                            # The pct connection (paramiko) reads only ~/.ssh/known_hosts:
                            # the test's sshd on loopback is not in it.
                            "ansible_paramiko_host_key_checking": False,
                            # Only for agent_comms_connection=ssh: a new container, a new key.
                            "ansible_ssh_common_args": "-o StrictHostKeyChecking=accept-new "
                            f"-o UserKnownHostsFile={sshd['known_hosts']}.containers",
                            "proxmox_lxc_node": "node",
                            "proxmox_lxc_vmid": VMID,
                            "proxmox_lxc_hostname": "agent-comms-e2e",
                            "proxmox_lxc_ip": f"{CT_IP}/{PREFIX}",
                            "proxmox_lxc_gateway": GATEWAY,
                            "proxmox_lxc_bridge": BRIDGE,
                            "proxmox_lxc_cores": 2,
                            "proxmox_lxc_memory": 1024,
                            "proxmox_lxc_swap": 512,
                            "proxmox_lxc_disk": 4,
                            "proxmox_lxc_onboot": True,
                            # DNS to the test's own bridge (nothing answers): never the
                            # servers of this machine, which Proxmox would copy in.
                            "proxmox_lxc_nameserver": GATEWAY,
                            "agent_comms_broker_replaces": [LEGACY_UNIT],
                        }
                    }
                },
                "agent_chat_clients": {"hosts": {HOST: None}},
            },
        }
    }
    path.write_text(json.dumps(inventory, indent=2))  # JSON is YAML
    return path


class Make:
    """The Makefile's targets, as a user runs them, against the test inventory."""

    def __init__(self, inventory, backups, control_path_dir, vault_password_file):
        self.backups = backups
        self.variables = [
            f"INVENTORY={inventory}",
            f"WHEELHOUSE={WHEELHOUSE}",
            f"BACKUPS={backups}",
            f"VAULT_PASSWORD_FILE={vault_password_file}",
        ]
        self.control_path_dir = control_path_dir
        self.env = {
            **os.environ,
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

    def close_connections(self):
        for socket_path in self.control_path_dir.glob("*"):
            run("ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "node", check=False, timeout=30)


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


@pytest.fixture(scope="module")
def vault_password_file(tmp_path_factory):
    """The ansible-vault password, in a file only root reads, as a user keeps it."""
    path = tmp_path_factory.mktemp("vault") / "password"
    path.write_text(uuid.uuid4().hex + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def make(inventory, vault_password_file, tmp_path_factory):
    backups, control_paths = tmp_path_factory.mktemp("backups"), tmp_path_factory.mktemp("cp")
    make = Make(inventory, backups, control_paths, vault_password_file)
    yield make
    make.close_connections()


# What CT-950 ran before: broker.py as root on port 8080, with its database.
LEGACY_UNIT = "broker-py.service"
LEGACY_MESSAGES = [
    ("general", "warp-ct200", "Hello from agent!", "2025-08-03 18:42:28"),
    ("tasks", "warp-ct200", "Task completed successfully", "2025-08-03 18:42:29"),
    ("general", "monitor", "CPU usage: 45%", "2025-08-03 18:43:00"),
]


def install_legacy_broker(tmp_path):
    """Into the bare container: broker.py's database (root's, 0644) and a root service
    holding port 8080, as on CT-950 before the first deploy."""
    pct = TOOLS[0]
    legacy_database(tmp_path / "messages.db", LEGACY_MESSAGES)
    unit = tmp_path / LEGACY_UNIT
    unit.write_text(
        "[Service]\nExecStart=/usr/bin/python3 -m http.server 8080\nWorkingDirectory=/tmp\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    run(pct, "exec", VMID, "--", "mkdir", "-p", "/opt/agent-comms")
    run(pct, "push", VMID, tmp_path / "messages.db", "/opt/agent-comms/messages.db", "--perms", "0644")
    run(pct, "push", VMID, unit, f"/etc/systemd/system/{LEGACY_UNIT}", "--perms", "0644")
    run(pct, "exec", VMID, "--", "systemctl", "enable", "--now", LEGACY_UNIT)

    def listening():
        return ":8080 " in run(pct, "exec", VMID, "--", "ss", "-ltn", check=False).stdout

    def failure():
        status = run(pct, "exec", VMID, "--", "systemctl", "status", "--no-pager", LEGACY_UNIT, check=False)
        ports = run(pct, "exec", VMID, "--", "ss", "-ltn", check=False)
        return (
            f"broker.py's stand-in ({LEGACY_UNIT}) did not listen on port 8080 within 30 s:\n"
            f"{status.stdout}{status.stderr}\n{ports.stdout}{ports.stderr}"
        )

    wait_until(listening, 30, failure)


@pytest.fixture(scope="module")
@setup_takes_up_to(1200)
def deployed(template, bridge, standin, make, tmp_path_factory):
    """The container as the homelab has it (`make provision`, then broker.py's leftovers),
    then the first `make deploy`."""
    make("provision", timeout=600)
    install_legacy_broker(tmp_path_factory.mktemp("legacy"))
    output = make("deploy", timeout=900)
    assert all(counts["failed"] == 0 and counts["unreachable"] == 0 for counts in recap(output).values()), output
    return output


@pytest.fixture(scope="module", autouse=True)
def deployed_first(deployed):
    """Every test of this module checks the deployment, so none runs unless it worked: a
    test would otherwise send to the container's address with no bridge to keep that
    traffic on this machine."""


# -- checks inside the container -----------------------------------------------------------


class PctBackend(BaseBackend):
    """testinfra in the container through `pct exec` on its node, as Ansible reaches it
    (testinfra's own lxc:// backend drives LXD's `lxc exec`, not LXC's)."""

    NAME = "pct"

    def __init__(self, vmid, *args, **kwargs):
        self.vmid = str(vmid)
        super().__init__(self.vmid, *args, **kwargs)

    def run(self, command, *args, **kwargs):
        command = self.get_command(command, *args)
        # --keep-env 0: the test's own environment (AGENT_COMMS_BROKER...) stays out.
        out = self.run_local("/usr/sbin/pct exec %s --keep-env 0 -- /bin/sh -c %s", self.vmid, command)
        out.command = self.encode(command)
        return out


@pytest.fixture(scope="module")
def ct(deployed):
    return Host(PctBackend(VMID))


def unit(ct, *properties):
    output = ct.check_output("systemctl show %s --property=%s", SERVICE, ",".join(properties))
    return dict(line.split("=", 1) for line in output.splitlines())


def chat(*args, timeout=60):
    """The real agent-chat of this checkout, on this machine, across the bridge."""
    env = {**os.environ, "AGENT_COMMS_BROKER": URL}
    command = [BIN / "agent-chat", "--broker", URL, "--agent-id", "e2e-lxc-host", *args]
    return run(*command, env=env, timeout=timeout).stdout


def messages(channel):
    lines = chat("read", channel, "--limit", "1000", "--json").splitlines()
    return [json.loads(line)["message"] for line in lines]


# -- the tests: in the order a person would go -------------------------------------------


def test_deploy_creates_the_container_as_asked(deployed, ct):
    config = run(TOOLS[0], "config", VMID).stdout
    for line in [
        "cores: 2",
        "memory: 1024",
        "swap: 512",
        "onboot: 1",
        "unprivileged: 1",
        "features: nesting=1",
        "hostname: agent-comms-e2e",
        f"ip={CT_IP}/{PREFIX}",
        f"bridge={BRIDGE}",
        f"gw={GATEWAY}",
    ]:
        assert line in config, config
    assert run(TOOLS[0], "status", VMID).stdout.strip() == "status: running"
    assert ct.check_output("hostname") == "agent-comms-e2e"
    assert f"{CT_IP}/{PREFIX}" in ct.check_output("ip -o -4 addr show dev eth0")
    assert ct.check_output("systemctl is-system-running || true") in ("running", "degraded")


def test_deploy_replaces_broker_py_and_keeps_its_messages(ct):
    legacy = ct.service(LEGACY_UNIT)
    assert not legacy.is_running and not legacy.is_enabled
    rows = [json.loads(line) for line in chat("read", "general", "--limit", "1000", "--json").splitlines()]
    old = [(row["id"], row["sender"], row["message"]) for row in rows if row["id"] <= len(LEGACY_MESSAGES)]
    assert old == [(1, "warp-ct200", "Hello from agent!"), (3, "monitor", "CPU usage: 45%")]
    assert rows[0]["timestamp"] == 1754246548.0  # 2025-08-03 18:42:28 UTC
    assert "Task completed successfully" in messages("tasks")


def test_broker_service_runs_hardened_as_its_own_user(ct):
    service = ct.service(SERVICE)
    assert service.is_enabled
    assert service.is_running
    assert ct.socket("tcp://0.0.0.0:8080").is_listening

    properties = unit(
        ct,
        "Type",
        "User",
        "MainPID",
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ReadWritePaths",
        "RestrictSUIDSGID",
        "CapabilityBoundingSet",
        "MemoryDenyWriteExecute",
        "Restart",
        "UMask",
        "LimitNOFILE",
    )
    expected = {
        "Type": "notify",
        "User": "agent-comms",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ReadWritePaths": "/opt/agent-comms",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "Restart": "on-failure",
        "UMask": "0077",
        # Every connection is an open file: room for 4,096 per worker, not systemd's 1,024.
        "LimitNOFILE": "65536",
    }
    assert {name: properties[name] for name in expected} == expected

    # gunicorn's master and both workers, all as the broker's user.
    processes = [line.split(None, 1) for line in ct.check_output("ps -ww -eo user:20=,args=").splitlines()]
    users = [user for user, command in processes if "agent-comms-broker serve" in command]
    assert len(users) >= 3 and set(users) == {"agent-comms"}, processes
    assert ct.user("agent-comms").shell == "/usr/sbin/nologin"


def test_files_have_tight_permissions(ct):
    chat("send", "e2e-permissions", "make sure the database is written")
    db = ct.file("/opt/agent-comms/messages.db")
    assert db.exists and db.user == "agent-comms" and db.mode == 0o600
    home = ct.file("/opt/agent-comms")
    assert (home.user, home.group, home.mode) == ("root", "agent-comms", 0o1775)
    venv = ct.file("/opt/agent-comms/venv")
    assert (venv.user, venv.mode) == ("root", 0o755)
    env = ct.file("/etc/agent-comms/broker.env")
    assert (env.user, env.group, env.mode) == ("root", "agent-comms", 0o640)
    assert "AGENT_COMMS_DB=/opt/agent-comms/messages.db" in env.content_string
    assert "AGENT_COMMS_MAX_DATABASE=6g" in env.content_string.splitlines()  # group_vars, for an 8 GiB disk
    # The service cannot write its own code: ProtectSystem plus ownership.
    assert ct.run("runuser -u agent-comms -- touch /opt/agent-comms/venv/x").rc != 0


def test_agent_chat_sends_and_reads_across_the_bridge():
    first, second = unique("Download media file: movie.mkv"), unique("✅ Download completed")
    ids = [int(chat("send", "e2e-tasks", text)) for text in (first, second)]
    assert ids[1] > ids[0]
    assert messages("e2e-tasks")[-2:] == [first, second]
    assert "e2e-tasks" in chat("channels")
    assert requests.get(f"{URL}/healthz", timeout=5).json() == {"status": "ok"}


def test_agent_chat_in_the_container_uses_the_written_config(ct):
    assert ct.file("/etc/agent-comms/chat.ini").contains(f"broker = {URL}")
    text = unique("from inside the container")
    ct.check_output("agent-chat send e2e-inside %s", text)
    assert text in messages("e2e-inside")


def test_old_chat_py_entry_point_works_with_system_python(ct):
    text = unique("from chat.py")
    ct.check_output("python3 /opt/agent-comms/chat.py send e2e-inside %s", text)
    assert text in messages("e2e-inside")


def test_restart_reloads_gracefully_and_keeps_every_message(ct, make):
    before = [unique(f"before restart {n}") for n in range(20)]
    for text in before:
        chat("send", "e2e-restart", text)
    master = unit(ct, "MainPID")["MainPID"]

    # Posts keep coming during the reload: none may be refused or lost.
    during, failures, stop = [], [], threading.Event()

    def post_while_restarting():
        while not stop.is_set() and len(during) < 2000:
            text = unique("during restart")
            try:
                response = requests.post(
                    f"{URL}/messages/e2e-restart", json={"sender": "e2e", "message": text}, timeout=10
                )
                (during if response.status_code == 201 else failures).append(text)
            except requests.RequestException as error:
                failures.append(repr(error))
            time.sleep(0.02)

    poster = threading.Thread(target=post_while_restarting)
    poster.start()
    try:
        make("restart")
    finally:
        stop.set()
        poster.join(30)
    assert failures == []
    assert len(during) > 10
    assert unit(ct, "MainPID")["MainPID"] == master, "a reload keeps gunicorn's master"
    kept = messages("e2e-restart")
    assert set(before + during) <= set(kept)


def test_logs_show_the_requests(make):
    channel = f"e2e-logs-{uuid.uuid4().hex[:6]}"
    chat("send", channel, "a request for the journal")
    output = make("logs", "LINES=200")
    assert f"POST /messages/{channel}" in output, output


@pytest.mark.timeout(300)  # waits up to 150 s for the journal
def test_logs_follow_shows_new_requests_live(make):
    channel = f"e2e-follow-{uuid.uuid4().hex[:6]}"
    follow = subprocess.Popen(
        ["make", "logs", "FOLLOW=1", "LINES=1", *make.variables],
        cwd=ROOT,
        env=make.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(follow.stdout), daemon=True)
    reader.start()
    try:
        # The playbook first writes the command; then the journal streams.
        wait_until(
            lambda: any("agent-comms-broker[" in line for line in lines),
            120,
            lambda: "make logs FOLLOW=1 showed no line of the broker's journal within 120 s:\n" + "".join(lines[-40:]),
        )
        chat("send", channel, "seen live")
        wait_until(
            lambda: any(f"POST /messages/{channel}" in line for line in lines),
            30,
            lambda: f"make logs FOLLOW=1 did not show POST /messages/{channel} within 30 s:\n" + "".join(lines[-40:]),
        )
    finally:
        os.killpg(follow.pid, 15)
        follow.wait(30)


def test_status_shows_service_and_broker(make):
    output = make("status")
    assert "status: running" in output  # the container, from pct
    assert "active (running)" in output  # the service
    assert '"messages":' in output  # the broker's /status


@pytest.mark.timeout(300)  # three playbooks
def test_backup_and_restore(ct, make, tmp_path):
    kept = unique("in the backup")
    chat("send", "e2e-backup", kept)
    make("backup")
    files = sorted(make.backups.glob(f"{HOST}-messages-*.db"))
    assert len(files) == 1, files
    with sqlite3.connect(files[0]) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("SELECT count(*) FROM messages WHERE message = ?", (kept,)).fetchone()[0] == 1

    later = unique("after the backup")
    chat("send", "e2e-backup", later)
    make("restore", f"BACKUP={files[0]}")
    restored = messages("e2e-backup")
    assert kept in restored
    assert later not in restored
    # The replaced database is kept beside the restored one; the new one is the broker's.
    assert ct.run("ls /opt/agent-comms/messages.db.before-restore-*").rc == 0
    db = ct.file("/opt/agent-comms/messages.db")
    assert db.user == "agent-comms" and db.mode == 0o600

    # A file that is not a database is refused, and the broker keeps running.
    bogus = tmp_path / "not-a-database.db"
    bogus.write_text("hello")
    failed = make("restore", f"BACKUP={bogus}", check=False)
    assert failed.returncode != 0
    # Long lines of Ansible's YAML output are folded: compare words, not lines.
    assert "not an agent-comms database" in " ".join((failed.stdout + failed.stderr).split())
    assert kept in messages("e2e-backup")


def test_stop_and_start(ct, make):
    make("stop")
    assert not ct.service(SERVICE).is_running
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{URL}/healthz", timeout=5)
    make("start")
    assert ct.service(SERVICE).is_running
    assert requests.get(f"{URL}/healthz", timeout=5).status_code == 200


# -- security: auth `required`, HTTPS and vaulted tokens, by a second deploy ----------------

# The agent user in the container whose token agent-chat installs, and the tokens: one
# that may post to e2e-* channels, one that may only read.
AGENT_USER = "warp"
WRITER, READER = "e2e-warp", "e2e-reader"


def make_certificates(directory):
    """A throwaway CA and a server certificate for the container's address, with openssl."""

    def openssl(*args):
        run("openssl", *args, cwd=directory)

    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=agent-comms e2e CA", "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-subj", f"/CN={CT_IP}", "-keyout", "server.key", "-out", "server.csr",
    )  # fmt: skip
    (directory / "server.ext").write_text(
        f"subjectAltName = IP:{CT_IP}\nextendedKeyUsage = serverAuth\nbasicConstraints = CA:FALSE\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "server.ext", "-out", "server.pem",
    )  # fmt: skip
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


def admin(*args, secret=None):
    """agent-comms-broker's admin command in the container, as the broker's user."""
    command = [TOOLS[0], "exec", VMID, "--", *ADMIN, *args, "--db", "/opt/agent-comms/messages.db"]
    return run(*command, input=secret).stdout


def vaulted(agent):
    """The token's secret as the vars refer to it: a variable of the vault file."""
    return f"{{{{ vault_e2e_tokens['{agent}'] }}}}"


def tokens_by_agent():
    return {token["agent"]: token for token in json.loads(admin("token", "list", "--json"))}


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def secured(ct, make, inventory, vault_password_file, tmp_path_factory):
    """The running broker switched to auth `required`, HTTPS and two tokens by `make
    deploy`, set up as the role's defaults/main.yml tells a user to: the secrets and the
    TLS key encrypted with ansible-vault (a vault file beside plain vars in host_vars/,
    here beside the test inventory), the certificate and CA as files on the controller.

    Before it, the broker gets two tokens of its own: one an earlier deploy registered
    (note "ansible") that the inventory no longer lists, and one made by hand."""
    ca, certificate, key = make_certificates(tmp_path_factory.mktemp("tls"))
    secrets = {agent: f"e2e-{agent}-{uuid.uuid4().hex}" for agent in (WRITER, READER, "e2e-gone")}
    host_vars = inventory.parent / "host_vars" / HOST
    host_vars.mkdir(parents=True)
    (host_vars / "vault.yml").write_text(
        "vault_e2e_tokens:\n" + "".join(f"  {agent}: {secrets[agent]}\n" for agent in (WRITER, READER))
    )
    (host_vars / "main.yml").write_text(
        json.dumps(
            {
                "agent_comms_broker_auth": "required",
                "agent_comms_broker_tls_cert": str(certificate),
                "agent_comms_broker_tls_key": str(key),
                "agent_comms_broker_tls_ca": str(ca),
                "agent_comms_broker_tokens": [
                    {"agent": WRITER, "secret": vaulted(WRITER), "write": "e2e-*"},
                    {"agent": READER, "secret": vaulted(READER), "write": "", "note": "read-only"},
                ],
                "agent_chat_client_token": vaulted(WRITER),
                "agent_chat_client_user": AGENT_USER,
            },
            indent=2,
        )
    )
    run(BIN / "ansible-vault", "encrypt", "--vault-password-file", vault_password_file, host_vars / "vault.yml", key)
    assert "$ANSIBLE_VAULT" in key.read_text()

    ct.check_output("useradd --create-home --shell /bin/bash %s", AGENT_USER)
    admin("token", "add", "e2e-gone", "--note", "ansible", "--secret-stdin", secret=secrets["e2e-gone"])
    admin("token", "add", "e2e-hand", "--note", "made by hand")

    # -v --diff: what a user would look at must not show a secret either.
    output = make("deploy", "ARGS=-v --diff", timeout=900)
    assert all(counts["failed"] == 0 for counts in recap(output).values()), output
    return {"output": output, "secrets": secrets, "ca": ca, "key": key}


def secure_chat(*args, token=None, ca=True, secured):
    """This checkout's agent-chat, on this machine, against the HTTPS broker: with the CA
    and a token if given; no other setting leaks in from the environment or a config file."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AGENT_COMMS_", "REQUESTS_CA"))}
    env["AGENT_COMMS_CONFIG"] = os.devnull  # no config file of this machine's
    command = [BIN / "agent-chat", "--broker", SECURE_URL]
    command += ["--ca", secured["ca"]] if ca else []
    command += ["--token", secured["secrets"][token]] if token else []
    return run(*command, *args, env=env, timeout=60, check=False)


def test_secure_deploy_registers_the_listed_tokens_and_revokes_the_unlisted(secured):
    assert recap(secured["output"])[HOST]["changed"] > 0
    for secret in secured["secrets"].values():
        assert secret not in secured["output"]
    assert "BEGIN PRIVATE KEY" not in secured["output"]

    tokens = tokens_by_agent()
    grants = {agent: {key: tokens[agent][key] for key in ("state", "read", "write", "note")} for agent in tokens}
    assert grants[WRITER] == {"state": "active", "read": "*", "write": "e2e-*", "note": "ansible"}
    assert grants[READER] == {"state": "active", "read": "*", "write": "", "note": "ansible: read-only"}
    assert tokens["e2e-gone"]["state"] == "revoked"
    assert tokens["e2e-hand"]["state"] == "active"


def test_secure_files_are_in_place_with_tight_modes(ct, secured):
    env = ct.file("/etc/agent-comms/broker.env").content_string
    for line in [
        "AGENT_COMMS_AUTH=required",
        "AGENT_COMMS_TLS_CERT=/etc/agent-comms/tls/cert.pem",
        "AGENT_COMMS_TLS_KEY=/etc/agent-comms/tls/key.pem",
    ]:
        assert line in env.splitlines(), env
    tls = ct.file("/etc/agent-comms/tls")
    assert (tls.user, tls.group, tls.mode) == ("root", "agent-comms", 0o750)
    key = ct.file("/etc/agent-comms/tls/key.pem")
    assert (key.user, key.group, key.mode) == ("root", "agent-comms", 0o640)
    assert "PRIVATE KEY" in key.content_string  # decrypted from the vault on its way

    # The token only in the agent user's own config; the system-wide one is for everyone.
    system = ct.file("/etc/agent-comms/chat.ini")
    assert system.mode == 0o644
    assert f"broker = {SECURE_URL}" in system.content_string
    assert "ca = /etc/agent-comms/ca.pem" in system.content_string
    assert not [line for line in system.content_string.splitlines() if line.startswith("token")]
    own = ct.file(f"/home/{AGENT_USER}/.config/agent-comms/config.ini")
    assert (own.user, own.group, own.mode) == (AGENT_USER, AGENT_USER, 0o600)
    for path in (f"/home/{AGENT_USER}/.config/agent-comms", f"/home/{AGENT_USER}/.config"):
        directory = ct.file(path)
        assert (directory.user, directory.group, directory.mode) == (AGENT_USER, AGENT_USER, 0o700), path


def test_agent_chat_over_https_with_a_token(secured):
    text = unique("over https")
    sent = secure_chat("send", "e2e-secure", text, token=WRITER, secured=secured)
    assert sent.returncode == 0, sent.stderr
    read = secure_chat("read", "e2e-secure", "--json", "--limit", "50", token=READER, secured=secured)
    assert read.returncode == 0, read.stderr
    rows = [json.loads(line) for line in read.stdout.splitlines()]
    assert (text, WRITER) in [(row["message"], row["sender"]) for row in rows]


def test_agent_chat_is_refused_without_a_token_or_permission(secured):
    # No token: 401 in `required` mode, for reads too.
    for args in (["send", "e2e-secure", "no token"], ["read", "e2e-secure"]):
        refused = secure_chat(*args, secured=secured)
        assert refused.returncode == 3, (refused.stdout, refused.stderr)
        assert "401" in refused.stderr or "token" in refused.stderr, refused.stderr
    # The read-only token: 403 on a post. The writer's token: 403 outside e2e-*.
    for token, channel in ((READER, "e2e-secure"), (WRITER, "tasks")):
        refused = secure_chat("send", channel, "not allowed", token=token, secured=secured)
        assert refused.returncode == 3, (refused.stdout, refused.stderr)
        assert "403" in refused.stderr or "may not post" in refused.stderr, refused.stderr


def test_https_only_and_verified(secured):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{URL}/healthz", timeout=5)  # plain HTTP to the HTTPS port
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{SECURE_URL}/healthz", timeout=5, verify=True)  # the CA is not a public one
    assert requests.get(f"{SECURE_URL}/healthz", timeout=5, verify=secured["ca"]).json() == {"status": "ok"}
    without = secure_chat("status", ca=False, token=WRITER, secured=secured)
    assert without.returncode == 2 and "--ca" in without.stderr, without.stderr


def test_agent_chat_in_the_container_uses_its_users_token(ct, secured):
    text = unique("from the agent user")
    sent = ct.run("runuser -l %s -c %s", AGENT_USER, f"agent-chat send e2e-inside {shlex.quote(text)}")
    assert sent.rc == 0, sent.stderr
    read = secure_chat("read", "e2e-inside", "--json", token=READER, secured=secured)
    assert (text, WRITER) in [(row["message"], row["sender"]) for row in map(json.loads, read.stdout.splitlines())]
    # root there has no token.
    refused = ct.run("agent-chat send e2e-inside %s", "from root")
    assert refused.rc == 3, (refused.stdout, refused.stderr)


@pytest.mark.timeout(600)  # a whole deploy
def test_second_deploy_changes_nothing(secured, make):
    output = make("deploy", timeout=900)
    counts = recap(output)
    assert HOST in counts, output
    assert {host: c["changed"] for host, c in counts.items()} == {host: 0 for host in counts}, output
    assert all(c["failed"] == 0 for c in counts.values()), output


def test_direct_ssh_is_one_variable_away(ct, make, inventory):
    """agent_comms_connection=ssh: Ansible logs into the container itself (its template,
    like Proxmox's, runs sshd, with host keys `pct create` made), with the same key."""
    key = Path(json.loads(inventory.read_text())["all"]["vars"]["ansible_private_key_file"])
    ct.check_output("install -d -m 0700 /root/.ssh")
    run(TOOLS[0], "push", VMID, key.with_suffix(".pub"), "/root/.ssh/authorized_keys", "--perms", "0600")
    output = make("status", "ARGS=-e agent_comms_connection=ssh -vvv")
    assert "ESTABLISH SSH CONNECTION FOR USER: root" in output and f"<{CT_IP}>" in output
    assert "active (running)" in output
    # /status over HTTPS, verified with the CA; anonymous in `required` mode, so without counts.
    assert '"auth": "required"' in " ".join(output.split())


def test_provision_brings_changed_settings_back_in_line(make):
    output = make("provision", "ARGS=-e proxmox_lxc_memory=1536")
    assert recap(output)[HOST]["changed"] == 1, output
    assert "memory: 1536" in run(TOOLS[0], "config", VMID).stdout
    output = make("provision")
    assert recap(output)[HOST]["changed"] == 1, output
    assert "memory: 1024" in run(TOOLS[0], "config", VMID).stdout
    assert recap(make("provision"))[HOST]["changed"] == 0


def test_provision_absent_destroys_the_container(make):
    make("provision", "ARGS=-e proxmox_lxc_state=absent")
    status = run(TOOLS[0], "status", VMID, check=False)
    assert status.returncode != 0 and "does not exist" in status.stderr
