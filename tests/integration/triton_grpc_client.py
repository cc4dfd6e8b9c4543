"""tritonclient.grpc in a process of its own, for ``test_serving.py``.

tritonclient and MLServer both register the Open Inference protocol's messages
(``inference.ModelInferRequest``, ...) in protobuf's one default pool, under different file
names, so a process that imported MLServer (every test process does, through
``serving.settings``) cannot import ``tritonclient.grpc``: "duplicate symbol". This module
imports neither MLServer nor anything of this repository.

Tensors travel as the hex of their little-endian bytes, so that NaN and every float64 bit get
through JSON unchanged.

- stdin: ``{"url": "127.0.0.1:<port>", "model": "...", "requests": [{"id": "...", "inputs":
  [{"name", "datatype", "shape", "data"}]}]}``
- stdout: one JSON object per request, in order: ``{"id", "model_version", "parameters",
  "outputs": {name: {"datatype", "shape", "data"}}}``, or ``{"status", "message"}`` when the
  server refused it.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException, triton_to_np_dtype


def _input(spec: dict) -> triton.InferInput:
    dtype = np.dtype(triton_to_np_dtype(spec["datatype"])).newbyteorder("<")
    tensor = triton.InferInput(spec["name"], spec["shape"], spec["datatype"])
    tensor.set_data_from_numpy(np.frombuffer(bytes.fromhex(spec["data"]), dtype=dtype).reshape(spec["shape"]))
    return tensor


def _parameter(value) -> object:
    return getattr(value, value.WhichOneof("parameter_choice"))


def _infer(client: triton.InferenceServerClient, model: str, request: dict) -> dict:
    try:
        result = client.infer(model, [_input(spec) for spec in request["inputs"]], request_id=request["id"])
    except InferenceServerException as error:
        return {"status": error.status(), "message": error.message()}
    response = result.get_response()
    outputs = {}
    for output in response.outputs:
        values = result.as_numpy(output.name)
        outputs[output.name] = {
            "datatype": output.datatype,
            "shape": list(output.shape),
            "data": values.astype(values.dtype.newbyteorder("<")).tobytes().hex(),
        }
    return {
        "id": response.id,
        "model_version": response.model_version,
        "parameters": {name: _parameter(value) for name, value in response.parameters.items()},
        "outputs": outputs,
    }


def main() -> None:
    spec = json.load(sys.stdin)
    client = triton.InferenceServerClient(url=spec["url"])
    try:
        json.dump([_infer(client, spec["model"], request) for request in spec["requests"]], sys.stdout)
    finally:
        client.close()


if __name__ == "__main__":
    main()
