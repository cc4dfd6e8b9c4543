"""``credit-risk monitor`` and ``credit-risk outcomes add`` end to end on a small stack: a real
MLflow server, a version trained by ``credit-risk train`` (which now logs its profile),
records shipped by the sidecar's ``Shipper`` exactly as the sidecar ships them (Parquet
batches in per-day runs), outcomes ingested by the command; then one window as JSON, checked
against an independent calculation, and the service (``--every``) through an MLflow SIGKILL
and restart.

The last test kills and restarts this module's MLflow server; it runs last in the module.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import roc_auc_score

from logging_sidecar.shipper import Shipper
from logging_sidecar.state import State
from model import scoring
from model.identity import (
    DATASET_HASH,
    HELD_OUT_ARTIFACT,
    REFERENCE_SAMPLE_ARTIFACT,
    REGISTERED_MODEL_NAME,
    TEST_ROC_AUC_TAG,
    THRESHOLD_METRIC,
    version_uri,
)
from model.schema import FEATURES, TARGET
from monitoring.settings import MONITORING_EXPERIMENT, OUTCOMES_EXPERIMENT
from monitoring.store import load_profile
from serving.settings import MODEL_NAME
from stack import processes, services
from tests.helpers import BIN, credit_risk, free_port
from training.data import load_training_data
from training.profile import SOURCE_RECONSTRUCTED, SOURCE_TRAINING_SPLIT, build_profile
from training.split import ContentSplit

pytestmark = pytest.mark.integration

IN_WINDOW_REQUESTS, ROWS_PER_REQUEST = 60, 20  # 1,200 rows in the last 24 hours
OLD_REQUESTS = 5  # 100 rows two days ago: outside the default window
LABELLED_IN_WINDOW = 1000


class Mlflow:
    """This module's tracking server, which the service test kills and starts again."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.service = services.mlflow(root / "mlflow", port=self.port)
        self.uri = services.tracking_uri(self.port)
        self.process = None

    def start(self) -> None:
        self.process = processes.start(self.service, self.root)
        processes.wait_healthy(self.service, self.process, self.root, timeout=120)

    def kill(self, sig=signal.SIGKILL) -> None:
        os.killpg(self.process.pid, sig)
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Mlflow(tmp_path_factory.mktemp("monitor-command"))
    server.start()
    yield server
    server.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def client(server):
    return MlflowClient(server.uri)


@pytest.fixture(scope="module")
def version(server, client, sample_path):
    result = credit_risk("train", "--data", str(sample_path), "--set", "max_iter=50", tracking_uri=server.uri)
    assert result.returncode == 0, result.stdout + result.stderr
    return client.get_model_version(REGISTERED_MODEL_NAME, "1")


@pytest.fixture(scope="module")
def served(server, version):
    """The version loaded as serving loads it (MLflow's loader reads the global tracking URI)."""
    mlflow.set_tracking_uri(server.uri)
    try:
        return scoring.load(version_uri(version.version))
    finally:
        mlflow.set_tracking_uri(None)


def ship(client, served, version, frame: pd.DataFrame, stamps: list[pd.Timestamp], state: State):
    """Score ``frame`` in requests of ``ROWS_PER_REQUEST`` rows at ``stamps`` and ship them
    with the sidecar's Shipper, one flush per request; returns one row per record."""
    shipper = Shipper("credit-risk-inference", state, client)
    records = []
    for number, stamp in enumerate(stamps):
        rows = frame.iloc[number * ROWS_PER_REQUEST : (number + 1) * ROWS_PER_REQUEST]
        prediction, probability = served.score_frame(rows[list(FEATURES)])
        request_id = f"req-{uuid.uuid4().hex[:12]}"
        request = {
            "request_id": request_id,
            "timestamp_ns": stamp.value,
            "model_name": MODEL_NAME,
            "registered_model": REGISTERED_MODEL_NAME,
            "model_version": version.version,
            "dataset_hash": version.tags[DATASET_HASH],
            "replica": "test",
            "latency_ms": 1.0,
            "features": {
                name: [None if np.isnan(v) else float(v) for v in rows[name].to_numpy(dtype=float)]
                for name in FEATURES
            },
            "outputs": {"prediction": prediction.tolist(), "probability": probability.tolist()},
        }
        flush = state.plan({f"segment-{number}": (0, 1)}, len(rows), created_ms=int(time.time() * 1000))
        assert shipper.ship(flush, [request]) == len(rows)
        state.commit(flush)
        records.append(
            pd.DataFrame(
                {
                    "request_id": request_id,
                    "row": np.arange(len(rows)),
                    "timestamp": stamp,
                    "probability": probability,
                    "outcome": rows[TARGET].to_numpy(),
                }
            )
        )
    return pd.concat(records, ignore_index=True)


