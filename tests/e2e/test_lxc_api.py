"""Proxmox end to end through the API: `make provision` and `make deploy` with
proxmox_lxc_method api, for a user who gives Ansible an API token instead of SSH to the
node. The token has exactly the privileges the README lists (its `pveum` commands are
read from the README and applied to the stand-in's API), the container is reached over
its own SSH (agent_comms_connection ssh, with the key the role put in it), and the API's
answers come from the same stand-in node as pct's (tests/e2e/pve_standin/api.py): the
routes community.proxmox's modules and the role's API calls use, with Proxmox's
permission checks.

Everything is on this machine: the API on loopback (HTTPS, a self-signed certificate as a
fresh node has), the container on the test's bridge acbr0."""

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
from host_commands import ROOT, run, stop_process, wait_for
from proxmox_node import BIN, BRIDGE, GATEWAY, PREFIX, STANDIN_STATE, build_template, listening, pct, recap
from steps import setup_takes_up_to

from broker_process import free_port
from postgres_server import PostgresServer

VMID = 9952
HOST = "broker-api"
CT_IP = "10.250.77.52"
TOKEN_USER, TOKEN_NAME = "ansible@pve", "deploy"
# Roles Proxmox has built in, by their privileges (pve-access-control's PVE::AccessControl).
BUILT_IN_ROLES = {"PVESDNUser": ["SDN.Use"], "PVEAuditor": ["Datastore.Audit", "Sys.Audit", "VM.Audit"]}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creates LXC containers and a bridge: needs root"),
    pytest.mark.skipif(not Path("/etc/debian_version").exists(), reason="needs Debian (apt, debootstrap)"),
]


def documented_token_acl(vmid, storages, bridge):
    """The API token's privileges as the README's `pveum` commands grant them: {path:
    [privilege, ...]}, with CT-950, its storages and vmbr0 as this test has them."""
    readme = (ROOT / "README.md").read_text()
    roles = dict(BUILT_IN_ROLES)
    for name, privileges in re.findall(r'^pveum role add (\S+) --privs "([^"]+)"$', readme, re.MULTILINE):
        roles[name] = privileges.split()
    acl = {}
    for path, role in re.findall(rf"^pveum acl modify (\S+) --users {TOKEN_USER} --roles (\S+)$", readme, re.MULTILINE):
        path = path.replace("/vms/950", f"/vms/{vmid}").replace("/vmbr0", f"/{bridge}")
        path = storages.get(path, path)
        acl.setdefault(path, []).extend(roles[role])
    assert {f"/vms/{vmid}", f"/sdn/zones/localnetwork/{bridge}"} <= set(acl), f"the README's pveum commands: {acl}"
    assert f"pveum user token add {TOKEN_USER} {TOKEN_NAME} --privsep 0" in readme
    return acl


# -- the node and its API ----------------------------------------------------------------------


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def template(host_tools):
    return build_template("debian-12-standard_12.13-1_amd64.tar.zst", "bookworm", "3.11")


@pytest.fixture(scope="module")
def node_index(template, standin):
    """What the node's daily `pveam update` fetched (the API cannot refresh it)."""
    run("/usr/sbin/pveam", "update")


