"""The pieces that wire the V2 codec and the request limits into MLServer, each on its own:
the route surgery on MLServer's own REST app, 413 over gRPC, the limits in the serving
settings, the large-request thread and its compression, the refused-body counter. Their
behaviour on a real server is in ``tests/integration/test_request_limits.py`` and
``test_open_inference_clients.py``."""

from __future__ import annotations

import asyncio
import gzip
import threading

import grpc
import pytest
from fastapi import Request
from mlserver.grpc.utils import _grpc_status_code
from mlserver.handlers import DataPlane, ModelRepositoryHandlers
from mlserver.registry import MultiModelRegistry
from mlserver.rest.app import create_app
from mlserver.settings import Settings
from prometheus_client import REGISTRY

from serving import metrics, offload
from serving.errors import RequestTooLarge
from serving.mlserver_hooks import INFERENCE_PATHS, replace_inference_routes
from serving.settings import ServingSettings

SETTINGS = Settings(metrics_endpoint=None)


@pytest.fixture(scope="module")
def data_plane():
    return DataPlane(SETTINGS, MultiModelRegistry())  # registers MLServer's metrics: once


@pytest.fixture
def mlserver_app(data_plane):
    """MLServer 1.7.1's own REST app, as its ``RESTServer`` builds it."""
    return create_app(SETTINGS, data_plane, ModelRepositoryHandlers(None, None))


def test_the_inference_routes_are_replaced_in_place(mlserver_app):
    async def infer(request: Request, model_name: str, model_version: str | None = None): ...

    before = [getattr(route, "path", None) for route in mlserver_app.router.routes]
    replace_inference_routes(mlserver_app, infer)
    after = mlserver_app.router.routes
    assert [getattr(route, "path", None) for route in after] == before
    replaced = [route for route in after if getattr(route, "path", None) in INFERENCE_PATHS]
    assert len(replaced) == len(INFERENCE_PATHS) == 4
    assert all(route.endpoint is infer and route.methods == {"POST"} for route in replaced)
    # FastAPI validates no body into MLServer's InferenceRequest any more: the endpoint reads it.
    assert all(route.body_field is None for route in replaced)


def test_an_mlserver_without_the_inference_routes_is_refused_loudly(mlserver_app):
    mlserver_app.router.routes[:] = [
        route for route in mlserver_app.router.routes if getattr(route, "path", "").endswith("/ready")
    ]
    with pytest.raises(RuntimeError, match="REST app has no route"):
        replace_inference_routes(mlserver_app, lambda: None)


def test_a_request_over_a_limit_is_resource_exhausted_over_grpc():
    assert _grpc_status_code(RequestTooLarge("too many rows")) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_serving_settings_carry_the_request_limits(monkeypatch):
    monkeypatch.setenv("CREDIT_RISK_MAX_ROWS", "1234")
    monkeypatch.setenv("CREDIT_RISK_MAX_BODY_BYTES", "5678")
    limits = ServingSettings().limits
    assert (limits.max_rows, limits.max_body_bytes) == (1234, 5678)


def test_refused_bodies_are_counted_by_model_and_status():
    def value(status: str) -> float:
        sample = REGISTRY.get_sample_value(
            "credit_risk_request_bodies_refused_total", {"model": "wiring-test", "status": status}
        )
        return sample or 0.0

    count = metrics.body_refusals("wiring-test")
    assert value("413") == 0.0  # exists from the start
    count(413)
    count(415)
    assert (value("413"), value("415")) == (1.0, 1.0)


def test_large_is_over_64_kib():
    assert not offload.is_large(64 << 10) and offload.is_large((64 << 10) + 1)


def test_large_requests_run_one_at_a_time_in_one_thread_keeping_the_context():
    from mlserver.context import model_name_var

    seen = []

    def work(tag):
        seen.append((tag, threading.current_thread().name, model_name_var.get(None)))
        return tag

    async def main():
        model_name_var.set("credit-risk")
        return await asyncio.gather(*(offload.run(lambda tag=tag: work(tag)) for tag in range(5)))

    assert asyncio.run(main()) == list(range(5))
    assert [tag for tag, _, _ in seen] == list(range(5))
    assert {name for _, name, _ in seen} == {"credit-risk-large-request_0"}
    assert {model for _, _, model in seen} == {"credit-risk"}


@pytest.mark.parametrize(
    "accept, compressed",
    [("gzip", True), ("gzip, deflate, br", True), ("deflate", False), ("", False), (None, False)],
)
def test_answers_are_gzipped_when_the_client_takes_gzip(accept, compressed):
    body, headers = b'{"outputs": [' + b"0.25, " * 200 + b"1]}", {"Content-Type": "application/json"}
    got, got_headers = offload.gzipped(body, headers, accept)
    if compressed:
        assert gzip.decompress(got) == body and len(got) < len(body)
        assert got_headers == {**headers, "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
    else:
        assert (got, got_headers) == (body, headers)


def test_small_answers_are_not_gzipped_as_starlette_leaves_them():
    body = b"x" * (offload.GZIP_MINIMUM_BYTES - 1)
    assert offload.gzipped(body, {}, "gzip") == (body, {})
