"""``credit-risk heal --once``: one evaluation of the healing policy (``healing.heal``), from the
command line.

Flags are checked, then the policy file and the settings, then the original training file,
all before anything talks to MLflow: a problem there is exit code 2 with one line per problem.
Then one attempt runs; its result is printed (``--json``: one object on stdout, the trainer's
progress on stderr). Exit codes: 0 for every normal end (not triggered, skipped, rejected,
waiting, promoted), 1 when the attempt was refused (another data file, the gate's skew guard)
or failed (Production is then as it was), 2 for bad arguments.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from stack.errors import FAILED, UsageError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "heal",
        help="evaluate the healing policy once: monitor, maybe retrain a challenger, gate, promote",
        description="Run one attempt of the healing policy against the Production version: its drift "
        "and outcome windows, the policy's triggers, and if one fires (and the cooldown and the lease "
        "allow), a challenger trained on the original training file plus the labelled production "
        "records, gated against Production on the most recent labelled rows (out of time) and on the "
        "original held-out rows, then promoted by the policy's mode. Every attempt is a run in the "
        "training experiment. Variables: CREDIT_RISK_HEAL_POLICY, CREDIT_RISK_HEAL_LOCK_DIR, "
        "CREDIT_RISK_DATA and the other training variables (see credit-risk train --help).",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="run one attempt and exit (required: the monitor service runs the policy on its schedule)",
    )
    parser.add_argument(
        "--mode", choices=("manual", "auto"), help="override the policy's promotion mode for this attempt"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument(
        "--policy",
        type=Path,
        help="the policy file (heal.toml layout; $CREDIT_RISK_HEAL_POLICY, else the defaults)",
    )
    parser.add_argument(
        "--data", type=Path, help="the original training file ($CREDIT_RISK_DATA, as for credit-risk train)"
    )
    parser.add_argument(
        "--allow-other-data",
        action="store_true",
        help="train on --data even when it is not the file Production was trained on (said in the run)",
    )
    parser.set_defaults(handler=run)


def _print_result(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    lines = [
        f"heal attempt {result.attempt_run_id}: {result.state} (mode {result.mode}, policy {result.policy_source})",
        f"  Production       {f'v{result.production_version}' if result.production_version else 'none'}",
        f"  triggered        {'yes' if result.triggered else 'no'}",
        f"  challenger       {f'v{result.candidate_version}' if result.candidate_version else 'none trained'}",
    ]
    if result.gate.get("decision"):
        lines.append(f"  gate             {result.gate['decision']}")
    lines.append(f"  promoted         {'yes' if result.promoted else 'no'}")
    lines.append("Reasons:")
    lines += [f"  - {reason}" for reason in result.reasons]
    print("\n".join(lines))


def run(args) -> int:
    from healing.heal import heal_once
    from healing.policy import PolicyError, load_policy
    from healing.settings import HealSettings
    from stack.local import use_tracking_server
    from training.data import load_training_data
    from training.settings import TrainingSettings

    if not args.once:
        raise UsageError(
            "heal runs one attempt per call: pass --once (the monitor service, credit-risk monitor "
            "--every, runs the policy on its schedule)"
        )
    training = TrainingSettings(**({"data": args.data} if args.data else {}))
    settings = HealSettings(**({"policy": args.policy} if args.policy else {}), training=training)
    try:
        policy = load_policy(settings.policy)
    except PolicyError as error:
        raise UsageError(str(error).replace("\n", "\nerror: ")) from None
    original = load_training_data(training.data)  # DataError: exit 2, before MLflow
    use_tracking_server()
    out = sys.stderr if args.json else sys.stdout
    with contextlib.redirect_stdout(out):  # the trainer's progress never mixes with the JSON
        result = heal_once(settings=settings, policy=policy, mode=args.mode,
                           allow_other_data=args.allow_other_data, original=original)  # fmt: skip
    _print_result(result, args.json)
    if not result.ok:
        print(f"error: heal attempt {result.state}: {result.reasons[-1]}", file=sys.stderr)
        return FAILED
    return 0
