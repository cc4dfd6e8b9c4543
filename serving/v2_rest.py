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

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import orjson
from mlserver.codecs import PandasCodec

from serving import binary, json_body
from serving.errors import InvalidRequest, cut, listed, show
from serving.limits import REQUEST_ID_HEADER, check_request_id
from serving.v2 import OUTPUT_DATATYPES, check_equal_lengths, check_tensor, json_column, matrix, mismatch

JSON = "application/json"


class RequestedOutput(NamedTuple):
    name: str
    binary: bool


class DecodedRequest(NamedTuple):
    id: str | None  # the body's id, else the X-Request-ID header; None: the server makes one
    matrix: np.ndarray  # (rows, len(columns)) float64, NaN for missing
    outputs: tuple[RequestedOutput, ...]


class EncodedResponse(NamedTuple):
    body: bytes
    headers: dict[str, str]  # Content-Type, and Inference-Header-Content-Length when binary


class _Input(NamedTuple):
    name: str
    datatype: str
    shape: list[int]
    data: object  # the JSON data; None when binary
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
    if header_length is None:
        request, tensors = _object(json_body.loads(body, after_json=_NO_HEADER), "the body"), None
    else:
        view = memoryview(body)
        length = binary.header_length(header_length, len(view))
        request = _object(json_body.loads(view[:length], "the JSON header"), "the JSON header")
        tensors = binary.Tensors(view, length)
    header_id = check_request_id(request_id_header, REQUEST_ID_HEADER)
    body_id = check_request_id(request.get("id"), "id")
    parameters = _optional_object(request.get("parameters"), "parameters")
    binary_output = _flag(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    return DecodedRequest(
        body_id or header_id,
        _matrix(_inputs(request), columns, max_rows, tensors),
        _outputs(request.get("outputs"), outputs, binary_output),
    )


_NO_HEADER = f" (a body with binary tensors needs the {binary.HEADER_LENGTH} header)"


def _inputs(request: dict) -> list[_Input]:
    items = request.get("inputs")
    if type(items) is not list:
        if "inputs" not in request:
            raise InvalidRequest("inputs: missing; expected a list with one input per feature")
        _list(items, "inputs")
    found = []
    for index, item in enumerate(items):
        # The common case in a few type checks; anything else is read field by field below,
        # which finds and names the problem (or accepts what the quick check did not expect).
        if type(item) is dict:
            name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
            if (
                type(name) is str
                and type(datatype) is str
                and type(shape) is list
                and 0 < len(shape) < 3
                and type(shape[0]) is int
                and type(shape[-1]) is int
                and shape[0] >= 0
                and shape[-1] >= 0
            ):
                parameters = item.get("parameters")
                if parameters is None and "data" in item:
                    found.append(_Input(name, datatype, shape, item["data"], None))
                    continue
                if type(parameters) is dict and len(parameters) == 1 and "data" not in item:
                    size = parameters.get("binary_data_size")
                    if type(size) is int and size >= 0:
                        found.append(_Input(name, datatype, shape, None, size))
                        continue
        found.append(_checked_input(item, f"inputs[{index}]"))
    return found


def _checked_input(item: object, where: str) -> _Input:
    item = _object(item, where)
    name = _string(item.get("name"), f"{where}.name")
    parameters = _optional_object(item.get("parameters"), f"{where}.parameters")
    _refuse_shared_memory(parameters, f"{where}.parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        size = _size(size, f"{where}.parameters.binary_data_size")
    if (size is None) == ("data" not in item):
        both = "both data and parameters.binary_data_size" if size is not None else "no data"
        raise InvalidRequest(f"input '{cut(name)}' ({where}) has {both}; send one of the two")
    datatype = _string(item.get("datatype"), f"{where}.datatype")
    return _Input(name, datatype, _shape(item.get("shape"), f"{where}.shape"), item.get("data"), size)


def _matrix(
    inputs: list[_Input], columns: Sequence[str], max_rows: int | None, tensors: binary.Tensors | None
) -> np.ndarray:
    by_name = {item.name: item for item in inputs}
    if len(by_name) != len(inputs) or by_name.keys() != set(columns):
        raise InvalidRequest(mismatch([item.name for item in inputs], columns))
    if tensors is not None:
        return _binary_matrix(inputs, by_name, columns, max_rows, tensors)
    decoded = []
    for name in columns:
        item = by_name[name]
        if item.binary_size is not None:
            raise InvalidRequest(
                f"input '{name}' has parameters.binary_data_size, but the request has no "
                f"{binary.HEADER_LENGTH} header to say where its JSON ends"
            )
        decoded.append((name, item.shape, json_column(name, item.datatype, item.shape, item.data, max_rows)))
    if len({len(values) for _, _, values in decoded}) > 1:
        check_equal_lengths({name: len(values) for name, _, values in decoded})
    return matrix(decoded)


def _binary_matrix(
    inputs: list[_Input],
    by_name: dict[str, _Input],
    columns: Sequence[str],
    max_rows: int | None,
    tensors: binary.Tensors,
) -> np.ndarray:
    """The matrix of a body with raw tensors (and perhaps some inputs in JSON): every input's
    shape and size checked, and every raw byte accounted for, before any value is read."""
    raw = {}
    for item in inputs:  # in body order, the order of the raw tensors
        if item.binary_size is not None:
            rows = check_tensor(item.name, item.datatype, item.shape, max_rows)
            binary.check_size(item.name, item.datatype, rows, item.binary_size)
            raw[item.name] = tensors.take(item.name, item.binary_size)
    tensors.finish()
    in_json = [(name, by_name[name].shape, json_column(name, by_name[name].datatype, by_name[name].shape,
                                                        by_name[name].data, max_rows))
               for name in columns if name not in raw]  # fmt: skip
    check_equal_lengths({name: by_name[name].shape[0] for name in columns})  # data matched shapes above
    datatypes = {by_name[name].datatype for name in columns}
    if list(raw) == list(columns) and len(datatypes) == 1:  # tritonclient's usual body: one block
        out = binary.read_block(datatypes.pop(), tensors.region, len(columns))
    else:
        out = np.empty((len(columns), inputs[0].shape[0]), dtype=np.float64)
        position = {name: index for index, name in enumerate(columns)}
        for name, view in raw.items():
            binary.read_column(by_name[name].datatype, view, out[position[name]])
        if in_json:
            decoded = matrix(in_json)
            for index, (name, _, _) in enumerate(in_json):
                out[position[name]] = decoded[:, index]
    binary.check_values(columns, out)
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
        raise InvalidRequest(f"unknown output(s) {listed(unknown)}; available: {list(available)}")
    if len(set(names)) < len(names):
        repeated = sorted(name for name, count in Counter(names).items() if count > 1)
        raise InvalidRequest(f"output(s) {listed(repeated)} requested more than once")
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
