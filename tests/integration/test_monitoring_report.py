"""Profiles and monitoring runs in a real MLflow: a profile stored with a run reads back
equal; a profile can be reconstructed from what any training run logs (as for versions trained
before training logged profiles); a monitoring run carries the window's metrics, tags, JSON
and figures. That training logs the profile, and the command that reads it back, are
``test_monitor_command.py``'s."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from model import scoring
from model.identity import HELD_OUT_ARTIFACT, REGISTERED_MODEL_NAME
from model.schema import FEATURES, TARGET
from monitoring.report import MONITORING_EXPERIMENT, log_monitoring_run
from monitoring.status import LEVEL
from monitoring.store import load_profile, log_profile, reconstruct_from_run
from monitoring.window import monitor_window
from tests.helpers import credit_risk, mlflow_tracking_server
from training.profile import SOURCE_RECONSTRUCTED, build_profile

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of this module's own: it registers a version, which no other module expects."""
    with mlflow_tracking_server(tmp_path_factory.mktemp("monitoring-report")) as uri:
        yield uri


@pytest.fixture(scope="module")
def client(server):
    return MlflowClient(server)


@pytest.fixture(scope="module")
def version(server, client, sample_path):
    """A version trained by ``credit-risk train``."""
    result = credit_risk("train", "--data", str(sample_path), "--set", "max_iter=50", tracking_uri=server)
    assert result.returncode == 0, result.stdout + result.stderr
    found = client.search_model_versions(f"name = '{REGISTERED_MODEL_NAME}'")
    return max(found, key=lambda v: int(v.version))


@pytest.fixture(scope="module")
def served(server, version):
    """The version loaded as serving loads it (MLflow's loader reads the global tracking URI)."""
    mlflow.set_tracking_uri(server)
    try:
        return scoring.load(f"models:/{REGISTERED_MODEL_NAME}/{version.version}")
    finally:
        mlflow.set_tracking_uri(None)


def artifact(client, run_id: str, path: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as directory:
        return pd.read_parquet(client.download_artifacts(run_id, path, directory))


def test_a_profile_stored_with_a_run_reads_back_equal(client, version, sample_path):
    run = client.create_run(client.get_run(version.run_id).info.experiment_id)
    features = pd.read_csv(sample_path, index_col=0).drop(columns=TARGET)
    probability = np.random.default_rng(0).uniform(size=len(features))
    profile = build_profile(features, probability, 0.25)
    log_profile(client, run.info.run_id, profile)
    back = load_profile(client, run.info.run_id)
    assert back.to_json() == profile.to_json()
    np.testing.assert_array_equal(back.score.values, np.unique(probability))


def test_a_profile_is_reconstructed_from_the_rows_a_training_run_logs(client, version, served):
    profile = reconstruct_from_run(client, version.run_id, lambda frame: served.score_frame(frame)[1])
    assert profile.source == SOURCE_RECONSTRUCTED
    held_out = artifact(client, version.run_id, HELD_OUT_ARTIFACT)
    provenance = profile.provenance
    assert provenance["held_out_rows"] == len(held_out) and provenance["run_id"] == version.run_id
    assert provenance["rows"] == provenance["training_sample_rows"] + len(held_out)
    assert profile.threshold == client.get_run(version.run_id).data.metrics["threshold"]
    assert profile.threshold == served.scorer.threshold
    # Every held-out probability is among the profile's score values.
    assert np.isin(held_out["probability"].to_numpy(), profile.score.values).all()


def test_a_monitoring_run_carries_metrics_tags_json_and_figures(client, version, served):
    profile = reconstruct_from_run(client, version.run_id, lambda frame: served.score_frame(frame)[1])
    held_out = artifact(client, version.run_id, HELD_OUT_ARTIFACT)
    rows = held_out.sample(1500, replace=True, random_state=4).reset_index(drop=True)
    prediction, probability = served.score_frame(rows[list(FEATURES)])
    request_ids = [f"req-{i}" for i in range(len(rows))]
    records = rows[list(FEATURES)].assign(
        request_id=request_ids,
        row_index=0,
        timestamp=pd.Timestamp("2026-12-01T06:00:00Z"),
        model_version=version.version,
        probability=probability,
        prediction=prediction,
    )
    outcomes = pd.DataFrame({"request_id": request_ids, "row_index": 0, "outcome": rows[TARGET].to_numpy()})
    result = monitor_window(
        records,
        profile,
        model_version=version.version,
        since="2026-12-01",
        until="2026-12-02",
        outcomes=outcomes,
        training_roc_auc=float(version.tags["test_roc_auc"]),
    )
    run_id = log_monitoring_run(client, result)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == MONITORING_EXPERIMENT
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["model_version"] == version.version and tags["status"] == result.status
    assert (tags["window.since"], tags["window.until"]) == (
        "2026-12-01T00:00:00.000Z",
        "2026-12-02T00:00:00.000Z",
    )
    assert tags["profile.source"] == SOURCE_RECONSTRUCTED
    metrics = run.data.metrics
    assert metrics["psi/MonthlyIncome"] == result.features["MonthlyIncome"].psi
    assert metrics["score_psi"] == result.score.distribution.psi
    assert metrics["outcome_roc_auc"] == result.outcomes.roc_auc
    assert metrics["rows"] == 1500 and metrics["status_level"] == LEVEL[result.status]
    history = client.get_metric_history(run_id, "psi/age")
    assert [point.timestamp for point in history] == [
        int(pd.Timestamp("2026-12-02", tz="UTC").timestamp() * 1000)
    ]
    with tempfile.TemporaryDirectory() as directory:
        document = json.loads(Path(client.download_artifacts(run_id, "result.json", directory)).read_text())
    assert document == json.loads(json.dumps(result.to_dict()))
    figures = {info.path for info in client.list_artifacts(run_id, "figures")}
    assert figures == {"figures/drift.png", "figures/calibration.png"}
    assert document["outcomes"]["training_roc_auc"] == float(version.tags["test_roc_auc"])
