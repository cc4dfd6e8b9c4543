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
- Requests decode strictly into one float64 matrix, NaN for a missing value: V2 REST from its
  raw body (``infer_rest``, ``serving.v2_rest``: JSON with ``null`` or ``NaN``, or binary
  tensors), gRPC from the request MLServer decoded (``predict``, ``serving.v2``), ``/predict``
  from its flat JSON (``serving.flat_json``), all through the same value checks. They are
  scored by the model's own ``score`` (``model.scoring``): the same code the gate and
  ``mlflow models serve`` run, minus the DataFrames. Bad input is a 400 naming the input
  (``INVALID_ARGUMENT`` over gRPC); a request over a limit (``serving.limits``, read once at
  load) a 413 naming it (``RESOURCE_EXHAUSTED``).
- A large request is decoded, scored (in slices of ``SCORE_SLICE_ROWS``) and encoded in the
  large-request thread (``serving.offload``), so that probes and small requests keep being
  answered; its metrics and capture record are kept on the event loop, like everyone's.
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
import math
import time
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import Response
from mlflow.tracking import MlflowClient
from mlserver.errors import MLServerError, ModelNotReady
from mlserver.handlers import custom_handler
from mlserver.logging import logger
from mlserver.settings import Settings as ServerSettings
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
from model.schema import OUTPUT_PREDICTION, OUTPUT_PROBABILITY, InvalidFeatures, check_values
from serving import flat_json, metrics, offload, v2, v2_rest
from serving.capture import SpoolWriter, encode
from serving.follower import RegistryFollower
from serving.limits import REQUEST_ID_HEADER, check_request_id
from serving.settings import ServingSettings
from serving.v2_rest import JSON


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
        # Said wherever the status is read (readiness, /model/info, credit-risk status): a version
        # loaded without its files checked, or scored by code other than its own.
        worth_saying = served is not None and (served.checked.manifest is None or served.checked.code_differs)
        return follower.status + (f"; {served.checked.description}" if worth_saying else "")

    async def load(self) -> bool:
        # One OpenMP thread per process: with more, p99 latency jumped from ~2 ms to ~700 ms
        # whenever another process was busy on the second core.
        settings = ServingSettings()
        threadpool_limits(limits=settings.openmp_threads, user_api="openmp")
        self._verification = verified.VerificationSettings()
        self._limits = settings.limits
        self._gzip = ServerSettings().gzip_enabled  # MLServer compresses answers (GZipMiddleware)
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
        log = logger.warning if checked.manifest is None or checked.code_differs else logger.info
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
            inputs=[_input_metadata(tensor) for tensor in served.inputs],
            outputs=served.outputs,
            parameters=Parameters(content_type=served.content_type, **served.parameters),
        )

    def _serving(self) -> Served:
        served = self._served  # read once: one version for the whole request
        if served is None:
            raise ModelNotReady(self.name)
        return served

    async def infer_rest(self, body: bytes, headers: Mapping[str, str]) -> RestAnswer:
        """The V2 REST inference (``serving.mlserver_hooks`` routes MLServer's ``infer`` here):
        ``body`` as received (inflated by ``serving.body_limit``), JSON or binary tensors
        (``serving.v2_rest``); ``headers`` case-insensitive, or lower-case keys."""
        served, started_ns, started = self._serving(), time.time_ns(), time.perf_counter()
        header_length, header_id = headers.get("inference-header-content-length"), headers.get("x-request-id")
        work = partial(self._answer_rest, served, body, header_length, header_id, started_ns, started)
        return await self._answer_http(served, work, len(body), headers.get("accept-encoding"))

    def _answer_rest(self, served, body, header_length, header_id, started_ns, started) -> _Answered:
        with _counting_rejections(served):
            decoded = v2_rest.decode_request(
                body,
                columns=served.input_names,
                outputs=served.output_names,
                max_rows=self._limits.max_rows,
                header_length=header_length,
                request_id_header=header_id,
            )
            scored = _score(served, decoded.matrix)
        request_id = decoded.id or str(uuid.uuid4())
        encoded = v2_rest.encode_response(
            self.name, served.version, request_id, served.parameters, scored, decoded.outputs
        )
        answer = RestAnswer(request_id, encoded.body, encoded.headers)
        return self._answered(served, answer, request_id, started_ns, started, decoded.matrix, scored)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """V2 over gRPC (and MLServer's streaming routes), on the request MLServer decoded."""
        served, started_ns, started = self._serving(), time.time_ns(), time.perf_counter()
        work = partial(self._answer_v2, served, payload, started_ns, started)
        values = sum(math.prod(item.shape) for item in payload.inputs)
        return self._kept(served, await offload.run(work) if offload.is_large(8 * values) else work())

    def _answer_v2(self, served, payload: InferenceRequest, started_ns, started) -> _Answered:
        with _counting_rejections(served):
            check_request_id(payload.id, "id")
            values = v2.request_matrix(payload, served.input_names, self._limits.max_rows)
            wanted = v2.requested_outputs(payload, served.output_names)
            scored = _score(served, values)
        answer = v2.response(
            self.name, served.version, {name: scored[name] for name in wanted}, served.parameters
        )
        return self._answered(served, answer, payload.id, started_ns, started, values, scored)

    @custom_handler(rest_path="/predict", rest_method="POST")
    async def predict_flat(self, request: Request) -> Response:
        """The earlier design's scoring route: flat JSON object(s) in, flat answers out."""
        served, started_ns, started = self._serving(), time.time_ns(), time.perf_counter()
        body = await request.body()
        header_id = request.headers.get("x-request-id")
        work = partial(self._answer_flat, served, body, header_id, started_ns, started)
        answer = await self._answer_http(served, work, len(body), request.headers.get("accept-encoding"))
        return Response(answer.body, headers=answer.headers)

    def _answer_flat(self, served, body: bytes, header_id, started_ns, started) -> _Answered:
        with _counting_rejections(served):
            request_id = check_request_id(header_id, REQUEST_ID_HEADER) or str(uuid.uuid4())
            values, batch = flat_json.request_matrix(body, max_rows=self._limits.max_rows)
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
        # Encoded here, where a large batch's answer is built (off the loop), not by FastAPI.
        encoded = RestAnswer(request_id, orjson.dumps(answer), {"Content-Type": JSON})
        return self._answered(served, encoded, request_id, started_ns, started, values, scored)

    async def _answer_http(
        self, served: Served, work, body_bytes: int, accept_encoding: str | None
    ) -> RestAnswer:
        """``work()`` on the loop for a small body; for a large one in the large-request thread,
        with its answer compressed there when the client takes gzip (``serving.offload``)."""
        if not offload.is_large(body_bytes):
            return self._kept(served, work())
        return self._kept(served, await offload.run(partial(self._compressed, work, accept_encoding)))

    def _compressed(self, work, accept_encoding: str | None) -> _Answered:
        answered = work()
        if self._gzip:
            answer = answered.answer
            body, headers = offload.gzipped(answer.body, answer.headers, accept_encoding)
            answered = answered._replace(answer=answer._replace(body=body, headers=headers))
        return answered

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

    def _answered(self, served: Served, answer, request_id, started_ns: int, started: float, values, scored):
        """An answer and its capture record, made where the request was answered (perhaps the
        large-request thread); ``_kept`` then counts and appends them on the loop."""
        seconds = time.perf_counter() - started
        line = None
        if self._spool is not None:
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
            except Exception:  # never let capture fail the inference
                logger.exception("capture: could not record a request")
        return _Answered(answer, len(values), seconds, line)

    def _kept(self, served: Served, answered: _Answered):
        """Count the answered request and append its record to the spool (on the event loop:
        the spool writer is not thread-safe), then return its answer."""
        served.meters.scored(answered.rows, answered.seconds)
        if self._spool is not None:
            kept = False
            if answered.line is not None:
                try:
                    kept = self._spool.append(answered.line, answered.rows)
                except Exception:
                    logger.exception("capture: could not record a request")
            served.meters.captured(answered.rows, kept)
        return answered.answer

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


