"""The README's `mlflow models serve` command, run exactly as written by a new user (a fresh
shell, no activated venv, only the tracking server's and the server's ports substituted),
serves the same registered model and agrees with MLServer."""

import math
import os
import re
import subprocess
from contextlib import contextmanager

import httpx
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from model import scoring
from model.identity import REGISTERED_MODEL_NAME
from model.schema import FEATURES
from stack import processes
from tests.helpers import REPO, free_port
from tests.integration.test_serving import infer, outputs, v2_body
from training.data import load_training_data
from training.registry import production_version

pytestmark = pytest.mark.integration

# The ports the README's command is written with: the stack's MLflow and the debug server.
README_TRACKING = "MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
README_PORT = "-p 5001"


def readme_command() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    [block] = [block for block in blocks if "mlflow models serve" in block]
    return block.strip()


def with_ports(command: str, tracking_port: int, port: int) -> str:
    for written in (README_TRACKING, README_PORT):
        assert command.count(written) == 1, f"the README's command no longer contains {written!r}"
    return command.replace(README_TRACKING, README_TRACKING.replace("5000", str(tracking_port))).replace(
        README_PORT, f"-p {port}"
    )


@contextmanager
def run_in_a_fresh_shell(command: str, health_url: str, state_dir, env: dict[str, str]):
    """``bash -c command`` from the repository's folder with only ``env``, like `env -i`."""
    service = processes.Service("readme-mlflow-models-serve", ["bash", "-c", command], health_url)
    log_path = service.log_path(state_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            service.command,
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        processes.wait_healthy(service, process, state_dir, timeout=180)
        yield
    finally:
        processes.terminate(process.pid)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_models_serve(trained, tracking_uri, tmp_path_factory):
    assert (REPO / ".venv" / "bin" / "mlflow").is_file(), "the README's command runs from a set-up .venv"
    port = free_port()
    command = with_ports(readme_command(), int(tracking_uri.rsplit(":", 1)[1]), port)
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]}  # the command sets the rest
    url = f"http://127.0.0.1:{port}"
    with run_in_a_fresh_shell(command, f"{url}/ping", tmp_path_factory.mktemp("mlflow-serve"), env):
        yield url


def dataframe_split(frame):
    data = [
        [None if math.isnan(v) else v for v in row] for row in frame[list(FEATURES)].itertuples(index=False)
    ]
    return {"dataframe_split": {"columns": list(FEATURES), "data": data}}


def test_the_readme_command_serves_the_registered_production_model(
    mlflow_models_serve, tracking_uri, sample_path
):
    row = load_training_data(sample_path).features.iloc[[7]].reset_index(drop=True)
    response = httpx.post(f"{mlflow_models_serve}/invocations", json=dataframe_split(row), timeout=30)
    assert response.status_code == 200, response.text
    [answer] = response.json()["predictions"]

    version = production_version(MlflowClient(tracking_uri)).version
    mlflow.set_tracking_uri(tracking_uri)
    prediction, probability = scoring.load(f"models:/{REGISTERED_MODEL_NAME}/{version}").score_frame(row)
    assert (answer["prediction"], answer["probability"]) == (int(prediction[0]), float(probability[0]))


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
