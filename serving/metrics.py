"""Prometheus metrics labelled with the registry version and dataset hash.

Labels, the same on every ``credit_risk_*`` metric that has them:

- ``model``: the served model's name, ``credit-risk`` (``model-settings.json``; the name in
  ``/v2/models/<model>/...``), never the registered model's name;
- ``version``: the registry version of the registered model (``credit-risk-model``) that
  scored, or failed to load;
- ``dataset_hash``: the SHA-256 of that version's training file (``model.identity.DATASET_HASH``);
- ``reason`` (refusals only): ``integrity`` (its run is not a training run, it has no integrity
  record, or a file differs from it) or ``answers`` (it answers its logged held-out rows
  otherwise than at training), as ``model.verified`` says.

MLServer's own ``model_infer_request_*`` metrics take their ``version`` label from the URL
(``None`` on ``/v2/models/credit-risk/infer``); these carry the version that actually scored,
read from the same slot as the answer. Serving scores in the launcher's one process
(``serving.server``), so they live in prometheus_client's default registry, which MLServer's
metrics port exposes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import NamedTuple

from prometheus_client import Counter, Gauge, Histogram


class Labels(NamedTuple):
    """The labels of one served version (see the module docstring)."""

    model: str
    version: str
    dataset_hash: str


_LABELS = list(Labels._fields)


@cache
def _metrics():
    return {
        "info": Gauge(
            "credit_risk_model_info", "1 for the model version being served, 0 once swapped out", _LABELS
        ),
        "fast_path": Gauge(
            "credit_risk_fast_path",
            "1 when the verified flat-forest evaluator scores small batches, 0 when scikit-learn does",
            _LABELS,
        ),
        "load_failures": Counter(
            "credit_risk_model_load_failures",
            "Attempts to load a registry version that failed (the served version kept answering)",
            ["model", "version"],
        ),
        "refused": Counter(
            "credit_risk_model_refused",
            "Attempts to load a registry version that were refused by its checks (each is also a "
            "load failure); the served version kept answering",
            ["model", "version", "reason"],
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
        "bodies_refused": Counter(
            "credit_risk_request_bodies_refused",
            "REST request bodies refused before any route read them: 413 over the body limit "
            "(counted after decompression), 415 an encoding other than gzip or deflate, 400 not inflatable",
            ["model", "status"],
        ),
        "captured": Counter("credit_risk_capture_rows", "Scored rows appended to the capture spool", _LABELS),
        "dropped": Counter(
            "credit_risk_capture_dropped_rows",
            "Scored rows not captured (spool full or not writable); inference was answered",
            _LABELS,
        ),
    }


def model_swapped(new: Labels, old: Labels | None, fast_path: bool) -> None:
    metrics = _metrics()
    if old is not None:
        metrics["info"].labels(*old).set(0)
    metrics["info"].labels(*new).set(1)
    metrics["fast_path"].labels(*new).set(int(fast_path))


def model_load_failed(model: str, version: str) -> None:
    """One failed attempt of the served model ``model`` to load registry version ``version``."""
    _metrics()["load_failures"].labels(model, version).inc()


def model_refused(model: str, version: str, reason: str) -> None:
    """One attempt to load registry ``version`` refused for ``reason`` (see the docstring)."""
    _metrics()["refused"].labels(model, version, reason).inc()


def body_refusals(model: str) -> Callable[[int], None]:
    """The ``on_refused(status)`` callback of ``serving.body_limit.BodyLimit`` for the served model
    ``model``: no version label, since these requests are refused before any version is read.
    The 413 series exists (at 0) from the start, so that a rate over it needs no special case."""
    counter = _metrics()["bodies_refused"]
    counter.labels(model, "413")
    return lambda status: counter.labels(model, str(status)).inc()


class Meters:
    """The per-request metrics of one served version, labelled once when it is swapped in
    rather than looked up by label on every request."""

    def __init__(self, labels: Labels):
        metrics = _metrics()
        self._rows = metrics["rows"].labels(*labels)
        self._requests = metrics["requests"].labels(*labels)
        self._rejected = metrics["rejected"].labels(*labels)
        self._captured = metrics["captured"].labels(*labels)
        self._dropped = metrics["dropped"].labels(*labels)

    def scored(self, rows: int, seconds: float) -> None:
        self._rows.inc(rows)
        self._requests.observe(seconds)

    def rejected(self) -> None:
        self._rejected.inc()

    def captured(self, rows: int, kept: bool) -> None:
        (self._captured if kept else self._dropped).inc(rows)
