"""The guard on the two test tiers (docs/testing.md).

``make test`` runs the fast tier (``-m "not slow"``), ``make test-all`` every test. So that the
fast tier cannot grow back into a long one unnoticed, every run checks, on the durations pytest
measured in that same run:

- each fast test (one without the ``slow`` marker) took at most ``fast_test_limit_s`` seconds,
  setup, call and teardown together (a session fixture's setup counts against the first test
  that uses it);
- the fast tests together took at most ``fast_tier_limit_s`` seconds; in a run spread over
  processes by pytest-xdist (``make test-all``'s parallel part), those each worker process ran,
  since the workers run side by side.

A run that breaks either fails (exit status 1) and its summary names each test over the limit
with its time. The limits are pytest ini options (``pyproject.toml``), generous against machine
noise: over twice the slowest fast test, and the tier's goal (10 minutes), which its tests
take well under on a 2-core machine (docs/testing.md has the figures).
A test that cannot be made fast belongs in the slow tier; the guard never skips or retries.
"""

from __future__ import annotations

import pytest

SLOW = "slow"


def add_options(parser: pytest.Parser) -> None:
    parser.addini("fast_test_limit_s", "most seconds one fast-tier test may take (setup + call + teardown)",
                  type="string", default="40")
    parser.addini("fast_tier_limit_s", "most seconds the fast tier's tests may take together", type="string",
                  default="600")


def _limit(config: pytest.Config, name: str) -> float:
    raw = config.getini(name)
    try:
        value = float(raw)
    except ValueError:
        raise pytest.UsageError(f"ini option {name}: {raw!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise pytest.UsageError(f"ini option {name}: {raw!r} is not a finite number > 0")
    return value


def is_xdist_worker(config: pytest.Config) -> bool:
    """Whether this process is a pytest-xdist worker (its controller judges the whole run)."""
    return hasattr(config, "workerinput")


class TierGuard:
    """Collects each fast test's time from its reports and judges them at the session's end.

    A test is slow when its report carries the ``slow`` keyword (its markers, the ones conftest
    adds included): under pytest-xdist the controller, which judges, collects no items itself."""

    def __init__(self, config: pytest.Config):
        self.test_limit_s = _limit(config, "fast_test_limit_s")
        self.tier_limit_s = _limit(config, "fast_tier_limit_s")
        self.seconds: dict[str, float] = {}
        self.worker_of: dict[str, str] = {}
        self.problems: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if SLOW in report.keywords:
            return
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration
        node = getattr(report, "node", None)  # set by pytest-xdist's controller: the worker that ran it
        self.worker_of[report.nodeid] = node.gateway.id if node is not None else ""

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        over = sorted(((s, t) for t, s in self.seconds.items() if s > self.test_limit_s), reverse=True)
        self.problems = [f"{test}: {seconds:.1f} s, over the fast tier's limit of {self.test_limit_s:g} s per test"
                         for seconds, test in over]
        per_worker: dict[str, list[float]] = {}
        for test, seconds in self.seconds.items():
            per_worker.setdefault(self.worker_of[test], []).append(seconds)
        for worker, times in sorted(per_worker.items()):
            if sum(times) > self.tier_limit_s:
                where = f" on worker {worker}" if worker else ""
                self.problems.append(f"the fast tier's {len(times)} tests{where} took {sum(times):.1f} s together, "
                                     f"over its limit of {self.tier_limit_s:g} s")
        if self.problems and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.problems:
            terminalreporter.section("tier guard: the fast tier grew (make it faster, or mark it slow)", red=True)
            for line in self.problems:
                terminalreporter.line(line, red=True)
