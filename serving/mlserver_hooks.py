"""Every place where serving reaches into MLServer beyond its public API, pinned to one version.

MLServer's public API (runtimes, ``MLServer``, settings, the V2 types) is not enough to serve
a model that follows the registry; ``serving.server`` says why. The private methods it
overrides, the MLServer code it copies and the routes it replaces all live here, and this
module refuses to import with any MLServer other than ``MLSERVER_VERSION``: an upgrade must
come here first, re-read each hook against the new code and run the tests named below.

Hooks, why each is needed, and the test that exercises it:

- **The version pin** (``check_mlserver_version``, run at import). Everything below reads or
  copies MLServer 1.7.1's private code. Tests: ``tests/test_mlserver_hooks.py``.
- **``OneModelServer._create_model_registry``** (private, overridden): MLServer's own
  single-process registry with its own callbacks, as ``MLServer._create_model_registry``
  builds it when ``parallel_workers`` is 0, but of the class below. Tests: every serving test.
- **``ServedVersionRegistry``** (a ``MultiModelRegistry`` whose ``get_model`` is overridden):
  the runtime is registered without a version, and a version in a request
  (``/v2/models/<name>/versions/<v>/...``, gRPC ``model_version``) means a registry version:
  the served one is found, any other is a 404 naming the one served. Test:
  ``test_following.py::test_metadata_versioned_routes_and_metrics_follow_the_swap``.
- **``OneModelServer._create_servers``** (private, overridden): MLServer's REST server, built
  on ``ClosedRepositoryHandlers``; the gRPC server replaced by ``ClosedGRPCServer``; the
  readiness and inference routes replaced; ``serving.body_limit.BodyLimit`` added around
  MLServer's REST app (its private ``RESTServer._app``) before it starts, outermost, so that
  no route sees a body over the limit or a compressed one (MLServer's ``Request.body``
  gunzips without a bound whenever the header says gzip). Tests:
  ``test_following.py::test_repository_api_is_closed_on_rest_and_grpc``,
  ``test_request_limits.py`` (compression bombs, the server's memory).
- **``ClosedRepositoryHandlers``** (``ModelRepositoryHandlers`` without its repository or
  registry): the repository API (index, load, unload) would let anyone on the inference port
  change what is served; REST answers 403. Test: the same.
- **``ServingInferenceServicer``** (MLServer's ``InferenceServicer``): the three repository
  RPCs answer ``PERMISSION_DENIED`` (test: the same). Its private ``_InsertHeaders``, which
  decodes every request, is rewritten around MLServer's converter: MLServer answers a raw
  tensor it cannot unpack ``INTERNAL`` with ``struct``'s message ("unpack requires a buffer
  of 24 bytes"); here it is ``INVALID_ARGUMENT`` naming the input, found by
  ``raw_tensor_problem`` (which reads the private ``mlserver.raw._DatatypeToCtype``) once
  decoding has failed. Tests: ``tests/test_mlserver_hooks.py`` (each problem, against
  MLServer's own converter),
  ``test_serving.py::test_grpc_malformed_raw_tensor_is_invalid_argument_naming_the_input``.
  Its ``ModelInfer`` is a copy of MLServer's (with the private ``_GetReturnRaw`` and
  ``_SetTrailingMetadata``) that decodes a large message in the large-request thread
  (``serving.offload``). Tests: ``test_request_limits.py`` (gRPC at the row limit, probes).
- **413 is ``RESOURCE_EXHAUSTED`` over gRPC**: an entry added to MLServer's
  ``mlserver.grpc.utils.STATUS_CODE_MAPPING``, which has none for 413 (``UNKNOWN``). Test:
  ``test_request_limits.py::test_rows_over_the_limit_are_413_on_every_route``.
- **``ClosedGRPCServer._create_server``** (private; a copy of ``GRPCServer._create_server``
  that also calls the private ``_get_options``): registers the servicer above and not the
  deprecated ``ModelRepositoryService`` (its calls are ``UNIMPLEMENTED``), adds no tracing
  interceptor (the launcher refuses ``MLSERVER_TRACING_SERVER``), and turns grpc's
  "Failed to bind" into an ``OSError`` naming the address. Tests:
  ``test_following.py::test_repository_api_is_closed_on_rest_and_grpc`` and
  ``::test_configuration_that_waiting_cannot_fix_exits_non_zero``,
  ``test_serving.py::test_grpc_inference_equals_rest_bit_for_bit``.
- **``replace_readiness_routes``** (route surgery on ``RESTServer._app``'s route list, by
  index, with MLServer's own ``APIRoute``): MLServer's readiness answers 200 with no model at
  all and an empty 400 otherwise; the launcher's says which version and why not. Tests:
  ``test_following.py::test_started_before_mlflow_and_any_model_is_alive_not_ready_then_serves``,
  ``test_serving_readiness.py``.
- **``replace_inference_routes``** (the same route surgery): the four routes MLServer answers
  with ``Endpoints.infer`` (``/infer``, ``/generate``, each with and without a version) are
  answered by ``OneModelServer.infer``, which hands the raw body and headers to the runtime's
  ``infer_rest`` (``serving.v2_rest``: ``NaN`` as missing, binary tensors, one-line errors)
  instead of letting FastAPI validate the body into MLServer's pydantic ``InferenceRequest``.
  It keeps what MLServer's route did, through two private pieces: the private
  ``DataPlane._infer_contextmanager`` (model lookup with the 404 above, readiness,
  ``model_infer_request_*`` metrics, model context) and
  ``CloudEventsMiddleware._get_headers`` (the ``Ce-*`` answer headers). Tests:
  ``test_open_inference_clients.py`` (every client, the headers, the metrics),
  ``test_following.py::test_metadata_versioned_routes_and_metrics_follow_the_swap``.
- **``OneModelServer.stop``** (overridden to run once): uvicorn (0.54) captures SIGTERM for
  each of its two servers and raises it again after its own shutdown, so MLServer's handler
  would otherwise run once per server. Tests: ``test_serving_readiness.py::test_sigterm_stops_once_and_exits_0``,
  ``test_replicas.py::test_sigterm_of_one_pair_mid_traffic_loses_and_duplicates_nothing``.
- **``OneModelServer.start``** (overridden): the one model loads once the ports listen; a
  model that cannot even be set up stops the servers and raises (``MLServer.start`` would log
  it and exit 0); the model and its capture spool close only after the servers have drained
  (``MLServer.stop`` never unloads); a REST or metrics port uvicorn cannot bind (it calls
  ``sys.exit(3)``) becomes an ``OSError`` naming the address (``_listening``). Tests: every
  serving test, the SIGTERM tests above, and
  ``tests/test_mlserver_hooks.py::test_serve_on_a_port_in_use_exits_1_naming_it``.

Behaviour of MLServer 1.7.1 relied upon without a hook (public API, exercised by the tests):

- gRPC maps an ``MLServerError`` with status 400 to ``INVALID_ARGUMENT`` and passes its
  message (``mlserver.grpc.utils.STATUS_CODE_MAPPING``, ``handle_mlserver_error``). Test:
  ``test_serving.py::test_grpc_bad_request_is_invalid_argument_naming_the_input``.
- The registry writes a runtime's ``ready`` from what ``load()``/``unload()`` return, and
  the gRPC ``ServerReady``/``ModelReady`` and every inference read it
  (``DataPlane.ready``/``model_ready``/``_infer_contextmanager``): ``serving.runtime`` defines
  what it means. Test: ``test_serving_readiness.py``.
"""

