"""`mlflow models serve` runs the same registered model and agrees with MLServer."""

import math
import os

import httpx
import numpy as np
import pytest

from model.schema import FEATURES
from stack import processes
from tests.helpers import BIN, free_port, running
from tests.integration.test_serving import infer, outputs, v2_body
from training.data import load_training_data
from training.registry import PRODUCTION_MODEL_URI

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_models_serve(trained, tracking_uri, tmp_path_factory):
    port = free_port()
    service = processes.Service(
        "mlflow-models-serve",
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            PRODUCTION_MODEL_URI,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        f"http://127.0.0.1:{port}/ping",
        # mlflow runs `uvicorn` from PATH: the one of this environment.
        {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )
    with running(service, tmp_path_factory.mktemp("mlflow-serve")):
        yield f"http://127.0.0.1:{port}"


def dataframe_split(frame):
    data = [
        [None if math.isnan(v) else v for v in row] for row in frame[list(FEATURES)].itertuples(index=False)
    ]
    return {"dataframe_split": {"columns": list(FEATURES), "data": data}}


def test_mlflow_models_serve_agrees_with_mlserver(mlflow_models_serve, mlserver, sample_path):
    rows = load_training_data(sample_path).features.iloc[100:164].reset_index(drop=True)
    response = httpx.post(f"{mlflow_models_serve}/invocations", json=dataframe_split(rows), timeout=30)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    from_mlflow = np.array([p["probability"] for p in predictions])
    from_mlserver = np.ravel(outputs(infer(mlserver, v2_body(rows)))["probability"])
    assert np.array_equal(from_mlflow, from_mlserver)
    assert [p["prediction"] for p in predictions] == np.ravel(
        outputs(infer(mlserver, v2_body(rows)))["prediction"]
    ).tolist()


def test_mlflow_models_serve_refuses_bad_input_with_400(mlflow_models_serve, sample_path):
    rows = load_training_data(sample_path).features.head(2).reset_index(drop=True)
    rows.loc[1, "NumberOfDependents"] = -3
    response = httpx.post(f"{mlflow_models_serve}/invocations", json=dataframe_split(rows), timeout=30)
    assert response.status_code == 400
    assert "NumberOfDependents: must be >= 0" in response.text
