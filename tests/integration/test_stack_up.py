"""`credit-risk up` and `down`: the README's main job, on free ports in a throwaway folder."""

import os
import subprocess

import httpx
import pytest

from tests.helpers import BIN, free_port

pytestmark = pytest.mark.integration


def test_up_trains_serves_infers_and_down_stops_everything(tmp_path):
    ports = {name: free_port() for name in ("mlflow", "http", "sidecar", "grpc", "metrics")}
    flags = ["--state-dir", str(tmp_path), "--mlflow-port", str(ports["mlflow"]),
             "--http-port", str(ports["http"]), "--sidecar-port", str(ports["sidecar"])]  # fmt: skip
    # MLServer's own variables move its other two ports off the defaults.
    env = {
        **os.environ,
        "MLSERVER_GRPC_PORT": str(ports["grpc"]),
        "MLSERVER_METRICS_PORT": str(ports["metrics"]),
    }
    env.pop("MLFLOW_TRACKING_URI", None)

    def credit_risk(command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "credit-risk"), command, *flags], env=env, capture_output=True,
                              text=True, timeout=900, stdin=subprocess.DEVNULL, check=False)  # fmt: skip

    try:
        up = credit_risk("up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "One real inference" in up.stdout and '"probability"' in up.stdout
        assert f"MLflow UI:    http://127.0.0.1:{ports['mlflow']}" in up.stdout
        assert f"http://127.0.0.1:{ports['http']}/v2/models/credit-risk/infer" in up.stdout
        assert httpx.get(f"http://127.0.0.1:{ports['sidecar']}/health", timeout=5).status_code == 200

        again = credit_risk("up")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "nothing to do" in again.stdout and "already running" in again.stdout
    finally:
        down = credit_risk("down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.count(": stopped") == 3, down.stdout
    for port in (ports["mlflow"], ports["http"], ports["sidecar"]):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
