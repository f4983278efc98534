"""Under CI=true, a test that CI must run may not skip: its skip is reported as a failure
naming the reason. Without this, CI could pass having proved nothing: the end-to-end
tests skip when not root, not on Debian, when their subnet is taken or a real `pct`
exists; the full-disk tests skip when the tmpfs mount fails; the metrics and
dashboard tests when Prometheus or Chromium cannot be installed (not root).

A pytest plugin (tests/conftest.py loads it); tests/test_ci_skip_rule.py checks it."""

import os
from pathlib import Path

import pytest

# The tests CI must run: every test under a directory of these names, and these files
# (paths relative to the rootdir, where pytest.ini is).
MUST_RUN_DIRECTORIES = {"e2e"}
MUST_RUN_FILES = {"test_reliability.py", "test_metrics.py", "test_dashboard.py"}


def in_ci():
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def must_run(config, path):
    path = Path(path)
    if path.is_relative_to(config.rootpath):
        path = path.relative_to(config.rootpath)
    return bool(MUST_RUN_DIRECTORIES & set(path.parts[:-1])) or path.name in MUST_RUN_FILES


def skip_reason(longrepr):
    if isinstance(longrepr, tuple):  # (file, line, "Skipped: reason")
        return longrepr[2].removeprefix("Skipped: ")
    return str(longrepr)


def fail_instead(report, path):
    report.outcome = "failed"
    report.longrepr = f"skipped, but CI=true and {path.name} must run in CI: {skip_reason(report.longrepr)}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and in_ci() and must_run(item.config, item.path):
        fail_instead(report, item.path)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped (pytest.skip(..., allow_module_level=True)) is caught here."""
    report = yield
    if report.skipped and in_ci() and must_run(collector.config, collector.path):
        fail_instead(report, collector.path)
    return report
