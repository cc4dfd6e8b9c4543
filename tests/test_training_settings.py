"""Training's settings (the environment, flags over it) and parameters (flags alone)."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import re
import socket

import pytest
from pydantic import ValidationError

from stack.errors import settings_errors
from training.cli import add_parser
from training.data import BUNDLED_SAMPLE
from training.pipeline import DEFAULT_CLASSIFIER_PARAMS
from training.settings import TrainingParameters, TrainingSettings, _source_hash

VARIABLES = (
    "CREDIT_RISK_DATA",
    "MLFLOW_EXPERIMENT_NAME",
    "CREDIT_RISK_RETRAIN",
    "CREDIT_RISK_TRAIN_JOBS",
    "CREDIT_RISK_MLFLOW_WAIT_S",
    "CREDIT_RISK_MLFLOW_UI_URL",
    "CREDIT_RISK_ACTOR",
)


@pytest.fixture
def environment(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_documented_defaults(environment):
    settings = TrainingSettings()
    assert settings.data == BUNDLED_SAMPLE
    assert settings.experiment == "credit-risk-training"
    assert settings.retrain is False
    assert settings.train_jobs == os.cpu_count()
    assert settings.mlflow_wait_s == 0 and settings.mlflow_ui_url is None
    assert settings.actor == f"{getpass.getuser()}@{socket.gethostname()}"


def test_variables_are_read_and_flags_override_them(environment, tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("x")
    environment.setenv("CREDIT_RISK_DATA", str(data))
    environment.setenv("MLFLOW_EXPERIMENT_NAME", "elsewhere")
    environment.setenv("CREDIT_RISK_RETRAIN", "1")
    environment.setenv("CREDIT_RISK_TRAIN_JOBS", "3")
    environment.setenv("CREDIT_RISK_MLFLOW_WAIT_S", "120")
    environment.setenv("CREDIT_RISK_MLFLOW_UI_URL", "http://127.0.0.1:5000")
    environment.setenv("CREDIT_RISK_ACTOR", "ci")
    settings = TrainingSettings()
    assert (settings.data, settings.experiment, settings.retrain, settings.train_jobs) == (
        data,
        "elsewhere",
        True,
        3,
    )
    assert (settings.mlflow_wait_s, settings.mlflow_ui_url, settings.actor) == (
        120,
        "http://127.0.0.1:5000",
        "ci",
    )
    assert TrainingSettings(data=BUNDLED_SAMPLE, experiment="mine").experiment == "mine"
    environment.setenv("CREDIT_RISK_ACTOR", "   ")
    assert TrainingSettings().actor == f"{getpass.getuser()}@{socket.gethostname()}"


def test_each_bad_variable_is_named_with_its_value(environment):
    environment.setenv("CREDIT_RISK_TRAIN_JOBS", "-2")
    environment.setenv("CREDIT_RISK_MLFLOW_WAIT_S", "soon")
    environment.setenv("MLFLOW_EXPERIMENT_NAME", "")
    with pytest.raises(ValidationError) as raised:
        TrainingSettings()
    assert settings_errors(raised.value) == [
        "MLFLOW_EXPERIMENT_NAME='': String should have at least 1 character",
        "CREDIT_RISK_TRAIN_JOBS='-2': Input should be greater than or equal to 0",
        "CREDIT_RISK_MLFLOW_WAIT_S='soon': Input should be a valid number, unable to parse string as a number",
    ]


def test_parameters_check_their_flags():
    with pytest.raises(ValidationError) as raised:
        TrainingParameters(test_size=1.0, cv_folds=1, gate_tolerance=-0.1)
    assert settings_errors(raised.value) == [
        "--test-size='1.0': Input should be less than 1",
        "--cv-folds='1': Input should be greater than or equal to 2",
        "--gate-tolerance='-0.1': Input should be greater than or equal to 0",
    ]
    assert TrainingParameters(classifier={"max_iter": 20}).classifier == {
        **DEFAULT_CLASSIFIER_PARAMS,
        "max_iter": 20,
    }


def test_the_config_hash_covers_what_shapes_the_model_and_nothing_else():
    default = TrainingParameters()
    shaping = {"seed": 42, "test_size": 0.2, "cv_folds": 5, "classifier": DEFAULT_CLASSIFIER_PARAMS}
    expected = hashlib.sha256(json.dumps({**shaping, "code": _source_hash()}, sort_keys=True).encode())
    assert default.config_hash() == expected.hexdigest()[:16]
    assert TrainingParameters(seed=7).config_hash() != default.config_hash()
    assert TrainingParameters(classifier={"max_iter": 20}).config_hash() != default.config_hash()
    assert TrainingParameters(gate_tolerance=0.01, force_promote=True).config_hash() == default.config_hash()


def test_the_help_states_the_parameters_real_defaults():
    commands = argparse.ArgumentParser().add_subparsers()
    add_parser(commands)
    train = commands.choices["train"]
    stated = {}
    for action in train._actions:
        if action.help and (found := re.search(r"\(default ([^)]+)\)", action.help)):
            stated[action.dest] = found[1]
    assert stated == {"seed": "42", "test_size": "0.2", "cv_folds": "5", "gate_tolerance": "0"}
    for name, text in stated.items():
        assert float(text) == TrainingParameters.model_fields[name].default, name


def test_a_bad_classifier_parameter_is_refused_while_parsing(capsys):
    parser = argparse.ArgumentParser(prog="credit-risk")
    add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["train", "--set", "max_iter=20", "--set", "max_iter=-1"])
    assert exit_.value.code == 2
    assert (
        "argument --set: The 'max_iter' parameter of HistGradientBoostingClassifier must be"
        in capsys.readouterr().err
    )
    args = parser.parse_args(["train", "--set", "max_iter=20", "--set", "learning_rate=0.1"])
    assert args.overrides == {"max_iter": 20, "learning_rate": 0.1}
