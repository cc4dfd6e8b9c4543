"""The feature engineering that travels inside the model."""

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from model.preprocessing import (
    ENGINEERED,
    MONTHLY_DEBT,
    PAST_DUE_CODE,
    WEIGHTED_PAST_DUE,
    CreditFeatureEngineer,
)
from model.schema import FEATURES, PAST_DUE_COUNTS
from training.pipeline import classifier_params


def rows(**overrides):
    base = {
        "RevolvingUtilizationOfUnsecuredLines": [0.5, 0.2, 0.9, 3.0],
        "age": [45, 0, 30, 60],
        "NumberOfTime30-59DaysPastDueNotWorse": [1, 98, 0, 0],
        "DebtRatio": [0.5, 1500.0, 0.25, 0.0],
        "MonthlyIncome": [4000, np.nan, 0, 2000],
        "NumberOfOpenCreditLinesAndLoans": [5, 2, 8, 1],
        "NumberOfTimes90DaysLate": [2, 98, 0, 0],
        "NumberRealEstateLoansOrLines": [1, 0, 2, 0],
        "NumberOfTime60-89DaysPastDueNotWorse": [1, 98, 0, 0],
        "NumberOfDependents": [2, np.nan, 0, 1],
    }
    base.update(overrides)
    return pd.DataFrame(base, dtype="float64")


def engineered(frame):
    transformer = CreditFeatureEngineer(clip_quantile=None).fit(frame)
    return pd.DataFrame(transformer.transform(frame), columns=transformer.get_feature_names_out())


def test_codes_96_98_become_missing_with_a_flag():
    out = engineered(rows())
    for name in PAST_DUE_COUNTS:
        assert np.isnan(out.loc[1, name]) and out.loc[0, name] >= 0
    assert out[PAST_DUE_CODE].tolist() == [1.0 * (i == 1) for i in range(4)]
    assert np.isnan(out.loc[1, WEIGHTED_PAST_DUE])
    assert out.loc[0, WEIGHTED_PAST_DUE] == 1 + 2 * 1 + 3 * 2


def test_impossible_age_is_missing_and_debt_becomes_a_monthly_amount():
    out = engineered(rows())
    assert np.isnan(out.loc[1, "age"]) and out.loc[0, "age"] == 45
    # ratio x income where income is known (at least 1), the amount itself where it is not
    assert out[MONTHLY_DEBT].tolist()[:3] == [0.5 * 4000, 1500.0, 0.25 * 1]


def test_clip_bounds_are_learned_from_the_fitting_rows_only():
    train = rows()
    extreme = rows(RevolvingUtilizationOfUnsecuredLines=[50000.0, 0.1, 0.1, 0.1])
    fitted = CreditFeatureEngineer().fit(train)
    upper = fitted.clip_upper_["RevolvingUtilizationOfUnsecuredLines"]
    assert upper <= 3.0
    transformed = fitted.transform(extreme)
    assert transformed[0, FEATURES.index("RevolvingUtilizationOfUnsecuredLines")] == upper


def test_feature_names_order_and_sklearn_contract():
    transformer = CreditFeatureEngineer().fit(rows())
    assert list(transformer.get_feature_names_out()) == [*FEATURES, *ENGINEERED]
    shuffled = rows()[list(reversed(FEATURES))]
    assert np.array_equal(transformer.transform(shuffled), transformer.transform(rows()), equal_nan=True)
    copy = pickle.loads(pickle.dumps(transformer))
    assert np.array_equal(copy.transform(rows()), transformer.transform(rows()), equal_nan=True)
    assert clone(transformer).get_params() == transformer.get_params()


def test_negative_values_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        CreditFeatureEngineer().fit(rows(DebtRatio=[-1.0, 0, 0, 0]))


def test_bad_classifier_parameters_fail_before_training():
    with pytest.raises(ValueError, match="max_iter"):
        classifier_params({"max_iter": -1})
    with pytest.raises(ValueError, match="unknown classifier parameter"):
        classifier_params({"n_trees": 5})
    with pytest.raises(ValueError, match="--seed"):
        classifier_params({"random_state": 1})
