"""The MLflow tracking server as this project runs it: SQLite backend, artifacts served by
the server itself (clients need no shared folder), and a small footprint."""

from __future__ import annotations

import sys
from pathlib import Path

from stack.processes import Service

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
# The defaults (4 workers plus job consumers) take ~3 GB and ~11 s to become healthy;
# two workers and no job execution take ~0.8 GB and ~5 s.
WORKERS = 2
ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def tracking_uri(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def service(store_dir: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> Service:
    store_dir = store_dir.resolve()
    store_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{store_dir / 'mlflow.db'}",
        "--artifacts-destination",
        str(store_dir / "artifacts"),
        "--serve-artifacts",
        "--workers",
        str(WORKERS),
    ]
    return Service("mlflow", command, f"{tracking_uri(host, port)}/health", dict(ENVIRONMENT))