# MLServer's modules are imported only once its version is known to fit (below).
# ruff: noqa: E402

from __future__ import annotations

from importlib.metadata import version as installed_version

MLSERVER_VERSION = "1.7.1"


def check_mlserver_version(installed: str | None = None) -> None:
    """Raise ``ImportError`` (named after this module, with one line) unless ``installed``
    (default: the installed ``mlserver`` distribution) is ``MLSERVER_VERSION``."""
    installed = installed_version("mlserver") if installed is None else installed
    if installed != MLSERVER_VERSION:
        raise ImportError(
            f"MLServer {installed} is installed, but {__name__} is written for MLServer "
            f"{MLSERVER_VERSION} only (it overrides MLServer's private code): install "
            f"mlserver=={MLSERVER_VERSION}",
            name=__name__,
        )


check_mlserver_version()

import asyncio
import math
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

import grpc
from fastapi import Request, status
from fastapi.responses import Response
from grpc import aio
from mlserver import MLServer
from mlserver.batching import load_batching
from mlserver.cloudevents import CloudEventsMiddleware, CloudEventsTypes
from mlserver.errors import MLServerError, ModelNotFound
from mlserver.grpc import GRPCServer
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc.converters import ModelInferRequestConverter, ModelInferResponseConverter
from mlserver.grpc.dataplane_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from mlserver.grpc.interceptors import LoggingInterceptor, PromServerInterceptor
from mlserver.grpc.servicers import InferenceServicer
from mlserver.grpc.utils import STATUS_CODE_MAPPING, handle_mlserver_error, to_headers
from mlserver.handlers import ModelRepositoryHandlers
from mlserver.model import MLModel
from mlserver.raw import _DatatypeToCtype
from mlserver.registry import MultiModelRegistry
from mlserver.rest.app import APIRoute
from mlserver.settings import ModelSettings, Settings
from mlserver.types import Datatype
from mlserver.utils import insert_headers

