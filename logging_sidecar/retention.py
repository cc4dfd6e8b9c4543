"""Retention: shipped records and dead letters past a window of days are deleted for good.

Records live in one MLflow run per model, version, training data, replica and UTC day
(``logging_sidecar.shipper``). A run is pruned once its whole day is past the window, that is
once the day's last moment is older than ``now - days``: a record is kept at least ``days``
days and deleted within one day more. Runs of the current UTC day are never touched.

MLflow's ``delete_run`` only soft-deletes (a deleted run's files stay on disk until ``mlflow
gc``), so the records' files are deleted through the artifact repository first (the proxied
``mlflow-artifacts`` store deletes them on the server). Per run, in this order:

1. **mark** it: tag ``inference.pruning`` with the time. From then on ``read_records`` skips
   it (it never meets a half-deleted run) and the shipper never ships into it (a late batch
   that still lands there is moved out by the shipper itself, see ``shipper``);
2. **delete its files**, then list them again until none is left;
3. **delete the run** (MLflow keeps its tags and summary metrics, aggregates of a batch and no
   applicant's record, as a deleted run until ``mlflow gc``).

A prune killed after 1 or 2 leaves a marked run, which every later prune finishes first,
whatever its window. Every step is idempotent, so two prunes (the sidecar's schedule and
``credit-risk records prune``) may run at once. Records shipped late for a pruned day land in
a new run of that key and are pruned next time if they are past the window.

Dead letters older than the window (by the time they were parked) are removed from the
spool's dead-letter file (``dead_letters.prune_dead_letters``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from mlflow.entities import LifecycleStage, Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from logging_sidecar.dead_letters import prune_dead_letters
from logging_sidecar.faults import FaultHook, no_faults
from logging_sidecar.metrics import SidecarMetrics
from logging_sidecar.records import DAY_TAG
from logging_sidecar.shipper import PRUNING_TAG, RECORDS_DIR, RUN_KEY_TAG, refused
from model.identity import utc_timestamp

logger = logging.getLogger("credit_risk.sidecar")

_PAGE = 1000
_DELETE_ATTEMPTS = 3  # a file uploaded while the folder was being deleted: delete again


class PruneIncomplete(RuntimeError):
    """A run's files could not all be deleted; it stays marked for the next prune."""


def past_window(run: Run, now: datetime, days: int) -> bool:
    """The run's whole UTC day is older than ``now - days``, and is not today."""
    try:
        day = date.fromisoformat(run.data.tags.get(DAY_TAG, ""))
    except ValueError:
        return False  # not a run this project made: not ours to delete
    day_ends = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return day < now.date() and day_ends <= now - timedelta(days=days)


@dataclass(frozen=True)
class PruneResult:
    cutoff: datetime
    runs: int = 0  # runs deleted by this pass
    resumed: int = 0  # of those, runs an earlier prune had marked and not finished
    files: int = 0  # record files deleted
    more: bool = False  # runs left for another pass (``limit`` reached)

    def __str__(self) -> str:
        text = f"{self.runs} runs ({self.files} record files) older than {utc_timestamp(self.cutoff)} deleted"
        if self.resumed:
            text += f", {self.resumed} of them left marked by an earlier prune"
        return text + (", more left for the next pass" if self.more else "")


