"""Inference records as tables: one row per scored row, the layout drift tools read.

Columns: ``request_id``, ``row_index``, ``timestamp`` (UTC), ``model_name``,
``registered_model``, ``model_version``, ``dataset_hash``, ``replica`` (the serving replica
that scored it), the ten features under their training names (NaN for missing),
``prediction``, ``probability`` and ``latency_ms`` (of the whole request). Batches shipped
before ``registered_model`` and ``replica`` existed read back with those empty.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np
import pandas as pd

from model.identity import DATASET_HASH
from model.schema import FEATURES, OUTPUT_PREDICTION, OUTPUT_PROBABILITY

_TEXT_IDENTITY = ("model_name", "registered_model", "model_version", DATASET_HASH, "replica")
IDENTITY_COLUMNS = ("request_id", "row_index", "timestamp", *_TEXT_IDENTITY)
COLUMNS = (*IDENTITY_COLUMNS, *FEATURES, OUTPUT_PREDICTION, OUTPUT_PROBABILITY, "latency_ms")
# What makes a record unique. Not the request id alone: clients choose it and may reuse it,
# but a replayed record keeps its request's exact timestamp.
KEY = ["request_id", "row_index", "timestamp"]


class RunKey(NamedTuple):
    """Records land in one MLflow run per model (registered name, version, training data),
    serving replica and UTC day: everything that groups records names the run, so two groups
    never share a run, and replicas never share batch files or metric steps."""

    model_name: str
    registered_model: str
    model_version: str
    dataset_hash: str
    replica: str
    day: str

    @property
    def text(self) -> str:
        return "/".join(
            (self.registered_model, f"v{self.model_version}", self.dataset_hash, self.replica, self.day)
        )


# Every field of a run's key is also a tag of the run (the shipper writes ``key._asdict()``);
# reading and retention select runs by this one, the UTC day of their records.
DAY_TAG = "day"


def run_key(request: dict) -> RunKey:
    day = datetime.fromtimestamp(request["timestamp_ns"] / 1e9, tz=UTC).date().isoformat()
    return RunKey(*(request[name] for name in _TEXT_IDENTITY), day)


def to_frame(requests: list[dict]) -> pd.DataFrame:
    """Expand request lines (columnar per request) into one row per scored row."""
    rows = [len(r["outputs"][OUTPUT_PROBABILITY]) for r in requests]
    repeat = np.repeat
    columns = {
        "request_id": repeat([r["request_id"] for r in requests], rows),
        "row_index": np.concatenate([np.arange(n, dtype="int32") for n in rows]) if rows else [],
        "timestamp": pd.to_datetime(repeat([r["timestamp_ns"] for r in requests], rows), utc=True),
        **{name: repeat([r[name] for r in requests], rows) for name in _TEXT_IDENTITY},
    }
    for name in FEATURES:
        columns[name] = np.array(
            [np.nan if v is None else v for r in requests for v in r["features"][name]], dtype="float64"
        )
    columns[OUTPUT_PREDICTION] = np.array(
        [v for r in requests for v in r["outputs"][OUTPUT_PREDICTION]], dtype="int64"
    )
    columns[OUTPUT_PROBABILITY] = np.array(
        [v for r in requests for v in r["outputs"][OUTPUT_PROBABILITY]], dtype="float64"
    )
    columns["latency_ms"] = repeat(np.array([r["latency_ms"] for r in requests], dtype="float64"), rows)
    frame = pd.DataFrame(columns)
    for name in ("request_id", *_TEXT_IDENTITY):
        frame[name] = frame[name].astype("string")
    return frame


def summary_metrics(frame: pd.DataFrame) -> dict[str, float]:
    """Per-batch figures a dashboard can chart without opening the Parquet files."""
    metrics = {
        "batch_records": float(len(frame)),
        "batch_mean_probability": float(frame[OUTPUT_PROBABILITY].mean()),
        "batch_positive_rate": float(frame[OUTPUT_PREDICTION].mean()),
    }
    for name in FEATURES:
        column = frame[name]
        metrics[f"feature_missing_share/{name}"] = float(column.isna().mean())
        if column.notna().any():
            metrics[f"feature_mean/{name}"] = float(column.mean())
    return metrics
