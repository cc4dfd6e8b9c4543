"""The ``credit-risk`` command: one entry point for every part of the project.

``train``, ``serve``, ``sidecar`` and ``tracking-server`` run one part in the foreground; ``promote``,
``rollback`` and ``status`` move and show Production; ``heal --once`` evaluates the healing
policy once (``stack.heal_cli``); ``records`` reads inference records back; ``monitor`` and
``outcomes`` watch drift and outcomes (``stack.monitor_cli``); ``up`` and ``down`` start and
stop the whole local stack in the background.

Every command that talks to MLflow finds its tracking server through ``stack.local`` (the
variable, else the local stack ``up`` recorded) and says which on stderr. Before any command
runs, ``main`` loads its credentials: the file ``CREDIT_RISK_CREDENTIALS_FILE`` names (serving
and the sidecar are started with one), else, on the local stack with auth on and nothing set,
the file of the identity the command needs (``stack.local.COMMAND_IDENTITIES``). ``main``
turns what a command raised into one ``error:`` line and the exit code of ``stack.errors``.

``up --auth`` starts MLflow with its basic-auth app, provisions the identities (``stack.auth``),
trains as ``trainer`` and starts serving and the sidecar as ``serving`` and ``sidecar``; each
identity's credentials are in ``<state dir>/auth/<identity>.env`` (0600). A stack runs with
auth or without it as a whole: ``up`` refuses to mix the two while any part of it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

import httpx

from logging_sidecar import settings as sidecar_settings
from logging_sidecar.cli import add_parser as add_sidecar_parser
from serving.cli import add_parser as add_serve_parser
from serving.settings import DEFAULT_HTTP_PORT, MODEL_NAME, SERVING_DIR
from stack import auth_cli, auth_files, local, processes, services, tracking_server
from stack import auth_policy as policy
from stack.errors import FAILED, USAGE, UsageError, is_usage_error, settings_errors
from stack.heal_cli import add_parser as add_heal_parser
from stack.monitor_cli import add_parsers as add_monitor_parsers
from stack.promotion import add_parsers as add_promotion_parsers
from training.cli import add_parser as add_train_parser

EXAMPLE_REQUEST = SERVING_DIR / "example-request.json"
# Commands of other parts that talk to MLflow from their first step: their tracking server is
# found before they run. The others here find it themselves, once their arguments are checked.
_FIND_TRACKING_SERVER_FIRST = ("serve", "sidecar", "records")


class LocalStack:
    """The three long-running processes of ``credit-risk up``, configured from the flags."""

    def __init__(self, args, backend_store_uri: str | None = None, auth: bool = False):
        """``backend_store_uri``: MLflow's store, default SQLite in the state folder. ``auth``:
        MLflow's basic-auth app, serving and the sidecar acting as their identities."""
        self.state_dir: Path = (args.state_dir or local.StackSettings().home).resolve()
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(
                f"--state-dir (or CREDIT_RISK_HOME) {self.state_dir} cannot be used: {error.strerror}"
            ) from None
        self.tracking_uri = services.tracking_uri(args.mlflow_port)
        self.ports = {"mlflow_port": args.mlflow_port, "http_port": args.http_port}
        self.ports["sidecar_port"] = args.sidecar_port
        self.infer_url = f"http://{services.LOOPBACK}:{args.http_port}/v2/models/{MODEL_NAME}/infer"
        self.auth_dir = local.auth_dir(self.state_dir) if auth else None
        spool = self.state_dir / "spool"
        self.mlflow = services.mlflow(
            self.state_dir / "mlflow",
            port=args.mlflow_port,
            backend_store_uri=backend_store_uri,
            auth_dir=self.auth_dir,
        )
        self.serving = services.serving(
            self.tracking_uri,
            args.http_port,
            CREDIT_RISK_SPOOL_DIR=str(spool),
            **self.acting_as(policy.SERVING),
        )
        self.sidecar = services.sidecar(
            self.tracking_uri, spool, args.sidecar_port, supervised=True, **self.acting_as(policy.SIDECAR)
        )

    @property
    def services(self) -> tuple[processes.Service, ...]:
        return (self.mlflow, self.serving, self.sidecar)

    def credentials_file(self, identity: str) -> Path:
        return auth_files.identity_file(self.auth_dir, identity)

    def acting_as(self, identity: str) -> dict[str, str | None]:
        """A service's environment for acting as ``identity`` with auth on: its credentials
        file, and none of the credentials this process may hold (nothing without auth)."""
        if self.auth_dir is None:
            return {}
        return {
            auth_files.CREDENTIALS_FILE_VARIABLE: str(self.credentials_file(identity)),
            auth_files.USERNAME_VARIABLE: None,
            auth_files.PASSWORD_VARIABLE: None,
        }

    def ensure_running(self, service: processes.Service, timeout: float) -> str:
        if processes.running_pid(service, self.state_dir) and processes.is_healthy(service.health_url):
            return "already running"
        if processes.is_healthy(service.health_url):
            raise processes.ServiceError(
                f"something else already answers at {service.health_url}; stop it or choose another port"
            )
        process = processes.start(service, self.state_dir)
        processes.wait_healthy(service, process, self.state_dir, timeout)
        return f"started (pid {process.pid}, log {service.log_path(self.state_dir)})"

    def check_same_auth(self, wanted: bool) -> None:
        """Refuse (exit 1) to start a stack with auth ``wanted`` beside parts of one that run
        the other way: serving would get 401s from the server, or the server would stay open."""
        running = [s.name for s in self.services if processes.running_pid(s, self.state_dir)]
        if not running:
            return
        actual = server_has_auth(self.tracking_uri) if self.mlflow.name in running else None
        if actual is None:
            record = local.StackRecord.read(self.state_dir / local.STACK_FILE)
            actual = record.auth if record else None
        if actual is None or actual == wanted:
            return
        flag = " --auth" if actual else ""
        raise processes.ServiceError(
            f"the local stack in {self.state_dir} runs with auth {'on' if actual else 'off'} "
            f"({', '.join(running)} running): `credit-risk up{flag}` uses it as it is; to start it with "
            f"auth {'on' if wanted else 'off'}, `credit-risk down` first"
        )


