"""The ``credit-risk`` command: one entry point for every part of the project.

``train``, ``serve``, ``sidecar`` and ``tracking-server`` run one part in the foreground; ``promote``,
``rollback`` and ``status`` move and show Production; ``up`` and ``down`` start and stop the
whole local stack in the background.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

from logging_sidecar import settings as sidecar_settings
from logging_sidecar.cli import add_parser as add_sidecar_parser
from serving.cli import add_parser as add_serve_parser
from serving.settings import DEFAULT_HTTP_PORT, MODEL_NAME, SERVING_DIR
from stack import processes, services, tracking_server
from training.cli import add_parser as add_train_parser
from training.promotion_cli import add_parsers as add_promotion_parsers

EXAMPLE_REQUEST = SERVING_DIR / "example-request.json"


class LocalStack:
    """The three long-running processes of ``credit-risk up``, configured from the flags."""

    def __init__(self, args):
        self.state_dir: Path = args.state_dir.resolve()
        self.tracking_uri = services.tracking_uri(args.mlflow_port)
        self.infer_url = f"http://{services.LOOPBACK}:{args.http_port}/v2/models/{MODEL_NAME}/infer"
        spool = self.state_dir / "spool"
        self.mlflow = services.mlflow(
            self.state_dir / "mlflow",
            port=args.mlflow_port,
            backend_store_uri=getattr(args, "backend_store_uri", None),
        )
        self.serving = services.serving(self.tracking_uri, args.http_port, CREDIT_RISK_SPOOL_DIR=str(spool))
        self.sidecar = services.sidecar(self.tracking_uri, spool, args.sidecar_port, supervised=True)

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


def up(args) -> int:
    from training.settings import TrainingSettings
    from training.train import stage, summary, train

    stack = LocalStack(args)
    with stage(f"MLflow tracking server on {stack.tracking_uri}"):
        print(f"  {stack.ensure_running(stack.mlflow, timeout=120)}")

    os.environ["MLFLOW_TRACKING_URI"] = stack.tracking_uri
    result = train(TrainingSettings(**({"data": args.data} if args.data else {})))
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
    print(
        f"\nMLflow UI:    {stack.tracking_uri}\n"
        f"V2 endpoint:  {stack.infer_url}\n"
        f"Try it:       curl -s -H 'Content-Type: application/json' -d @{EXAMPLE_REQUEST} {stack.infer_url}\n"
        f"Logs:         {stack.state_dir / 'logs'}\n"
        f"Stop:         {Path(sys.executable).with_name('credit-risk')} down"
    )
    return 0


def down(args) -> int:
    stack = LocalStack(args)
    # Serving first: the sidecar's drain waits for it to release the spool, then ships.
    for service in (stack.serving, stack.sidecar, stack.mlflow):
        stopped = processes.stop(service, stack.state_dir)
        print(f"{service.name}: {'stopped' if stopped else 'not running'}")
    return 0


def _add_stack_parsers(subparsers) -> None:
    for name, handler, text in (
        ("up", up, "start MLflow, train on the bundled sample (or --data), serve, and infer once"),
        ("down", down, "stop what `credit-risk up` started"),
    ):
        parser = subparsers.add_parser(name, help=text, description=text)
        parser.add_argument(
            "--state-dir",
            type=Path,
            default=services.DEFAULT_STATE_DIR,
            help="where the stack keeps its database, artifacts, logs and pids "
            "($CREDIT_RISK_HOME, default ./.credit-risk)",
        )
        parser.add_argument("--mlflow-port", type=int, default=services.MLFLOW_PORT)
        parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
        parser.add_argument("--sidecar-port", type=int, default=sidecar_settings.DEFAULT_PORT)
        if name == "up":
            parser.add_argument("--data", type=Path, help="training CSV (default: bundled sample)")
            parser.add_argument(
                "--backend-store-uri",
                default=os.environ.get("MLFLOW_BACKEND_STORE_URI"),
                help="MLflow's runs and registry, e.g. postgresql+psycopg2://user:password@host:5432/db "
                "($MLFLOW_BACKEND_STORE_URI, default SQLite in the state folder)",
            )
        parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credit-risk",
        description="Train, register, promote and serve the credit-risk model.",
    )
    subparsers = parser.add_subparsers(required=True, metavar="COMMAND")
    add_train_parser(subparsers)
    add_promotion_parsers(subparsers)
    add_serve_parser(subparsers)
    add_sidecar_parser(subparsers)
    tracking_server.add_parser(subparsers)
    _add_stack_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlflow.exceptions import MlflowException

    from training.data import DataError
    from training.registry import PromotionError

    try:
        return args.handler(args)
    except (DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (
        PromotionError,
        processes.ServiceError,
        tracking_server.BackendStoreError,
        MlflowException,
        httpx.HTTPError,
        ConnectionError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
