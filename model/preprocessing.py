"""Preprocessing for the credit-risk model: the one place that turns the raw bureau columns
of ``model.schema.FEATURES`` into the matrix the classifier sees.

It owns every data-cleaning decision (unknown past-due codes, implausible ages, the
DebtRatio that is an amount when income is unknown, heavy tails) and the engineered
features. It travels inside each logged MLflow model, so it imports only numpy, pandas,
scikit-learn and ``model.schema``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from model.schema import (
    COUNTS,
    FEATURES,
    HEAVY_TAILED,
    MIN_VALUE,
    PAST_DUE_COUNTS,
    PAST_DUE_SPECIAL_CODES,
)

# Column roles come from the schema's groups, so a reordering of FEATURES cannot swap them.
_PAST_DUE_30, _PAST_DUE_60, _PAST_DUE_90 = PAST_DUE_COUNTS
_, _DEBT_RATIO, _INCOME = HEAVY_TAILED
(_AGE,) = (name for name in FEATURES if name not in COUNTS + HEAVY_TAILED)

PAST_DUE_CODE = "PastDueCodeReported"
MONTHLY_DEBT = "MonthlyDebt"
WEIGHTED_PAST_DUE = "WeightedPastDue"

ENGINEERED: tuple[str, ...] = (
    PAST_DUE_CODE,
    MONTHLY_DEBT,
    WEIGHTED_PAST_DUE,
)
# Engineered amounts inherit the raw columns' extreme tails, so they are clipped too.
CLIPPED: tuple[str, ...] = (*HEAVY_TAILED, MONTHLY_DEBT)

_OUTPUT: tuple[str, ...] = (*FEATURES, *ENGINEERED)
_COLUMN = {name: index for index, name in enumerate(_OUTPUT)}
_PAST_DUE_COLUMNS = [_COLUMN[name] for name in PAST_DUE_COUNTS]


class CreditFeatureEngineer(TransformerMixin, BaseEstimator):
    """Clean the raw credit columns and add engineered features for a tree ensemble.

    Missing values stay NaN: HistGradientBoosting routes them natively, which makes a
    separate MonthlyIncome-missing indicator redundant (measured: no CV AUC change). The
    past-due "unknown" codes do get an indicator, because once they become NaN nothing else
    would tell them apart from the rare genuinely missing counts.

    Output columns: the ten ``FEATURES`` (cleaned) followed by ``ENGINEERED``.

    Parameters
    ----------
    clip_quantile : float, default=0.999
        Upper training-set quantile at which the heavy-tailed columns are clipped.
        ``None`` disables clipping.
    min_age : float, default=18
        Ages below this cannot belong to a credit applicant (the data has an age of 0);
        they become NaN.

    Attributes
    ----------
    clip_upper_ : dict[str, float]
        Learned upper clip bound per clipped output column.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Set when ``fit`` sees a DataFrame.
    """

    def __init__(self, clip_quantile: float | None = 0.999, min_age: float = 18):
        self.clip_quantile = clip_quantile
        self.min_age = min_age

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        return tags

    def fit(self, X, y=None):
        features = self._engineer(self._check_input(X, reset=True))
        if self.clip_quantile is None:
            self.clip_upper_ = {}
        else:
            if not 0.0 < self.clip_quantile <= 1.0:
                raise ValueError(f"clip_quantile must be in (0, 1], got {self.clip_quantile!r}")
            self.clip_upper_ = {
                name: float(np.nanquantile(features[:, _COLUMN[name]], self.clip_quantile))
                for name in CLIPPED
            }
        return self

    def transform(self, X):
        check_is_fitted(self)
        return self.transform_values(self._check_input(X, reset=False))

    def transform_values(self, values: np.ndarray) -> np.ndarray:
        """``transform`` for a float64 matrix already checked by ``model.schema.check_values``
        (columns in ``FEATURES`` order). Serving calls this once per request: scikit-learn's
        input validation in ``transform`` costs more than the engineering itself."""
        features = self._engineer(values)
        if self.clip_upper_:
            columns = [_COLUMN[name] for name in self.clip_upper_]
            upper = np.fromiter(self.clip_upper_.values(), dtype=np.float64, count=len(columns))
            features[:, columns] = np.minimum(features[:, columns], upper)  # NaN stays NaN
        return features

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self)
        return np.asarray(_OUTPUT, dtype=object)

    def _check_input(self, X, *, reset: bool) -> np.ndarray:
        if isinstance(X, pd.DataFrame):
            missing = [name for name in FEATURES if name not in X.columns]
            if missing:
                raise ValueError(f"Input is missing columns: {missing}")
            # Callers (e.g. a JSON request) may send the columns in any order or with extras.
            if tuple(X.columns) != FEATURES:
                X = X[list(FEATURES)]
        values = validate_data(self, X, reset=reset, dtype=np.float64, ensure_all_finite="allow-nan")
        if values.shape[1] != len(FEATURES):
            raise ValueError(f"Expected {len(FEATURES)} columns {FEATURES}, got {values.shape[1]}")
        if np.any(values < MIN_VALUE):
            raise ValueError(f"Features must be >= {MIN_VALUE} or missing (NaN)")
        return values

    def _engineer(self, X: np.ndarray) -> np.ndarray:
        # Plain numpy on purpose: a served request is one row, and pandas' per-call overhead
        # (~7 ms for these few operations) would dominate its latency.
        out = np.empty((X.shape[0], len(_OUTPUT)), dtype=np.float64)
        out[:, : len(FEATURES)] = X

        # 96/98 are the bureau's "unknown"/"refused" codes, not counts: left in, they would
        # dominate any sum of counts. The flag keeps their (high, ~55 %) default rate visible.
        past_due = X[:, _PAST_DUE_COLUMNS]
        is_code = past_due == PAST_DUE_SPECIAL_CODES[0]
        for code in PAST_DUE_SPECIAL_CODES[1:]:
            is_code |= past_due == code
        out[:, _PAST_DUE_COLUMNS] = np.where(is_code, np.nan, past_due)
        out[:, _COLUMN[PAST_DUE_CODE]] = is_code.any(axis=1)

        age = out[:, _COLUMN[_AGE]]
        age[age < self.min_age] = np.nan

        # When income is missing, DebtRatio is the monthly debt itself (median ~1,200, not a
        # ratio); with income 0 it is debt / 1. Multiplying back by income puts every row on
        # one monthly-amount scale, while DebtRatio itself is kept for the rows where it is a ratio.
        # fmax ignores NaN, so a missing income multiplies by exactly 1.0: DebtRatio as it is.
        income, debt_ratio = X[:, _COLUMN[_INCOME]], X[:, _COLUMN[_DEBT_RATIO]]
        out[:, _COLUMN[MONTHLY_DEBT]] = debt_ratio * np.fmax(income, 1.0)

        # One severity score: a 90-day delinquency says more than a 30-day one. An unknown code
        # gives NaN rather than a made-up score.
        out[:, _COLUMN[WEIGHTED_PAST_DUE]] = (
            out[:, _COLUMN[_PAST_DUE_30]]
            + 2 * out[:, _COLUMN[_PAST_DUE_60]]
            + 3 * out[:, _COLUMN[_PAST_DUE_90]]
        )
        return out