from serving import metrics, offload
from serving.body_limit import BodyLimit
from serving.limits import RequestLimits

_STOP_TIMEOUT_S = 30  # for the servers that started when another could not

# A request over one of serving's limits (HTTP 413, ``serving.errors.RequestTooLarge``) is
# RESOURCE_EXHAUSTED over gRPC, the code grpc itself answers a message over its size limit with
# (MLServer's mapping has no 413: it would be UNKNOWN).
STATUS_CODE_MAPPING[status.HTTP_413_REQUEST_ENTITY_TOO_LARGE] = grpc.StatusCode.RESOURCE_EXHAUSTED

CONTROL_CLOSED = (
    "model control is closed on this server: it serves whatever version the registry's "
    "Production stage names, and follows it by itself (promote or roll back in the registry)"
)


class ServedVersionRegistry(MultiModelRegistry):
    """MLServer's registry, with versions meaning registry versions of the one runtime."""

    async def get_model(self, name: str, version: str | None = None) -> MLModel:
        model = await super().get_model(name)  # the runtime is registered without a version
        served = getattr(model, "served_version", None)
        if version and version != served:  # gRPC sends "" for "no version"
            now = f"version {served} is being served" if served else "no version is being served yet"
            raise MLServerError(
                f"Model {name} with version {version} not found: {now}", status.HTTP_404_NOT_FOUND
            )
        return model


class ClosedRepositoryHandlers(ModelRepositoryHandlers):
    """The repository API on the public ports: refused, whatever the request."""

    def __init__(self):  # holds nothing: there is nothing it may touch
        pass

    async def index(self, payload):
        raise MLServerError(CONTROL_CLOSED, status.HTTP_403_FORBIDDEN)

    async def load(self, name: str) -> bool:
        raise MLServerError(CONTROL_CLOSED, status.HTTP_403_FORBIDDEN)

    async def unload(self, name: str) -> bool:
        raise MLServerError(CONTROL_CLOSED, status.HTTP_403_FORBIDDEN)


# Bytes per element as MLServer unpacks each datatype (``struct``, native layout), BYTES aside.
_RAW_ITEM_BYTES = {datatype.value: struct.calcsize(ctype) for datatype, ctype in _DatatypeToCtype.items()}


