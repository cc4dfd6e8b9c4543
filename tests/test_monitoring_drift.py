"""Drift per window, checked against independent calculations: a PSI worked out by hand,
scipy's two-sample KS, and the sample's own distribution with and without a known shift."""

from __future__ import annotations

import json
from math import log

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from scipy.stats import ks_2samp
from threadpoolctl import threadpool_limits

from model.schema import FEATURES
from monitoring.drift import SHARE_FLOOR, column_drift, ks_statistic, psi
from monitoring.status import ALERT, INSUFFICIENT, OK, WARN, Thresholds, worst
from monitoring.window import monitor_window
from stack.errors import settings_errors
from training.data import load_training_data
from training.pipeline import build_pipeline, classifier_params
from training.profile import Distribution, build_profile
from training.split import ContentSplit

THRESHOLD = 0.2  # the decision threshold of the test model (any fixed cut-off will do)


def test_psi_of_a_small_example_worked_out_by_hand():
    # Reference: 1..10, ten rows each (100 rows, none missing). Deciles cut at 1, 2, ..., 9:
    # ten bins of 10 % each, and a missing bin of 0 % (floored to 0.0001).
    reference = Distribution.of(np.repeat(np.arange(1.0, 11.0), 10))
    np.testing.assert_array_equal(reference.edges, np.arange(1.0, 10.0))
    # Window of 20 rows:
    #   bin "<= 1":    1, 1, 1, 1      4 rows  0.20
    #   bin "(1, 2]":  2, 2            2 rows  0.10
    #   bins 3 .. 8:   one row each    6 rows  0.05 each
    #   bin "(8, 9]":  none            0 rows  0      -> 0.0001
    #   bin "> 9":     10, 10, 10, 12, 15  5 rows  0.25 (12 and 15 above the reference maximum)
    #   missing:       3 rows                       0.15 (reference 0 -> 0.0001)
    window = np.array([1, 1, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 10, 10, 10, 12, 15, np.nan, np.nan, np.nan])
    # PSI = sum (a - e) ln(a / e):
    #   (0.20 - 0.1) ln 2                 = 0.0693147
    #   (0.10 - 0.1) ln 1                 = 0
    #   6 x (0.05 - 0.1) ln 0.5           = 0.2079442
    #   (0.0001 - 0.1) ln 0.001           = 0.6900848
    #   (0.25 - 0.1) ln 2.5               = 0.1374436
    #   (0.15 - 0.0001) ln 1500           = 1.0962517
    #                                total ~ 2.2010390
    by_hand = (
        0.1 * log(2)
        + 6 * (-0.05) * log(0.5)
        + (0.0001 - 0.1) * log(0.001)
        + 0.15 * log(2.5)
        + (0.15 - 0.0001) * log(0.15 / 0.0001)
    )
    assert SHARE_FLOOR == 0.0001
    assert by_hand == pytest.approx(2.2010390, abs=1e-7)
    drift = column_drift(window, reference, Thresholds(min_rows=10))
    assert drift.psi == pytest.approx(by_hand, abs=1e-12)
    assert drift.missing_rate == 0.15 and drift.missing_rate_change == 0.15
    assert drift.out_of_range_share == pytest.approx(2 / 17, abs=1e-15)
    # To 1e-12, not bit for bit: the last bits of scipy's difference of two ECDFs vary between
    # builds (Python 3.11 and 3.12 wheels of the same numpy and scipy disagree there).
    assert drift.ks == pytest.approx(
        ks_2samp(window[~np.isnan(window)], np.repeat(np.arange(1.0, 11.0), 10)).statistic, abs=1e-12
    )
    assert drift.status == ALERT
    assert column_drift(window, reference, Thresholds()).status == INSUFFICIENT  # 20 rows < 500


def test_psi_is_zero_for_identical_shares_and_symmetric():
    assert psi([10, 20, 30, 0], [1, 2, 3, 0]) == 0.0
    assert psi([10, 20, 30, 5], [30, 20, 10, 0]) == pytest.approx(psi([30, 20, 10, 0], [10, 20, 30, 5]))
    assert np.isnan(psi([1, 2], [0, 0]))


@pytest.fixture(scope="module")
def sample(sample_path):
    return load_training_data(sample_path)


@pytest.mark.parametrize("name", FEATURES)
def test_ks_equals_scipy_to_1e12_on_every_feature(sample, name):
    reference_column = sample.features[name].to_numpy(dtype=np.float64)
    reference = Distribution.of(reference_column)
    rng = np.random.default_rng(11)
    window = rng.choice(reference_column, 3000) * rng.choice([1.0, 1.0, 1.5], 3000)
    window = window[~np.isnan(window)]
    expected = ks_2samp(window, reference_column[~np.isnan(reference_column)]).statistic
    assert ks_statistic(window, reference) == pytest.approx(expected, abs=1e-12)


