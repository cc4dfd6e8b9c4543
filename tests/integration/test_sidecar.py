"""Capture and shipping end to end: real MLflow, real MLServer, real sidecar processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import uuid

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from logging_sidecar.reader import read_records
from logging_sidecar.records import KEY
from model.schema import FEATURES
from serving.settings import MODEL_NAME
from serving.spool_format import live_writers
from stack import processes, services
from tests.helpers import credit_risk, free_port, serving_service
from tests.integration.test_serving import flat, v2_body
from training.data import load_training_data

pytestmark = pytest.mark.integration


class Stack:
    """One MLflow server (registry and records), MLServer with capture on, one sidecar."""

    def __init__(self, root, sample_path):
        self.root = root
        self.spool = root / "spool"
        self.mlflow_port = free_port()
        self.mlflow = services.mlflow(root / "mlflow", port=self.mlflow_port)
        self.tracking_uri = services.tracking_uri(self.mlflow_port)
        self.sample = load_training_data(sample_path).features.reset_index(drop=True)
        self.sent: list[tuple[str, pd.DataFrame, dict]] = []
        self.processes: dict[str, object] = {}
        self.sidecar_port = free_port()

    def start(self, name, service, timeout=180):
        process = processes.start(service, self.root)
        self.processes[name] = (service, process)
        processes.wait_healthy(service, process, self.root, timeout)
        return process

    def kill(self, name, sig=signal.SIGKILL):
        _, process = self.processes.pop(name)
        os.killpg(process.pid, sig)
        process.wait(timeout=60)

    def stop_all(self):
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM)

    def start_mlflow(self):
        self.start("mlflow", self.mlflow)

    def start_mlserver(self, workers=0, **env):
        service, ports = serving_service(
            self.tracking_uri,
            name=f"serving-{uuid.uuid4().hex[:6]}",
            workers=workers,
            CREDIT_RISK_SPOOL_DIR=str(self.spool),
            **env,
        )
        self.start("mlserver", service)
        self.mlserver_url = f"http://127.0.0.1:{ports['http']}"
        self.metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        self.mlserver_log = service.log_path(self.root)

    def sidecar_service(self, **env):
        env = {"CREDIT_RISK_FLUSH_RECORDS": "40", "CREDIT_RISK_FLUSH_INTERVAL_S": "1", **env}
        return services.sidecar(self.tracking_uri, self.spool, self.sidecar_port, **env)

    def start_sidecar(self, **env):
        self.start("sidecar", self.sidecar_service(**env), timeout=60)

    def send(self, count, rows=1, with_id=True, request_id=None):
        """Requests of ``rows`` rows each (with missing values); remember what was answered."""
        for _ in range(count):
            start = len(self.sent) * 3 % (len(self.sample) - rows)
            frame = self.sample.iloc[start : start + rows].reset_index(drop=True)
            body = v2_body(frame, **({"id": request_id or f"req-{uuid.uuid4().hex}"} if with_id else {}))
            response = httpx.post(f"{self.mlserver_url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=30)
            assert response.status_code == 200, response.text
            answer = response.json()
            if with_id:
                assert answer["id"] == body["id"]
            self.sent.append((answer["id"], frame, answer))

    @property
    def sent_rows(self) -> int:
        return sum(len(frame) for _, frame, _ in self.sent)

    def health(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.sidecar_port}/health", timeout=5).json()

    def wait_shipped(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.health()["shipped_records_total"] >= self.sent_rows:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not all {self.sent_rows} records shipped: {self.health()}")

    def assert_exactly_once(self):
        raw = read_records(client=MlflowClient(self.tracking_uri), deduplicate=False)
        assert len(raw) == self.sent_rows, f"{len(raw)} records shipped for {self.sent_rows} answered"
        assert not raw.duplicated(KEY).any()
        assert set(raw["request_id"]) == {request_id for request_id, _, _ in self.sent}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, sample_path):
    stack = Stack(tmp_path_factory.mktemp("capture"), sample_path)
    stack.start_mlflow()
    trained = credit_risk("train", "--data", str(sample_path), tracking_uri=stack.tracking_uri)
    assert trained.returncode == 0, trained.stderr
    try:
        yield stack
    finally:
        stack.stop_all()


def test_every_answered_row_is_one_record_field_by_field(stack):
    stack.start_mlserver()
    stack.start_sidecar()
    stack.send(30, rows=1)
    stack.send(10, rows=5, with_id=False)  # the server generates the ids
    stack.wait_shipped()
    stack.assert_exactly_once()

    records = read_records(client=MlflowClient(stack.tracking_uri)).set_index(["request_id", "row_index"])
    for request_id, frame, answer in stack.sent:
        outputs = {o["name"]: np.ravel(o["data"]) for o in answer["outputs"]}
        for row in range(len(frame)):
            record = records.loc[(request_id, row)]
            for name in FEATURES:
                sent, got = frame.loc[row, name], record[name]
                assert (np.isnan(sent) and np.isnan(got)) or sent == got, (request_id, name)
            assert record["prediction"] == outputs["prediction"][row]
            assert record["probability"] == outputs["probability"][row]
            assert record["model_version"] == answer["model_version"]
            assert record["dataset_hash"] == answer["parameters"]["dataset_hash"]
            assert record["model_name"] == MODEL_NAME and record["latency_ms"] > 0
    assert str(records["timestamp"].dt.tz) == "UTC"


def test_a_seed_predict_call_is_captured_and_shipped_like_v2(stack):
    """``POST /predict`` (the seed's flat JSON) goes through the same capture as V2."""
    frame = stack.sample.iloc[7:10].reset_index(drop=True)
    response = httpx.post(
        f"{stack.mlserver_url}/predict", json=flat(frame), headers={"X-Request-ID": "seed-batch"}, timeout=30
    )
    assert response.status_code == 200, response.text
    answers = response.json()
    stack.sent.append(("seed-batch", frame, answers))
    stack.wait_shipped()
    stack.assert_exactly_once()

    records = read_records(client=MlflowClient(stack.tracking_uri)).set_index(["request_id", "row_index"])
    for row, answer in enumerate(answers):
        record = records.loc[("seed-batch", row)]
        assert (record["probability"], record["prediction"]) == (answer["probability"], answer["prediction"])
        assert record["model_version"] == answer["model_version"]
        for name in FEATURES:
            sent, got = frame.loc[row, name], record[name]
            assert (np.isnan(sent) and np.isnan(got)) or sent == got, name


def test_capture_works_without_worker_processes(stack):
    stack.kill("mlserver", signal.SIGTERM)
    stack.start_mlserver()
    stack.send(20)
    stack.wait_shipped()
    stack.assert_exactly_once()


def test_a_client_reusing_an_id_keeps_every_request(stack):
    stack.send(3, rows=2, request_id="reused-id")
    stack.wait_shipped()
    stack.assert_exactly_once()
    records = read_records(client=MlflowClient(stack.tracking_uri))
    reused = records[records["request_id"] == "reused-id"]
    assert len(reused) == 6 and reused["timestamp"].nunique() == 3


def test_mlflow_down_while_traffic_flows_then_back(stack):
    stack.kill("mlflow", signal.SIGTERM)
    started = time.perf_counter()
    stack.send(40)
    answered_in = time.perf_counter() - started
    time.sleep(3)  # let the sidecar fail a flush or two
    assert stack.health()["last_error"] is not None
    stack.start_mlflow()
    stack.wait_shipped(timeout=180)
    stack.assert_exactly_once()
    assert answered_in < 30, f"40 requests took {answered_in:.1f} s with MLflow down"


def _planned_flushes(state_db) -> int:
    with sqlite3.connect(state_db) as connection:
        return connection.execute("select count(*) from flushes where status = 'planned'").fetchone()[0]


def test_sidecar_killed_in_the_middle_of_a_flush(stack):
    stack.kill("sidecar", signal.SIGTERM)
    stack.send(150, rows=4)  # a backlog of 600 rows, shipped in batches of 40
    state_db = stack.spool / "sidecar-state.db"
    small_batches = stack.sidecar_service(CREDIT_RISK_MAX_BATCH_RECORDS="40")
    killed_mid_flush = 0
    for _ in range(10):
        # Not waiting for /health: the first batch may be planned before it answers.
        process = processes.start(small_batches, stack.root)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _planned_flushes(state_db):
            time.sleep(0.001)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        killed_mid_flush += _planned_flushes(state_db) > 0
        if killed_mid_flush >= 2:
            break
    assert killed_mid_flush >= 2, "never caught the sidecar between planning and committing"
    stack.start_sidecar()
    stack.wait_shipped()
    stack.assert_exactly_once()


def test_records_answered_before_an_mlserver_crash_are_shipped(stack):
    stack.send(25)
    stack.kill("mlserver", signal.SIGKILL)  # the whole process group
    assert live_writers(stack.spool) == [], "a process of the killed server still holds the spool"
    stack.start_mlserver()
    stack.send(5)
    stack.wait_shipped()
    stack.assert_exactly_once()


def test_full_spool_never_fails_inference(stack):
    stack.kill("mlserver", signal.SIGTERM)
    stack.kill("sidecar", signal.SIGTERM)  # nobody empties the spool now
    stack.start_mlserver(CREDIT_RISK_SPOOL_MAX_BYTES="1")
    stack.send(10)  # asserts every one was answered 200
    metrics = httpx.get(stack.metrics_url, timeout=10).text
    dropped = [
        line for line in metrics.splitlines() if line.startswith("credit_risk_capture_dropped_rows_total{")
    ]
    # Leftover segments may already fill the 1-byte spool; otherwise the first request fits.
    assert dropped and float(dropped[0].split()[-1]) >= 9
    assert "is full" in stack.mlserver_log.read_text()