def raw_tensor_problem(request: pb.ModelInferRequest) -> str | None:
    """Why MLServer could not unpack ``request``'s ``raw_input_contents``, naming the input, or
    None when it can. MLServer's ``inject_raw`` gives each input without ``contents`` the next
    raw entry and unpacks it with ``struct`` in the native layout; a malformed one raises
    ``struct.error``, ``IndexError`` or ``ValueError``, which gRPC would answer ``INTERNAL``
    with a message naming nothing."""
    raw = request.raw_input_contents
    if not raw:
        return None
    consuming = [tensor for tensor in request.inputs if not tensor.contents.ListFields()]
    if len(consuming) > len(raw):
        return (
            f"raw_input_contents has {len(raw)} entries for {len(consuming)} input(s) without "
            "contents; send one entry per input, in the order of the inputs"
        )
    for tensor, content in zip(consuming, raw, strict=False):  # MLServer ignores extra entries
        if problem := _raw_problem(tensor.datatype, tensor.shape, content):
            return f"input '{tensor.name}': {problem}"
    return None


def _raw_problem(datatype: str, shape, content: bytes) -> str | None:
    item_bytes = _RAW_ITEM_BYTES.get(datatype)
    if item_bytes is None and datatype != Datatype.BYTES.value:
        return f"datatype {datatype!r} is not an Open Inference datatype"
    if any(size < 0 for size in shape):
        return f"shape {list(shape)} has a negative dimension"
    if item_bytes is None:
        return _bytes_framing_problem(content)
    expected = math.prod(shape) * item_bytes
    if len(content) != expected:
        return f"shape {list(shape)} of {datatype} needs {expected} raw bytes, got {len(content)}"
    return None


def _bytes_framing_problem(content: bytes) -> str | None:
    """BYTES elements are each a 4-byte little-endian length and that many bytes."""
    offset = 0
    while offset < len(content):
        if offset + 4 > len(content):
            return "raw BYTES end inside an element's 4-byte length"
        (size,) = struct.unpack_from("<I", content, offset)
        offset += 4 + size
        if offset > len(content):
            return "raw BYTES end inside an element"
    return None


def _decoded(request: pb.ModelInferRequest):
    """MLServer's conversion of a request; what it raises on a malformed one becomes a 400,
    which gRPC answers ``INVALID_ARGUMENT``. Checked only after it failed: well-formed requests
    pay nothing."""
    try:
        return ModelInferRequestConverter.to_types(request)
    except (struct.error, IndexError, ValueError, TypeError) as error:
        problem = raw_tensor_problem(request) or f"the request cannot be decoded: {error}"
        raise MLServerError(problem, status.HTTP_400_BAD_REQUEST) from error


class ServingInferenceServicer(InferenceServicer):
    """MLServer's gRPC inference service with its three repository methods refused, and a
    request it could not decode refused as ``INVALID_ARGUMENT`` naming the input."""

    @handle_mlserver_error
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        """MLServer's ``ModelInfer``, except that a large request (``serving.offload``) is
        decoded in the large-request thread: MLServer's conversion of a 100,000-row message
        takes ~80 ms of CPU, which the event loop's other requests and probes would wait for."""
        use_raw = InferenceServicer._GetReturnRaw(request)
        if offload.is_large(request.ByteSize()):
            headers = to_headers(context)  # the context is read on the loop only
            payload = await offload.run(partial(_decoded, request))
            insert_headers(payload, headers)
        else:
            payload = self._InsertHeaders(request, context)
        result = await self._data_plane.infer(
            payload=payload, name=request.model_name, version=request.model_version
        )
        self._SetTrailingMetadata(result, context)
        return ModelInferResponseConverter.from_types(result, use_raw=use_raw)

    def _InsertHeaders(self, request, context):
        """MLServer's decoding of a request and its headers (``ModelInfer`` and
        ``ModelStreamInfer`` call it, inside ``handle_mlserver_error``), decoding as below."""
        payload = _decoded(request)
        insert_headers(payload, to_headers(context))
        return payload

    async def RepositoryIndex(self, request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, CONTROL_CLOSED)

    async def RepositoryModelLoad(self, request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, CONTROL_CLOSED)

    async def RepositoryModelUnload(self, request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, CONTROL_CLOSED)


