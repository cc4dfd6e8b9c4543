"""Drift of one window of traffic against a version's reference profile, without labels.

Per feature, over the window's n rows:

- **PSI** (population stability index) on the reference bins and the missing bin:
  ``PSI = sum_i (a_i - e_i) * ln(a_i / e_i)``, where ``a_i`` is the window's share of rows in
  bin i and ``e_i`` the reference's. **Small-count rule:** every share below ``SHARE_FLOOR``
  = 0.0001 (in either distribution), zero included, is raised to it before the formula, and
  shares are not renormalised (Evidently puts the same 0.0001 in its empty bins). A bin
  empty on both sides adds nothing; a bin empty on one side adds a bounded, visible amount
  instead of an infinite one: a reference bin of 10 % that the window leaves empty adds
  (0.0001 - 0.1) ln(0.001) = 0.69, and a missing bin that the reference never used but that
  holds 1 % of the window adds 0.01 ln(100) = 0.046.
- **KS**: the two-sample Kolmogorov-Smirnov statistic ``max |F_window(x) - F_reference(x)|``
  between the window's non-missing values and the reference's exact empirical distribution,
  computed exactly in integer counts at every observed value and rounded once: it equals
  ``scipy.stats.ks_2samp(window, training_split).statistic`` (bit for bit where scipy is
  exact itself, samples of at most 10,000 values; within 1e-15 beyond).
- **missing rate** of the window, and its change from the reference's;
- **out-of-range share**: the share of the window's non-missing values below the reference's
  minimum or above its maximum.

For the score (the probability), the same PSI and KS on the reference score deciles; the
mean probability and the prediction rate (share of rows answered 1) against training; and the
mean binary entropy of the probability in bits (``training.profile.binary_entropy``), a
proxy for the model's confidence (1 = coin toss, 0 = certain).

Each item's status comes from its PSI (``monitoring.status.psi_status``). KS, missing-rate
change and out-of-range share are reported for diagnosis, not judged: on large windows KS
flags differences too small to matter, and a change in missing or out-of-range values already
moves the PSI through the missing bin and the open outer bins. NaN marks a figure that does
not exist (no rows, no non-missing values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from monitoring.status import Thresholds, psi_status
from training.profile import Distribution, ReferenceProfile, bin_labels, binary_entropy

SHARE_FLOOR = 1e-4


def psi(reference_counts: np.ndarray, window_counts: np.ndarray) -> float:
    """PSI between two vectors of counts over the same bins, with the small-count rule."""
    reference_counts = np.asarray(reference_counts, dtype=np.float64)
    window_counts = np.asarray(window_counts, dtype=np.float64)
    if reference_counts.sum() == 0 or window_counts.sum() == 0:
        return float("nan")
    expected = np.maximum(reference_counts / reference_counts.sum(), SHARE_FLOOR)
    actual = np.maximum(window_counts / window_counts.sum(), SHARE_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _rows_at_or_below(values: np.ndarray, counts: np.ndarray, points: np.ndarray) -> np.ndarray:
    """For each point, how many rows of a distribution (distinct increasing ``values`` and
    their ``counts``) are ``<=`` it."""
    cumulative = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    return cumulative[np.searchsorted(values, points, side="right")]


def _distinct(present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct increasing values and their counts (one sort; ``np.unique`` took 3x longer)."""
    ordered = np.sort(present)
    if not len(ordered):
        return ordered, np.empty(0, dtype=np.int64)
    first = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    return ordered[first], np.diff(np.append(first, len(ordered)))


def _ks(values: np.ndarray, counts: np.ndarray, reference: Distribution) -> float:
    n, big_n = int(counts.sum()), reference.present
    if n == 0 or big_n == 0:
        return float("nan")
    points = np.concatenate((values, reference.values))
    # max |c_w / n - c_r / N| over every observed value, as |c_w N - c_r n| / (n N) in integers
    # (exact while n N < 9e18), then one correctly rounded division.
    gap = np.abs(
        _rows_at_or_below(values, counts, points) * big_n
        - _rows_at_or_below(reference.values, reference.value_counts, points) * n
    ).max()
    return int(gap) / (n * big_n)


