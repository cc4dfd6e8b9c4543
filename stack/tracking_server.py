"""``credit-risk tracking-server``: the MLflow tracking server, started only once its backend
store answers.

``mlflow server`` on a database it cannot reach (wrong password, host down, driver missing)
logs a stack trace and exits, and under a restart policy does so in a loop. This launcher
connects first: a store that refuses for good (bad credentials, unknown database or role, no
driver) is one ``error:`` line and exit 1; an unreachable one is waited for up to
``--wait-s`` seconds, saying so, then the same one line. Then it ``exec``s ``mlflow server``
in its place, so signals and the exit code are MLflow's own.

| variable | default | meaning |
| --- | --- | --- |
| ``MLFLOW_BACKEND_STORE_URI`` | SQLite in ``$CREDIT_RISK_HOME/mlflow`` (``./.credit-risk/mlflow``) | runs and registry (``postgresql+psycopg2://user:password@host:5432/db``) |
| ``MLFLOW_ARTIFACTS_DESTINATION`` | ``artifacts`` beside the SQLite file | where the server stores artifacts it serves |
| ``CREDIT_RISK_BACKEND_WAIT_S`` | 0 | how long to wait for an unreachable backend store |

Flags override the variables (``--backend-store-uri``, ``--artifacts-destination``,
``--wait-s``); ``--host``, ``--port``, ``--workers`` and ``--allowed-hosts`` are flags only.
The URI goes to MLflow in ``MLFLOW_BACKEND_STORE_URI``, never on its command line, so the
password does not show in the process list; messages print it masked.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from model.identity import ENV_PREFIX
from stack.errors import UsageError
from stack.local import StackSettings
from stack.services import LOOPBACK, MLFLOW_PORT, sqlite_uri

# The defaults (4 workers plus job consumers) take ~3 GB and ~11 s to become healthy;
# two workers and no job execution take ~0.8 GB and ~5 s.
DEFAULT_WORKERS = 2
MLFLOW_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
RETRY_INTERVAL_S = 2.0
CONNECT_TIMEOUT_S = 5
# Driver messages that waiting cannot fix (PostgreSQL's, as psycopg2 reports them).
_PERMANENT = (
    "authentication failed",
    "no password supplied",
    "does not exist",
    "no pg_hba.conf entry",
)


class BackendStoreError(RuntimeError):
    """The backend store cannot be used; the message is one line and hides the password."""


def _default_backend_store_uri() -> str:
    return sqlite_uri(StackSettings().home / "mlflow")


class TrackingServerSettings(BaseSettings):
    """Where the tracking server keeps runs, the registry and artifacts; from the
    environment, flags override."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    backend_store_uri: str = Field(
        default_factory=_default_backend_store_uri,
        validation_alias="MLFLOW_BACKEND_STORE_URI",
        description="runs and registry: a database URL (default SQLite in the local stack's folder)",
    )
    artifacts_destination: str | None = Field(
        None,
        validation_alias="MLFLOW_ARTIFACTS_DESTINATION",
        description="where the server stores the artifacts it serves (default: beside a SQLite file)",
    )
    wait_s: float = Field(
        0,
        ge=0,
        validation_alias="CREDIT_RISK_BACKEND_WAIT_S",
        description="how long to wait for an unreachable backend store",
    )

    @field_validator("backend_store_uri")
    @classmethod
    def _database_url(cls, value: str) -> str:
        describe(value)
        return value

    @model_validator(mode="after")
    def _artifacts_somewhere(self) -> TrackingServerSettings:
        self.artifacts()
        return self

    def artifacts(self) -> str:
        """Where artifacts go: as given, or beside a SQLite file (a server has no folder of its own)."""
        if self.artifacts_destination:
            return self.artifacts_destination
        url = make_url(self.backend_store_uri)
        if url.get_backend_name() == "sqlite" and url.database:
            return str(Path(url.database).parent / "artifacts")
        raise ValueError(
            "MLFLOW_ARTIFACTS_DESTINATION (or --artifacts-destination) is required with a "
            f"{url.get_backend_name()} backend store"
        )


@dataclass(frozen=True)
class Listen:
    """How ``mlflow server`` listens: flags only."""

    host: str = LOOPBACK
    port: int = MLFLOW_PORT
    workers: int = DEFAULT_WORKERS
    allowed_hosts: str | None = None

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise UsageError(f"--port must be a TCP port (1 to 65535), got {self.port}")
        if self.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {self.workers}")