class ClosedGRPCServer(GRPCServer):
    """MLServer's gRPC server without the deprecated ``ModelRepositoryService`` (so its calls
    are UNIMPLEMENTED) and with the inference servicer above."""

    def _create_server(self):
        self._inference_servicer = ServingInferenceServicer(self._data_plane, self._model_repository_handlers)
        interceptors = [LoggingInterceptor()] if self._settings.debug else []
        if self._settings.metrics_endpoint:
            interceptors.append(PromServerInterceptor(enable_handling_time_histogram=True))
        self._server = aio.server(interceptors=interceptors, options=self._get_options())
        add_GRPCInferenceServiceServicer_to_server(self._inference_servicer, self._server)
        address = f"{self._settings.host}:{self._settings.grpc_port}"
        try:
            self._server.add_insecure_port(address)
        except RuntimeError as error:  # grpc's "Failed to bind"
            raise OSError(f"cannot listen for gRPC on {address}: {error}") from error
        return self._server


ServerReadiness = Callable[[], Awaitable[Response]]
ModelReadiness = Callable[[str, str | None], Awaitable[Response]]
Inference = Callable[[Request, str, str | None], Awaitable[Response]]


def replace_readiness_routes(app, server_ready: ServerReadiness, model_ready: ModelReadiness) -> None:
    """Answer MLServer's three readiness routes with ``server_ready`` and ``model_ready``
    (``model_ready(model_name, model_version=None)``), in the same places of the route list."""
    _replace_routes(
        app,
        {
            "/v2/health/ready": server_ready,
            "/v2/models/{model_name}/ready": model_ready,
            "/v2/models/{model_name}/versions/{model_version}/ready": model_ready,
        },
        "GET",
    )


# The routes MLServer answers with ``Endpoints.infer`` (``generate`` is the same handler).
INFERENCE_PATHS = (
    "/v2/models/{model_name}/infer",
    "/v2/models/{model_name}/versions/{model_version}/infer",
    "/v2/models/{model_name}/generate",
    "/v2/models/{model_name}/versions/{model_version}/generate",
)


def replace_inference_routes(app, infer: Inference) -> None:
    """Answer MLServer's REST inference routes with ``infer(request, model_name,
    model_version=None)``, which reads the body itself: FastAPI then neither reads nor
    validates it into MLServer's pydantic ``InferenceRequest`` (which refuses ``NaN`` and reads
    a binary body as JSON)."""
    _replace_routes(app, dict.fromkeys(INFERENCE_PATHS, infer), "POST")


def _replace_routes(app, endpoints: dict[str, Callable], method: str) -> None:
    """Each route of ``app`` whose path is a key of ``endpoints`` answered by its endpoint
    instead, with MLServer's own ``APIRoute``, in the same place of the route list."""
    missing = dict(endpoints)
    routes = app.router.routes
    for index, route in enumerate(routes):
        path = getattr(route, "path", None)
        if path in missing:
            routes[index] = APIRoute(path, missing.pop(path), methods=[method])
    if missing:
        raise RuntimeError(f"MLServer {MLSERVER_VERSION}'s REST app has no route(s) {sorted(missing)}")


class RestAnswer(Protocol):
    """What a runtime's ``infer_rest`` returns: the answer's request id, body and headers."""

    id: str
    body: bytes
    headers: dict[str, str]


async def _listening(what: str, address: str, server: Awaitable[None]) -> None:
    """Run one of MLServer's uvicorn servers. uvicorn answers a port it cannot bind by logging
    the ``OSError`` and calling ``sys.exit(3)``, which would end the process with tracebacks
    and exit code 3; here it is an ``OSError`` naming the address."""
    try:
        await server
    except SystemExit as exited:
        cause = exited.__context__  # sys.exit is called while handling uvicorn's OSError
        reason = f": {cause}" if isinstance(cause, OSError) else f" (uvicorn exited {exited.code})"
        raise OSError(f"cannot listen for {what} on {address}{reason}") from cause