def test_ks_on_samples_beyond_scipys_exact_range_agrees_to_1e15():
    rng = np.random.default_rng(5)
    training = np.round(rng.lognormal(8, 1, 30000), 1)  # ties, as in real incomes
    window = np.round(rng.lognormal(8.05, 1, 20000), 1)
    expected = ks_2samp(window, training).statistic  # scipy's asymptotic mode: float differences
    assert abs(ks_statistic(window, Distribution.of(training)) - expected) <= 1e-15


def test_thresholds_are_configurable_and_checked(monkeypatch):
    drift_of = psi([10] * 10, [10] * 8 + [18, 2])
    assert 0.1 < drift_of < 0.25  # 0.08 ln 1.8 - 0.08 ln 0.2 = 0.176
    rows = 1000
    assert worst([OK, WARN, INSUFFICIENT]) == WARN and worst([OK, INSUFFICIENT]) == INSUFFICIENT
    from monitoring.status import psi_status

    assert psi_status(drift_of, rows, Thresholds()) == WARN
    assert psi_status(drift_of, rows, Thresholds(psi_warn=0.05, psi_alert=0.15)) == ALERT
    assert psi_status(drift_of, rows, Thresholds(psi_warn=0.2, psi_alert=0.3)) == OK
    monkeypatch.setenv("CREDIT_RISK_MONITOR_PSI_ALERT", "0.05")
    with pytest.raises(ValidationError) as raised:
        Thresholds()
    assert settings_errors(raised.value) == [
        "CREDIT_RISK_MONITOR_PSI_ALERT (0.05) must be above CREDIT_RISK_MONITOR_PSI_WARN (0.1)"
    ]
    monkeypatch.delenv("CREDIT_RISK_MONITOR_PSI_ALERT")
    monkeypatch.setenv("CREDIT_RISK_MONITOR_PSI_WARN", "0.5")  # the alert threshold left at its default
    with pytest.raises(ValidationError) as raised:
        Thresholds()
    assert settings_errors(raised.value) == [
        "CREDIT_RISK_MONITOR_PSI_ALERT (0.25) must be above CREDIT_RISK_MONITOR_PSI_WARN (0.5)"
    ]
    monkeypatch.delenv("CREDIT_RISK_MONITOR_PSI_WARN")
    monkeypatch.setenv("CREDIT_RISK_MONITOR_PSI_ALERT", "0.4")
    monkeypatch.setenv("CREDIT_RISK_MONITOR_MIN_ROWS", "50")
    assert (Thresholds().psi_alert, Thresholds().min_rows) == (0.4, 50)


# -- windows drawn from the training distribution, with and without a known shift ---------


class Model:
    """The project's pipeline, fitted on the training side of the sample's content split."""

    def __init__(self, sample):
        split = ContentSplit.of(sample.features, sample.target, 0.2)
        self.training = sample.features[~split.evaluation]
        self.held_out = sample.features[split.evaluation].reset_index(drop=True)
        with threadpool_limits(1, user_api="openmp"):
            self.pipeline = build_pipeline(classifier_params(), seed=42).fit(
                self.training, sample.target[~split.evaluation]
            )
        self.profile = build_profile(self.training, self.probability(self.training), THRESHOLD)

    def probability(self, features: pd.DataFrame) -> np.ndarray:
        with threadpool_limits(1, user_api="openmp"):
            return self.pipeline.predict_proba(features)[:, 1]

    def records(self, features: pd.DataFrame, version: str = "1") -> pd.DataFrame:
        """Records as ``read_records`` returns them, scored by the model."""
        probability = self.probability(features) if len(features) else np.empty(0)
        return features.reset_index(drop=True).assign(
            request_id=[f"req-{i}" for i in range(len(features))],
            row_index=np.zeros(len(features), dtype="int32"),
            timestamp=pd.date_range("2026-12-01", periods=len(features), freq="s", tz="UTC"),
            model_version=version,
            probability=probability,
            prediction=(probability >= THRESHOLD).astype("int64"),
        )


@pytest.fixture(scope="module")
def model(sample):
    return Model(sample)


@pytest.fixture(scope="module")
def window_features(model):
    """5,000 rows drawn with replacement from the held-out side: the training population,
    rows the profile never saw."""
    rows = np.random.default_rng(2026).integers(0, len(model.held_out), 5000)
    return model.held_out.iloc[rows].reset_index(drop=True)


def test_no_drift_on_rows_from_the_training_distribution(model, window_features):
    result = monitor_window(model.records(window_features), model.profile, model_version="1")
    assert result.rows == 5000
    psis = {name: item.psi for name, item in result.features.items()}
    assert all(value < 0.1 for value in psis.values()), psis
    assert result.score.distribution.psi < 0.1
    statuses = [item.status for item in result.features.values()] + [result.score.status]
    assert ALERT not in statuses and WARN not in statuses
    assert result.status == OK
    assert abs(result.score.mean_probability - model.profile.mean_probability) < 0.01


