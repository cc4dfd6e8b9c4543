"""``credit-risk serve``: run MLServer (``serving.server``) on the registry's Production model.

Before MLServer starts, the serving settings are read once (``ServingSettings``): a bad value
raises its ``pydantic.ValidationError``, which the ``credit-risk`` command reports as a bad
setting (exit 2). MLServer's own ``MLSERVER_*`` settings are read here too, and a bad one is
reported by its variable's name (exit 2): MLServer's fields are not this command's flags. An
installed MLServer other than the pinned one stops it with one line (exit 1: the installation
is wrong, not the arguments).
"""

from __future__ import annotations

import os
import sys

from model.identity import PRODUCTION_MODEL_URI
from serving.settings import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT

_HOOKS_MODULE = "serving.mlserver_hooks"  # refuses to import with an MLServer it is not pinned to


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help=f"serve {PRODUCTION_MODEL_URI} with MLServer (V2 protocol), following the registry",
        description="Start MLServer in the foreground. The model comes from the registry at "
        "$MLFLOW_TRACKING_URI, and the server follows Production by itself. MLServer's own "
        "MLSERVER_* variables configure the server (MLSERVER_HTTP_PORT, MLSERVER_GRPC_PORT, "
        "MLSERVER_METRICS_PORT, MLSERVER_HOST, ...); CREDIT_RISK_REGISTRY_POLL_S sets how often "
        "the registry is asked (default 5 s). Flags override the variables.",
    )
    parser.add_argument("--host", help="address to bind (MLSERVER_HOST, default 127.0.0.1)")
    parser.add_argument(
        "--http-port", type=int, help=f"V2 REST port (MLSERVER_HTTP_PORT, default {DEFAULT_HTTP_PORT})"
    )
    parser.add_argument(
        "--grpc-port", type=int, help=f"V2 gRPC port (MLSERVER_GRPC_PORT, default {DEFAULT_GRPC_PORT})"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help=f"Prometheus port (MLSERVER_METRICS_PORT, default {DEFAULT_METRICS_PORT})",
    )
    parser.set_defaults(handler=run)


def run(args) -> int:
    from serving.settings import ServingSettings, serving_environment

    flags = {
        "MLSERVER_HOST": args.host,
        "MLSERVER_HTTP_PORT": args.http_port,
        "MLSERVER_GRPC_PORT": args.grpc_port,
        "MLSERVER_METRICS_PORT": args.metrics_port,
    }
    os.environ.update({name: str(value) for name, value in flags.items() if value is not None})
    os.environ.update(serving_environment())
    ServingSettings()  # a bad CREDIT_RISK_* value stops here, before any port is taken
    if problems := _mlserver_settings_problems():
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    # Imported once the environment is final: MLServer and MLflow read it at import time.
    try:
        from serving.server import main
    except ImportError as error:
        if error.name != _HOOKS_MODULE:
            raise
        print(f"error: {error.msg}", file=sys.stderr)
        return 1
    return main()


def _mlserver_settings_problems() -> list[str]:
    """One line per bad ``MLSERVER_*`` value, read by MLServer's own ``Settings`` as the server
    will read it: ``MLSERVER_GRPC_MAX_MESSAGE_LENGTH='abc': Input should be a valid integer``."""
    from mlserver.settings import Settings
    from pydantic import ValidationError

    try:
        Settings()
    except ValidationError as error:
        prefix = Settings.model_config.get("env_prefix", "MLSERVER_")
        return [
            f"{prefix}{'_'.join(map(str, problem['loc'])).upper()}={problem['input']!r}: {problem['msg']}"
            for problem in error.errors(include_url=False)
        ]
    return []
