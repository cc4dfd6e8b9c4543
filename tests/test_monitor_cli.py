"""``credit-risk monitor`` and ``credit-risk outcomes add`` refuse bad flags, settings and files
with exit code 2 and one ``error:`` line, before anything talks to MLflow: run in this process
(``stack.cli.main``) with the tracking URI on a port where nothing listens, so that reaching
MLflow would fail differently (exit 1). Against a real server: ``integration/test_monitor_command.py``.
"""

from __future__ import annotations

import pytest

from stack.cli import main
from tests.helpers import NOBODY_URL


@pytest.fixture(autouse=True)
def nowhere(monkeypatch):
    for name in ("CREDIT_RISK_MONITOR_WINDOW", "CREDIT_RISK_MONITOR_EVERY", "CREDIT_RISK_MONITOR_PSI_WARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", NOBODY_URL)


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse refuses a flag itself
        code = exit_.code
    lines = [
        line for line in capsys.readouterr().err.splitlines() if not line.startswith("tracking server: ")
    ]
    return code, lines


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model-version", "x"], "error: --model-version must be a registry version number such as 3, got 'x'"),
        (["--model-version", "0"], "error: --model-version must be a registry version number such as 3, got '0'"),
        (
            ["--since", "2026-12-07", "--until", "2026-12-06"],
            "error: --until 2026-12-06T00:00:00.000Z must be after --since 2026-12-07T00:00:00.000Z",
        ),
        (["--since", "2999-01-01"], "error: --since 2999-01-01T00:00:00.000Z is in the future: the window would be empty"),
        (["--every", "5x"], "error: --every='5x': must be a duration such as 90s, 15m, 24h or 7d (or a number of seconds)"),
        (["--every", "0s"], "error: --every='0s': must be a positive duration"),
        (
            ["--every", "15m", "--json", "--model-version", "3"],
            "error: --every runs the service over the Production version; --model-version, --json apply "
            "to one window only",
        ),
    ],
)  # fmt: skip
def test_bad_monitor_flags_are_one_error_line_and_exit_2(capsys, argv, expected):
    assert run(capsys, "monitor", *argv) == (2, [expected])


def test_a_time_argparse_cannot_read_is_refused_by_argparse(capsys):
    code, lines = run(capsys, "monitor", "--since", "yesterday")
    assert code == 2 and lines[-1].endswith("argument --since: not an ISO 8601 time: 'yesterday'")


def test_bad_settings_are_one_line_per_variable_and_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("CREDIT_RISK_MONITOR_WINDOW", "a day")
    assert run(capsys, "monitor") == (
        2,
        ["error: CREDIT_RISK_MONITOR_WINDOW='a day': must be a duration such as 90s, 15m, 24h or 7d (or a number of seconds)"],
    )  # fmt: skip
    monkeypatch.delenv("CREDIT_RISK_MONITOR_WINDOW")
    monkeypatch.setenv("CREDIT_RISK_MONITOR_PSI_WARN", "0.5")
    assert run(capsys, "monitor", "--every") == (
        2,
        ["error: CREDIT_RISK_MONITOR_PSI_ALERT (0.25) must be above CREDIT_RISK_MONITOR_PSI_WARN (0.5)"],
    )


def test_unreachable_mlflow_is_a_failure_not_a_usage_error(capsys):
    code, lines = run(capsys, "monitor")
    assert code == 1 and len(lines) == 1 and "is not reachable" in lines[0], lines


def test_an_unusable_outcome_file_is_refused_with_its_bad_rows_named_and_exit_2(capsys, tmp_path):
    malformed = tmp_path / "malformed.csv"
    malformed.write_text("request_id,row,outcome\nr1,0,2\n,0,1\nr3,-1,0\nr4,0,1\n")
    code, lines = run(capsys, "outcomes", "add", str(malformed))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: malformed.csv: 3 problem(s): line 2, column outcome: expected 0 or 1")
    assert "line 3, column request_id" in lines[0] and "line 4, column row" in lines[0]

    contradicting = tmp_path / "contradicting.csv"
    contradicting.write_text("request_id,row,outcome\nx,0,1\nx,0,0\n")
    code, lines = run(capsys, "outcomes", "add", str(contradicting))
    assert code == 2 and len(lines) == 1 and "('x', row 0): 0 here, 1 on line 2" in lines[0], lines

    code, lines = run(capsys, "outcomes", "add", str(tmp_path / "absent.csv"))
    assert code == 2 and len(lines) == 1 and "cannot read the file" in lines[0], lines
