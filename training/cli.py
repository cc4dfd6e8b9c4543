"""``credit-risk train``: the command-line face of ``training.train``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.settings import TrainingSettings


def _key_value(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def add_parser(subparsers) -> None:
    defaults = TrainingSettings.__dataclass_fields__
    parser = subparsers.add_parser(
        "train",
        help="train, log to MLflow, register and promote through the gate",
        description="Train on a Give Me Some Credit file (default: the bundled sample, or "
        "$CREDIT_RISK_DATA), log the run to $MLFLOW_TRACKING_URI, register "
        "credit-risk-model and promote it to Production if it passes the gate.",
    )
    parser.add_argument("--data", type=Path, help="training CSV (cs-training.csv layout)")
    parser.add_argument(
        "--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or credit-risk-training)"
    )
    parser.add_argument("--seed", type=int, default=defaults["seed"].default)
    parser.add_argument(
        "--test-size",
        type=float,
        default=defaults["test_size"].default,
        help="held-out share (default %(default)s)",
    )
    parser.add_argument("--cv-folds", type=int, default=defaults["cv_folds"].default)
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="HistGradientBoostingClassifier parameter, e.g. --set max_iter=500 (repeatable)",
    )
    parser.add_argument(
        "--gate-tolerance",
        type=float,
        default=0.0,
        help="promote when candidate ROC AUC >= Production's minus this",
    )
    parser.add_argument(
        "--force-promote", action="store_true", help="promote even when the gate says the candidate is worse"
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train even if a version with this data and configuration exists (or CREDIT_RISK_RETRAIN=1)",
    )
    parser.set_defaults(handler=run)


def run(args) -> int:
    # Imported here so that `credit-risk --help` stays fast.
    from training.pipeline import classifier_params
    from training.train import summary, train

    chosen = {
        "seed": args.seed,
        "test_size": args.test_size,
        "cv_folds": args.cv_folds,
        "classifier": classifier_params(dict(args.overrides)),
        "gate_tolerance": args.gate_tolerance,
        "force_promote": args.force_promote,
    }
    if args.retrain:
        chosen["retrain"] = True
    if args.data is not None:
        chosen["data"] = args.data
    if args.experiment:
        chosen["experiment"] = args.experiment
    result = train(TrainingSettings(**chosen))
    print(summary(result))
    return 0