class OneModelServer(MLServer):
    """MLServer serving one model, in this process, with the hooks above: a subclass answers
    readiness (``server_ready``, ``model_ready``)."""

    def __init__(self, settings: Settings, model_settings: ModelSettings, limits: RequestLimits):
        self.model_settings = model_settings
        self.limits = limits
        # The CloudEvents headers MLServer's data plane adds to every answer (``Ce-Id`` is the
        # request id); the REST inference route below adds them itself.
        self._cloud_events = CloudEventsMiddleware(settings)
        super().__init__(settings)

    async def server_ready(self) -> Response:
        raise NotImplementedError

    async def model_ready(self, model_name: str, model_version: str | None = None) -> Response:
        raise NotImplementedError

    async def infer(self, request: Request, model_name: str, model_version: str | None = None) -> Response:
        """The V2 REST inference routes: the runtime's ``infer_rest(body, headers)`` decodes,
        scores and encodes (``RestAnswer``); this adds what MLServer's route would. It runs in
        MLServer's ``DataPlane._infer_contextmanager`` (private), which finds the model (404
        for another version, through ``ServedVersionRegistry``), refuses it while not ready,
        sets MLServer's model context and keeps its ``model_infer_request_*`` metrics; the
        answer gets the CloudEvents headers of ``CloudEventsMiddleware._get_headers``
        (private), as MLServer's own route gives them."""
        body = await request.body()
        async with self._data_plane._infer_contextmanager(model_name, model_version) as model:
            answer: RestAnswer = await model.infer_rest(body, request.headers)
        events = self._cloud_events._get_headers(CloudEventsTypes.Response, model.settings, answer.id)
        return Response(answer.body, headers={**answer.headers, **events})

    async def served_model(self) -> MLModel | None:
        """The one model's runtime, once ``start`` registered it."""
        try:
            return await self._model_registry.get_model(self.model_settings.name)
        except ModelNotFound:
            return None

    async def get_model(self, name: str, version: str | None = None) -> MLModel:
        """The runtime a request names, or the ``MLServerError`` (404) MLServer answers with."""
        return await self._model_registry.get_model(name, version)

    def _create_model_registry(self) -> MultiModelRegistry:
        return ServedVersionRegistry(
            on_model_load=[self.add_custom_handlers, load_batching],
            on_model_reload=[self.reload_custom_handlers],
            on_model_unload=[self.remove_custom_handlers],
        )

    def _create_servers(self):
        self._model_repository_handlers = ClosedRepositoryHandlers()
        super()._create_servers()
        self._grpc_server = ClosedGRPCServer(
            self._settings, self._data_plane, self._model_repository_handlers
        )
        app = self._rest_server._app
        replace_readiness_routes(app, self.server_ready, self.model_ready)
        replace_inference_routes(app, self.infer)
        # Outermost, before the app starts: no body over the limit (after decompression)
        # reaches any route, and none arrives compressed (MLServer's ``Request.body`` would
        # gunzip it without a bound).
        app.add_middleware(
            BodyLimit,
            max_bytes=self.limits.max_body_bytes,
            on_refused=metrics.body_refusals(self.model_settings.name),
        )

    async def stop(self, sig: int | None = None) -> None:
        """Once, however many times it is asked (see the module docstring)."""
        if getattr(self, "_stopping", False):
            return
        self._stopping = True
        await super().stop(sig)

    async def start(self, models_settings=None) -> None:
        """Serve until stopped; raise if the model cannot even be set up (bad configuration) or
        a port cannot be bound, once the other servers have stopped."""
        servers = [asyncio.ensure_future(server) for server in self._server_runs()]
        serving = asyncio.gather(*servers)
        try:
            await self._model_registry.load(self.model_settings)
        except Exception:
            await self.stop()
            serving.cancel()
            raise
        try:
            await serving
        except OSError:  # a port taken: stop the servers that did start, so they close cleanly
            await self.stop()
            await asyncio.wait(servers, timeout=_STOP_TIMEOUT_S)
            raise
        finally:
            # Servers have drained (or never started): only now close the model and its spool.
            await self._model_registry.unload(self.model_settings.name)

    def _server_runs(self) -> list[Awaitable[None]]:
        host = self._settings.host
        runs = [
            _listening("HTTP", f"{host}:{self._settings.http_port}", self._rest_server.start()),
            self._grpc_server.start(),
        ]
        if self._metrics_server:
            address = f"{host}:{self._settings.metrics_port}"
            runs.append(_listening("metrics", address, self._metrics_server.start()))
        return runs
