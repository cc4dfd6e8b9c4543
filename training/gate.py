"""The promotion gate: a candidate replaces Production only when it is not worse.

Both models are scored on the same held-out rows, so the comparison is like for like.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    outcome: str  # "first", "passed", "rejected" or "forced"
    reason: str
    candidate_score: float
    production_score: float | None = None
    production_version: str | None = None

    def as_tags(self, prefix: str = "gate.") -> dict[str, str]:
        tags = {
            "decision": "promoted" if self.promote else "rejected",
            "outcome": self.outcome,
            "reason": self.reason,
            "metric": "roc_auc",
            "candidate_roc_auc": f"{self.candidate_score:.6f}",
        }
        if self.production_score is not None:
            tags["production_roc_auc"] = f"{self.production_score:.6f}"
        if self.production_version is not None:
            tags["production_version"] = self.production_version
        return {prefix + key: value for key, value in tags.items()}


def decide(
    candidate_score: float,
    production_score: float | None,
    production_version: str | None = None,
    tolerance: float = 0.0,
    force: bool = False,
) -> GateDecision:
    """Promote when there is no Production model, when forced, or when the candidate's held-out
    ROC AUC is at least Production's minus ``tolerance``."""
    common = dict(
        candidate_score=candidate_score,
        production_score=production_score,
        production_version=production_version,
    )
    if production_score is None:
        return GateDecision(True, "first", "no model in Production yet", **common)
    comparison = (
        f"candidate ROC AUC {candidate_score:.4f} vs Production v{production_version} "
        f"{production_score:.4f} on the same held-out rows"
    )
    if candidate_score >= production_score - tolerance:
        return GateDecision(True, "passed", f"not worse: {comparison}", **common)
    if force:
        return GateDecision(True, "forced", f"worse but forced: {comparison}", **common)
    return GateDecision(False, "rejected", f"worse: {comparison}", **common)
