"""Request limits as settings (``serving.limits.RequestLimits``): read from the environment,
checked there, a bad value named by its variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_ROWS, RequestLimits


def test_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("CREDIT_RISK_MAX_ROWS", raising=False)
    monkeypatch.delenv("CREDIT_RISK_MAX_BODY_BYTES", raising=False)
    limits = RequestLimits()
    assert (
        (limits.max_rows, limits.max_body_bytes)
        == (DEFAULT_MAX_ROWS, DEFAULT_MAX_BODY_BYTES)
        == (100_000, 8 << 20)
    )
    monkeypatch.setenv("CREDIT_RISK_MAX_ROWS", "500")
    monkeypatch.setenv("CREDIT_RISK_MAX_BODY_BYTES", "65536")
    assert (RequestLimits().max_rows, RequestLimits().max_body_bytes) == (500, 65536)


@pytest.mark.parametrize("variable", ["CREDIT_RISK_MAX_ROWS", "CREDIT_RISK_MAX_BODY_BYTES"])
@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_a_bad_value_names_its_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as error:
        RequestLimits()
    (problem,) = error.value.errors()
    assert problem["loc"] == (variable,) and problem["input"] == value
