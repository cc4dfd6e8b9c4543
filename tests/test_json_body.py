"""JSON bodies with numpy's literals (``serving.json_body``)."""

from __future__ import annotations

import gc
import json
import math

import numpy as np
import pytest

from serving.errors import InvalidRequest
from serving.json_body import INFINITY, NEG_INFINITY, loads


def test_the_literals_numpy_clients_write():
    body = json.dumps({"id": "NaN inside a string stays text", "data": [math.nan, 1.5, None]}).encode()
    decoded = loads(body.replace(b"]", b", Infinity, -Infinity, 1e400]"))
    assert decoded["id"] == "NaN inside a string stays text"
    nan, number, null, infinity, negative, beyond = decoded["data"]
    assert np.array([nan]).view(np.uint64)[0] == np.array([np.nan]).view(np.uint64)[0]
    assert (number, null, infinity, negative) == (1.5, None, INFINITY, NEG_INFINITY)
    assert beyond == math.inf  # a number beyond float64: the value checks refuse it


@pytest.mark.parametrize("body", [b'{"a": [1, 2]}', b'{"a": [NaN]}', b"{nope", b"[" * 5000])
def test_the_collector_is_running_after_every_parse(body):
    assert gc.isenabled()
    try:
        loads(body)
    except InvalidRequest:
        pass
    assert gc.isenabled()


def test_a_collector_paused_by_someone_else_stays_paused():
    gc.disable()
    try:
        loads(b'{"a": [NaN]}')
        assert not gc.isenabled()
    finally:
        gc.enable()
