"""A real MLflow tracking server with the basic-auth app, on a free port, and requests made as
one identity or another (never mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx

from stack import services
from stack.auth_files import (
    AUTH_CACHE_TTL_S,
    Credentials,
    default_auth_database,
    prepare_server,
    read_credentials,
)
from stack.processes import Service
from stack.tracking_server import DEFAULT_WORKERS, MLFLOW_ENVIRONMENT
from tests.helpers import BIN, free_port, running


def auth_server_service(
    state_dir: Path, credentials_dir: Path, port: int, environ=None, cache_ttl_s: int = AUTH_CACHE_TTL_S
) -> Service:
    """``mlflow server --app-name basic-auth`` as the stack runs it (two workers, no job
    execution), SQLite for runs and for users, its ini and secret key in ``credentials_dir``."""
    store = (state_dir / "mlflow").resolve()
    store.mkdir(parents=True, exist_ok=True)
    server_env = prepare_server(
        credentials_dir,
        default_auth_database(credentials_dir),
        environ=os.environ if environ is None else environ,
        cache_ttl_s=cache_ttl_s,
    )
    command = [
        str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
        "--host", services.LOOPBACK, "--port", str(port),
        "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts",
        "--workers", str(DEFAULT_WORKERS),
    ]  # fmt: skip
    env = {**MLFLOW_ENVIRONMENT, **server_env, "MLFLOW_BACKEND_STORE_URI": services.sqlite_uri(store)}
    return Service("mlflow-auth", command, f"{services.tracking_uri(port)}/health", env)


@contextmanager
def auth_tracking_server(
    state_dir: Path, credentials_dir: Path, environ=None, cache_ttl_s: int = AUTH_CACHE_TTL_S
):
    """Yield the URI of a running basic-auth tracking server; always stopped afterwards."""
    port = free_port()
    service = auth_server_service(state_dir, credentials_dir, port, environ, cache_ttl_s)
    with running(service, state_dir, timeout=180):
        yield services.tracking_uri(port)


class As:
    """REST requests to the tracking server as one identity (``None``: anonymous)."""

    def __init__(self, uri: str, credentials: Credentials | None):
        self.uri, self.credentials = uri, credentials
        self.name = credentials.username if credentials else "anonymous"
        self._http = httpx.Client(base_url=uri, auth=tuple(credentials) if credentials else None, timeout=60)

    def request(self, method: str, route: str, **kwargs) -> httpx.Response:
        return self._http.request(method, route, **kwargs)

    def get(self, route: str, **params) -> httpx.Response:
        return self._http.get(route, params=params)

    def post(self, route: str, **body) -> httpx.Response:
        return self._http.post(route, json=body)

    def delete(self, route: str, **body) -> httpx.Response:
        return self._http.request("DELETE", route, json=body)

    def put_artifact(self, artifact_path: str, content: bytes) -> httpx.Response:
        return self._http.put(f"/api/2.0/mlflow-artifacts/artifacts/{artifact_path}", content=content)

    def get_artifact(self, artifact_path: str) -> httpx.Response:
        return self._http.get(f"/api/2.0/mlflow-artifacts/artifacts/{artifact_path}")

    def close(self):
        self._http.close()


def identity_env(credentials_dir: Path, identity: str, tracking_uri: str) -> dict[str, str]:
    """The environment of a process running as ``identity`` and nothing else."""
    credentials = read_credentials(credentials_dir / f"{identity}.env")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_TRACKING_", "CREDIT_RISK_CREDENTIALS"))
    }
    return {
        **env,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_TRACKING_USERNAME": credentials.username,
        "MLFLOW_TRACKING_PASSWORD": credentials.password,
    }


def python_as(credentials_dir: Path, identity: str, tracking_uri: str, code: str, timeout: float = 300):
    """Run ``code`` in a fresh Python process holding only ``identity``'s credentials."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=identity_env(credentials_dir, identity, tracking_uri),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
    )
