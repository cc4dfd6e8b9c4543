"""The healing lease and cooldown against a real MLflow: the interleavings of two attempts
played step by step (``healing.attempts``), stale and finished attempts, and the cooldown's
clock. Each test has an experiment of its own on the session's tracking server."""

from __future__ import annotations

import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from healing import tags as T
from healing.attempts import CLAIMED, LEASE, Attempt

pytestmark = pytest.mark.integration
TTL = 120.0


@pytest.fixture
def experiment(tracking_uri):
    client = MlflowClient(tracking_uri)
    return client, client.create_experiment(f"heal-lease-{uuid.uuid4().hex[:8]}")


def _two(client, experiment_id) -> tuple[Attempt, Attempt]:
    """Two attempts, the earlier (by the lease's order) first."""
    pair = [Attempt.start(client, experiment_id, {}) for _ in range(2)]
    return tuple(sorted(pair, key=lambda a: (a.started_ms, a.run_id)))


def test_the_earlier_attempt_goes_first_and_the_later_one_steps_aside(experiment):
    client, experiment_id = experiment
    first, second = _two(client, experiment_id)
    assert "started earlier" in second.may_claim(TTL) and first.run_id in second.may_claim(TTL)
    assert first.claim(TTL) is None
    assert f"attempt {first.run_id}" in second.claim(TTL) and "holds the lease" in second.claim(TTL)


def test_whoever_checks_after_the_other_claimed_steps_back(experiment):
    client, experiment_id = experiment
    first, second = _two(client, experiment_id)
    # Both passed step 2 (each saw no claim), then claim in turn: the second to check steps back.
    first.mark_claimed()
    assert first.check_claim(TTL) is None
    second.mark_claimed()
    assert "steps back" in second.check_claim(TTL)


def test_two_that_claim_at_the_same_moment_both_step_back(experiment):
    client, experiment_id = experiment
    first, second = _two(client, experiment_id)
    first.mark_claimed()
    second.mark_claimed()
    assert "steps back" in first.check_claim(TTL) and "steps back" in second.check_claim(TTL)


def test_finished_and_stale_attempts_hold_nothing(experiment):
    client, experiment_id = experiment
    done = Attempt.start(client, experiment_id, {})
    assert done.claim(TTL) is None
    done.finish(T.REJECTED, ["rejected"])
    assert client.get_run(done.run_id).data.tags[LEASE] == "released"
    # A process killed three hours ago, its run still RUNNING and its claim still on.
    killed = client.create_run(
        experiment_id,
        start_time=int(time.time() * 1000) - 3 * 3_600_000,
        tags={T.ATTEMPT: "true", LEASE: CLAIMED},
    )
    attempt = Attempt.start(client, experiment_id, {})
    assert attempt.claim(TTL) is None  # 180 minutes old: older than the 120-minute TTL
    attempt.finish(T.NOT_TRIGGERED, ["nothing"])
    later = Attempt.start(client, experiment_id, {})
    assert killed.info.run_id in later.claim(4 * 60)  # within a 4-hour TTL it still holds


def test_the_cooldown_counts_from_the_last_attempt_that_started_training(experiment):
    client, experiment_id = experiment
    now = int(time.time() * 1000)
    trained = client.create_run(
        experiment_id,
        start_time=now - 30 * 60_000,
        tags={T.ATTEMPT: "true", T.TRAINED: "true", T.STATE: T.FAILED},
    )
    client.set_terminated(trained.info.run_id, "FAILED")
    # A newer attempt that trained nothing does not restart the cooldown.
    quiet = client.create_run(
        experiment_id, start_time=now - 60_000, tags={T.ATTEMPT: "true", T.STATE: T.NOT_TRIGGERED}
    )
    client.set_terminated(quiet.info.run_id, "FINISHED")
    attempt = Attempt.start(client, experiment_id, {})
    why = attempt.cooldown(1.0)
    assert why.startswith(f"cooldown: attempt {trained.info.run_id} started training a challenger")
    assert "(failed)" in why and "the next challenger may start at" in why
    assert attempt.cooldown(0.25) is None and attempt.cooldown(0) is None
