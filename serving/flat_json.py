"""The earlier FastAPI design's request and answer shapes, for ``POST /predict``.

A request is one flat JSON object with the ten features, or a JSON list of such objects (a
batch). Feature names are the Kaggle ones (``NumberOfTime30-59DaysPastDueNotWorse``) or the
same with underscores for hyphens (``NumberOfTime30_59DaysPastDueNotWorse``), which is how
a Python client spells them. It decodes into the same float64 matrix as a V2 request, so
validation, scoring, metrics and capture are shared, and its values follow the same rules
(``serving.v2.as_number``): ``null`` and ``NaN`` are missing, ``Infinity`` is refused. The row
limit is decided from the list's length before any value is converted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.schema import FEATURES
from serving import json_body
from serving.errors import InvalidRequest, RequestTooLarge, cut, show
from serving.v2 import as_number

# Either spelling names the feature; FEATURES stays the one list of names.
SPELLINGS: dict[str, str] = {
    **{name: name for name in FEATURES},
    **{name.replace("-", "_"): name for name in FEATURES},
}


def _row(item: Any, row: int, batch: bool) -> list[float]:
    where = f"row {row}: " if batch else ""
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where}expected a JSON object of the ten features, got {show(item)}")
    values: dict[str, float] = {}
    for key, value in item.items():
        name = SPELLINGS.get(key)
        if name is None:
            raise InvalidRequest(
                f"{where}unknown field '{cut(key)}'; expected the ten features {list(FEATURES)}"
            )
        if name in values:
            raise InvalidRequest(f"{where}field '{name}' given twice (as '{name}' and another spelling)")
        values[name] = as_number(value, f"{where}field '{key}'")
    if missing := [name for name in FEATURES if name not in values]:
        raise InvalidRequest(f"{where}missing field(s) {missing} (send null for a missing value)")
    return [values[name] for name in FEATURES]


def request_matrix(body: bytes, max_rows: int | None = None) -> tuple[np.ndarray, bool]:
    """The rows of a ``/predict`` body in ``FEATURES`` order, and whether it was a batch; at most
    ``max_rows`` rows (``None``: no limit)."""
    decoded = json_body.loads(body)
    batch = isinstance(decoded, list)
    items = decoded if batch else [decoded]
    if not items:
        raise InvalidRequest("an empty list has nothing to score")
    if max_rows is not None and len(items) > max_rows:
        raise RequestTooLarge(
            f"{len(items)} rows; this server takes at most {max_rows} rows per request (send smaller batches)"
        )
    return np.array([_row(item, row, batch) for row, item in enumerate(items)], dtype=np.float64), batch


def answer(
    prediction: np.ndarray,
    probability: np.ndarray,
    version: str,
    request_id: str,
    timestamp: str,
    batch: bool,
):
    rows = [
        {
            "prediction": int(label),
            "probability": float(score),
            "model_version": version,
            "request_id": request_id,
            "timestamp": timestamp,
        }
        for label, score in zip(prediction, probability, strict=True)
    ]
    return rows if batch else rows[0]
