"""The host_wheelhouse role, run for real by ansible-playbook against this machine (a local
connection): a Python too old for what is installed, or none at all, fails before anything
changes, with a message that says what to do; a Python the controller's wheelhouse was
built for uses that wheelhouse as it is. (Fetching wheels for another Python, from PyPI,
is what the end-to-end tests show: tests/e2e/test_lxc_fresh_node.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOK = """\
- hosts: target
  gather_facts: false
  roles:
    - role: host_wheelhouse
  tasks:
    - name: Say which wheelhouse
      ansible.builtin.copy:
        content: "{{ {'dir': host_wheelhouse_dir, 'host': host_wheelhouse_host} | to_json }}"
        dest: "{{ result }}"
        mode: "0644"
"""


@pytest.fixture
def wheelhouse(tmp_path):
    """A controller's wheelhouse with wheels any CPython 3 on any machine installs."""
    directory = tmp_path / "wheelhouse"
    directory.mkdir()
    for name in ("agent_comms_chat-0.2.0-py3-none-any.whl", "requests-2.34.2-py3-none-any.whl"):
        (directory / name).write_bytes(b"")
    return directory


def play(tmp_path, wheelhouse, **variables):
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    inventory = {
        "all": {"hosts": {"target": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}
    }
    (tmp_path / "inventory.json").write_text(json.dumps(inventory))
    extra = {
        "host_wheelhouse_source": str(wheelhouse),
        "host_wheelhouse_projects": ["agent-comms-chat"],
        "host_wheelhouse_what": "agent-chat",
        "result": str(tmp_path / "result.json"),
        **variables,
    }
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "ansible" / "roles"), "ANSIBLE_NOCOLOR": "1"}
    command = [Path(sys.executable).with_name("ansible-playbook"), "-i", tmp_path / "inventory.json",
               tmp_path / "play.yml", "-e", json.dumps(extra)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=110)


def test_a_python_too_old_fails_first_saying_what_it_is(tmp_path, wheelhouse):
    version = ".".join(map(str, sys.version_info[:2]))
    result = play(tmp_path, wheelhouse, host_wheelhouse_minimum="3.99", host_wheelhouse_python=sys.executable)
    assert result.returncode != 0
    output = " ".join(result.stdout.split())
    assert f"target cannot run agent-chat: it needs CPython 3.99 or newer at {sys.executable}" in output, output
    assert f"that Python is cpython {version}" in output, output
    assert not (tmp_path / "result.json").exists()


def test_no_python_at_all_fails_saying_so(tmp_path, wheelhouse):
    result = play(tmp_path, wheelhouse, host_wheelhouse_python="/nonexistent/python3")
    assert result.returncode != 0
    assert "needs CPython 3.9 or newer at /nonexistent/python3, and there is none" in " ".join(result.stdout.split())


def test_a_python_the_wheelhouse_suits_uses_it_as_it_is(tmp_path, wheelhouse):
    result = play(tmp_path, wheelhouse, host_wheelhouse_python=sys.executable)
    assert result.returncode == 0, result.stdout[-3000:]
    said = json.loads((tmp_path / "result.json").read_text())
    assert said["dir"] == str(wheelhouse)
    assert said["host"]["version"][:2] == list(sys.version_info[:2])
    assert said["host"]["implementation"] == "cpython"
    assert not list(tmp_path.glob("wheelhouse-cp*"))  # nothing fetched
