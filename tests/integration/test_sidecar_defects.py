"""Each defect of issue 9 that needs the sidecar as a process and a real MLflow: a deleted run
or experiment, poison and huge lines, run keys, health, restarts, SIGTERM drain, fault points.

The spool is written by the real ``SpoolWriter`` (what MLServer uses) so that these tests need
no trained model; ``tests/integration/test_sidecar.py`` covers MLServer end to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from logging_sidecar.dead_letters import DEAD_LETTER_FILE
from logging_sidecar.reader import UnreadableBatch, read_records
from logging_sidecar.records import KEY
from model.schema import FEATURES
from serving.capture import SpoolWriter
from serving.spool_format import FORMAT_VERSION, SpoolSettings, encode
from stack import processes, services
from tests.helpers import NOBODY_URL, free_port

pytestmark = pytest.mark.integration

IDENTITY = {
    "model_name": "credit-risk",
    "registered_model": "credit-risk-model",
    "model_version": "1",
    "dataset_hash": "d1",
}


def request_line(rows: int = 1, identity: dict = IDENTITY, replica: str = "replica-a") -> tuple[str, bytes]:
    request_id = f"req-{uuid.uuid4().hex}"
    features = np.random.default_rng(rows).random((rows, len(FEATURES)))
    outputs = {"prediction": np.ones(rows, dtype="int64"), "probability": np.full(rows, 0.75)}
    return request_id, encode(
        request_id, time.time_ns(), identity, list(FEATURES), features, outputs, 2.0, replica
    )


class Shipping:
    """A spool written by a real ``SpoolWriter`` and shipped by a real sidecar process into
    its own experiment of the session's MLflow server."""

    def __init__(self, root: Path, tracking_uri: str):
        self.root, self.tracking_uri = root, tracking_uri
        self.spool = root / "spool"
        self.experiment = f"inference-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.writer = SpoolWriter(SpoolSettings(directory=self.spool))
        self.sent: dict[str, int] = {}  # request id -> rows
        self.process = None
        self.client = MlflowClient(tracking_uri)

    def service(self, **env):
        env = {
            "CREDIT_RISK_FLUSH_RECORDS": "5",
            "CREDIT_RISK_FLUSH_INTERVAL_S": "1",
            "CREDIT_RISK_STALL_AFTER_S": "3",
            "CREDIT_RISK_INFERENCE_EXPERIMENT": self.experiment,
            **env,
        }
        return services.sidecar(self.tracking_uri, self.spool, self.port, **env)

    def start(self, wait=True, **env):
        service = self.service(**env)
        self.log = service.log_path(self.root)
        self.process = processes.start(service, self.root)
        if wait:
            processes.wait_healthy(service, self.process, self.root, timeout=60)
        return self.process

    def stop(self, sig=signal.SIGTERM) -> int:
        os.killpg(self.process.pid, sig)
        return self.process.wait(timeout=60)

    def write(self, count=1, rows=1, **kwargs) -> None:
        for _ in range(count):
            request_id, line = request_line(rows, **kwargs)
            assert self.writer.append(line, rows)
            self.sent[request_id] = rows

    def get(self, path="/health/shipping") -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=10)

    def wait_for(self, predicate, what: str, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate(self.get().json()):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{what}: not within {timeout} s; last /health/shipping: {self.get().text}")

    def wait_shipped(self, total: int, timeout=90):
        self.wait_for(lambda h: h["shipped_records_total"] >= total, f"{total} records shipped", timeout)

    def records(self, **kwargs):
        return read_records(experiment=self.experiment, client=self.client, deduplicate=False, **kwargs)

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.stop(signal.SIGKILL)
        self.writer.close()


@pytest.fixture
def shipping(tmp_path, tracking_uri):
    shipping = Shipping(tmp_path, tracking_uri)
    try:
        yield shipping
    finally:
        shipping.close()


def test_a_deleted_inference_run_gets_a_new_run_and_shipping_goes_on(shipping):
    """Defect 1: on main the cached run id made every later flush fail for ever."""
    shipping.start()
    shipping.write(5)
    shipping.wait_shipped(5)
    [first] = shipping.client.search_runs(
        [shipping.client.get_experiment_by_name(shipping.experiment).experiment_id]
    )
    shipping.client.delete_run(first.info.run_id)
    shipping.write(5)
    shipping.wait_shipped(10)
    records = shipping.records()
    assert len(records) == 5 and set(records["request_id"]) == set(list(shipping.sent)[5:])
    assert shipping.get().status_code == 200


def test_a_deleted_experiment_is_restored_with_its_records(shipping):
    """Defect 1: a soft-deleted experiment cannot be created again under its name."""
    shipping.start()
    shipping.write(5)
    shipping.wait_shipped(5)
    experiment = shipping.client.get_experiment_by_name(shipping.experiment)
    shipping.client.delete_experiment(experiment.experiment_id)
    shipping.write(5)
    shipping.wait_shipped(10)
    assert shipping.client.get_experiment(experiment.experiment_id).lifecycle_stage == "active"
    records = shipping.records()
    assert sorted(records["request_id"]) == sorted(shipping.sent) and not records.duplicated(KEY).any()


def test_poison_lines_are_parked_counted_once_and_shown_until_moved(shipping):
    """Defect 8: on main a valid-JSON line missing a field passed reading and failed
    shipping for ever; a newer version must be parked, not lost."""
    shipping.write(3)
    missing_field = json.loads(request_line()[1])
    del missing_field["dataset_hash"]
    future = json.loads(request_line()[1])
    future["v"] = FORMAT_VERSION + 1
    for record in (missing_field, future):
        assert shipping.writer.append(json.dumps(record).encode() + b"\n", 1)
    shipping.write(3)
    shipping.start()
    shipping.wait_shipped(6)
    assert sorted(shipping.records()["request_id"]) == sorted(shipping.sent)

    parked = [json.loads(line) for line in (shipping.spool / DEAD_LETTER_FILE).read_text().splitlines()]
    assert [p["reason"] for p in parked] == [
        "field 'dataset_hash' is missing or not a string",
        f"record version {FORMAT_VERSION + 1} is not one this reader knows (1..{FORMAT_VERSION})",
    ]
    assert json.loads(parked[1]["line"])["v"] == FORMAT_VERSION + 1  # the line itself, kept
    answer = shipping.get()
    assert answer.status_code == 503 and answer.json()["status"] == "parked"
    assert answer.json()["dead_lines_total"] == 2 and "dead lines" in answer.json()["reason"]
    assert shipping.get("/health/live").status_code == 200
    metrics = shipping.get("/metrics").text
    assert "credit_risk_sidecar_dead_lines 2.0" in metrics

    shipping.stop(signal.SIGKILL)  # the count lives in the state database, not the process
    (shipping.spool / DEAD_LETTER_FILE).rename(shipping.root / "inspected.ndjson")
    shipping.start()
    answer = shipping.get()
    assert answer.status_code == 200 and answer.json()["dead_lines_total"] == 2


def test_a_request_of_50000_rows_ships_and_so_does_the_next(shipping):
    """Defect 2: on main a line over 4 MiB stalled its segment for ever."""
    shipping.write(1, rows=50_000)
    shipping.write(2)
    shipping.start()
    shipping.wait_shipped(50_002, timeout=180)
    records = shipping.records()
    assert len(records) == 50_002 and records.groupby("request_id").size().to_dict() == shipping.sent


def test_groups_differing_only_in_training_data_or_replica_keep_their_own_runs(shipping):
    """Defect 5 and issue 12: the run key names the data and the replica, so no group
    overwrites another's batch file or metric steps."""
    shipping.write(3)
    shipping.write(3, identity={**IDENTITY, "dataset_hash": "d2"})
    shipping.write(3, replica="replica-b")
    shipping.start(CREDIT_RISK_FLUSH_RECORDS="9")
    shipping.wait_shipped(9)
    records = shipping.records()
    assert sorted(records["request_id"]) == sorted(shipping.sent)
    assert records.groupby(["dataset_hash", "replica"]).size().to_dict() == {
        ("d1", "replica-a"): 3,
        ("d1", "replica-b"): 3,
        ("d2", "replica-a"): 3,
    }
    experiment = shipping.client.get_experiment_by_name(shipping.experiment).experiment_id
    runs = shipping.client.search_runs([experiment])
    assert len(runs) == 3
    for run in runs:
        [batch] = shipping.client.get_metric_history(run.info.run_id, "batch_records")
        assert batch.value == 3


def test_shipping_health_says_stalled_while_liveness_stays_up(shipping):
    """Defect 12: on main /health said "ok" whatever happened."""
    shipping.tracking_uri = NOBODY_URL  # nobody there
    shipping.write(2)
    shipping.start()
    shipping.wait_for(lambda h: h["status"] == "stalled", "a stall reported")
    answer = shipping.get()
    assert answer.status_code == 503
    body = answer.json()
    assert body["pending_records"] == 2 and body["since"] and "nothing shipped for" in body["reason"]
    assert "last error" in body["reason"] and body["parked_batches"] == 0
    assert shipping.get("/health/live").status_code == 200
    assert (
        shipping.get("/health").status_code == 200 and shipping.get("/health").json()["shipping"] == "stalled"
    )


def test_a_stray_file_is_skipped_and_shipping_goes_on(shipping):
    """Defect 7: on main a ``*.jsonl`` with another name killed the sidecar."""
    (shipping.spool / "copied-by-hand.jsonl").write_text("{}\n")
    shipping.write(5)
    shipping.start()
    shipping.wait_shipped(5)
    assert shipping.process.poll() is None
    assert "copied-by-hand.jsonl: not a spool segment name" in shipping.log.read_text()
    assert (shipping.spool / "copied-by-hand.jsonl").exists()


def test_an_unexpected_error_exits_non_zero_and_the_supervisor_restarts_it(shipping):
    """Defect 7: ``credit-risk up`` runs the sidecar under ``stack.supervise``."""
    service = services.sidecar(
        shipping.tracking_uri,
        shipping.spool,
        shipping.port,
        supervised=True,
        CREDIT_RISK_INFERENCE_EXPERIMENT=shipping.experiment,
    )
    shipping.process = processes.start(service, shipping.root)
    processes.wait_healthy(service, shipping.process, shipping.root, timeout=60)
    [child] = Path(f"/proc/{shipping.process.pid}/task/{shipping.process.pid}/children").read_text().split()
    os.kill(int(child), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = (
            Path(f"/proc/{shipping.process.pid}/task/{shipping.process.pid}/children").read_text().split()
        )
        if children and children != [child] and processes.is_healthy(service.health_url):
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the supervisor did not restart the sidecar")
    shipping.write(2)
    shipping.wait_shipped(2)
    assert "restarting in" in service.log_path(shipping.root).read_text()
    shipping.writer.close()  # else the drain waits for this writer
    assert shipping.stop(signal.SIGTERM) == 0  # a drained sidecar exits 0, and so does its supervisor


def test_sigterm_waits_for_the_writer_then_ships_everything_and_exits_0(shipping):
    """Issue 12: an orchestrator signals server and sidecar at once; what the server writes
    last still ships before the sidecar exits."""
    shipping.write(3)
    shipping.start(
        CREDIT_RISK_FLUSH_RECORDS="1000", CREDIT_RISK_FLUSH_INTERVAL_S="60", CREDIT_RISK_STALL_AFTER_S="120"
    )
    os.killpg(shipping.process.pid, signal.SIGTERM)
    time.sleep(1)
    assert shipping.process.poll() is None, "left before the writer released the spool"
    shipping.write(4)  # the server's last answers
    shipping.writer.close()
    assert shipping.process.wait(timeout=30) == 0
    records = shipping.records()
    assert sorted(records["request_id"]) == sorted(shipping.sent)
    assert "drain: everything shipped" in shipping.log.read_text()


def test_what_a_drain_cannot_ship_is_counted_and_ships_on_the_next_start(shipping):
    reachable = shipping.tracking_uri
    shipping.tracking_uri = NOBODY_URL  # nobody there
    shipping.write(4)
    shipping.writer.close()
    shipping.start(CREDIT_RISK_SIDECAR_DRAIN_S="2")
    assert shipping.stop(signal.SIGTERM) == 0
    assert "drain: 4 records not shipped within 2 s" in shipping.log.read_text()
    shipping.tracking_uri = reachable
    shipping.start()
    shipping.wait_shipped(4)
    assert sorted(shipping.records()["request_id"]) == sorted(shipping.sent)


@pytest.mark.parametrize("point", ["after_plan", "after_upload", "after_commit"])
def test_a_sigkill_at_each_fault_point_loses_and_duplicates_nothing(shipping, point):
    shipping.write(12)
    shipping.start(wait=False, CREDIT_RISK_FAULT_POINTS=point, CREDIT_RISK_FAULT_PAUSE_S="60")
    marker = f"FAULT-POINT {point} pid={shipping.process.pid}"
    deadline = time.monotonic() + 60
    while marker not in (shipping.log.read_text() if shipping.log.exists() else ""):
        assert time.monotonic() < deadline and shipping.process.poll() is None, "never reached the point"
        time.sleep(0.05)
    shipping.stop(signal.SIGKILL)
    shipping.start()
    shipping.wait_shipped(12)
    records = shipping.records()
    assert len(records) == 12 and not records.duplicated(KEY).any()
    assert sorted(records["request_id"]) == sorted(shipping.sent)


def test_a_corrupt_batch_is_skipped_and_named_unless_strict(shipping):
    """Defect 9: on main one unreadable artifact failed the whole read."""
    shipping.write(5)
    shipping.start()
    shipping.wait_shipped(5)
    experiment = shipping.client.get_experiment_by_name(shipping.experiment).experiment_id
    [run] = shipping.client.search_runs([experiment])
    corrupt = shipping.root / "batch-replica-a-0000000099-000000000000.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    shipping.client.log_artifact(run.info.run_id, str(corrupt), "records")

    records = shipping.records()
    assert sorted(records["request_id"]) == sorted(shipping.sent)
    [(name, reason)] = records.attrs["skipped"]
    assert name == f"{run.info.run_id}/records/{corrupt.name}" and reason
    with pytest.raises(UnreadableBatch, match=corrupt.name):
        shipping.records(strict=True)


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs: a disk that really fills up (a file-size limit is another fault)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0750", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_spool_that_filled_its_disk_ships_everything_it_kept(shipping, small_disk):
    """The state database shares the spool's disk: the sidecar's reserve lets it commit, so
    shipped segments can be deleted and the disk empties."""
    shipping.spool = small_disk
    shipping.writer.close()
    shipping.writer = SpoolWriter(SpoolSettings(directory=small_disk, segment_max_bytes=1 << 20))
    reachable = shipping.tracking_uri
    shipping.tracking_uri = NOBODY_URL  # nothing ships while it fills
    big_batches = {"CREDIT_RISK_FLUSH_RECORDS": "1000", "CREDIT_RISK_MAX_BATCH_RECORDS": "10000"}
    shipping.start(**big_batches)
    while True:
        request_id, line = request_line(rows=50)
        if not shipping.writer.append(line, 50):
            break
        shipping.sent[request_id] = 50
    assert shipping.writer.dropped == 50 and len(shipping.sent) > 100
    shipping.stop(signal.SIGKILL)

    shipping.tracking_uri = reachable
    shipping.start(**big_batches)
    shipping.wait_shipped(sum(shipping.sent.values()), timeout=180)
    records = shipping.records()
    assert len(records) == sum(shipping.sent.values()) and not records.duplicated(KEY).any()
    assert "released the 2 MiB reserve" in shipping.log.read_text()
    time.sleep(1.5)  # the writer's back-off after a failed write
    shipping.write(1)  # room again: shipped segments were deleted
    shipping.writer.close()  # before the disk goes away
    shipping.stop(signal.SIGKILL)