@pytest.fixture(scope="module")
def api(standin, tmp_path_factory):
    """The node's API on a loopback port, over HTTPS with a self-signed certificate, and
    two tokens: one with the README's privileges, one without the bridge's."""
    directory = tmp_path_factory.mktemp("api")
    run(
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", directory / "key.pem", "-out", directory / "cert.pem",
    )  # fmt: skip
    acl = documented_token_acl(VMID, {}, BRIDGE)
    secrets = {"full": os.urandom(16).hex(), "nosdn": os.urandom(16).hex()}
    without_bridge = {path: privileges for path, privileges in acl.items() if not path.startswith("/sdn")}
    tokens = {
        f"{TOKEN_USER}!{TOKEN_NAME}": {"secret": secrets["full"], "acl": acl},
        f"{TOKEN_USER}!nosdn": {"secret": secrets["nosdn"], "acl": without_bridge},
    }
    STANDIN_STATE.mkdir(parents=True, exist_ok=True)
    (STANDIN_STATE / "api-access.json").write_text(json.dumps({"tokens": tokens}))
    port = free_port()
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pve_standin.api import serve; "
        f"serve(('127.0.0.1', {port}), {str(directory / 'cert.pem')!r}, {str(directory / 'key.pem')!r})"
    )
    log = (directory / "api.log").open("ab")
    process = subprocess.Popen(["/usr/bin/python3", "-c", code], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    if not wait_for(lambda: process.poll() is not None or listening(port), 20) or process.poll() is not None:
        pytest.fail(f"the API stand-in did not listen:\n{(directory / 'api.log').read_text()}", pytrace=False)
    yield {"port": port, "secrets": secrets, "log": directory / "api.log"}
    stop_process(process, 10)


@pytest.fixture(scope="module")
def container_key(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "agent-comms-e2e-api", "-f", directory / "key")
    return directory / "key"


@pytest.fixture(scope="module")
def shared_database(bridge):
    """A real PostgreSQL server on this host's side of the bridge, standing in for the
    database host that several broker CTs share: the container's address may log in, with
    a password. Yields (the password, the server)."""
    server = PostgresServer(listen=f"127.0.0.1,{GATEWAY}", clients=[f"{CT_IP}/32"]).start()
    password = uuid.uuid4().hex
    server.psql(f"CREATE ROLE agent_comms LOGIN PASSWORD '{password}'")
    server.psql("CREATE DATABASE agent_comms OWNER agent_comms TEMPLATE template0")
    yield password, server
    server.stop()


@pytest.fixture(scope="module")
def inventory(api, container_key, shared_database, vault_password_file, tmp_path_factory):
    """The homelab inventory with the api method: no SSH to the node at all. The broker
    keeps its messages in the shared PostgreSQL, its password in an ansible-vault file of
    the host's vars, as the README lays it out."""
    path = tmp_path_factory.mktemp("inventory") / "api.yml"
    password, server = shared_database
    host_vars = path.parent / "host_vars" / HOST
    host_vars.mkdir(parents=True)
    (host_vars / "vault.yml").write_text(f"vault_agent_comms_db_password: {password}\n")
    run(BIN / "ansible-vault", "encrypt", "--vault-password-file", vault_password_file, host_vars / "vault.yml")
    container = {
        "proxmox_lxc_node": "pve",
        "proxmox_lxc_method": "api",
        "proxmox_lxc_api_host": "127.0.0.1",
        "proxmox_lxc_api_port": api["port"],
        "proxmox_lxc_api_user": TOKEN_USER,
        "proxmox_lxc_api_token_id": TOKEN_NAME,
        "proxmox_lxc_api_token_secret": api["secrets"]["full"],
        "proxmox_lxc_vmid": VMID,
        "proxmox_lxc_hostname": "agent-comms-api",
        "proxmox_lxc_ip": f"{CT_IP}/{PREFIX}",
        "proxmox_lxc_gateway": GATEWAY,
        "proxmox_lxc_bridge": BRIDGE,
        "proxmox_lxc_disk": 4,
        "proxmox_lxc_nameserver": GATEWAY,
        "proxmox_lxc_firewall": True,
        "proxmox_lxc_tags": ["agent-comms"],
        # The MCP server is test_lxc_deploy.py's and test_docker.py's to test: CI's time.
        "agent_comms_mcp_enabled": False,
        "agent_comms_broker_database_url": "postgresql://agent_comms:{{ vault_agent_comms_db_password | urlencode }}"
        f"@{GATEWAY}:{server.port}/agent_comms",
        "proxmox_lxc_ssh_public_keys": container_key.with_suffix(".pub").read_text(),
        "agent_comms_connection": "ssh",
        "ansible_private_key_file": str(container_key),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=accept-new "
        f"-o UserKnownHostsFile={container_key.with_name('known_hosts')}",
    }
    inventory = {
        "all": {
            "children": {
                # The node is named, never logged into.
                "proxmox": {"hosts": {"pve": {"ansible_host": "127.0.0.1"}}},
                "agent_comms": {"hosts": {HOST: container}},
                "agent_chat_clients": {"hosts": {HOST: None}},
            }
        }
    }
    path.write_text(json.dumps(inventory, indent=2))
    return path


@pytest.fixture(scope="module")
@setup_takes_up_to(600)
def provisioned(node_index, bridge, api, make):
    output = make("provision", "ARGS=-v", timeout=600)
    assert recap(output)[HOST]["failed"] == 0, output
    return output


# -- the tests ---------------------------------------------------------------------------------


def test_provision_through_the_api_creates_the_container(provisioned, api):
    config = pct("config", VMID).stdout
    for line in ["hostname: agent-comms-api", "unprivileged: 1", "features: nesting=1", "tags: agent-comms",
                 "rootfs: local-lvm:vm-9952-disk-0,size=4G", f"nameserver: {GATEWAY}"]:  # fmt: skip
        assert line in config.splitlines(), config
    assert "firewall=1" in config and f"ip={CT_IP}/{PREFIX}" in config
    assert pct("status", VMID).stdout.strip() == "status: running"
    # Through the API, as the token's user: the stand-in logged each call.
    calls = api["log"].read_text()
    assert "POST /api2/json/nodes/pve/lxc " in calls and "POST /api2/json/nodes/pve/aplinfo " in calls, calls
    assert f"PUT /api2/json/nodes/pve/lxc/{VMID}/config " in calls
    # The token's secret never shows, even with -v.
    assert api["secrets"]["full"] not in provisioned


def test_the_container_lets_in_its_key(provisioned, container_key):
    ssh = run("ssh", "-i", container_key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
              "-o", "UserKnownHostsFile=/dev/null", f"root@{CT_IP}", "hostname", timeout=60)  # fmt: skip
    assert ssh.stdout.strip() == "agent-comms-api"


def test_a_second_provision_changes_nothing(provisioned, make):
    assert recap(make("provision"))[HOST]["changed"] == 0


def test_a_change_that_waits_for_a_restart_is_applied_by_one(provisioned, make):
    message = make.fails("provision", "ARGS=-e proxmox_lxc_timezone=Europe/Berlin")
    assert "timezone Europe/Berlin (now not set)" in message, message
    make("provision", "ARGS=-e proxmox_lxc_timezone=Europe/Berlin -e proxmox_lxc_apply_pending=restart")
    assert "timezone: Europe/Berlin" in pct("config", VMID, "--current").stdout
    assert pct("exec", VMID, "--", "cat", "/etc/timezone").stdout.strip() == "Europe/Berlin"


def test_a_token_without_a_privilege_is_refused_with_the_one_it_lacks(provisioned, make, api):
    message = make.fails(
        "provision",
        f"ARGS=-e proxmox_lxc_vmid=9953 -e proxmox_lxc_api_token_id=nosdn "
        f"-e proxmox_lxc_api_token_secret={api['secrets']['nosdn']} -e proxmox_lxc_ip=10.250.77.53/24",
    )
    assert "403" in message or "Permission check failed" in message, message
    assert pct("status", 9953, check=False).returncode != 0


@pytest.mark.timeout(900)  # a whole deploy
def test_deploy_over_the_containers_own_ssh(provisioned, make, shared_database):
    output = make("deploy", timeout=900)
    assert recap(output)[HOST]["failed"] == 0
    assert requests.get(f"http://{CT_IP}:8080/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"http://{CT_IP}:8080/status", timeout=5).json()["database"] == "postgresql"
    env = {**os.environ, "AGENT_COMMS_BROKER": f"http://{CT_IP}:8080", "AGENT_COMMS_CONFIG": os.devnull}
    sent = run(BIN / "agent-chat", "send", "e2e-api", "through the API", env=env, timeout=60)
    assert sent.stdout.strip().isdigit()
    # In the shared database, not in a SQLite file of the container.
    stored = shared_database[1].psql(
        f"SELECT message FROM messages WHERE id = {int(sent.stdout)}", database="agent_comms"
    )
    assert stored.strip() == "through the API"
    password = shared_database[0]
    unit_environment = pct("exec", VMID, "--", "cat", "/etc/agent-comms/broker.env").stdout
    assert f"agent_comms:{password}@" in unit_environment and password not in output


def test_absent_through_the_api(provisioned, make):
    make("provision", "ARGS=-e proxmox_lxc_state=absent")
    assert pct("status", VMID, check=False).returncode != 0
    assert not [path for path in (STANDIN_STATE / "volumes" / "local-lvm").glob(f"*-{VMID}-*")]
