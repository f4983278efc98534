"""The CI skip rule (tests/ci_skip_rule.py) itself: pytest, run on small generated test
files, fails the skips of tests CI must run when CI=true, and only then."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

GENERATED = {
    "pytest.ini": "[pytest]\n",
    # Skipped the ways the e2e and reliability tests skip: a mark, a fixture, the test.
    "e2e/test_marked.py": (
        "import pytest\n"
        "pytestmark = pytest.mark.skipif(True, reason='creates LXC containers: needs root')\n"
        "def test_deploy():\n    pass\n"
    ),
    "e2e/test_fixture.py": (
        "import pytest\n"
        "@pytest.fixture(scope='module')\n"
        "def bridge():\n    pytest.skip('10.250.77.0/24 is in use on this machine')\n"
        "def test_first(bridge):\n    pass\n"
    ),
    "test_reliability.py": (
        "import pytest\n"
        "def test_full_disk():\n    pytest.skip('cannot mount a small tmpfs to fill')\n"
        "def test_sigkill():\n    pass\n"
    ),
    # Not a test CI must run: its skip stays a skip. An expected failure stays one.
    "test_other.py": "import pytest\ndef test_optional():\n    pytest.skip('no wrk here')\n",
    "e2e/test_known_bug.py": ("import pytest\n@pytest.mark.xfail(reason='known')\ndef test_bug():\n    assert False\n"),
}


def pytest_run(directory, ci, *paths):
    env = {key: value for key, value in os.environ.items() if key not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(TESTS)
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-p", "ci_skip_rule", "-p", "no:cacheprovider", "-rA", *paths]
    return subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def project(tmp_path):
    for name, text in GENERATED.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_under_ci_a_skip_of_a_test_ci_must_run_is_a_failure_naming_its_reason(project):
    result = pytest_run(project, "true")
    assert result.returncode == 1, result.stdout
    summary = result.stdout.splitlines()
    # A skip in setup (a mark, a fixture) fails as an error of the setup, as pytest reports it.
    assert sorted(line for line in summary if line.startswith(("FAILED", "ERROR"))) == [
        "ERROR e2e/test_fixture.py::test_first - skipped, but CI=true and test_fixture.py "
        "must run in CI: 10.250.77.0/24 is in use on this machine",
        "ERROR e2e/test_marked.py::test_deploy - skipped, but CI=true and test_marked.py "
        "must run in CI: creates LXC containers: needs root",
        "FAILED test_reliability.py::test_full_disk - skipped, but CI=true and test_reliability.py "
        "must run in CI: cannot mount a small tmpfs to fill",
    ], result.stdout
    assert any(line.startswith("SKIPPED") and "no wrk here" in line for line in summary), result.stdout
    assert any(line.startswith("XFAIL") and "test_bug" in line for line in summary), result.stdout
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 2 errors" in result.stdout, result.stdout


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_outside_ci_skips_stay_skips(project, ci):
    result = pytest_run(project, ci)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 4 skipped, 1 xfailed" in result.stdout, result.stdout


def test_under_ci_a_module_skipped_whole_fails_too(project):
    (project / "e2e" / "test_module.py").write_text(
        "import pytest\npytest.skip('not Debian', allow_module_level=True)\ndef test_never():\n    pass\n"
    )
    result = pytest_run(project, "true", "e2e/test_module.py", "test_reliability.py")
    assert result.returncode != 0, result.stdout
    assert "must run in CI: not Debian" in result.stdout, result.stdout
    assert pytest_run(project, None, "e2e/test_module.py", "test_reliability.py").returncode == 0