def describe(uri: str) -> str:
    """The URI with its password masked, for messages; ``ValueError`` if it is no database URL."""
    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        raise ValueError(
            "must be a database URL such as postgresql+psycopg2://user:password@host:5432/db"
        ) from None


def _one_line(error: BaseException) -> str:
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    return "; ".join(lines) or type(original).__name__


def _is_permanent(reason: str) -> bool:
    return any(marker in reason for marker in _PERMANENT)


def _connect_once(uri: str) -> None:
    url = make_url(uri)
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
    if url.get_backend_name() == "sqlite" and url.database:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(uri, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def check_backend_store(uri: str, wait_s: float = 0, say=print) -> None:
    """Return once ``uri`` accepts a connection; raise ``BackendStoreError`` otherwise.

    Refusals that waiting cannot fix fail at once; the others are retried until ``wait_s``
    has passed, with one message per attempt.
    """
    where = describe(uri)
    try:
        create_engine(uri)  # loads the driver: a missing one is not worth waiting for
    except (NoSuchModuleError, ImportError) as error:
        raise BackendStoreError(f"backend store {where}: no database driver ({_one_line(error)})") from None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _connect_once(uri)
            return
        except DBAPIError as error:  # the driver's own error, whatever its class
            reason = _one_line(error)
        if _is_permanent(reason) or time.monotonic() + RETRY_INTERVAL_S > deadline:
            waited = f" (waited {wait_s:.0f} s)" if wait_s and not _is_permanent(reason) else ""
            raise BackendStoreError(f"backend store {where} refused{waited}: {reason}")
        say(f"waiting for backend store {where}: {reason}", flush=True)
        time.sleep(RETRY_INTERVAL_S)


def mlflow_command(settings: TrackingServerSettings, listen: Listen) -> list[str]:
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--host", listen.host, "--port", str(listen.port),
        "--artifacts-destination", settings.artifacts(),
        "--serve-artifacts",
        "--workers", str(listen.workers),
    ]  # fmt: skip
    if listen.allowed_hosts:
        command += ["--allowed-hosts", listen.allowed_hosts]
    return command


def mlflow_environment(settings: TrackingServerSettings) -> dict[str, str]:
    env = {**os.environ, **MLFLOW_ENVIRONMENT, "MLFLOW_BACKEND_STORE_URI": settings.backend_store_uri}
    env.pop("MLFLOW_ARTIFACTS_DESTINATION", None)  # given on the command line, resolved
    return env


def _given(args, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run(args) -> int:
    listen = Listen(**_given(args, ("host", "port", "workers", "allowed_hosts")))
    settings = TrackingServerSettings(
        **_given(args, ("backend_store_uri", "artifacts_destination", "wait_s"))
    )
    command = mlflow_command(settings, listen)
    check_backend_store(settings.backend_store_uri, settings.wait_s)
    print(f"backend store {describe(settings.backend_store_uri)} answers; starting MLflow", flush=True)
    os.execve(command[0], command, mlflow_environment(settings))
    return 1  # not reached: exec replaced this process


def add_parser(subparsers) -> None:
    text_ = "run the MLflow tracking server once its backend store answers"
    parser = subparsers.add_parser(
        "tracking-server",
        help=text_,
        description=f"{text_.capitalize()}. Variables: MLFLOW_BACKEND_STORE_URI, "
        "MLFLOW_ARTIFACTS_DESTINATION, CREDIT_RISK_BACKEND_WAIT_S; flags override them.",
    )
    parser.add_argument(
        "--backend-store-uri",
        help="runs and registry ($MLFLOW_BACKEND_STORE_URI, default SQLite in ./.credit-risk/mlflow)",
    )
    parser.add_argument(
        "--artifacts-destination",
        help="artifact storage ($MLFLOW_ARTIFACTS_DESTINATION, default beside the SQLite file)",
    )
    parser.add_argument("--host", help=f"address to listen on (default {LOOPBACK})")
    parser.add_argument("--port", type=int, help=f"port (default {MLFLOW_PORT})")
    parser.add_argument("--workers", type=int, help=f"server worker processes (default {DEFAULT_WORKERS})")
    parser.add_argument("--allowed-hosts", help="passed to mlflow server (Host header check)")
    parser.add_argument(
        "--wait-s",
        type=float,
        help="wait this long for an unreachable backend store ($CREDIT_RISK_BACKEND_WAIT_S, default 0)",
    )
    parser.set_defaults(handler=run)
