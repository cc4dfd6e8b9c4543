"""The MLServer runtime: mlserver-mlflow's runtime, made strict and traceable.

MLServer 1.7 has no other hook, so this subclass is where the serving behaviour lives:

- the registry URI (``models:/credit-risk-model/Production``) is resolved once, at load, to
  a version number, and exactly that version is loaded;
- requests are decoded strictly (``serving.v2``); bad input is a 400 naming the input;
- the registry version and ``dataset_hash`` are in the model metadata, in every response's
  ``parameters`` and in this runtime's Prometheus metrics;
- request parameters the model does not declare (tritonclient's ``binary_data_output``) are
  not forwarded to MLflow, which would warn about them on every request;
- every answered request is appended to the capture spool (``serving.capture``) before its
  response leaves, for the logging sidecar to ship.
"""

from __future__ import annotations

import os
import time

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.tracking import MlflowClient
from mlserver.errors import MLServerError
from mlserver.logging import logger
from mlserver.types import InferenceRequest, InferenceResponse, MetadataModelResponse, Parameters
from mlserver.utils import get_model_uri
from mlserver_mlflow import MLflowRuntime
from threadpoolctl import threadpool_limits

from serving import metrics, v2
from serving.capture import SpoolSettings, SpoolWriter, encode

DATASET_HASH_KEY = "dataset_hash"


class CreditRiskRuntime(MLflowRuntime):
    """mlserver-mlflow's runtime with strict decoding, model identity and capture."""

    async def load(self) -> bool:
        # One OpenMP thread per process: with more, p99 latency jumped from ~2 ms to ~700 ms
        # whenever another process was busy on the second core.
        threadpool_limits(limits=int(os.environ.get("OMP_NUM_THREADS", "1")), user_api="openmp")

        configured_uri = await get_model_uri(self._settings)
        # MLflow's own resolution of a stage, alias or version URI to one version number.
        self._registered_name, self._registry_version = get_model_name_and_version(
            MlflowClient(), configured_uri
        )
        self._model_uri = f"models:/{self._registered_name}/{self._registry_version}"
        self._model = mlflow.pyfunc.load_model(self._model_uri)
        self._input_schema = self._model.metadata.get_input_schema()
        self._signature = self._model.metadata.signature
        self._sync_metadata()
        self._input_names = self._input_schema.input_names()
        self._output_names = self._signature.outputs.input_names()
        dataset_hash = (self._model.metadata.metadata or {}).get(DATASET_HASH_KEY, "")
        # What every response, the metadata and every captured record say about the model.
        self._identity = {
            "registered_model": self._registered_name,
            "registry_version": self._registry_version,
            "model_uri": self._model_uri,
            DATASET_HASH_KEY: dataset_hash,
        }
        self._capture_identity = {
            "model_name": self.name,
            "registered_model": self._registered_name,
            "model_version": self._registry_version,
            DATASET_HASH_KEY: dataset_hash,
        }
        self._labels = metrics.Labels(self.name, self._registry_version, dataset_hash)
        metrics.model_loaded(self._labels)
        spool = SpoolSettings()
        self._spool = SpoolWriter(spool) if spool.directory else None
        logger.info(f"Loaded {self._model_uri} (resolved from {configured_uri}), dataset_hash {dataset_hash}")
        return True

    async def metadata(self) -> MetadataModelResponse:
        metadata = await super().metadata()
        metadata.versions = [self._registry_version]
        content_type = metadata.parameters.content_type if metadata.parameters else None
        metadata.parameters = Parameters(content_type=content_type, **self._identity)
        return metadata

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        started_ns, started = time.time_ns(), time.perf_counter()
        try:
            features = v2.request_frame(payload, self._input_names)
            outputs = v2.requested_outputs(payload, self._output_names)
            predictions = self._predict(features)
        except MLServerError:
            metrics.request_rejected(self._labels)
            raise
        answer = v2.response(self.name, self._registry_version, predictions[outputs], self._identity)
        seconds = time.perf_counter() - started
        metrics.request_scored(self._labels, len(features), seconds)
        if self._spool is not None:
            self._capture(payload.id, started_ns, features, predictions, seconds)
        return answer

    def _predict(self, features):
        try:
            return self._model.predict(features)
        except MlflowException as error:
            if error.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE):
                raise v2.InvalidRequest(error.message) from error
            raise MLServerError(f"model error: {error.message}", status_code=500) from error
        except Exception as error:
            logger.exception("Unexpected error while scoring")
            raise MLServerError(
                f"unexpected {type(error).__name__} while scoring: {error}", status_code=500
            ) from error

    def _capture(self, request_id, started_ns, features, predictions, seconds) -> None:
        """Append the request to the spool; never let capture fail the inference."""
        rows = len(features)
        try:
            line = encode(
                request_id,
                started_ns,
                self._capture_identity,
                self._input_names,
                features.to_numpy(),
                {name: predictions[name].to_numpy() for name in self._output_names},
                latency_ms=seconds * 1000,
            )
            kept = self._spool.append(line, rows)
        except Exception:
            logger.exception("capture: could not record a request")
            kept = False
        metrics.request_captured(self._labels, rows, kept)

    async def unload(self) -> bool:
        if getattr(self, "_spool", None) is not None:
            self._spool.close()
        return await super().unload()

    # The inherited MLflow scoring endpoint (/invocations) would bypass the strict decoding
    # above; overriding it without @custom_handler keeps it unregistered. Use the V2 endpoint,
    # or `mlflow models serve` for the MLflow protocol.
    async def invocations(self, *args, **kwargs):
        raise v2.InvalidRequest("/invocations is not served here; use /v2/models/<name>/infer")
