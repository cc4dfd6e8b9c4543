"""``POST /predict`` bodies (``serving.flat_json``): the same value rules and limits as V2.

Bodies with ``NaN`` are written by Python's own ``json.dumps``, which is what ``requests`` and
``httpx`` send for ``json=`` with a pandas row holding a missing value."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from model.schema import FEATURES
from serving.errors import InvalidRequest, RequestTooLarge
from serving.flat_json import request_matrix
from tests.helpers import SAMPLE


@pytest.fixture(scope="module")
def records() -> list[dict]:
    frame = pd.read_csv(SAMPLE)[list(FEATURES)].astype("float64")
    rows = pd.concat([frame[frame.isna().any(axis=1)].head(10), frame.dropna().head(10)])
    return rows.to_dict(orient="records")  # float('nan') where the file has no value


def with_null(records: list[dict]) -> list[dict]:
    return [{k: None if math.isnan(v) else v for k, v in record.items()} for record in records]


def refused(body: bytes, status: int = 400, **options) -> str:
    with pytest.raises(InvalidRequest if status == 400 else RequestTooLarge) as error:
        request_matrix(body, **options)
    assert error.value.status_code == status and "\n" not in str(error.value)
    return str(error.value)


def test_nan_from_python_json_is_missing_bit_for_bit_like_null(records):
    nan_body = json.dumps(records).encode()
    assert b"NaN" in nan_body
    nan_matrix, batch = request_matrix(nan_body)
    null_matrix, _ = request_matrix(json.dumps(with_null(records)).encode())
    assert batch and np.array_equal(nan_matrix.view(np.uint64), null_matrix.view(np.uint64))
    expected = np.array([[record[name] for name in FEATURES] for record in records])
    assert np.array_equal(nan_matrix, expected, equal_nan=True) and np.isnan(nan_matrix).any()
    single, batch = request_matrix(json.dumps(records[0]).encode())
    assert not batch and np.array_equal(single.view(np.uint64), null_matrix[:1].view(np.uint64))


@pytest.mark.parametrize(
    "value, message",
    [
        (math.inf, "row 1: field 'DebtRatio' is Infinity; expected a finite number (null or NaN"),
        (-math.inf, "row 1: field 'DebtRatio' is -Infinity"),
        ("1e400", "row 1: field 'DebtRatio' is infinite or too large for a 64-bit float"),
    ],
)
def test_infinity_and_out_of_range_numbers_are_400_naming_field_and_row(records, value, message):
    batch = [dict(records[0]), dict(records[1])]
    batch[1]["DebtRatio"] = value
    body = json.dumps(batch).encode().replace(b'"1e400"', b"1e400")
    assert refused(body).startswith(message)


def test_rows_over_the_limit_are_413_before_any_value_is_read(records):
    assert len(request_matrix(json.dumps(records[:5]).encode(), max_rows=5)[0]) == 5
    message = refused(json.dumps([{"not": "a row"}] * 6).encode(), status=413, max_rows=5)
    assert message == "6 rows; this server takes at most 5 rows per request (send smaller batches)"


@pytest.mark.parametrize("depth", [1000, 5000])
def test_deep_nesting_is_400(records, depth):
    body = json.dumps({**records[0], "age": "@"}).encode().replace(b'"@"', b"[" * depth + b"1" + b"]" * depth)
    assert refused(body) in (
        "field 'age' is a list, expected a number or null",
        "the body is nested too deeply to be a request",
    )
    assert refused(b"[" * depth + b"]" * depth) in (
        "row 0: expected a JSON object of the ten features, got a list",
        "the body is nested too deeply to be a request",
    )


def test_a_body_that_is_not_json_is_400():
    assert refused(b"{nope").startswith("the body is not JSON: Expecting property name")


def test_an_integer_too_long_for_python_is_400_not_a_crash():
    body = b'[{"age": ' + b"4" * 5000 + b"}]"  # orjson refuses it, and so does Python's int()
    assert refused(body) == "the body has an integer of more than 4300 digits"