def test_income_arriving_as_annual_alerts_on_income_and_on_no_unrelated_feature(model, window_features):
    shifted = window_features.assign(MonthlyIncome=window_features["MonthlyIncome"] * 12)
    result = monitor_window(model.records(shifted), model.profile, model_version="1")
    income = result.features["MonthlyIncome"]
    assert income.status == ALERT, income.psi
    assert income.psi > 1 and income.ks > 0.5 and income.out_of_range_share > 0
    # The other nine features arrive as before (DebtRatio too: the model derives a monthly
    # amount from it and income, but the input column is untouched).
    others = {name: item.status for name, item in result.features.items() if name != "MonthlyIncome"}
    assert set(others.values()) == {OK}, others
    assert result.status == ALERT


def test_small_windows_are_insufficient_never_ok(model, window_features):
    for rows in (12, 499):
        result = monitor_window(model.records(window_features.head(rows)), model.profile, model_version="1")
        statuses = {item.status for item in result.features.values()} | {result.score.status}
        assert statuses == {INSUFFICIENT}, (rows, statuses)
        assert result.status == INSUFFICIENT
    result = monitor_window(model.records(window_features.head(500)), model.profile, model_version="1")
    assert result.status != INSUFFICIENT
    empty = monitor_window(model.records(window_features.head(0)), model.profile, model_version="1")
    assert empty.status == INSUFFICIENT and empty.to_dict()["features"]["age"]["psi"] is None


def test_the_window_is_half_open_and_one_version(model, window_features):
    records = model.records(window_features.head(600))  # one record per second from 00:00:00
    result = monitor_window(
        records, model.profile, model_version="1", since="2026-12-01T00:00:10", until="2026-12-01T00:01:10"
    )
    assert result.rows == 60
    with pytest.raises(ValueError, match=r"records of version\(s\) \['2'\] given for version 1"):
        monitor_window(model.records(window_features.head(5), version="2"), model.profile, model_version=1)
    with pytest.raises(ValueError, match="the window is empty"):
        monitor_window(records, model.profile, model_version="1", since="2026-12-02", until="2026-12-01")


def test_the_json_object_has_the_documented_keys(model, window_features):
    result = monitor_window(
        model.records(window_features.head(800)),
        model.profile,
        model_version="1",
        since="2026-12-01",
        until="2026-12-02",
    )
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert document["status"] == result.status and document["model_version"] == "1"
    assert document["window"] == {"since": "2026-12-01T00:00:00.000Z", "until": "2026-12-02T00:00:00.000Z"}
    assert document["rows"] == 800
    assert set(document["features"]) == set(FEATURES)
    for item in document["features"].values():
        assert {"psi", "ks", "missing_rate", "status", "out_of_range_share", "missing_rate_change"} <= set(
            item
        )
    assert {"psi", "mean_probability", "status", "prediction_rate", "mean_entropy"} <= set(document["score"])
    assert document["outcomes"] is None
    probability = model.probability(window_features.head(800))
    assert document["score"]["mean_probability"] == pytest.approx(probability.mean(), abs=1e-12)
    assert document["score"]["prediction_rate"] == pytest.approx(np.mean(probability >= THRESHOLD), abs=1e-15)


def test_the_score_psi_and_mean_entropy_equal_an_independent_calculation(model, window_features):
    """The score's PSI from ``pd.cut`` counts on the reference's own score bins (right-closed,
    open at both ends, a missing bin) with the 0.0001 floor written out here, and the mean
    entropy from ``scipy.stats.entropy`` row by row."""
    from scipy.stats import entropy

    features = window_features.head(800)
    result = monitor_window(
        model.records(features), model.profile, model_version="1", since="2026-12-01", until="2026-12-02"
    )
    probability = model.probability(features)
    reference = model.profile.score
    bins = pd.cut(probability, [-np.inf, *reference.edges, np.inf], right=True, labels=False)
    window = np.append(np.bincount(bins, minlength=len(reference.edges) + 1), 0)  # no score is missing
    expected = np.append(reference.counts, reference.missing) / (reference.counts.sum() + reference.missing)
    actual = window / window.sum()
    expected, actual = np.maximum(expected, 0.0001), np.maximum(actual, 0.0001)
    by_hand = sum((a - e) * log(a / e) for a, e in zip(actual, expected, strict=True))
    assert result.score.distribution.psi == pytest.approx(by_hand, abs=1e-12)
    entropies = [entropy([p, 1 - p], base=2) for p in probability]
    assert result.score.mean_entropy == pytest.approx(np.mean(entropies), abs=1e-12)