def _input_metadata(tensor: MetadataTensor) -> MetadataTensor:
    """An input as requests may send it: shape ``[-1]`` (rows; ``[rows, 1]`` is accepted too),
    the signature's datatype (FP64; every numeric datatype is accepted, in JSON, binary tensors
    or gRPC), and ``nullable``: any value may be missing (``null``, or ``NaN``). The open
    inference protocol's metadata has no word for this; MLServer's tensor ``parameters`` carry
    it (tritonclient passes them through over REST, and gRPC clients without them ignore them)."""
    parameters = tensor.parameters.model_dump(exclude_none=True) if tensor.parameters else {}
    return MetadataTensor(
        name=tensor.name,
        datatype=tensor.datatype,
        shape=[-1],
        parameters=Parameters(**parameters, nullable=True),
    )


class RestAnswer(NamedTuple):
    """An HTTP answer (``serving.mlserver_hooks.RestAnswer`` for V2): its request id, body and headers."""

    id: str
    body: bytes
    headers: dict[str, str]


class _Answered(NamedTuple):
    answer: object  # what the route returns
    rows: int
    seconds: float
    line: bytes | None  # the capture record; None when capture is off or it could not be made


@contextmanager
def _counting_rejections(served: Served):
    """Count a request refused for its input (an ``MLServerError``) against the served version."""
    try:
        yield
    except MLServerError:
        served.meters.rejected()
        raise


# Rows scored per call in a large request: scikit-learn's and numpy's temporaries stay a few
# MiB, and no single call holds the GIL for long (scikit-learn releases it in its tree loop).
SCORE_SLICE_ROWS = 10_000


def _score(served: Served, values: np.ndarray) -> dict:
    try:
        prediction, probability = _scored(served.model, values)
    except InvalidFeatures as error:
        raise v2.InvalidRequest(str(error)) from error
    except Exception as error:
        logger.exception("Unexpected error while scoring")
        raise MLServerError(
            f"unexpected {type(error).__name__} while scoring: {error}", status_code=500
        ) from error
    return {OUTPUT_PREDICTION: prediction, OUTPUT_PROBABILITY: probability}


def _scored(model: scoring.LoadedModel, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``model.score(values)``, in slices of ``SCORE_SLICE_ROWS`` rows past that size. The same
    bits: each row's probability depends on that row alone. The values are checked once, on
    the whole matrix, so that a refusal names the request's row."""
    if len(values) <= SCORE_SLICE_ROWS:
        return model.score(values)
    check_values(values)
    slices = [model.scorer.score(values[start : start + SCORE_SLICE_ROWS])
              for start in range(0, len(values), SCORE_SLICE_ROWS)]  # fmt: skip
    return np.concatenate([label for label, _ in slices]), np.concatenate([score for _, score in slices])


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
