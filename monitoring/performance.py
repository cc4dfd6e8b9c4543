"""How well a version ranked and calibrated the rows of a window whose outcome is now known.

Outcomes join records on ``(request_id, row_index)`` (``join_outcomes``). A request id reused
by a client labels every record with that key: outcomes name applications, and the project
cannot tell which of two answers under one id an outcome belongs to.

On the labelled rows (outcome y in {0, 1}, 1 = default, probability p):

- **ROC AUC**: the probability that a random default scores above a random non-default, ties
  counting one half: ``(sum over distinct scores s of pos(s) * (neg(< s) + neg(s) / 2)) /
  (n_pos * n_neg)``, in exact integer counts;
- **Gini** = 2 AUC - 1;
- **KS** = ``max_t (TPR(t) - FPR(t))`` over the cut-offs t (predict default when p >= t), and 0
  for the cut-off above every score;
- **Brier score** = ``mean((p - y)^2)``;
- **calibration** per reference score decile (the profile's score bins, so windows compare
  with each other and with the score PSI): rows, expected default rate (mean p) and observed
  default rate (mean y); NaN in an empty bin;
- the **labelled share** of the window.

The status is ``ok`` or ``insufficient`` (fewer than ``min_labelled_rows`` labelled rows, or
fewer than ``min_class_rows`` of either outcome: one class alone has no AUC at all). Whether
an AUC is too low is for the caller's policy (it has the version's training AUC, reported
here as ``training_roc_auc`` when given): the library reports, it does not decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from monitoring.status import INSUFFICIENT, OK, Thresholds
from training.profile import bin_labels


def _request_ids(frame: pd.DataFrame) -> pa.Array:
    return pa.array(frame["request_id"].astype("str"))


def join_outcomes(records: pd.DataFrame, outcomes: pd.DataFrame) -> np.ndarray:
    """The outcome of each record (float64: 0, 1, or NaN when none is known), in record order.

    ``outcomes`` has one row per key (``request_id``, ``row_index``), as ``read_outcomes``
    returns them; a key given twice is refused (ValueError). The request ids are matched in
    pyarrow's hash table (a pandas MultiIndex took ~8 s for a million records), then each key
    becomes one integer, ``id code * (largest row index + 1) + row index``."""
    if not len(records) or not len(outcomes):
        return np.full(len(records), np.nan)
    outcome_ids = _request_ids(outcomes)
    known = pc.unique(outcome_ids)
    rows = outcomes["row_index"].to_numpy(dtype=np.int64)
    width = int(rows.max()) + 1
    keys = pc.index_in(outcome_ids, value_set=known).to_numpy().astype(np.int64) * width + rows
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    if np.any(keys[1:] == keys[:-1]):
        raise ValueError("outcomes must have one row per (request_id, row_index)")
    codes = pc.index_in(_request_ids(records), value_set=known)
    record_rows = records["row_index"].to_numpy(dtype=np.int64)
    wanted = np.where(
        codes.is_valid().to_numpy(zero_copy_only=False) & (record_rows < width),
        codes.fill_null(0).to_numpy().astype(np.int64) * width + record_rows,
        -1,
    )
    position = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = keys[position] == wanted
    values = outcomes["outcome"].to_numpy(dtype=np.float64)[order]
    return np.where(found, values[position], np.nan)


def _class_counts_by_score(outcome: np.ndarray, probability: np.ndarray):
    """Distinct scores (increasing) and, per score, the number of defaults and non-defaults."""
    scores, inverse = np.unique(probability, return_inverse=True)
    positives = np.bincount(inverse, weights=outcome, minlength=len(scores)).astype(np.int64)
    negatives = np.bincount(inverse, minlength=len(scores)).astype(np.int64) - positives
    return scores, positives, negatives


def roc_auc(outcome: np.ndarray, probability: np.ndarray) -> float:
    _, positives, negatives = _class_counts_by_score(outcome, probability)
    pairs = int(positives.sum()) * int(negatives.sum())
    if pairs == 0:
        return float("nan")
    below = np.cumsum(negatives) - negatives
    # Twice the numerator, in integers: exact up to 2**63 (about 3e9 rows of each class).
    twice = 2 * int(positives @ below) + int(positives @ negatives)
    return twice / (2 * pairs)


def ks_separation(outcome: np.ndarray, probability: np.ndarray) -> float:
    _, positives, negatives = _class_counts_by_score(outcome, probability)
    n_pos, n_neg = int(positives.sum()), int(negatives.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Rows at or above each distinct score, from the highest down.
    true_positive_rate = np.cumsum(positives[::-1]) / n_pos
    false_positive_rate = np.cumsum(negatives[::-1]) / n_neg
    return float(max(0.0, np.max(true_positive_rate - false_positive_rate)))


def brier(outcome: np.ndarray, probability: np.ndarray) -> float:
    return float(np.mean((probability - outcome) ** 2)) if len(outcome) else float("nan")


@dataclass(frozen=True)
class CalibrationBin:
    label: str
    rows: int
    expected: float  # mean probability
    observed: float  # default rate

    def to_dict(self) -> dict[str, Any]:
        return {"bin": self.label, "rows": self.rows, "expected": self.expected, "observed": self.observed}


def calibration(
    outcome: np.ndarray, probability: np.ndarray, score_edges: np.ndarray
) -> list[CalibrationBin]:
    """Expected against observed default rate in each reference score bin."""
    bins = np.searchsorted(score_edges, probability, side="left")
    size = len(score_edges) + 1
    rows = np.bincount(bins, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.bincount(bins, weights=probability, minlength=size) / rows
        observed = np.bincount(bins, weights=outcome, minlength=size) / rows
    labels = bin_labels(score_edges)[:-1]  # a score has no missing bin
    return [
        CalibrationBin(label, int(n), float(e), float(o))
        for label, n, e, o in zip(labels, rows, expected, observed, strict=True)
    ]


@dataclass(frozen=True)
class OutcomeMetrics:
    status: str
    rows: int  # labelled rows of the window
    window_rows: int
    defaults: int
    roc_auc: float
    ks: float
    brier: float
    calibration: list[CalibrationBin]
    training_roc_auc: float | None = None

    @property
    def labelled_share(self) -> float:
        return self.rows / self.window_rows if self.window_rows else float("nan")

    @property
    def gini(self) -> float:
        return 2 * self.roc_auc - 1

    @property
    def default_rate(self) -> float:
        return self.defaults / self.rows if self.rows else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "rows": self.rows,
            "labelled_share": self.labelled_share,
            "defaults": self.defaults,
            "default_rate": self.default_rate,
            "roc_auc": self.roc_auc,
            "gini": self.gini,
            "ks": self.ks,
            "brier": self.brier,
            "training_roc_auc": self.training_roc_auc,
            "calibration": [item.to_dict() for item in self.calibration],
        }


def outcome_metrics(
    outcome: np.ndarray,
    probability: np.ndarray,
    score_edges: np.ndarray,
    thresholds: Thresholds,
    training_roc_auc: float | None = None,
) -> OutcomeMetrics | None:
    """Outcome metrics of a window from each record's ``outcome`` (NaN when unknown) and
    ``probability``; None when no record of the window is labelled."""
    outcome = np.asarray(outcome, dtype=np.float64)
    labelled = ~np.isnan(outcome)
    if not labelled.any():
        return None
    y, p = outcome[labelled], np.asarray(probability, dtype=np.float64)[labelled]
    defaults = int(np.count_nonzero(y == 1))
    enough = len(y) >= thresholds.min_labelled_rows and min(defaults, len(y) - defaults) >= (
        thresholds.min_class_rows
    )
    return OutcomeMetrics(
        status=OK if enough else INSUFFICIENT,
        rows=len(y),
        window_rows=len(outcome),
        defaults=defaults,
        roc_auc=roc_auc(y, p),
        ks=ks_separation(y, p),
        brier=brier(y, p),
        calibration=calibration(y, p, score_edges),
        training_roc_auc=training_roc_auc,
    )
