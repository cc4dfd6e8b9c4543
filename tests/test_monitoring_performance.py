"""Outcome metrics per window, each checked against scikit-learn on rows joined independently
(a pandas merge written here), and the insufficient cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from monitoring.performance import join_outcomes
from monitoring.status import INSUFFICIENT, OK, Thresholds
from monitoring.window import monitor_window
from training.data import load_training_data
from training.profile import build_profile

THRESHOLD = 0.3


@pytest.fixture(scope="module")
def profile(sample_path):
    sample = load_training_data(sample_path)
    probability = np.random.default_rng(1).beta(1, 8, len(sample.features))
    return build_profile(sample.features, probability, THRESHOLD)


def records_with_outcomes(rows: int, labelled: int, seed: int, tie_digits: int = 3):
    """Records of one version without features (``with_features`` adds them; some requests
    of several rows, probabilities rounded so that many tie) and outcomes for ``labelled`` of them, drawn so the model ranks well, plus
    outcomes for keys that were never scored."""
    rng = np.random.default_rng(seed)
    request = rng.integers(0, rows // 2, rows)
    row_index = np.zeros(rows, dtype="int32")
    for value in np.unique(request):  # rows of one request are numbered 0, 1, ...
        where = np.flatnonzero(request == value)
        row_index[where] = np.arange(len(where))
    probability = np.round(rng.beta(1, 8, rows), tie_digits)
    records = pd.DataFrame(
        {
            "request_id": pd.array([f"req-{value}" for value in request], dtype="str"),
            "row_index": row_index,
            "timestamp": pd.Timestamp("2026-12-01", tz="UTC"),
            "model_version": "4",
            "probability": probability,
            "prediction": (probability >= THRESHOLD).astype("int64"),
        }
    )
    chosen = rng.choice(rows, labelled, replace=False)
    outcome = (
        rng.uniform(size=labelled) < np.clip(records["probability"].to_numpy()[chosen] * 1.5, 0, 1)
    ).astype("int8")
    outcomes = pd.DataFrame(
        {
            "request_id": records["request_id"].to_numpy()[chosen],
            "row_index": records["row_index"].to_numpy()[chosen],
            "outcome": outcome,
        }
    )
    strangers = pd.DataFrame(
        {"request_id": [f"unknown-{i}" for i in range(50)], "row_index": np.zeros(50, "int32"), "outcome": 1}
    )
    outcomes = pd.concat([outcomes, strangers], ignore_index=True).sample(frac=1, random_state=seed)
    return records, outcomes


def with_features(records: pd.DataFrame, sample_path) -> pd.DataFrame:
    sample = load_training_data(sample_path).features
    picked = sample.sample(len(records), replace=True, random_state=0).reset_index(drop=True)
    return pd.concat([records.reset_index(drop=True), picked], axis=1)


def test_outcome_metrics_equal_sklearn_on_independently_joined_rows(profile, sample_path):
    records, outcomes = records_with_outcomes(rows=20000, labelled=6000, seed=7)
    records = with_features(records, sample_path)
    result = monitor_window(records, profile, model_version="4", outcomes=outcomes)
    joined = records.merge(outcomes, on=["request_id", "row_index"], how="inner", validate="many_to_one")
    y, p = joined["outcome"].to_numpy(), joined["probability"].to_numpy()
    assert len(joined) == 6000 and result.outcomes.rows == 6000
    assert abs(result.outcomes.roc_auc - roc_auc_score(y, p)) <= 1e-12
    assert abs(result.outcomes.gini - (2 * roc_auc_score(y, p) - 1)) <= 1e-12
    false_positive_rate, true_positive_rate, _ = roc_curve(y, p)
    assert abs(result.outcomes.ks - np.max(true_positive_rate - false_positive_rate)) <= 1e-12
    assert abs(result.outcomes.brier - brier_score_loss(y, p)) <= 1e-12
    assert result.outcomes.labelled_share == 6000 / 20000
    assert result.outcomes.defaults == int(y.sum()) and result.outcomes.status == OK
    # Calibration per reference score decile, as pandas groups it.
    decile = pd.cut(joined["probability"], [-np.inf, *profile.score.edges, np.inf], right=True)
    grouped = joined.groupby(decile, observed=False).agg(
        rows=("outcome", "size"), expected=("probability", "mean"), observed=("outcome", "mean")
    )
    calibration = result.outcomes.calibration
    assert [item.rows for item in calibration] == grouped["rows"].tolist()
    np.testing.assert_allclose([item.expected for item in calibration], grouped["expected"], atol=1e-12)
    np.testing.assert_allclose([item.observed for item in calibration], grouped["observed"], atol=1e-12)
    document = result.to_dict()["outcomes"]
    assert {"rows", "roc_auc", "gini", "ks", "brier", "labelled_share", "calibration"} <= set(document)


def test_auc_with_continuous_scores_and_no_ties(profile, sample_path):
    records, outcomes = records_with_outcomes(rows=4000, labelled=3000, seed=8, tie_digits=15)
    result = monitor_window(
        with_features(records, sample_path), profile, model_version="4", outcomes=outcomes
    )
    joined = records.merge(outcomes, on=["request_id", "row_index"])
    assert abs(result.outcomes.roc_auc - roc_auc_score(joined["outcome"], joined["probability"])) <= 1e-12


def test_a_reused_request_id_labels_each_of_its_records():
    records = pd.DataFrame({"request_id": ["a", "a", "b", "c"], "row_index": [0, 0, 0, 1]})
    outcomes = pd.DataFrame({"request_id": ["a", "c", "c"], "row_index": [0, 0, 1], "outcome": [1, 0, 1]})
    np.testing.assert_array_equal(join_outcomes(records, outcomes), [1, 1, np.nan, 1])
    with pytest.raises(ValueError, match="one row per"):
        join_outcomes(records, pd.concat([outcomes, outcomes]))


def test_too_few_labels_or_one_class_is_insufficient(profile, sample_path):
    records, outcomes = records_with_outcomes(rows=3000, labelled=2000, seed=9)
    records = with_features(records, sample_path)
    few = monitor_window(records, profile, model_version="4", outcomes=outcomes.head(300))
    assert few.outcomes.status == INSUFFICIENT and few.outcomes.rows < 500
    one_class = outcomes.assign(outcome=0)
    alone = monitor_window(records, profile, model_version="4", outcomes=one_class)
    assert alone.outcomes.status == INSUFFICIENT
    assert alone.to_dict()["outcomes"]["roc_auc"] is None
    enough = monitor_window(records, profile, model_version="4", outcomes=outcomes)
    assert enough.outcomes.status == OK
    strict = monitor_window(
        records, profile, model_version="4", outcomes=outcomes, thresholds=Thresholds(min_class_rows=10**6)
    )
    assert strict.outcomes.status == INSUFFICIENT
    # Outcomes only for keys never scored: no labelled row, so null.
    nobody = outcomes.assign(request_id="nobody-" + outcomes["request_id"])
    assert monitor_window(records, profile, model_version="4", outcomes=nobody).to_dict()["outcomes"] is None
    # The outcome status does not enter the window's: a recent window has no labels yet.
    assert few.status == monitor_window(records, profile, model_version="4").status
