"""Training against a real MLflow tracking server: run contents, registry, stage, alias, gate."""

import hashlib

import pytest
from mlflow.tracking import MlflowClient

from model.identity import PRODUCTION_ALIAS, REGISTERED_MODEL_NAME
from tests.helpers import credit_risk, mlflow_tracking_server
from training.registry import production_version

pytestmark = pytest.mark.integration

WORSE = ("--set", "max_iter=2", "--set", "max_depth=1")


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_run_holds_everything_a_reviewer_needs(trained, tracking_uri, sample_path):
    client = MlflowClient(tracking_uri)
    version = production_version(client)
    run = client.get_run(version.run_id)
    digest = sha256(sample_path)

    assert run.data.params["dataset_hash"] == digest == run.data.tags["dataset_hash"]
    assert run.data.params["dataset_rows"] == "5000"
    assert run.data.params["dataset_columns"] == "12"
    for metric in ("roc_auc", "pr_auc", "brier", "log_loss", "ks", "precision", "recall", "f1"):
        assert f"test_{metric}" in run.data.metrics, metric
    assert 0.7 < run.data.metrics["test_roc_auc"] < 1
    assert {"cv_roc_auc_mean", "cv_roc_auc_std", "threshold"} <= set(run.data.metrics)
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == digest[:32]
    artifacts = {
        item.path
        for folder in ("plots", "reference", "")
        for item in client.list_artifacts(run.info.run_id, folder or None)
    }
    assert {
        "plots/roc_curve.png",
        "plots/precision_recall_curve.png",
        "plots/calibration_curve.png",
        "plots/feature_importance.png",
        "reference/training_sample.parquet",
        "feature_importance.json",
    } <= artifacts
    for line in (
        "Reading and checking",
        "Cross-validating",
        "fitting the final model",
        "Registering",
        "Gate",
    ):
        assert line in trained.stdout
    assert "done in" in trained.stdout and f"/runs/{run.info.run_id}" in trained.stdout
    assert f"version {version.version} (stage Production)" in trained.stdout


def test_first_model_is_registered_promoted_and_tagged(trained, tracking_uri, sample_path):
    client = MlflowClient(tracking_uri)
    version = production_version(client)
    assert version is not None and version.current_stage == "Production"
    alias = client.get_model_version_by_alias(REGISTERED_MODEL_NAME, PRODUCTION_ALIAS)
    assert alias.version == version.version
    assert version.tags["dataset_hash"] == sha256(sample_path)
    assert version.tags["gate.decision"] == "promoted"
    assert version.tags["gate.outcome"] == "first"


@pytest.fixture(scope="module")
def own_tracking_uri(tmp_path_factory):
    """A tracking server of its own, so these promotions never disturb the shared stack."""
    with mlflow_tracking_server(tmp_path_factory.mktemp("gate")) as uri:
        yield uri


def stages(client):
    return {
        v.version: v.current_stage for v in client.search_model_versions(f"name='{REGISTERED_MODEL_NAME}'")
    }


def test_gate_rerun_rejection_and_forced_promotion(own_tracking_uri, sample_path):
    client = MlflowClient(own_tracking_uri)
    first = credit_risk("train", "--data", str(sample_path), tracking_uri=own_tracking_uri)
    assert first.returncode == 0, first.stderr
    assert stages(client) == {"1": "Production"}

    rerun = credit_risk("train", "--data", str(sample_path), tracking_uri=own_tracking_uri)
    assert rerun.returncode == 0, rerun.stderr
    assert "nothing to do" in rerun.stdout and stages(client) == {"1": "Production"}

    worse = credit_risk("train", "--data", str(sample_path), *WORSE, tracking_uri=own_tracking_uri)
    assert worse.returncode == 0, worse.stderr
    assert "NOT promoted: worse" in worse.stdout
    assert stages(client) == {"1": "Production", "2": "None"}
    rejected = client.get_model_version(REGISTERED_MODEL_NAME, "2")
    assert rejected.tags["gate.decision"] == "rejected"
    assert float(rejected.tags["gate.candidate_roc_auc"]) < float(rejected.tags["gate.production_roc_auc"])
    assert rejected.tags["gate.production_version"] == "1"
    assert client.get_run(rejected.run_id).data.tags["gate.decision"] == "rejected"
    assert client.get_model_version_by_alias(REGISTERED_MODEL_NAME, PRODUCTION_ALIAS).version == "1"

    forced = credit_risk(
        "train",
        "--data",
        str(sample_path),
        *WORSE,
        "--retrain",
        "--force-promote",
        tracking_uri=own_tracking_uri,
    )
    assert forced.returncode == 0, forced.stderr
    assert stages(client) == {"1": "Archived", "2": "None", "3": "Production"}
    assert client.get_model_version(REGISTERED_MODEL_NAME, "3").tags["gate.outcome"] == "forced"
    assert client.get_model_version_by_alias(REGISTERED_MODEL_NAME, PRODUCTION_ALIAS).version == "3"


def test_bad_data_is_refused_and_nothing_is_logged(own_tracking_uri, tmp_path):
    client = MlflowClient(own_tracking_uri)
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    versions_before = stages(client)
    bad = tmp_path / "bad.csv"
    bad.write_text(",SeriousDlqin2yrs,age\r\n1,0,30\r\n")
    result = credit_risk("train", "--data", str(bad), tracking_uri=own_tracking_uri)
    assert result.returncode == 2
    assert "missing columns" in result.stderr and "RevolvingUtilizationOfUnsecuredLines" in result.stderr
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before
    assert stages(client) == versions_before


def test_unreachable_tracking_server_is_a_clear_error(sample_path):
    from tests.helpers import NOBODY_URL

    uri = NOBODY_URL
    result = credit_risk("train", "--data", str(sample_path), tracking_uri=uri, timeout=60)
    assert result.returncode == 1
    assert f"MLflow tracking server at {uri} is not reachable" in result.stderr
