"""The promotion history read from version tags (``training.promotion_history``, no MLflow):
the rollback stack, changes made outside credit-risk, stage/alias divergences, and the records
a promotion or rollback plans to write. Versions are small plain objects, as the module only
reads ``version``, ``current_stage`` and ``tags``."""

import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from model.identity import utc_timestamp
from training.promotion_history import (
    Promotion,
    PromotionError,
    RegistryState,
    plan_promotion,
    plan_rollback,
)

AT = "2026-12-06T10:00:00.000Z"


@dataclass
class Version:
    version: str
    current_stage: str = "None"
    tags: dict[str, str] = field(default_factory=dict)


def version(number: int, stage: str = "None", seq: int | None = None, rolled_back: int | None = None):
    tags = {}
    if seq is not None:
        tags = {
            "promotion.seq": str(seq),
            "promotion.at": "2026-11-26T08:00:00.000Z",
            "promotion.by": "ops@host",
        }
        tags["promotion.source"], tags["promotion.reason"] = "cli", f"why {number}"
    if rolled_back is not None:
        tags |= {
            "promotion.rolled_back_seq": str(rolled_back),
            "promotion.rolled_back_at": "2026-11-26T09:00:00.000Z",
        }
    return Version(str(number), stage, tags)


def state(*versions, alias: str | None = None) -> RegistryState:
    return RegistryState({v.version: v for v in versions}, alias)


def test_the_stack_holds_each_version_once_at_its_latest_promotion_minus_rolled_back_ones():
    # Promoted 1, 2, 3, rolled back to 2 (seq 4), then 1 (seq 5); 3 promoted again (seq 6).
    current = state(
        version(1, "Archived", seq=5),
        version(2, "Archived", seq=4, rolled_back=4),
        version(3, "Production", seq=6, rolled_back=3),  # an earlier promotion of v3 was undone
        alias="3",
    )
    assert current.holders == ["1", "3"]
    assert current.rollback_target() == "1"
    assert current.next_seq() == 7
    assert [r.version for r in current.history] == ["3", "1", "2"]
    assert [r.rolled_back for r in current.history] == [False, False, True]
    assert current.divergences() == [] and current.outside_changes() == []


def test_a_holder_without_a_record_is_the_newest_holder_and_is_reported():
    current = state(
        version(1, "Archived", seq=1), version(2, "Archived", seq=2), version(3, "Production"), alias="2"
    )
    assert current.unrecorded_holder
    assert current.holders == ["1", "2", "3"]
    assert current.rollback_target() == "2"
    assert current.outside_changes() == [
        "v3 in Production without a promotion record: changed outside credit-risk (MLflow UI?)"
    ]
    assert current.divergences() == ["stage Production is v3 but alias production points at v2"]


def test_an_older_holder_put_back_by_hand_moves_to_the_top():
    current = state(version(1, "Production", seq=1), version(2, "Archived", seq=2), alias="1")
    assert current.holders == ["2", "1"]
    assert current.rollback_target() == "2"
    assert current.outside_changes() == [
        "v1 in Production, but the latest recorded promotion is v2's (#2): changed outside credit-risk (MLflow UI?)"
    ]


def test_an_emptied_stage_and_several_versions_in_it_are_reported():
    emptied = state(version(1, "Archived", seq=1), alias="1")
    assert emptied.divergences() == ["no version is in stage Production but alias production points at v1"]
    assert emptied.outside_changes() == [
        "no version in Production, but the latest recorded promotion put v1 there (#1): "
        "changed outside credit-risk (MLflow UI?)"
    ]
    with pytest.raises(PromotionError, match="no version is in Production, so there is nothing to roll back"):
        emptied.rollback_target()

    crowded = state(version(1, "Production", seq=1), version(2, "Production", seq=2))
    assert crowded.holder == "2"
    assert crowded.divergences() == [
        "v1, v2 are all in stage Production (models:/credit-risk-model/Production resolves to v2)",
        "stage Production is v2 but alias production is not set",
    ]


def test_nothing_to_roll_back_to_says_why():
    with pytest.raises(PromotionError, match=r"no version is recorded in Production before v1$"):
        state(version(1, "Production", seq=1), alias="1").rollback_target()
    after_rollbacks = state(
        version(1, "Production", seq=3), version(2, "Archived", seq=2, rolled_back=2), alias="1"
    )
    with pytest.raises(PromotionError, match="before v1 other than ones already rolled back"):
        after_rollbacks.rollback_target()


def test_unknown_versions_are_named_with_the_ones_that_exist():
    with pytest.raises(PromotionError, match=r"has no version 9 \(versions: 1, 2\)"):
        state(version(1), version(2)).version("9")


def apply(current: RegistryState, moved_to: str, *records: tuple[str, dict[str, str]]) -> RegistryState:
    """The registry after a promotion's writes: Production moved, the records tagged."""
    versions = {}
    for number, old in current.versions.items():
        stage = (
            "Production"
            if number == moved_to
            else ("Archived" if old.current_stage == "Production" else old.current_stage)
        )
        versions[number] = Version(number, stage, dict(old.tags))
    for number, tags in records:
        versions[number].tags.update(tags)
    return RegistryState(versions, moved_to)


