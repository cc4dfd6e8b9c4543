"""Benchmark: how long ``read_records`` takes for many shipped batches.

Starts its own MLflow server (the tests' helpers), ships N batches of M records each into
one inference run per batch group the way the sidecar lays them out (Parquet under
``records/``), then times ``read_records`` reading them all back.

    .venv/bin/python benchmarks/read_records.py [--batches 1000] [--records 1000]

Prints figures; asserts nothing (target: 1,000 x 1,000 in under 10 s). The README quotes its
output with date and machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlflow.tracking import MlflowClient  # noqa: E402

from logging_sidecar.reader import read_records  # noqa: E402
from logging_sidecar.records import to_frame  # noqa: E402
from logging_sidecar.shipper import RECORDS_DIR  # noqa: E402
from model.schema import FEATURES  # noqa: E402
from tests.helpers import mlflow_tracking_server  # noqa: E402

IDENTITY = {"model_name": "credit-risk", "registered_model": "credit-risk-model", "model_version": "1",
            "dataset_hash": "0" * 64, "replica": "bench"}  # fmt: skip
RUNS = 10  # batches spread over this many runs, as replicas and days would


def batch_frame(batch: int, records: int):
    rng = np.random.default_rng(batch)
    features = rng.random((records, len(FEATURES)))
    request = {
        "request_id": f"bench-{batch}",
        "timestamp_ns": 1_700_000_000_000_000_000 + batch * 1_000_000,
        **IDENTITY,
        "latency_ms": 1.0,
        "features": dict(zip(FEATURES, features.T.tolist(), strict=True)),
        "outputs": {"prediction": [0] * records, "probability": rng.random(records).tolist()},
    }
    return to_frame([request])


def ship(client: MlflowClient, experiment: str, batches: int, records: int, folder: Path) -> float:
    experiment_id = client.create_experiment(experiment)
    runs = [client.create_run(experiment_id, run_name=f"bench-{n}").info.run_id for n in range(RUNS)]

    def upload(batch: int) -> None:
        path = folder / f"batch-bench-{batch:010d}.parquet"
        batch_frame(batch, records).to_parquet(path, index=False)
        client.log_artifact(runs[batch % RUNS], str(path), RECORDS_DIR)
        path.unlink()

    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(upload, range(batches)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--records", type=int, default=1000)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as directory, mlflow_tracking_server(Path(directory)) as uri:
        client = MlflowClient(uri)
        uploaded_in = ship(client, "bench-inference", args.batches, args.records, Path(directory))
        started = time.perf_counter()
        records = read_records(experiment="bench-inference", client=client)
        read_in = time.perf_counter() - started
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"shipped {args.batches} batches x {args.records} records in {uploaded_in:.1f} s (setup)")
    print(
        f"read_records: {len(records):,} records from {args.batches} batches in {read_in:.2f} s "
        f"({len(records) / read_in:,.0f} records/s; target 1,000 x 1,000 under 10 s); "
        f"skipped: {len(records.attrs['skipped'])}"
    )


if __name__ == "__main__":
    main()
