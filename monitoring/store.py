"""Where monitoring keeps things in MLflow: its experiments, and each version's reference
profile among its training run's artifacts.

A profile is two artifacts of the training run, ``monitoring/reference.json`` and
``monitoring/reference_values.parquet`` (``training.profile`` says what they hold).
``load_profile`` returns None for a run without them: a version trained before profiles
existed, for which ``reconstruct_from_run`` computes one from the run's training sample and
held-out rows. Reconstruction needs the model's probabilities on the sample; the caller passes
a scoring function (``model.scoring.load(uri).score_frame``, so the version is scored as
serving scores it), and it is not written back to the training run: a monitor may read runs
and write its own, nothing else.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from model.identity import HELD_OUT_ARTIFACT, REFERENCE_SAMPLE_ARTIFACT, THRESHOLD_METRIC
from model.schema import FEATURES
from training.profile import ARTIFACT_DIR, PROFILE_FILE, ReferenceProfile, reconstruct_profile

logger = logging.getLogger(__name__)

PROFILE_DIR = ARTIFACT_DIR


class DeletedExperiment(RuntimeError):
    """An experiment this code writes to was deleted, and is not restored behind anyone's back."""


def experiment_id(client: MlflowClient, name: str, *, restore_deleted: bool) -> str:
    """The id of experiment ``name``, created if absent (also when another process creates it
    at the same moment). A deleted one is restored when ``restore_deleted``, else refused:
    MLflow only soft-deletes, so its name cannot be created again."""
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == LifecycleStage.DELETED:
        if not restore_deleted:
            raise DeletedExperiment(
                f"experiment '{name}' (id {found.experiment_id}) is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {found.experiment_id}) to use it again"
            )
        logger.warning(f"experiment '{name}' ({found.experiment_id}) was deleted: restoring it")
        client.restore_experiment(found.experiment_id)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as error:  # created by someone else meanwhile
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def log_profile(client: MlflowClient, run_id: str, profile: ReferenceProfile) -> None:
    """Store ``profile`` with run ``run_id`` (at training: the version's run)."""
    with tempfile.TemporaryDirectory() as directory:
        for path in profile.save(Path(directory)):
            client.log_artifact(run_id, str(path), PROFILE_DIR)


def _has_artifact(client: MlflowClient, run_id: str, path: str) -> bool:
    folder = path.rpartition("/")[0]
    return any(info.path == path for info in client.list_artifacts(run_id, folder or None))


def load_profile(client: MlflowClient, run_id: str) -> ReferenceProfile | None:
    """The profile stored with run ``run_id``, or None when it has none."""
    if not _has_artifact(client, run_id, f"{PROFILE_DIR}/{PROFILE_FILE}"):
        return None
    with tempfile.TemporaryDirectory() as directory:
        return ReferenceProfile.load(Path(client.download_artifacts(run_id, PROFILE_DIR, directory)))


def reconstruct_from_run(
    client: MlflowClient,
    run_id: str,
    score: Callable[[pd.DataFrame], np.ndarray],
    threshold: float | None = None,
) -> ReferenceProfile:
    """A profile for a run that has none, from its ``reference/training_sample.parquet`` and
    ``evaluation/held_out.parquet``; ``score`` gives the version's probabilities for a frame
    of features, ``threshold`` defaults to the run's ``threshold`` metric."""
    if threshold is None:
        metrics = client.get_run(run_id).data.metrics
        if THRESHOLD_METRIC not in metrics:
            raise ValueError(f"run {run_id} has no '{THRESHOLD_METRIC}' metric; pass the threshold")
        threshold = metrics[THRESHOLD_METRIC]
    with tempfile.TemporaryDirectory() as directory:
        frames = {}
        for artifact in (REFERENCE_SAMPLE_ARTIFACT, HELD_OUT_ARTIFACT):
            if not _has_artifact(client, run_id, artifact):
                raise ValueError(f"run {run_id} has no {artifact}: no profile can be reconstructed")
            frames[artifact] = pd.read_parquet(client.download_artifacts(run_id, artifact, directory))
    sample = frames[REFERENCE_SAMPLE_ARTIFACT]
    return reconstruct_profile(
        sample,
        score(sample[list(FEATURES)]),
        frames[HELD_OUT_ARTIFACT],
        threshold,
        provenance={"run_id": run_id, "artifacts": [REFERENCE_SAMPLE_ARTIFACT, HELD_OUT_ARTIFACT]},
    )
