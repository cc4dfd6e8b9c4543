"""Shared test plumbing: free ports and real server processes (never mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from logging_sidecar.settings import DEFAULT_PORT as SIDECAR_PORT
from serving.settings import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT
from stack import processes, services

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLE = REPO / "data" / "cs-training-sample.csv"
REAL_DATA = REPO.parent / "shared" / "data" / "cs-training-dev.csv"
# The stack's default ports: tests never take them, so they can run beside a live stack.
DEFAULT_PORTS = frozenset(
    {services.MLFLOW_PORT, DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT, SIDECAR_PORT}
)


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
    with running(services.mlflow(state_dir / "mlflow", port=port), state_dir, timeout=120):
        yield services.tracking_uri(port)


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


def serving_service(tracking_uri: str, name: str = "serving", workers: int = 0, **env):
    """``credit-risk serve`` on three free ports. ``workers`` other than 0 is refused by the
    server (one process follows the registry); it is here so that a test can check that."""
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    service = services.serving(
        tracking_uri,
        ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        name=name,
        MLSERVER_PARALLEL_WORKERS=str(workers),
        **env,
    )
    return service, ports
