"""``credit-risk serve``: start MLServer on the serving folder with this project's defaults."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from mlserver.settings import Settings

from serving.settings import SERVING_DIR, serving_environment


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve models:/credit-risk-model/Production with MLServer (V2 protocol)",
        description="Start MLServer in the foreground. The model comes from the registry at "
        "$MLFLOW_TRACKING_URI; MLServer's own MLSERVER_* variables configure the server "
        "(MLSERVER_HTTP_PORT, MLSERVER_GRPC_PORT, MLSERVER_METRICS_PORT, MLSERVER_HOST, "
        "MLSERVER_PARALLEL_WORKERS, ...). Flags override the variables.",
    )
    parser.add_argument("--host", help="address to bind (MLSERVER_HOST, default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, help="V2 REST port (MLSERVER_HTTP_PORT, default 8080)")
    parser.add_argument("--grpc-port", type=int, help="V2 gRPC port (MLSERVER_GRPC_PORT, default 8081)")
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus port (MLSERVER_METRICS_PORT, default 8082)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="inference worker processes, 0 for none (MLSERVER_PARALLEL_WORKERS, default 1)",
    )
    parser.set_defaults(handler=run)


def run(args) -> int:
    flags = {
        "MLSERVER_HOST": args.host,
        "MLSERVER_HTTP_PORT": args.http_port,
        "MLSERVER_GRPC_PORT": args.grpc_port,
        "MLSERVER_METRICS_PORT": args.metrics_port,
        "MLSERVER_PARALLEL_WORKERS": args.workers,
    }
    os.environ.update({name: str(value) for name, value in flags.items() if value is not None})
    os.environ.update(serving_environment())
    settings = Settings()  # read from the environment exactly as MLServer will
    # Metric files left by a previous server would be summed into this one's counters.
    shutil.rmtree(settings.metrics_dir, ignore_errors=True)
    os.makedirs(settings.metrics_dir, exist_ok=True)
    mlserver = Path(sys.executable).with_name("mlserver")
    sys.stdout.flush()
    os.execv(mlserver, [str(mlserver), "start", str(SERVING_DIR)])
    return 0  # not reached: exec replaces this process
