import numpy as np
import pandas as pd
import pytest

from model.schema import FEATURES, InvalidFeatures, validate_features


def frame(**overrides):
    data = {name: [1.0, 2.0, np.nan] for name in FEATURES}
    data.update(overrides)
    return pd.DataFrame(data)


def test_valid_rows_come_back_as_float64_in_feature_order():
    shuffled = frame()[list(reversed(FEATURES))]
    result = validate_features(shuffled)
    assert list(result.columns) == list(FEATURES)
    assert (result.dtypes == "float64").all()
    assert result["age"].isna().tolist() == [False, False, True]


def test_integers_and_none_are_accepted():
    result = validate_features(frame(age=[40, 50, None]))
    assert result["age"].tolist()[:2] == [40.0, 50.0] and np.isnan(result["age"].iloc[2])


@pytest.mark.parametrize(
    "column, values, message",
    [
        ("age", ["x", 1, 2], "age: must be a number, got 'x' at row 0"),
        ("age", [True, False, True], "age: must be a number, got booleans"),
        ("NumberOfDependents", [1, -2, 0], "NumberOfDependents: must be >= 0, got -2 at row 1"),
        ("NumberOfDependents", [1, 0.5, 0], "NumberOfDependents: must be a whole number"),
        ("DebtRatio", [np.inf, 1, 1], "DebtRatio: must be finite"),
        ("MonthlyIncome", [-1, 1, 1], "MonthlyIncome: must be >= 0"),
    ],
)
def test_invalid_values_name_the_column_and_row(column, values, message):
    with pytest.raises(InvalidFeatures) as error:
        validate_features(frame(**{column: values}))
    assert str(error.value).startswith(message)
    assert error.value.field == column


def test_missing_and_unknown_columns_are_named():
    with pytest.raises(InvalidFeatures, match=r"^age: missing column"):
        validate_features(frame().drop(columns=["age"]))
    with pytest.raises(InvalidFeatures, match=r"^Income: unknown column"):
        validate_features(frame(Income=[1, 2, 3]))
