"""One monitoring window of 1,000,000 records computed in memory: time and peak memory.

    .venv/bin/python benchmarks/monitoring_window.py [--rows 1000000] [--data FILE]

The profile is built on the training side of the content split of ``--data`` (default the
real file when present, else the bundled sample), with beta-distributed scores standing in
for a model's; the records are rows of that file drawn with replacement, shaped as
``read_records`` returns them (string request ids, UTC timestamps), with outcomes for 30 % of
them. Prints the profile's build time and file sizes, then ``monitor_window``'s wall time and
the process's peak resident memory before and after it. Reading the records from MLflow is
``benchmarks/read_records.py``'s part.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd

from monitoring.window import monitor_window
from training.data import BUNDLED_SAMPLE, load_training_data
from training.profile import build_profile
from training.split import ContentSplit

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cs-training-dev.csv"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--data", type=Path, default=REAL if REAL.is_file() else BUNDLED_SAMPLE)
    arguments = parser.parse_args()
    rng = np.random.default_rng(0)

    data = load_training_data(arguments.data)
    training = data.features[~ContentSplit.of(data.features, data.target, 0.2).evaluation]
    started = time.perf_counter()
    profile = build_profile(training, rng.beta(1, 12, len(training)), 0.2)
    built = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as directory:
        sizes = {path.name: path.stat().st_size for path in profile.save(Path(directory))}
    print(
        f"profile of {len(training)} training rows ({arguments.data.name}): built in {built:.2f} s, {sizes}"
    )

    rows = arguments.rows
    picked = data.features.iloc[rng.integers(0, len(data.features), rows)].reset_index(drop=True)
    probability = rng.beta(1, 12, rows)
    request_ids = pd.array([f"{i:032x}" for i in range(rows)], dtype="str")
    records = picked.assign(
        request_id=request_ids,
        row_index=np.zeros(rows, dtype="int32"),
        timestamp=pd.date_range("2026-12-01", periods=rows, freq="50ms", tz="UTC"),
        model_version=pd.array(["1"] * rows, dtype="str"),
        probability=probability,
        prediction=(probability >= 0.2).astype("int64"),
    )
    labelled = rng.choice(rows, rows * 3 // 10, replace=False)
    outcomes = pd.DataFrame(
        {
            "request_id": request_ids[labelled],
            "row_index": np.zeros(len(labelled), dtype="int32"),
            "outcome": (rng.uniform(size=len(labelled)) < probability[labelled]).astype("int8"),
        }
    )
    before = peak_mb()
    started = time.perf_counter()
    result = monitor_window(records, profile, model_version="1", outcomes=outcomes)
    elapsed = time.perf_counter() - started
    print(
        f"monitor_window: {result.rows} records, {result.outcomes.rows} labelled: {elapsed:.2f} s; "
        f"peak RSS {before:.0f} MB before, {peak_mb():.0f} MB after; "
        f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    main()
