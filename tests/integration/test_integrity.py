"""Serving loads only what was gated, and only if it answers as gated: real MLflow (artifact
proxy), real ``credit-risk train``, ``promote``, ``rollback``, ``status`` and ``serve``.

One tracking server and one real training for the module. v1 is ``credit-risk train`` on the
sample (promoted as the first); v2, v3 and v4 are v1's model logged again as training logs it
(``tests/integrity_helpers.py``: training's own ``_log_model`` and ``record_integrity``), each
in a run of its own in the training experiment, so each has its own stored files:

- v2 goes through the gate, against v1 (both loaded through ``model.verified``): promoted;
- v3 is the tampered one: its ``artifacts/pipeline.joblib`` is replaced through the artifact
  proxy by a pickle of the same size that would touch a marker file if anything unpickled it;
- v4 logged held-out probabilities that this code does not compute (what a version trained
  with other code looks like), recorded the way training records them, as the trainer could.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from model import verified
from model.identity import HELD_OUT_ARTIFACT, PRODUCTION_STAGE, REGISTERED_MODEL_NAME
from model.integrity import MANIFEST_ARTIFACT, MANIFEST_DIGEST_TAG
from model.schema import FEATURES, TARGET
from serving.settings import MODEL_NAME
from tests.helpers import credit_risk, mlflow_tracking_server, one_error_line
from tests.integration.test_following import Load, Server
from tests.integration.test_promotion import cli, snapshot
from tests.integration.test_serving import v2_body
from tests.integrity_helpers import log_version, overwrite_stored_file, read_stored_file, tripwire_of_size
from training import gate, registry, split
from training.data import load_training_data

pytestmark = pytest.mark.integration

NAME = REGISTERED_MODEL_NAME
PIPELINE = "artifacts/pipeline.joblib"
TAMPERED_FILE = f"model/{PIPELINE}"
WITHIN_S = 90  # for a server to react to a registry change on a loaded machine
COPIED_TAGS = ("dataset_hash", "training_config_hash", "test_roc_auc")


@dataclass
class Registry:
    uri: str
    client: MlflowClient
    marker: Path  # appears if the tampered pickle is ever unpickled
    pipeline_bytes: bytes  # v3's stored pipeline before it was tampered with
    tampered_bytes: bytes
    other_code: tuple[int, int, float]  # v4: rows that differ, rows, largest difference
    train_output: str

    def tamper(self) -> None:
        overwrite_stored_file(self.client, "3", PIPELINE, self.tampered_bytes)

    def repair(self) -> None:
        overwrite_stored_file(self.client, "3", PIPELINE, self.pipeline_bytes)

    def move_stage_by_hand(self, version: str) -> None:
        """What a click in the MLflow UI does: the stage, no record, no check."""
        self.client.transition_model_version_stage(
            NAME, version, PRODUCTION_STAGE, archive_existing_versions=True
        )


def _held_out(client: MlflowClient, run_id: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as directory:
        return pd.read_parquet(client.download_artifacts(run_id, HELD_OUT_ARTIFACT, directory))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, sample_path):
    root = tmp_path_factory.mktemp("integrity")
    with mlflow_tracking_server(root) as uri:
        trained = credit_risk(
            "train", "--data", str(sample_path), "--set", "max_iter=20", "--cv-folds", "2", tracking_uri=uri
        )
        assert trained.returncode == 0, trained.stdout + trained.stderr
        client = MlflowClient(uri)
        first = client.get_model_version(NAME, "1")
        experiment = client.get_run(first.run_id).info.experiment_id
        held_out = _held_out(client, first.run_id)
        tags = {
            key: value for key, value in first.tags.items() if key in COPIED_TAGS or key.startswith("split.")
        }
        with verified.verified_version(NAME, "1", client=client) as checked:
            scorer = checked.model.scorer
        data = load_training_data(sample_path)

        def again(frame: pd.DataFrame) -> str:
            version, _ = log_version(client, experiment, scorer.pipeline, scorer.threshold, data, frame, tags)
            return version

        other = held_out.copy()
        probability = other["probability"].to_numpy().copy()
        probability[5] = np.nextafter(probability[5], 1.0)
        probability[17] = probability[17] * 0.9
        other["probability"] = probability
        assert [again(held_out), again(held_out), again(other)] == ["2", "3", "4"]
        features, target = held_out[list(FEATURES)], held_out[TARGET]
        candidate = gate.HeldOut(
            features, target, split.row_digests(features, target), held_out["probability"].to_numpy()
        )
        second = client.get_model_version(NAME, "2")
        mlflow.set_tracking_uri(uri)  # the gate loads through MLflow's current registry
        try:
            gate.run(client, "2", second.run_id, candidate, actor="integrity-test")
        finally:
            mlflow.set_tracking_uri(None)
        gaps = np.abs(probability - held_out["probability"].to_numpy())
        original = read_stored_file(client, "3", PIPELINE)
        marker = root / "unpickled"
        state = Registry(
            uri,
            client,
            marker,
            original,
            tripwire_of_size(marker, len(original)),
            (int((gaps > 0).sum()), len(gaps), float(gaps.max())),
            trained.stdout,
        )
        state.tamper()
        yield state


@pytest.fixture
def operator(stack, monkeypatch):
    """The operator's commands, in this process, pointed at this module's tracking server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.uri)
    monkeypatch.delenv("CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(stack.uri)
    yield stack.client
    mlflow.set_tracking_uri(None)


def _refused_metric(server: Server, version: str, reason: str) -> float:
    wanted = f'credit_risk_model_refused_total{{model="{MODEL_NAME}",reason="{reason}",version="{version}"}}'
    lines = [line for line in server.metrics().splitlines() if line.startswith(wanted)]
    return float(lines[0].split()[-1]) if lines else 0.0


def _wait_for_status(server: Server, text: str) -> httpx.Response:
    deadline = time.monotonic() + WITHIN_S
    while text not in (answer := server.ready()).json()["status"]:
        assert time.monotonic() < deadline, f"no {text!r} in readiness after {WITHIN_S} s: {answer.text}"
        time.sleep(0.3)
    return answer


def test_training_records_digests_and_the_gate_promotes_an_honest_candidate(stack):
    client = stack.client
    first = client.get_model_version(NAME, "1")
    run = client.get_run(first.run_id)
    with tempfile.TemporaryDirectory() as directory:
        stored = Path(client.download_artifacts(first.run_id, MANIFEST_ARTIFACT, directory)).read_bytes()
    digest = hashlib.sha256(stored).hexdigest()  # by hand, not by the module
    assert run.data.tags[MANIFEST_DIGEST_TAG] == first.tags[MANIFEST_DIGEST_TAG] == digest
    assert f"manifest sha256 {digest}" in stack.train_output
    # v2, checked and compared with a checked v1 on rows neither trained on, is promoted.
    second = client.get_model_version(NAME, "2")
    assert (second.tags["gate.outcome"], second.tags["gate.comparable"]) == ("passed", "true"), second.tags
    assert registry.production_version(client).version == "2"


def test_promote_refuses_a_tampered_version_naming_the_file_and_changes_nothing(operator, stack, capsys):
    before = snapshot(operator)
    code, out, err = cli(capsys, "promote", "--version", "3", "--reason", "try the tampered one")
    assert code == 1, out + err
    line = one_error_line(err)
    assert line.startswith(
        f"error: v3 cannot be served, so Production is left as it is: refused (integrity): "
        f"{TAMPERED_FILE}: content differs (sha256 "
    ), line
    assert "Promoted" not in out
    assert snapshot(operator) == before
    assert not stack.marker.exists(), "the tampered pickle was unpickled"


def test_rollback_refuses_a_target_trained_with_other_code_with_the_difference(operator, stack, capsys):
    registry.promote(operator, "4", actor="set-up", reason="by the API, unchecked", source="api")
    registry.promote(operator, "2", actor="set-up", reason="back", source="api")
    before = snapshot(operator)
    code, out, err = cli(capsys, "rollback", "--reason", "back to v4")
    assert code == 1, out + err
    differ, rows, worst = stack.other_code
    assert (differ, rows) == (2, len(_held_out(operator, operator.get_model_version(NAME, "4").run_id)))
    line = one_error_line(err)
    assert line.startswith(
        "error: v4 cannot be served, so Production is left as it is: refused (answers): scored by this "
        f"code it answers {differ} of {rows} logged held-out rows otherwise than at training "
        f"(largest difference {worst:.3g})"
    ), line
    assert snapshot(operator) == before


def test_a_version_trained_before_digests_is_refused_unless_listed(operator, stack, capsys, monkeypatch):
    run_id = operator.get_model_version(NAME, "1").run_id
    digest = operator.get_run(run_id).data.tags[MANIFEST_DIGEST_TAG]
    operator.delete_tag(run_id, MANIFEST_DIGEST_TAG)  # what a run from before digests looks like
    try:
        before = snapshot(operator)
        code, _, err = cli(capsys, "promote", "--version", "1", "--reason", "an old one")
        assert code == 1
        line = one_error_line(err)
        assert (
            f"refused (integrity): no integrity record: its run {run_id} has no {MANIFEST_DIGEST_TAG}" in line
        )
        assert "retrain it" in line and snapshot(operator) == before

        monkeypatch.setenv("CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS", "1")
        code, out, err = cli(capsys, "promote", "--version", "1", "--reason", "an old one, knowingly")
        assert code == 0, err
        assert "files NOT verified: version 1 has no integrity record" in out
        assert registry.production_version(operator).version == "1"
    finally:
        operator.set_tag(run_id, MANIFEST_DIGEST_TAG, digest)
        registry.promote(operator, "2", actor="set-up", reason="back", source="api")


def test_serving_never_loads_a_tampered_version_nor_one_that_answers_otherwise(
    stack, tmp_path, capsys, sample_path
):
    """A stage moved by hand to the tampered v3: the running server keeps answering with v2 and
    says why; a server started cold with only v3 in Production stays alive and not ready, saying
    why; once v3's file is put back, both load it. Then v4 (other answers) is refused too."""
    fast = {
        "CREDIT_RISK_REGISTRY_POLL_S": "0.5",
        "CREDIT_RISK_LOAD_RETRY_MIN_S": "1",
        "CREDIT_RISK_LOAD_RETRY_MAX_S": "2",
    }
    assert registry.production_version(stack.client).version == "2"
    running = Server(stack.uri, tmp_path / "running", **fast)
    cold = None
    body = v2_body(load_training_data(sample_path).features.head(1))
    try:
        running.wait_serving("2")
        assert "files match integrity record" in running.log()
        with Load(running, body, clients=2) as load:
            stack.move_stage_by_hand("3")
            ready = _wait_for_status(running, f"refused (integrity): {TAMPERED_FILE}: content differs")
            assert ready.status_code == 200 and ready.json()["version"] == "2"
            assert "version 3 of credit-risk-model failed to load" in ready.json()["status"]
            assert _refused_metric(running, "3", "integrity") >= 1

            cold = Server(stack.uri, tmp_path / "cold", **fast)  # alive (Server waits for that)
            ready = _wait_for_status(cold, f"refused (integrity): {TAMPERED_FILE}: content differs")
            assert ready.status_code == 503 and ready.json()["version"] is None
            assert "nothing is served" in ready.json()["status"]
            assert _refused_metric(cold, "3", "integrity") >= 1

            with pytest.MonkeyPatch.context() as environment:
                environment.setenv("MLFLOW_TRACKING_URI", stack.uri)
                code, text, err = cli(capsys, "status", "--server", running.url, "--server", cold.url)
            assert code == 0, err
            lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  http://")}
            assert (
                "serving v2 (Production is v3), ready (version 3 of credit-risk-model failed"
                in lines[running.url]
            )
            assert TAMPERED_FILE in lines[running.url] and TAMPERED_FILE in lines[cold.url]
            assert "serving no model, NOT ready (ready answered 503" in lines[cold.url]
            digest = stack.client.get_model_version(NAME, "3").tags[MANIFEST_DIGEST_TAG]
            assert f"  integrity        manifest sha256 {digest[:12]} (copy of the training run's" in text
            time.sleep(3)  # a few retries: each is refused again
        answered = {(status, version) for _, status, version, _ in load.answers}
        assert answered == {(200, "2")}, [a for a in load.answers if a[1:3] != (200, "2")][:5]
        assert _refused_metric(running, "3", "integrity") >= 2  # retried, refused again
        assert not stack.marker.exists(), "the tampered pickle was unpickled"

        stack.repair()  # the same version, its file put back: it loads on the next retry
        running.wait_serving("3", timeout=WITHIN_S)
        cold.wait_serving("3", timeout=WITHIN_S)

        stack.move_stage_by_hand("4")
        differ, rows, worst = stack.other_code
        expected = (
            f"refused (answers): scored by this code it answers {differ} of {rows} logged held-out rows "
            f"otherwise than at training (largest difference {worst:.3g})"
        )
        ready = _wait_for_status(running, expected)
        assert ready.status_code == 200 and ready.json()["version"] == "3"
        assert _refused_metric(running, "4", "answers") >= 1
        assert (
            httpx.post(f"{running.url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=30).json()[
                "model_version"
            ]
            == "3"
        )
    finally:
        for server in (running, cold):
            if server is not None:
                server.stop()
        stack.tamper()
        registry.promote(stack.client, "2", actor="set-up", reason="back", source="api")
    assert re.search(r"version 3: \d+ files match integrity record \w+, \d+ held-out rows", running.log())
