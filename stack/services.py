"""The stack's processes as this project runs them, for ``credit-risk up``, the tests and the
benchmarks alike: the MLflow tracking server, MLServer and the logging sidecar."""

from __future__ import annotations

import sys
from pathlib import Path

from stack.processes import Service

LOOPBACK = "127.0.0.1"
MLFLOW_PORT = 5000
# The defaults (4 workers plus job consumers) take ~3 GB and ~11 s to become healthy;
# two workers and no job execution take ~0.8 GB and ~5 s.
MLFLOW_WORKERS = 2
MLFLOW_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

_BIN = Path(sys.executable).parent


def tracking_uri(port: int, host: str = LOOPBACK) -> str:
    return f"http://{host}:{port}"


def mlflow(store_dir: Path, port: int = MLFLOW_PORT) -> Service:
    """SQLite backend, artifacts served by the server itself (clients need no shared folder)."""
    store_dir = store_dir.resolve()
    store_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(_BIN / "mlflow"), "server",
        "--host", LOOPBACK, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{store_dir / 'mlflow.db'}",
        "--artifacts-destination", str(store_dir / "artifacts"),
        "--serve-artifacts",
        "--workers", str(MLFLOW_WORKERS),
    ]  # fmt: skip
    return Service("mlflow", command, f"{tracking_uri(port)}/health", dict(MLFLOW_ENVIRONMENT))


def serving(
    tracking: str,
    http_port: int,
    *,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    name: str = "serving",
    **env: str,
) -> Service:
    """``credit-risk serve``; ports left out keep MLServer's (or MLSERVER_*) values."""
    command = [str(_BIN / "credit-risk"), "serve", "--http-port", str(http_port)]
    for flag, value in (("--grpc-port", grpc_port), ("--metrics-port", metrics_port)):
        if value is not None:
            command += [flag, str(value)]
    health = f"http://{LOOPBACK}:{http_port}/v2/health/ready"
    return Service(name, command, health, {"MLFLOW_TRACKING_URI": tracking, **env})


def sidecar(
    tracking: str, spool: Path, port: int, *, name: str = "sidecar", supervised: bool = False, **env: str
) -> Service:
    """``supervised``: under ``stack.supervise``, which restarts it whenever it exits non-zero."""
    command = [str(_BIN / "credit-risk"), "sidecar", "--spool-dir", str(spool), "--port", str(port)]
    if supervised:
        command = [sys.executable, "-m", "stack.supervise", "--", *command]
    health = f"http://{LOOPBACK}:{port}/health"
    return Service(name, command, health, {"MLFLOW_TRACKING_URI": tracking, **env})
