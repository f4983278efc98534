"""Proxmox end to end: `make deploy` with a test inventory adopts the homelab's CT-950 as
it is before the first deploy (made by hand long ago, unprivileged but without nesting,
under another host name, running broker.py) and deploys the broker into it, in a real
Debian 12 LXC container with systemd; then the day-2 targets run against it.

The first deploy stops, since nesting and the host name would take effect only at the
container's next start, and says how to apply them; the deploy it asks for reboots the
container and goes on. After the day-2 targets, a second deploy turns on what issue 5
added, the way a user would: auth `required`, HTTPS with a certificate from a throwaway
CA, and two tokens whose secrets (and the TLS key) are ansible-vault encrypted in
host_vars beside the inventory.

This machine stands in for the Proxmox node (tests/e2e/proxmox_node.py): Ansible reaches it
over SSH on loopback (an sshd of the test's own, with a key of its own, whose host key is
in the ~/.ssh/known_hosts of the home directory `make` runs with), and finds `pct`,
`pveam`, `pvesm` and `pvesh` there: tests/e2e/pve_standin, which does what Proxmox does on
plain LXC, installed for the test only. The template is one the test builds first, as
Proxmox builds its own: Debian 12 from debootstrap (this machine's mirror) packed as a
.tar.zst, since the container reaches no mirror later. The container sits on a bridge and
subnet the test makes (acbr0, 10.250.77.0/24). Nothing is sent anywhere else.

Needs root on Debian; installs what is missing (checked by the files it uses) and removes
what it made at the end: the container, the bridge, the stand-ins, the sshd and its keys.
It keeps caches for the next run: the templates and debootstrap's downloads
(/var/cache/agent-comms-e2e) and the wheelhouse (build/e2e-wheelhouse).

The tests are steps of one deployment: if a step fails (tools, template, bridge, deploy),
its error says what broke and the tests after it stop with one line each
(tests/e2e/conftest.py).
"""

import hashlib
import hmac
import json
import os
import shlex
import sqlite3
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import anyio
import pytest
import requests
from host_commands import ROOT, run, wait_until
from proxmox_node import (
    BIN,
    BRIDGE,
    GATEWAY,
    PCT,
    PREFIX,
    STANDIN_STATE,
    PctBackend,
    build_template,
    pct,
    publish,
    recap,
)
from steps import setup_takes_up_to
from testinfra.host import Host

from http_peer import Peer
from legacy_broker import legacy_database
from mcp_process import http_session

CT_IP = "10.250.77.50"
VMID = 9950
HOST = "broker-e2e"
URL = f"http://{CT_IP}:8080"
SECURE_URL = f"https://{CT_IP}:8080"
SERVICE = "agent-comms-broker"
MCP_SERVICE = "agent-comms-mcp"
MCP_URL = f"http://{CT_IP}:8081/mcp"
SECURE_MCP_URL = f"https://{CT_IP}:8081/mcp"
ADMIN = ["runuser", "-u", "agent-comms", "--", "/opt/agent-comms/venv/bin/agent-comms-broker"]
# The build of Debian 12's template the homelab's CT-950 was made from long ago, and the
# newest one, the only one the appliance index still lists.
OLD_BUILD = "debian-12-standard_12.12-1_amd64.tar.zst"
NEW_BUILD = "debian-12-standard_12.13-1_amd64.tar.zst"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creates LXC containers and a bridge: needs root"),
    pytest.mark.skipif(not Path("/etc/debian_version").exists(), reason="needs Debian (apt, debootstrap)"),
]


def unique(text):
    return f"{text} {uuid.uuid4().hex[:8]}"


