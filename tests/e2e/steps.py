"""The end-to-end modules are steps of one deployment: module fixtures (the host's tools,
the template, the bridge, the deploy...) that the tests after them build on. What
tests/e2e/conftest.py does with them: a failed step stops the tests that need it with
one line each, and the time a slow step may take goes to the first test that runs it."""

# (module, fixture) -> seconds its setup may take, beyond a test's own time limit.
SETUP_TIMEOUTS = {}


def setup_takes_up_to(seconds):
    """Put under @pytest.fixture: the first test that sets this fixture up gets `seconds`
    more time (pytest-timeout counts fixture setup as part of the test)."""

    def record(fixture_function):
        SETUP_TIMEOUTS[(fixture_function.__module__, fixture_function.__name__)] = seconds
        return fixture_function

    return record
