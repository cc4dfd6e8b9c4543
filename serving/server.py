"""``credit-risk serve``: MLServer 1.7.1 assembled from its own Python API, so that serving can
follow the registry.

``mlserver start`` cannot: it loads a model once, exits 0 when that load fails, reports ready
with no model loaded, and lets anyone on the inference ports load and unload models. This
launcher keeps MLServer's classes (``MLServer``, its REST app, gRPC server, model registry and
data plane) and changes only this:

- one model, in this process: ``parallel_workers`` must be 0, because a worker pool would
  hold its own copy of the runtime that cannot swap versions, report ready regardless, and be
  closed before the HTTP server on shutdown;
- the repository API (index, load, unload) is refused on REST (403) and on gRPC
  (``PERMISSION_DENIED``): what is served is what the registry says, nothing else;
- readiness is 200 only while a version is served, 503 with the reason otherwise;
- ``/v2/models/<name>/versions/<v>/...`` answers for the served version, and 404 naming it
  for any other;
- a start that cannot work (a port in use, bad settings) exits non-zero, never 0; SIGTERM or
  SIGINT drain: the ports stop taking requests, requests in flight finish, then the model and
  its capture spool close.

Every MLServer hook used here is pinned to MLServer 1.7.1 and exercised by
``tests/integration/test_following.py``, so an upgrade that moves one fails loudly:
``MLServer._create_model_registry`` and ``_create_servers``, ``MultiModelRegistry.get_model``,
``GRPCServer._create_server`` and ``_get_options``, ``RESTServer._app`` and MLServer's ``APIRoute``.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from fastapi import status
from fastapi.responses import JSONResponse
from grpc import aio
from mlserver import MLServer
from mlserver.batching import load_batching
from mlserver.errors import MLServerError, ModelNotFound
from mlserver.grpc import GRPCServer
from mlserver.grpc.dataplane_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from mlserver.grpc.interceptors import LoggingInterceptor, PromServerInterceptor
from mlserver.grpc.servicers import InferenceServicer
from mlserver.handlers import ModelRepositoryHandlers
from mlserver.registry import MultiModelRegistry
from mlserver.repository.load import load_model_settings
from mlserver.rest.app import APIRoute
from mlserver.settings import ModelSettings, Settings
from mlserver.utils import install_uvloop_event_loop

from serving.settings import MODEL_SETTINGS_PATH

CONTROL_CLOSED = (
    "model control is closed on this server: it serves whatever version the registry's "
    "Production stage names, and follows it by itself (promote or roll back in the registry)"
)


class StartError(RuntimeError):
    """Serving cannot start with this configuration; waiting would not help."""


class _ServedModelRegistry(MultiModelRegistry):
    """MLServer's registry, with versions meaning registry versions of the one runtime."""

    async def get_model(self, name: str, version: str | None = None):
        model = await super().get_model(name)  # the runtime is registered without a version
        served = getattr(model, "served_version", None)
        if version and version != served:  # gRPC sends "" for "no version"
            now = f"version {served} is being served" if served else "no version is being served yet"
            raise MLServerError(
                f"Model {name} with version {version} not found: {now}", status.HTTP_404_NOT_FOUND
            )
        return model


class _ClosedRepository(ModelRepositoryHandlers):
    """The repository API on the public ports: refused, whatever the request."""

    def __init__(self):  # holds nothing: there is nothing it may touch
        pass

    async def index(self, payload):
        raise MLServerError(CONTROL_CLOSED, status.HTTP_403_FORBIDDEN)

    async def load(self, name: str) -> bool:
        raise MLServerError(CONTROL_CLOSED, status.HTTP_403_FORBIDDEN)

    async def unload(self, name: str) -> bool:
        raise MLServerError(CONTROL_CLOSED, status.HTTP_403_FORBIDDEN)


class _InferenceServicer(InferenceServicer):
    """MLServer's gRPC inference service with its three repository methods refused."""

    async def RepositoryIndex(self, request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, CONTROL_CLOSED)

    async def RepositoryModelLoad(self, request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, CONTROL_CLOSED)

    async def RepositoryModelUnload(self, request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, CONTROL_CLOSED)


