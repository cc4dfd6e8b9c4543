"""Prometheus metrics labelled with the registry version and dataset hash.

MLServer's own ``model_infer_request_*`` metrics take their ``version`` label from the URL
(``None`` on ``/v2/models/credit-risk/infer``); these carry the version that actually scored.
They are created on first use, inside the process that scores: with parallel workers that is
a worker, after MLServer switched prometheus_client to multiprocess mode, and MLServer's
metrics endpoint aggregates them.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

from prometheus_client import Counter, Gauge, Histogram


class Labels(NamedTuple):
    model: str
    version: str
    dataset_hash: str


_LABELS = list(Labels._fields)


@cache
def _metrics():
    return {
        "info": Gauge(
            "credit_risk_model_info",
            "The model version being served (value 1)",
            _LABELS,
            multiprocess_mode="max",
        ),
        "rows": Counter("credit_risk_rows_scored", "Rows scored", _LABELS),
        "requests": Histogram(
            "credit_risk_request_seconds",
            "Time to decode, validate, score and encode one inference request",
            _LABELS,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        ),
        "rejected": Counter(
            "credit_risk_requests_rejected", "Requests answered 4xx for invalid input", _LABELS
        ),
        "captured": Counter("credit_risk_capture_rows", "Scored rows appended to the capture spool", _LABELS),
        "dropped": Counter(
            "credit_risk_capture_dropped_rows",
            "Scored rows not captured (spool full or not writable); inference was answered",
            _LABELS,
        ),
    }


def model_loaded(labels: Labels) -> None:
    _metrics()["info"].labels(*labels).set(1)


def request_scored(labels: Labels, rows: int, seconds: float) -> None:
    metrics = _metrics()
    metrics["rows"].labels(*labels).inc(rows)
    metrics["requests"].labels(*labels).observe(seconds)


def request_rejected(labels: Labels) -> None:
    _metrics()["rejected"].labels(*labels).inc()


def request_captured(labels: Labels, rows: int, kept: bool) -> None:
    _metrics()["captured" if kept else "dropped"].labels(*labels).inc(rows)
