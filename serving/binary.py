"""The binary tensor extension of the Open Inference REST protocol, as Triton defines it and
tritonclient sends it (``docs/protocol/extension_binary_data.md`` in triton-inference-server).

A binary request body is a JSON header of exactly ``Inference-Header-Content-Length`` bytes,
then the raw data of every input whose ``parameters.binary_data_size`` is set, in the order
of the inputs in the header, back to back. A binary response is the same, with
``binary_data_size`` on the outputs sent raw and ``Content-Type: application/octet-stream``.

Invariants:

- Raw tensors are little-endian and row-major, without padding; a tensor's size is exactly
  its element count times its datatype's size. Nothing may follow the last tensor.
- Only the numeric datatypes are read (as in JSON); ``BOOL`` and ``BYTES`` are refused by the
  caller's datatype check before any byte is taken.
- In a float tensor NaN is a missing value and becomes ``np.nan``'s bits, whatever the
  client's NaN was; an infinity is refused with the input and the row.
- Every problem is an ``InvalidRequest`` (HTTP 400) naming the input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from serving.errors import InvalidRequest, show

HEADER_LENGTH = "Inference-Header-Content-Length"
OCTET_STREAM = "application/octet-stream"

# Little-endian layouts of the numeric datatypes.
LAYOUTS: dict[str, np.dtype] = {
    datatype: np.dtype(layout)
    for datatype, layout in {
        "INT8": "<i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "UINT8": "<u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}


def header_length(value: str, body_size: int) -> int:
    """The length of the JSON header that ``Inference-Header-Content-Length: value`` announces
    for a body of ``body_size`` bytes."""
    text = value.strip()
    if not text.isascii() or not text.isdecimal():
        raise InvalidRequest(f"{HEADER_LENGTH}: expected a number of bytes, got {show(value)}")
    digits = text.lstrip("0") or "0"
    # Compared by length before int(): CPython refuses int() of more than 4,300 digits.
    if len(digits) > len(str(body_size)) or int(digits) > body_size:
        stated = digits if len(digits) <= 20 else f"a {len(digits)}-digit number"
        raise InvalidRequest(
            f"{HEADER_LENGTH} is {stated}, past the end of the body ({body_size} bytes): is the body truncated?"
        )
    length = int(digits)
    if length == 0:
        # Triton's "raw binary request": one input, no JSON header. This model has several.
        raise InvalidRequest(
            f"{HEADER_LENGTH} is 0 (a raw binary request without a JSON header), which only a model "
            "with one input can take; send the JSON header with binary_data_size per input"
        )
    return length


class Tensors:
    """The raw tensors after the JSON header, taken in the order the header lists them."""

    def __init__(self, body: memoryview, start: int):
        self._body = body
        self._start = self._at = start

    @property
    def region(self) -> memoryview:
        """Every raw byte after the JSON header."""
        return self._body[self._start :]

    def take(self, name: str, size: int) -> memoryview:
        left = len(self._body) - self._at
        if size > left:
            raise InvalidRequest(
                f"input '{name}': binary_data_size {size} goes past the end of the body "
                f"({left} bytes left): is the body truncated?"
            )
        self._at += size
        return self._body[self._at - size : self._at]

    def finish(self) -> None:
        """Refuse bytes that no input claimed."""
        if extra := len(self._body) - self._at:
            raise InvalidRequest(
                f"{extra} byte(s) after the last binary input: the inputs' binary_data_size add up to "
                f"{self._at} bytes with the header, the body has {len(self._body)}"
            )


def check_size(name: str, datatype: str, rows: int, size: int) -> None:
    """``size`` must be the byte size of ``rows`` values of ``datatype`` (one column)."""
    itemsize = LAYOUTS[datatype].itemsize
    if size != rows * itemsize:
        raise InvalidRequest(
            f"input '{name}': binary_data_size {size} does not match its shape: "
            f"{rows} {datatype} value(s) are {rows * itemsize} bytes"
        )


def read_column(datatype: str, raw: memoryview, out: np.ndarray) -> None:
    """Decode one raw tensor (its size checked) into ``out``, one float64 row of the
    (inputs x rows) matrix. ``check_values`` then checks the whole matrix at once."""
    out[:] = np.frombuffer(raw, dtype=LAYOUTS[datatype])


def read_block(datatype: str, raw: memoryview, inputs: int) -> np.ndarray:
    """Raw tensors of one datatype back to back (sizes checked), one per row of the result:
    the usual binary body, every input in the model's order, in one numpy call."""
    return np.frombuffer(raw, dtype=LAYOUTS[datatype]).reshape(inputs, -1).astype(np.float64)


def check_values(names: Sequence[str], matrix: np.ndarray) -> None:
    """Refuse an infinity in any row of ``matrix`` (one row per input, ``names`` in order) with
    the input and the request row; make every NaN np.nan's bits."""
    if math.isfinite(matrix.sum()):  # the common case: one numpy call (an overflowing sum is checked below)
        return
    infinite = np.isinf(matrix)
    if infinite.any():
        column, row = (int(index[0]) for index in np.nonzero(infinite))
        sign = "-" if matrix[column, row] < 0 else ""
        raise InvalidRequest(
            f"input '{names[column]}': row {row} is {sign}Infinity; expected a finite number (NaN for a missing value)"
        )
    matrix[np.isnan(matrix)] = np.nan  # a missing value, whatever bits the client's NaN had


def raw(values: np.ndarray) -> bytes:
    """An output's values as the extension sends them: little-endian, row-major."""
    return np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
