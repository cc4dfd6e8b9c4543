"""How a command finds its tracking server (``stack.local``) without a stack running; the
running case is tests/integration/test_stack_up.py."""

from __future__ import annotations

import pytest

from stack.local import (
    STACK_FILE,
    StackRecord,
    StackSettings,
    TrackingServerNotFound,
    find_tracking_server,
    record_stack,
)
from tests.helpers import NOBODY_URL


def test_the_record_round_trips_and_an_unreadable_one_is_none(tmp_path):
    path = record_stack(tmp_path / "home", "http://127.0.0.1:5001", 5001, 8085, 8086)
    assert path == tmp_path / "home" / STACK_FILE
    record = StackRecord.read(path)
    assert (record.tracking_uri, record.mlflow_port, record.http_port, record.sidecar_port) == (
        "http://127.0.0.1:5001",
        5001,
        8085,
        8086,
    )
    assert record.started_at.endswith("Z")
    path.write_text('{"tracking_uri": "http://x"}')  # another layout
    assert StackRecord.read(path) is None
    path.write_text("{not json")
    assert StackRecord.read(path) is None
    assert StackRecord.read(tmp_path / "missing" / STACK_FILE) is None
    (tmp_path / "file").write_text("")
    assert StackRecord.read(tmp_path / "file" / STACK_FILE) is None  # home is not a folder


def test_the_variable_wins_and_is_not_probed(tmp_path):
    record_stack(tmp_path, NOBODY_URL, 1, 2, 3)
    named = StackSettings(home=tmp_path, tracking_uri="http://mlflow:5000")
    server = find_tracking_server(named)
    assert (server.uri, server.why, server.stack) == ("http://mlflow:5000", "MLFLOW_TRACKING_URI", None)


def test_a_recorded_stack_that_does_not_answer_is_named(tmp_path):
    uri = NOBODY_URL
    record_stack(tmp_path, uri, 1, 2, 3)
    with pytest.raises(TrackingServerNotFound) as raised:
        find_tracking_server(StackSettings(home=tmp_path, tracking_uri=None))
    assert str(raised.value) == (
        f"the local stack's tracking server {uri} (recorded in {tmp_path / STACK_FILE}) does not answer; "
        "run `credit-risk up` here, or set MLFLOW_TRACKING_URI=http://HOST:PORT"
    )


def test_the_state_folder_comes_from_credit_risk_home(monkeypatch, tmp_path):
    monkeypatch.delenv("CREDIT_RISK_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert StackSettings().home.as_posix() == ".credit-risk" and StackSettings().tracking_uri is None
    monkeypatch.setenv("CREDIT_RISK_HOME", str(tmp_path))
    with pytest.raises(
        TrackingServerNotFound, match=f"no local stack is recorded in {tmp_path / STACK_FILE}"
    ):
        find_tracking_server(StackSettings())