class _GRPCServer(GRPCServer):
    """MLServer's gRPC server without the deprecated ``ModelRepositoryService`` (so its calls
    are UNIMPLEMENTED) and with the closed inference servicer above. Tracing, which MLServer
    would add when ``tracing_server`` is set, is refused at start instead (``_check``)."""

    def _create_server(self):
        self._inference_servicer = _InferenceServicer(self._data_plane, self._model_repository_handlers)
        interceptors = [LoggingInterceptor()] if self._settings.debug else []
        if self._settings.metrics_endpoint:
            interceptors.append(PromServerInterceptor(enable_handling_time_histogram=True))
        self._server = aio.server(interceptors=interceptors, options=self._get_options())
        add_GRPCInferenceServiceServicer_to_server(self._inference_servicer, self._server)
        address = f"{self._settings.host}:{self._settings.grpc_port}"
        try:
            self._server.add_insecure_port(address)
        except RuntimeError as error:  # grpc's "Failed to bind"
            raise StartError(f"cannot listen for gRPC on {address}: {error}") from error
        return self._server


def _readiness(ready: bool, name: str | None, model) -> JSONResponse:
    body = {"ready": ready}
    if model is not None:
        body.update(model=name, version=model.served_version, status=model.status)
    return JSONResponse(
        body, status_code=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE
    )


class CreditRiskServer(MLServer):
    """MLServer serving one registry-following runtime; see the module docstring."""

    def __init__(self, settings: Settings, model_settings: ModelSettings):
        _check(settings)
        self._model_settings = model_settings
        super().__init__(settings)

    def _create_model_registry(self) -> MultiModelRegistry:
        return _ServedModelRegistry(
            on_model_load=[self.add_custom_handlers, load_batching],
            on_model_reload=[self.reload_custom_handlers],
            on_model_unload=[self.remove_custom_handlers],
        )

    def _create_servers(self):
        self._model_repository_handlers = _ClosedRepository()
        super()._create_servers()
        self._grpc_server = _GRPCServer(self._settings, self._data_plane, self._model_repository_handlers)
        self._replace_readiness_routes()

    def _replace_readiness_routes(self) -> None:
        """Readiness that says why not: MLServer's answers 200 with no model at all and an
        empty 400 otherwise."""
        name = self._model_settings.name

        async def server_ready():
            model = await self._served_model()
            return _readiness(model is not None and model.ready, name, model)

        async def model_ready(model_name: str, model_version: str | None = None):
            model = await self._model_registry.get_model(model_name, model_version)
            return _readiness(model.ready, model_name, model)

        replacements = {
            "/v2/health/ready": server_ready,
            "/v2/models/{model_name}/ready": model_ready,
            "/v2/models/{model_name}/versions/{model_version}/ready": model_ready,
        }
        routes = self._rest_server._app.router.routes
        for index, route in enumerate(routes):
            if getattr(route, "path", None) in replacements:
                routes[index] = APIRoute(route.path, replacements.pop(route.path), methods=["GET"])
        if replacements:
            raise StartError(f"MLServer's app has no route(s) {sorted(replacements)}: is it still 1.7.1?")

    async def _served_model(self):
        try:
            return await self._model_registry.get_model(self._model_settings.name)
        except ModelNotFound:
            return None

    async def stop(self, sig: int | None = None) -> None:
        """Once, however many times it is asked: uvicorn (0.54) captures SIGTERM for each of
        its two servers and raises it again after its own shutdown, so MLServer's handler
        would otherwise run once per server."""
        if getattr(self, "_stopping", False):
            return
        self._stopping = True
        await super().stop(sig)

    async def start(self, models_settings=None) -> None:
        """Serve until stopped; raise if the model cannot even be set up (bad configuration)."""
        servers = [self._rest_server.start(), self._grpc_server.start()]
        if self._metrics_server:
            servers.append(self._metrics_server.start())
        serving = asyncio.gather(*servers)
        try:
            await self._model_registry.load(self._model_settings)
        except Exception:
            await self.stop()
            serving.cancel()
            raise
        await serving
        # Servers have drained: only now close the model and its capture spool.
        await self._model_registry.unload(self._model_settings.name)


def _check(settings: Settings) -> None:
    if settings.parallel_workers:
        raise StartError(
            f"MLSERVER_PARALLEL_WORKERS={settings.parallel_workers}: this server runs its model in "
            "one process (0), since a worker pool cannot follow the registry; run more replicas "
            "to use more cores"
        )
    if settings.tracing_server:
        raise StartError("MLSERVER_TRACING_SERVER is not supported by this launcher yet")


async def _serve() -> None:
    # MLServer's own readers of MLSERVER_* and of model-settings.json.
    settings, model_settings = Settings(), load_model_settings(str(MODEL_SETTINGS_PATH))
    await CreditRiskServer(settings, model_settings).start()


def main() -> int:
    """Run until SIGTERM/SIGINT; the exit code says whether it stopped cleanly."""
    install_uvloop_event_loop()
    try:
        asyncio.run(_serve())
    except StartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot serve: {error}", file=sys.stderr)
        return 1
    return 0
