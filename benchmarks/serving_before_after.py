"""Benchmark: this checkout's server against the same server at an earlier commit, side by side.

``serving.py`` measures one server between its floor and its ceiling; a change to the request
path needs the other question answered: is it slower than before? On a shared machine two runs
minutes apart differ by more than the change, so both servers run at once on one MLflow and
one registered model, and every measurement is interleaved (the order swapped each round).

The earlier commit (``--before``, default ``main``) is exported with ``git archive`` to a
temporary folder and served with this checkout's virtual environment, put first on
``PYTHONPATH``; a request only the newer code answers differently (a body that is not JSON)
shows that each server runs the code it should. Capture is on for both (own spools, no
sidecar); load comes from wrk and h2load as in ``serving.py``:

- REST, one row per request, 16 connections; gRPC the same with h2load;
- REST, 1,000 rows per request, one connection.

    .venv/bin/python benchmarks/serving_before_after.py [--before main] [--seconds 10] [--rounds 3] [--only gRPC]

Prints the median of the rounds with each round's figure and the load average; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.serving import (  # noqa: E402
    CONCURRENCY,
    INFER_PATH,
    WRK_SCRIPT,
    grpc_frame,
    grpc_request,
    h2load,
    machine,
    v2_body,
    wrk,
)
from stack import services  # noqa: E402
from tests.helpers import credit_risk, mlflow_tracking_server, running, serving_service  # noqa: E402
from training.data import BUNDLED_SAMPLE, load_training_data  # noqa: E402


def export(ref: str, folder: Path) -> str:
    """``ref``'s tree in ``folder``; returns its short commit."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True, check=True
    ).stdout.strip()


def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="credit-risk-before-after-"))
    before_tree = root / "before"
    before_tree.mkdir()
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    results: dict = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        "machine": machine(),
        "before": f"{args.before} ({export(args.before, before_tree)})",
        "after": f"HEAD ({head}, plus uncommitted changes)",
        "load": [],
    }
    script = root / "post.lua"
    script.write_text(WRK_SCRIPT)
    features = load_training_data(BUNDLED_SAMPLE).features.to_numpy()
    one_row, thousand, frame = root / "one.json", root / "thousand.json", root / "one.grpc"
    one_row.write_text(json.dumps(v2_body(features[:1])))
    thousand.write_text(json.dumps(v2_body(features[:1000])))
    frame.write_bytes(grpc_frame(grpc_request(features[:1])))

    with mlflow_tracking_server(root) as tracking_uri:
        trained = credit_risk("train", "--data", str(BUNDLED_SAMPLE), tracking_uri=tracking_uri)
        if trained.returncode != 0:
            sys.exit(f"training failed:\n{trained.stdout}{trained.stderr}")
        python_path = os.pathsep.join(filter(None, [str(before_tree), os.environ.get("PYTHONPATH")]))
        before, before_ports = serving_service(
            tracking_uri,
            name="before",
            PYTHONPATH=python_path,
            CREDIT_RISK_SPOOL_DIR=str(root / "spool-before"),
        )
        after, after_ports = serving_service(
            tracking_uri, name="after", CREDIT_RISK_SPOOL_DIR=str(root / "spool-after")
        )
        ports = {"before": before_ports, "after": after_ports}
        with running(before, root), running(after, root):
            results["not json"] = {
                name: httpx.post(
                    f"http://{services.LOOPBACK}:{port['http']}{INFER_PATH}", content=b"not json", timeout=10
                ).text
                for name, port in ports.items()
            }
            cases = {
                "REST, 1 row, 16 connections": lambda port, n: wrk(
                    f"http://{services.LOOPBACK}:{port['http']}{INFER_PATH}", one_row, script, args.seconds, CONCURRENCY
                ),
                "gRPC, 1 row, 16 streams": lambda port, n: h2load(
                    f"{services.LOOPBACK}:{port['grpc']}", frame, args.seconds, root / f"h2load-{n}.log"
                ),
                "REST, 1,000 rows, 1 connection": lambda port, n: wrk(
                    f"http://{services.LOOPBACK}:{port['http']}{INFER_PATH}", thousand, script, args.seconds, 1
                ),
            }  # fmt: skip
            cases = {case: measure for case, measure in cases.items() if args.only.lower() in case.lower()}
            figures = {case: {"before": [], "after": []} for case in cases}
            for number in range(args.rounds):
                results["load"].append(os.getloadavg()[0])
                order = ["before", "after"] if number % 2 == 0 else ["after", "before"]
                for case, measure in cases.items():
                    for name in order:
                        figures[case][name].append(measure(ports[name], f"{name}-{number}"))
    results["figures"] = figures
    return results


def report(results: dict) -> None:
    print(f"date: {results['date']}; machine: {results['machine']}")
    print(f"before: {results['before']}; after: {results['after']}")
    print(f"load average (1 min) at each round: {', '.join(f'{v:.1f}' for v in results['load'])}")
    for name, text in results["not json"].items():
        print(f"{name} answers a body that is not JSON with: {text[:100]}")
    print(
        f"\n  {'case':32} {'before req/s':>12} {'after req/s':>12} {'after/before':>12}  rounds (before | after)"
    )
    for case, by_name in results["figures"].items():
        medians = {name: statistics.median(r["rps"] for r in rounds) for name, rounds in by_name.items()}
        errors = sum(r["errors"] for rounds in by_name.values() for r in rounds)
        each = " | ".join(", ".join(f"{r['rps']:.0f}" for r in by_name[name]) for name in ("before", "after"))
        print(
            f"  {case:32} {medians['before']:12.1f} {medians['after']:12.1f} "
            f"{medians['after'] / medians['before']:12.2f}  {each}; errors {errors}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="the commit to compare with (default: main)")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="only the cases whose name contains this (e.g. gRPC)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    results = run(args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
