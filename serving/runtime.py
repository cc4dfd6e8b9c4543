"""The MLServer runtime: mlserver-mlflow's runtime, made strict, traceable and registry-following.

- It serves one slot, ``Served``: a loaded registry version with everything that names it.
  ``serving.follower`` fills the slot when the configured URI (``model-settings.json``:
  ``model.identity.PRODUCTION_MODEL_URI``) moves, in one assignment; each request reads the
  slot once, so its answer, response parameters, captured record and metrics all name the
  same version, through a swap too.
- A version enters the slot only through ``model.verified``: its files checked against the
  integrity record training wrote before anything is unpickled, then its logged held-out rows
  answered bit for bit as at training. A refusal leaves the slot as it is (the follower says
  why and retries on its back-off) and is counted (``credit_risk_model_refused_total``); the
  verified folder is kept while its version is served.
- Requests decode strictly into one float64 matrix (``serving.v2``) and are scored by the
  model's own ``score`` (``model.scoring``): the same code the gate and ``mlflow models serve``
  run, minus the DataFrames. Bad input is a 400 naming the input (``INVALID_ARGUMENT`` over
  gRPC).
- The registry version and ``dataset_hash`` are in the model metadata, every response's
  ``parameters`` and this runtime's Prometheus metrics (``serving.metrics``).
- Every answered request is appended to the capture spool (``serving.capture``) before its
  response leaves, for the logging sidecar to ship.
- Readiness (``ready``) is "MLServer loaded this runtime AND a registry version is in the
  slot"; ``status`` says why not (see ``CreditRiskRuntime.ready``).
- The earlier FastAPI design's routes live on as MLServer custom handlers on the same port:
  ``POST /predict`` (``serving.flat_json``), ``GET /model/info`` and ``GET /health``, served
  from the same slot and validated, counted and captured exactly like V2 inferences.
  Timestamps they write come from ``model.identity.utc_timestamp``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

from fastapi import Request
from mlflow.tracking import MlflowClient
from mlserver.errors import MLServerError, ModelNotReady
from mlserver.handlers import custom_handler
from mlserver.logging import logger
from mlserver.types import (
    InferenceRequest,
    InferenceResponse,
    MetadataModelResponse,
    MetadataTensor,
    Parameters,
)
from mlserver.utils import get_model_uri
from mlserver_mlflow import MLflowRuntime
from mlserver_mlflow.metadata import (
    DefaultInputPrefix,
    DefaultOutputPrefix,
    to_metadata_tensors,
    to_model_content_type,
)
from threadpoolctl import threadpool_limits

from model import scoring, verified
from model.identity import DATASET_HASH, utc_timestamp
from model.schema import OUTPUT_PREDICTION, OUTPUT_PROBABILITY, InvalidFeatures
from serving import flat_json, metrics, v2
from serving.capture import SpoolWriter, encode
from serving.follower import RegistryFollower
from serving.settings import ServingSettings


@dataclass(frozen=True)
class Served:
    """One loaded registry version and everything that names it."""

    version: str
    model: scoring.LoadedModel
    parameters: dict[str, str]  # in every response and in the metadata
    capture_identity: dict[str, str]  # in every captured record
    labels: metrics.Labels
    meters: metrics.Meters
    input_names: list[str]
    output_names: list[str]
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    content_type: str | None
    info: dict  # what GET /model/info says: the registry's record of this version
    checked: verified.VerifiedVersion  # how it was checked, and its folder (closed once swapped out)


class CreditRiskRuntime(MLflowRuntime):
    """mlserver-mlflow's runtime serving whichever version the registry URI names."""

    _served: Served | None = None
    _loaded = False  # MLServer's own word: what load() (True) and unload() (False) left

    @property
    def ready(self) -> bool:
        """MLServer loaded this runtime AND a registry version is in the slot.

        MLServer writes ``ready`` from what ``load()`` and ``unload()`` return
        (``mlserver.registry.SingleModelRegistry._load_model``, ``_unload_model``); the setter
        keeps that write, and the getter adds the slot, which only ``serving.follower`` fills.
        So ``load()`` returning True (it starts the follower) does not make the runtime ready
        before a version is loaded, and ``unload()`` makes it unready whatever the slot holds.
        MLServer reads ``ready`` in the gRPC ``ServerReady``/``ModelReady``
        (``DataPlane.ready``/``model_ready``) and before every inference
        (``DataPlane._infer_contextmanager``: "not ready yet", 400); the REST readiness routes
        are the launcher's (``serving.server``) and read it too.
        """
        return self._loaded and self._served is not None

    @ready.setter
    def ready(self, loaded: bool) -> None:
        self._loaded = loaded

    @property
    def served_version(self) -> str | None:
        served = self._served
        return served.version if served else None

    @property
    def status(self) -> str:
        follower = getattr(self, "_follower", None)
        if follower is None:
            return "not loaded"
        served = self._served
        unverified = served is not None and served.checked.manifest is None
        return follower.status + (f"; {served.checked.description}" if unverified else "")

    async def load(self) -> bool:
        # One OpenMP thread per process: with more, p99 latency jumped from ~2 ms to ~700 ms
        # whenever another process was busy on the second core.
        threadpool_limits(limits=int(os.environ.get("OMP_NUM_THREADS", "1")), user_api="openmp")
        settings = ServingSettings()
        self._verification = verified.VerificationSettings()
        uri = await get_model_uri(self._settings)
        self._spool = SpoolWriter(settings.spool) if settings.spool.directory else None
        self._follower = RegistryFollower(
            uri,
            alias=settings.follow_alias(uri),
            poll_interval_s=settings.registry_poll_s,
            retry_min_s=settings.load_retry_min_s,
            retry_max_s=settings.load_retry_max_s,
            load=self._load_version,
            swap=self._swap,
            on_load_failure=partial(metrics.model_load_failed, self.name),
            on_refused=partial(metrics.model_refused, self.name),
        )
        self._following = asyncio.create_task(self._follower.run())
        return True

    def _load_version(self, registered_name: str, version: str) -> Served:
        """Runs in a worker thread: everything slow happens here, before the swap. Raises
        ``model.verified.VersionRefused`` for a version that must not be served."""
        checked = verified.load_version(registered_name, version, settings=self._verification)
        try:
            return self._describe(registered_name, version, checked)
        except BaseException:
            checked.close()
            raise

    def _describe(self, registered_name: str, version: str, checked: verified.VerifiedVersion) -> Served:
        model_uri = f"models:/{registered_name}/{version}"
        model = checked.model
        signature = model.pyfunc.metadata.signature
        dataset_hash = model.dataset_hash
        labels = metrics.Labels(self.name, version, dataset_hash)
        return Served(
            info=_registry_record(registered_name, version, model_uri, dataset_hash),
            version=version,
            model=model,
            parameters={
                "registered_model": registered_name,
                "registry_version": version,
                "model_uri": model_uri,
                DATASET_HASH: dataset_hash,
            },
            capture_identity={
                "model_name": self.name,
                "registered_model": registered_name,
                "model_version": version,
                DATASET_HASH: dataset_hash,
            },
            labels=labels,
            meters=metrics.Meters(labels),
            input_names=signature.inputs.input_names(),
            output_names=signature.outputs.input_names(),
            inputs=to_metadata_tensors(schema=signature.inputs, prefix=DefaultInputPrefix),
            outputs=to_metadata_tensors(schema=signature.outputs, prefix=DefaultOutputPrefix),
            content_type=to_model_content_type(schema=signature.inputs),
            checked=checked,
        )

    def _swap(self, served: Served) -> None:
        previous, self._served = self._served, served
        scorer = served.model.scorer
        metrics.model_swapped(served.labels, previous.labels if previous else None, scorer.fast_path)
        if not scorer.fast_path:
            logger.warning(f"version {served.version}: {scorer.fast_path_status}")
        checked = served.checked
        timings = ", ".join(f"{step} {seconds:.2f} s" for step, seconds in checked.seconds.items())
        log = logger.warning if checked.manifest is None else logger.info
        log(f"version {served.version}: {checked.description} ({timings})")
        if previous is not None:  # requests still scoring on it hold the model, not its files
            previous.checked.close()

    async def metadata(self) -> MetadataModelResponse:
        served = self._served
        if served is None:
            return MetadataModelResponse(
                name=self.name, platform=self._settings.platform, versions=[], parameters=Parameters()
            )
        return MetadataModelResponse(
            name=self.name,
            platform=self._settings.platform,
            versions=[served.version],
            inputs=served.inputs,
            outputs=served.outputs,
            parameters=Parameters(content_type=served.content_type, **served.parameters),
        )

    def _serving(self) -> Served:
        served = self._served  # read once: one version for the whole request
        if served is None:
            raise ModelNotReady(self.name)
        return served

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        served, started_ns, started = self._serving(), time.time_ns(), time.perf_counter()
        with _counting_rejections(served):
            values = v2.request_matrix(payload, served.input_names)
            wanted = v2.requested_outputs(payload, served.output_names)
            scored = _score(served, values)
        answer = v2.response(
            self.name, served.version, {name: scored[name] for name in wanted}, served.parameters
        )
        self._record(served, payload.id, started_ns, started, values, scored)
        return answer

    @custom_handler(rest_path="/predict", rest_method="POST")
    async def predict_flat(self, request: Request):
        """The earlier design's scoring route: flat JSON object(s) in, flat answers out."""
        served, started_ns, started = self._serving(), time.time_ns(), time.perf_counter()
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        with _counting_rejections(served):
            values, batch = flat_json.request_matrix(await request.body())
            scored = _score(served, values)
        timestamp = utc_timestamp(started_ns / 1e9)
        answer = flat_json.answer(
            scored[OUTPUT_PREDICTION],
            scored[OUTPUT_PROBABILITY],
            served.version,
            request_id,
            timestamp,
            batch,
        )
        self._record(served, request_id, started_ns, started, values, scored)
        return answer

    @custom_handler(rest_path="/model/info", rest_method="GET")
    async def model_info(self) -> dict:
        return self._serving().info

    @custom_handler(rest_path="/health", rest_method="GET")
    async def health(self) -> dict:
        """Liveness for the earlier design's clients (it replaces mlserver-mlflow's ``/health``,
        which answered an empty line): always 200 while the process runs, with what it serves."""
        served = self._served
        return {
            "status": "ok",
            "model_name": self.name,
            "model_loaded": served is not None,
            "model_version": served.version if served else None,
            "detail": self.status,
        }

    def _record(self, served: Served, request_id, started_ns: int, started: float, values, scored) -> None:
        seconds = time.perf_counter() - started
        served.meters.scored(len(values), seconds)
        if self._spool is not None:
            self._capture(served, request_id, started_ns, values, scored, seconds)

    def _capture(self, served: Served, request_id, started_ns, values, scored, seconds) -> None:
        """Append the request to the spool; never let capture fail the inference."""
        rows = len(values)
        try:
            line = encode(
                request_id,
                started_ns,
                served.capture_identity,
                served.input_names,
                values,
                scored,
                latency_ms=seconds * 1000,
                replica=self._spool.replica,
            )
            kept = self._spool.append(line, rows)
        except Exception:
            logger.exception("capture: could not record a request")
            kept = False
        served.meters.captured(rows, kept)

    async def unload(self) -> bool:
        following = getattr(self, "_following", None)
        if following is not None:
            following.cancel()
        if getattr(self, "_spool", None) is not None:
            self._spool.close()
        if self._served is not None:
            self._served.checked.close()
        return True

    # The inherited MLflow scoring endpoint (/invocations) would bypass the strict decoding
    # above; overriding it without @custom_handler keeps it unregistered. Use the V2 endpoint,
    # or `mlflow models serve` for the MLflow protocol.
    async def invocations(self, *args, **kwargs):
        raise v2.InvalidRequest("/invocations is not served here; use /v2/models/<name>/infer")


