"""Healing without servers: the policy file, the triggers' verdicts, the challenger's data and
the out-of-time decision rule, each against hand-made inputs and independent calculations
(``sklearn.metrics.roc_auc_score``, the rows the test built itself)."""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healing import tags as T
from healing.assess import Windows, _schedule_verdict, assess
from healing.challenger_data import (
    RECORD_COLUMNS,
    LabelledRows,
    NotEnoughRows,
    build,
    labelled_rows,
    write_training_file,
)
from healing.policy import REPOSITORY_POLICY, HealPolicy, PolicyError, load_policy, parse_policy
from model.schema import FEATURES, TARGET
from monitoring.status import Thresholds
from monitoring.window import monitor_window
from stack.promotion import format_status, waiting_challengers
from tests.helpers import BIN, SAMPLE
from training.data import load_training_data
from training.gate import Comparison, decide_challenge
from training.profile import build_profile
from training.promotion_history import RegistryState
from training.split import row_digests

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


# -- the policy ------------------------------------------------------------------------------


def test_the_repository_policy_file_holds_exactly_the_defaults_in_code():
    loaded = load_policy(REPOSITORY_POLICY)
    assert loaded.policy == HealPolicy()
    assert loaded.policy.mode == "manual"
    # Every key of the model is spelled out in the file (none left to an implicit default).
    text = REPOSITORY_POLICY.read_text()
    for section, model in HealPolicy().model_dump().items():
        for key, value in model.items():
            if isinstance(value, dict):
                assert f"[{section}.{key}]" in text
                for inner in value:
                    assert f"\n{inner} = " in text, f"{section}.{key}.{inner}"
            else:
                assert f"[{section}]" in text and f"\n{key} = " in text, f"{section}.{key}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[gate]\ntolerance = -0.1\n",
            "policy: gate.tolerance = -0.1: Input should be greater than or equal to 0",
        ),
        (
            '[attempts]\ncooldown_hours = "24"\n',
            "policy: attempts.cooldown_hours = '24': Input should be a valid number",
        ),
        ("[data]\nproduction_weigth = 2\n", "policy: unknown key data.production_weigth"),
        (
            '[promotion]\nmode = "yolo"\n',
            "policy: promotion.mode = 'yolo': Input should be 'manual' or 'auto'",
        ),
        ("[trigger.drift]\nscore = 1\n", "policy: trigger.drift.score = 1: Input should be a valid boolean"),
        ("[gate\n", "policy: not valid TOML"),
        # Would pass a bare gt=0 and overflow datetime arithmetic at run time.
        (
            "[trigger.drift]\nwindow_hours = inf\n",
            "policy: trigger.drift.window_hours = inf: Input should be",
        ),
        ("[data]\nlookback_days = 1e9\n", "policy: data.lookback_days = 1000000000.0: Input should be less"),
        ("[trigger.schedule]\nevery_days = nan\n", "policy: trigger.schedule.every_days = nan: Input should"),
        (
            "[trigger.drift]\nmin_alert_features = 0\nscore = false\n[trigger.outcomes]\nenabled = false\n",
            "policy: no trigger is on: nothing would ever be retrained",
        ),
    ],
)
def test_a_bad_policy_is_refused_naming_the_key_and_the_value(text, expected):
    with pytest.raises(PolicyError) as refused:
        parse_policy(text)
    assert str(refused.value).startswith(expected), str(refused.value)


def test_a_partial_policy_keeps_the_defaults_of_what_it_leaves_out():
    policy = parse_policy('[promotion]\nmode = "auto"\n[gate]\nmargin = 0.01\n')
    assert policy.mode == "auto" and policy.gate.margin == 0.01
    assert policy.gate.tolerance == HealPolicy().gate.tolerance and policy.data == HealPolicy().data


