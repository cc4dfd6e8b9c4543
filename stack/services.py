"""The stack's processes as this project runs them, for ``credit-risk up``, the tests and the
benchmarks alike: the MLflow tracking server, MLServer and the logging sidecar."""

from __future__ import annotations

import sys
from pathlib import Path

from stack.processes import Service

LOOPBACK = "127.0.0.1"
MLFLOW_PORT = 5000

_BIN = Path(sys.executable).parent


def tracking_uri(port: int, host: str = LOOPBACK) -> str:
    return f"http://{host}:{port}"


def sqlite_uri(store_dir: Path) -> str:
    return f"sqlite:///{store_dir.resolve() / 'mlflow.db'}"


def mlflow(store_dir: Path, port: int = MLFLOW_PORT, backend_store_uri: str | None = None) -> Service:
    """``credit-risk tracking-server``: SQLite in ``store_dir`` unless ``backend_store_uri``
    names another store; artifacts in ``store_dir``, served by the server itself (clients need
    no shared folder). The URI travels in the environment, so no process list shows it."""
    store_dir = store_dir.resolve()
    store_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(_BIN / "credit-risk"), "tracking-server",
        "--host", LOOPBACK, "--port", str(port),
        "--artifacts-destination", str(store_dir / "artifacts"),
    ]  # fmt: skip
    env = {"MLFLOW_BACKEND_STORE_URI": backend_store_uri or sqlite_uri(store_dir)}
    return Service("mlflow", command, f"{tracking_uri(port)}/health", env)


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
