"""Serving follows the registry: real MLflow, real MLServer, promotions under load.

One MLflow server of its own (promotions here must not disturb the session's shared stack).
Versions: 1 (the bundled sample, the defaults), 2 (a deliberately weaker one the gate rejects,
promoted by hand), and 3 (not a credit-risk model at all: it cannot load).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import model_repository_pb2 as repository_pb
from mlserver.grpc.dataplane_pb2_grpc import GRPCInferenceServiceStub
from mlserver.grpc.model_repository_pb2_grpc import ModelRepositoryServiceStub

from model import verified
from model.identity import HELD_OUT_ARTIFACT
from serving.settings import MODEL_NAME
from stack import processes, services
from tests.helpers import Background, credit_risk, free_port, serving_service
from tests.integration.test_serving import v2_body
from training import registry
from training.data import load_training_data
from training.train import record_integrity

pytestmark = pytest.mark.integration

WEAKER = ("--set", "max_iter=2", "--set", "max_depth=1", "--retrain")
SWITCH_WITHIN_S = 30


class Server:
    """``credit-risk serve`` as a real process, waited for until *alive* (not ready)."""

    def __init__(self, tracking_uri: str, root, **env):
        self.service, self.ports = serving_service(tracking_uri, name=f"serving-{free_port()}", **env)
        self.root = root
        self.url = f"http://127.0.0.1:{self.ports['http']}"
        self.process = processes.start(self.service, root)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            if processes.is_healthy(f"{self.url}/v2/health/live"):
                return
            time.sleep(0.3)
        raise AssertionError(f"server not alive after 120 s:\n{self.log()}")

    def log(self) -> str:
        return self.service.log_path(self.root).read_text(errors="replace")

    def ready(self) -> httpx.Response:
        return httpx.get(f"{self.url}/v2/health/ready", timeout=10)

    def wait_serving(self, version: str, timeout: float = SWITCH_WITHIN_S + 30) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            answer = self.ready()
            if answer.status_code == 200 and answer.json()["version"] == version:
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(f"not serving version {version} after {timeout} s: {self.ready().text}")

    def infer(self, body: dict, path: str = f"/v2/models/{MODEL_NAME}/infer") -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=30)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=10).text

    def stop(self):
        processes.terminate(self.process.pid)
        self.process.wait(timeout=30)


class Load(Background):
    """Clients sending single-row requests back to back until stopped, on the V2 route and the
    seed's ``/predict`` in turn. Every request's outcome is kept as (time, status, version,
    text); a transport error (refused, reset, timed out) has status None, so it counts as a
    failed request like any answer other than 200."""

    join_timeout_s = 60.0  # longer than a request's own timeout

    def __init__(self, server: Server, body: dict, clients: int = 4):
        super().__init__(clients)
        self.server, self.body = server, body
        self.answers: list[tuple[float, int | None, str | None, str]] = []

    def _run(self):
        flat = {item["name"]: item["data"][0] for item in self.body["inputs"]}
        routes = ((f"/v2/models/{MODEL_NAME}/infer", self.body), ("/predict", flat))
        with httpx.Client(base_url=self.server.url, timeout=30) as client:
            sent = 0
            while not self.stopping.is_set():
                path, body = routes[sent % 2]
                sent += 1
                try:
                    response = client.post(path, json=body)
                except httpx.RequestError as error:
                    self.answers.append((time.monotonic(), None, None, f"{type(error).__name__}: {error}"))
                    self.stopping.wait(0.1)  # don't spin on a server that is away
                    continue
                version = response.json().get("model_version") if response.status_code == 200 else None
                self.answers.append((time.monotonic(), response.status_code, version, response.text[:200]))


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory, sample_path):
    """MLflow with version 1 in Production, version 2 registered but rejected by the gate."""
    root = tmp_path_factory.mktemp("following")
    port = free_port()
    mlflow_service = services.mlflow(root / "mlflow", port=port)
    process = processes.start(mlflow_service, root)
    processes.wait_healthy(mlflow_service, process, root, 120)
    uri = services.tracking_uri(port)
    state = {"uri": uri, "root": root, "service": mlflow_service, "process": process}
    try:
        first = credit_risk("train", "--data", str(sample_path), tracking_uri=uri)
        assert first.returncode == 0, first.stdout + first.stderr
        weaker = credit_risk("train", "--data", str(sample_path), *WEAKER, tracking_uri=uri)
        assert weaker.returncode == 0 and "NOT promoted" in weaker.stdout, weaker.stdout + weaker.stderr
        yield state
    finally:
        # A test may have killed and restarted MLflow: stop whichever process is current.
        processes.terminate(state["process"].pid)


@pytest.fixture(scope="module")
def body(sample_path):
    return v2_body(load_training_data(sample_path).features.head(1))


def _production(uri: str) -> str:
    return registry.production_version(MlflowClient(uri)).version


def _promote(uri: str, version: str) -> None:
    registry.promote(MlflowClient(uri), version)


def _register_unloadable(uri: str) -> str:
    """A version of credit-risk-model that is not a credit-risk model: it cannot be served.

    Recorded as training records a version (its run in the training experiment, with held-out
    rows and an integrity record), so that it passes the integrity check and fails to *load*:
    the path of any failure other than a refusal (``tests/integration/test_integrity.py`` has
    the refusals)."""

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(verified.TRAINING_EXPERIMENT)
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
            with tempfile.TemporaryDirectory() as directory:
                rows = Path(directory) / Path(HELD_OUT_ARTIFACT).name
                pd.DataFrame({"probability": [0.5]}).to_parquet(rows)
                mlflow.log_artifact(str(rows), str(Path(HELD_OUT_ARTIFACT).parent))
            info = mlflow.pyfunc.log_model(name="model", python_model=Constant())
            record_integrity(client, run.info.run_id, info.model_id)
        version = mlflow.register_model(info.model_uri, registry.REGISTERED_MODEL_NAME)
    finally:
        mlflow.set_tracking_uri(None)
    return version.version


def test_started_before_mlflow_and_any_model_is_alive_not_ready_then_serves(tmp_path, sample_path, body):
    port = free_port()
    mlflow_service = services.mlflow(tmp_path / "registry", port=port)
    uri = services.tracking_uri(port)
    server = Server(uri, tmp_path, CREDIT_RISK_REGISTRY_POLL_S="1")  # MLflow is not up yet
    mlflow_process = None
    try:
        unreachable = f"cannot read models:/credit-risk-model/Production from the registry at {uri}"
        deadline = time.monotonic() + 30
        while unreachable not in (answer := server.ready()).json()["status"]:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.5)
        assert answer.status_code == 503
        assert server.infer(body).status_code == 400  # MLServer's "not ready yet", not a 500

        mlflow_process = processes.start(mlflow_service, tmp_path)
        processes.wait_healthy(mlflow_service, mlflow_process, tmp_path, 120)
        deadline = time.monotonic() + 30
        while "nothing to serve yet" not in (answer := server.ready()).json()["status"]:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.5)
        assert answer.status_code == 503
        with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc']}") as channel:
            assert not GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest()).ready

        trained = credit_risk("train", "--data", str(sample_path), tracking_uri=uri)
        assert trained.returncode == 0, trained.stderr
        server.wait_serving("1")
        answer = server.infer(body)
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"
        assert server.process.poll() is None
    finally:
        server.stop()
        if mlflow_process is not None:
            processes.terminate(mlflow_process.pid)


@pytest.fixture(scope="module")
def server(registry_uri, tmp_path_factory):
    """One server for most of the module: it looks at the registry every 0.5 s and retries a
    failed load after 2 s, 4 s, 8 s, ..., so that a back-off is told from a loop quickly."""
    server = Server(
        registry_uri["uri"],
        tmp_path_factory.mktemp("server"),
        CREDIT_RISK_REGISTRY_POLL_S="0.5",
        CREDIT_RISK_LOAD_RETRY_MIN_S="2",
    )
    try:
        server.wait_serving(_production(registry_uri["uri"]))
        yield server
    finally:
        server.stop()


def test_promote_and_rollback_under_load_switch_with_zero_failed_requests(registry_uri, body, tmp_path):
    """`credit-risk promote` then `credit-risk rollback`, with the server's default settings."""
    server = Server(registry_uri["uri"], tmp_path)
    moves = []
    try:
        server.wait_serving("1")
        pid = server.process.pid
        with Load(server, body) as load:
            time.sleep(3)
            for command, target in ((("promote", "--version", "2"), "2"), (("rollback",), "1")):
                sent_at = time.monotonic()
                moved = credit_risk(*command, "--reason", "test under load", tracking_uri=registry_uri["uri"])
                assert moved.returncode == 0, moved.stdout + moved.stderr
                # The registry has moved once the command is done (it loads and scores the
                # version first, which takes long on a loaded machine): serving's part starts here.
                moves.append((sent_at, time.monotonic()))
                server.wait_serving(target)
                time.sleep(2)
        alive_in_the_same_process = server.process.pid == pid and server.process.poll() is None
    finally:
        server.stop()
    answers = load.answers
    failed = [a for a in answers if a[1] != 200]  # transport errors (status None) included
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    (promote_sent, promoted_at), (rollback_sent, rolled_back_at) = moves
    switch_to_2 = min(at for at, _, version, _ in answers if version == "2")
    # Requests on 16 connections are answered out of order under load, so a version-1 answer
    # to a request sent just after switch_to_2 proves nothing: look after the rollback began.
    switch_back = min(at for at, _, version, _ in answers if version == "1" and at > rollback_sent)
    print(
        f"{len(answers)} requests; promote took {promoted_at - promote_sent:.1f} s and version 2 answered "
        f"{switch_to_2 - promoted_at:.1f} s after it; rollback took {rolled_back_at - rollback_sent:.1f} s "
        f"and version 1 answered again {switch_back - rolled_back_at:.1f} s after it"
    )
    assert switch_to_2 - promoted_at < SWITCH_WITHIN_S and switch_back - rolled_back_at < SWITCH_WITHIN_S
    assert all(version == "1" for at, _, version, _ in answers if at < promote_sent)
    assert all(version == "2" for at, _, version, _ in answers if switch_to_2 + 1 < at < rollback_sent)
    assert all(version == "1" for at, _, version, _ in answers if at > switch_back + 1)
    assert alive_in_the_same_process


