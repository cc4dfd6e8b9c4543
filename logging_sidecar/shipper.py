"""Writing batches into MLflow: experiment ``credit-risk-inference``, one run per
``RunKey`` (model, version, training data, replica, UTC day), each batch one Parquet
artifact under ``records/`` plus its summary metrics. Names, steps and timestamps come from
the planned flush, so a retry overwrites.

Run layout version 2 (tag ``inference.layout``): the run key and the batch file names name
the replica. Runs of layout 1 are still read back.

MLflow state that the sidecar remembers can go away under it. A deleted run is replaced by a
new run for its key. A deleted experiment is restored (MLflow only soft-deletes it, so it
cannot be created again under its name, and restoring also restores its runs). A reset store
(ids unknown) gets a new experiment and new runs. Whatever still fails is retried, and
``/health/shipping`` says so.

Retention (``logging_sidecar.retention``) marks a run of a past day (tag ``inference.pruning``)
before deleting its files, then the run. A batch never stays behind in such a run: a batch of
a past day (a backlog shipping late) is checked after its upload, and if its run is marked or
deleted by then, the file is deleted from it and the batch goes to a new run for its key
(which the next prune deletes if it is past the window; any prune that began before the
upload deletes the file itself). No run is ever found again once marked. A retry after a
failure also deletes its file from a run that turned out deleted. Batches of the current UTC
day skip the check: retention never touches the current day.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from mlflow.entities import LifecycleStage, Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from logging_sidecar.records import RunKey, run_key, summary_metrics, to_frame
from logging_sidecar.state import Flush, State

logger = logging.getLogger("credit_risk.sidecar")

RUN_KEY_TAG = "inference.run_key"
LAYOUT_TAG = "inference.layout"
LAYOUT_VERSION = "2"
# Set (to the time) on a run retention is deleting: readers skip it, the shipper never uses it.
PRUNING_TAG = "inference.pruning"
RECORDS_DIR = "records"
_MOVES = 3  # a batch moved out of a pruned run this many times in one flush: give up, retry later


def batch_file_name(flush: Flush, key: RunKey) -> str:
    return f"batch-{key.replica}-{flush.id:010d}-{flush.digest}.parquet"


def _missing(error: MlflowException) -> bool:
    return error.error_code == "RESOURCE_DOES_NOT_EXIST"


def refused(error: Exception) -> bool:
    """MLflow (or its artifact proxy, whose errors are ``requests.HTTPError``) said no to this
    identity: 401 or 403."""
    if isinstance(error, MlflowException):
        return error.get_http_status_code() in (401, 403)
    return getattr(getattr(error, "response", None), "status_code", None) in (401, 403)


def is_pruned(run: Run) -> bool:
    """Marked by retention, or already deleted: no reader or shipper may use its files."""
    return run.info.lifecycle_stage == LifecycleStage.DELETED or PRUNING_TAG in run.data.tags


def _utc_today() -> str:
    return datetime.now(UTC).date().isoformat()


class Shipper:
    def __init__(self, experiment: str, state: State, client: MlflowClient | None = None):
        self._experiment_name = experiment
        self._state = state
        self._client = client or MlflowClient()
        self._experiment_id: str | None = None

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self._client.get_experiment_by_name(self._experiment_name)
            if found is not None and found.lifecycle_stage == LifecycleStage.DELETED:
                self._restore(found.experiment_id)
            if found is None:
                try:
                    self._experiment_id = self._client.create_experiment(self._experiment_name)
                except MlflowException as error:  # created by someone else meanwhile
                    if error.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    self._experiment_id = self._client.get_experiment_by_name(
                        self._experiment_name
                    ).experiment_id
            else:
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def _restore(self, experiment_id: str) -> None:
        logger.warning(
            f"experiment '{self._experiment_name}' ({experiment_id}) was deleted: restoring it, "
            "with its runs, to keep shipping into it"
        )
        self._client.restore_experiment(experiment_id)

    def _run(self, key: RunKey) -> str:
        if run_id := self._state.run_id(key.text):
            return run_id
        # A crash between creating the run and remembering it must not create a second one.
        # A run retention has marked is never used again: its files are being deleted.
        found = [
            run
            for run in self._client.search_runs(
                [self._experiment()], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key.text}'", max_results=100
            )
            if PRUNING_TAG not in run.data.tags
        ]
        if found:
            run_id = found[0].info.run_id
        else:
            run = self._client.create_run(
                self._experiment(),
                run_name=f"{key.registered_model}-v{key.model_version}-{key.replica}-{key.day}",
                tags={RUN_KEY_TAG: key.text, LAYOUT_TAG: LAYOUT_VERSION, **key._asdict()},
            )
            run_id = run.info.run_id
            self._client.set_terminated(run_id, "FINISHED")
        self._state.remember_run(key.text, run_id)
        return run_id

    def recover(self, flush: Flush, keys: list[RunKey]) -> None:
        """After a failed attempt: check what we remember against MLflow and repair it. A run
        found deleted loses this flush's file, if the attempt uploaded it there before failing."""
        if self._experiment_id is not None:
            try:
                experiment = self._client.get_experiment(self._experiment_id)
            except MlflowException as error:
                if not _missing(error):
                    raise
                logger.warning(f"experiment {self._experiment_id} is gone (store reset?): finding it anew")
                self._experiment_id = None
            else:
                if experiment.lifecycle_stage == LifecycleStage.DELETED:
                    self._restore(self._experiment_id)
        for key in keys:
            if not (run_id := self._state.run_id(key.text)):
                continue
            run = self._get_run(run_id)
            if run is None or is_pruned(run):
                logger.warning(
                    f"run {run_id} for {key.text} was deleted, is being pruned or is gone: shipping into a new run"
                )
                if run is not None:
                    self._delete_batch(run, batch_file_name(flush, key))
                self._state.forget_run(key.text)

    def _get_run(self, run_id: str) -> Run | None:
        """The run, deleted or not; None when the store does not know it."""
        try:
            return self._client.get_run(run_id)
        except MlflowException as error:
            if _missing(error):
                return None
            raise

    def _delete_batch(self, run: Run, name: str) -> None:
        """Delete this shipper's own upload from a run being pruned. Without the right to
        (an identity with EDIT but not MANAGE on the experiment), say so and go on: the prune,
        which needs MANAGE anyway, deletes it if the run is still marked, ``mlflow gc`` if not."""
        repository = get_artifact_repository(run.info.artifact_uri, tracking_uri=self._client.tracking_uri)
        try:
            repository.delete_artifacts(f"{RECORDS_DIR}/{name}")
        except (MlflowException, OSError) as error:  # requests.HTTPError is an OSError
            if not refused(error):
                raise
            logger.error(
                f"not allowed to delete {RECORDS_DIR}/{name} from run {run.info.run_id}, which is being "
                f"pruned ({error}); it stays there until a prune or `mlflow gc` deletes it"
            )

    def _upload(self, key: RunKey, path: Path, past_day: bool) -> str:
        """Upload a batch into its key's run; returns the run. A batch of a past day is checked
        after the upload: if retention marked or deleted the run meanwhile, the file is
        deleted from it and the batch goes to a new run (see the module's docstring)."""
        for _ in range(_MOVES):
            run_id = self._run(key)
            self._client.log_artifact(run_id, str(path), RECORDS_DIR)
            if not past_day:
                return run_id
            run = self._get_run(run_id)
            if run is not None and not is_pruned(run):
                return run_id
            logger.warning(
                f"run {run_id} for {key.text} is being pruned: moving batch {path.name} to a new run"
            )
            if run is not None:
                self._delete_batch(run, path.name)
            self._state.forget_run(key.text)
        raise RuntimeError(f"batch {path.name} for {key.text}: its run was pruned {_MOVES} times in a row")

    def ship(self, flush: Flush, requests: list[dict]) -> int:
        """Send one flush; returns the number of records shipped."""
        shipped = 0
        today = _utc_today()
        with tempfile.TemporaryDirectory() as directory:
            for key, group in group_by_run(requests).items():
                frame = to_frame(group)
                path = Path(directory) / batch_file_name(flush, key)
                frame.to_parquet(path, index=False)
                run_id = self._upload(key, path, past_day=key.day < today)
                metrics = [
                    Metric(name, value, flush.created_ms, flush.id)
                    for name, value in summary_metrics(frame).items()
                ]
                self._client.log_batch(run_id, metrics=metrics)
                shipped += len(frame)
        return shipped


def group_by_run(requests: list[dict]) -> dict[RunKey, list[dict]]:
    groups: dict[RunKey, list[dict]] = defaultdict(list)
    for request in requests:
        groups[run_key(request)].append(request)
    return groups
