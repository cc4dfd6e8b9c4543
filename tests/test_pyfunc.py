"""The logged model on its own: contract, self-containment, reproducibility."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from model.identity import DATASET_HASH
from model.pyfunc import model_signature
from model.schema import FEATURES
from tests.helpers import REPO
from training.data import load_training_data
from training.pipeline import build_pipeline, classifier_params
from training.train import _log_model


@pytest.fixture(scope="module")
def sample(sample_path):
    return load_training_data(sample_path)


@pytest.fixture(scope="module")
def saved_model(sample, tmp_path_factory):
    """The model logged exactly as training logs it, to a throwaway local tracking store."""
    store = tmp_path_factory.mktemp("store")
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    try:
        pipeline = build_pipeline(classifier_params({"max_iter": 50}), seed=42)
        pipeline.fit(sample.features, sample.target)
        # Artifacts beside the store: the default root is ./mlruns in the working folder.
        experiment = mlflow.create_experiment("pyfunc", artifact_location=(store / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = _log_model(pipeline, 0.3, sample, sample.features.head(5))
        local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(store / "model"))
        yield {"path": local, "pipeline": pipeline}
    finally:
        mlflow.set_tracking_uri(None)


def test_predict_returns_prediction_and_probability(saved_model, sample):
    model = mlflow.pyfunc.load_model(saved_model["path"])
    rows = sample.features.head(20)
    result = model.predict(rows)
    assert list(result.columns) == ["prediction", "probability"]
    expected = saved_model["pipeline"].predict_proba(rows)[:, 1]
    assert np.array_equal(result["probability"].to_numpy(), expected)
    assert result["prediction"].tolist() == (expected >= 0.3).astype(int).tolist()
    assert model.metadata.metadata[DATASET_HASH] == sample.fingerprint.sha256
    assert model.metadata.signature == model_signature()


def test_missing_values_are_accepted(saved_model):
    model = mlflow.pyfunc.load_model(saved_model["path"])
    row = {name: [None] for name in FEATURES} | {"age": [45.0], "NumberOfDependents": [2.0]}
    result = model.predict(pd.DataFrame(row))
    assert 0 <= result["probability"].iloc[0] <= 1


def test_invalid_values_raise_mlflow_invalid_parameter(saved_model, sample):
    model = mlflow.pyfunc.load_model(saved_model["path"])
    rows = sample.features.head(3).copy()
    rows["NumberOfTimes90DaysLate"] = [0.0, -1.0, 0.0]
    with pytest.raises(MlflowException, match="NumberOfTimes90DaysLate: must be >= 0") as error:
        model.predict(rows)
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"


def test_model_loads_without_this_repository(saved_model, sample, tmp_path):
    """code_paths makes the logged model self-contained: hide the repo and load it."""
    rows = sample.features.head(5)
    rows.to_parquet(tmp_path / "rows.parquet")
    script = f"""
import sys
sys.path = [p for p in sys.path if p not in ("", ".", {str(REPO)!r})]
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import importlib.util
assert importlib.util.find_spec("model") is None, "repository still importable"
import json, mlflow, pandas as pd
m = mlflow.pyfunc.load_model({saved_model["path"]!r})
import model
print(json.dumps({{"code": model.__file__, "p": m.predict(pd.read_parquet({str(tmp_path / "rows.parquet")!r}))["probability"].tolist()}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["code"].startswith(saved_model["path"])
    assert answer["p"] == saved_model["pipeline"].predict_proba(rows)[:, 1].tolist()


def test_same_data_and_seed_give_bit_identical_predictions(sample):
    first = build_pipeline(classifier_params(), seed=42).fit(sample.features, sample.target)
    second = build_pipeline(classifier_params(), seed=42).fit(sample.features, sample.target)
    probe = sample.features
    assert first.predict_proba(probe).tobytes() == second.predict_proba(probe).tobytes()


def test_served_path_scores_exactly_like_predict_and_uses_the_checked_fast_path(saved_model, sample):
    from model import scoring

    loaded = scoring.load(saved_model["path"])
    assert loaded.scorer.fast_path, loaded.scorer.fast_path_status
    rows = sample.features.head(300)  # over the fast path's row limit too
    for batch in (rows.head(1), rows.head(64), rows):
        prediction, probability = loaded.score(batch.to_numpy())
        expected = saved_model["pipeline"].predict_proba(batch)[:, 1]
        assert probability.tobytes() == expected.tobytes()
        assert prediction.tolist() == loaded.pyfunc.predict(batch)["prediction"].tolist()
    assert loaded.dataset_hash == sample.fingerprint.sha256
