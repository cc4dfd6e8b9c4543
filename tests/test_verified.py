"""``model.verified`` against real MLflow on a local store (no server: the artifact proxy, the
follower and the commands are in ``tests/integration/test_integrity.py``): what is loaded is
what training recorded, byte for byte, and answers as training logged it, bit for bit; every
refusal names the file, the record or the difference, and nothing is unpickled before.

Each version is logged by training's own ``_log_model`` and recorded by its own
``record_integrity`` (``tests/integrity_helpers.py``); the model is fitted once per module."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from model import verified
from model.identity import HELD_OUT_ARTIFACT, REGISTERED_MODEL_NAME
from model.integrity import MANIFEST_ARTIFACT, MANIFEST_DIGEST_TAG, FileDigest, Manifest
from model.schema import FEATURES, TARGET
from tests.integrity_helpers import log_version, overwrite_stored_file, tripwire_of_size
from training.data import load_training_data
from training.pipeline import build_pipeline, classifier_params
from training.settings import DEFAULT_EXPERIMENT, TrainingSettings

NAME = REGISTERED_MODEL_NAME
HELD_OUT_ROWS = 1000


class Store:
    """A local MLflow store with the training experiment, a fitted pipeline and its held-out
    frame; ``version()`` logs and registers a new version of it as training would."""

    def __init__(self, root: Path, sample_path: Path):
        self.client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        self.root = root
        self.training = self.experiment(DEFAULT_EXPERIMENT)
        self.data = load_training_data(sample_path)
        self.pipeline = build_pipeline(classifier_params({"max_iter": 20}), seed=42)
        self.pipeline.fit(self.data.features, self.data.target)
        rows = self.data.features.tail(HELD_OUT_ROWS)
        self.held_out = rows.assign(
            **{
                TARGET: self.data.target.tail(HELD_OUT_ROWS),
                "probability": self.pipeline.predict_proba(rows)[:, 1],
            }
        )

    def experiment(self, name: str) -> str:
        # Artifacts in the test's folder, never ./mlruns.
        return self.client.create_experiment(name, artifact_location=str(self.root / "artifacts" / name))

    def version(
        self, experiment_id: str | None = None, held_out: pd.DataFrame | None = None
    ) -> tuple[str, str]:
        frame = self.held_out if held_out is None else held_out
        return log_version(self.client, experiment_id or self.training, self.pipeline, 0.3, self.data, frame)

    def load(self, version: str, **settings) -> verified.VerifiedVersion:
        return verified.load_version(
            NAME, version, client=self.client, settings=verified.VerificationSettings(**settings)
        )

    def stored(self, version: str) -> Path:
        """The version's stored model folder (a local store keeps plain files)."""
        return Path(self.client.get_model_version_download_uri(NAME, version))


@pytest.fixture(scope="module")
def store(tmp_path_factory, sample_path):
    return Store(tmp_path_factory.mktemp("verified-store"), sample_path)


def refusal(store: Store, version: str, **settings) -> verified.VersionRefused:
    with pytest.raises(verified.VersionRefused) as raised:
        store.load(version, **settings)
    assert "\n" not in str(raised.value)
    return raised.value


def test_the_training_experiment_is_the_one_training_uses():
    """Both read ``model.identity``'s name and variable; a settings class could still drift."""
    assert verified.VerificationSettings().training_experiment == TrainingSettings().experiment
    assert (
        TrainingSettings.model_fields["experiment"].validation_alias
        == verified.VerificationSettings.model_fields["training_experiment"].validation_alias
    )


