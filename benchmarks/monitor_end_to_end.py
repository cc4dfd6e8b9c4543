"""One monitoring window of 1,000,000 records, end to end: ``credit-risk monitor --json`` against
a real MLflow server holding the records as the sidecar ships them.

    .venv/bin/python benchmarks/monitor_end_to_end.py [--records 1000000] [--batch 1000]
        [--labelled 0.3] [--data FILE] [--repeat 3]

Setup (not timed): its own MLflow server (the tests' helpers); a version of
``credit-risk-model`` in Production whose training run holds a reference profile of the
training side of ``--data``'s content split (default the real file when present, else the
bundled sample; scores are beta-distributed stand-ins) and its ``test_roc_auc`` tag; then
``--records`` records over the 24 hours before a fixed moment, one row per request (unique
request ids: the heaviest join), written as the sidecar writes them: Parquet batches of
``--batch`` records (the sidecar's default flush size is 1,000) under ``records/`` of one run
per UTC day, tagged with the sidecar's run key (``logging_sidecar.shipper``), uploaded in
parallel; and outcomes for a ``--labelled`` share of them, stored by ``credit-risk outcomes add``.

Timed: ``credit-risk monitor --json --since ... --until ...`` as a child process, ``--repeat``
times: its wall time (interpreter start and imports included), the time of each step it
reports (``seconds``: profile, records, outcomes, compute, log), and its peak resident memory
(``ru_maxrss`` of the child). Prints figures with the load average; asserts nothing
(targets: at most 10 s, at most 1 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from logging_sidecar.records import RunKey, to_frame  # noqa: E402
from logging_sidecar.shipper import LAYOUT_TAG, LAYOUT_VERSION, RECORDS_DIR, RUN_KEY_TAG  # noqa: E402
from model.identity import (  # noqa: E402
    DATASET_HASH,
    PRODUCTION_STAGE,
    REGISTERED_MODEL_NAME,
    TEST_ROC_AUC_TAG,
    THRESHOLD_METRIC,
)
from model.schema import FEATURES  # noqa: E402
from monitoring.store import log_profile  # noqa: E402
from serving.settings import MODEL_NAME  # noqa: E402
from tests.helpers import BIN, mlflow_tracking_server  # noqa: E402
from training.data import BUNDLED_SAMPLE, load_training_data  # noqa: E402
from training.profile import build_profile  # noqa: E402
from training.split import ContentSplit  # noqa: E402

# The real data beside the repository (or beside the worktrees' folder).
REAL = next(
    (path for path in (REPO.parent / "shared" / "data" / "cs-training-dev.csv",
                       REPO.parent.parent / "shared" / "data" / "cs-training-dev.csv") if path.is_file()),
    REPO.parent / "shared" / "data" / "cs-training-dev.csv",
)  # fmt: skip
VERSION, REPLICA, HASH = "1", "bench", "0" * 64
UNTIL = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)  # a window that spans two UTC days (two runs)
SINCE = UNTIL - timedelta(hours=24)


def register_version(client: MlflowClient, features: pd.DataFrame, rng) -> None:
    """A Production version whose run holds a profile, a threshold and its training AUC."""
    experiment = client.create_experiment("bench-training")
    run = client.create_run(experiment).info.run_id
    log_profile(client, run, build_profile(features, rng.beta(1, 12, len(features)), 0.2))
    client.log_metric(run, THRESHOLD_METRIC, 0.2)
    client.set_terminated(run)
    client.create_registered_model(REGISTERED_MODEL_NAME)
    client.create_model_version(
        REGISTERED_MODEL_NAME,
        f"runs:/{run}/model",
        run_id=run,
        tags={TEST_ROC_AUC_TAG: "0.860000", DATASET_HASH: HASH},
    )
    client.transition_model_version_stage(REGISTERED_MODEL_NAME, VERSION, PRODUCTION_STAGE)


def records_frame(source: pd.DataFrame, stamps: np.ndarray, first_id: int, rng) -> pd.DataFrame:
    """Records as ``logging_sidecar.records.to_frame`` lays them out, one row per request."""
    rows = len(stamps)
    picked = source.iloc[rng.integers(0, len(source), rows)].reset_index(drop=True)
    probability = rng.beta(1, 12, rows)
    text = {"model_name": MODEL_NAME, "registered_model": REGISTERED_MODEL_NAME, "model_version": VERSION,
            "dataset_hash": HASH, "replica": REPLICA}  # fmt: skip
    frame = pd.DataFrame(
        {
            "request_id": pd.array([f"bench-{first_id + i:09d}" for i in range(rows)], dtype="string"),
            "row_index": np.zeros(rows, dtype="int32"),
            "timestamp": pd.to_datetime(stamps, utc=True),
            **{name: pd.array([value] * rows, dtype="string") for name, value in text.items()},
            **{name: picked[name].to_numpy(dtype="float64", na_value=np.nan) for name in FEATURES},
            "prediction": (probability >= 0.2).astype("int64"),
            "probability": probability,
            "latency_ms": np.ones(rows),
        }
    )
    return frame


def same_layout_as_the_sidecar(frame: pd.DataFrame) -> None:
    """The benchmark's batches have the sidecar's exact columns and types."""
    row = frame.iloc[0]
    request = {
        "request_id": row["request_id"],
        "timestamp_ns": row["timestamp"].value,
        **{name: row[name] for name in ("model_name", "registered_model", "model_version", "dataset_hash")},
        "replica": row["replica"],
        "latency_ms": 1.0,
        "features": {name: [None if np.isnan(row[name]) else row[name]] for name in FEATURES},
        "outputs": {"prediction": [int(row["prediction"])], "probability": [row["probability"]]},
    }
    sidecar = to_frame([request])
    assert list(sidecar.columns) == list(frame.columns), (list(sidecar.columns), list(frame.columns))
    assert dict(sidecar.dtypes.astype(str)) == dict(frame.dtypes.astype(str)), (sidecar.dtypes, frame.dtypes)


def ship(client, source, records: int, batch: int, folder: Path, rng) -> tuple[float, int]:
    """Upload the records in batches into one run per UTC day; returns (seconds, files)."""
    span = (UNTIL - SINCE).total_seconds()
    stamps = np.sort(
        np.datetime64(SINCE.replace(tzinfo=None), "ns")
        + (rng.uniform(0, span, records) * 1e9).astype("timedelta64[ns]")
    )
    experiment = client.create_experiment("credit-risk-inference")
    runs = {}
    for day in sorted({str(stamp)[:10] for stamp in stamps[[0, -1]]}):
        key = RunKey(MODEL_NAME, REGISTERED_MODEL_NAME, VERSION, HASH, REPLICA, day)
        tags = {RUN_KEY_TAG: key.text, LAYOUT_TAG: LAYOUT_VERSION, **key._asdict()}
        runs[day] = client.create_run(experiment, run_name=f"bench-{day}", tags=tags).info.run_id
    jobs = []
    for number, start in enumerate(range(0, records, batch)):
        part = stamps[start : start + batch]
        days = np.array([str(stamp)[:10] for stamp in part[[0, -1]]])
        for day in sorted(set(days)):  # a batch across midnight is one file per day's run
            if days[0] == days[1]:
                jobs.append((number, day, part, start))
                continue
            keep = np.array([str(stamp)[:10] == day for stamp in part])  # a prefix, then the rest
            jobs.append((number, day, part[keep], start + int(np.argmax(keep))))  # ids go on
    same_layout_as_the_sidecar(records_frame(source, stamps[:1], 0, rng))

    def upload(job) -> None:
        number, day, part, first_id = job
        frame = records_frame(source, part, first_id, np.random.default_rng(number))
        path = folder / f"batch-{REPLICA}-{number:010d}-{day}.parquet"
        frame.to_parquet(path, index=False)
        client.log_artifact(runs[day], str(path), RECORDS_DIR)
        path.unlink()

    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(upload, jobs))
    return time.perf_counter() - started, len(jobs)


def add_outcomes(uri: str, records: int, share: float, folder: Path, rng) -> int:
    labelled = np.sort(rng.choice(records, int(records * share), replace=False))
    path = folder / "outcomes.csv"
    pd.DataFrame(
        {
            "request_id": [f"bench-{i:09d}" for i in labelled],
            "row": 0,
            "outcome": rng.integers(0, 2, len(labelled)),
        }
    ).to_csv(path, index=False)
    done = subprocess.run(
        [str(BIN / "credit-risk"), "outcomes", "add", str(path)],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return len(labelled)


def monitor(uri: str) -> tuple[float, dict, float]:
    """One ``credit-risk monitor --json`` run: wall seconds, its JSON, its peak RSS in MB."""
    command = [
        str(BIN / "credit-risk"),
        "monitor",
        "--json",
        "--since",
        SINCE.isoformat(),
        "--until",
        UNTIL.isoformat(),
    ]
    # Output to files, not pipes: wait4 (for the child's own peak RSS) reads nothing while it
    # waits, and a pipe that fills would block the child.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(
            command, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        out.seek(0), err.seek(0)
        assert os.waitstatus_to_exitcode(status) == 0, err.read()
        return wall, json.loads(out.read()), usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000, help="records per shipped Parquet file")
    parser.add_argument("--labelled", type=float, default=0.3, help="share of records with an outcome")
    parser.add_argument("--data", type=Path, default=REAL if REAL.is_file() else BUNDLED_SAMPLE)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    rng = np.random.default_rng(0)
    data = load_training_data(arguments.data)
    training = data.features[~ContentSplit.of(data.features, data.target, 0.2).evaluation]
    with tempfile.TemporaryDirectory() as directory, mlflow_tracking_server(Path(directory)) as uri:
        client = MlflowClient(uri)
        register_version(client, training, rng)
        shipped_in, files = ship(
            client, data.features, arguments.records, arguments.batch, Path(directory), rng
        )
        labelled = (
            add_outcomes(uri, arguments.records, arguments.labelled, Path(directory), rng)
            if arguments.labelled
            else 0
        )
        print(
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"setup: {arguments.records:,} records in {files} files of up to {arguments.batch} over 2 day runs "
            f"uploaded in {shipped_in:.0f} s, {labelled:,} outcomes stored",
            flush=True,
        )
        for attempt in range(arguments.repeat):
            load = os.getloadavg()
            wall, document, peak_mb = monitor(uri)
            seconds = document["seconds"]
            window = sum(value for name, value in seconds.items() if name != "log")
            print(
                f"run {attempt + 1}: credit-risk monitor --json {wall:.1f} s wall (start and imports included); "
                f"window {window:.1f} s ({', '.join(f'{k} {v:.2f} s' for k, v in seconds.items())}); "
                f"peak RSS {peak_mb:.0f} MB; rows {document['rows']:,}, labelled "
                f"{(document['outcomes'] or {}).get('rows', 0):,}; load average before "
                f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
