"""Proxmox end to end, on a node set up unlike the first: `make deploy` onto a fresh
ZFS-installed node whose appliance index lists a newer template build than any named in
the role, reached as `ssh pve` (a Host of the user's ssh config, later with a jump host,
which the pct connection does not read) by a user who may run only pct, pveam, pvesm and pvesh
with sudo, the rule the README gives. The container is a Debian 13 one (Python 3.13: the
controller's wheels are for 3.11), gets its address by DHCP, and has what a homelab user
sets: the Proxmox firewall opening only the broker's port, a VLAN tag, a search domain,
tags, a description, protection, a time zone, a boot order, SSH keys, and the broker's
database on a node directory mounted in (mp0), which outlives destroying and rebuilding
the container.

Before the deploy that works, the mistakes a user makes fail with a message that says
what to do: the node's host key where paramiko does not look, a storage the node lacks,
and a `pveam update` that failed quietly.

Everything is on this machine (tests/e2e/proxmox_node.py): the stand-in node, its sshd on
loopback, the bridge acbr0 with a DHCP server of the test's own, the containers on it."""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from host_commands import ROOT, run, stop_process
from proxmox_node import (
    BIN,
    BRIDGE,
    GATEWAY,
    STANDIN_STATE,
    PctBackend,
    build_template,
    pct,
    recap,
    start_dhcp_server,
    storage_layout,
    words,
)
from pve_standin.storage import LAYOUTS, UPDATE_FAILS
from steps import setup_takes_up_to
from testinfra.host import Host

VMID = 9951
HOST = "broker-fresh"
NODE_USER = "acnode"
TEMPLATE = "debian-13-standard_13.1-2_amd64.tar.zst"
DATA = Path("/var/lib/agent-comms-e2e-data")  # on the node, mounted in as mp0
SUDOERS = Path("/etc/sudoers.d/agent-comms-e2e")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creates LXC containers, a bridge and a user: needs root"),
    pytest.mark.skipif(not Path("/etc/debian_version").exists(), reason="needs Debian (apt, debootstrap)"),
]


def documented_sudo_rule():
    """The sudoers line the README tells a non-root node user to add."""
    readme = (ROOT / "README.md").read_text()
    rules = re.findall(r"^(\S+ ALL=\(root\) NOPASSWD: .*pct.*)$", readme, re.MULTILINE)
    assert len(rules) == 1, f"the README should give one sudoers rule for the node's user: {rules}"
    return rules[0]


# -- the node ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def templates(host_tools):
    """Debian 13 on the appliance server (Debian 12 is there too, from the first module or
    built now): the role is asked for the release, debian-13-standard."""
    build_template("debian-12-standard_12.13-1_amd64.tar.zst", "bookworm", "3.11")
    return build_template(TEMPLATE, "trixie", "3.13")


@pytest.fixture(scope="module")
def zfs_node(standin, bridge):
    """The storages of a ZFS install: local (templates) and local-zfs (containers), no
    local-lvm; a directory on the node for the broker's data, owned by the root of an
    unprivileged container."""
    storage_layout(LAYOUTS["zfs"])
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir()
    os.chown(DATA, 100000, 100000)
    yield
    shutil.rmtree(DATA, ignore_errors=True)


@pytest.fixture(scope="module")
def node_user(host_tools, sshd):
    """The node's SSH user: not root, allowed exactly the README's sudo rule."""
    run("userdel", "-r", NODE_USER, check=False)
    run("useradd", "--create-home", "--shell", "/bin/sh", NODE_USER)
    run("usermod", "-p", "*", NODE_USER)  # no password, yet not locked: sshd lets a key in
    ssh = Path(f"/home/{NODE_USER}/.ssh")
    ssh.mkdir(mode=0o700)
    (ssh / "authorized_keys").write_text(sshd["key"].with_suffix(".pub").read_text())
    run("chown", "-R", f"{NODE_USER}:{NODE_USER}", ssh)
    rule = documented_sudo_rule().replace("ansible", NODE_USER, 1)
    SUDOERS.write_text(rule + "\n")
    SUDOERS.chmod(0o440)
    run("visudo", "-cf", SUDOERS)
    yield rule
    SUDOERS.unlink(missing_ok=True)
    run("userdel", "-r", NODE_USER, check=False)


