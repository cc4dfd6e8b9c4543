"""Benchmark: what MLflow's basic-auth app adds to each request, and what provisioning takes.

Starts, one after the other, three tracking servers on free ports (two workers each, as the
stack runs them): without auth; with ``--app-name basic-auth`` and this project's ini
(``auth_cache_ttl_seconds = 60``); and the same with MLflow's default, no credential cache.
On each it provisions (the auth ones, twice) and times ``--requests`` sequential reads of the
registered model, the request serving's registry poll makes, as ``serving``.

MLflow stores passwords as scrypt hashes (werkzeug's default) and, without the cache, checks
the hash on every request: that is the cost measured here.

    .venv/bin/python benchmarks/auth_overhead.py [--requests 50]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from model.identity import REGISTERED_MODEL_NAME  # noqa: E402
from stack.auth import provision  # noqa: E402
from stack.auth_files import read_credentials  # noqa: E402
from tests.auth_helpers import auth_tracking_server  # noqa: E402
from tests.helpers import mlflow_tracking_server  # noqa: E402

ROUTE = "/api/2.0/mlflow/registered-models/get"


def latencies(uri: str, auth, requests: int) -> list[float]:
    times = []
    with httpx.Client(base_url=uri, auth=auth, timeout=60) as client:
        for _ in range(requests):
            started = time.perf_counter()
            client.get(ROUTE, params={"name": REGISTERED_MODEL_NAME}).raise_for_status()
            times.append(time.perf_counter() - started)
    return times


def line(what: str, times: list[float]) -> str:
    ordered = sorted(times)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"{what:34} median {statistics.median(times) * 1e3:7.1f} ms, p90 {p90 * 1e3:7.1f} ms, first {times[0] * 1e3:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as directory, mlflow_tracking_server(Path(directory)) as uri:
        httpx.post(f"{uri}/api/2.0/mlflow/registered-models/create", json={"name": REGISTERED_MODEL_NAME})
        print(line("no auth", latencies(uri, None, args.requests)))
    for ttl, label in ((60, "basic-auth, credential cache 60 s"), (0, "basic-auth, no cache (MLflow's)")):
        with tempfile.TemporaryDirectory() as directory:
            state, credentials = Path(directory), Path(directory) / "auth"
            with auth_tracking_server(state, credentials, environ={}, cache_ttl_s=ttl) as uri:
                started = time.perf_counter()
                provision(uri, credentials, environ={})
                first = time.perf_counter() - started
                started = time.perf_counter()
                again = provision(uri, credentials, environ={})
                second = time.perf_counter() - started
                serving = tuple(read_credentials(credentials / "serving.env"))
                print(line(label, latencies(uri, serving, args.requests)))
                print(
                    f"{'':34} provisioning {first:.1f} s, again {second:.1f} s ({len(again.changes)} changes)"
                )


if __name__ == "__main__":
    main()
