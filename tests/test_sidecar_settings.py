"""The sidecar's settings: documented defaults, every bad value named by its variable (rules
between two variables too), flags over the environment, and the fault points as a hook that
only the command builds."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from logging_sidecar.faults import FAULT_POINTS, FaultPoints
from logging_sidecar.settings import SidecarSettings
from serving.spool_format import SpoolSettings
from tests.helpers import BIN, NOBODY_URL

_DOC_ROW = re.compile(r"^\| ``(CREDIT_RISK_\w+)``")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Only what a test sets: none of the caller's CREDIT_RISK_* variables."""
    for name in list(os.environ):
        if name.startswith("CREDIT_RISK_"):
            monkeypatch.delenv(name)


def _errors(monkeypatch, **environment: str) -> dict[str, dict]:
    """The settings' errors for this environment, by variable."""
    with monkeypatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        with pytest.raises(ValidationError) as raised:
            SidecarSettings()
    return {error["loc"][0]: error for error in raised.value.errors()}


def test_the_documented_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDIT_RISK_SPOOL_DIR", str(tmp_path))
    settings = SidecarSettings()
    assert settings.spool.directory == tmp_path
    assert settings.spool.max_bytes == 1 << 30
    assert settings.state_path == tmp_path / "sidecar-state.db"
    assert (settings.flush_records, settings.flush_interval_s, settings.max_batch_records) == (
        1000,
        30,
        10000,
    )
    assert (settings.host, settings.port) == ("127.0.0.1", 8083)
    assert settings.experiment == "credit-risk-inference"
    assert (settings.stall_after_s, settings.liveness_after_s, settings.drain_s) == (120, 600, 20)
    assert settings.max_line_bytes == 64 << 20
    assert (settings.fault_points, settings.fault_pause_s) == (frozenset(), 30)
    assert (settings.retention_days, settings.prune_every_s) == (None, 3600)  # keep for ever


def test_every_variable_in_the_table_is_read(tmp_path, monkeypatch):
    """The docstring's table and the class agree: each variable it lists changes a setting."""
    import logging_sidecar.settings as module

    documented = {m[1] for line in module.__doc__.splitlines() if (m := _DOC_ROW.match(line))}
    documented.add("CREDIT_RISK_SIDECAR_PORT")  # its row reads ``CREDIT_RISK_SIDECAR_HOST`` / ``_PORT``
    values = {
        "CREDIT_RISK_SPOOL_DIR": str(tmp_path / "spool"),
        "CREDIT_RISK_SPOOL_MAX_BYTES": "12345",
        "CREDIT_RISK_SIDECAR_STATE": str(tmp_path / "state.db"),
        "CREDIT_RISK_FLUSH_RECORDS": "7",
        "CREDIT_RISK_FLUSH_INTERVAL_S": "2.5",
        "CREDIT_RISK_MAX_BATCH_RECORDS": "70",
        "CREDIT_RISK_SIDECAR_HOST": "0.0.0.0",
        "CREDIT_RISK_SIDECAR_PORT": "9999",
        "CREDIT_RISK_INFERENCE_EXPERIMENT": "elsewhere",
        "CREDIT_RISK_STALL_AFTER_S": "9",
        "CREDIT_RISK_LIVENESS_AFTER_S": "99",
        "CREDIT_RISK_SIDECAR_DRAIN_S": "3",
        "CREDIT_RISK_MAX_LINE_BYTES": "2048",
        "CREDIT_RISK_RETENTION_DAYS": "30",
        "CREDIT_RISK_PRUNE_EVERY_S": "600",
        "CREDIT_RISK_FAULT_POINTS": " after_plan , after_commit",
        "CREDIT_RISK_FAULT_PAUSE_S": "4",
    }
    assert documented == set(values)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = SidecarSettings()
    assert settings.spool.directory == tmp_path / "spool" and settings.spool.max_bytes == 12345
    assert settings.state_path == tmp_path / "state.db"
    assert (settings.flush_records, settings.flush_interval_s, settings.max_batch_records) == (7, 2.5, 70)
    assert (settings.host, settings.port, settings.experiment) == ("0.0.0.0", 9999, "elsewhere")
    assert (settings.stall_after_s, settings.liveness_after_s, settings.drain_s) == (9, 99, 3)
    assert settings.max_line_bytes == 2048
    assert (settings.retention_days, settings.prune_every_s) == (30, 600)
    assert (settings.fault_points, settings.fault_pause_s) == ({"after_plan", "after_commit"}, 4)


