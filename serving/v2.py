"""Strict translation between Open Inference (V2) tensors and the model's float64 matrix.

Stock MLServer decoding pads columns of unequal length with NaN and lets type errors surface
as 500s; here every structural problem becomes an ``InvalidRequest`` (HTTP 400) that names
the input and what is wrong with it. Requests decode straight into one matrix in feature
order and responses are built from arrays: no DataFrame per request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from mlserver.codecs import PandasCodec
from mlserver.errors import MLServerError
from mlserver.types import Datatype, InferenceRequest, InferenceResponse, Parameters, ResponseOutput

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


class InvalidRequest(MLServerError):
    """HTTP 400. Takes only the message, so that it survives pickling between MLServer's
    worker processes with its status code intact."""

    def __init__(self, message: str):
        super().__init__(message, status_code=400)


_NUMERIC_NAMES = frozenset(datatype.value for datatype in NUMERIC_DATATYPES)
# What JSON numbers and null decode to: anything else in a numeric input is refused.
_PLAIN = frozenset({int, float, type(None)})


def _flatten(data: Any) -> list:
    if isinstance(data, list) and any(isinstance(item, list) for item in data):
        return [value for item in data for value in _flatten(item)]
    return data if isinstance(data, list) else [data]


def _values(name: str, datatype: Datatype | str, shape: list[int], data: Any) -> list:
    """The input's values, flat, once its datatype and shape are known to fit one column."""
    datatype = getattr(datatype, "value", datatype)  # MLServer's request model keeps the plain string
    if datatype not in _NUMERIC_NAMES:
        raise InvalidRequest(
            f"input '{name}': datatype {datatype} is not numeric; send INT64 or FP64 (null for a missing value)"
        )
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise InvalidRequest(f"input '{name}': shape {shape} is not [rows] or [rows, 1]")
    values = _flatten(data)
    if len(values) != shape[0]:
        raise InvalidRequest(
            f"input '{name}': shape {shape} announces {shape[0]} value(s), data has {len(values)}"
        )
    return values


def as_number(value: Any, where: str) -> float:
    """A decoded JSON value as a float64: a number as it is, null as NaN, anything else refused
    with ``where`` naming its place in the request."""
    if value is None:
        return math.nan
    if type(value) in (int, float):
        try:
            return float(value)
        except OverflowError:  # JSON integers are unbounded; float64 is not
            raise InvalidRequest(f"{where} is an integer too large for a 64-bit float") from None
    kind = "boolean" if isinstance(value, bool) else type(value).__name__
    raise InvalidRequest(f"{where} is a {kind} ({value!r}), expected a number or null")


def request_matrix(payload: InferenceRequest, columns: Sequence[str]) -> np.ndarray:
    """One row per request row, one float64 column per expected input (in ``columns`` order),
    NaN where the client sent null."""
    by_name = {item.name: item for item in payload.inputs}
    if len(by_name) != len(payload.inputs) or by_name.keys() != set(columns):
        raise InvalidRequest(_mismatch([item.name for item in payload.inputs], columns))
    decoded = [(name, _values(name, item.datatype, item.shape, item.data.root))
               for name, item in ((name, by_name[name]) for name in columns)]  # fmt: skip
    lengths = {name: len(values) for name, values in decoded}
    if len(set(lengths.values())) > 1:
        raise InvalidRequest(f"inputs have unequal lengths {lengths}; every input needs one value per row")
    flat = [value for _, values in decoded for value in values]
    if all(type(value) in _PLAIN for value in flat):  # the common case: one numpy call
        try:
            return np.array(flat, dtype=np.float64).reshape(len(columns), -1).T
        except OverflowError:
            pass  # an integer beyond float64: found and named below
    checked = [[as_number(value, f"input '{name}': row {row}") for row, value in enumerate(values)]
               for name, values in decoded]  # fmt: skip
    return np.array(checked, dtype=np.float64).T


def _mismatch(names: list[str], columns: Sequence[str]) -> str:
    problems = []
    if duplicated := sorted({name for name in names if names.count(name) > 1}):
        problems.append(f"input(s) {duplicated} given more than once")
    if unknown := [name for name in names if name not in columns]:
        problems.append(f"unknown input(s) {unknown}")
    if missing := [name for name in columns if name not in names]:
        problems.append(f"missing input(s) {missing}")
    return "; ".join(problems) + f"; expected exactly {list(columns)}"


def requested_outputs(payload: InferenceRequest, available: Sequence[str]) -> list[str]:
    """The outputs the client asked for (all of them when it named none)."""
    if not payload.outputs:
        return list(available)
    names = [output.name for output in payload.outputs]
    if unknown := [name for name in names if name not in available]:
        raise InvalidRequest(f"unknown output(s) {unknown}; available: {list(available)}")
    return names


_OUTPUT_DATATYPES = {np.dtype("int64"): Datatype.INT64, np.dtype("float64"): Datatype.FP64}


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
                datatype=_OUTPUT_DATATYPES[values.dtype],
                data=values.tolist(),
            )
            for name, values in outputs.items()
        ],
    )