def _heal(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "credit-risk"), "heal", *args],
        env={**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_arguments_exit_2_before_anything_talks_to_mlflow(tmp_path):
    bad = tmp_path / "heal.toml"
    bad.write_text("[gate]\ntolerance = -1\n[data]\nlookback = 3\n")
    done = _heal("--once", "--policy", str(bad))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [  # in the policy's order of sections
        f"error: {bad}: unknown key data.lookback (a misspelling? see heal.toml for the keys)",
        f"error: {bad}: gate.tolerance = -1: Input should be greater than or equal to 0",
    ]
    done = _heal()
    assert done.returncode == 2 and "pass --once" in done.stderr
    done = _heal("--once", CREDIT_RISK_HEAL_POLICY=str(tmp_path / "missing.toml"))
    assert done.returncode == 2 and f"CREDIT_RISK_HEAL_POLICY='{tmp_path / 'missing.toml'}'" in done.stderr
    done = _heal("--once", "--mode", "sometimes")
    assert done.returncode == 2 and "invalid choice: 'sometimes'" in done.stderr


# -- the decision rule -----------------------------------------------------------------------


def _cmp(candidate: float, production: float | None, rows: int = 500) -> Comparison:
    return Comparison(candidate, production, rows, "f" * 64, 40)


@pytest.mark.parametrize(
    ("original", "recent", "tolerance", "margin", "passed"),
    [
        ((0.80, 0.80), (0.70, 0.60), 0.0, 0.0, True),  # better on recent, equal on original
        ((0.795, 0.80), (0.70, 0.60), 0.005, 0.0, True),  # within the tolerance
        ((0.79, 0.80), (0.70, 0.60), 0.005, 0.0, False),  # forgot the old population
        ((0.80, 0.80), (0.60, 0.60), 0.0, 0.0, False),  # a tie is not better
        ((0.80, 0.80), (0.649, 0.60), 0.0, 0.05, False),  # better, but not by more than the margin
        ((0.80, 0.80), (0.651, 0.60), 0.0, 0.05, True),
    ],
)
def test_the_out_of_time_rule(original, recent, tolerance, margin, passed):
    decision = decide_challenge(_cmp(*original), _cmp(*recent), "3", tolerance=tolerance, margin=margin)
    assert decision.passed is passed and decision.outcome == ("passed" if passed else "rejected")
    assert decision.comparable is True
    tags = decision.as_tags()
    assert tags["gate.kind"] == "out-of-time" and tags["gate.decision"] == decision.outcome
    assert float(tags["gate.recent.candidate_roc_auc"]) == recent[0]
    assert float(tags["gate.production_roc_auc"]) == original[1]
    assert tags["gate.tolerance"] == repr(tolerance) and tags["gate.margin"] == repr(margin)


def test_without_comparable_original_rows_the_recent_rows_decide_and_it_says_so():
    decision = decide_challenge(None, _cmp(0.7, 0.6), "3", not_comparable="v3 predates the content split")
    assert decision.passed and decision.comparable is False
    assert "original rows not compared: v3 predates the content split" in decision.reason
    assert (
        decision.as_tags()["gate.comparable"] == "false"
        and "gate.candidate_roc_auc" not in decision.as_tags()
    )


# -- the challenger's data -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample():
    data = load_training_data(SAMPLE)
    return data.features.reset_index(drop=True), data.target.reset_index(drop=True)


def _records(features: pd.DataFrame, start: datetime, version: str = "1") -> pd.DataFrame:
    """One record per row, one request per row, a second apart, oldest first."""
    n = len(features)
    return features.reset_index(drop=True).assign(
        request_id=[f"req-{start:%H%M}-{i:05d}" for i in range(n)],
        row_index=np.zeros(n, dtype="int32"),
        timestamp=pd.to_datetime([start + timedelta(seconds=i) for i in range(n)], utc=True),
        model_version=version,
    )[RECORD_COLUMNS]


def _outcomes(records: pd.DataFrame, target: pd.Series) -> pd.DataFrame:
    return pd.DataFrame(
        {"request_id": records["request_id"], "row_index": records["row_index"], "outcome": target.to_numpy()}
    )


@dataclass
class _Policy:
    production_weight: int = 2
    min_production_rows: int = 10
    recent_share: float = 0.25
    min_recent_rows: int = 10
    min_recent_class_rows: int = 1


def test_labelled_rows_join_outcomes_and_drop_ambiguous_request_ids(sample):
    features, target = sample
    records = _records(features.iloc[:6], NOW)
    retried = records.iloc[[2]].assign(timestamp=records["timestamp"].iloc[2] + pd.Timedelta(1, "s"))
    reused = records.iloc[[4]].assign(**{FEATURES[1]: 99.0})  # same key, other features
    records = pd.concat([records, retried, reused], ignore_index=True)
    outcomes = _outcomes(records.iloc[:5], target.iloc[:5])  # row 5 has no outcome yet
    labelled = labelled_rows(records, outcomes)
    assert labelled.ambiguous_keys == 1
    assert labelled.frame["request_id"].tolist() == records["request_id"].iloc[[0, 1, 2, 3]].tolist()
    assert labelled.frame[TARGET].tolist() == target.iloc[:4].tolist()


def test_the_recent_rows_are_the_newest_and_never_trained_on(sample, tmp_path):
    features, target = sample
    original = load_training_data(
        write_training_file(features.iloc[:200].assign(**{TARGET: target.iloc[:200]}), tmp_path / "o.csv")
    )
    rows = features.iloc[200:400].reset_index(drop=True)
    labels = target.iloc[200:400].reset_index(drop=True)
    records = _records(rows, NOW - timedelta(hours=1))
    # A row Production (a former challenger) trained on, and a copy of an original row.
    records.loc[199, list(FEATURES)] = features.iloc[0].to_numpy()
    labels.iloc[199] = target.iloc[0]
    trained_by_production = records.iloc[[198]][["request_id", "row_index"]]
    labelled = labelled_rows(records, _outcomes(records, labels))
    data = build(original, labelled, _Policy(), _Policy(), trained_by_production)
    assert len(data.recent) == math.ceil(0.25 * 200)
    # The newest eligible rows: 198 and 199 are not eligible, so rows 148..197.
    assert data.recent["request_id"].tolist() == records["request_id"].iloc[148:198].tolist()
    assert not set(data.recent["request_id"]) & set(data.production["request_id"])
    assert len(data.production) == 150  # every other labelled row, 198 and 199 included
    assert len(data.training) == 200 + 2 * 150
    lineage = data.lineage()
    assert lineage["recent"]["rows"] == 50 and lineage["production"]["rows"] == 150
    assert lineage["original"]["sha256"] == original.fingerprint.sha256
    # Times as everywhere else in the project (model.identity.utc_timestamp), not pandas' own.
    newest = data.recent["timestamp"].max()
    assert (
        lineage["recent"]["last_record_at"]
        == newest.strftime("%Y-%m-%dT%H:%M:%S.") + f"{newest.microsecond // 1000:03d}Z"
    )


def test_a_row_with_a_recent_rows_content_is_not_trained_on(sample, tmp_path):
    features, target = sample
    head = features.iloc[:100].assign(**{TARGET: target.iloc[:100]})
    original = load_training_data(write_training_file(head, tmp_path / "o.csv"))
    # The newest row's content also arrived first, under another request id.
    order = [339, *range(300, 340)]
    records = _records(features.iloc[order], NOW)
    labels = target.iloc[order].reset_index(drop=True)
    policy = _Policy(recent_share=0.05, min_recent_rows=1, min_recent_class_rows=0)
    data = build(original, labelled_rows(records, _outcomes(records, labels)), _Policy(), policy)
    assert data.recent["request_id"].tolist() == records["request_id"].iloc[-3:].tolist()
    assert data.left_out["same_content_as_a_recent_row"] == 1
    assert records["request_id"].iloc[0] not in set(data.production["request_id"])
    assert len(data.production) == 41 - 3 - 1


def test_too_few_rows_train_nothing(sample, tmp_path):
    features, target = sample
    original = load_training_data(
        write_training_file(features.iloc[:100].assign(**{TARGET: target.iloc[:100]}), tmp_path / "o.csv")
    )
    records = _records(features.iloc[300:340], NOW)
    labelled = labelled_rows(records, _outcomes(records, target.iloc[300:340]))
    with pytest.raises(NotEnoughRows, match="the out-of-time holdout would have 10 rows"):
        build(original, labelled, _Policy(), _Policy(min_recent_rows=20))
    with pytest.raises(NotEnoughRows, match="30 labelled production rows left to train on"):
        build(original, labelled, _Policy(min_production_rows=31), _Policy())
    with pytest.raises(NotEnoughRows, match="of each outcome"):
        build(original, labelled, _Policy(), _Policy(min_recent_class_rows=50))
    assert len(build(original, LabelledRows(labelled.frame, 0), _Policy(), _Policy()).production) == 30


def test_the_training_file_is_in_the_kaggle_layout_and_reads_back_bit_for_bit(sample, tmp_path):
    features, target = sample
    frame = features.assign(**{TARGET: target})
    path = write_training_file(frame, tmp_path / "challenger.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == ",SeriousDlqin2yrs," + ",".join(FEATURES)
    assert lines[1].startswith("1,") and ",NA," in path.read_text()
    back = load_training_data(path)
    assert back.fingerprint.rows == len(frame)
    assert row_digests(back.features, back.target) == row_digests(features, target)
    original = pd.read_csv(SAMPLE, index_col=0, na_values=["NA"])
    assert np.array_equal(back.features.to_numpy(), original[list(FEATURES)].to_numpy(), equal_nan=True)


# -- the triggers ----------------------------------------------------------------------------


@dataclass
class _Version:
    version: str = "1"
    tags: dict = field(default_factory=dict)
    creation_timestamp: int = 0
    current_stage: str = "Production"
    run_id: str = "run"


def _windows(
    sample, shift: dict[str, float], labelled: bool, auc_rows: int = 2000
) -> tuple[Windows, np.ndarray]:
    features, target = sample
    rng = np.random.default_rng(3)
    probability = np.clip(
        0.05 + 0.3 * target.to_numpy() * rng.uniform(size=len(target)) + rng.uniform(0, 0.1, len(target)),
        0,
        1,
    )
    profile = build_profile(features.iloc[:2500], probability[:2500], 0.2)
    window = features.iloc[2500:].reset_index(drop=True).copy()
    for name, factor in shift.items():
        window[name] = window[name] * factor
    records = _records(window, NOW - timedelta(hours=2)).assign(
        probability=probability[2500:], prediction=(probability[2500:] > 0.2).astype("int64")
    )
    outcomes = _outcomes(records.iloc[:auc_rows], target.iloc[2500 : 2500 + auc_rows]) if labelled else None
    policy = HealPolicy().trigger
    drift = monitor_window(records, profile, model_version="1", since=NOW - timedelta(hours=24), until=NOW)
    outcome = monitor_window(
        records, profile, model_version="1", since=NOW - timedelta(days=90), until=NOW, outcomes=outcomes,
        thresholds=Thresholds(min_labelled_rows=policy.outcomes.min_labelled_rows), training_roc_auc=0.9,
    )  # fmt: skip
    return Windows(drift, outcome), probability[2500 : 2500 + auc_rows]


def test_a_shifted_feature_triggers_and_is_named(sample):
    windows, _ = _windows(sample, {"MonthlyIncome": 12.0}, labelled=False)
    assessment = assess(windows, _Version(tags={"test_roc_auc": "0.9"}), HealPolicy().trigger, NOW)
    assert assessment.triggered
    drift = assessment.to_dict()["drift"]
    assert drift["fired"] and drift["alert_features"] == ["MonthlyIncome"]
    assert assessment.reasons[0].startswith("TRIGGER: drift: PSI alert on 1 feature(s) over 2500 rows")
    assert "no trigger: outcomes: no labelled record of the last 90 days" in assessment.reasons


def test_an_empty_window_says_so_and_triggers_nothing(sample):
    features, _ = sample
    profile = build_profile(features.iloc[:2500], np.linspace(0.01, 0.5, 2500), 0.2)
    empty = monitor_window(
        _records(features.iloc[:0], NOW).assign(probability=0.0, prediction=0),
        profile,
        model_version="1",
        since=NOW - timedelta(hours=24),
        until=NOW,
    )
    assessment = assess(
        Windows(empty, empty), _Version(tags={"test_roc_auc": "0.9"}), HealPolicy().trigger, NOW
    )
    assert not assessment.triggered
    assert assessment.reasons[:2] == [
        "no trigger: drift: no records in the last 24 h",
        "no trigger: score: no records in the last 24 h",
    ]


def test_no_shift_and_a_fair_auc_trigger_nothing(sample):
    windows, _ = _windows(sample, {}, labelled=True)
    auc = windows.outcomes.outcomes.roc_auc
    assessment = assess(
        windows, _Version(tags={"test_roc_auc": f"{auc + 0.01:.6f}"}), HealPolicy().trigger, NOW
    )
    assert not assessment.triggered, assessment.reasons
    assert all(reason.startswith("no trigger:") for reason in assessment.reasons)


def test_an_auc_below_the_training_auc_by_more_than_the_margin_triggers(sample):
    from sklearn.metrics import roc_auc_score

    _, target = sample
    windows, probability = _windows(sample, {}, labelled=True)
    expected = roc_auc_score(target.iloc[2500:4500], probability)
    assert abs(windows.outcomes.outcomes.roc_auc - expected) < 1e-12
    policy = HealPolicy().trigger
    fired = assess(windows, _Version(tags={"test_roc_auc": f"{expected + 0.051:.6f}"}), policy, NOW)
    assert fired.to_dict()["outcomes"]["fired"] and fired.triggered
    held = assess(windows, _Version(tags={"test_roc_auc": f"{expected + 0.049:.6f}"}), policy, NOW)
    assert not held.to_dict()["outcomes"]["fired"]
    assert "0.0490 below the training AUC" in held.to_dict()["outcomes"]["reason"]
    better = assess(windows, _Version(tags={"test_roc_auc": f"{expected - 0.02:.6f}"}), policy, NOW)
    assert "0.0200 above the training AUC" in better.to_dict()["outcomes"]["reason"]
    few, _ = _windows(sample, {}, labelled=True, auc_rows=400)  # below min_labelled_rows (1000)
    verdict = assess(few, _Version(tags={"test_roc_auc": "0.99"}), policy, NOW).to_dict()["outcomes"]
    assert not verdict["fired"] and "too few to judge" in verdict["reason"]


def test_the_schedule_counts_from_the_last_promotion():
    policy = parse_policy("[trigger.schedule]\nevery_days = 30.0\n").trigger.schedule
    old = _Version(tags={"promotion.at": "2026-11-01T00:00:00.000Z"})  # 35 days before NOW
    young = _Version(tags={"promotion.at": "2026-12-01T00:00:00.000Z"})
    assert _schedule_verdict(old, policy, NOW).fired
    assert not _schedule_verdict(young, policy, NOW).fired
    assert (
        _schedule_verdict(old, HealPolicy().trigger.schedule, NOW).reason == "schedule: off (every_days = 0)"
    )


# -- status ----------------------------------------------------------------------------------


def test_status_lists_a_waiting_challenger_with_the_command_to_promote_it():
    versions = {
        "1": _Version("1", {"promotion.seq": "1", "promotion.source": "gate", "promotion.at": "x", "promotion.previous": "none"}),
        "2": _Version("2", {T.CHALLENGER: T.WAITING, T.CHALLENGES: "1", "gate.recent.rows": "300",
                            "gate.recent.candidate_roc_auc": "0.8", "gate.recent.production_roc_auc": "0.7"}, current_stage="None"),
        "3": _Version("3", {T.CHALLENGER: T.REJECTED, T.CHALLENGES: "1"}, current_stage="None"),
    }  # fmt: skip
    state = RegistryState(versions, "1")
    waiting = waiting_challengers(state)
    assert [item["version"] for item in waiting] == ["2"]
    assert waiting[0]["command"].startswith("credit-risk promote --version 2 --reason")
    assert not waiting[0]["production_moved"]
    report = {
        "registered_model": "credit-risk-model", "tracking_uri": "http://x", "production": None,
        "rollback_target": None, "divergences": [], "outside_changes": [], "history": [], "servers": [],
        "waiting_challengers": waiting,
    }  # fmt: skip
    text = format_status(report)
    assert "Waiting for an operator (healing, mode manual):" in text
    assert "to promote it: credit-risk promote --version 2" in text
    # Once promoted (it has a promotion record), it waits no more.
    versions["2"].tags["promotion.seq"] = "2"
    assert waiting_challengers(RegistryState(versions, "2")) == []


def test_the_lock_path_depends_on_the_tracking_server(tmp_path):
    from healing.settings import HealSettings
    from training.settings import TrainingSettings

    settings = HealSettings(lock_dir=tmp_path, training=TrainingSettings())
    assert settings.lock_path("http://a:1") != settings.lock_path("http://a:2")
    assert settings.lock_path("http://a:1").parent == Path(tmp_path)