def test_metadata_versioned_routes_and_metrics_follow_the_swap(server, body):
    served = server.ready().json()["version"]
    metadata = httpx.get(f"{server.url}/v2/models/{MODEL_NAME}", timeout=10).json()
    assert metadata["versions"] == [served] and metadata["parameters"]["registry_version"] == served

    on_version = server.infer(body, f"/v2/models/{MODEL_NAME}/versions/{served}/infer")
    assert on_version.status_code == 200 and on_version.json()["model_version"] == served
    other = server.infer(body, f"/v2/models/{MODEL_NAME}/versions/{'2' if served == '1' else '1'}/infer")
    assert other.status_code == 404
    assert f"version {served} is being served" in other.json()["error"]
    ready = httpx.get(f"{server.url}/v2/models/{MODEL_NAME}/versions/{served}/ready", timeout=10)
    assert ready.status_code == 200


def test_a_version_that_cannot_load_never_takes_serving_down(server, registry_uri, body):
    served = server.ready().json()["version"]
    broken = _register_unloadable(registry_uri["uri"])
    with Load(server, body, clients=2) as load:
        _promote(registry_uri["uri"], broken)
        deadline = time.monotonic() + SWITCH_WITHIN_S
        while "failed to load" not in server.ready().json()["status"]:
            assert time.monotonic() < deadline, server.ready().text
            time.sleep(0.3)
        time.sleep(7)  # attempts at ~0, 2 and 6 s: a back-off (a loop would make ~14)
    assert all(status == 200 and version == served for _, status, version, _ in load.answers)
    ready = server.ready()
    assert ready.status_code == 200 and ready.json()["version"] == served
    assert f"version {broken} of credit-risk-model failed to load" in ready.json()["status"]
    assert "is not a credit-risk model" in ready.json()["status"]
    attempts = server.log().count(f"version {broken} of credit-risk-model failed to load")
    assert 2 <= attempts <= 4, attempts
    failures = [line for line in server.metrics().splitlines()
                if line.startswith("credit_risk_model_load_failures_total{") and f'version="{broken}"' in line]  # fmt: skip
    assert failures and float(failures[0].split()[-1]) >= 2
    refused = [line for line in server.metrics().splitlines()
               if line.startswith("credit_risk_model_refused_total{") and f'version="{broken}"' in line]  # fmt: skip
    assert not refused, refused  # it passed its checks: a failure to load, not a refusal
    assert httpx.get(f"{server.url}/ping", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/model/info", timeout=10).json()["model_version"] == served
    assert httpx.get(f"{server.url}/health", timeout=10).json()["model_version"] == served
    _promote(registry_uri["uri"], served)  # back to a loadable version for the next tests


def test_stage_is_followed_and_an_alias_divergence_is_reported(server, registry_uri):
    served = server.ready().json()["version"]
    other = "1" if served == "2" else "2"
    client = MlflowClient(registry_uri["uri"])
    client.set_registered_model_alias(registry.REGISTERED_MODEL_NAME, registry.PRODUCTION_ALIAS, other)
    try:
        deadline = time.monotonic() + SWITCH_WITHIN_S
        while "alias 'production' points to version" not in server.ready().json()["status"]:
            assert time.monotonic() < deadline, server.ready().text
            time.sleep(0.3)
        assert server.ready().json()["version"] == served
        assert "registry divergence" in server.log()
    finally:
        client.set_registered_model_alias(registry.REGISTERED_MODEL_NAME, registry.PRODUCTION_ALIAS, served)


def test_repository_api_is_closed_on_rest_and_grpc(server, body):
    for path in (f"/v2/repository/models/{MODEL_NAME}/unload", f"/v2/repository/models/{MODEL_NAME}/load",
                 "/v2/repository/index"):  # fmt: skip
        refused = httpx.post(f"{server.url}{path}", json={}, timeout=10)
        assert refused.status_code == 403 and "model control is closed" in refused.json()["error"], path
    with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc']}") as channel:
        inference = GRPCInferenceServiceStub(channel)
        calls = (
            (inference.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=MODEL_NAME)),
            (inference.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=MODEL_NAME)),
            (inference.RepositoryIndex, pb.RepositoryIndexRequest()),
        )
        for call, request in calls:
            with pytest.raises(grpc.RpcError) as refused:
                call(request)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        legacy = ModelRepositoryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            legacy.RepositoryModelUnload(repository_pb.RepositoryModelUnloadRequest(model_name=MODEL_NAME))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert inference.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME)).ready
    assert server.ready().status_code == 200 and server.infer(body).status_code == 200


