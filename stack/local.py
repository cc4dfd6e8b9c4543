"""The local stack's record, and how every ``credit-risk`` command finds its tracking server.

``credit-risk up`` writes ``<state dir>/stack.json`` (state dir: ``$CREDIT_RISK_HOME``, else
``./.credit-risk``) once its tracking server answers: the server's URI and the ports it chose.
A command that talks to MLflow then uses, in this order:

1. ``MLFLOW_TRACKING_URI``, when it is set (MLflow's own variable; containers set it);
2. the tracking server of the local stack recorded in the state dir, when it answers.

Otherwise it stops with one line saying which server it tried and how to name one (exit 1).
It never falls back to MLflow's default store, which would create ``mlflow.db`` in the working
folder. Whatever it chose, it says so on stderr, with why.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.identity import ENV_PREFIX, utc_timestamp
from stack.processes import is_healthy

STACK_FILE = "stack.json"
TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"
_HOW = f"run `credit-risk up` here, or set {TRACKING_URI_VARIABLE}=http://HOST:PORT"


class TrackingServerNotFound(ConnectionError):
    """No tracking server to use; the message says which was tried. Exit code 1."""


class StackSettings(BaseSettings):
    """Where the local stack lives, and the tracking server named by the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    home: Path = Field(
        Path(".credit-risk"),
        validation_alias="CREDIT_RISK_HOME",
        description="the local stack's state: MLflow's SQLite file and artifacts, logs, pids, stack.json",
    )
    tracking_uri: str | None = Field(
        None,
        validation_alias=TRACKING_URI_VARIABLE,
        description="MLflow's own variable: the tracking server every command uses when it is set",
    )


@dataclass(frozen=True)
class StackRecord:
    """What ``credit-risk up`` started, as ``stack.json`` holds it."""

    tracking_uri: str
    mlflow_port: int
    http_port: int
    sidecar_port: int
    started_at: str

    @classmethod
    def read(cls, path: Path) -> StackRecord | None:
        """The record at ``path``; None when there is none or it cannot be read (an older
        layout, a folder that is no folder): the next ``up`` writes it again."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        """Replace the record at once (a reader never sees half of it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(asdict(self), indent=2) + "\n")
        partial.replace(path)


def record_stack(home: Path, tracking_uri: str, mlflow_port: int, http_port: int, sidecar_port: int) -> Path:
    path = home / STACK_FILE
    StackRecord(tracking_uri, mlflow_port, http_port, sidecar_port, utc_timestamp()).write(path)
    return path


@dataclass(frozen=True)
class TrackingServer:
    uri: str
    why: str  # "MLFLOW_TRACKING_URI", or "the local stack, <path>"
    stack: StackRecord | None = None  # when it is the local stack's


def find_tracking_server(settings: StackSettings) -> TrackingServer:
    """The tracking server to use (see the module's docstring); ``TrackingServerNotFound``
    when there is none. A server named by the variable is not probed here: each command
    says, with its own wait, when it does not answer."""
    if settings.tracking_uri:
        return TrackingServer(settings.tracking_uri, TRACKING_URI_VARIABLE)
    path = settings.home / STACK_FILE
    record = StackRecord.read(path)
    if record is None:
        raise TrackingServerNotFound(
            f"no tracking server: {TRACKING_URI_VARIABLE} is not set and no local stack is recorded "
            f"in {path}; {_HOW}"
        )
    if not is_healthy(f"{record.tracking_uri.rstrip('/')}/health"):
        raise TrackingServerNotFound(
            f"the local stack's tracking server {record.tracking_uri} (recorded in {path}) does not "
            f"answer; {_HOW}"
        )
    return TrackingServer(record.tracking_uri, f"the local stack, {path}", record)


def use_tracking_server(settings: StackSettings | None = None) -> TrackingServer:
    """Find the tracking server, point this process (and any it starts) at it, and say so on
    stderr."""
    server = find_tracking_server(settings or StackSettings())
    os.environ[TRACKING_URI_VARIABLE] = server.uri
    print(f"tracking server: {server.uri} ({server.why})", file=sys.stderr, flush=True)
    return server
