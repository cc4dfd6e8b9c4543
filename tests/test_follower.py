"""``serving.follower.RegistryFollower`` against a real MLflow registry on a local store: what
readiness says while a refused version is tried again and nothing is served. The loading
itself is a plain function here; serving's real loader is in tests/integration/test_integrity.py."""

from __future__ import annotations

import asyncio

from mlflow.tracking import MlflowClient

from model.identity import PRODUCTION_MODEL_URI, PRODUCTION_STAGE, REGISTERED_MODEL_NAME
from model.verified import VersionRefused
from serving.follower import RegistryFollower

REFUSAL = "model/artifacts/pipeline.joblib: content differs from the integrity record"


def test_a_retry_of_a_refused_version_keeps_the_refusal_in_the_status(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    client.create_registered_model(REGISTERED_MODEL_NAME)
    version = client.create_model_version(REGISTERED_MODEL_NAME, source=str(tmp_path), run_id=None).version
    version = str(version)  # a local store gives an int
    client.transition_model_version_stage(REGISTERED_MODEL_NAME, version, PRODUCTION_STAGE)

    statuses: list[str] = []
    swapped: list[object] = []

    def load(name: str, loaded_version: str) -> object:
        statuses.append(follower.status)  # what readiness answers while this attempt runs
        if len(statuses) == 1:
            raise VersionRefused("integrity", REFUSAL)
        return (name, loaded_version)

    follower = RegistryFollower(
        PRODUCTION_MODEL_URI, alias=None, poll_interval_s=0, retry_min_s=0, retry_max_s=0,
        load=load, swap=swapped.append,
    )  # fmt: skip
    asyncio.run(follower.step())
    refused = follower.status
    assert refused.startswith(f"version {version} of {REGISTERED_MODEL_NAME} failed to load (attempt 1")
    assert "nothing is served" in refused and REFUSAL in refused

    asyncio.run(follower.step())
    first, retry = statuses  # two attempts, in two steps
    assert first == f"loading {REGISTERED_MODEL_NAME} version {version} ({PRODUCTION_MODEL_URI})"
    assert retry == (
        f"{first}, attempt 2; nothing is served: attempt 1 failed: refused (integrity): {REFUSAL}"
    )
    assert swapped == [(REGISTERED_MODEL_NAME, version)]
    assert follower.status == f"serving {REGISTERED_MODEL_NAME} version {version} ({PRODUCTION_MODEL_URI})"