@pytest.fixture(scope="module")
def traffic(client, served, version, sample_path, tmp_path_factory):
    """Records in the last 24 hours and two days ago, and the outcome files."""
    folder = tmp_path_factory.mktemp("traffic")
    frame = pd.read_csv(sample_path, index_col=0).sample(frac=1, random_state=7).reset_index(drop=True)
    now = pd.Timestamp.now(tz="UTC")
    recent = [now - pd.Timedelta(minutes=60 - n) for n in range(IN_WINDOW_REQUESTS)]
    old = [now - pd.Timedelta(days=2, minutes=n) for n in range(OLD_REQUESTS)]
    state = State(folder / "sidecar-state.db")
    in_window = ship(client, served, version, frame.iloc[: len(recent) * ROWS_PER_REQUEST], recent, state)
    outside = ship(client, served, version, frame.iloc[len(recent) * ROWS_PER_REQUEST :], old, state)
    # Outcomes for most in-window rows and some old ones (which the window must leave out).
    labelled = pd.concat([in_window.iloc[:LABELLED_IN_WINDOW], outside.iloc[:40]], ignore_index=True)
    outcomes = folder / "outcomes.csv"
    labelled[["request_id", "row", "outcome"]].to_csv(outcomes, index=False)
    conflicting = folder / "conflicting.csv"
    flipped = labelled.iloc[:2].assign(outcome=1 - labelled["outcome"].iloc[:2])
    pd.concat([flipped, in_window.iloc[[-1]]])[["request_id", "row", "outcome"]].to_csv(
        conflicting, index=False
    )
    return {
        "in_window": in_window,
        "labelled": labelled,
        "outcomes": outcomes,
        "conflicting": conflicting,
        "flipped": flipped,
    }


def test_training_logs_the_profile_of_its_full_training_split(client, version, served, sample_path):
    profile = load_profile(client, version.run_id)
    assert profile is not None and profile.source == SOURCE_TRAINING_SPLIT
    run = client.get_run(version.run_id)
    assert profile.rows == int(run.data.params["train_rows"])
    assert profile.threshold == run.data.metrics[THRESHOLD_METRIC]
    # Independently: the split again from the file, scored by the version as serving scores it.
    data = load_training_data(sample_path)
    training = data.features[~ContentSplit.of(data.features, data.target, 0.2).evaluation]
    expected = build_profile(training, served.score_frame(training)[1], profile.threshold)
    for name in FEATURES:
        ours, theirs = profile.features[name], expected.features[name]
        np.testing.assert_array_equal(ours.edges, theirs.edges)
        np.testing.assert_array_equal(ours.counts, theirs.counts)
        np.testing.assert_array_equal(ours.values, theirs.values)
        assert ours.missing == theirs.missing
    np.testing.assert_array_equal(profile.score.values, expected.score.values)
    np.testing.assert_array_equal(profile.score.value_counts, expected.score.value_counts)
    assert profile.provenance[DATASET_HASH] == version.tags[DATASET_HASH]


def stored_outcomes(client) -> int:
    experiment = client.get_experiment_by_name(OUTCOMES_EXPERIMENT)
    return len(client.search_runs([experiment.experiment_id])) if experiment else 0


def test_outcomes_add_counts_a_file_once_and_refuses_conflicts_naming_the_keys(server, client, traffic):
    rows = len(traffic["labelled"])
    first = credit_risk("outcomes", "add", str(traffic["outcomes"]), tracking_uri=server.uri)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{rows} outcome(s) in the file: {rows} stored now, 0 already stored" in first.stdout
    assert f"tracking server: {server.uri}" in first.stderr
    again = credit_risk("outcomes", "add", str(traffic["outcomes"]), tracking_uri=server.uri)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{rows} outcome(s) in the file: 0 stored now, {rows} already stored" in again.stdout
    assert stored_outcomes(client) == 1

    refused = credit_risk("outcomes", "add", str(traffic["conflicting"]), tracking_uri=server.uri)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("error: conflicting.csv: 2 key(s) with a conflicting outcome, nothing stored")
    for key in traffic["flipped"].itertuples():
        assert f"({key.request_id!r}, row {key.row}): {key.outcome} here, {1 - key.outcome} stored" in error
    assert stored_outcomes(client) == 1  # the file's new key was not stored either
    # Files refused before MLflow is asked (exit 2): test_monitor_cli.py.


