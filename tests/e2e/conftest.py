"""The end-to-end tests run as steps of one deployment (tests/e2e/steps.py):

- When a step (a fixture broader than one test) fails, its own error says what broke;
  every later test that needs it fails at once with one line naming it, rather than
  repeating the same error and traceback.
- A slow step's time (@setup_takes_up_to) is added to the time limit of the first test
  that sets it up, so every test keeps a limit of its own, whichever tests are selected."""

import os
import uuid
from pathlib import Path

import pytest
from host_commands import run
from proxmox_node import (
    BRIDGE,
    NODE_FILES,
    Make,
    install_standin,
    make_bridge,
    remove_container,
    remove_standin,
    start_sshd,
    stop_sshd,
)
from steps import SETUP_TIMEOUTS, setup_takes_up_to

from debian_packages import require_files

# (node id of the fixture's scope: its module, "" for the session; fixture) -> the test
# whose setup it failed in.
failed_steps = {}
running_test = {}


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    try:
        return (yield)
    except pytest.skip.Exception:
        raise
    except BaseException:
        if fixturedef.scope != "function":
            failed_steps[(request.node.nodeid, fixturedef.argname)] = running_test.get("nodeid", "?")
        raise


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    running_test["nodeid"] = item.nodeid
    module = item.getparent(pytest.Module).nodeid
    for name in item.fixturenames:
        for scope in (module, ""):
            if (scope, name) in failed_steps:
                pytest.fail(f"not run: step '{name}' failed in {failed_steps[scope, name]}", pytrace=False)


def own_timeout(item):
    """The test's time limit as pytest-timeout sets it: its marker, else --timeout,
    PYTEST_TIMEOUT or the ini file's `timeout`; 0 for none."""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        return float(marker.kwargs.get("timeout", marker.args[0] if marker.args else 0) or 0)
    config = item.config
    return float(config.getoption("timeout", None) or os.environ.get("PYTEST_TIMEOUT") or config.getini("timeout") or 0)


def setup_time(module, name):
    """What a step may take to set up: its own module's fixture, else the shared one of
    this file (module-scoped: set up once in each module that uses it)."""
    return SETUP_TIMEOUTS.get((module, name), SETUP_TIMEOUTS.get(("conftest", name)))


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect: the tests that will run
def pytest_collection_modifyitems(config, items):
    set_up = set()
    for item in items:
        steps = [(item.module.__name__, name) for name in item.fixturenames]
        new = [step for step in steps if setup_time(*step) and step not in set_up]
        set_up.update(new)
        limit = own_timeout(item)
        if new and limit:
            item.add_marker(pytest.mark.timeout(limit + sum(setup_time(*step) for step in new)), append=False)


# -- the steps the LXC modules share: this machine as a Proxmox node ---------------------------


@pytest.fixture(scope="module")
@setup_takes_up_to(900)
def host_tools():
    """LXC, debootstrap, zstd, sshd, sudo, dnsmasq and openssl on this machine, from apt
    if missing."""
    if os.geteuid() != 0:
        pytest.skip("makes LXC containers, a bridge and users: needs root")
    require_files(NODE_FILES, "the LXC end-to-end tests")


@pytest.fixture(scope="module")
def standin(host_tools):
    """Proxmox's tools, stood in for, at the paths the role and the pct connection call;
    removed afterwards with all they made."""
    for container in Path("/var/lib/lxc").glob("*/pct.conf"):  # left by a run that died
        remove_container(container.parent.name)
    added = install_standin()
    yield
    for container in Path("/var/lib/lxc").glob("*/pct.conf"):
        remove_container(container.parent.name)
    remove_standin(added)


@pytest.fixture(scope="module")
def bridge(host_tools):
    created = make_bridge()
    yield BRIDGE
    if created:
        run("ip", "link", "delete", BRIDGE, check=False)


@pytest.fixture(scope="module")
def sshd(host_tools, tmp_path_factory):
    started = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield started
    stop_sshd(started)


@pytest.fixture(scope="module")
def controller_home(sshd, tmp_path_factory):
    """The home directory `make` runs with: ~/.ssh/known_hosts holds the node's host key,
    as it does once a user has logged into the node by hand."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "known_hosts").write_text(sshd["known_line"])
    return home


@pytest.fixture(scope="module")
def vault_password_file(tmp_path_factory):
    """The ansible-vault password, in a file only root reads, as a user keeps it."""
    path = tmp_path_factory.mktemp("vault") / "password"
    path.write_text(uuid.uuid4().hex + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def make(inventory, vault_password_file, controller_home, tmp_path_factory):
    backups, control_paths = tmp_path_factory.mktemp("backups"), tmp_path_factory.mktemp("cp")
    make = Make(inventory, backups, control_paths, vault_password_file, controller_home)
    yield make
    make.close_connections()
