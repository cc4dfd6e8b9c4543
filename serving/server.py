"""``credit-risk serve``: MLServer 1.7.1 assembled from its own Python API, so that serving can
follow the registry.

``mlserver start`` cannot: it loads a model once, exits 0 when that load fails, reports ready
with no model loaded, and lets anyone on the inference ports load and unload models. This
launcher keeps MLServer's classes (``MLServer``, its REST app, gRPC server, model registry and
data plane) and changes only this, through the hooks in ``serving.mlserver_hooks`` (each one
pinned to MLServer 1.7.1, with the test that exercises it):

- one model, in this process. MLServer's worker processes (``MLSERVER_PARALLEL_WORKERS``
  other than 0) are refused at start: a worker pool holds its own copy of the runtime, which
  cannot swap versions, reports ready whatever it holds, and is closed before the HTTP server
  on shutdown. Run more replicas to use more cores;
- the repository API (index, load, unload) is refused on REST (403) and on gRPC
  (``PERMISSION_DENIED``): what is served is what the registry says, nothing else;
- readiness is 200 only while a version is served, 503 with the reason otherwise (the body
  below; ``serving.runtime`` defines ``ready``);
- ``/v2/models/<name>/versions/<v>/...`` answers for the served version, and 404 naming it
  for any other;
- SIGTERM or SIGINT drain: the ports stop taking requests, requests in flight finish, then the
  model and its capture spool close.

Exit codes: 0 after a clean stop; 2 for settings MLServer accepts but this launcher does not
(``StartError``); 1 when serving cannot start for another reason (a port in use).
"""

from __future__ import annotations

import asyncio
import sys

from fastapi import status
from fastapi.responses import JSONResponse
from mlserver.repository.load import load_model_settings
from mlserver.settings import ModelSettings, Settings
from mlserver.utils import install_uvloop_event_loop

from serving.limits import RequestLimits
from serving.mlserver_hooks import OneModelServer
from serving.settings import MODEL_SETTINGS_PATH, ServingSettings

# Triton's name for the binary tensor data extension of the REST protocol (``serving.binary``),
# which this server implements; listed in the server metadata (GET /v2) as Triton lists it.
BINARY_TENSOR_EXTENSION = "binary_tensor_data"


class StartError(RuntimeError):
    """Settings this launcher refuses; waiting would not help."""


def _readiness(ready: bool, name: str | None, model) -> JSONResponse:
    body = {"ready": ready}
    if model is not None:
        body.update(model=name, version=model.served_version, status=model.status)
    return JSONResponse(
        body, status_code=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE
    )


class CreditRiskServer(OneModelServer):
    """MLServer serving the one registry-following runtime; see the module docstring."""

    def __init__(self, settings: Settings, model_settings: ModelSettings, limits: RequestLimits):
        _check(settings)
        if BINARY_TENSOR_EXTENSION not in settings.extensions:  # GET /v2 lists what is served
            settings.extensions.append(BINARY_TENSOR_EXTENSION)
        super().__init__(settings, model_settings, limits)

    async def server_ready(self) -> JSONResponse:
        """Readiness that says why not: MLServer's answers 200 with no model at all."""
        model = await self.served_model()
        return _readiness(model is not None and model.ready, self.model_settings.name, model)

    async def model_ready(self, model_name: str, model_version: str | None = None) -> JSONResponse:
        """The model's readiness with the same body (MLServer's answers an empty 400)."""
        model = await self.get_model(model_name, model_version)
        return _readiness(model.ready, model_name, model)


def _check(settings: Settings) -> None:
    if settings.parallel_workers:
        raise StartError(
            f"MLSERVER_PARALLEL_WORKERS={settings.parallel_workers}: this server runs its model in "
            "one process (0), since a worker pool cannot follow the registry; run more replicas "
            "to use more cores"
        )
    if settings.tracing_server:
        raise StartError("MLSERVER_TRACING_SERVER is not supported by this launcher yet")
    if settings.kafka_enabled:  # MLServer would build its Kafka server, which start never runs
        raise StartError("MLSERVER_KAFKA_ENABLED is not supported by this launcher yet")


async def _serve() -> None:
    # MLServer's own readers of MLSERVER_* and of model-settings.json.
    settings, model_settings = Settings(), load_model_settings(str(MODEL_SETTINGS_PATH))
    await CreditRiskServer(settings, model_settings, ServingSettings().limits).start()


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
