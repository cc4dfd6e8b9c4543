"""The promotion history read from version tags: the rollback stack, changes made outside
credit-risk and stage/alias divergences (registry states built from MLflow's own entities)."""

import pytest
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from training.registry import PromotionError, RegistryState, ui_url


def version(number: int, stage: str = "None", seq: int | None = None, rolled_back: int | None = None):
    tags = {}
    if seq is not None:
        tags = {"promotion.seq": str(seq), "promotion.at": "2026-11-26T08:00:00Z", "promotion.by": "ops@host"}
        tags["promotion.source"], tags["promotion.reason"] = "cli", f"why {number}"
    if rolled_back is not None:
        tags |= {
            "promotion.rolled_back_seq": str(rolled_back),
            "promotion.rolled_back_at": "2026-11-26T09:00:00Z",
        }
    return ModelVersion(
        "credit-risk-model",
        str(number),
        0,
        current_stage=stage,
        tags=[ModelVersionTag(key, value) for key, value in tags.items()],
    )


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


def test_ui_links_open_the_model_training_view():
    assert (
        ui_url("http://127.0.0.1:5000/", "experiments/1/runs/abc")
        == "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    )
    assert ui_url("sqlite:///mlflow.db", "experiments/1") is None
