from __future__ import annotations

import os

import pytest

# One OpenMP thread for every process the tests start: the servers share two cores, and
# oversubscribed training threads made fit times swing from 5 s to over 80 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.helpers import REAL_DATA, SAMPLE, credit_risk, mlflow_tracking_server, running, serving_service


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


@pytest.fixture(scope="session")
def sample_path():
    assert SAMPLE.is_file(), f"bundled sample missing: {SAMPLE}"
    return SAMPLE


@pytest.fixture(scope="session")
def real_data_path():
    if not REAL_DATA.is_file():
        if os.environ.get("CREDIT_RISK_REQUIRE_REAL_DATA") == "1":
            pytest.fail(f"CREDIT_RISK_REQUIRE_REAL_DATA=1 but {REAL_DATA} is absent")
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