def test_one_window_as_json_matches_an_independent_calculation(server, client, version, traffic):
    added = credit_risk("outcomes", "add", str(traffic["outcomes"]), tracking_uri=server.uri)
    assert added.returncode == 0, added.stderr
    result = credit_risk("monitor", "--json", tracking_uri=server.uri)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    for key in ("status", "model_version", "window", "rows", "features", "score", "outcomes"):
        assert key in document
    assert document["model_version"] == version.version
    assert set(document["window"]) == {"since", "until"}
    since, until = (pd.Timestamp(document["window"][k]) for k in ("since", "until"))
    assert until - since == pd.Timedelta(hours=24)
    in_window = traffic["in_window"]
    assert document["rows"] == len(in_window)  # the old records are left out
    assert set(document["features"]) == set(FEATURES)
    for item in document["features"].values():
        assert {"psi", "ks", "missing_rate", "status"} <= set(item)
    assert {"psi", "mean_probability", "status"} <= set(document["score"])
    assert document["score"]["mean_probability"] == pytest.approx(in_window["probability"].mean(), abs=1e-12)
    assert document["profile_source"] == SOURCE_TRAINING_SPLIT

    # Outcomes: joined here with pandas on (request_id, row), scored by scikit-learn.
    outcomes = pd.read_csv(traffic["outcomes"], dtype={"request_id": str})
    joined = in_window.drop(columns="outcome").merge(outcomes, on=["request_id", "row"], how="inner")
    assert len(joined) == LABELLED_IN_WINDOW
    got = document["outcomes"]
    assert got["rows"] == len(joined)
    assert abs(got["roc_auc"] - roc_auc_score(joined["outcome"], joined["probability"])) <= 1e-12
    assert abs(got["gini"] - (2 * roc_auc_score(joined["outcome"], joined["probability"]) - 1)) <= 1e-12
    assert got["brier"] == pytest.approx(np.mean((joined["probability"] - joined["outcome"]) ** 2), abs=1e-12)
    assert got["training_roc_auc"] == float(version.tags[TEST_ROC_AUC_TAG])

    # The monitoring run, with its metrics, result and figures.
    run = client.get_run(document["monitoring_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == MONITORING_EXPERIMENT
    assert run.data.metrics["outcome_roc_auc"] == got["roc_auc"]
    assert run.data.metrics["rows"] == len(in_window)
    figures = {info.path for info in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/drift.png", "figures/calibration.png"}
    assert document["monitoring_run_url"].startswith(
        f"{server.uri}/#/experiments/{run.info.experiment_id}/runs/"
    )
    assert f"monitoring run: {document['monitoring_run_url']}" in result.stderr


def old_version(client, version) -> str:
    """A version as every version trained before profiles existed looks: a training run with
    the logged training sample, held-out rows and threshold, and no ``monitoring/`` files."""
    run = client.get_run(version.run_id)
    copy = client.create_run(run.info.experiment_id, run_name="trained-before-profiles")
    with tempfile.TemporaryDirectory() as directory:
        for artifact in (REFERENCE_SAMPLE_ARTIFACT, HELD_OUT_ARTIFACT):
            local = client.download_artifacts(version.run_id, artifact, directory)
            client.log_artifact(copy.info.run_id, local, str(Path(artifact).parent))
    client.log_metric(copy.info.run_id, THRESHOLD_METRIC, run.data.metrics[THRESHOLD_METRIC])
    client.set_terminated(copy.info.run_id)
    # The same logged model (scoring the sample needs one). Its id is in the source,
    # models:/<model id>: the registry's answer does not always carry model_id itself.
    assert version.source.startswith("models:/m-"), version.source
    created = client.create_model_version(
        REGISTERED_MODEL_NAME,
        version.source,
        run_id=copy.info.run_id,
        model_id=version.source.removeprefix("models:/"),
        await_creation_for=60,
    )
    assert load_profile(client, copy.info.run_id) is None
    return created.version


def test_a_version_without_a_profile_is_monitored_with_a_reconstructed_one_and_says_so(
    server, client, version
):
    number = old_version(client, version)
    # Trained before profiles, it is also without an integrity record: monitoring loads it to
    # score its sample only as serving would, so it is refused until listed (model.verified).
    refused = credit_risk("monitor", "--model-version", number, tracking_uri=server.uri)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: version {number}: no usable reference profile: ") and (
        f"list version {number} in CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS" in last
    ), last
    result = credit_risk(
        "monitor",
        "--model-version",
        number,
        tracking_uri=server.uri,
        CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS=number,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"reference profile: {SOURCE_RECONSTRUCTED} (the version's training run has none)" in result.stdout
    assert f"model version {number}, window " in result.stdout
    assert "0 rows, status insufficient" in result.stdout  # nothing was scored by it: not a failure
    assert "monitoring run: http" in result.stdout


def test_an_unknown_version_is_a_failure_exit_1(server):
    # Bad flags and settings (exit 2, before MLflow is asked): test_monitor_cli.py.
    unknown = credit_risk("monitor", "--model-version", "99", tracking_uri=server.uri)
    assert unknown.returncode == 1, unknown.stdout + unknown.stderr
    assert (
        unknown.stderr.strip().splitlines()[-1]
        == f"error: version 99 of {REGISTERED_MODEL_NAME} is not registered"
    )


# -- the service ------------------------------------------------------------------------------


def gauges(url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


def test_the_service_exports_gauges_and_survives_an_mlflow_outage(server, client, version, traffic, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = processes.Service(
        "monitor",
        [str(BIN / "credit-risk"), "monitor", "--every", "2s"],
        f"{url}/health/live",
        {"MLFLOW_TRACKING_URI": server.uri, "CREDIT_RISK_MONITOR_PORT": str(port)},
    )
    process = processes.start(service, tmp_path)
    try:
        processes.wait_healthy(service, process, tmp_path, timeout=60)
        health = wait_for(
            lambda: (body := httpx.get(f"{url}/health", timeout=10).json())["last_window"] and body,
            120,
            "a first window",
        )
        assert health["status"] == "ok" and health["mlflow"]["reachable"] is True
        run_id = health["last_window"]["monitoring_run_id"]
        with tempfile.TemporaryDirectory() as directory:
            result = json.loads(Path(client.download_artifacts(run_id, "result.json", directory)).read_text())
        metrics = gauges(url)
        labels = {"model": MODEL_NAME, "version": version.version}

        def gauge(name, **extra):
            return metrics[(name, frozenset({**labels, **extra}.items()))]

        for name in FEATURES:
            assert gauge("credit_risk_drift_psi", feature=name) == pytest.approx(
                result["features"][name]["psi"]
            )
        assert gauge("credit_risk_window_rows") == result["rows"] == len(traffic["in_window"])
        assert gauge("credit_risk_outcome_roc_auc") == pytest.approx(result["outcomes"]["roc_auc"], abs=1e-15)
        assert gauge("credit_risk_training_roc_auc") == float(version.tags[TEST_ROC_AUC_TAG])
        assert gauge("credit_risk_window_end_timestamp_seconds") == pytest.approx(
            pd.Timestamp(result["window"]["until"]).timestamp()
        )
        process_labels = frozenset({"model": MODEL_NAME}.items())
        assert metrics[("credit_risk_monitor_mlflow_up", process_labels)] == 1
        assert metrics[("credit_risk_monitor_auc_margin", process_labels)] == 0.05

        server.kill()  # SIGKILL, process group
        outage = wait_for(
            lambda: (
                (body := httpx.get(f"{url}/health", timeout=10).json())["mlflow"]["reachable"] is False
                and body["last_error"]
                and body
            ),
            # The window in progress when MLflow died fails only once each of its downloads has
            # used up its retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2): about a minute on a busy
            # machine; the probe's verdict comes within seconds.
            240,
            "the outage on /health",
        )
        assert httpx.get(f"{url}/health/live", timeout=10).status_code == 200
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert outage["failures_in_a_row"] >= 1
        # The last good window stays on /health and /metrics, marked stale.
        assert outage["last_window"]["monitoring_run_id"] and outage["last_window"]["stale"] is True
        down = gauges(url)
        assert down[("credit_risk_monitor_mlflow_up", process_labels)] == 0
        assert down[("credit_risk_monitor_last_error", process_labels)] == 1
        assert down[("credit_risk_window_stale", frozenset(labels.items()))] == 1
        assert down[("credit_risk_window_rows", frozenset(labels.items()))] == len(traffic["in_window"])

        back_at = time.time()
        server.start()
        recovered = wait_for(
            lambda: (
                (body := httpx.get(f"{url}/health", timeout=10).json())["last_error"] is None
                and pd.Timestamp(body["last_success_at"]).timestamp() > back_at
                and body
            ),
            120,
            "a window after MLflow is back",
        )
        assert recovered["mlflow"]["reachable"] is True and recovered["last_window"]["stale"] is False
        assert client.get_run(recovered["last_window"]["monitoring_run_id"]).info.status == "FINISHED"
        up = gauges(url)
        assert up[("credit_risk_monitor_last_error", process_labels)] == 0
        assert up[("credit_risk_monitor_mlflow_up", process_labels)] == 1
        assert up[("credit_risk_window_stale", frozenset(labels.items()))] == 0
    finally:
        process.send_signal(signal.SIGTERM)  # a clean stop after the step in progress
        try:
            process.wait(timeout=60)
        finally:
            processes.terminate(process.pid)
    assert process.returncode == 0, service.log_path(tmp_path).read_text()[-3000:]
