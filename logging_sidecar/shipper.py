"""Writing batches into MLflow: experiment ``credit-risk-inference``, one run per model
version and UTC day, each batch one Parquet artifact under ``records/`` plus its summary
metrics. Names, steps and timestamps come from the planned flush, so a retry overwrites."""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from logging_sidecar.records import RunKey, run_key, summary_metrics, to_frame
from logging_sidecar.state import Flush, State

RUN_KEY_TAG = "inference.run_key"
RECORDS_DIR = "records"


def batch_file_name(flush: Flush) -> str:
    return f"batch-{flush.id:010d}-{flush.digest}.parquet"


class Shipper:
    def __init__(self, experiment: str, state: State, client: MlflowClient | None = None):
        self._experiment_name = experiment
        self._state = state
        self._client = client or MlflowClient()
        self._experiment_id: str | None = None

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self._client.get_experiment_by_name(self._experiment_name)
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

    def _run(self, key: RunKey) -> str:
        if run_id := self._state.run_id(key.text):
            return run_id
        # A crash between creating the run and remembering it must not create a second one.
        found = self._client.search_runs(
            [self._experiment()], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key.text}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run = self._client.create_run(
                self._experiment(),
                run_name=f"{key.model_name}-v{key.model_version}-{key.day}",
                tags={
                    RUN_KEY_TAG: key.text,
                    "model_name": key.model_name,
                    "model_version": key.model_version,
                    "dataset_hash": key.dataset_hash,
                    "day": key.day,
                },
            )
            run_id = run.info.run_id
            self._client.set_terminated(run_id, "FINISHED")
        self._state.remember_run(key.text, run_id)
        return run_id

    def ship(self, flush: Flush, requests: list[dict]) -> int:
        """Send one flush; returns the number of records shipped."""
        by_run: dict[RunKey, list[dict]] = defaultdict(list)
        for request in requests:
            by_run[run_key(request)].append(request)
        shipped = 0
        with tempfile.TemporaryDirectory() as directory:
            for key, group in by_run.items():
                frame = to_frame(group)
                path = Path(directory) / batch_file_name(flush)
                frame.to_parquet(path, index=False)
                run_id = self._run(key)
                self._client.log_artifact(run_id, str(path), RECORDS_DIR)
                metrics = [
                    Metric(name, value, flush.created_ms, flush.id)
                    for name, value in summary_metrics(frame).items()
                ]
                self._client.log_batch(run_id, metrics=metrics)
                shipped += len(frame)
        return shipped
