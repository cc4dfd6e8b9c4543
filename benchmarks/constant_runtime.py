"""The ceiling for ``benchmarks/serving.py``: an MLServer runtime that does no work at all.

It answers every request with the same two outputs this project's runtime returns for one row,
so MLServer, its HTTP and gRPC stacks, metrics and JSON encoding cost exactly what they cost
for the real runtime, and nothing else does.
"""

from __future__ import annotations

from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, Parameters, ResponseOutput


class ConstantRuntime(MLModel):
    async def load(self) -> bool:
        self._outputs = [
            ResponseOutput(name="prediction", shape=[1, 1], datatype="INT64", data=[0]),
            ResponseOutput(name="probability", shape=[1, 1], datatype="FP64", data=[0.05]),
        ]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        return InferenceResponse(
            model_name=self.name,
            model_version="1",
            parameters=Parameters(content_type="pd"),
            outputs=self._outputs,
        )
