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
| ``MLFLOW_BACKEND_STORE_URI`` | SQLite in ``./.credit-risk/mlflow`` | runs and registry (``postgresql+psycopg2://user:password@host:5432/db``) |
| ``MLFLOW_ARTIFACTS_DESTINATION`` | ``artifacts`` beside the SQLite file | where the server stores artifacts it serves |
| ``CREDIT_RISK_BACKEND_WAIT_S`` | 0 | how long to wait for an unreachable backend store |

The URI goes to MLflow in ``MLFLOW_BACKEND_STORE_URI``, never on its command line, so the
password does not show in the process list; messages print it masked.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from stack.services import DEFAULT_STATE_DIR, LOOPBACK, MLFLOW_PORT, sqlite_uri

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
    return os.environ.get("MLFLOW_BACKEND_STORE_URI") or sqlite_uri(DEFAULT_STATE_DIR / "mlflow")


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {raw!r}")
    return value


@dataclass(frozen=True)
class TrackingServerSettings:
    backend_store_uri: str = field(default_factory=_default_backend_store_uri)
    artifacts_destination: str | None = field(
        default_factory=lambda: os.environ.get("MLFLOW_ARTIFACTS_DESTINATION")
    )
    host: str = LOOPBACK
    port: int = MLFLOW_PORT
    workers: int = DEFAULT_WORKERS
    allowed_hosts: str | None = None
    wait_s: float = field(default_factory=lambda: _env_seconds("CREDIT_RISK_BACKEND_WAIT_S", 0))

    def __post_init__(self):
        if self.wait_s < 0:
            raise ValueError(f"--wait-s must be >= 0, got {self.wait_s}")
        describe(self.backend_store_uri)  # a URI SQLAlchemy cannot parse is a bad argument

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


def describe(uri: str) -> str:
    """The URI with its password masked, for messages."""
    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        raise ValueError(
            "backend store URI is not a database URL (expected e.g. postgresql+psycopg2://...)"
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


def mlflow_command(settings: TrackingServerSettings) -> list[str]:
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--host", settings.host, "--port", str(settings.port),
        "--artifacts-destination", settings.artifacts(),
        "--serve-artifacts",
        "--workers", str(settings.workers),
    ]  # fmt: skip
    if settings.allowed_hosts:
        command += ["--allowed-hosts", settings.allowed_hosts]
    return command


def mlflow_environment(settings: TrackingServerSettings) -> dict[str, str]:
    env = {**os.environ, **MLFLOW_ENVIRONMENT, "MLFLOW_BACKEND_STORE_URI": settings.backend_store_uri}
    env.pop("MLFLOW_ARTIFACTS_DESTINATION", None)  # given on the command line, resolved
    return env


def run(args) -> int:
    settings = TrackingServerSettings(
        **{
            key: value
            for key, value in vars(args).items()
            if key in TrackingServerSettings.__dataclass_fields__ and value is not None
        }
    )
    command = mlflow_command(settings)
    check_backend_store(settings.backend_store_uri, settings.wait_s)
    print(f"backend store {describe(settings.backend_store_uri)} answers; starting MLflow", flush=True)
    os.execve(command[0], command, mlflow_environment(settings))
    return 1  # not reached: exec replaced this process


def add_parser(subparsers) -> None:
    text_ = "run the MLflow tracking server once its backend store answers"
    parser = subparsers.add_parser("tracking-server", help=text_, description=text_)
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
