"""The proxmox_lxc role's reading of what Proxmox VE 8's tools print, and of OpenSSH's
settings, and the host_wheelhouse role's choice of wheels: the filter plugins, fed with
output in the formats of Proxmox's own sources (the printf formats are quoted from
pve-container's src/PVE/CLI/pct.pm, pve-guest-common's GuestHelpers::format_pending,
pve-manager's PVE/CLI/pveam.pm and pve-storage's PVE/CLI/pvesm.pm)."""

import importlib.util
from pathlib import Path

import pytest

ROLES = Path(__file__).resolve().parents[1] / "ansible" / "roles"


def plugin(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pve = plugin(ROLES / "proxmox_lxc" / "filter_plugins" / "pve_output.py")
wheels = plugin(ROLES / "host_wheelhouse" / "filter_plugins" / "wheel_tags.py")


def test_every_filter_is_registered():
    for module in (pve, wheels):
        assert all(callable(function) for function in module.FilterModule().filters().values())
    assert set(pve.FilterModule().filters()) >= {"pve_config", "pve_pending", "pveam_available", "pvesm_status"}


# -- pct config ------------------------------------------------------------------------------

# pct.pm: `print "$k: $v\n"` for the sorted keys but digest and lxc, the description through
# encode_text (control characters, ':' and non-ASCII as %XX), then the raw lxc.* keys.
PCT_CONFIG = """\
arch: amd64
cores: 2
description: CT-950%3A the agent-comms broker%0AOwner%3A J%C3%BCrgen%0A
features: nesting=1
hostname: agent-comms
memory: 1024
nameserver: 192.168.122.1
net0: name=eth0,bridge=vmbr0,firewall=1,gw=192.168.122.1,hwaddr=BC:24:11:5E:2A:11,ip=192.168.122.86/24,tag=20,type=veth
onboot: 1
ostype: debian
rootfs: local-lvm:vm-950-disk-0,size=8G
swap: 512
tags: agent-comms;homelab
unprivileged: 1
lxc.apparmor.profile: unconfined
"""


def test_pct_config_reads_every_option_and_decodes_the_description():
    config = pve.pve_config(PCT_CONFIG)
    assert config["hostname"] == "agent-comms"
    assert config["net0"].startswith("name=eth0,bridge=vmbr0,firewall=1")
    assert config["description"] == "CT-950: the agent-comms broker\nOwner: Jürgen"
    assert config["lxc.apparmor.profile"] == "unconfined"
    assert config["tags"] == "agent-comms;homelab"
    assert pve.pve_properties(config["net0"])["tag"] == "20"


def test_a_percent_sign_proxmox_left_as_it_is_stays():
    # encode_text escapes control characters, ':' and non-ASCII bytes, never '%'
    assert pve.pve_config("description: 100%25 sure%3A %41%0A\n")["description"] == "100%25 sure: %41"


def test_pct_config_from_the_api_is_read_the_same():
    api = {"cores": 2, "hostname": "agent-comms", "onboot": 1, "digest": "0f3c", "description": "hello\n"}
    assert pve.pve_config(api) == {"cores": "2", "hostname": "agent-comms", "onboot": "1", "description": "hello"}


def test_pct_config_ignores_lines_that_are_not_options():
    assert pve.pve_config("unable to parse\n\nhostname: x\n") == {"hostname": "x"}


# -- pct pending -----------------------------------------------------------------------------

# format_pending: sorted keys; `cur k: v` for what is in effect, then `new k: v` for a change
# that waits, or `del k: v` for a removal that waits; `new k: v` alone for a new option.
PCT_PENDING = """\
cur arch: amd64
cur cores: 2
new features: nesting=1
cur hostname: agent-comms
cur memory: 1024
del nameserver: 192.168.122.1
cur searchdomain: lan
new searchdomain: home.arpa
cur timezone: host
"""


def test_pct_pending_tells_what_waits_for_the_next_start():
    pending = pve.pve_pending(PCT_PENDING)
    assert pending["features"] == {"current": None, "pending": "nesting=1", "delete": False}
    assert pending["nameserver"] == {"current": "192.168.122.1", "pending": None, "delete": True}
    assert pending["searchdomain"] == {"current": "lan", "pending": "home.arpa", "delete": False}
    assert pve.pve_pending_changes(pending) == {
        "features": "nesting=1",
        "nameserver": None,
        "searchdomain": "home.arpa",
    }


def test_pct_pending_with_nothing_pending_is_empty():
    pending = pve.pve_pending("cur arch: amd64\ncur hostname: agent-comms\n")
    assert pve.pve_pending_changes(pending) == {}


def test_pending_rows_of_the_api_are_read_the_same():
    rows = [
        {"key": "arch", "value": "amd64"},
        {"key": "features", "pending": "nesting=1"},
        {"key": "nameserver", "value": "192.168.122.1", "delete": 1},
    ]
    assert pve.pve_pending_changes(pve.pve_pending(rows)) == {"features": "nesting=1", "nameserver": None}
    assert pve.pve_pending(rows)["arch"] == pve.pve_pending(PCT_PENDING)["arch"]


# -- what the role sets ------------------------------------------------------------------------


def wanted(**overrides):
    return {
        "hostname": "agent-comms",
        "cores": "2",
        "memory": "1024",
        "onboot": "1",
        "features": {"nesting": 1},
        "nameserver": "",
        "tags": "agent-comms;homelab",
        "description": "CT-950: the agent-comms broker\nOwner: Jürgen",
        "net0": {
            "name": "eth0",
            "bridge": "vmbr0",
            "ip": "192.168.122.86/24",
            "gw": "192.168.122.1",
            "tag": "20",
            "firewall": 1,
            "type": "veth",
        },
        **overrides,
    }


def test_a_container_as_asked_needs_no_change():
    assert pve.pve_changes(pve.pve_config(PCT_CONFIG), wanted()) == {}


def test_changes_keep_what_proxmox_added_and_drop_what_is_asked_away():
    current = pve.pve_config(PCT_CONFIG)
    net = wanted()["net0"] | {"gw": "", "tag": "", "firewall": ""}
    changes = pve.pve_changes(current, wanted(net0=net, memory="1536", nameserver="10.0.0.53"))
    assert changes == {
        "memory": "1536",
        "nameserver": "10.0.0.53",
        # the MAC address Proxmox chose stays; gateway, VLAN and firewall go
        "net0": "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:5E:2A:11,ip=192.168.122.86/24,type=veth",
    }


def test_values_that_mean_the_same_are_not_changes():
    current = pve.pve_config(PCT_CONFIG) | {"startup": "order=2,up=30", "searchdomain": "lan home.arpa"}
    same = wanted(tags="Homelab,agent-comms", startup="up=30,order=2", searchdomain="lan,home.arpa")
    assert pve.pve_changes(current, same) == {}
    assert pve.pve_tags(["Homelab", "agent-comms", "homelab"]) == "agent-comms;homelab"


def test_features_asked_for_are_set_and_others_kept():
    assert pve.pve_changes({"features": "keyctl=1"}, {"features": {"nesting": 1}}) == {"features": "keyctl=1,nesting=1"}
    assert pve.pve_changes({"features": "keyctl=1,nesting=1"}, {"features": {"nesting": 1}}) == {}
    assert pve.pve_changes({"features": "nesting=1"}, {"features": {"nesting": 0}}) == {"features": "nesting=0"}


def test_an_empty_value_leaves_the_option_as_it_is():
    assert pve.pve_changes({"nameserver": "1.1.1.1"}, {"nameserver": "", "description": None}) == {}


def test_mount_points_are_added_and_keep_their_volume():
    points = pve.pve_mount_points([{"volume": "local-zfs:4", "path": "/var/lib/agent-comms"}])
    assert points == {"mp0": {"volume": "local-zfs:4", "mp": "/var/lib/agent-comms", "backup": 1}}
    assert pve.pve_changes({}, points) == {"mp0": "local-zfs:4,mp=/var/lib/agent-comms,backup=1"}
    allocated = {"mp0": "local-zfs:subvol-950-disk-1,mp=/var/lib/agent-comms,backup=1,size=4G"}
    assert pve.pve_changes(allocated, pve.pve_mount_points([{"volume": "local-zfs:4", "path": "/var/lib/agent-comms"}],
                                                           allocated)) == {}  # fmt: skip
    unbacked = pve.pve_mount_points(
        [{"volume": "local-zfs:4", "path": "/var/lib/agent-comms", "backup": False}], allocated
    )
    assert pve.pve_changes(allocated, unbacked) == {
        "mp0": "local-zfs:subvol-950-disk-1,mp=/var/lib/agent-comms,backup=0,size=4G"
    }


def test_mount_points_are_matched_by_path_not_by_place_in_the_list():
    current = {
        "mp0": "local-zfs:subvol-950-disk-1,mp=/var/lib/agent-comms,backup=1,size=4G",
        "mp1": "local-zfs:subvol-950-disk-2,mp=/srv/scratch,backup=1,size=1G",
    }
    # the first item taken out: the other keeps mp1, nothing is mounted elsewhere
    points = pve.pve_mount_points([{"volume": "local-zfs:1", "path": "/srv/scratch"}], current)
    assert list(points) == ["mp1"] and pve.pve_changes(current, points) == {}
    # a new one takes the lowest free key
    points = pve.pve_mount_points([{"volume": "local-zfs:2", "path": "/srv/new"}], current)
    assert pve.pve_changes(current, points) == {"mp2": "local-zfs:2,mp=/srv/new,backup=1"}


def test_a_node_directory_is_bind_mounted_without_backup():
    points = pve.pve_mount_points([{"volume": "/tank/agent-comms", "path": "/var/lib/agent-comms", "ro": True}])
    assert pve.pve_changes({}, points) == {"mp0": "/tank/agent-comms,mp=/var/lib/agent-comms,ro=1"}


def test_what_a_protected_container_refuses():
    assert pve.pve_touches_volumes({"mp1": "local-zfs:1,mp=/srv"}) and pve.pve_touches_volumes({"rootfs": "x"})
    assert not pve.pve_touches_volumes({"memory": "1024", "net0": "name=eth0"})


def test_options_become_pct_arguments():
    assert pve.pve_options({"memory": "1024", "net0": "name=eth0"}) == ["--memory", "1024", "--net0", "name=eth0"]


def test_firewall_rules_are_told_apart_by_what_they_let_in():
    rules = pve.pve_firewall_rules([8080, 22], "192.168.122.0/24", "agent-comms (ansible proxmox_lxc)")
    assert [rule["dport"] for rule in rules] == ["8080", "22"]
    # as GET .../firewall/rules lists one (numbers as numbers, a position)
    listed = {"pos": 0, "type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "8080", "enable": 1,
              "source": "192.168.122.0/24", "comment": "agent-comms (ansible proxmox_lxc)", "ipversion": 4}  # fmt: skip
    assert pve.pve_rule_key(listed) == pve.pve_rule_key(rules[0])
    assert pve.pve_rule_key(listed | {"enable": 0}) != pve.pve_rule_key(rules[0])


# -- pveam --------------------------------------------------------------------------------------

AVAILABLE = [
    "almalinux-9-default_20240911_amd64.tar.xz",
    "debian-11-standard_11.7-1_amd64.tar.zst",
    "debian-12-standard_12.12-1_amd64.tar.zst",
    "debian-13-standard_13.1-2_amd64.tar.zst",
    "ubuntu-24.04-standard_24.04-2_amd64.tar.zst",
]
# pveam.pm: print sprintf("%-15s %s\n", $section, $template)
PVEAM_AVAILABLE = "".join("%-15s %s\n" % ("system", name) for name in AVAILABLE)
# printf "%-60s %-6s\n", qw(NAME SIZE); then "%-60s %-4.2fMB\n", volid, size/MiB
PVEAM_LIST = "%-60s %-6s\n" % ("NAME", "SIZE") + "".join(
    "%-60s %-4.2fMB\n" % (f"local:vztmpl/{name}", size)
    for name, size in (
        ("debian-12-standard_12.7-1_amd64.tar.zst", 120.29),
        ("debian-12-standard_12.2-1_amd64.tar.zst", 118.0),
    )
)


def test_pveam_available_and_list_are_read():
    assert [row["template"] for row in pve.pveam_available(PVEAM_AVAILABLE)] == AVAILABLE
    assert {row["section"] for row in pve.pveam_available(PVEAM_AVAILABLE)} == {"system"}
    assert pve.pveam_list(PVEAM_LIST) == [
        "debian-12-standard_12.7-1_amd64.tar.zst",
        "debian-12-standard_12.2-1_amd64.tar.zst",
    ]
    assert pve.pveam_list("%-60s %-6s\n" % ("NAME", "SIZE")) == []


@pytest.mark.parametrize(
    ("pattern", "names", "picked"),
    [
        # the newest build of the release: 12.12 after 12.7 and 12.2 (numbers, not text)
        ("debian-12-standard", ["debian-12-standard_12.7-1_amd64.tar.zst", "debian-12-standard_12.12-1_amd64.tar.zst",
                                "debian-12-standard_12.2-1_amd64.tar.zst"], "debian-12-standard_12.12-1_amd64.tar.zst"),
        ("debian-13-standard", AVAILABLE, "debian-13-standard_13.1-2_amd64.tar.zst"),
        ("debian-*-standard", AVAILABLE, "debian-13-standard_13.1-2_amd64.tar.zst"),
        ("debian-12-standard", ["debian-12-standard_12.12-1_arm64.tar.zst"], ""),  # another architecture
        ("debian-12", AVAILABLE, ""),  # a release is the whole part before the version
        # an exact name picks itself, and only if it is there
        ("debian-12-standard_12.12-1_amd64.tar.zst", AVAILABLE, "debian-12-standard_12.12-1_amd64.tar.zst"),
        ("debian-12-standard_12.11-1_amd64.tar.zst", AVAILABLE, ""),
    ],
)  # fmt: skip
def test_the_newest_template_of_a_release_is_picked(pattern, names, picked):
    assert pve.pve_newest_template(names, pattern) == picked


# -- pvesm ------------------------------------------------------------------------------------


def pvesm_status(rows):
    """pvesm.pm's $print_status: sizes in KiB, `% 7.2f%%`, the name column as wide as the
    longest name plus one."""
    width = max(len(row[0]) for row in rows) + 1
    text = f"%-{width}s %10s %10s %15s %15s %15s %8s\n" % ("Name", "Type", "Status", "Total", "Used", "Available", "%")
    for name, kind, status, total, used, available in rows:
        percent = "% 7.2f%%" % (used / total * 100 if total else 0)
        text += f"%-{width}s %10s %10s %15d %15d %15d %s\n" % (name, kind, status, total, used, available, percent)
    return text


def test_pvesm_status_of_a_zfs_install():
    text = pvesm_status([
        ("local", "dir", "active", 98497780, 3516940, 94980840),
        ("local-zfs", "zfspool", "active", 94981016, 96, 94980920),
        ("nfs-backup", "nfs", "inactive", 0, 0, 0),
    ])  # fmt: skip
    storages = pve.pvesm_status(text)
    assert [(row["name"], row["type"], row["status"]) for row in storages] == [
        ("local", "dir", "active"),
        ("local-zfs", "zfspool", "active"),
        ("nfs-backup", "nfs", "inactive"),
    ]
    assert storages[1]["available"] == 94980920


def test_storages_of_the_api_are_read_the_same():
    rows = [{"storage": "local-zfs", "type": "zfspool", "active": 1, "content": "images,rootdir"}]
    assert pve.pve_api_storages(rows) == [{"name": "local-zfs", "type": "zfspool", "status": "active"}]


# -- OpenSSH ---------------------------------------------------------------------------------

SSH_G = """\
user admin
hostname 192.168.122.2
port 2222
identityfile ~/.ssh/pve_ed25519
identityfile ~/.ssh/id_rsa
proxyjump bastion.lan
userknownhostsfile ~/.ssh/known_hosts ~/.ssh/known_hosts2
hostkeyalias none
"""


def test_ssh_settings_as_openssh_resolves_them():
    config = pve.ssh_config(SSH_G)
    assert (config["user"], config["hostname"], config["port"]) == ("admin", "192.168.122.2", "2222")
    assert config["identityfile"] == ["~/.ssh/pve_ed25519", "~/.ssh/id_rsa"]
    assert pve.known_hosts_name(config["hostname"], config["port"]) == "[192.168.122.2]:2222"
    assert pve.known_hosts_name("pve.lan", "22") == "pve.lan"


def test_a_jump_host_becomes_a_proxy_command():
    config = pve.ssh_config(SSH_G)
    assert pve.ssh_proxy_command(config, ["-F", "/home/me/ssh config"]) == (
        "ssh -F '/home/me/ssh config' -W [%h]:%p ssh://bastion.lan"
    )
    chain = config | {"proxyjump": "outer.example,inner.lan"}
    assert pve.ssh_proxy_command(chain) == "ssh -J outer.example -W [%h]:%p ssh://inner.lan"
    # as `ssh -G` prints a jump host with a user and port, or an address
    assert pve.ssh_proxy_command({"proxyjump": "admin@bastion:2222"}) == "ssh -W [%h]:%p ssh://admin@bastion:2222"
    assert pve.ssh_proxy_command({"proxyjump": "[10.0.0.5]"}) == "ssh -W [%h]:%p 'ssh://[10.0.0.5]'"
    assert (
        pve.ssh_proxy_command(config | {"proxycommand": "nc -X 5 -x proxy:1080 %h %p"}) == "nc -X 5 -x proxy:1080 %h %p"
    )
    assert pve.ssh_proxy_command({"proxyjump": "none"}) == ""
    assert pve.shell_words("-o UserKnownHostsFile='/tmp/a b' -F x") == ["-o", "UserKnownHostsFile=/tmp/a b", "-F", "x"]


# -- wheels for a host's Python ------------------------------------------------------------

CONTROLLER_WHEELS = [
    "agent_comms_broker-0.2.0-py3-none-any.whl",
    "bottle-0.13.5-py2.py3-none-any.whl",
    "gevent-26.9.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "zope_interface-8.7-cp311-cp311-manylinux1_x86_64.manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
]
DEBIAN_12 = {"version": [3, 11, 2], "implementation": "cpython", "machine": "x86_64", "libc": ["glibc", "2.36"]}
DEBIAN_13 = {"version": [3, 13, 5], "implementation": "cpython", "machine": "x86_64", "libc": ["glibc", "2.41"]}


def test_wheels_that_fit_the_hosts_python():
    assert wheels.wheels_not_fitting(CONTROLLER_WHEELS, DEBIAN_12) == []
    assert wheels.wheels_not_fitting(CONTROLLER_WHEELS, DEBIAN_13) == CONTROLLER_WHEELS[2:]
    old_glibc = DEBIAN_12 | {"libc": ["glibc", "2.24"]}  # manylinux_2_28 needs glibc 2.28
    assert wheels.wheels_not_fitting(CONTROLLER_WHEELS, old_glibc) == [CONTROLLER_WHEELS[2]]
    arm = DEBIAN_12 | {"machine": "aarch64"}
    assert wheels.wheels_not_fitting(CONTROLLER_WHEELS, arm) == CONTROLLER_WHEELS[2:]


def test_pip_download_asks_for_the_hosts_python_and_the_controllers_versions():
    options = wheels.pip_download_options(DEBIAN_13)
    assert options[:5] == ["--only-binary=:all:", "--python-version", "3.13", "--implementation", "cp"]
    assert "manylinux_2_41_x86_64" in options and "manylinux2014_x86_64" in options and "manylinux1_x86_64" in options
    assert "linux_x86_64" not in options  # PyPI has only manylinux wheels
    assert wheels.wheel_requirements(CONTROLLER_WHEELS) == [
        "agent-comms-broker==0.2.0", "bottle==0.13.5", "gevent==26.9.0", "zope-interface==8.7",
    ]  # fmt: skip
    versions = ["agent-comms-broker==0.2.0", "agent-comms-chat==0.2.0", "mcp==2.3.0"]
    projects = ["agent-comms-broker", "agent-comms-chat[mcp]", "not-in-the-wheelhouse"]
    assert wheels.project_requirements(versions, projects) == [
        "agent-comms-broker==0.2.0",
        "agent-comms-chat[mcp]==0.2.0",
    ]
