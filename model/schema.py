"""The model's input contract: the Kaggle "Give Me Some Credit" columns, in order.

Every other part of the project imports these names; none retypes them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TARGET = "SeriousDlqin2yrs"

# The ten features, in the column order of the published cs-training.csv.
FEATURES: tuple[str, ...] = (
    "RevolvingUtilizationOfUnsecuredLines",
    "age",
    "NumberOfTime30-59DaysPastDueNotWorse",
    "DebtRatio",
    "MonthlyIncome",
    "NumberOfOpenCreditLinesAndLoans",
    "NumberOfTimes90DaysLate",
    "NumberRealEstateLoansOrLines",
    "NumberOfTime60-89DaysPastDueNotWorse",
    "NumberOfDependents",
)

# Counts of events; 96 and 98 in these three are the bureau's "unknown"/"refused" codes,
# not 96 late payments in two years.
PAST_DUE_COUNTS: tuple[str, ...] = (
    "NumberOfTime30-59DaysPastDueNotWorse",
    "NumberOfTime60-89DaysPastDueNotWorse",
    "NumberOfTimes90DaysLate",
)
PAST_DUE_SPECIAL_CODES: tuple[int, ...] = (96, 98)

COUNTS: tuple[str, ...] = (
    *PAST_DUE_COUNTS,
    "NumberOfOpenCreditLinesAndLoans",
    "NumberRealEstateLoansOrLines",
    "NumberOfDependents",
)

# Ratios and amounts with extreme right tails (utilisation up to ~50,000, debt ratio up
# to ~330,000 in the real file): clipped at training-set quantiles by the preprocessing.
HEAVY_TAILED: tuple[str, ...] = (
    "RevolvingUtilizationOfUnsecuredLines",
    "DebtRatio",
    "MonthlyIncome",
)

# Every feature is a non-negative number or missing; nothing else is a valid input.
MIN_VALUE = 0.0

_IS_COUNT = np.array([name in COUNTS for name in FEATURES])

OUTPUT_PREDICTION = "prediction"
OUTPUT_PROBABILITY = "probability"


class InvalidFeatures(ValueError):
    """Input rows that break the contract; ``field`` names the offending column."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _rows(mask: np.ndarray, index: pd.Index, limit: int = 5) -> str:
    bad = index[mask][:limit].tolist()
    more = int(mask.sum()) - len(bad)
    return ", ".join(map(str, bad)) + (f" and {more} more" if more > 0 else "")


def validate_features(frame: pd.DataFrame) -> pd.DataFrame:
    """Return the features as float64 in ``FEATURES`` order, or raise ``InvalidFeatures``.

    Missing values (NaN/None) are allowed everywhere; anything else must be a finite,
    non-negative number, and counts must be whole numbers.
    """
    missing = [name for name in FEATURES if name not in frame.columns]
    if missing:
        raise InvalidFeatures(missing[0], f"missing column (expected all of {list(FEATURES)})")
    unknown = [str(name) for name in frame.columns if name not in FEATURES]
    if unknown:
        raise InvalidFeatures(unknown[0], f"unknown column (expected only {list(FEATURES)})")

    values = np.column_stack([_as_float(frame[name], name, frame.index) for name in FEATURES])
    check_values(values, frame.index)
    return pd.DataFrame(values, columns=list(FEATURES), index=frame.index)


def check_values(values: np.ndarray, index: pd.Index | None = None) -> None:
    """Raise ``InvalidFeatures`` unless every value of this float64 matrix (columns in
    ``FEATURES`` order, NaN for missing) is finite, non-negative, and whole in the counts.

    The one check behind both the DataFrame path (``validate_features``) and the served
    path, which decodes requests straight into such a matrix. ``index`` names the rows in
    messages (default: 0, 1, ...).
    """
    present = ~np.isnan(values)
    checks = [
        (np.isinf(values), "must be finite"),
        (present & (values < MIN_VALUE), f"must be >= {MIN_VALUE:g}"),
        (present & _IS_COUNT & (values != np.floor(values)), "must be a whole number"),
    ]
    for mask, problem in checks:
        if mask.any():
            column = int(np.nonzero(mask.any(axis=0))[0][0])  # the first column, in FEATURES order
            rows = mask[:, column]
            index = pd.RangeIndex(len(values)) if index is None else index
            raise InvalidFeatures(
                FEATURES[column],
                f"{problem}, got {values[rows, column][0]:g} at row {_rows(rows, index)}",
            )


def _as_float(column: pd.Series, name: str, index: pd.Index) -> np.ndarray:
    if pd.api.types.is_bool_dtype(column):
        raise InvalidFeatures(name, "must be a number, got booleans")
    if pd.api.types.is_numeric_dtype(column):  # the common case, and the fast one
        return column.to_numpy(dtype="float64", na_value=np.nan)
    numeric = pd.to_numeric(column, errors="coerce")
    not_numeric = (numeric.isna() & column.notna()).to_numpy()
    if not_numeric.any():
        example = column[not_numeric].iloc[0]
        example = example.item() if hasattr(example, "item") else example
        raise InvalidFeatures(name, f"must be a number, got {example!r} at row {_rows(not_numeric, index)}")
    return numeric.to_numpy(dtype="float64", na_value=np.nan)
