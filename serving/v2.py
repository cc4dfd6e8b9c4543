"""Strict translation between Open Inference (V2) tensors and the model's float64 matrix.

Stock MLServer decoding pads columns of unequal length with NaN and lets type errors surface
as 500s; here every structural problem becomes an ``InvalidRequest`` (HTTP 400) that names
the input and what is wrong with it, and a request over the row limit a ``RequestTooLarge``
(HTTP 413). Requests decode straight into one matrix in feature order and responses are
built from arrays: no DataFrame per request.

These are the only value checks. Both ways in go through them, so they cannot drift apart:
gRPC (``request_matrix``, on the ``InferenceRequest`` MLServer decodes) and REST
(``serving.v2_rest``, on the raw body, JSON or binary tensors). In order:

1. ``check_tensor``: a numeric datatype, a shape ``[rows]`` or ``[rows, 1]``, and no more rows
   than the limit, decided from the declared shape before the input's data is looked at;
2. ``column_values`` (JSON data; ``json_column`` is both steps): a list, flat or nested
   exactly as the shape, never deeper, with as many values as the shape announces;
3. ``matrix``: every value a number or missing. ``null`` and ``NaN`` are missing (NaN in the
   matrix, always the bits of ``np.nan``); booleans, strings, ``Infinity`` and numbers beyond
   the float64 range are refused with the input and the row.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
from mlserver.codecs import PandasCodec
from mlserver.types import Datatype, InferenceRequest, InferenceResponse, Parameters, ResponseOutput

from serving.errors import InvalidRequest, RequestTooLarge, listed, show
from serving.json_body import NonFinite

__all__ = [
    "NUMERIC_DATATYPES",
    "InvalidRequest",
    "RequestTooLarge",
    "as_number",
    "check_equal_lengths",
    "check_tensor",
    "column_values",
    "json_column",
    "matrix",
    "request_matrix",
    "requested_outputs",
    "response",
]

# A client must not have to guess between INT64 and FP64: every numeric type is accepted.
NUMERIC_DATATYPES = frozenset(
    {
        Datatype.INT8,
        Datatype.INT16,
        Datatype.INT32,
        Datatype.INT64,
        Datatype.UINT8,
        Datatype.UINT16,
        Datatype.UINT32,
        Datatype.UINT64,
        Datatype.FP16,
        Datatype.FP32,
        Datatype.FP64,
    }
)
_NUMERIC_NAMES = frozenset(datatype.value for datatype in NUMERIC_DATATYPES)
# What JSON numbers, null and NaN decode to: anything else in a numeric input is refused.
_PLAIN = frozenset({int, float, type(None)})


def check_tensor(name: str, datatype: Datatype | str, shape: Sequence[int], max_rows: int | None) -> int:
    """The input's row count, once its datatype and declared shape fit one column of at most
    ``max_rows`` rows (``None``: no limit)."""
    datatype = getattr(datatype, "value", datatype)  # MLServer's request model keeps the plain string
    if datatype not in _NUMERIC_NAMES:
        raise InvalidRequest(
            f"input '{name}': datatype {datatype} is not numeric; send INT64 or FP64 (null for a missing value)"
        )
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise InvalidRequest(f"input '{name}': shape {list(shape)} is not [rows] or [rows, 1]")
    rows = shape[0]
    if max_rows is not None and rows > max_rows:
        raise RequestTooLarge(
            f"input '{name}': {rows} rows; this server takes at most {max_rows} rows per request "
            "(send smaller batches)"
        )
    return rows


def column_values(name: str, shape: Sequence[int], data: Any) -> list:
    """A checked input's JSON data as a flat list of one value per row. V2 allows the data
    flat or nested as the shape; ``[rows, 1]`` may thus be ``[[v], [v], ...]``."""
    if type(data) is not list:
        raise InvalidRequest(f"input '{name}': data must be a list, got {show(data)}")
    values = data
    if len(shape) == 2 and data and type(data[0]) is list:
        if not all(type(item) is list and len(item) == 1 for item in data):
            raise InvalidRequest(
                f"input '{name}': data must be flat or nested as shape {list(shape)}, one value per row"
            )
        values = [item[0] for item in data]
    if len(values) != shape[0]:
        raise InvalidRequest(
            f"input '{name}': shape {list(shape)} announces {shape[0]} value(s), data has {len(values)}"
        )
    return values


def json_column(
    name: str, datatype: Datatype | str, shape: Sequence[int], data: Any, max_rows: int | None
) -> list:
    """``check_tensor`` then ``column_values``: one JSON input's values, flat. The row limit is
    decided before the data is looked at, so nothing is built beyond it."""
    check_tensor(name, datatype, shape, max_rows)
    return column_values(name, shape, data)


def as_number(value: Any, where: str) -> float:
    """A decoded JSON value as a float64: a number as it is, ``null`` and ``NaN`` as NaN,
    anything else refused with ``where`` naming its place in the request."""
    kind = type(value)
    if value is None:
        return math.nan
    if kind is float:
        if value != value:
            return math.nan  # one NaN, whatever bits the client's NaN had
        if math.isinf(value):
            raise InvalidRequest(f"{where} is infinite or too large for a 64-bit float")
        return value
    if kind is int:
        try:
            return float(value)
        except OverflowError:  # JSON integers are unbounded; float64 is not
            raise InvalidRequest(f"{where} is an integer too large for a 64-bit float") from None
    if kind is NonFinite:
        raise InvalidRequest(
            f"{where} is {value}; expected a finite number (null or NaN for a missing value)"
        )
    if kind is list or kind is dict:
        raise InvalidRequest(f"{where} is {show(value)}, expected a number or null")
    described = "boolean" if kind is bool else kind.__name__
    if kind is str and len(value) > 40:  # a string may be megabytes long: quote its start
        value = value[:39] + "…"
    raise InvalidRequest(f"{where} is a {described} ({value!r}), expected a number or null")


def matrix(columns: Sequence[tuple[str, Sequence[int], list]]) -> np.ndarray:
    """One row per request row, one float64 column per ``(name, shape, values)`` in order
    (values from ``column_values``, all of one length), NaN for missing."""
    values = [column for _, _, column in columns]
    if set(map(type, chain.from_iterable(values))) <= _PLAIN:  # the common case: one numpy call
        try:
            result = np.array(values, dtype=np.float64).T
        except OverflowError:
            result = None  # an integer beyond float64: found and named below
        if result is not None:
            if math.isfinite(result.sum()):  # one numpy call; a sum that overflows is checked below
                return result
            if not np.isinf(result).any():  # only missing values: make every NaN np.nan's bits
                result[np.isnan(result)] = np.nan
                return result
    checked = [[_number(value, name, shape, row) for row, value in enumerate(column)]
               for name, shape, column in columns]  # fmt: skip
    return np.array(checked, dtype=np.float64).T


def _number(value: Any, name: str, shape: Sequence[int], row: int) -> float:
    if type(value) is list:
        raise InvalidRequest(
            f"input '{name}': row {row} is a list: data nested deeper than shape {list(shape)}"
        )
    return as_number(value, f"input '{name}': row {row}")


def request_matrix(
    payload: InferenceRequest, columns: Sequence[str], max_rows: int | None = None
) -> np.ndarray:
    """The matrix of a request MLServer decoded (gRPC): one float64 column per expected input,
    in ``columns`` order, NaN where the client sent null or NaN."""
    by_name = {item.name: item for item in payload.inputs}
    if len(by_name) != len(payload.inputs) or by_name.keys() != set(columns):
        raise InvalidRequest(mismatch([item.name for item in payload.inputs], columns))
    tensors = [by_name[name] for name in columns]
    decoded = [(item.name, item.shape, json_column(item.name, item.datatype, item.shape, item.data.root, max_rows))
               for item in tensors]  # fmt: skip
    check_equal_lengths({name: len(values) for name, _, values in decoded})
    return matrix(decoded)


def check_equal_lengths(lengths: dict[str, int]) -> None:
    """Every input must have as many rows as the others: nothing is padded or guessed."""
    if len(set(lengths.values())) > 1:
        raise InvalidRequest(f"inputs have unequal lengths {lengths}; every input needs one value per row")


def mismatch(names: list[str], columns: Sequence[str]) -> str:
    """Why the input names sent are not exactly ``columns`` (in linear time: a body may name a
    million inputs)."""
    counts = Counter(names)
    problems = []
    if duplicated := sorted(name for name, count in counts.items() if count > 1):
        problems.append(f"input(s) {listed(duplicated)} given more than once")
    if unknown := [name for name in counts if name not in columns]:
        problems.append(f"unknown input(s) {listed(unknown)}")
    if missing := [name for name in columns if name not in counts]:
        problems.append(f"missing input(s) {missing}")
    return "; ".join(problems) + f"; expected exactly {list(columns)}"


def requested_outputs(payload: InferenceRequest, available: Sequence[str]) -> list[str]:
    """The outputs the client asked for (all of them when it named none)."""
    if not payload.outputs:
        return list(available)
    names = [output.name for output in payload.outputs]
    if unknown := [name for name in names if name not in available]:
        raise InvalidRequest(f"unknown output(s) {listed(unknown)}; available: {list(available)}")
    return names


OUTPUT_DATATYPES = {np.dtype("int64"): Datatype.INT64, np.dtype("float64"): Datatype.FP64}


def response(
    model_name: str,
    model_version: str,
    outputs: dict[str, np.ndarray],
    parameters: dict[str, str],
) -> InferenceResponse:
    """The response MLServer's pandas codec would give for a DataFrame of ``outputs`` (shape
    ``[rows, 1]`` per output, ``content_type`` ``pd``), built from the arrays directly."""
    return InferenceResponse(
        model_name=model_name,
        model_version=model_version,
        parameters=Parameters(content_type=PandasCodec.ContentType, **parameters),
        outputs=[
            ResponseOutput(
                name=name,
                shape=[len(values), 1],
                datatype=OUTPUT_DATATYPES[values.dtype],
                data=values.tolist(),
            )
            for name, values in outputs.items()
        ],
    )
