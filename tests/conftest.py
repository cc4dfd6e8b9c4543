"""Session fixtures shared by the suite, and the rule that CI never skips.

A skipped test guarantees nothing, and a guarantee the README states must hold where CI runs.
So when ``CI`` is true, or any ``CREDIT_RISK_REQUIRE_*`` variable is ``1`` (``.ci/run`` sets
them), every skip (a ``skip`` marker, ``pytest.skip`` in a test or fixture, a module skipped
at collection) is turned into a failure that shows the skip's reason. ``CI_MAY_SKIP`` lists
the tests allowed to skip even then, each with why; it is empty and should stay so.
"""

from __future__ import annotations

import os
import random

import mlflow
import pytest

# One OpenMP thread for every process the tests start: the servers share two cores, and
# oversubscribed training threads made fit times swing from 5 s to over 80 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.helpers import REAL_DATA, SAMPLE, credit_risk, mlflow_tracking_server, running, serving_service

# Node ids (``tests/x.py::test_y``) that may skip under CI, each with the reason it cannot run
# there. Every test can run in CI today (root, Docker, PostgreSQL and the real data are there).
CI_MAY_SKIP: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    """The fault suite's random seed (``test_fault_injection.EXTRA_SEED``), drawn once here and
    handed to every parallel worker through the environment: workers must collect the same
    test ids, and the seed is part of one."""
    if not hasattr(config, "workerinput") and not os.environ.get("CREDIT_RISK_FAULT_SEED"):
        os.environ["CREDIT_RISK_FAULT_SEED"] = str(random.SystemRandom().randrange(1 << 32))


def _why_skips_fail() -> str | None:
    """The setting that makes a skip a failure in this run, or None when skips are allowed."""
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}:
        return f"CI={os.environ['CI']}"
    required = sorted(
        name for name, value in os.environ.items() if name.startswith("CREDIT_RISK_REQUIRE_") and value == "1"
    )
    return ", ".join(f"{name}=1" for name in required) or None


def _skip_reason(report: pytest.BaseReport) -> str:
    """A skip report's reason and where it was raised (its longrepr is (path, line, reason))."""
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        path, line, reason = report.longrepr
        return f"{reason.removeprefix('Skipped: ')} ({path}:{line})"
    return str(report.longrepr)


def _fail_the_skip(report: pytest.BaseReport, nodeid: str) -> None:
    why = _why_skips_fail()
    if why is None or not report.skipped or hasattr(report, "wasxfail") or nodeid in CI_MAY_SKIP:
        return  # an expected failure (xfail) is reported as skipped too, and is no skip
    reason = _skip_reason(report)
    report.outcome = "failed"
    report.longrepr = f"skipped under {why}, where no test may skip: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    _fail_the_skip(report, item.nodeid)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    _fail_the_skip(report, collector.nodeid)
    return report


def pytest_terminal_summary(terminalreporter):
    """Tests that recorded a ``replay`` property (``record_property``: the fault suite's seeds)
    are listed at the end of every run, passed or not, with the command that runs them again."""
    outcomes: dict[str, tuple[str, str]] = {}
    for category, reports in terminalreporter.stats.items():
        for report in reports:
            replay = dict(getattr(report, "user_properties", ())).get("replay")
            if replay and (report.nodeid not in outcomes or report.failed):
                outcomes[report.nodeid] = (category or report.outcome, replay)
    if outcomes:
        terminalreporter.section("replay")
        for nodeid, (outcome, replay) in sorted(outcomes.items()):
            terminalreporter.line(f"{outcome.upper()} {nodeid}\n    {replay}")


@pytest.fixture(autouse=True)
def _no_leaked_active_experiment():
    """``mlflow.set_experiment`` pins the active experiment process-wide (and exports
    MLFLOW_EXPERIMENT_ID to every child process); a test that leaves it set breaks later
    modules with "No Experiment with id=N", far from the cause. Fail the test that did it."""
    before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    yield
    after = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if after != before:
        pytest.fail(f"this test left MLFLOW_EXPERIMENT_ID={after!r} set: use an explicit experiment_id")


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """``mlflow.set_tracking_uri`` sets a process-wide URI that wins over MLFLOW_TRACKING_URI
    (and exports that variable too). A later test in the same xdist worker that points MLflow
    elsewhere through the variable then talks to the earlier test's server: CI saw a sidecar
    meant to find nobody ship into another module's MLflow. Each test ends with the URI as it
    began (a module fixture's URI is exported, so the variable carries it)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(None)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def sample_path():
    assert SAMPLE.is_file(), f"bundled sample missing: {SAMPLE}"
    return SAMPLE


@pytest.fixture(scope="session")
def real_data_path():
    if not REAL_DATA.is_file():  # a failure under CI (see the top of this file)
        pytest.skip(f"real data not present at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory):
    """A real MLflow tracking server on a free port, shared by the session."""
    with mlflow_tracking_server(tmp_path_factory.mktemp("stack")) as uri:
        yield uri


@pytest.fixture(scope="session")
def trained(tracking_uri, sample_path):
    """The bundled sample trained, registered and promoted once for the session."""
    result = credit_risk("train", "--data", str(sample_path), tracking_uri=tracking_uri)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="session")
def mlserver(trained, tracking_uri, tmp_path_factory):
    """A real MLServer serving the Production model, on free ports."""
    state_dir = tmp_path_factory.mktemp("serving")
    service, ports = serving_service(tracking_uri)
    with running(service, state_dir):
        yield {"url": f"http://127.0.0.1:{ports['http']}", "log": service.log_path(state_dir), **ports}
