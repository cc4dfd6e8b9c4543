from training.gate import decide


def test_first_model_is_promoted():
    decision = decide(0.80, None)
    assert decision.promote and decision.outcome == "first"


def test_not_worse_is_promoted_and_equal_counts_as_not_worse():
    assert decide(0.85, 0.85, "3").promote
    assert decide(0.86, 0.85, "3").outcome == "passed"


def test_worse_is_rejected_with_both_scores_in_the_reason():
    decision = decide(0.80, 0.85, "3")
    assert not decision.promote and decision.outcome == "rejected"
    assert "0.8000" in decision.reason and "0.8500" in decision.reason and "v3" in decision.reason
    tags = decision.as_tags()
    assert tags["gate.decision"] == "rejected"
    assert tags["gate.production_version"] == "3"
    assert float(tags["gate.production_roc_auc"]) == 0.85


def test_tolerance_and_force():
    assert decide(0.849, 0.85, "3", tolerance=0.002).promote
    forced = decide(0.70, 0.85, "3", force=True)
    assert forced.promote and forced.outcome == "forced"


def test_not_comparable_promotes_and_says_why_in_the_tags():
    decision = decide(0.70, None, "3", not_comparable="v3 predates the content split")
    assert decision.promote and decision.outcome == "not-comparable"
    assert "predates the content split" in decision.reason
    tags = decision.as_tags()
    assert tags["gate.comparable"] == "false" and "gate.production_roc_auc" not in tags
    assert decide(0.9, 0.8, "3").as_tags()["gate.comparable"] == "true"