def test_a_recorded_version_loads_from_its_verified_folder_and_answers_as_logged(store):
    version, run_id = store.version()
    run = store.client.get_run(run_id)
    with tempfile.TemporaryDirectory() as directory:
        stored = Path(store.client.download_artifacts(run_id, MANIFEST_ARTIFACT, directory)).read_bytes()
    # The run's tag is SHA-256 of the stored manifest, computed here without the module.
    assert run.data.tags[MANIFEST_DIGEST_TAG] == hashlib.sha256(stored).hexdigest()
    listed = json.loads(stored)["files"]
    # Every stored file of the model, hashed here from the store itself, and the held-out rows.
    by_hand = {
        f"model/{path.relative_to(store.stored(version)).as_posix()}": hashlib.sha256(
            path.read_bytes()
        ).hexdigest()
        for path in store.stored(version).rglob("*")
        if path.is_file()
    }
    assert {path: entry["sha256"] for path, entry in listed.items() if path.startswith("model/")} == by_hand
    assert {"model/MLmodel", "model/python_model.pkl", "model/artifacts/pipeline.joblib"} <= set(listed)
    assert f"run/{HELD_OUT_ARTIFACT}" in listed and "model/registered_model_meta" not in listed

    checked = store.load(version)
    try:
        assert checked.manifest.digest == run.data.tags[MANIFEST_DIGEST_TAG]
        assert checked.model.uri == str(checked.folder / "model")  # loaded from the folder checked
        assert checked.answers.rows == HELD_OUT_ROWS
        expected = store.pipeline.predict_proba(store.held_out[list(FEATURES)])[:, 1]
        assert checked.answers.probability.tobytes() == expected.tobytes()
        assert checked.description.startswith(f"{len(listed)} files match integrity record ")
        assert any(entry.startswith(str(checked.root)) for entry in sys.path)  # its logged code
    finally:
        checked.close()
    assert not checked.root.exists()
    assert not any(entry.startswith(str(checked.root)) for entry in sys.path)


@pytest.mark.parametrize(
    ("change", "path", "problem"),
    [
        ("tamper", "model/artifacts/pipeline.joblib", "content differs"),
        ("extra", "model/code/model/sitecustomize.py", "extra"),
        ("missing", f"run/{HELD_OUT_ARTIFACT}", "missing"),
    ],
)
def test_a_changed_file_is_refused_by_name_before_anything_is_unpickled(
    store, tmp_path, change, path, problem
):
    version, run_id = store.version()
    marker = tmp_path / "unpickled"
    stored = store.stored(version)
    if change == "tamper":
        size = (stored / "artifacts" / "pipeline.joblib").stat().st_size
        overwrite_stored_file(
            store.client, version, "artifacts/pipeline.joblib", tripwire_of_size(marker, size)
        )
    elif change == "extra":
        overwrite_stored_file(store.client, version, "code/model/sitecustomize.py", b"import os\n")
    else:
        run_artifacts = Path(store.client.get_run(run_id).info.artifact_uri)
        (run_artifacts / HELD_OUT_ARTIFACT).unlink()
    before = list(sys.path)
    refused = refusal(store, version)
    assert refused.reason == verified.INTEGRITY
    assert str(refused).startswith(f"refused (integrity): {path}: {problem}"), refused
    assert f"of run {run_id}" in str(refused)
    assert not marker.exists(), "the tampered pickle was unpickled"
    assert sys.path == before  # nothing of the refused version was put on the path


def test_a_run_outside_the_training_experiment_is_refused(store):
    """The operator may register a version from any run it can read; only training writes runs
    in the training experiment."""
    elsewhere = store.experiment("somewhere-else")
    version, run_id = store.version(experiment_id=elsewhere)
    refused = refusal(store, version)
    assert refused.reason == verified.INTEGRITY
    assert f"its run {run_id} is in experiment {elsewhere}, not in the training experiment" in str(refused)
    # The same run is trusted when the settings name its experiment the training one.
    store.load(version, training_experiment="somewhere-else").close()


def test_a_version_trained_before_digests_is_refused_unless_listed(store):
    version, run_id = store.version()
    store.client.delete_tag(run_id, MANIFEST_DIGEST_TAG)
    refused = refusal(store, version)
    assert refused.reason == verified.INTEGRITY
    assert "no integrity record" in str(refused) and "retrain it" in str(refused)
    assert f"list version {version} in CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS" in str(refused)
    refusal(store, version, allow_unverified_versions=f"{int(version) + 1}")  # another version listed

    checked = store.load(version, allow_unverified_versions=f"99, {version}")
    try:
        assert checked.manifest is None
        assert checked.description.startswith(
            f"files NOT verified: version {version} has no integrity record"
        )
        assert checked.answers.rows == HELD_OUT_ROWS  # the answers are checked all the same
    finally:
        checked.close()


def test_a_manifest_changed_after_training_is_refused(store):
    version, run_id = store.version()
    with tempfile.TemporaryDirectory() as directory:
        stored = Path(store.client.download_artifacts(run_id, MANIFEST_ARTIFACT, directory)).read_text()
    files = dict(Manifest.from_json(stored).files)
    files["model/artifacts/pipeline.joblib"] = FileDigest("0" * 64, 1)  # what a tamperer would record
    store.client.log_text(run_id, Manifest(files).to_json(), MANIFEST_ARTIFACT)
    refused = refusal(store, version)
    assert refused.reason == verified.INTEGRITY
    assert f"the integrity record of run {run_id} ({MANIFEST_ARTIFACT})" in str(refused)
    assert "the stored manifest was changed after training" in str(refused)


