"""Shared test plumbing: free ports and real server processes (never mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from stack import mlflow_server, processes

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLE = REPO / "data" / "cs-training-sample.csv"
REAL_DATA = REPO.parent / "shared" / "data" / "cs-training-dev.csv"
DEFAULT_PORTS = frozenset({5000, 8080, 8081, 8082, 8083})


def free_port() -> int:
    """A free TCP port on loopback, never one of the stack's defaults."""
    return processes.free_port(avoid=DEFAULT_PORTS)


@contextmanager
def running(service: processes.Service, state_dir: Path, timeout: float = 180):
    """Start a real process, wait until healthy, and always stop it afterwards."""
    process = processes.start(service, state_dir)
    try:
        processes.wait_healthy(service, process, state_dir, timeout)
        yield process
    finally:
        processes.terminate(process.pid)
        process.wait(timeout=30)


@contextmanager
def mlflow_tracking_server(state_dir: Path):
    port = free_port()
    service = mlflow_server.service(state_dir / "mlflow", port=port)
    with running(service, state_dir, timeout=120):
        yield mlflow_server.tracking_uri(mlflow_server.DEFAULT_HOST, port)


def credit_risk(*args: str, tracking_uri: str, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    """Run the real ``credit-risk`` command and capture its output."""
    return subprocess.run(
        [str(BIN / "credit-risk"), *args],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def serving_service(tracking_uri: str, name: str = "serving", workers: int = 1, **env):
    http, grpc, metrics = free_port(), free_port(), free_port()
    command = [
        str(BIN / "credit-risk"),
        "serve",
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
        "--workers",
        str(workers),
    ]
    service = processes.Service(
        name,
        command,
        f"http://127.0.0.1:{http}/v2/health/ready",
        {"MLFLOW_TRACKING_URI": tracking_uri, **env},
    )
    return service, {"http": http, "grpc": grpc, "metrics": metrics}
