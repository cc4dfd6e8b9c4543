"""Versions made the way ``credit-risk train`` makes them, for the integrity tests, without
training again: a run in a given experiment with its held-out rows and their probabilities,
the model logged by training's own ``_log_model``, the integrity record written by training's
own ``record_integrity``, registered by ``training.registry.register``.

What the held-out rows say the model answered is up to the test: logging probabilities that
other code would have computed, and recording them the way training records them, is what a
version trained with other code looks like (and what the trainer could do)."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from model.identity import HELD_OUT_ARTIFACT, REGISTERED_MODEL_NAME
from model.integrity import MANIFEST_DIGEST_TAG
from training import registry
from training.train import _log_model, record_integrity


def log_version(
    client: MlflowClient,
    experiment_id: str,
    pipeline,
    threshold: float,
    data,
    held_out: pd.DataFrame,
    tags: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Register a version of ``pipeline`` logged as training logs it, in ``experiment_id``;
    ``held_out`` is the held-out frame as training logs it (features, label, ``probability``).
    Returns ``(version, run_id)``."""
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        with mlflow.start_run(experiment_id=experiment_id) as run:
            with tempfile.TemporaryDirectory() as directory:
                path = Path(directory) / Path(HELD_OUT_ARTIFACT).name
                held_out.to_parquet(path)
                mlflow.log_artifact(str(path), str(Path(HELD_OUT_ARTIFACT).parent))
            info = _log_model(pipeline, threshold, data, data.features.head(5))
            digest = record_integrity(client, run.info.run_id, info.model_id)
        # A local store resolves the logged model through the current tracking URI. The digest's
        # copy on the version, as training writes it.
        tags = {**(tags or {}), MANIFEST_DIGEST_TAG: digest}
        version = registry.register(client, info, run.info.run_id, tags=tags, description="integrity test")
    finally:
        mlflow.set_tracking_uri(None)
    return version.version, run.info.run_id


class Tripwire:
    """Unpickling this touches ``marker``: proof, if the file appears, that something unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def tripwire_of_size(marker: Path, size: int) -> bytes:
    """A pickle that touches ``marker`` when loaded, padded after its STOP opcode to ``size``
    bytes (the unpickler stops reading there), so that only its content differs."""
    data = pickle.dumps(Tripwire(marker))
    assert len(data) <= size, (len(data), size)
    return data + b"\0" * (size - len(data))


def overwrite_stored_file(client: MlflowClient, version: str, relative: str, content: bytes) -> None:
    """Replace the file ``relative`` (e.g. ``artifacts/pipeline.joblib``) of ``version``'s
    stored model with ``content``, through MLflow's own artifact client (the artifact proxy
    for a tracking server)."""
    location = client.get_model_version_download_uri(REGISTERED_MODEL_NAME, version)
    repository = get_artifact_repository(location, tracking_uri=client.tracking_uri)
    folder = str(Path(relative).parent) if "/" in relative else None
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / Path(relative).name
        path.write_bytes(content)
        repository.log_artifact(str(path), folder)


def read_stored_file(client: MlflowClient, version: str, relative: str) -> bytes:
    location = client.get_model_version_download_uri(REGISTERED_MODEL_NAME, version)
    with tempfile.TemporaryDirectory() as directory:
        repository = get_artifact_repository(location, tracking_uri=client.tracking_uri)
        return Path(repository.download_artifacts(relative, directory)).read_bytes()
