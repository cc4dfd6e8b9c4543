"""stack.heal_hook: the healing attempt the monitor service runs after a window, as a child
process that never gets the monitor's identity. The children here are real processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from stack.heal_hook import HealAfterWindow, HealAttemptFailed, attempt_environment

WINDOW = SimpleNamespace(version="3")
# A child that answers as `credit-risk heal --once --json` does, with the identity it was given.
SHOW_IDENTITY = (
    "import json, os; print(json.dumps({'attempt_run_id': 'r1', 'state': 'not-triggered', "
    "'triggered': False, 'candidate_version': None, 'promoted': False, 'env': {k: os.environ.get(k) "
    "for k in ('CREDIT_RISK_CREDENTIALS_FILE', 'MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD', "
    "'MLFLOW_TRACKING_URI')}}))"
)


def test_the_monitors_identity_never_reaches_an_attempt():
    base = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_USERNAME": "monitor",
        "MLFLOW_TRACKING_PASSWORD": "secret",
        "CREDIT_RISK_CREDENTIALS_FILE": "/run/auth/monitor.env",
        "CREDIT_RISK_DATA": "/data/train.csv",
    }
    assert attempt_environment(base, None) == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "CREDIT_RISK_DATA": "/data/train.csv",
    }
    trainer = attempt_environment(base, Path("/run/auth/trainer.env"))
    assert trainer["CREDIT_RISK_CREDENTIALS_FILE"] == "/run/auth/trainer.env"
    assert "MLFLOW_TRACKING_USERNAME" not in trainer and "MLFLOW_TRACKING_PASSWORD" not in trainer


def test_a_child_runs_with_the_trainers_file_only(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "monitor")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    output = tmp_path / "out.json"
    command = [
        sys.executable,
        "-c",
        SHOW_IDENTITY.replace("print(", f"open({str(output)!r}, 'w').write(") + "; " + SHOW_IDENTITY,
    ]
    caplog.set_level("INFO")
    HealAfterWindow(tmp_path / "trainer.env", command)(WINDOW)
    seen = json.loads(output.read_text())["env"]
    assert seen["CREDIT_RISK_CREDENTIALS_FILE"] == str(tmp_path / "trainer.env")
    assert seen["MLFLOW_TRACKING_USERNAME"] is None and seen["MLFLOW_TRACKING_PASSWORD"] is None
    assert (
        "healing attempt r1: not-triggered, triggered False, challenger None, promoted False" in caplog.text
    )


@pytest.mark.parametrize("code", [1, 2])
def test_an_attempt_that_fails_raises_its_last_error_line(code):
    command = [
        sys.executable,
        "-c",
        f"import sys; print('error: first', file=sys.stderr); print('error: heal attempt failed: why', "
        f"file=sys.stderr); sys.exit({code})",
    ]
    with pytest.raises(
        HealAttemptFailed, match=r"^credit-risk heal --once: error: heal attempt failed: why$"
    ):
        HealAfterWindow(None, command)(WINDOW)


def test_a_crash_without_an_error_line_names_its_exit_code():
    with pytest.raises(HealAttemptFailed, match="exit code -9"):
        HealAfterWindow(
            None, [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
        )(WINDOW)
