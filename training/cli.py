"""``credit-risk train``: the command-line face of ``training.train``.

Flags override the environment (``TrainingSettings``) and set the run's parameters
(``TrainingParameters``); a bad value is a ``pydantic.ValidationError`` naming the flag's
field or the variable, which the ``credit-risk`` command reports with exit code 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


class _ClassifierOverrides(argparse.Action):
    """``--set KEY=VALUE`` (VALUE as JSON where it parses), repeatable: each is checked, with
    those before it, against the classifier's own parameters, so that a bad one is a usage
    error (exit 2) before anything starts."""

    def __call__(self, parser, namespace, text, option_string=None):
        from training.pipeline import classifier_params

        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {text!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides = {**(getattr(namespace, self.dest) or {}), key: value}
        try:
            classifier_params(overrides)
        except ValueError as error:
            raise argparse.ArgumentError(self, str(error)) from None
        setattr(namespace, self.dest, overrides)


def add_parser(subparsers, before_mlflow: Callable[[], object] = lambda: None) -> None:
    """The ``train`` command. ``before_mlflow`` is called once the flags and settings are
    checked and before anything talks to MLflow (the ``credit-risk`` command finds and names
    the tracking server there)."""
    parser = subparsers.add_parser(
        "train",
        help="train, log to MLflow, register and promote through the gate",
        description="Train on a Give Me Some Credit file (default: the bundled sample, or "
        "$CREDIT_RISK_DATA), log the run to MLflow, register credit-risk-model and promote it "
        "to Production if it passes the gate. Variables (see training/settings.py): "
        "CREDIT_RISK_DATA, MLFLOW_EXPERIMENT_NAME, CREDIT_RISK_RETRAIN, CREDIT_RISK_TRAIN_JOBS, "
        "CREDIT_RISK_MLFLOW_WAIT_S, CREDIT_RISK_MLFLOW_UI_URL, CREDIT_RISK_ACTOR; flags override them.",
    )
    parser.add_argument("--data", type=Path, help="training CSV (cs-training.csv layout; $CREDIT_RISK_DATA)")
    parser.add_argument(
        "--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or credit-risk-training)"
    )
    # Defaults live in TrainingParameters alone (imported only when the command runs, so that
    # building the parser stays fast): a flag left out sets nothing.
    parser.add_argument(
        "--seed", type=int, help="seed of the CV folds, the trees and the samples (default 42)"
    )
    parser.add_argument("--test-size", type=float, help="held-out share (default 0.2)")
    parser.add_argument("--cv-folds", type=int, help="cross-validation folds (default 5)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action=_ClassifierOverrides,
        default={},
        metavar="KEY=VALUE",
        help="HistGradientBoostingClassifier parameter, e.g. --set max_iter=500 (repeatable)",
    )
    parser.add_argument(
        "--gate-tolerance",
        type=float,
        help="promote when candidate ROC AUC >= Production's minus this (default 0)",
    )
    parser.add_argument(
        "--force-promote", action="store_true", help="promote even when the gate says the candidate is worse"
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train even if a version with this data and configuration exists (or CREDIT_RISK_RETRAIN=1)",
    )
    parser.set_defaults(handler=lambda args: run(args, before_mlflow))


def run(args, before_mlflow: Callable[[], object] = lambda: None) -> int:
    # Imported here so that `credit-risk --help` stays fast.
    from training.settings import TrainingParameters, TrainingSettings
    from training.train import summary, train

    chosen = {
        "seed": args.seed,
        "test_size": args.test_size,
        "cv_folds": args.cv_folds,
        "classifier": args.overrides,
        "gate_tolerance": args.gate_tolerance,
        "force_promote": args.force_promote,
    }
    parameters = TrainingParameters(**{name: value for name, value in chosen.items() if value is not None})
    flags = {"data": args.data, "experiment": args.experiment, "retrain": args.retrain or None}
    settings = TrainingSettings(**{name: value for name, value in flags.items() if value is not None})
    before_mlflow()
    print(summary(train(settings, parameters)))
    return 0