@contextmanager
def _counting_rejections(served: Served):
    """Count a request refused for its input (an ``MLServerError``) against the served version."""
    try:
        yield
    except MLServerError:
        served.meters.rejected()
        raise


def _score(served: Served, values) -> dict:
    try:
        prediction, probability = served.model.score(values)
    except InvalidFeatures as error:
        raise v2.InvalidRequest(str(error)) from error
    except Exception as error:
        logger.exception("Unexpected error while scoring")
        raise MLServerError(
            f"unexpected {type(error).__name__} while scoring: {error}", status_code=500
        ) from error
    return {OUTPUT_PREDICTION: prediction, OUTPUT_PROBABILITY: probability}


def _registry_record(registered_name: str, version: str, model_uri: str, dataset_hash: str) -> dict:
    """The registry's record of a version, read once at load for ``GET /model/info``."""
    client = MlflowClient()
    found = client.get_model_version(registered_name, version)
    metrics_ = client.get_run(found.run_id).data.metrics if found.run_id else {}
    promoted = found.last_updated_timestamp
    return {
        "model_name": registered_name,
        "model_version": version,
        "model_stage": found.current_stage,
        "model_uri": model_uri,
        "run_id": found.run_id,
        DATASET_HASH: dataset_hash,
        "metrics": metrics_,
        "promoted_at": utc_timestamp(promoted / 1000) if promoted else None,
    }