@pytest.fixture(scope="module")
def dhcp(bridge, tmp_path_factory):
    process = start_dhcp_server(tmp_path_factory.mktemp("dhcp"))
    yield
    stop_process(process, 10)


@pytest.fixture(scope="module")
def controller_home(sshd, tmp_path_factory):
    """A home directory with an ssh config that names the node `pve` (host, port, user,
    key and the known_hosts file OpenSSH uses for it), and an empty ~/.ssh/known_hosts:
    OpenSSH reaches the node, the pct connection does not yet."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "known_hosts").write_text("")
    known_hosts = home / "known_hosts"
    # The node's own sshd also under another name, to be its own jump host (OpenSSH calls
    # a jump through the very same name a loop).
    known_hosts.write_text(sshd["known_line"] + sshd["known_line"].replace("[127.0.0.1]", "[localhost]", 1))
    (home / "ssh_config").write_text(ssh_config(sshd, known_hosts))
    return home


def ssh_config(sshd, known_hosts, jump=""):
    return (
        f"Host pve\n    HostName 127.0.0.1\n    Port {sshd['port']}\n    User {NODE_USER}\n"
        + (f"    ProxyJump {jump}\n" if jump else "")
        + f"\nHost *\n    IdentityFile {sshd['key']}\n    UserKnownHostsFile {known_hosts}\n"
    )


@pytest.fixture(scope="module")
def inventory(sshd, controller_home, tmp_path_factory):
    """The homelab inventory's shape: the node is `pve`, known only to the ssh config."""
    path = tmp_path_factory.mktemp("inventory") / "fresh.yml"
    container = {
        "proxmox_lxc_node": "pve",
        "proxmox_lxc_vmid": VMID,
        "proxmox_lxc_hostname": "agent-comms-13",
        "proxmox_lxc_template": "debian-13-standard",
        "proxmox_lxc_storage": "local-zfs",
        "proxmox_lxc_disk": 4,
        "proxmox_lxc_memory": 1024,
        "proxmox_lxc_ip": "dhcp",
        "proxmox_lxc_bridge": BRIDGE,
        "proxmox_lxc_vlan": 20,  # recorded by the stand-in, not applied to acbr0
        "proxmox_lxc_nameserver": GATEWAY,
        "proxmox_lxc_searchdomain": "home.arpa",
        "proxmox_lxc_firewall": True,
        "proxmox_lxc_firewall_source": "10.250.77.0/24",
        "proxmox_lxc_startup": "order=2,up=10",
        "proxmox_lxc_tags": ["agent-comms", "E2E"],
        "proxmox_lxc_description": "agent-comms broker: end-to-end test\nMade by Ansible.",
        "proxmox_lxc_protection": True,
        "proxmox_lxc_timezone": "Europe/Berlin",
        "proxmox_lxc_ssh_public_keys": sshd["key"].with_suffix(".pub").read_text(),
        "proxmox_lxc_mounts": [{"volume": str(DATA), "path": "/var/lib/agent-comms"}],
        "agent_comms_broker_db": "/var/lib/agent-comms/messages.db",
        # The MCP server is test_lxc_deploy.py's and test_docker.py's to test (CI's time):
        # off, the firewall opens the broker's port alone.
        "agent_comms_mcp_enabled": False,
    }
    inventory = {
        "all": {
            "children": {
                "proxmox": {
                    "hosts": {
                        "pve": {
                            "ansible_ssh_common_args": f"-F {controller_home / 'ssh_config'}",
                            "ansible_python_interpreter": "/usr/bin/python3",
                        }
                    }
                },
                "agent_comms": {"hosts": {HOST: container}},
                "agent_chat_clients": {"hosts": {HOST: None}},
            },
        }
    }
    path.write_text(json.dumps(inventory, indent=2))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def node(templates, zfs_node, node_user, dhcp):
    """Everything of the node in place."""


