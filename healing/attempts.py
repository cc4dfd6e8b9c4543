"""One healing attempt as a run in MLflow, and the guardrails that keep attempts apart: the
lease (one attempt at a time, across processes and machines), the cooldown (no retraining
storm) and a local file lock (one attempt at a time on one machine, without asking MLflow).

**Where attempts live.** Each attempt is a run of the *training* experiment (the one
``credit-risk train`` logs to), tagged ``heal.attempt=true``: healing runs as the trainer
identity, which may write there and nowhere else that fits (``stack/auth_policy.py``), and
the challenger's own training run, in the same experiment, is nested under its attempt
(``mlflow.parentRunId``), so the UI shows the attempt and what it trained together. Every
attempt ends as a run with a final ``heal.state`` (``healing.tags.FINAL_STATES``) and its
reasons, whatever happened: not triggered, skipped, refused, failed, waiting, promoted.

**The lease.** An attempt is *live* while its run is ``RUNNING`` and it started less than
``[attempts] lease_ttl_minutes`` ago. On start an attempt:

1. creates its run with ``heal.lease=announced``;
2. reads the live attempts: if another has ``claimed`` the lease, or another announced one is
   earlier (start time, then run id), it ends ``skipped``;
3. tags itself ``claimed``;
4. reads the live attempts again: if another has claimed meanwhile, it ends ``skipped``.

Two attempts never both proceed: each claims (3) before it checks (4), so whichever checks
second sees the other's claim. Both may step back when they claim at the same moment; the
next window tries again. Step 2 only keeps that rare.

**Clocks.** Start times are the starting machine's clock (MLflow's client stamps them). The
TTL judges other machines' attempts by them, so the clocks of machines that heal must agree
to well within the TTL (minutes against two hours by default); the lease's safety does not
depend on them otherwise. A process killed in the middle of an attempt leaves its run
``RUNNING``: it holds the lease until the TTL runs out.

**The cooldown.** An attempt that starts training tags itself ``heal.trained=true`` first; no
attempt trains while the latest such attempt started less than ``[attempts]
cooldown_hours`` ago, whatever became of it (a retrain that fails every time must not run
every window).

**The local lock.** ``fcntl.flock`` on a file named after the tracking server, held for the
whole attempt; a second attempt on the same machine does not wait: it records a ``skipped``
run and returns.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from healing import tags as T
from model.identity import utc_timestamp

LEASE = "heal.lease"
ANNOUNCED, CLAIMED, RELEASED = "announced", "claimed", "released"
_MAX_TAG = 5000  # MLflow keeps 8,000 characters of a run tag; long texts go to artifacts too


@contextmanager
def local_lock(path: Path):
    """Yields True when this process holds the lock at ``path`` (never waits), else False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _quoted(key: str) -> str:
    return f"tags.`{key}`"


@dataclass
class Attempt:
    """One attempt's run: created at the start, ended once with a final state."""

    client: MlflowClient
    experiment_id: str
    run_id: str
    started_ms: int
    ended: bool = False

    @classmethod
    def start(cls, client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> Attempt:
        run = client.create_run(
            experiment_id,
            run_name=f"heal {utc_timestamp()}",
            tags={T.ATTEMPT: "true", T.STATE: T.STARTED, LEASE: ANNOUNCED, **tags},
        )
        return cls(client, experiment_id, run.info.run_id, run.info.start_time)

    def tag(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            text = value if isinstance(value, str) else json.dumps(value)
            self.client.set_tag(self.run_id, key, text[:_MAX_TAG])

    def metrics(self, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        finite = {
            k: float(v) for k, v in values.items() if v is not None and v == v and abs(v) != float("inf")
        }
        if finite:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in finite.items()])

    def log_json(self, document: Any, artifact: str) -> None:
        self.client.log_dict(self.run_id, document, artifact)

    def log_file(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    # -- the lease ---------------------------------------------------------------------------

    def _live_others(self, ttl_minutes: float) -> list:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"{_quoted(T.ATTEMPT)} = 'true' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
        oldest = time.time() * 1000 - ttl_minutes * 60_000
        return [run for run in runs if run.info.run_id != self.run_id and run.info.start_time >= oldest]

    def claim(self, ttl_minutes: float) -> str | None:
        """Take the lease (see the module's docstring): None when this attempt holds it, else
        why not (the attempt then ends ``skipped``)."""
        return self.may_claim(ttl_minutes) or self.take(ttl_minutes)

    def may_claim(self, ttl_minutes: float) -> str | None:
        """Step 2: None when no live attempt holds the lease and none announced earlier."""
        others = self._live_others(ttl_minutes)
        if why := _held_by(others):
            return why
        mine = (self.started_ms, self.run_id)
        earlier = [run for run in others if (run.info.start_time, run.info.run_id) < mine]
        if not earlier:
            return None
        run = min(earlier, key=lambda r: (r.info.start_time, r.info.run_id))
        return f"attempt {run.info.run_id} started earlier ({utc_timestamp(run.info.start_time / 1000)}) and goes first"

    def take(self, ttl_minutes: float) -> str | None:
        """Steps 3 and 4: claim, then step back if another live attempt has claimed too."""
        self.mark_claimed()
        return self.check_claim(ttl_minutes)

    def mark_claimed(self) -> None:
        self.client.set_tag(self.run_id, LEASE, CLAIMED)

    def check_claim(self, ttl_minutes: float) -> str | None:
        if why := _held_by(self._live_others(ttl_minutes)):
            return f"{why} (it claimed at the same moment; this attempt steps back)"
        return None

    def last_training_attempt(self):
        """The latest other attempt that started training, or None."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"{_quoted(T.TRAINED)} = 'true'",
            order_by=["attributes.start_time DESC"],
            max_results=5,
        )
        return next((run for run in runs if run.info.run_id != self.run_id), None)

    def cooldown(self, hours: float) -> str | None:
        """None when no attempt started training within ``hours``, else why this one waits."""
        if hours <= 0:
            return None
        last = self.last_training_attempt()
        if last is None:
            return None
        age_h = (time.time() * 1000 - last.info.start_time) / 3_600_000
        if age_h >= hours:
            return None
        started = utc_timestamp(last.info.start_time / 1000)
        allowed = utc_timestamp(last.info.start_time / 1000 + hours * 3600)
        return (
            f"cooldown: attempt {last.info.run_id} started training a challenger at {started} "
            f"({last.data.tags.get(T.STATE, '?')}); [attempts] cooldown_hours = {hours:g}, "
            f"so the next challenger may start at {allowed}"
        )

    # -- the end -----------------------------------------------------------------------------

    def finish(self, state: str, reasons: list[str], failed: bool = False) -> None:
        """Record the final state and reasons, release the lease, end the run."""
        if self.ended:
            return
        self.tag({T.STATE: state, T.REASONS: "\n".join(reasons), LEASE: RELEASED})
        self.client.set_terminated(
            self.run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
        )
        self.ended = True


def _held_by(others: list) -> str | None:
    holders = [run for run in others if run.data.tags.get(LEASE) == CLAIMED]
    if not holders:
        return None
    run = holders[0]
    return (
        f"attempt {run.info.run_id} (started {utc_timestamp(run.info.start_time / 1000)}) holds the lease: "
        "one attempt at a time"
    )
