"""The Open Inference (V2) REST codec: an inference request from its raw bytes and headers,
and the response to it as bytes and headers, without MLServer's pydantic models.

A request body is JSON (``NaN`` read as a missing value, ``serving.json_body``) or, with an
``Inference-Header-Content-Length`` header, a JSON header followed by raw tensors
(``serving.binary``). Either way it decodes to a ``DecodedRequest``: the request id, the
float64 matrix in the model's feature order (NaN for missing), and the outputs wanted, each
as JSON or binary (request parameter ``binary_data_output``, per-output ``binary_data``).

Invariants:

- The values pass the same checks as on gRPC (``serving.v2``), in the same order: limits from
  the declared shapes first, then the data.
- A malformed request is an ``InvalidRequest`` (400) whose one line says where and what was
  expected (``inputs[2].shape: expected a list of non-negative integers, got "x"``); a
  request over the row limit a ``RequestTooLarge`` (413). Never a pydantic dump, never a 500.
- Request fields this server does not use (``parameters`` other than the binary ones, the
  inputs' ``content_type``) are ignored, as MLServer ignores them; features it does not
  have (shared memory, classification) are refused, since ignoring them would answer
  something else than what was asked.
- A JSON response is byte for byte what MLServer renders for ``serving.v2.response`` with
  the request id set; a binary one is what tritonclient's ``InferResult`` parses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson
from mlserver.codecs import PandasCodec

from serving import binary, json_body
from serving.errors import InvalidRequest, show
from serving.limits import REQUEST_ID_HEADER, check_request_id
from serving.v2 import OUTPUT_DATATYPES, check_equal_lengths, check_tensor, column_values, matrix, mismatch

JSON = "application/json"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class DecodedRequest:
    id: str | None  # the body's id, else the X-Request-ID header; None: the server makes one
    matrix: np.ndarray  # (rows, len(columns)) float64, NaN for missing
    outputs: tuple[RequestedOutput, ...]


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    headers: dict[str, str]  # Content-Type, and Inference-Header-Content-Length when binary


@dataclass(frozen=True)
class _Input:
    name: str
    datatype: str
    shape: list[int]
    data: object  # the JSON data; absent when binary
    binary_size: int | None


def decode_request(
    body: bytes,
    *,
    columns: Sequence[str],
    outputs: Sequence[str],
    max_rows: int | None,
    header_length: str | None = None,
    request_id_header: str | None = None,
) -> DecodedRequest:
    """Decode ``body`` (inflated already) for a model whose inputs are ``columns`` (in matrix
    order) and whose outputs are ``outputs``. ``header_length`` and ``request_id_header`` are
    the values of the ``Inference-Header-Content-Length`` and ``X-Request-ID`` headers."""
    view = memoryview(body)
    if header_length is None:
        hint = f" (a body with binary tensors needs the {binary.HEADER_LENGTH} header)"
        request, tensors = _object(json_body.loads(view, after_json=hint), "the body"), None
    else:
        length = binary.header_length(header_length, len(view))
        request = _object(json_body.loads(view[:length], "the JSON header"), "the JSON header")
        tensors = binary.Tensors(view, length)
    header_id = check_request_id(request_id_header, REQUEST_ID_HEADER)
    body_id = check_request_id(request.get("id"), "id")
    parameters = _optional_object(request.get("parameters"), "parameters")
    binary_output = _flag(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    return DecodedRequest(
        id=body_id or header_id,
        matrix=_matrix(_inputs(request), columns, max_rows, tensors),
        outputs=_outputs(request.get("outputs"), outputs, binary_output),
    )


def _inputs(request: dict) -> list[_Input]:
    if "inputs" not in request:
        raise InvalidRequest("inputs: missing; expected a list with one input per feature")
    found = []
    for index, item in enumerate(_list(request["inputs"], "inputs")):
        where = f"inputs[{index}]"
        item = _object(item, where)
        name = _string(item.get("name"), f"{where}.name")
        parameters = _optional_object(item.get("parameters"), f"{where}.parameters")
        _refuse_shared_memory(parameters, f"{where}.parameters")
        size = parameters.get("binary_data_size")
        if size is not None:
            size = _size(size, f"{where}.parameters.binary_data_size")
        if (size is None) == ("data" not in item):
            both = "both data and parameters.binary_data_size" if size is not None else "no data"
            raise InvalidRequest(f"input '{name}' ({where}) has {both}; send one of the two")
        found.append(
            _Input(
                name=name,
                datatype=_string(item.get("datatype"), f"{where}.datatype"),
                shape=_shape(item.get("shape"), f"{where}.shape"),
                data=item.get("data"),
                binary_size=size,
            )
        )
    return found


def _matrix(
    inputs: list[_Input], columns: Sequence[str], max_rows: int | None, tensors: binary.Tensors | None
) -> np.ndarray:
    names = [item.name for item in inputs]
    if len(set(names)) != len(names) or set(names) != set(columns):
        raise InvalidRequest(mismatch(names, columns))
    rows = {item.name: check_tensor(item.name, item.datatype, item.shape, max_rows) for item in inputs}
    raw = {}
    for item in inputs:  # in body order, the order of the raw tensors
        if item.binary_size is None:
            continue
        if tensors is None:
            raise InvalidRequest(
                f"input '{item.name}' has parameters.binary_data_size, but the request has no "
                f"{binary.HEADER_LENGTH} header to say where its JSON ends"
            )
        binary.check_size(item.name, item.datatype, rows[item.name], item.binary_size)
        raw[item.name] = tensors.take(item.name, item.binary_size)
    if tensors is not None:
        tensors.finish()
    by_name = {item.name: item for item in inputs}
    json_columns = [(name, by_name[name].shape, column_values(name, by_name[name].shape, by_name[name].data))
                    for name in columns if name not in raw]  # fmt: skip
    check_equal_lengths({name: rows[name] for name in columns})  # the data matched its shape above
    if not raw:
        return matrix(json_columns)
    out = np.empty((len(columns), rows[columns[0]]), dtype=np.float64)
    index = {name: position for position, name in enumerate(columns)}
    for name, view in raw.items():
        binary.read_column(name, by_name[name].datatype, view, out[index[name]])
    if json_columns:
        decoded = matrix(json_columns)
        for position, (name, _, _) in enumerate(json_columns):
            out[index[name]] = decoded[:, position]
    return out.T


def _outputs(requested: object, available: Sequence[str], binary_output: bool) -> tuple[RequestedOutput, ...]:
    if requested is None:
        return tuple(RequestedOutput(name, binary_output) for name in available)
    wanted = []
    for index, item in enumerate(_list(requested, "outputs")):
        where = f"outputs[{index}]"
        item = _object(item, where)
        name = _string(item.get("name"), f"{where}.name")
        parameters = _optional_object(item.get("parameters"), f"{where}.parameters")
        _refuse_shared_memory(parameters, f"{where}.parameters")
        if "classification" in parameters:
            raise InvalidRequest(
                f"{where}.parameters.classification: the classification extension is not supported"
            )
        flag = parameters.get("binary_data")
        wanted.append(
            RequestedOutput(
                name, binary_output if flag is None else _flag(flag, f"{where}.parameters.binary_data")
            )
        )
    names = [output.name for output in wanted]
    if unknown := [name for name in names if name not in available]:
        raise InvalidRequest(f"unknown output(s) {unknown}; available: {list(available)}")
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise InvalidRequest(f"output(s) {repeated} requested more than once")
    return tuple(wanted) if wanted else tuple(RequestedOutput(name, binary_output) for name in available)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str,
    parameters: Mapping[str, str],
    scored: Mapping[str, np.ndarray],
    wanted: Sequence[RequestedOutput],
) -> EncodedResponse:
    """The response to a decoded request: the ``wanted`` outputs of ``scored`` (one value per
    row each, shape ``[rows, 1]``), JSON or binary as asked, with the server's ``parameters``."""
    outputs, tensors = [], []
    for output in wanted:
        values = scored[output.name]
        entry = {
            "name": output.name,
            "shape": [len(values), 1],
            "datatype": OUTPUT_DATATYPES[values.dtype].value,
        }
        if output.binary:
            tensors.append(binary.raw(values))
            entry["parameters"] = {"binary_data_size": len(tensors[-1])}
        else:
            entry["data"] = np.ascontiguousarray(values)
        outputs.append(entry)
    header = orjson.dumps(
        {
            "model_name": model_name,
            "model_version": model_version,
            "id": request_id,
            "parameters": {"content_type": PandasCodec.ContentType, **parameters},
            "outputs": outputs,
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    if not tensors:
        return EncodedResponse(header, {"Content-Type": JSON})
    return EncodedResponse(
        b"".join([header, *tensors]),
        {"Content-Type": binary.OCTET_STREAM, binary.HEADER_LENGTH: str(len(header))},
    )


# The shapes of a request's fields; each error names the field by its path in the body.


def _object(value: object, where: str) -> dict:
    if type(value) is not dict:
        raise InvalidRequest(f"{where}: expected a JSON object, got {show(value)}")
    return value


def _optional_object(value: object, where: str) -> dict:
    return {} if value is None else _object(value, where)


def _list(value: object, where: str) -> list:
    if type(value) is not list:
        raise InvalidRequest(f"{where}: expected a list, got {show(value)}")
    return value


def _string(value: object, where: str) -> str:
    if type(value) is not str:
        raise InvalidRequest(f"{where}: expected a string, got {show(value)}")
    return value


def _shape(value: object, where: str) -> list[int]:
    if type(value) is not list:
        raise InvalidRequest(f"{where}: expected a list of non-negative integers, got {show(value)}")
    for index, size in enumerate(value):
        if type(size) is not int or size < 0:
            raise InvalidRequest(f"{where}[{index}]: expected a non-negative integer, got {show(size)}")
    return value


def _size(value: object, where: str) -> int:
    if type(value) is not int or value < 0:
        raise InvalidRequest(f"{where}: expected a non-negative integer (bytes), got {show(value)}")
    return value


def _flag(value: object, where: str) -> bool:
    if type(value) is not bool:
        raise InvalidRequest(f"{where}: expected true or false, got {show(value)}")
    return value


def _refuse_shared_memory(parameters: dict, where: str) -> None:
    if "shared_memory_region" in parameters:
        raise InvalidRequest(f"{where}.shared_memory_region: shared memory is not supported over REST here")