# -- the mistakes first ---------------------------------------------------------------------


def test_a_host_key_paramiko_cannot_find_fails_with_the_fix(node, make, sshd):
    """OpenSSH finds the node's key through the ssh config; paramiko looks only in
    ~/.ssh/known_hosts, under [127.0.0.1]:PORT. The message gives the command that copies
    it over, and with that done the next run gets past it."""
    message = make.fails("provision")
    name = f"[127.0.0.1]:{sshd['port']}"
    assert "paramiko" in message and f'under "{name}"' in message, message
    assert f"user {NODE_USER}" in message, message
    fix = re.search(r"`(ssh-keygen -F [^`]+>> ~/\.ssh/known_hosts)`", message)
    assert fix, message
    subprocess.run(["sh", "-c", fix.group(1)], env={**os.environ, "HOME": str(make.home)}, check=True)
    assert name in (make.home / ".ssh" / "known_hosts").read_text()


def test_a_storage_the_node_lacks_fails_with_those_it_has(node, make):
    message = make.fails("provision", "ARGS=-e proxmox_lxc_storage=local-lvm")
    assert "Storage local-lvm cannot hold the container's volumes on this node" in message, message
    assert "local-zfs zfspool active" in message, message
    assert not (Path("/var/lib/lxc") / str(VMID)).exists()


def test_a_quiet_pveam_update_failure_is_named(node, make):
    UPDATE_FAILS.touch()
    try:
        message = make.fails("provision")
    finally:
        UPDATE_FAILS.unlink()
    assert 'No template on the node matches proxmox_lxc_template "debian-13-standard"' in message, message
    assert "`pveam update` could not refresh: update failed - see /var/log/pveam.log for details" in message, message


# -- the deploy -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
@setup_takes_up_to(1200)
def deployed(node, make):
    output = make("deploy", timeout=900)
    assert all(counts["failed"] == 0 and counts["unreachable"] == 0 for counts in recap(output).values()), output
    return output


@pytest.fixture(scope="module")
def ct(deployed):
    return Host(PctBackend(VMID))


@pytest.fixture(scope="module")
def address(ct):
    return ct.check_output("ip -4 -o addr show dev eth0").split()[3].split("/")[0]


def chat(url, *args):
    env = {**os.environ, "AGENT_COMMS_BROKER": url, "AGENT_COMMS_CONFIG": os.devnull}
    return run(BIN / "agent-chat", "--broker", url, "--agent-id", "e2e-fresh", *args, env=env, timeout=60).stdout


def test_the_newest_build_of_the_release_is_fetched_onto_zfs(deployed):
    assert f"local:vztmpl/{TEMPLATE}" in run("/usr/sbin/pveam", "list", "local").stdout
    assert re.search(r"^rootfs: local-zfs:subvol-9951-disk-0,size=4G$", pct("config", VMID).stdout, re.MULTILINE)


def test_the_container_has_the_settings_asked_for(deployed, ct, address, sshd):
    config = pct("config", VMID).stdout
    for line in [
        "hostname: agent-comms-13",
        "searchdomain: home.arpa",
        f"nameserver: {GATEWAY}",
        "startup: order=2,up=10",
        "tags: agent-comms;e2e",
        "description: agent-comms broker%3A end-to-end test%0AMade by Ansible.%0A",
        "protection: 1",
        "timezone: Europe/Berlin",
        "features: nesting=1",
        "unprivileged: 1",
        f"mp0: {DATA},mp=/var/lib/agent-comms",  # no backup=1: vzdump never backs up a node directory
    ]:
        assert line in config.splitlines(), config
    net = re.search(r"^net0: (.*)$", config, re.MULTILINE).group(1)
    assert "firewall=1" in net and "ip=dhcp" in net and f"bridge={BRIDGE}" in net and "tag=20" in net, net
    assert [line for line in pct("pending", VMID).stdout.splitlines() if not line.startswith("cur ")] == []
    # Inside: the DHCP address, the time zone and the key for agent_comms_connection=ssh.
    # (Not the DNS settings: with DHCP, the container's dhcpcd rewrites resolv.conf, on a
    # real node as here.)
    assert address.startswith("10.250.77.1")
    assert ct.check_output("cat /etc/timezone") == "Europe/Berlin"
    assert ct.check_output("readlink /etc/localtime") == "/usr/share/zoneinfo/Europe/Berlin"
    key = sshd["key"].with_suffix(".pub").read_text().strip()
    assert ct.file("/root/.ssh/authorized_keys").content_string.strip() == key