def promote(current: RegistryState, number: str, reason: str = "") -> RegistryState:
    plan = plan_promotion(current, number, reason=reason, source="cli", actor="ops@host", at=AT)
    writes = [(plan.outside.version, plan.outside.tags())] if plan.outside else []
    return apply(current, number, *writes, (number, plan.new.tags()))


def rollback(current: RegistryState) -> RegistryState:
    plan = plan_rollback(current, reason="", actor="ops@host", at=AT)
    writes = [(plan.outside.version, plan.outside.tags())] if plan.outside else []
    writes += [(plan.undone.version, plan.undone.rolled_back_tags()), (plan.new.version, plan.new.tags())]
    return apply(current, plan.new.version, *writes)


def test_the_plans_replayed_give_the_documented_rollback_walk():
    # README: promote 1, 2, 3; rollback → 2; rollback → 1; a third is refused. Promote 3
    # again, then rollback → 1, since 2 was rolled back.
    current = state(version(1), version(2), version(3))
    for number in ("1", "2", "3"):
        current = promote(current, number)
    current = rollback(current)
    assert current.holder == "2"
    current = rollback(current)
    assert current.holder == "1"
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        rollback(current)
    current = rollback(promote(current, "3"))
    assert current.holder == "1"
    # Each version counts once, at its latest promotion: 1, 2, 3 and 2 again go back to 3, then 1.
    current = state(version(1), version(2), version(3))
    for number in ("1", "2", "3", "2"):
        current = promote(current, number)
    assert [rollback(current).holder, rollback(rollback(current)).holder] == ["3", "1"]


def test_a_promotion_records_who_when_why_and_the_previous_holder():
    current = promote(state(version(1), version(2)), "1", reason="first")
    plan = plan_promotion(current, "2", reason="better recall", source="cli", actor="alice", at=AT)
    assert plan.outside is None
    assert plan.new == Promotion("2", 2, AT, "alice", "better recall", "cli", previous="1")
    assert plan.new.tags() == {
        "promotion.seq": "2",
        "promotion.at": AT,
        "promotion.by": "alice",
        "promotion.reason": "better recall",
        "promotion.source": "cli",
        "promotion.previous": "1",
    }
    assert Promotion.from_version(Version("2", "Production", plan.new.tags())) == plan.new
    first = plan_promotion(state(version(1)), "1", reason="", source="gate", actor="ci", at=AT).new
    assert first.previous is None and first.tags()["promotion.previous"] == "none"


def test_a_holder_found_without_a_record_is_recorded_first_as_outside():
    by_hand = state(version(1, "Archived", seq=1), version(2, "Production"), version(3), alias="1")
    plan = plan_promotion(by_hand, "3", reason="fix", source="cli", actor="bob", at=AT)
    assert (plan.outside.version, plan.outside.seq, plan.outside.source, plan.outside.by) == (
        "2",
        2,
        "outside",
        "unknown",
    )
    assert "noticed by bob" in plan.outside.reason
    assert (plan.new.seq, plan.new.previous) == (3, "2")

    undo = plan_rollback(by_hand, reason="", actor="bob", at=AT)
    assert undo.outside.version == undo.undone.version == "2" and undo.undone.rolled_back_at == AT
    assert undo.undone.rolled_back_tags() == {
        "promotion.rolled_back_seq": "2",
        "promotion.rolled_back_at": AT,
    }
    assert (undo.new.version, undo.new.seq, undo.new.source) == ("1", 3, "rollback")
    assert undo.new.reason == "rollback from v2" and undo.new.previous == "2"


def test_a_rollback_checked_against_another_target_is_refused():
    current = promote(promote(promote(state(version(1), version(2), version(3)), "1"), "2"), "3")
    assert plan_rollback(current, reason="x", actor="a", at=AT, expected="2").new.version == "2"
    with pytest.raises(
        PromotionError, match="the registry changed meanwhile: a rollback would now go to v2, not v1"
    ):
        plan_rollback(current, reason="x", actor="a", at=AT, expected="1")


def test_promotion_times_are_the_house_timestamp():
    at = utc_timestamp()
    plan = plan_promotion(state(version(1)), "1", reason="", source="api", actor="a", at=at)
    assert plan.new.tags()["promotion.at"] == at and at.endswith("Z") and len(at) == len(AT)


def test_the_history_needs_no_mlflow():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, training.promotion_history; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "training.promotion_history" in loaded and "mlflow" not in loaded


def test_ui_links_open_the_model_training_view():
    from training.registry import ui_url

    assert (
        ui_url("http://127.0.0.1:5000/", "experiments/1/runs/abc")
        == "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    )
    assert ui_url("sqlite:///mlflow.db", "experiments/1") is None
