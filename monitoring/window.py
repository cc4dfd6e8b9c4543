"""One monitoring window: the records of one version between two moments, against its profile.

``monitor_window`` turns (records, profile, outcomes, thresholds) into one ``WindowResult``:
drift per feature and of the score, and, where outcomes are known, the outcome metrics. Its
``to_dict()`` is the ``credit-risk monitor --json`` object (JSON-safe: NaN becomes null):
``status``, ``model_version``, ``window`` {``since``, ``until``}, ``rows``, ``features``
{name: ``psi``, ``ks``, ``missing_rate``, ``status``, ...}, ``score`` {``psi``,
``mean_probability``, ``status``, ...}, ``outcomes`` {``rows``, ``roc_auc``, ``gini``,
``ks``, ``brier``, ...} or null when no row of the window has a known outcome.

The window is half-open, ``since <= timestamp < until``, so consecutive windows share no
record. ``status`` is the worst of the drift items (features and score). The outcome metrics
have their own ``status`` and do not enter the window's: labels arrive months after the
answers, and their absence is the normal state of a recent window, not a finding.

Everything is vectorised over columns (one sort per column, then ``searchsorted`` and
``bincount`` on distinct values; the outcome join in pyarrow's hash table):
``benchmarks/monitoring_window.py`` times a window of 1,000,000 records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from model.identity import utc_timestamp
from model.schema import FEATURES, OUTPUT_PREDICTION, OUTPUT_PROBABILITY
from monitoring.drift import ColumnDrift, ScoreDrift, column_drift, score_drift
from monitoring.performance import OutcomeMetrics, join_outcomes, outcome_metrics
from monitoring.status import Thresholds, worst
from training.profile import ReferenceProfile


def json_safe(value: Any) -> Any:
    """NaN and infinities become None (JSON has neither); numpy scalars become Python's."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _utc(moment: datetime | str | pd.Timestamp | None) -> pd.Timestamp | None:
    if moment is None:
        return None
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


@dataclass(frozen=True, eq=False)
class WindowResult:
    model_version: str
    since: pd.Timestamp | None
    until: pd.Timestamp | None
    rows: int
    features: dict[str, ColumnDrift]
    score: ScoreDrift
    outcomes: OutcomeMetrics | None
    thresholds: Thresholds
    profile_source: str

    @property
    def status(self) -> str:
        return worst([*(item.status for item in self.features.values()), self.score.status])

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "status": self.status,
                "model_version": self.model_version,
                "window": {
                    "since": None if self.since is None else utc_timestamp(self.since.to_pydatetime()),
                    "until": None if self.until is None else utc_timestamp(self.until.to_pydatetime()),
                },
                "rows": self.rows,
                "features": {name: item.to_dict() for name, item in self.features.items()},
                "score": self.score.to_dict(),
                "outcomes": None if self.outcomes is None else self.outcomes.to_dict(),
                "thresholds": self.thresholds.model_dump(),
                "profile_source": self.profile_source,
            }
        )


def _in_window(records: pd.DataFrame, since: pd.Timestamp | None, until: pd.Timestamp | None):
    if since is None and until is None:
        return records
    stamps = pd.DatetimeIndex(records["timestamp"])
    stamps = stamps.tz_localize("UTC") if stamps.tz is None else stamps.tz_convert("UTC")
    keep = np.ones(len(records), dtype=bool)
    if since is not None:
        keep &= stamps >= since
    if until is not None:
        keep &= stamps < until
    return records if keep.all() else records[keep]


def monitor_window(
    records: pd.DataFrame,
    profile: ReferenceProfile,
    *,
    model_version: str | int,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    outcomes: pd.DataFrame | None = None,
    thresholds: Thresholds | None = None,
    training_roc_auc: float | None = None,
) -> WindowResult:
    """Drift and outcome metrics of ``records`` (as ``read_records`` returns them) of one
    ``model_version``, kept to ``since <= timestamp < until`` (naive means UTC; None leaves
    that side open), against ``profile``. ``outcomes`` as ``read_outcomes`` returns them.
    Records of another version are refused (ValueError), not silently dropped."""
    thresholds = thresholds or Thresholds()
    since_utc, until_utc = _utc(since), _utc(until)
    if since_utc is not None and until_utc is not None and since_utc >= until_utc:
        raise ValueError(f"the window is empty: since {since_utc} is not before until {until_utc}")
    versions = set(records["model_version"].astype(str).unique()) if len(records) else set()
    if versions - {str(model_version)}:
        raise ValueError(
            f"records of version(s) {sorted(versions - {str(model_version)})} given for version {model_version}"
        )
    records = _in_window(records, since_utc, until_utc)
    probability = records[OUTPUT_PROBABILITY].to_numpy(dtype=np.float64)
    features = {
        name: column_drift(records[name].to_numpy(dtype=np.float64, na_value=np.nan), reference, thresholds)
        for name, reference in profile.features.items()
        if name in FEATURES
    }
    labelled = None
    if outcomes is not None:
        labelled = outcome_metrics(
            join_outcomes(records, outcomes), probability, profile.score.edges, thresholds, training_roc_auc
        )
    return WindowResult(
        model_version=str(model_version),
        since=since_utc,
        until=until_utc,
        rows=len(records),
        features=features,
        score=score_drift(probability, records[OUTPUT_PREDICTION].to_numpy(), profile, thresholds),
        outcomes=labelled,
        thresholds=thresholds,
        profile_source=profile.source,
    )
