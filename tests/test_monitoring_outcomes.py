"""The outcome file: strict parsing, every problem named by line and column, conflicts within
a file refused with their keys (storage in MLflow: tests/integration/test_monitoring_outcomes.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pytest

from monitoring.outcomes import (
    ConflictingOutcomes,
    OutcomeFileError,
    batch_digest,
    parse_outcome_bytes,
    parse_outcomes,
)


def parse(text: str):
    return parse_outcome_bytes(text.encode(), "outcomes.csv")


def problems(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(OutcomeFileError) as raised:
        parse_outcome_bytes(data, "outcomes.csv")
    assert str(raised.value).startswith("outcomes.csv: ")
    return [str(problem) for problem in raised.value.problems]


def test_a_good_file_with_every_column():
    parsed = parse(
        "request_id,row,outcome,observed_at\r\n"
        "r1,0,1,2026-03-01T12:00:00Z\r\n"
        "r1,1,0,2026-03-01T12:00:00+01:00\r\n"
        "r2,0,0,2026-03-02\r\n"
        '"r,3",0,1,\r\n'
    )
    frame = parsed.frame
    assert frame["request_id"].tolist() == ["r1", "r1", "r2", "r,3"]
    assert frame["row_index"].tolist() == [0, 1, 0, 0] and str(frame["row_index"].dtype) == "int32"
    assert frame["outcome"].tolist() == [1, 0, 0, 1]
    observed = frame["observed_at"]
    assert observed[0] == pd.Timestamp(datetime(2026, 3, 1, 12, tzinfo=UTC))
    assert observed[1] == pd.Timestamp(datetime(2026, 3, 1, 11, tzinfo=UTC))  # +01:00 made UTC
    assert observed[2] == pd.Timestamp(datetime(2026, 3, 2, tzinfo=UTC))  # naive means UTC
    assert pd.isna(observed[3])
    assert len(parsed.sha256) == 64 and parsed.name == "outcomes.csv"


def test_optional_columns_may_be_absent_and_in_any_order(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbfoutcome,request_id\n1,a\n0,b\n\n")  # BOM, trailing blank line
    parsed = parse_outcomes(path)
    assert parsed.frame["row_index"].tolist() == [0, 0]
    assert parsed.frame["observed_at"].isna().all() and parsed.name == "labels.csv"


TIME = "expected an ISO 8601 time between the years 1678 and 2261 (e.g. 2026-03-01T12:00:00Z)"


def test_every_problem_is_named_by_line_and_column():
    found = problems(
        "request_id,row,outcome,observed_at\n"
        "r1,0,2,2026-03-01\n"  # line 2
        ",0,1,\n"  # line 3
        "r3,-1,1,\n"  # line 4
        "r4,0.5,yes,yesterday\n"  # line 5
        "r5,0,1\n"  # line 6
        " r6,0,1,\n"  # line 7
        "r7,3000000000,0,\n"  # line 8
        "r8,0,1,9999-12-31T23:59:59-01:00\n"  # line 9: past datetime's range once in UTC
        "r9,0,1,0001-01-01T00:00:00+01:00\n"  # line 10: before it
        "r10,0,1,2300-01-01\n"  # line 11: a datetime, past pandas' nanosecond timestamps
        "r11,0,1,2261-12-31T23:59:59Z\n"  # fine
    )
    assert found == [
        "line 2, column outcome: expected 0 or 1, got '2'",
        "line 3, column request_id: expected a request id without surrounding blanks, got ''",
        "line 4, column row: expected a row number from 0 to 2147483647, got '-1'",
        "line 5, column row: expected a row number from 0 to 2147483647, got '0.5'",
        "line 5, column outcome: expected 0 or 1, got 'yes'",
        f"line 5, column observed_at: {TIME}, got 'yesterday'",
        "line 6: expected 4 fields, got 3",
        "line 7, column request_id: expected a request id without surrounding blanks, got ' r6'",
        "line 8, column row: expected a row number from 0 to 2147483647, got '3000000000'",
        f"line 9, column observed_at: {TIME}, got '9999-12-31T23:59:59-01:00'",
        f"line 10, column observed_at: {TIME}, got '0001-01-01T00:00:00+01:00'",
        f"line 11, column observed_at: {TIME}, got '2300-01-01'",
    ]


def test_header_problems():
    assert problems("request_id,label\nr1,1\n") == [
        "line 1, column label: unknown column (expected request_id, outcome, row, observed_at)",
        "line 1, column outcome: missing column",
    ]
    assert problems("request_id,outcome,outcome\nr1,1,1\n") == ["line 1, column outcome: duplicated column"]
    assert problems("") == ["line 1: empty file: expected a header"]
    assert problems("request_id,outcome\n") == ["line 2: no outcome rows after the header"]


def test_line_numbers_count_quoted_newlines_and_blank_lines():
    found = problems('request_id,outcome\n"multi\nline",1\n\nr2,5\n')
    assert found == ["line 5, column outcome: expected 0 or 1, got '5'"]


def test_not_utf8_or_not_csv_is_named():
    assert problems(b"request_id,outcome\nr1,1\nr\xff2,0\n") == ["line 3: not UTF-8 text"]
    assert problems('request_id,outcome\n"r1,1\n')[0].startswith("line 2: not valid CSV")


def test_a_key_twice_with_the_same_outcome_counts_once_and_with_another_is_refused():
    parsed = parse("request_id,row,outcome\nr1,0,1\nr1,0,1\nr1,1,0\n")
    assert len(parsed.frame) == 2
    with pytest.raises(ConflictingOutcomes) as raised:
        parse("request_id,row,outcome\nr1,0,1\nr2,0,0\nr1,0,0\nr2,0,1\n")
    assert [str(c) for c in raised.value.conflicts] == [
        "('r1', row 0): 0 here, 1 on line 2",
        "('r2', row 0): 1 here, 0 on line 3",
    ]
    assert "2 key(s) with a conflicting outcome, nothing stored" in str(raised.value)
    assert raised.value.within_file


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(OutcomeFileError, match="cannot read the file"):
        parse_outcomes(tmp_path / "absent.csv")


def test_the_batch_digest_depends_on_content_not_order():
    first = parse("request_id,outcome\na,1\nb,0\n").frame
    second = parse("outcome,request_id\n0,b\n1,a\n").frame
    assert batch_digest(first) == batch_digest(second)
    assert batch_digest(first) != batch_digest(parse("request_id,outcome\na,1\nb,1\n").frame)


def test_times_at_the_ends_of_the_span_are_read_and_digested():
    parsed = parse(
        "request_id,outcome,observed_at\nr1,1,2261-12-31T23:59:59Z\nr2,0,1678-01-01T00:00:00+01:00\n"
    )
    assert parsed.frame["observed_at"].tolist() == [
        pd.Timestamp("2261-12-31T23:59:59Z"),
        pd.Timestamp("1677-12-31T23:00:00Z"),
    ]
    assert len(batch_digest(parsed.frame)) == 64
