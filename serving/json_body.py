"""JSON request bodies as numpy-based clients write them: strict JSON, plus ``NaN`` and
``Infinity``.

numpy has no "missing" but ``NaN``, and the JSON writers numpy-based clients use
(tritonclient's rapidjson, Python's ``json``) write it as the bare literal ``NaN``, which
strict JSON (and orjson) refuses. Serving reads it as a missing value instead of failing.

Invariants:

- A body strict JSON accepts is decoded by orjson alone: the common case pays nothing for
  the leniency. Only a body orjson refuses is parsed a second time, by Python's ``json``,
  which reads the three literals.
- ``NaN`` decodes to ``math.nan`` (the bits of ``np.nan``), so that a numeric input reading
  it gives the same float64 matrix, bit for bit, as ``null``.
- ``Infinity`` and ``-Infinity`` decode to the sentinels ``INFINITY`` and ``NEG_INFINITY``,
  never to a float: no infinite value passes as a number by accident, and the value checks
  (``serving.v2``) refuse them naming the input and the row. A number beyond the float64
  range (``1e400``) decodes to a float infinity, which the same checks refuse as too large.
- Every failure is an ``InvalidRequest`` (HTTP 400) with one line saying where and what, the
  integer literal too long for Python's ``int`` (4,300 digits by default) included.
- CPython's cyclic garbage collector is paused while a body is parsed (see ``_collector_paused``).
"""

from __future__ import annotations

import gc
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import orjson

from serving.errors import InvalidRequest


class NonFinite:
    """An ``Infinity`` or ``-Infinity`` literal, kept apart from every number."""

    __slots__ = ("literal",)

    def __init__(self, literal: str):
        self.literal = literal

    def __repr__(self) -> str:
        return self.literal


INFINITY = NonFinite("Infinity")
NEG_INFINITY = NonFinite("-Infinity")
_CONSTANTS = {"NaN": math.nan, "Infinity": INFINITY, "-Infinity": NEG_INFINITY}


def _constant(literal: str) -> object:
    """The value of a ``NaN``, ``Infinity`` or ``-Infinity`` literal. A Python function, not
    ``_CONSTANTS.__getitem__``: ``json``'s C parser holds the GIL from start to end, except
    while it runs Python code, so each call lets another thread in (the event loop answering
    probes while a large body is parsed in the large-request thread). Measured on a 100,000-row
    body with tritonclient's NaN: the longest wait of another thread fell from 0.92 s to 0.39 s
    on the loaded development machine (a few µs more per NaN)."""
    return _CONSTANTS[literal]


def loads(body: bytes | bytearray | memoryview, what: str = "the body", after_json: str = "") -> object:
    """The decoded body; ``what`` names it in errors (``the JSON header`` for a binary body).
    ``after_json`` is added to the error when bytes follow the JSON or are not text (the
    likely mistake: raw tensors sent without saying where the JSON ends)."""
    with _collector_paused():
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # not strict JSON: perhaps NaN or Infinity literals; read again below
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidRequest(
                f"{what} is not UTF-8 text: byte {error.start} is {body[error.start]:#04x}{after_json}"
            ) from None
        try:
            return json.loads(text, parse_constant=_constant)
        except json.JSONDecodeError as error:
            hint = after_json if error.msg == "Extra data" else ""
            raise InvalidRequest(f"{what} is not JSON: {error}{hint}") from None
        except RecursionError:
            raise InvalidRequest(f"{what} is nested too deeply to be a request") from None
        except ValueError:
            # Not a JSONDecodeError (caught above, a subclass): CPython refuses to turn an
            # integer literal of more than sys.get_int_max_str_digits() digits into an int.
            raise InvalidRequest(
                f"{what} has an integer of more than {sys.get_int_max_str_digits()} digits"
            ) from None


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Every list and object a parse builds counts toward the cyclic collector's thresholds, so
    a body of many small containers (rows sent as ``[[v], [v], ...]``, a ``/predict`` batch)
    sets off collections that traverse everything parsed so far, in the middle of a parse
    that holds the GIL from start to end: measured, 100,000 rows nested as ``[rows, 1]`` parse
    in 0.21 s CPU paused and 0.58 to 0.70 s not (benchmarks/request_codec.py). A fresh parse
    cannot hold a cycle, so there is nothing for the collector to find in it. It is resumed
    afterwards, and only if it was running: a parse in another thread that starts during the
    pause leaves it alone, and may finish with the collector on again (slower, never wrong)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
