"""Every ``heal.*`` key this package writes, in one place, and what each value means.

An attempt is one run of the training experiment tagged ``heal.attempt=true``; a challenger is
the training run it started (nested under it by MLflow's ``mlflow.parentRunId``) and the
version registered from that run. ``credit-risk status`` reads the version tags below to show a
challenger waiting for an operator; nothing else outside this package depends on them.

Imports only the promotion history's tag names, so that the CLI layer can read these cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping

from training.promotion_history import SEQ_TAG

# -- the attempt run ------------------------------------------------------------------------
ATTEMPT = "heal.attempt"  # "true" on every attempt run
STATE = "heal.state"  # one of STATES: where the attempt is, then how it ended
MODE = "heal.mode"  # "manual" or "auto"
PRODUCTION_VERSION = "heal.production_version"  # the version challenged (or assessed)
TRIGGERED = "heal.triggered"  # "true" / "false"
REASONS = "heal.reasons"  # the reasons, one per line
TRAINED = "heal.trained"  # "true" once the attempt starts training: the cooldown counts from here
CANDIDATE_VERSION = "heal.candidate_version"
CANDIDATE_RUN = "heal.candidate_run_id"
PROMOTED = "heal.promoted"
ERROR = "heal.error"  # a failed attempt: the error, type and message
POLICY_SHA256 = "heal.policy_sha256"  # the policy file's bytes, as read
POLICY_SOURCE = "heal.policy_source"

# attempt states
STARTED = "started"  # holds the lease (or is deciding whether it does)
TRAINING = "training"
NOT_TRIGGERED = "not-triggered"
SKIPPED = "skipped"  # the lease, the local lock, the cooldown, or not enough rows
REFUSED = "refused"  # the data check or the gate's skew guard refused
REJECTED = "rejected"  # the gate's rule said no
WAITING = "waiting"  # passed, left for an operator (manual mode)
PROMOTED_STATE = "promoted"  # passed and promoted (auto mode)
FAILED = "failed"
FINAL_STATES = (NOT_TRIGGERED, SKIPPED, REFUSED, REJECTED, WAITING, PROMOTED_STATE, FAILED)

# -- the challenger's training run and version ----------------------------------------------
ATTEMPT_RUN = "heal.attempt_run_id"
CHALLENGES = "heal.challenges"  # the Production version it was trained to replace
CHALLENGER = "heal.challenger"  # on the version: waiting, superseded, promoted, rejected or refused
SUPERSEDED = "superseded"  # a newer challenger passed while this one waited: it waits no more
SUPERSEDED_BY = "heal.superseded_by"  # the version that took its place
# The file the chain of challengers started from: the original training data's SHA-256,
# inherited by every challenger so that the next heal checks --data against it.
ORIGINAL_DATASET_HASH = "heal.original_dataset_hash"
TRIGGER = "heal.trigger"  # the reasons, in short
DATA_PREFIX = "heal.data."  # the challenger's data: rows, weights, lookback, outcome sources
RECENT_PREFIX = "heal.recent."  # the out-of-time rows: count, fingerprint, time span

# Artifacts of the attempt run (and, for the row lists, of the challenger's run).
RESULT_ARTIFACT = "heal/result.json"
LINEAGE_ARTIFACT = "heal/lineage.json"
WINDOWS_DIR = "heal/windows"
TRAINING_FILE_DIR = "heal/training_file"
PRODUCTION_ROWS_ARTIFACT = "heal/production_rows.parquet"  # keys of the production rows used


def is_waiting(number: str, version_tags: Mapping[str, str], holder: str | None) -> bool:
    """Whether version ``number`` is a challenger waiting for an operator: it passed the healing
    gate in manual mode (tagged ``waiting``), is not in Production and was never promoted (a
    promotion leaves the tag as it was, and adds the promotion history's sequence tag)."""
    return version_tags.get(CHALLENGER) == WAITING and number != holder and SEQ_TAG not in version_tags