# -- the stand-in Proxmox node -------------------------------------------------------------


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def template(host_tools):
    """Debian 12 as Proxmox's appliance server has it: the newest build, and one older
    (the same archive under its old name) that the index no longer lists."""
    archive = build_template(NEW_BUILD, "bookworm", "3.11")
    publish(archive, OLD_BUILD)
    return archive


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
    legacy_database(tmp_path / "messages.db", LEGACY_MESSAGES)
    unit = tmp_path / LEGACY_UNIT
    unit.write_text(
        "[Service]\nExecStart=/usr/bin/python3 -m http.server 8080\nWorkingDirectory=/tmp\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    pct("exec", VMID, "--", "mkdir", "-p", "/opt/agent-comms")
    pct("push", VMID, tmp_path / "messages.db", "/opt/agent-comms/messages.db", "--perms", "0644")
    pct("push", VMID, unit, f"/etc/systemd/system/{LEGACY_UNIT}", "--perms", "0644")
    pct("exec", VMID, "--", "systemctl", "enable", "--now", LEGACY_UNIT)

    def listening():
        return ":8080 " in pct("exec", VMID, "--", "ss", "-ltn", check=False).stdout

    def failure():
        status = pct("exec", VMID, "--", "systemctl", "status", "--no-pager", LEGACY_UNIT, check=False)
        ports = pct("exec", VMID, "--", "ss", "-ltn", check=False)
        return (
            f"broker.py's stand-in ({LEGACY_UNIT}) did not listen on port 8080 within 30 s:\n"
            f"{status.stdout}{status.stderr}\n{ports.stdout}{ports.stderr}"
        )

    wait_until(listening, 30, failure)


@pytest.fixture(scope="module")
def homelab_ct(template, bridge, standin, tmp_path_factory):
    """CT-950 as the homelab has it before the first deploy: made by hand long ago from the
    template build of that time (which the node's storage still holds, and the index no
    longer lists), unprivileged but without nesting, under another host name, running
    broker.py as root."""
    cache = STANDIN_STATE / "volumes" / "local" / "template" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    os.link(template.with_name(OLD_BUILD), cache / OLD_BUILD)
    pct(
        "create", VMID, f"local:vztmpl/{OLD_BUILD}", "--hostname", "broker-py", "--unprivileged", "1",
        "--rootfs", "local-lvm:4", "--memory", "512", "--nameserver", GATEWAY, "--onboot", "1",
        "--net0", f"name=eth0,bridge={BRIDGE},ip={CT_IP}/{PREFIX},gw={GATEWAY}", timeout=300,
    )  # fmt: skip
    pct("start", VMID)
    wait_until(
        lambda: (
            pct("exec", VMID, "--", "systemctl", "is-system-running", check=False).stdout.strip()
            in ("running", "degraded")
        ),
        120,
        lambda: "the hand-made container did not boot within 120 s",
    )
    install_legacy_broker(tmp_path_factory.mktemp("legacy"))


@pytest.fixture(scope="module")
@setup_takes_up_to(1200)
def deployed(homelab_ct, make):
    """The first `make deploy`: it stops, since nesting and the new host name would take
    effect only at the container's next start; then the deploy the message asks for,
    which reboots the container to apply them."""
    refused = make.fails("deploy", timeout=600)
    output = make("deploy", "ARGS=-e proxmox_lxc_apply_pending=restart", timeout=900)
    assert all(counts["failed"] == 0 and counts["unreachable"] == 0 for counts in recap(output).values()), output
    return {"refused": refused, "output": output}


@pytest.fixture(scope="module", autouse=True)
def deployed_first(deployed):
    """Every test of this module checks the deployment, so none runs unless it worked: a
    test would otherwise send to the container's address with no bridge to keep that
    traffic on this machine."""


# -- checks inside the container -----------------------------------------------------------


@pytest.fixture(scope="module")
def ct(deployed):
    return Host(PctBackend(VMID))


def unit(ct, *properties, unit_name=SERVICE):
    output = ct.check_output("systemctl show %s --property=%s", unit_name, ",".join(properties))
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


def test_adopting_ct_950_stops_at_changes_that_wait_for_a_restart(deployed):
    """Nesting and a new host name on the running container only take effect at its next
    start: the first deploy says so and what to run, rather than reporting them done."""
    refused = deployed["refused"]
    assert f"CT {VMID} runs, and these changes take effect only at its next start" in refused, refused
    assert "features nesting=1 (now not set)" in refused, refused
    assert "hostname agent-comms-e2e (now broker-py)" in refused, refused
    assert "-e proxmox_lxc_apply_pending=restart" in refused and f"pct reboot {VMID}" in refused, refused


def test_deploy_brings_the_container_in_line_and_applies_what_waited(deployed, ct):
    config = pct("config", VMID, "--current").stdout
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
    assert [line for line in pct("pending", VMID).stdout.splitlines() if not line.startswith("cur ")] == []
    assert pct("status", VMID).stdout.strip() == "status: running"
    assert ct.check_output("hostname") == "agent-comms-e2e"
    assert f"{CT_IP}/{PREFIX}" in ct.check_output("ip -o -4 addr show dev eth0")
    assert ct.check_output("systemctl is-system-running || true") in ("running", "degraded")
    # Unprivileged for real: root inside is 100000 on the node, and nesting is in its LXC config.
    lxc_config = (Path("/var/lib/lxc") / str(VMID) / "config").read_text()
    assert "lxc.idmap = u 0 100000 65536" in lxc_config and "nesting.conf" in lxc_config, lxc_config
    assert ct.check_output("cat /proc/self/uid_map").split() == ["0", "100000", "65536"]
    # The template was not fetched again: the container existed.
    assert "pveam download" not in deployed["output"]


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


def mcp_send(url, channel, text, **session):
    """A send through the MCP server at `url` with the SDK's own Streamable HTTP client:
    the tool's result (a CallToolResult)."""

    async def scenario():
        async with http_session(url, **session) as mcp:
            assert mcp.server_info.name == "agent-comms" and "take" in mcp.instructions
            return await mcp.call_tool("send", {"channel": channel, "message": text})

    return anyio.run(scenario)


def test_mcp_server_runs_hardened_beside_the_broker(ct):
    service = ct.service(MCP_SERVICE)
    assert service.is_enabled and service.is_running
    assert ct.socket("tcp://0.0.0.0:8081").is_listening
    properties = unit(
        ct, "DynamicUser", "NoNewPrivileges", "ProtectSystem", "MemoryDenyWriteExecute", unit_name=MCP_SERVICE
    )
    assert properties == {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "MemoryDenyWriteExecute": "yes",
    }
    text = unique("through the MCP server in the container")
    sent = mcp_send(MCP_URL, "e2e-mcp", text, agent="e2e-mcp-agent")
    assert not sent.is_error, sent.content
    assert sent.structured_content["sender"] == "e2e-mcp-agent"
    assert text in messages("e2e-mcp")


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
    mcp_server = unit(ct, "MainPID", unit_name=MCP_SERVICE)["MainPID"]

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
    assert unit(ct, "MainPID", unit_name=MCP_SERVICE)["MainPID"] != mcp_server, "the MCP server was restarted"
    assert not mcp_send(MCP_URL, "e2e-restart", unique("after restart"), agent="e2e-mcp-agent").is_error
    kept = messages("e2e-restart")
    assert set(before + during) <= set(kept)


def test_logs_show_the_requests(make):
    channel = f"e2e-logs-{uuid.uuid4().hex[:6]}"
    chat("send", channel, "a request for the journal")
    mcp_send(MCP_URL, channel, "a tool call for the journal", agent="e2e-mcp-agent")
    output = make("logs", "LINES=200")
    assert f"POST /messages/{channel}" in output, output
    assert "agent-comms-mcp[" in output and '"POST /mcp HTTP/1.1" 200' in output, output  # its journal beside it


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
        # The playbook first writes the command; then the journal streams (its last line
        # the broker's or the MCP server's).
        wait_until(
            lambda: any("agent-comms-broker[" in line or "agent-comms-mcp[" in line for line in lines),
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
    assert f"service {MCP_SERVICE}: active (running)" in output and f"mcp: {MCP_URL} answers" in output, output


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
    command = [PCT, "exec", VMID, "--", *ADMIN, *args, "--db", "/opt/agent-comms/messages.db"]
    return run(*command, input=secret).stdout


def vaulted(agent):
    """The token's secret as the vars refer to it: a variable of the vault file."""
    return f"{{{{ vault_e2e_tokens['{agent}'] }}}}"


def tokens_by_agent():
    return {token["agent"]: token for token in json.loads(admin("token", "list", "--json"))}


NOTIFY_SECRET = f"e2e-webhook-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def webhook_receiver():
    """A webhook receiver on this host's address on the bridge: what the deployed broker's
    notification rule sends to."""
    with Peer([(200, {"ok": True}, {})], host=GATEWAY) as receiver:
        yield receiver


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def secured(ct, make, inventory, vault_password_file, tmp_path_factory, webhook_receiver):
    """The running broker switched to auth `required`, HTTPS and two tokens by `make
    deploy`, set up as the role's defaults/main.yml tells a user to: the secrets and the
    TLS key encrypted with ansible-vault (a vault file beside plain vars in host_vars/,
    here beside the test inventory), the certificate and CA as files on the controller.

    Before it, the broker gets two tokens of its own: one an earlier deploy registered
    (note "ansible") that the inventory no longer lists, and one made by hand."""
    ca, certificate, key = make_certificates(tmp_path_factory.mktemp("tls"))
    rules = tmp_path_factory.mktemp("notify") / "notify.toml"
    rules.write_text(
        f'allow = ["{webhook_receiver.url}"]\n[[rule]]\nname = "e2e-hook"\nchannels = ["e2e-notify"]\n'
        f'webhook = {{ url = "{webhook_receiver.url}/agent-comms", secret = "{NOTIFY_SECRET}" }}\n'
    )
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
                # The test host's address on the bridge stands for a Prometheus server.
                "agent_comms_broker_metrics_from": GATEWAY,
                "agent_comms_broker_notify_file": str(rules),
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
    run(
        BIN / "ansible-vault", "encrypt", "--vault-password-file", vault_password_file, host_vars / "vault.yml", key,
        rules,
    )  # fmt: skip
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
        f"AGENT_COMMS_METRICS_FROM={GATEWAY}",
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


def test_prometheus_scrapes_from_the_address_named_without_a_token(secured):
    scraped = requests.get(f"{SECURE_URL}/metrics", timeout=5, verify=secured["ca"])
    assert scraped.status_code == 200 and "agent_comms_http_requests_total" in scraped.text, scraped.text[:300]
    # Nothing else opens to that address: the API still wants a token.
    assert requests.get(f"{SECURE_URL}/channels", timeout=5, verify=secured["ca"]).status_code == 401


def test_a_post_reaches_the_webhook_of_the_deployed_rules(ct, secured, webhook_receiver):
    rules = ct.file("/etc/agent-comms/notify.toml")
    assert (rules.user, rules.group, rules.mode) == ("root", "agent-comms", 0o640)
    assert NOTIFY_SECRET in rules.content_string  # decrypted from the vault on its way
    assert (
        "AGENT_COMMS_NOTIFY_FILE=/etc/agent-comms/notify.toml" in ct.file("/etc/agent-comms/broker.env").content_string
    )
    text = unique("a notification through the deployed rules")
    stored = int(secure_chat("send", "e2e-notify", text, token=WRITER, secured=secured).stdout)
    wait_until(
        lambda: any(json.loads(r[3])["message"]["id"] == stored for r in webhook_receiver.requests),
        30,
        lambda: f"no webhook call for message {stored}: {webhook_receiver.requests}",
    )
    _, path, headers, body, _ = next(
        r for r in webhook_receiver.requests if json.loads(r[3])["message"]["id"] == stored
    )
    assert path == "/agent-comms" and json.loads(body)["message"]["message"] == text
    signed = headers["X-Agent-Comms-Timestamp"].encode() + b"." + body
    expected = hmac.new(NOTIFY_SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert headers["X-Agent-Comms-Signature"] == f"sha256={expected}"


def test_https_only_and_verified(secured):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{URL}/healthz", timeout=5)  # plain HTTP to the HTTPS port
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{SECURE_URL}/healthz", timeout=5, verify=True)  # the CA is not a public one
    assert requests.get(f"{SECURE_URL}/healthz", timeout=5, verify=secured["ca"]).json() == {"status": "ok"}
    without = secure_chat("status", ca=False, token=WRITER, secured=secured)
    assert without.returncode == 2 and "--ca" in without.stderr, without.stderr


def test_the_mcp_server_serves_https_and_passes_each_callers_token(secured):
    text = unique("over HTTPS through the MCP server")
    token = secured["secrets"][WRITER]
    sent = mcp_send(
        SECURE_MCP_URL, "e2e-mcp", text, token=token, verify=ssl.create_default_context(cafile=secured["ca"])
    )
    assert not sent.is_error, sent.content
    assert sent.structured_content["sender"] == WRITER
    context = ssl.create_default_context(cafile=secured["ca"])
    refused = mcp_send(SECURE_MCP_URL, "e2e-mcp", text, agent="e2e-stranger", verify=context)
    assert refused.is_error and "wants a token" in refused.content[0].text, refused.content
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(SECURE_MCP_URL, json={}, timeout=5)  # the throwaway CA is nobody's


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
    run(PCT, "push", VMID, key.with_suffix(".pub"), "/root/.ssh/authorized_keys", "--perms", "0600")
    output = make("status", "ARGS=-e agent_comms_connection=ssh -vvv")
    assert "ESTABLISH SSH CONNECTION FOR USER: root" in output and f"<{CT_IP}>" in output
    assert "active (running)" in output
    # /status over HTTPS, verified with the CA; anonymous in `required` mode, so without counts.
    assert '"auth": "required"' in " ".join(output.split())


def test_provision_brings_changed_settings_back_in_line(make):
    output = make("provision", "ARGS=-e proxmox_lxc_memory=1536")
    assert recap(output)[HOST]["changed"] == 1, output
    assert "memory: 1536" in run(PCT, "config", VMID).stdout
    output = make("provision")
    assert recap(output)[HOST]["changed"] == 1, output
    assert "memory: 1024" in run(PCT, "config", VMID).stdout
    assert recap(make("provision"))[HOST]["changed"] == 0


def test_provision_absent_destroys_the_container(make):
    make("provision", "ARGS=-e proxmox_lxc_state=absent")
    status = run(PCT, "status", VMID, check=False)
    assert status.returncode != 0 and "does not exist" in status.stderr
