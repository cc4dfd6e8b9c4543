"""`credit-risk up` and `down`: the README's main job, on free ports in a throwaway folder that
stands for the repository (the state goes to its ./.credit-risk, as with quickstart), and
the commands run there afterwards, which find the stack with no environment set."""

import os
import subprocess

import httpx
import pytest

from tests.helpers import BIN, free_port

pytestmark = pytest.mark.integration


def test_up_trains_serves_infers_and_down_stops_everything(tmp_path):
    ports = {name: free_port() for name in ("mlflow", "http", "sidecar", "grpc", "metrics")}
    flags = ["--mlflow-port", str(ports["mlflow"]), "--http-port", str(ports["http"]),
             "--sidecar-port", str(ports["sidecar"])]  # fmt: skip
    # MLServer's own variables move its other two ports off the defaults.
    env = {
        **os.environ,
        "MLSERVER_GRPC_PORT": str(ports["grpc"]),
        "MLSERVER_METRICS_PORT": str(ports["metrics"]),
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