def test_the_firewall_lets_in_only_the_brokers_port(deployed):
    options = json.loads(run("/usr/bin/pvesh", "get", f"/nodes/localhost/lxc/{VMID}/firewall/options",
                             "--output-format", "json").stdout)  # fmt: skip
    assert options["enable"] == "1" and options["policy_in"] == "DROP", options
    rules = json.loads(run("/usr/bin/pvesh", "get", f"/nodes/localhost/lxc/{VMID}/firewall/rules",
                           "--output-format", "json").stdout)  # fmt: skip
    assert [
        (rule["type"], rule["action"], rule["proto"], rule["dport"], rule["source"], rule["enable"]) for rule in rules
    ] == [("in", "ACCEPT", "tcp", "8080", "10.250.77.0/24", 1)], rules
    text = (STANDIN_STATE / "firewall" / f"{VMID}.fw").read_text()
    assert "IN ACCEPT -source 10.250.77.0/24 -p tcp -dport 8080 # agent-comms (ansible proxmox_lxc)" in text, text
    # The datacenter firewall is off on this node: the deploy said the rules wait for it.
    assert "the datacenter firewall is off" in words(deployed)


def test_the_brokers_python_is_the_containers_own(deployed, ct):
    assert ct.check_output("python3 -c 'import sys; print(sys.version_info[:2])'") == "(3, 13)"
    assert (
        ct.check_output("/opt/agent-comms/venv/bin/python -c 'import gevent, sys; print(sys.version_info[:2])'")
        == "(3, 13)"
    )
    fetched = sorted(
        path.name for path in (ROOT / "build").glob("e2e-wheelhouse-cp313-x86_64-agent-comms-broker/gevent-*.whl")
    )
    assert fetched and "cp313" in fetched[0], fetched
    # With agent_comms_mcp_enabled false: no MCP SDK fetched, no unit, nothing on 8081.
    assert not list((ROOT / "build").glob("e2e-wheelhouse-cp313-x86_64-agent-comms-broker/mcp-*.whl"))
    assert not ct.file("/etc/systemd/system/agent-comms-mcp.service").exists
    assert not ct.socket("tcp://0.0.0.0:8081").is_listening


def test_agent_chat_reaches_the_broker_at_its_dhcp_address(deployed, address):
    url = f"http://{address}:8080"
    assert requests.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
    message_id = chat(url, "send", "e2e-fresh", "kept on the node's disk").strip()
    assert message_id.isdigit()
    assert "kept on the node's disk" in chat(url, "read", "e2e-fresh")
    # The URL every agent-chat host got is the one the container has.
    assert f"broker = {url}" in Host(PctBackend(VMID)).file("/etc/agent-comms/chat.ini").content_string


def test_the_database_lives_on_the_mounted_node_directory(deployed, ct):
    assert ct.file("/var/lib/agent-comms/messages.db").exists
    assert (DATA / "messages.db").exists()


def test_the_node_user_did_it_all_with_the_sudo_rule_alone(deployed, node_user):
    allowed = run("sudo", "-l", "-U", NODE_USER).stdout
    assert "/usr/sbin/pct" in allowed and "(ALL)" not in allowed.replace("(root)", ""), allowed
    assert "ALL : ALL" not in allowed


