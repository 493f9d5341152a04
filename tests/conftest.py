"""Suite-wide rules.

A test that cannot run for a missing prerequisite calls ``pytest.skip(reason)``. Under
``CI=true`` every such skip is turned into a failure here, so CI can never pass by skipping.
"""

from __future__ import annotations

import os

import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # a run without the dev extra: property tests then fail to import
    pass
else:
    # Property tests (tests/hostile/, and wherever else a `fuzz` test lives): a bounded
    # number of examples in every run; `make fuzz` selects the long profile with
    # HYPOTHESIS_PROFILE=fuzz. No deadline: the machine is shared and timing is not
    # what these tests check.
    # No example database either: nothing is written into the working tree.
    # HYPOTHESIS_MAX_EXAMPLES lengthens or shortens a fuzz run (examples per property).
    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    _common = {"deadline": None, "database": None, "suppress_health_check": _quiet}
    settings.register_profile("ci", max_examples=40, **_common)  # type: ignore[arg-type]
    _long = int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "3000"))
    settings.register_profile("fuzz", max_examples=_long, **_common)  # type: ignore[arg-type]
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    # pytest-randomly prints its seed only in the header, which -q hides and a long run
    # scrolls away: repeat it last, beside the failures, in the form that replays the order.
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(
            f"random order: replay it with `pytest -p randomly --randomly-seed={seed}`"
        )