def ks_statistic(window: np.ndarray, reference: Distribution) -> float:
    """Two-sample KS statistic between ``window`` (non-missing values) and the reference:
    the exact value, correctly rounded. ``scipy.stats.ks_2samp`` gives the same float where
    it computes exactly (both samples of at most 10,000 values); on larger samples it
    subtracts two rounded fractions and may differ in the last bit or two."""
    return _ks(*_distinct(np.asarray(window, dtype=np.float64)), reference)


@dataclass(frozen=True, eq=False)
class ColumnDrift:
    """One column of a window against its reference distribution."""

    rows: int
    psi: float
    ks: float
    missing_rate: float
    reference_missing_rate: float
    out_of_range_share: float
    edges: np.ndarray  # the reference bins' cut points
    reference_shares: np.ndarray  # per bin, the missing bin last (before the floor)
    window_shares: np.ndarray
    status: str

    @property
    def missing_rate_change(self) -> float:
        return self.missing_rate - self.reference_missing_rate

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "psi": self.psi,
            "ks": self.ks,
            "missing_rate": self.missing_rate,
            "reference_missing_rate": self.reference_missing_rate,
            "missing_rate_change": self.missing_rate_change,
            "out_of_range_share": self.out_of_range_share,
            "bins": bin_labels(self.edges),
            "reference_shares": self.reference_shares.tolist(),
            "window_shares": self.window_shares.tolist(),
        }


def column_drift(column: np.ndarray, reference: Distribution, thresholds: Thresholds) -> ColumnDrift:
    """Drift of ``column`` (float64, NaN for missing) against ``reference``."""
    column = np.asarray(column, dtype=np.float64)
    rows = len(column)
    values, counts = _distinct(column[~np.isnan(column)])  # one sort serves every figure
    present = int(counts.sum())
    window_counts = np.append(reference.bin_counts(values, counts), rows - present)
    reference_counts = reference.reference_counts()
    value = psi(reference_counts, window_counts)
    outside = int(counts[(values < reference.minimum) | (values > reference.maximum)].sum())
    return ColumnDrift(
        rows=rows,
        psi=value,
        ks=_ks(values, counts, reference),
        missing_rate=(rows - present) / rows if rows else float("nan"),
        reference_missing_rate=reference.missing_rate,
        out_of_range_share=outside / present if present else float("nan"),
        edges=reference.edges,
        reference_shares=reference_counts / reference_counts.sum(),
        window_shares=window_counts / rows if rows else np.full(len(window_counts), np.nan),
        status=psi_status(value, rows, thresholds),
    )


@dataclass(frozen=True, eq=False)
class ScoreDrift:
    """The window's scores against the reference's."""

    distribution: ColumnDrift
    mean_probability: float
    training_mean_probability: float
    prediction_rate: float
    training_prediction_rate: float
    mean_entropy: float
    training_mean_entropy: float

    @property
    def status(self) -> str:
        return self.distribution.status

    def to_dict(self) -> dict[str, Any]:
        column = self.distribution.to_dict()
        for name in ("missing_rate", "reference_missing_rate", "missing_rate_change"):
            column.pop(name)  # a probability is never missing
        return {
            **column,
            "mean_probability": self.mean_probability,
            "training_mean_probability": self.training_mean_probability,
            "mean_probability_change": self.mean_probability - self.training_mean_probability,
            "prediction_rate": self.prediction_rate,
            "training_prediction_rate": self.training_prediction_rate,
            "mean_entropy": self.mean_entropy,
            "training_mean_entropy": self.training_mean_entropy,
        }


def score_drift(
    probability: np.ndarray, prediction: np.ndarray, profile: ReferenceProfile, thresholds: Thresholds
) -> ScoreDrift:
    """Drift of the window's ``probability`` and answered ``prediction`` (0/1) against training."""
    probability = np.asarray(probability, dtype=np.float64)
    empty = len(probability) == 0
    return ScoreDrift(
        distribution=column_drift(probability, profile.score, thresholds),
        mean_probability=float("nan") if empty else float(probability.mean()),
        training_mean_probability=profile.mean_probability,
        prediction_rate=float("nan") if empty else float(np.mean(prediction)),
        training_prediction_rate=profile.positive_rate,
        mean_entropy=float("nan") if empty else float(binary_entropy(probability).mean()),
        training_mean_entropy=profile.mean_entropy,
    )
