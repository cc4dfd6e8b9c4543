"""The gate against a real MLflow tracking server: it compares on rows neither model trained
on, even across files and seeds; it refuses a candidate that cannot be served or answers
differently from training; it says when Production cannot be compared."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import model
from model.identity import HELD_OUT_ARTIFACT, REGISTERED_MODEL_NAME
from model.pyfunc import PIPELINE_ARTIFACT, THRESHOLD_CONFIG, CreditRiskModel, model_signature
from model.schema import FEATURES, TARGET
from tests.helpers import credit_risk, mlflow_tracking_server
from training import gate, registry, split

pytestmark = pytest.mark.integration

QUICK = ("--set", "max_iter=20")


def rows(frame: pd.DataFrame) -> set[tuple]:
    """Each row's content (features then label; -1 for missing, which no valid value is)."""
    values = frame[[*FEATURES, TARGET]].to_numpy(dtype=np.float64)
    return set(map(tuple, np.where(np.isnan(values), -1.0, values)))


def artifact(client: MlflowClient, run_id: str, path: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as directory:
        return pd.read_parquet(client.download_artifacts(run_id, path, directory))


def version(client: MlflowClient, number: str):
    return client.get_model_version(REGISTERED_MODEL_NAME, number)


def train(uri: str, data: Path, *extra: str):
    result = credit_risk("train", "--data", str(data), *QUICK, *extra, tracking_uri=uri)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    with mlflow_tracking_server(tmp_path_factory.mktemp("gate-rows")) as tracking_uri:
        yield tracking_uri


@pytest.fixture
def in_process(uri, monkeypatch):
    """The gate loads models through mlflow's own tracking URI, as the trainer's process has it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def other_file(tmp_path_factory, sample_path):
    """Most of the sample's rows in another order and another layout (no row-id column)."""
    frame = pd.read_csv(sample_path, index_col=0)
    shuffled = frame.sample(frac=0.8, random_state=3)
    path = tmp_path_factory.mktemp("other") / "other.csv"
    shuffled.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def two_models(uri, sample_path, other_file):
    """v1 on the sample, seed 42; v2 on the other file, seed 7, compared with v1 by the gate."""
    train(uri, sample_path)
    second = train(uri, other_file, "--seed", "7")
    return second


def test_gate_rows_are_rows_neither_model_trained_on(uri, two_models, sample_path, other_file):
    client = MlflowClient(uri)
    first, second = version(client, "1"), version(client, "2")
    assert second.tags["gate.comparable"] == "true", second.tags
    gate_rows = rows(artifact(client, second.run_id, gate.ROWS_ARTIFACT))
    trained_first = rows(pd.read_csv(sample_path, index_col=0)) - rows(
        artifact(client, first.run_id, HELD_OUT_ARTIFACT)
    )
    trained_second = rows(pd.read_csv(other_file)) - rows(artifact(client, second.run_id, HELD_OUT_ARTIFACT))

    assert len(gate_rows) > 100
    # Every gate row is in the first model's file, so a per-file split could have trained on it.
    assert gate_rows <= rows(pd.read_csv(sample_path, index_col=0))
    assert not gate_rows & trained_first
    assert not gate_rows & trained_second
    assert int(second.tags["gate.rows"]) == len(artifact(client, second.run_id, gate.ROWS_ARTIFACT))
    assert "neither model trained on" in two_models.stdout


def test_not_comparable_when_production_has_no_split_record(uri, two_models, sample_path):
    client = MlflowClient(uri)
    production = registry.production_version(client)
    # What a version registered before the content split looks like: no split record.
    for tag in list(production.tags):
        if tag.startswith("split."):
            client.delete_model_version_tag(REGISTERED_MODEL_NAME, production.version, tag)

    result = train(uri, sample_path, "--set", "max_iter=2", "--set", "max_depth=1", "--retrain")
    candidate = registry.production_version(client)
    assert candidate.version != production.version
    assert candidate.tags["gate.outcome"] == "not-comparable"
    assert candidate.tags["gate.comparable"] == "false"
    assert "predates the content split" in candidate.tags["gate.reason"]
    assert "gate.production_roc_auc" not in candidate.tags
    assert "gate.comparable=false" in result.stdout and "predates the content split" in result.stdout


def held_out_of(client: MlflowClient, run_id: str) -> gate.HeldOut:
    frame = artifact(client, run_id, HELD_OUT_ARTIFACT)
    features, target = frame[list(FEATURES)], frame[TARGET]
    return gate.HeldOut(
        features, target, split.row_digests(features, target), frame["probability"].to_numpy()
    )


def broken_version(client: MlflowClient, tmp_path: Path) -> tuple[str, str]:
    """A registered credit-risk model whose pipeline artifact is not a pipeline."""
    broken = tmp_path / "pipeline.joblib"
    broken.write_bytes(b"not a pickled pipeline")
    # An explicit experiment: set_experiment would pin it process-wide for later modules.
    experiment = client.get_experiment_by_name("gate-broken-artifact")
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment("gate-broken-artifact")
    )
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=CreditRiskModel(),
            artifacts={PIPELINE_ARTIFACT: str(broken)},
            model_config={THRESHOLD_CONFIG: 0.5},
            code_paths=[str(Path(model.__file__).parent)],
            signature=model_signature(),
        )
    registered = registry.register(client, info, run.info.run_id, tags={}, description="broken")
    return registered.version, run.info.run_id


def test_a_candidate_that_cannot_load_is_refused_and_production_stays(in_process, two_models, tmp_path):
    client = in_process
    production = registry.production_version(client)
    candidate, run_id = broken_version(client, tmp_path)
    with pytest.raises(gate.GateRefused, match=f"candidate v{candidate} cannot be served") as refusal:
        gate.run(client, candidate, run_id, held_out_of(client, production.run_id), force=True)
    assert "not found" not in str(refusal.value), "refused for the artifact, not for a lookup"
    assert isinstance(refusal.value, registry.PromotionError)  # the CLI's exit 1 with an error line
    assert registry.production_version(client).version == production.version
    tags = version(client, candidate).tags
    assert tags["gate.outcome"] == "refused" and tags["gate.decision"] == "rejected"
    assert "cannot be served" in client.get_run(run_id).data.tags["gate.reason"]


def test_a_candidate_answering_otherwise_than_in_training_is_refused(in_process, two_models):
    client = in_process
    production = registry.production_version(client)
    candidate = version(client, "2")
    held_out = held_out_of(client, candidate.run_id)
    assert gate.served_probability(gate._load_served("2"), held_out.features).tobytes() == (
        held_out.probability.tobytes()
    ), "the candidate as served answers its own held-out rows exactly as training did"
    claimed = held_out.probability.copy()
    claimed[5] = np.nextafter(claimed[5], 1.0)  # one bit off on one row
    with pytest.raises(gate.GateRefused, match=r"answers 1 of \d+ held-out rows differently"):
        gate.run(client, "2", candidate.run_id, replace(held_out, probability=claimed), force=True)
    assert registry.production_version(client).version == production.version
    assert version(client, "2").tags["gate.outcome"] == "refused"
