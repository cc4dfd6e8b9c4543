"""Exit codes of the real ``credit-risk`` command (``stack.errors``): 2 for bad arguments
only (flags, variables, the training file), 1 for refusals and failures, each with one
``error:`` line; anything unexpected is a traceback and 1. Every case runs the installed
script in a folder of its own, with no tracking server named and no local stack there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import create_model

from tests.helpers import BIN, NOBODY_URL

NOWHERE = NOBODY_URL


def run(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CREDIT_RISK_", "MLFLOW_"))}
    return subprocess.run(
        [str(BIN / "credit-risk"), *args],
        env={**clean, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr's lines but the one naming the tracking server; each must be an error line."""
    lines = [line for line in result.stderr.splitlines() if not line.startswith("tracking server: ")]
    assert all(line.startswith("error: ") for line in lines), result.stderr
    return [line.removeprefix("error: ") for line in lines]


def test_bad_flags_are_usage_errors(tmp_path):
    missing = run(tmp_path, "promote", "--reason", "x")
    assert missing.returncode == 2 and "the following arguments are required: --version" in missing.stderr

    for args, expected in (
        (
            ("promote", "--version", "abc", "--reason", "x"),
            "--version must be a registry version number such as 3, got 'abc'",
        ),
        (
            ("promote", "--version", "2", "--reason", "  "),
            "--reason must say why (it is recorded on the version)",
        ),
        (("train", "--test-size", "1.5"), "--test-size='1.5': Input should be less than 1"),
        (("train", "--data", "no-such.csv"), "--data='no-such.csv': no such file"),
    ):
        result = run(tmp_path, *args)
        assert (result.returncode, error_lines(result)) == (2, [expected]), result.stderr
        assert result.stdout == ""


def test_bad_variables_are_one_line_each_and_usage_errors(tmp_path):
    result = run(tmp_path, "train", CREDIT_RISK_TRAIN_JOBS="many", CREDIT_RISK_RETRAIN="maybe")
    assert result.returncode == 2
    assert error_lines(result) == [
        "CREDIT_RISK_RETRAIN='maybe': Input should be a valid boolean, unable to interpret input",
        "CREDIT_RISK_TRAIN_JOBS='many': Input should be a valid integer, unable to parse string as an integer",
    ]
    wait = run(tmp_path, "tracking-server", CREDIT_RISK_BACKEND_WAIT_S="-1")
    assert (wait.returncode, error_lines(wait)) == (
        2,
        ["CREDIT_RISK_BACKEND_WAIT_S='-1': Input should be greater than or equal to 0"],
    )
    # A flag overrides the variable it stands for.
    override = run(tmp_path, "train", "--data", "no-such.csv", CREDIT_RISK_DATA="also-missing.csv")
    assert error_lines(override) == ["--data='no-such.csv': no such file"]


def test_an_unusable_training_file_is_a_usage_error_before_mlflow_is_asked(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(",SeriousDlqin2yrs,age\r\n1,0,30\r\n")
    result = run(tmp_path, "train", "--data", str(bad), MLFLOW_TRACKING_URI=NOWHERE)
    assert result.returncode == 2
    assert result.stderr.startswith(f"tracking server: {NOWHERE} (MLFLOW_TRACKING_URI)\n")
    [line] = error_lines(result)
    assert line.startswith(f"{bad}: missing columns") and "not reachable" not in result.stderr


def test_refusals_and_failures_exit_1_with_one_line(tmp_path):
    unreachable = run(tmp_path, "status", MLFLOW_TRACKING_URI=NOWHERE)
    assert unreachable.returncode == 1
    assert [line.split(" (")[0] for line in error_lines(unreachable)] == [
        f"MLflow tracking server at {NOWHERE} is not reachable"
    ]

    no_driver = run(tmp_path, "tracking-server", "--backend-store-uri", "postgresql+pg8000://u:pw@127.0.0.1:1/db",
                    "--artifacts-destination", str(tmp_path / "artifacts"))  # fmt: skip
    assert no_driver.returncode == 1
    assert error_lines(no_driver) == [
        "backend store postgresql+pg8000://u:***@127.0.0.1:1/db: no database driver (No module named 'pg8000')"
    ]


def test_with_no_tracking_server_named_and_no_local_stack_nothing_is_created(tmp_path):
    # One operator command (promote and rollback find the server as status does) and training.
    for args in (("status",), ("train",)):
        result = run(tmp_path, *args)
        assert result.returncode == 1, args
        assert error_lines(result) == [
            "no tracking server: MLFLOW_TRACKING_URI is not set and no local stack is recorded in "
            ".credit-risk/stack.json; run `credit-risk up` here, or set MLFLOW_TRACKING_URI=http://HOST:PORT"
        ]
    assert sorted(path.name for path in tmp_path.iterdir()) == [], "no mlflow.db, no mlruns, nothing"


@pytest.mark.parametrize(
    ("raised", "last_line"),
    [
        ("RuntimeError('a bug')", "RuntimeError: a bug"),
        ("ValueError('a slip')", "ValueError: a slip"),
        # A model of data (here one made up; say a server's answer) that fails to validate.
        (
            "__import__('pydantic').create_model('Answer', n=(int, ...)).model_validate({'n': 'x'})",
            "    For further information visit https://errors.pydantic.dev/2.14/v/int_parsing",
        ),
    ],
)
def test_anything_unexpected_is_a_traceback_and_exit_1(raised, last_line):
    """A command that fails in a way nobody planned for (here a handler that raises): its
    traceback, not a one-line error that hides where it came from; a ValueError is no longer
    taken for bad arguments."""
    program = (
        "import argparse, sys\n"
        "from stack.cli import run_command\n"
        "def broken(args):\n"
        f"    raise {raised}\n"
        "sys.exit(run_command(argparse.Namespace(command='broken', handler=broken)))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.rstrip().splitlines()[-1] == last_line


def test_only_settings_and_flag_models_are_usage_errors(monkeypatch):
    from pydantic import ValidationError

    from serving.settings import ServingSettings
    from stack.errors import is_usage_error
    from training.settings import TrainingParameters

    monkeypatch.setenv("CREDIT_RISK_REGISTRY_POLL_S", "soon")
    with pytest.raises(ValidationError) as settings:
        ServingSettings()
    with pytest.raises(ValidationError) as flags:
        TrainingParameters(cv_folds=1)
    with pytest.raises(ValidationError) as data:
        create_model("Answer", n=(int, ...)).model_validate({"n": "x"})
    assert is_usage_error(settings.value) and is_usage_error(flags.value)
    assert not is_usage_error(data.value)
