"""The local stack's record, and how every ``credit-risk`` command finds its tracking server.

``credit-risk up`` writes ``<state dir>/stack.json`` (state dir: ``$CREDIT_RISK_HOME``, else
``./.credit-risk``) once its tracking server answers: the server's URI and the ports it chose.
A command that talks to MLflow then uses, in this order:

1. ``MLFLOW_TRACKING_URI``, when it is set (MLflow's own variable; containers set it);
2. the tracking server of the local stack recorded in the state dir, when it answers.

Otherwise it stops with one line saying which server it tried and how to name one (exit 1).
It never falls back to MLflow's default store, which would create ``mlflow.db`` in the working
folder. Whatever it chose, it says so on stderr, with why.

When the local stack runs with auth on (``credit-risk up --auth``) and nothing names
credentials (neither ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` nor
``CREDIT_RISK_CREDENTIALS_FILE``), a command acts as the identity it needs
(``COMMAND_IDENTITIES``), from ``<state dir>/auth/<identity>.env``, and says so on the same
line. Credentials that are set always win; a server named by ``MLFLOW_TRACKING_URI`` gets
only the credentials that are set.
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
from stack import auth_policy as policy
from stack.auth_files import (
    CREDENTIALS_FILE_VARIABLE,
    PASSWORD_VARIABLE,
    USERNAME_VARIABLE,
    CredentialsError,
    identity_file,
)
from stack.processes import is_healthy

STACK_FILE = "stack.json"
AUTH_DIR = "auth"  # the local stack's credentials folder, in its state folder
# The identity a command acts as on the local stack with auth on, when no credentials are set:
# the least that does its job (stack.auth_policy). A subcommand is named with its command
# (``records prune``); one without a line of its own acts as its command does
# (``identity_of``). The records are personal data: ``records`` reads them as ``monitor``,
# which may read them and change nothing but monitoring runs; ``records prune`` deletes them as
# ``sidecar``, the one identity that may delete record runs (retention is its job).
# ``outcomes``, ``monitor`` and ``heal`` are the commands of issues 19 and 20.
COMMAND_IDENTITIES: dict[str, str] = {
    "train": policy.TRAINER,
    "heal": policy.TRAINER,
    "promote": policy.OPERATOR,
    "rollback": policy.OPERATOR,
    "status": policy.OPERATOR,
    "outcomes": policy.OPERATOR,
    "records": policy.MONITOR,
    "records prune": policy.SIDECAR,
    "monitor": policy.MONITOR,
    "serve": policy.SERVING,
    "sidecar": policy.SIDECAR,
}
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
    auth: bool = False  # started with --auth: credentials in <state dir>/auth (records before it: off)

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


def record_stack(
    home: Path, tracking_uri: str, mlflow_port: int, http_port: int, sidecar_port: int, auth: bool = False
) -> Path:
    path = home / STACK_FILE
    StackRecord(tracking_uri, mlflow_port, http_port, sidecar_port, utc_timestamp(), auth).write(path)
    return path


def auth_dir(home: Path) -> Path:
    return home / AUTH_DIR


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


def _credentials_set(environ) -> bool:
    return any(
        environ.get(name) for name in (CREDENTIALS_FILE_VARIABLE, USERNAME_VARIABLE, PASSWORD_VARIABLE)
    )


def identity_of(command: str) -> str | None:
    """The identity ``command`` (``"status"``, ``"records prune"``) acts as: its own line of
    ``COMMAND_IDENTITIES``, else its parent command's; None for a command that needs none."""
    while command:
        if command in COMMAND_IDENTITIES:
            return COMMAND_IDENTITIES[command]
        command = command.rpartition(" ")[0]
    return None


def select_credentials(
    command: str, settings: StackSettings | None = None, environ=os.environ
) -> Path | None:
    """For ``command`` (with its subcommand: ``"records prune"``) run on the local stack with
    auth on and no credentials set, point ``CREDIT_RISK_CREDENTIALS_FILE`` at its identity's file
    (``identity_of``) and return that path; otherwise change nothing and return None. Reads
    ``stack.json`` only: whether the server answers is found out, and said, when the command
    looks for it.

    ``CredentialsError`` when the stack has auth on but the identity's file is missing."""
    identity = identity_of(command)
    if identity is None or _credentials_set(environ):
        return None
    settings = settings or StackSettings()
    if settings.tracking_uri:  # a server named by the variable is not the local stack
        return None
    record = StackRecord.read(settings.home / STACK_FILE)
    if record is None or not record.auth:
        return None
    path = identity_file(auth_dir(settings.home), identity)
    if not path.is_file():
        raise CredentialsError(
            f"the local stack ({settings.home / STACK_FILE}) runs with auth on, but {path} is missing: "
            f"run `credit-risk up --auth` here again, or set {CREDENTIALS_FILE_VARIABLE}"
        )
    environ[CREDENTIALS_FILE_VARIABLE] = str(path)
    return path


def acting_as(environ=os.environ) -> str:
    """`` as <user> (<where the credentials come from>)``, or nothing when none are set."""
    user = environ.get(USERNAME_VARIABLE)
    if not user:
        return ""
    source = environ.get(CREDENTIALS_FILE_VARIABLE) or f"{USERNAME_VARIABLE}/{PASSWORD_VARIABLE}"
    return f" as {user} ({source})"


def use_tracking_server(settings: StackSettings | None = None) -> TrackingServer:
    """Find the tracking server, point this process (and any it starts) at it, and say so on
    stderr, with the identity the credentials in use name."""
    server = find_tracking_server(settings or StackSettings())
    os.environ[TRACKING_URI_VARIABLE] = server.uri
    print(f"tracking server: {server.uri} ({server.why}){acting_as()}", file=sys.stderr, flush=True)
    return server