def test_logs_and_status_go_through_the_alias_and_the_sudo_rule(deployed, make):
    assert "agent-comms-broker[" in make("logs", "LINES=20")
    status = make("status")
    assert "status: running" in status and "active (running)" in status


def test_a_jump_host_in_the_ssh_config_serves_both_paths(deployed, make, sshd):
    """ProxyJump for `pve`: the node's tasks (OpenSSH) take it from the config, the
    container's (paramiko) get it as a ProxyCommand; both go through the jump host."""
    config = make.home / "ssh_config"
    plain = config.read_text()
    config.write_text(ssh_config(sshd, make.home / "known_hosts", jump=f"{NODE_USER}@localhost:{sshd['port']}"))
    make.close_connections()  # no master connection left from before the jump
    try:
        status = make("status", "ARGS=-vvv")
    finally:
        config.write_text(plain)
        make.close_connections()
    # The plugin prints the command with %h and %p filled in.
    jump = f"ssh://{NODE_USER}@localhost:{sshd['port']}"
    proxy = f"ssh -F {config} -W [127.0.0.1]:{sshd['port']} {jump}"
    assert f"CONFIGURE PROXY COMMAND FOR CONNECTION: {proxy}" in status, status[-3000:]
    assert "status: running" in status and "active (running)" in status


def test_a_mount_point_added_to_the_protected_running_container(deployed, make, ct, tmp_path):
    """Proxmox refuses a disk change of a protected container: the role lifts protection
    for it and sets it again; the new volume is hot-plugged into the running container."""
    mounts = [
        {"volume": str(DATA), "path": "/var/lib/agent-comms"},
        {"volume": "local-zfs:1", "path": "/srv/extra", "backup": False},
    ]
    extra = tmp_path / "mounts.json"
    extra.write_text(json.dumps({"proxmox_lxc_mounts": mounts}))
    assert recap(make("provision", f"ARGS=-e @{extra}"))[HOST]["changed"] > 0
    config = pct("config", VMID).stdout.splitlines()
    assert "mp1: local-zfs:subvol-9951-disk-1,mp=/srv/extra,backup=0,size=1G" in config, config
    assert "protection: 1" in config and f"mp0: {DATA},mp=/var/lib/agent-comms" in config, config
    assert ct.mount_point("/srv/extra").exists
    assert pct("status", VMID).stdout.strip() == "status: running"  # no reboot for it
    assert recap(make("provision", f"ARGS=-e @{extra}"))[HOST]["changed"] == 0


# -- destroyed and rebuilt ---------------------------------------------------------------------


def test_protection_stops_removal(deployed, make):
    message = make.fails("provision", "ARGS=-e proxmox_lxc_state=absent")
    assert f"CT {VMID} has protection on (proxmox_lxc_protection: true)" in message, message
    assert pct("status", VMID).stdout.strip() == "status: running"


@pytest.mark.timeout(300)  # a removal and a provision
def test_a_rebuilt_container_finds_the_data_on_the_node(deployed, make):
    """Destroyed (its volumes with it) and made again from the template: the database on
    the node directory is mounted into the new container with every message. (That the
    broker adopts a database it finds is what the first module's deploy shows.)"""
    make("provision", "ARGS=-e proxmox_lxc_state=absent -e proxmox_lxc_protection=false")
    assert pct("status", VMID, check=False).returncode != 0
    assert not list((STANDIN_STATE / "volumes" / "local-zfs").glob(f"*-{VMID}-*"))  # its volumes went with it
    assert (DATA / "messages.db").exists()  # a bind-mounted node directory is not the container's to destroy
    make("provision")
    rebuilt = Host(PctBackend(VMID))
    assert not rebuilt.file("/opt/agent-comms/venv").exists  # a new root file system
    query = (
        "import sqlite3; db = sqlite3.connect('/var/lib/agent-comms/messages.db'); "
        "print(db.execute('select message from messages').fetchall())"
    )
    assert "kept on the node's disk" in rebuilt.check_output(f"python3 -c {shlex.quote(query)}")
