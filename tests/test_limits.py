"""Request limits as settings (``serving.limits.RequestLimits``): read from the environment,
checked there, a bad value named by its variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.errors import InvalidRequest, RequestTooLarge
from serving.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_ROWS, RequestLimits, check_request_id


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


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a\nb", "id: character U+000A at position 1 is not printable ASCII"),
        ("é", "id: character U+00E9 at position 0 is not printable ASCII"),
        ("x€", "id: character U+20AC at position 1 is not printable ASCII"),  # Ce-Id is Latin-1
        ("\ud800", "id: character U+D800 at position 0 is not printable ASCII"),
    ],
)
def test_a_request_id_is_printable_ascii(value, message):
    with pytest.raises(InvalidRequest) as refused:
        check_request_id(value, "id")
    assert str(refused.value).startswith(message)
    assert check_request_id("req-42 ~!", "id") == "req-42 ~!"


def test_a_lone_surrogate_quoted_in_an_error_can_still_be_written():
    """JSON's "\\ud800" decodes to a lone surrogate; an answer quoting it must encode as UTF-8."""
    for error in (InvalidRequest("unknown field '\ud800'"), RequestTooLarge("input '\ud800'")):
        assert "\\ud800" in str(error)
        str(error).encode("utf-8")