def test_mlflow_stopped_and_restarted_while_serving(server, registry_uri, body):
    served = server.ready().json()["version"]
    other = "1" if served == "2" else "2"
    os.killpg(registry_uri["process"].pid, signal.SIGKILL)
    registry_uri["process"].wait(timeout=30)
    try:
        deadline = time.monotonic() + SWITCH_WITHIN_S
        while "not following the registry right now" not in server.ready().json()["status"]:
            assert time.monotonic() < deadline, server.ready().text
            time.sleep(0.5)
        assert server.ready().status_code == 200  # still answering: the outage is MLflow's
        for _ in range(20):
            answer = server.infer(body)
            assert answer.status_code == 200 and answer.json()["model_version"] == served
    finally:
        registry_uri["process"] = processes.start(registry_uri["service"], registry_uri["root"])
        processes.wait_healthy(registry_uri["service"], registry_uri["process"], registry_uri["root"], 120)
    _promote(registry_uri["uri"], other)
    server.wait_serving(other)
    assert server.infer(body).json()["model_version"] == other
    metadata = httpx.get(f"{server.url}/v2/models/{MODEL_NAME}", timeout=10).json()
    assert metadata["versions"] == [other] and metadata["parameters"]["registry_version"] == other
    assert _gauge(server.metrics(), "credit_risk_model_info") == {served: 0.0, other: 1.0}
    assert _gauge(server.metrics(), "credit_risk_fast_path")[other] == 1.0


def _gauge(text: str, name: str) -> dict[str, float]:
    """The gauge's value per registry version (at most one dataset hash here)."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            version = line.split('version="')[1].split('"')[0]
            found[version] = float(line.split()[-1])
    return found


def test_configuration_that_waiting_cannot_fix_exits_non_zero(registry_uri, tmp_path):
    for env in ({"MLSERVER_PARALLEL_WORKERS": "2"},):
        result = credit_risk("serve", "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                             "--metrics-port", str(free_port()), tracking_uri=registry_uri["uri"], timeout=120,
                             **env)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "MLSERVER_PARALLEL_WORKERS=2" in result.stderr
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = credit_risk("serve", "--http-port", str(free_port()), "--grpc-port", str(port),
                             "--metrics-port", str(free_port()), tracking_uri=registry_uri["uri"], timeout=120)  # fmt: skip
    assert result.returncode != 0, result.stderr
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in result.stderr
