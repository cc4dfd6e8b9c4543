"""Reading shipped records back from MLflow as one DataFrame, ready for a drift tool.

Runs are fetched in parallel, each run's ``records/`` folder in one listing and parallel
downloads (MLflow's own artifact thread pool). A batch that cannot be read is skipped and
reported (``frame.attrs["skipped"]``: ``(name, reason)`` pairs, and a warning in the log)
unless ``strict=True``, which raises instead.
"""

from __future__ import annotations

import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import mlflow.artifacts
import pandas as pd
from mlflow.tracking import MlflowClient

from logging_sidecar.records import COLUMNS, KEY
from logging_sidecar.settings import INFERENCE_EXPERIMENT
from logging_sidecar.shipper import RECORDS_DIR

logger = logging.getLogger(__name__)

_RUN_WORKERS = 4  # runs fetched at once; each also downloads its files in parallel


class UnreadableBatch(RuntimeError):
    """A shipped batch could not be read back (``strict=True``)."""


def _as_utc(moment: datetime | str | None) -> pd.Timestamp | None:
    if moment is None:
        return None
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp.tz_convert(UTC)


def _read_run(client: MlflowClient, run_id: str, directory: Path, strict: bool):
    """The run's batches as frames, and the ``(name, reason)`` of those that failed."""
    frames, skipped = [], []
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=RECORDS_DIR,
            dst_path=str(directory / run_id),
            tracking_uri=client.tracking_uri,
        )
    except Exception as error:
        if "No such file or directory" in str(error) or "does not exist" in str(error):
            return frames, skipped  # a run without batches yet
        if strict:
            raise UnreadableBatch(f"run {run_id}/{RECORDS_DIR}: {error}") from error
        return frames, [(f"{run_id}/{RECORDS_DIR}", f"{type(error).__name__}: {error}")]
    for path in sorted(Path(local).glob("*.parquet")):
        try:
            frames.append(pd.read_parquet(path))
        except Exception as error:
            if strict:
                raise UnreadableBatch(f"run {run_id}: {path.name}: {error}") from error
            skipped.append((f"{run_id}/{RECORDS_DIR}/{path.name}", f"{type(error).__name__}: {error}"))
        path.unlink()
    return frames, skipped


def read_records(
    model_version: str | int | None = None,
    since: datetime | str | None = None,
    *,
    experiment: str = INFERENCE_EXPERIMENT,
    client: MlflowClient | None = None,
    deduplicate: bool = True,
    strict: bool = False,
) -> pd.DataFrame:
    """Every shipped inference record (one row per scored row), oldest first.

    ``model_version`` keeps one registry version; ``since`` (naive means UTC) keeps records
    at or after that moment. Duplicates that an interrupted delivery may have left are
    dropped on ``(request_id, row_index, timestamp)`` (a client reusing an id keeps all its
    requests); ``deduplicate=False`` shows the files as stored. A batch that cannot be read
    is skipped, logged and listed in ``attrs["skipped"]``; ``strict=True`` raises
    :class:`UnreadableBatch` instead.
    """
    client = client or MlflowClient()
    since_utc = _as_utc(since)
    empty = pd.DataFrame(columns=list(COLUMNS))
    empty.attrs["skipped"] = []
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return empty
    filters = []
    if model_version is not None:
        filters.append(f"tags.model_version = '{model_version}'")
    runs = client.search_runs([found.experiment_id], filter_string=" and ".join(filters), max_results=50000)
    if since_utc is not None:  # runs are per UTC day; tag filters only compare for equality
        runs = [r for r in runs if r.data.tags.get("day", "") >= since_utc.date().isoformat()]
    frames, skipped = [], []
    with tempfile.TemporaryDirectory() as directory, ThreadPoolExecutor(_RUN_WORKERS) as pool:
        for run_frames, run_skipped in pool.map(
            lambda run: _read_run(client, run.info.run_id, Path(directory), strict), runs
        ):
            frames += run_frames
            skipped += run_skipped
    for name, reason in skipped:
        logger.warning(f"read_records: skipped batch {name}: {reason}")
    if not frames:
        empty.attrs["skipped"] = skipped
        return empty
    records = pd.concat(frames, ignore_index=True)
    if since_utc is not None:
        records = records[records["timestamp"] >= since_utc]
    if deduplicate:
        records = records.drop_duplicates(subset=KEY, keep="first")
    # Batches of layout 1 have no replica or registered_model column: they read back empty.
    records = records.sort_values(["timestamp", "request_id", "row_index"], ignore_index=True).reindex(
        columns=list(COLUMNS)
    )
    records.attrs["skipped"] = skipped
    return records
