"""Readiness as MLServer's gRPC service reports it, load failures in the metrics, and a clean
SIGTERM: one server of its own on its own MLflow, which holds no model, then only one that
cannot load (no training here); the session's server (``mlserver``) is the one serving.

Readiness is "MLServer loaded the runtime AND a registry version is served"
(``serving.runtime.CreditRiskRuntime.ready``): MLServer has loaded the runtime here although
there is no version to serve, and the gRPC ``ServerReady``/``ModelReady`` (MLServer's own
``DataPlane``) must say not ready.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import httpx
import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc.dataplane_pb2_grpc import GRPCInferenceServiceStub

from model.identity import PRODUCTION_STAGE, REGISTERED_MODEL_NAME
from serving.settings import MODEL_NAME
from stack import processes, services
from tests.helpers import free_port
from tests.integration.test_following import Server

pytestmark = pytest.mark.integration

WITHIN_S = 60


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory):
    """A real MLflow with no registered model yet."""
    root = tmp_path_factory.mktemp("readiness")
    port = free_port()
    service = services.mlflow(root / "mlflow", port=port)
    process = processes.start(service, root)
    try:
        processes.wait_healthy(service, process, root, 120)
        yield services.tracking_uri(port)
    finally:
        processes.terminate(process.pid)


@pytest.fixture(scope="module")
def server(empty_registry, tmp_path_factory):
    server = Server(
        empty_registry,
        tmp_path_factory.mktemp("server"),
        CREDIT_RISK_REGISTRY_POLL_S="0.5",
        CREDIT_RISK_LOAD_RETRY_MIN_S="1",
    )
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()


def _wait_for(condition, what: str, timeout: float = WITHIN_S):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.3)
    return found


def _grpc_ready(grpc_port: int) -> tuple[bool, bool]:
    """(``ServerReady``, ``ModelReady`` of the model) over MLServer's own gRPC service."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        return (
            stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready,
            stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=10).ready,
        )


def _load_failures(server) -> dict[tuple[str, str], float]:
    """``credit_risk_model_load_failures_total`` by (model, version) label."""
    found = {}
    for line in server.metrics().splitlines():
        if line.startswith("credit_risk_model_load_failures_total{"):
            labels = dict(
                item.split("=", 1) for item in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            found[(labels["model"].strip('"'), labels["version"].strip('"'))] = float(line.split()[-1])
    return found


def test_not_ready_over_grpc_and_rest_while_no_version_is_served(server):
    _wait_for(lambda: "nothing to serve yet" in server.ready().json()["status"], "waiting for a model")
    # MLServer has loaded the runtime (and so written ready=True) ...
    assert "Loaded model 'credit-risk' successfully" in server.log()
    # ... yet with no version in the slot, every readiness MLServer or the launcher answers is no.
    assert _grpc_ready(server.ports["grpc"]) == (False, False)
    assert server.ready().status_code == 503
    model_ready = httpx.get(f"{server.url}/v2/models/{MODEL_NAME}/ready", timeout=10)
    assert model_ready.status_code == 503 and model_ready.json()["ready"] is False
    assert httpx.get(f"{server.url}/health", timeout=10).json()["model_loaded"] is False


def _register_unloadable(tracking_uri: str) -> str:
    """A version that is not a credit-risk model, moved to Production by hand."""

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment(f"unloadable-{time.time_ns()}")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(name="model", python_model=Constant())
        version = mlflow.register_model(info.model_uri, REGISTERED_MODEL_NAME).version
    finally:
        mlflow.set_tracking_uri(None)
    client.transition_model_version_stage(REGISTERED_MODEL_NAME, version, PRODUCTION_STAGE)
    return str(version)


def test_load_failures_are_labelled_with_the_served_models_name(server, empty_registry):
    broken = _register_unloadable(empty_registry)
    _wait_for(lambda: _load_failures(server).get((MODEL_NAME, broken)), "counted")
    assert all(model == MODEL_NAME for model, _ in _load_failures(server)), _load_failures(server)
    assert f"version {broken} of {REGISTERED_MODEL_NAME} failed to load" in server.ready().json()["status"]
    # A version that failed to load is not served: still not ready, over gRPC too.
    assert _grpc_ready(server.ports["grpc"]) == (False, False)
    assert server.ready().status_code == 503


def test_ready_over_grpc_while_a_version_is_served(mlserver):
    assert httpx.get(f"{mlserver['url']}/v2/health/ready", timeout=10).json()["version"]
    assert _grpc_ready(mlserver["grpc"]) == (True, True)


def test_sigterm_stops_once_and_exits_0(server):
    """MLServer's stop runs once although uvicorn raises SIGTERM again for each of its servers;
    the model closes only after the servers have drained."""
    os.killpg(server.process.pid, signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0, server.log()
    log = server.log()
    assert log.count("gRPC server shutdown complete") == 1, log
    assert log.index("gRPC server shutdown complete") < log.index(
        "Unloaded all versions of model 'credit-risk'"
    )
