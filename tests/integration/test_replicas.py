"""Two serving replicas, each with its own spool and sidecar, shipping to one MLflow; one pair
scaled down with SIGTERM mid-traffic, as Kubernetes does (server and sidecar at once).

The oracle is each client's own list of answered rows, compared with ``read_records``.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from logging_sidecar.reader import read_records
from stack import processes, services
from tests.helpers import (
    REFUSED,
    TRANSPORT,
    Answer,
    Client,
    Failure,
    HeldBody,
    InFlight,
    Load,
    check_read_back,
    free_port,
    live_group_members,
    serving_service,
)
from training.data import load_training_data

pytestmark = pytest.mark.integration

REPLICAS = ("replica-a", "replica-b")
DRAIN_S = 60  # the sidecar's grace period; Kubernetes' terminationGracePeriodSeconds


class Replica:
    """``credit-risk serve`` with capture plus its sidecar, on its own spool."""

    def __init__(self, name: str, tracking_uri: str, root, experiment: str):
        self.name, self.root = name, root
        self.spool = root / name / "spool"
        identity = {"CREDIT_RISK_REPLICA_ID": name, "CREDIT_RISK_SPOOL_DIR": str(self.spool)}
        self.server, ports = serving_service(tracking_uri, name=f"serving-{name}", **identity)
        self.url = f"http://127.0.0.1:{ports['http']}"
        self.sidecar = services.sidecar(
            tracking_uri,
            self.spool,
            free_port(),
            name=f"sidecar-{name}",
            CREDIT_RISK_INFERENCE_EXPERIMENT=experiment,
            CREDIT_RISK_FLUSH_RECORDS="200",
            CREDIT_RISK_FLUSH_INTERVAL_S="1",
            CREDIT_RISK_SIDECAR_DRAIN_S=str(DRAIN_S),
            **identity,
        )
        self.processes = {}

    def start(self):
        for service in (self.server, self.sidecar):
            self.processes[service.name] = process = processes.start(service, self.root)
            processes.wait_healthy(service, process, self.root, timeout=180)

    def sigterm_both(self):
        """Both at the same moment, as an orchestrator scaling down does."""
        for process in self.processes.values():
            os.killpg(process.pid, signal.SIGTERM)

    def wait_exit(self, timeout: float) -> dict[str, int]:
        return {name: process.wait(timeout=timeout) for name, process in self.processes.items()}

    def log(self, service) -> str:
        return service.log_path(self.root).read_text(errors="replace")[-4000:]

    def stop(self):
        for process in self.processes.values():
            processes.terminate(process.pid)


@pytest.fixture
def replicas(trained, tracking_uri, tmp_path):
    experiment = f"credit-risk-inference-replicas-{uuid.uuid4().hex[:8]}"
    pair = [Replica(name, tracking_uri, tmp_path, experiment) for name in REPLICAS]
    try:
        for replica in pair:
            replica.start()
        yield pair, experiment
    finally:
        for replica in pair:
            replica.stop()


def _read_until_complete(client: MlflowClient, experiment: str, rows: int, timeout: float = 180):
    """Waiting on what a reader sees (never the sidecars' counters), then the final read."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_records(client=client, experiment=experiment, deduplicate=False)
        if len(records) >= rows:
            break
        time.sleep(2)
    return records


def test_sigterm_of_one_pair_mid_traffic_loses_and_duplicates_nothing(replicas, tracking_uri, sample_path):
    pair, experiment = replicas
    sample = load_training_data(sample_path).features
    clients = [Client(sample, replica.url, replica.name, seed=n) for n, replica in enumerate(pair)]
    leaving, staying = pair
    held = HeldBody()  # a request certainly in flight when the SIGTERM lands
    with Load(clients[0], threads=3), Load(clients[1], threads=3):
        time.sleep(8)
        with InFlight(clients[0], 20, hold=held) as in_flight:
            assert held.first_half_sent.wait(timeout=60), "the held request never started"
            answered_before = clients[0].answered_rows
            sigterm_at = time.monotonic()
            leaving.sigterm_both()
            time.sleep(1)  # the server is stopping now, with the held request half received
            held.release()
        exits = leaving.wait_exit(timeout=DRAIN_S + 60)
        time.sleep(3)  # the other replica keeps serving
    assert answered_before > 0 and clients[1].answers, "no traffic was answered before the SIGTERM"
    assert isinstance(in_flight.outcome, Answer), (
        f"the request in flight at the SIGTERM was not answered: {in_flight.outcome}"
    )
    server_exit = exits[leaving.server.name]
    assert server_exit == 0, f"the terminated server exited {server_exit}:\n{leaving.log(leaving.server)}"
    sidecar_exit = exits[leaving.sidecar.name]
    assert sidecar_exit == 0, f"the terminated sidecar exited {sidecar_exit}:\n{leaving.log(leaving.sidecar)}"
    for process in leaving.processes.values():
        assert not live_group_members(process.pid), f"orphans of {process.args}"
    # Zero failed requests on the replica that stays: no error answer, and no transport error
    # (refused, reset, timed out) either.
    assert not clients[1].failures, (
        f"{staying.name}: {len(clients[1].failures)} failed requests "
        f"{clients[1].failure_counts()}, e.g. {clients[1].failures[:3]}"
    )
    print(
        f"answered rows: {leaving.name} {clients[0].answered_rows} ({clients[0].answered_rows - answered_before} "
        f"finished after the SIGTERM; failed requests by kind: {clients[0].failure_counts()}), "
        f"{staying.name} {clients[1].answered_rows}"
    )

    answers = clients[0].answers + clients[1].answers
    rows = sum(len(a.features) for a in answers)
    records = _read_until_complete(MlflowClient(tracking_uri), experiment, rows)
    check_read_back(answers, records, unanswered=clients[0].unanswered)
    # On the replica that leaves, a failure after the SIGTERM is no lost request when the server
    # never took the request: a connection refused once its listener closed, or one that
    # uvicorn, stopping, closed before it read the request on it. The client sees that as
    # "Server disconnected", or as a reset when the request's bytes were still unread (the
    # kernel resets a connection closed with unread data). Such a request was never scored,
    # so it has no record. Anything else, or a request with a record, was accepted and lost.
    recorded = set(records["request_id"].astype(str))
    closed_unread = ("disconnected without sending a response", "Connection reset by peer")

    def never_taken(failure: Failure) -> bool:
        if failure.ended < sigterm_at:
            return False
        if failure.kind == REFUSED:
            return True
        return (
            failure.kind == TRANSPORT
            and failure.request_id not in recorded
            and any(text in failure.detail for text in closed_unread)
        )

    lost = [failure for failure in clients[0].failures if not never_taken(failure)]
    assert not lost, f"{leaving.name}: requests accepted but not answered: {lost[:3]}"
    assert "replica" in records.columns, f"records carry no replica column: {list(records.columns)}"
    check_read_back(answers, records, check_replica=True)
