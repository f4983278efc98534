"""The end-to-end tests run as steps of one deployment (tests/e2e/steps.py):

- When a step (a fixture broader than one test) fails, its own error says what broke;
  every later test that needs it fails at once with one line naming it, rather than
  repeating the same error and traceback.
- A slow step's time (@setup_takes_up_to) is added to the time limit of the first test
  that sets it up, so every test keeps a limit of its own, whichever tests are selected."""

import os

import pytest
from steps import SETUP_TIMEOUTS

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


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect: the tests that will run
def pytest_collection_modifyitems(config, items):
    set_up = set()
    for item in items:
        steps = [(item.module.__name__, name) for name in item.fixturenames]
        new = [step for step in steps if step in SETUP_TIMEOUTS and step not in set_up]
        set_up.update(new)
        limit = own_timeout(item)
        if new and limit:
            item.add_marker(pytest.mark.timeout(limit + sum(SETUP_TIMEOUTS[step] for step in new)), append=False)
