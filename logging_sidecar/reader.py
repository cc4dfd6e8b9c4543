"""Reading shipped records back from MLflow as one DataFrame, ready for a drift tool."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from logging_sidecar.records import COLUMNS, KEY
from logging_sidecar.settings import INFERENCE_EXPERIMENT
from logging_sidecar.shipper import RECORDS_DIR


def _as_utc(moment: datetime | str | None) -> pd.Timestamp | None:
    if moment is None:
        return None
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp.tz_convert(UTC)


def read_records(
    model_version: str | int | None = None,
    since: datetime | str | None = None,
    *,
    experiment: str = INFERENCE_EXPERIMENT,
    client: MlflowClient | None = None,
    deduplicate: bool = True,
) -> pd.DataFrame:
    """Every shipped inference record (one row per scored row), oldest first.

    ``model_version`` keeps one registry version; ``since`` (naive means UTC) keeps records
    at or after that moment. Duplicates that an interrupted delivery may have left are
    dropped on ``(request_id, row_index, timestamp)`` (a client reusing an id keeps all its
    requests); ``deduplicate=False`` shows the files as stored.
    """
    client = client or MlflowClient()
    since_utc = _as_utc(since)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return pd.DataFrame(columns=list(COLUMNS))
    filters = []
    if model_version is not None:
        filters.append(f"tags.model_version = '{model_version}'")
    runs = client.search_runs([found.experiment_id], filter_string=" and ".join(filters), max_results=50000)
    if since_utc is not None:  # runs are per UTC day; tag filters only compare for equality
        runs = [r for r in runs if r.data.tags.get("day", "") >= since_utc.date().isoformat()]
    frames = []
    with tempfile.TemporaryDirectory() as directory:
        for run in runs:
            for artifact in client.list_artifacts(run.info.run_id, RECORDS_DIR):
                local = client.download_artifacts(run.info.run_id, artifact.path, directory)
                frames.append(pd.read_parquet(local))
                Path(local).unlink()
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    records = pd.concat(frames, ignore_index=True)
    if since_utc is not None:
        records = records[records["timestamp"] >= since_utc]
    if deduplicate:
        records = records.drop_duplicates(subset=KEY, keep="first")
    return records.sort_values(["timestamp", "request_id", "row_index"], ignore_index=True)[list(COLUMNS)]
