"""Benchmark: wall time of one full training job on the real file, phase by phase.

Starts its own MLflow server on a free port and runs the real ``credit-risk train`` (read and
check, split, 5-fold cross-validation, fit, evaluation with plots and permutation importance,
logging, registration, gate) on ``../shared/data/cs-training-dev.csv``, ``--retrain`` each
round, with the environment as it is (``CREDIT_RISK_TRAIN_JOBS`` included).

    .venv/bin/python benchmarks/training_time.py [--data PATH] [--rounds 1]

Prints the wall time of each phase, the total and the trainer's CV ROC AUC (on its 80 %
training side); asserts nothing. The README quotes its output with date and machine. The
quality bar, 5-fold CV over the whole file within 0.001 of 0.8659, is
``tests/test_real_data.py``'s, which runs the same parallel cross-validation code.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import REAL_DATA, credit_risk, mlflow_tracking_server  # noqa: E402

TARGET_S = 60.0

_STAGE = re.compile(r"^→ (?P<name>.+?) \.\.\.$")
_DONE = re.compile(r"^  done in (?P<seconds>[\d.]+) s$")
_CV = re.compile(r"CV ROC AUC (?P<mean>[\d.]+) ± (?P<std>[\d.]+)")


def phases(stdout: str) -> list[tuple[str, float]]:
    """``(stage, seconds)`` from the trainer's own progress lines."""
    found, current = [], None
    for line in stdout.splitlines():
        if match := _STAGE.match(line):
            current = match["name"]
        elif (match := _DONE.match(line)) and current:
            found.append((current, float(match["seconds"])))
            current = None
    return found


def one_round(data: Path, tracking_uri: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = credit_risk("train", "--data", str(data), "--retrain", tracking_uri=tracking_uri)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"training failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return wall, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"no training file at {args.data}")
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"CREDIT_RISK_TRAIN_JOBS={os.environ.get('CREDIT_RISK_TRAIN_JOBS', '(default)')}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, data {args.data.name}"
    )
    with tempfile.TemporaryDirectory() as state, mlflow_tracking_server(Path(state)) as uri:
        for round_number in range(1, args.rounds + 1):
            wall, stdout = one_round(args.data, uri)
            print(f"\nround {round_number}")
            for name, seconds in phases(stdout):
                print(f"  {seconds:6.1f} s  {name}")
            cv = _CV.search(stdout)
            cv_text = f"{cv['mean']} ± {cv['std']}" if cv else "not found"
            print(f"  {wall:6.1f} s  total wall time of `credit-risk train` (target <= {TARGET_S:.0f} s)")
            print(f"  CV ROC AUC {cv_text} on the training side (whole-file bar: tests/test_real_data.py)")
            print(f"  load average during the round: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
