"""The guard on the test tiers (tests/helpers/tier_guard.py), run on small suites of its own
through pytest's ``pytester``: a fast test over its limit, or a fast tier over its total, fails
the run and is named; a slow test is not counted; a limit that is not a number is refused."""

import pytest

CONFTEST = """
import sys
sys.path.insert(0, {helpers!r})
from tier_guard import TierGuard, add_options

def pytest_addoption(parser):
    add_options(parser)

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slow tier")
    config.pluginmanager.register(TierGuard(config), "tier_guard")
"""

SUITE = """
import time
import pytest

def test_quick():
    pass

def test_sleeps():
    time.sleep({sleep})

@pytest.mark.slow
def test_slow_sleeps():
    time.sleep({sleep})
"""


def suite(pytester, test_limit: str, tier_limit: str, sleep: float = 1.0):
    from pathlib import Path

    helpers = str(Path(__file__).parent / "helpers")
    pytester.makeconftest(CONFTEST.format(helpers=helpers))
    pytester.makeini(f"[pytest]\nfast_test_limit_s = {test_limit}\nfast_tier_limit_s = {tier_limit}\n")
    pytester.makepyfile(test_suite=SUITE.format(sleep=sleep))


def test_a_fast_test_over_its_limit_fails_the_run_and_is_named(pytester):
    suite(pytester, test_limit="0.5", tier_limit="600")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=3)  # every test passed; the guard failed the run
    result.stdout.fnmatch_lines(["*tier guard: the fast tier grew*",
                                 "test_suite.py::test_sleeps: 1.* s, over the fast tier's limit of 0.5 s per test"])
    assert "test_slow_sleeps" not in result.stdout.str().split("tier guard")[1]  # the slow tier is not counted


def test_the_fast_tier_over_its_total_fails_the_run(pytester):
    suite(pytester, test_limit="600", tier_limit="0.3", sleep=0.4)
    result = pytester.runpytest("-m", "not slow")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["the fast tier's 2 tests took 0.4 s together, over its limit of 0.3 s"])


def test_within_the_limits_the_run_passes_and_slow_tests_are_not_counted(pytester):
    suite(pytester, test_limit="0.5", tier_limit="0.5")
    assert pytester.runpytest("-m", "slow").ret == pytest.ExitCode.OK  # the slow test alone: over both, not counted
    assert pytester.runpytest("-k", "quick").ret == pytest.ExitCode.OK


def test_a_limit_that_is_not_a_positive_number_is_refused(pytester):
    for bad in ("soon", "0", "nan", "inf"):
        suite(pytester, test_limit=bad, tier_limit="600")
        result = pytester.runpytest()
        assert result.ret == pytest.ExitCode.USAGE_ERROR, bad
        assert f"ini option fast_test_limit_s: '{bad}'" in result.stderr.str(), bad


XDIST_FILE = """
import time

def test_one():
    time.sleep(0.3)

def test_two():
    time.sleep(0.3)

def test_three():
    time.sleep(0.3)
"""


def test_over_worker_processes_the_tier_total_is_judged_per_worker(pytester):
    """make test-all's parallel part: two files of three fast tests (0.9 s each file, 1.8 s in
    all), one file per worker (pytest-xdist, --dist loadfile). Against a total of 1.3 s the run
    passes: each worker's share is under it; against 0.6 s it fails, naming each worker."""
    suite(pytester, test_limit="600", tier_limit="1.3")
    pytester.makepyfile(test_a=XDIST_FILE, test_b=XDIST_FILE)
    options = ("-p", "xdist", "-n", "2", "--dist", "loadfile", "--no-loadscope-reorder", "-k", "not sleeps")
    assert pytester.runpytest_subprocess("-k", "not sleeps").ret == pytest.ExitCode.TESTS_FAILED  # 1.8 s in one
    result = pytester.runpytest_subprocess(*options)
    result.assert_outcomes(passed=7)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-2000:]

    suite(pytester, test_limit="600", tier_limit="0.6")
    result = pytester.runpytest_subprocess(*options)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["the fast tier's * tests on worker gw0 took * s together, over its limit of 0.6 s",
                                 "the fast tier's * tests on worker gw1 took * s together, over its limit of 0.6 s"])