def test_answers_other_code_would_give_are_refused_with_the_difference(store):
    """What a version trained with other code looks like: its logged probabilities are not
    what this code computes, whichever way they differ (one bit, or a lot)."""
    other = store.held_out.copy()
    probability = other["probability"].to_numpy().copy()
    probability[3] = np.nextafter(probability[3], 1.0)
    probability[7] = np.nextafter(probability[7], 0.0)
    probability[11] += 0.0123
    other["probability"] = probability
    version, _ = store.version(held_out=other)
    refused = refusal(store, version)
    assert refused.reason == verified.ANSWERS
    worst = abs(probability[11] - store.held_out["probability"].iloc[11])
    assert f"answers 3 of {HELD_OUT_ROWS} logged held-out rows otherwise than at training" in str(refused)
    assert f"(largest difference {worst:.3g})" in str(refused)
    assert "retrain it with this code, or serve it with the image it was trained with" in str(refused)


def test_held_out_rows_without_the_features_are_refused_as_uncheckable(store):
    checked = store.load(store.version()[0])
    try:
        with pytest.raises(verified.VersionRefused, match=r"lack the columns \['age'\]") as raised:
            verified.check_answers(checked.model, store.held_out.drop(columns=["age"]))
        assert raised.value.reason == verified.ANSWERS
    finally:
        checked.close()


def test_settings_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "elsewhere")
    monkeypatch.setenv("CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS", " 3, 12 ,")
    settings = verified.VerificationSettings()
    assert settings.training_experiment == "elsewhere"
    assert [v for v in ("1", "3", "12", "123") if settings.allows_unverified(v)] == ["3", "12"]
    monkeypatch.delenv("CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    assert not verified.VerificationSettings().allows_unverified("1")  # none by default
    assert verified.VerificationSettings().training_experiment == DEFAULT_EXPERIMENT


@pytest.mark.parametrize("value", ["all", "1;2", "0", "-3", "v3"])
def test_a_bad_unverified_list_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS", value)
    with pytest.raises(ValidationError) as raised:
        verified.VerificationSettings()
    (error,) = raised.value.errors()
    assert error["loc"] == ("CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS",) and error["input"] == value
    assert "must be registry version numbers separated by commas" in error["msg"]


def test_a_version_whose_logged_code_differs_from_the_running_code_says_so(store, tmp_path, monkeypatch):
    """The running ``model/`` scores every version; when the version's logged code is not that
    code but answers the same, it loads, and its description names the files that differ."""
    version, _ = store.version()
    checked = store.load(version)
    try:
        assert checked.code_differs == ()  # logged from this very code
        assert "differs" not in checked.description
    finally:
        checked.close()

    running = tmp_path / "model"
    running.mkdir()
    for path in verified.RUNNING_CODE.glob("*.py"):
        (running / path.name).write_bytes(path.read_bytes())
    (running / "forest.py").write_bytes((running / "forest.py").read_bytes() + b"\n# another build\n")
    (running / "new_module.py").write_text("")
    monkeypatch.setattr(verified, "RUNNING_CODE", running)
    checked = store.load(version)
    try:
        assert checked.code_differs == ("forest.py", "new_module.py")
        assert checked.description.endswith(
            "; scored by this image's model/ code, which differs from the version's logged code in "
            "2 file(s): forest.py, new_module.py"
        )
    finally:
        checked.close()


def test_code_differences_by_hand(tmp_path):
    logged, running = tmp_path / "logged", tmp_path / "running"
    for root in (logged, running):
        (root / "sub").mkdir(parents=True)
        (root / "same.py").write_text("x = 1\n")
    (logged / "sub" / "changed.py").write_text("a\n")
    (running / "sub" / "changed.py").write_text("b\n")
    (logged / "gone.py").write_text("")
    (running / "notes.txt").write_text("not code")
    assert verified.code_differences(logged, running) == ("gone.py", "sub/changed.py")
    assert verified.code_differences(tmp_path / "nothing", running) == ("same.py", "sub/changed.py")