def test_a_bad_value_is_named_by_its_variable_with_its_value(tmp_path, monkeypatch):
    spool = {"CREDIT_RISK_SPOOL_DIR": str(tmp_path)}
    error = _errors(monkeypatch, **spool, CREDIT_RISK_FLUSH_RECORDS="abc")["CREDIT_RISK_FLUSH_RECORDS"]
    assert error["input"] == "abc" and "integer" in error["msg"]
    error = _errors(monkeypatch, **spool, CREDIT_RISK_MAX_LINE_BYTES="100")["CREDIT_RISK_MAX_LINE_BYTES"]
    assert error["input"] == "100" and "1024" in error["msg"]
    error = _errors(monkeypatch, **spool, CREDIT_RISK_SIDECAR_DRAIN_S="-1")["CREDIT_RISK_SIDECAR_DRAIN_S"]
    assert error["input"] == "-1"
    error = _errors(monkeypatch, **spool, CREDIT_RISK_FAULT_POINTS="after_plan,bogus")[
        "CREDIT_RISK_FAULT_POINTS"
    ]
    assert "bogus" in error["msg"] and "after_upload" in error["msg"]
    error = _errors(monkeypatch, **spool, CREDIT_RISK_RETENTION_DAYS="0")["CREDIT_RISK_RETENTION_DAYS"]
    assert error["input"] == "0" and "1" in error["msg"]
    error = _errors(monkeypatch, **spool, CREDIT_RISK_RETENTION_DAYS="a month")["CREDIT_RISK_RETENTION_DAYS"]
    assert error["input"] == "a month"
    # The nested spool settings name their own variables.
    error = _errors(monkeypatch, **spool, CREDIT_RISK_SPOOL_MAX_BYTES="lots")["CREDIT_RISK_SPOOL_MAX_BYTES"]
    assert error["input"] == "lots"


def test_the_spool_folder_is_required(monkeypatch):
    error = _errors(monkeypatch)["CREDIT_RISK_SPOOL_DIR"]
    assert error["input"] is None and "must be set" in error["msg"]


def test_rules_between_two_variables_name_both(tmp_path, monkeypatch):
    spool = {"CREDIT_RISK_SPOOL_DIR": str(tmp_path)}
    errors = _errors(
        monkeypatch, **spool, CREDIT_RISK_FLUSH_RECORDS="20000", CREDIT_RISK_FLUSH_INTERVAL_S="300"
    )
    assert errors["CREDIT_RISK_FLUSH_RECORDS"]["input"] == 20000
    assert "CREDIT_RISK_MAX_BATCH_RECORDS (10000)" in errors["CREDIT_RISK_FLUSH_RECORDS"]["msg"]
    assert "CREDIT_RISK_FLUSH_INTERVAL_S (300)" in errors["CREDIT_RISK_STALL_AFTER_S"]["msg"]
    errors = _errors(monkeypatch, **spool, CREDIT_RISK_STALL_AFTER_S="30")  # equal to the flush interval
    assert errors["CREDIT_RISK_STALL_AFTER_S"]["input"] == 30
    SidecarSettings(
        spool=SpoolSettings(directory=tmp_path), flush_records=5, max_batch_records=5
    )  # equal: fine


def test_fault_points_pause_only_where_asked(capfd):
    faults = FaultPoints(frozenset({"after_upload"}), pause_s=0)
    for point in FAULT_POINTS:
        faults(point)
    assert capfd.readouterr().err.splitlines() == [f"FAULT-POINT after_upload pid={os.getpid()}"]
    with pytest.raises(ValueError, match="bogus"):
        FaultPoints(frozenset({"bogus"}), pause_s=0)


def _sidecar(*args: str, **environment: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CREDIT_RISK_", "MLFLOW_"))}
    # A tracking server named (nobody answers there): the command looks for it before reading
    # its settings, and without one it would stop at that (exit 1) in a folder with no stack.
    clean["MLFLOW_TRACKING_URI"] = NOBODY_URL
    return subprocess.run(
        [str(BIN / "credit-risk"), "sidecar", *args],
        env={**clean, **environment},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_the_command_exits_2_naming_a_bad_variable_and_starts_nothing(tmp_path: Path):
    spool = tmp_path / "spool"
    done = _sidecar("--spool-dir", str(spool), CREDIT_RISK_FLUSH_RECORDS="abc")
    assert done.returncode == 2, done.stderr
    assert "CREDIT_RISK_FLUSH_RECORDS" in done.stderr and "abc" in done.stderr
    assert not spool.exists()
    done = _sidecar("--spool-dir", str(spool), "--port", "70000")
    assert done.returncode == 2 and "--port" in done.stderr