class RecordPruner:
    """Deletes the records of runs past a window, durably (see the module's docstring)."""

    def __init__(self, experiment: str, client: MlflowClient | None = None, faults: FaultHook = no_faults):
        self._experiment = experiment
        self._client = client or MlflowClient()
        self._faults = faults

    def prune(self, days: int, *, now: datetime | None = None, limit: int | None = None) -> PruneResult:
        """Finish the runs earlier prunes marked, then prune the runs past ``days``; at most
        ``limit`` runs in this pass."""
        now = now or datetime.now(UTC)
        window_start = now - timedelta(days=days)
        found = self._client.get_experiment_by_name(self._experiment)
        if found is None:
            return PruneResult(window_start)
        marked, due = [], []
        for run in self._active_runs(found.experiment_id):
            if PRUNING_TAG in run.data.tags:
                marked.append(run)
            elif past_window(run, now, days):
                due.append(run)
        work = marked + due
        more = limit is not None and len(work) > limit
        work = work[:limit] if limit is not None else work
        resumed = sum(PRUNING_TAG in run.data.tags for run in work)
        work = [run for run in work if PRUNING_TAG in run.data.tags or self._mark(run)]
        self._faults("after_mark")
        files = 0
        for run in work:
            files += self._delete_files(run)
            self._faults("after_prune_artifacts")
            self._client.delete_run(run.info.run_id)  # a no-op on a run already deleted
            logger.info(f"retention: deleted run {run.info.run_id} ({run.data.tags.get(RUN_KEY_TAG)})")
        return PruneResult(window_start, len(work), resumed, files, more)

    def _active_runs(self, experiment_id: str) -> Iterator[Run]:
        token = None
        while True:
            page = self._client.search_runs(
                [experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=_PAGE, page_token=token
            )
            yield from page
            token = page.token
            if not token:
                return

    def _mark(self, run: Run) -> bool:
        """Tag it; False when it was deleted meanwhile (by another prune, or by hand)."""
        try:
            self._client.set_tag(run.info.run_id, PRUNING_TAG, utc_timestamp())
        except MlflowException:
            # Another prune may have marked it at the same moment (MLflow's tag upsert then
            # fails on its unique key) or deleted it: what matters is the run's state now.
            now = self._current(run.info.run_id)
            if now is None or now.info.lifecycle_stage != LifecycleStage.ACTIVE:
                return False
            if PRUNING_TAG not in now.data.tags:
                raise
        return True

    def _current(self, run_id: str) -> Run | None:
        try:
            return self._client.get_run(run_id)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _delete_files(self, run: Run) -> int:
        """Delete every file of the run; returns how many record files there were."""
        repository = get_artifact_repository(run.info.artifact_uri, tracking_uri=self._client.tracking_uri)
        records = sum(not entry.is_dir for entry in repository.list_artifacts(RECORDS_DIR))
        for _ in range(_DELETE_ATTEMPTS):
            left = repository.list_artifacts()
            if not left:
                return records
            for entry in left:
                repository.delete_artifacts(entry.path)
        if left := repository.list_artifacts():
            raise PruneIncomplete(
                f"run {run.info.run_id} still holds {[e.path for e in left]} after "
                f"{_DELETE_ATTEMPTS} deletions; it stays marked and the next prune tries again"
            )
        return records


class RetentionSchedule:
    """The sidecar's own pruning: every ``every_s`` (and once at start), dead letters, then
    records, at most ``RUNS_PER_PASS`` runs per pass so that a first prune of a long history
    never holds up shipping for long; the rest follows in the next steps."""

    RUNS_PER_PASS = 20
    RETRY_S = 60.0

    def __init__(self, days: int, every_s: float, pruner: RecordPruner, spool: Path, metrics: SidecarMetrics):
        self.days, self.every_s = days, every_s
        self._pruner, self._spool, self._metrics = pruner, spool, metrics
        self._next_at = 0.0  # monotonic

    def run_if_due(self) -> None:
        if time.monotonic() < self._next_at:
            return
        now = datetime.now(UTC)
        try:
            self._metrics.pruned_dead_letters.inc(
                prune_dead_letters(self._spool, now - timedelta(days=self.days))
            )
            result = self._pruner.prune(self.days, now=now, limit=self.RUNS_PER_PASS)
        except (MlflowException, OSError, PruneIncomplete) as error:  # MLflow down, disk full: later
            self._metrics.prune_failures.inc()
            # Refused (an identity without MANAGE on the experiment) is no outage: not every minute.
            wait = self.every_s if refused(error) else min(self.RETRY_S, self.every_s)
            self._next_at = time.monotonic() + wait
            logger.warning(
                f"retention: prune failed, retrying in {wait:.0f} s: {type(error).__name__}: {error}"
            )
            return
        self._metrics.pruned_runs.inc(result.runs)
        if result.runs:
            logger.info(f"retention ({self.days} days): {result}")
        self._next_at = time.monotonic() + (0 if result.more else self.every_s)