def server_has_auth(tracking_uri: str) -> bool | None:
    """Whether the tracking server asks anonymous requests for credentials (None: no answer)."""
    try:
        answer = httpx.get(
            f"{tracking_uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=10
        )
    except httpx.HTTPError:
        return None
    return {401: True, 200: False}.get(answer.status_code)


def _provision(stack: LocalStack) -> None:
    from stack.auth import names_from_environment, provision

    report = provision(stack.tracking_uri, stack.auth_dir, names_from_environment())
    for line in report.changes:
        print(f"  changed: {line}")
    for line in report.notes:
        print(f"  note: {line}")
    if not report.changed:
        print("  nothing to change")
    print(
        f"  credentials: {stack.auth_dir}/<identity>.env (mode 0600) for "
        f"{', '.join(policy.IDENTITIES)}; MLflow UI login: {stack.credentials_file(policy.ADMIN)}"
    )


def up(args) -> int:
    from training.settings import TrainingSettings
    from training.train import stage, summary, train

    # Settings are checked before anything starts: a bad one is exit 2 with nothing running.
    training = TrainingSettings(**({"data": args.data} if args.data else {}))
    store = tracking_server.TrackingServerSettings(
        **({"backend_store_uri": args.backend_store_uri} if args.backend_store_uri else {}),
        **({"auth": True} if args.auth else {}),
        artifacts_destination="artifacts",  # up keeps them in its state folder
    )
    tracking_server.check_auth_environment(store)
    # --backend-store-uri or MLFLOW_BACKEND_STORE_URI; else SQLite in the state folder, which
    # may not be the settings' default (--state-dir).
    stack = LocalStack(
        args,
        store.backend_store_uri if "backend_store_uri" in store.model_fields_set else None,
        auth=store.auth,
    )
    stack.check_same_auth(store.auth)
    with stage(f"MLflow tracking server on {stack.tracking_uri}"):
        print(f"  {stack.ensure_running(stack.mlflow, timeout=120)}")
        recorded = local.record_stack(stack.state_dir, stack.tracking_uri, **stack.ports, auth=store.auth)
        found_here = stack.state_dir == local.StackSettings().home.resolve()
        print(
            f"  recorded in {recorded}: "
            + (
                "credit-risk commands run here use it"
                if found_here
                else f"set CREDIT_RISK_HOME={stack.state_dir} to use it"
            )
        )
        if not store.auth:
            listen = tracking_server.Listen(port=args.mlflow_port)
            print(f"  {tracking_server.auth_off_line(listen, '`credit-risk up --auth`')}")
    if store.auth:
        with stage("Identities and permissions (MLflow basic-auth)"):
            _provision(stack)

    os.environ[local.TRACKING_URI_VARIABLE] = stack.tracking_uri
    trainer = (
        auth_files.using_credentials(stack.credentials_file(policy.TRAINER)) if store.auth else nullcontext()
    )
    with trainer:
        result = train(training)
    print(summary(result))

    with stage(f"MLServer on {stack.infer_url}"):
        print(f"  {stack.ensure_running(stack.serving, timeout=180)}")
        if result.promoted:  # a running server swaps to it by itself, within seconds
            processes.wait_serving(stack.serving, result.model_version, timeout=120)
            print(f"  serving version {result.model_version}")
    with stage(f"Logging sidecar on {stack.sidecar.health_url}"):
        print(f"  {stack.ensure_running(stack.sidecar, timeout=60)}")

    answer = httpx.post(
        stack.infer_url,
        content=EXAMPLE_REQUEST.read_bytes(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    answer.raise_for_status()
    print(f"\nOne real inference ({EXAMPLE_REQUEST}):\n{json.dumps(answer.json(), indent=2)}")
    login = f" (log in as in {stack.credentials_file(policy.ADMIN)})" if store.auth else ""
    print(
        f"\nMLflow UI:    {stack.tracking_uri}{login}\n"
        f"V2 endpoint:  {stack.infer_url}\n"
        f"Try it:       curl -s -H 'Content-Type: application/json' -d @{EXAMPLE_REQUEST} {stack.infer_url}\n"
        f"Status:       {Path(sys.executable).with_name('credit-risk')} status\n"
        f"Logs:         {stack.state_dir / 'logs'}\n"
        + (f"Credentials:  {stack.auth_dir}/<identity>.env\n" if store.auth else "")
        + f"Stop:         {Path(sys.executable).with_name('credit-risk')} down"
    )
    return 0


def down(args) -> int:
    stack = LocalStack(args)
    # Serving first: the sidecar's drain waits for it to release the spool, then ships.
    for service in (stack.serving, stack.sidecar, stack.mlflow):
        stopped = processes.stop(service, stack.state_dir)
        print(f"{service.name}: {'stopped' if stopped else 'not running'}")
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1 to 65535), got {text!r}")
    return port


def _add_stack_parsers(subparsers) -> None:
    for name, handler, text in (
        ("up", up, "start MLflow, train on the bundled sample (or --data), serve, and infer once"),
        ("down", down, "stop what `credit-risk up` started"),
    ):
        parser = subparsers.add_parser(name, help=text, description=text)
        parser.add_argument(
            "--state-dir",
            type=Path,
            help="where the stack keeps its database, artifacts, logs, pids and stack.json "
            "($CREDIT_RISK_HOME, default ./.credit-risk)",
        )
        parser.add_argument("--mlflow-port", type=_port, default=services.MLFLOW_PORT)
        parser.add_argument("--http-port", type=_port, default=DEFAULT_HTTP_PORT)
        parser.add_argument("--sidecar-port", type=_port, default=sidecar_settings.DEFAULT_PORT)
        if name == "up":
            parser.add_argument("--data", type=Path, help="training CSV (default: bundled sample)")
            parser.add_argument(
                "--backend-store-uri",
                help="MLflow's runs and registry, e.g. postgresql+psycopg2://user:password@host:5432/db "
                "($MLFLOW_BACKEND_STORE_URI, default SQLite in the state folder)",
            )
            tracking_server.add_auth_arguments(parser)
        parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credit-risk",
        description="Train, register, promote and serve the credit-risk model. Exit codes: 0 done, "
        "1 refused or failed, 2 bad arguments (flags, variables, the training file).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(subparsers, before_mlflow=local.use_tracking_server)
    add_promotion_parsers(subparsers)
    add_heal_parser(subparsers)
    add_serve_parser(subparsers)
    add_sidecar_parser(subparsers)
    add_monitor_parsers(subparsers)
    tracking_server.add_parser(subparsers)
    _add_stack_parsers(subparsers)
    auth_cli.add_parser(subparsers)
    return parser


def _error(message: object) -> None:
    print(f"error: {message}", file=sys.stderr)


def _refused(error) -> str | None:
    """A 401 or 403 of the tracking server, said with who asked and what to do (MLflow's own
    message quotes the server's page)."""
    status = error.get_http_status_code()
    if status == 401:
        return auth_files.unauthorized_message(os.environ.get(local.TRACKING_URI_VARIABLE, "in use"))
    if status == 403:
        user = os.environ.get(auth_files.USERNAME_VARIABLE, "anonymous")
        return (
            f"the tracking server refused this to {user!r} (403): {error.message}; "
            "`credit-risk auth table` says what each identity may do"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad flags: argparse's message, exit 2
    if (refused := load_credentials(command_name(args))) is not None:
        return refused
    return run_command(args)


def command_name(args: argparse.Namespace) -> str:
    """The command as ``stack.local.COMMAND_IDENTITIES`` names it: ``records prune`` for a
    subcommand (its parser's ``dest`` is ``<command>_action`` or ``<command>_command``), else
    the command."""
    stem = args.command.replace("-", "_")
    action = getattr(args, f"{stem}_action", None) or getattr(args, f"{stem}_command", None)
    return f"{args.command} {action}" if action else args.command


def load_credentials(command: str) -> int | None:
    """Put the credentials ``command`` acts with into MLflow's variables (``stack.local`` says
    which); None when done, else the exit code after one ``error:`` line."""
    try:
        local.select_credentials(command)
    except auth_files.CredentialsError as error:  # the local stack's own file: not an argument
        _error(error)
        return FAILED
    try:
        auth_files.load_credentials()
    except auth_files.CredentialsError as error:  # the variables name a file or pair that is unusable
        _error(error)
        return USAGE
    return None


def run_command(args: argparse.Namespace) -> int:
    """Run the command ``args`` names; what it raises becomes an exit code (``stack.errors``)."""
    from mlflow.exceptions import MlflowException
    from pydantic import ValidationError

    from stack.auth import ProvisioningError
    from training.data import DataError
    from training.promotion_history import PromotionError

    try:
        if args.command in _FIND_TRACKING_SERVER_FIRST:
            local.use_tracking_server()
        return args.handler(args)
    except ValidationError as error:
        if not is_usage_error(error):  # a model of data, not of arguments: a bug
            traceback.print_exc()
            return FAILED
        for line in settings_errors(error):  # one line per bad variable or flag
            _error(line)
        return USAGE
    except (UsageError, argparse.ArgumentTypeError, DataError) as error:
        _error(error)
        return USAGE
    except (
        PromotionError,
        processes.ServiceError,
        tracking_server.BackendStoreError,
        ProvisioningError,
        auth_files.CredentialsError,
        httpx.HTTPError,
        ConnectionError,
    ) as error:
        _error(error)
        return FAILED
    except MlflowException as error:
        _error(_refused(error) or error)
        return FAILED
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug: all of it, for the report
        traceback.print_exc()
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
