"""`credit-risk up` and `down`: the README's main job, on free ports in a throwaway folder that
stands for the repository (the state goes to its ./.credit-risk, as with quickstart), and
the commands run there afterwards, which find the stack with no environment set.

It is also the end-to-end test (marker ``e2e``, which CI runs on both Python versions):
train → register → serve → infer → capture → ship → read back with ``credit-risk records``,
the record compared field by field with the request ``up`` sent and the answer it printed.
"""

import json
import os
import subprocess
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from model.schema import FEATURES
from serving.settings import SERVING_DIR
from tests.helpers import BIN, free_port

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
EXAMPLE = json.loads((SERVING_DIR / "example-request.json").read_text())


def printed_answer(stdout: str) -> dict:
    """The V2 answer ``up`` printed after "One real inference (...):"."""
    block = stdout.split("One real inference", 1)[1].split(":\n", 1)[1]
    return json.loads(block.split("\n\nMLflow UI:", 1)[0])


def wait_shipped(sidecar_port: int, rows: int, timeout: float = 120) -> None:
    deadline, health = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        health = httpx.get(f"http://127.0.0.1:{sidecar_port}/health", timeout=5).json()
        if health["shipped_records_total"] >= rows:
            return
        time.sleep(0.5)
    raise AssertionError(f"{rows} records not shipped after {timeout:.0f} s: {health}")


def check_read_back(records: pd.DataFrame, answer: dict) -> None:
    """The records of ``up``'s one inference: the example's rows, answered as printed."""
    mine = records[records["request_id"] == EXAMPLE["id"]].sort_values("row_index")
    assert mine["row_index"].tolist() == [0, 1], records
    sent = {item["name"]: item["data"] for item in EXAMPLE["inputs"]}
    for name in FEATURES:
        expected = np.array([np.nan if value is None else value for value in sent[name]], dtype="float64")
        assert np.array_equal(mine[name].to_numpy("float64"), expected, equal_nan=True), name
    outputs = {item["name"]: item["data"] for item in answer["outputs"]}
    assert mine["probability"].tolist() == outputs["probability"]
    assert mine["prediction"].tolist() == outputs["prediction"]
    assert set(mine["model_version"]) == {"1"} and set(mine["dataset_hash"]) == {
        answer["parameters"]["dataset_hash"]
    }


def test_up_trains_serves_infers_and_down_stops_everything(tmp_path):
    ports = {name: free_port() for name in ("mlflow", "http", "sidecar", "grpc", "metrics")}
    flags = ["--mlflow-port", str(ports["mlflow"]), "--http-port", str(ports["http"]),
             "--sidecar-port", str(ports["sidecar"])]  # fmt: skip
    # MLServer's own variables move its other two ports off the defaults.
    env = {
        **os.environ,
        "MLSERVER_GRPC_PORT": str(ports["grpc"]),
        "MLSERVER_METRICS_PORT": str(ports["metrics"]),
        "CREDIT_RISK_FLUSH_INTERVAL_S": "1",  # the sidecar ships within a second, not 30
    }
    for name in ("MLFLOW_TRACKING_URI", "CREDIT_RISK_HOME", "MLSERVER_HTTP_PORT"):
        env.pop(name, None)
    tracking = f"http://127.0.0.1:{ports['mlflow']}"

    def credit_risk(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "credit-risk"), *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=900, stdin=subprocess.DEVNULL, check=False)  # fmt: skip

    try:
        up = credit_risk("up", *flags)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "One real inference" in up.stdout and '"probability"' in up.stdout
        assert f"MLflow UI:    {tracking}" in up.stdout
        assert f"http://127.0.0.1:{ports['http']}/v2/models/credit-risk/infer" in up.stdout
        assert httpx.get(f"http://127.0.0.1:{ports['sidecar']}/health", timeout=5).status_code == 200

        # The inference up made was captured and shipped; read back from the folder, nothing set.
        wait_shipped(ports["sidecar"], rows=2)
        read = credit_risk("records", "--model-version", "1", "--output", "records.parquet")
        assert read.returncode == 0, read.stderr
        assert read.stderr.startswith(
            f"tracking server: {tracking} (the local stack, .credit-risk/stack.json)\n"
        )
        check_read_back(pd.read_parquet(tmp_path / "records.parquet"), printed_answer(up.stdout))
        (tmp_path / "records.parquet").unlink()

        again = credit_risk("up", *flags)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "nothing to do" in again.stdout and "already running" in again.stdout

        # Run from the folder with nothing set: the stack up recorded is the one used, and said so.
        status = credit_risk("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stderr == f"tracking server: {tracking} (the local stack, .credit-risk/stack.json)\n"
        assert f"credit-risk-model in Production: v1 ({tracking})" in status.stdout
        # The server asked by default is the stack's own MLServer, not the default port.
        assert f"http://127.0.0.1:{ports['http']}  serving v1, ready" in status.stdout
    finally:
        down = credit_risk("down", *flags)
    assert down.returncode == 0, down.stderr
    assert down.stdout.count(": stopped") == 3, down.stdout
    for port in (ports["mlflow"], ports["http"], ports["sidecar"]):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)

    # With the stack stopped: one line naming the server it tried, and no database left behind.
    stopped = credit_risk("status")
    assert stopped.returncode == 1
    assert stopped.stderr.splitlines() == [
        f"error: the local stack's tracking server {tracking} (recorded in .credit-risk/stack.json) does "
        "not answer; run `credit-risk up` here, or set MLFLOW_TRACKING_URI=http://HOST:PORT"
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == [".credit-risk"], (
        "nothing but the stack's folder"
    )
