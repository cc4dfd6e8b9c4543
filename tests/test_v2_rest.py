"""The V2 REST codec (``serving.v2_rest``) against tritonclient, the Open Inference reference
client: bodies built by ``InferenceServerClient.generate_request_body`` exactly as it sends
them, responses parsed by ``InferResult``. The matrix of a ``NaN`` request is compared bit
for bit with the matrix of the same rows sent with ``null``; numbers with the sample file."""

from __future__ import annotations

import json
import math

import numpy as np
import orjson
import pandas as pd
import pytest
import tritonclient.http as triton
from fastapi import FastAPI
from fastapi.testclient import TestClient
from mlserver.rest.app import APIRoute
from mlserver.rest.responses import Response
from mlserver.types import InferenceResponse

from model.schema import FEATURES, OUTPUT_PREDICTION, OUTPUT_PROBABILITY
from serving import v2
from serving.errors import InvalidRequest, RequestTooLarge
from serving.v2_rest import RequestedOutput, decode_request, encode_response
from tests.helpers import SAMPLE

OUTPUTS = (OUTPUT_PREDICTION, OUTPUT_PROBABILITY)
NUMPY_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "INT8": np.int8, "INT16": np.int16,
               "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16,
               "UINT32": np.uint32, "UINT64": np.uint64}  # fmt: skip


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    """60 rows of the sample, with missing MonthlyIncome and NumberOfDependents among them."""
    frame = pd.read_csv(SAMPLE)[list(FEATURES)].astype("float64")
    missing = frame[frame.isna().any(axis=1)].head(20)
    rows = pd.concat([missing, frame.dropna().head(40)]).sample(frac=1, random_state=7)
    assert rows.isna().sum().sum() >= 20
    return rows.reset_index(drop=True)


def triton_body(frame, binary, datatypes=None, outputs=None, **options) -> tuple[bytes, str | None]:
    """The body (and Inference-Header-Content-Length) tritonclient sends for these rows."""
    inputs = []
    for name in frame.columns:
        datatype = (datatypes or {}).get(name, "FP64")
        tensor = triton.InferInput(name, [len(frame)], datatype)
        tensor.set_data_from_numpy(frame[name].to_numpy().astype(NUMPY_TYPES[datatype]), binary_data=binary)
        inputs.append(tensor)
    body, length = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **options)
    return body, None if length is None else str(length)


def null_body(frame) -> bytes:
    """The same rows as strict JSON, with null for a missing value, as the README documents."""
    inputs = [
        {"name": name, "shape": [len(frame)], "datatype": "FP64",
         "data": [None if math.isnan(value) else value for value in frame[name]]}
        for name in frame.columns
    ]  # fmt: skip
    return orjson.dumps({"inputs": inputs})


def decode(body, header_length=None, max_rows=1000, **options):
    return decode_request(
        body, columns=FEATURES, outputs=OUTPUTS, max_rows=max_rows, header_length=header_length, **options
    )


def same_bits(left: np.ndarray, right: np.ndarray) -> bool:
    return left.shape == right.shape and np.array_equal(
        np.ascontiguousarray(left).view(np.uint64), np.ascontiguousarray(right).view(np.uint64)
    )


def refused(body, header_length=None, status=400, **options) -> str:
    error_type = InvalidRequest if status == 400 else RequestTooLarge
    with pytest.raises(error_type) as error:
        decode(body, header_length, **options)
    assert error.value.status_code == status
    message = str(error.value)
    assert "\n" not in message and "validation error" not in message
    return message


# --- NaN means missing -------------------------------------------------------------------


def test_tritonclient_nan_rows_in_json_decode_bit_for_bit_like_null(rows):
    body, length = triton_body(rows, binary=False)
    assert length is None and b"NaN" in body  # what numpy clients really write
    nan_matrix = decode(body).matrix
    null_matrix = decode(null_body(rows)).matrix
    assert same_bits(nan_matrix, null_matrix)
    assert same_bits(null_matrix, rows.to_numpy())  # the sample's own values, NaN where it has none


def test_tritonclient_binary_rows_decode_bit_for_bit_like_null(rows):
    body, length = triton_body(rows, binary=True)
    assert length is not None and int(length) < len(body)
    assert same_bits(decode(body, length).matrix, decode(null_body(rows)).matrix)


@pytest.mark.parametrize("datatype", sorted(NUMPY_TYPES))
def test_every_numeric_datatype_reads_the_same_in_binary_and_json(rows, datatype):
    frame = rows.copy()
    if not datatype.startswith("FP"):  # whole, non-negative, in range: the counts, no missing value
        frame = frame.fillna(0).clip(upper=100).round()
    as_sent = frame.apply(lambda column: column.to_numpy().astype(NUMPY_TYPES[datatype]).astype(np.float64))
    datatypes = dict.fromkeys(FEATURES, datatype)
    binary = decode(*triton_body(frame, binary=True, datatypes=datatypes)).matrix
    json = decode(*triton_body(frame, binary=False, datatypes=datatypes)).matrix
    assert same_bits(binary, json)
    assert same_bits(binary, np.where(np.isnan(as_sent), np.nan, as_sent))


def test_any_nan_bits_in_a_binary_tensor_are_the_one_missing_value(rows):
    body, length = triton_body(rows.head(4), binary=True)
    odd_nans = np.array([0xFFF8000000000000, 0x7FF0000000000001, 0x7FF8DEADBEEF0000, 0x7FF4000000000000],
                        dtype=np.uint64).view(np.float64)  # fmt: skip
    assert np.isnan(odd_nans).all()
    header = int(length)
    first = body[header : header + 32]  # the first input's tensor: four float64
    body = body[:header] + odd_nans.tobytes() + body[header + 32 :]
    matrix = decode(body, length).matrix
    assert first != odd_nans.tobytes() and same_bits(matrix[:, 0], np.full(4, np.nan))


def test_inputs_can_mix_binary_and_json_data(rows):
    inputs = []
    for index, name in enumerate(FEATURES):
        tensor = triton.InferInput(name, [len(rows)], "FP64")
        tensor.set_data_from_numpy(rows[name].to_numpy(), binary_data=index % 2 == 0)
        inputs.append(tensor)
    body, length = triton.InferenceServerClient.generate_request_body(inputs)
    assert same_bits(decode(body, str(length)).matrix, rows.to_numpy())


def test_binary_inputs_in_any_order_and_of_mixed_datatypes(rows):
    frame = rows[list(reversed(FEATURES))].fillna(0)
    datatypes = {name: ("INT32" if index % 3 == 0 else "FP32" if index % 3 == 1 else "FP64")
                 for index, name in enumerate(FEATURES)}  # fmt: skip
    frame = frame.apply(lambda column: column.round() if datatypes[column.name] == "INT32" else column)
    matrix = decode(*triton_body(frame, binary=True, datatypes=datatypes)).matrix
    expected = np.column_stack(
        [frame[name].to_numpy().astype(NUMPY_TYPES[datatypes[name]]).astype(np.float64) for name in FEATURES]
    )
    assert same_bits(matrix, expected)


def test_inputs_may_come_in_any_order_and_shape_rows_by_one(rows):
    body = orjson.loads(null_body(rows))
    body["inputs"].reverse()
    for item in body["inputs"][:3]:
        item["shape"] = [len(rows), 1]
        item["data"] = [[value] for value in item["data"]]
    assert same_bits(decode(orjson.dumps(body)).matrix, rows.to_numpy())


def test_strict_json_is_never_parsed_twice(rows, monkeypatch):
    """The leniency costs nothing when the body is strict JSON: Python's json is not reached."""
    import serving.json_body

    def refuse(*args, **kwargs):
        raise AssertionError("the strict body went through the lenient parser")

    monkeypatch.setattr(serving.json_body.json, "loads", refuse)
    decode(null_body(rows))
    with pytest.raises(AssertionError, match="lenient parser"):
        decode(triton_body(rows, binary=False)[0])


# --- Infinity, numbers out of range ------------------------------------------------------


def one_row(**values) -> dict:
    row = dict.fromkeys(FEATURES, 1.0) | values
    return {"inputs": [{"name": n, "shape": [1], "datatype": "FP64", "data": [v]} for n, v in row.items()]}


@pytest.mark.parametrize(
    "literal, message",
    [
        (b"Infinity", "input 'DebtRatio': row 0 is Infinity; expected a finite number (null or NaN"),
        (b"-Infinity", "input 'DebtRatio': row 0 is -Infinity"),
        (b"1e400", "input 'DebtRatio': row 0 is infinite or too large for a 64-bit float"),
        (b"-1.8e308", "input 'DebtRatio': row 0 is infinite or too large for a 64-bit float"),
        (b"1" + b"0" * 400, "input 'DebtRatio': row 0 is an integer too large for a 64-bit float"),
    ],
)
def test_infinite_and_out_of_range_numbers_are_400_naming_input_and_row(literal, message):
    body = orjson.dumps(one_row(DebtRatio="@")).replace(b'"@"', literal)
    assert message in refused(body)


def test_infinity_in_a_binary_tensor_is_400_naming_input_and_row(rows):
    frame = rows.head(5).copy()
    frame.loc[3, "DebtRatio"] = -np.inf
    for datatype in ("FP16", "FP32", "FP64"):
        body = triton_body(frame, binary=True, datatypes=dict.fromkeys(FEATURES, datatype))
        assert "input 'DebtRatio': row 3 is -Infinity" in refused(*body)


def test_nan_outside_the_data_is_not_a_missing_value():
    body = orjson.dumps({**one_row(), "id": "@"}).replace(b'"@"', b"NaN")
    assert refused(body) == "id: expected a string, got NaN"
    body = orjson.dumps(one_row()).replace(b'"shape":[1]', b'"shape":[NaN]', 1)
    assert refused(body) == "inputs[0].shape[0]: expected a non-negative integer, got NaN"


# --- Outputs -----------------------------------------------------------------------------

SCORED = {
    OUTPUT_PREDICTION: np.array([1, 0, 0, 1, 0], dtype=np.int64),
    # values whose shortest decimal needs 17 digits, a subnormal, a third: exact or not at all
    OUTPUT_PROBABILITY: np.array([0.1 + 0.2, 5e-324, 1 / 3, 0.07324316939222478, 1.0]),
}


def answer(body: bytes, length: str | None, wanted) -> triton.InferResult:
    encoded = encode_response("credit-risk", "3", "req-1", {"registry_version": "3"}, SCORED, wanted)
    header = encoded.headers.get("Inference-Header-Content-Length")
    return triton.InferResult.from_response_body(encoded.body, header_length=header and int(header))


@pytest.mark.parametrize(
    "outputs, options, binary",
    [
        (None, {}, True),  # tritonclient asks binary_data_output when it names no output
        ([triton.InferRequestedOutput(n, binary_data=True) for n in OUTPUTS], {}, True),
        ([triton.InferRequestedOutput(n, binary_data=False) for n in OUTPUTS], {}, False),
    ],
)
def test_outputs_parse_back_in_tritonclient_to_the_exact_values(rows, outputs, options, binary):
    decoded = decode(*triton_body(rows.head(5), binary=True, outputs=outputs, **options))
    assert [(o.name, o.binary) for o in decoded.outputs] == [(n, binary) for n in OUTPUTS]
    result = answer(*triton_body(rows.head(5), binary=True, outputs=outputs), decoded.outputs)
    for name in OUTPUTS:
        parsed = result.as_numpy(name)
        assert parsed.shape == (5, 1) and parsed.dtype == SCORED[name].dtype
        assert same_bits(parsed[:, 0].astype(np.float64), SCORED[name].astype(np.float64))
        assert ("binary_data_size" in (result.get_output(name).get("parameters") or {})) is binary


def test_one_output_binary_and_one_json_only_the_ones_asked(rows):
    outputs = [triton.InferRequestedOutput(OUTPUT_PROBABILITY, binary_data=True)]
    decoded = decode(*triton_body(rows.head(5), binary=False, outputs=outputs))
    assert decoded.outputs == (RequestedOutput(OUTPUT_PROBABILITY, True),)
    body = orjson.dumps({**orjson.loads(null_body(rows.head(5))), "parameters": {"binary_data_output": True},
                         "outputs": [{"name": OUTPUT_PREDICTION, "parameters": {"binary_data": False}},
                                     {"name": OUTPUT_PROBABILITY}]})  # fmt: skip
    decoded = decode(body)
    assert decoded.outputs == (
        RequestedOutput(OUTPUT_PREDICTION, False),
        RequestedOutput(OUTPUT_PROBABILITY, True),
    )
    result = answer(body, None, decoded.outputs)
    assert result.get_output(OUTPUT_PREDICTION)["data"] == SCORED[OUTPUT_PREDICTION].tolist()
    assert same_bits(result.as_numpy(OUTPUT_PROBABILITY)[:, 0], SCORED[OUTPUT_PROBABILITY])


def test_a_binary_answer_has_the_extension_headers():
    encoded = encode_response("m", "1", "r", {}, SCORED, [RequestedOutput(OUTPUT_PROBABILITY, True)])
    length = int(encoded.headers["Inference-Header-Content-Length"])
    assert encoded.headers["Content-Type"] == "application/octet-stream"
    assert len(encoded.body) == length + 5 * 8 and orjson.loads(encoded.body[:length])["id"] == "r"
    plain = encode_response("m", "1", "r", {}, SCORED, [RequestedOutput(OUTPUT_PROBABILITY, False)])
    assert plain.headers == {"Content-Type": "application/json"}


def test_a_json_answer_is_byte_for_byte_what_mlserver_renders():
    """MLServer's route class and response renderer on ``v2.response`` (today's path) are the oracle."""
    rng = np.random.default_rng(3)
    scored = {OUTPUT_PREDICTION: rng.integers(0, 2, 300), OUTPUT_PROBABILITY: rng.random(300) ** 7}
    parameters = {
        "registered_model": "credit-risk-model",
        "registry_version": "3",
        "model_uri": "models:/x/3",
    }
    today = v2.response("credit-risk", "3", scored, parameters)
    today.id = "req-1"  # MLServer's DataPlane sets the id after predict

    async def infer() -> InferenceResponse:
        return today

    app = FastAPI(routes=[APIRoute("/infer", infer, methods=["POST"])], default_response_class=Response)
    rendered = TestClient(app).post("/infer").content
    wanted = [RequestedOutput(name, False) for name in OUTPUTS]
    assert encode_response("credit-risk", "3", "req-1", parameters, scored, wanted).body == rendered


# --- Bad binary bodies -------------------------------------------------------------------


def binary_rows(rows, count=3) -> tuple[bytes, str]:
    return triton_body(rows.head(count), binary=True)


def test_a_size_that_disagrees_with_the_shape_is_400_naming_the_input(rows):
    body, length = binary_rows(rows)
    header = orjson.loads(body[: int(length)])
    header["inputs"][1]["parameters"]["binary_data_size"] = 16  # age: 3 rows are 24 bytes
    new_header = orjson.dumps(header)
    tensors = body[int(length) :]
    message = refused(new_header + tensors, str(len(new_header)))
    assert (
        message == "input 'age': binary_data_size 16 does not match its shape: 3 FP64 value(s) are 24 bytes"
    )


def test_a_truncated_body_is_400_naming_the_input(rows):
    body, length = binary_rows(rows)
    message = refused(body[:-5], length)
    assert message.startswith(f"input '{FEATURES[-1]}': binary_data_size 24 goes past the end of the body")


def test_a_header_length_past_the_end_is_400(rows):
    body, _ = binary_rows(rows)
    assert f"Inference-Header-Content-Length is {len(body) + 1}, past the end" in refused(
        body, str(len(body) + 1)
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b, n: (b + b"\0\0", n), "2 byte(s) after the last binary input"),
        (lambda b, n: (b, "12x"), 'Inference-Header-Content-Length: expected a number of bytes, got "12x"'),
        (lambda b, n: (b, "-1"), 'Inference-Header-Content-Length: expected a number of bytes, got "-1"'),
        (lambda b, n: (b, "0"), "Inference-Header-Content-Length is 0 (a raw binary request"),
        (lambda b, n: (b, "000"), "Inference-Header-Content-Length is 0 (a raw binary request"),
        (
            lambda b, n: (b, "9" * 5000),
            "Inference-Header-Content-Length is a 5000-digit number, past the end",
        ),
        (lambda b, n: (b, str(int(n) - 1)), "the JSON header is not JSON"),
        (
            lambda b, n: (b, None),
            "(a body with binary tensors needs the Inference-Header-Content-Length header)",
        ),
    ],
)
def test_other_malformed_binary_bodies_are_400(rows, change, message):
    assert message in refused(*change(*binary_rows(rows)))


def test_binary_data_size_without_the_header_length_is_400(rows):
    body, length = binary_rows(rows)
    header = body[: int(length)]
    assert (
        "has parameters.binary_data_size, but the request has no Inference-Header-Content-Length"
        in refused(header)
    )


def test_data_and_binary_data_size_together_are_400(rows):
    body, length = binary_rows(rows)
    header = orjson.loads(body[: int(length)])
    header["inputs"][0]["data"] = [1, 2, 3]
    new_header = orjson.dumps(header)
    message = refused(new_header + body[int(length) :], str(len(new_header)))
    assert (
        message
        == f"input '{FEATURES[0]}' (inputs[0]) has both data and parameters.binary_data_size; send one of the two"
    )


@pytest.mark.parametrize("datatype", ["BOOL", "BYTES"])
def test_bool_and_bytes_tensors_are_refused_as_in_json(rows, datatype):
    inputs = []
    for name in FEATURES:
        tensor = triton.InferInput(name, [2], "FP64" if name != "age" else datatype)
        data = np.array([True, False]) if datatype == "BOOL" else np.array([b"40", b"41"], dtype=np.object_)
        tensor.set_data_from_numpy(data if name == "age" else np.array([1.0, 2.0]), binary_data=True)
        inputs.append(tensor)
    body, length = triton.InferenceServerClient.generate_request_body(inputs)
    assert f"input 'age': datatype {datatype} is not numeric" in refused(body, str(length))


# --- Malformed JSON: where and what, in one line -----------------------------------------


def with_input(index: int, **change) -> bytes:
    body = one_row()
    body["inputs"][index] = {**body["inputs"][index], **change}
    return orjson.dumps(body)


@pytest.mark.parametrize(
    "body, message",
    [
        (with_input(2, shape="x"), 'inputs[2].shape: expected a list of non-negative integers, got "x"'),
        (with_input(2, shape=[1, -1]), "inputs[2].shape[1]: expected a non-negative integer, got -1"),
        (with_input(2, shape=[True]), "inputs[2].shape[0]: expected a non-negative integer, got true"),
        (with_input(0, name=5), "inputs[0].name: expected a string, got 5"),
        (with_input(0, datatype=None), "inputs[0].datatype: expected a string, got null"),
        (with_input(1, parameters=[1]), "inputs[1].parameters: expected a JSON object, got a list"),
        (with_input(1, data="abc"), "input 'age': data must be a list, got \"abc\""),
        (orjson.dumps({"inputs": {}}), "inputs: expected a list, got an object"),
        (orjson.dumps({}), "inputs: missing; expected a list with one input per feature"),
        (orjson.dumps([1]), "the body: expected a JSON object, got a list"),
        (orjson.dumps({**one_row(), "parameters": 3}), "parameters: expected a JSON object, got 3"),
        (orjson.dumps({**one_row(), "parameters": {"binary_data_output": "yes"}}),
         'parameters.binary_data_output: expected true or false, got "yes"'),
        (orjson.dumps({**one_row(), "outputs": [{"name": "score"}]}),
         "unknown output(s) ['score']; available: ['prediction', 'probability']"),
        (orjson.dumps({**one_row(), "outputs": [{"name": "probability"}, {"name": "probability"}]}),
         "output(s) ['probability'] requested more than once"),
        (orjson.dumps({**one_row(), "outputs": [{"name": "probability", "parameters": {"classification": 2}}]}),
         "outputs[0].parameters.classification: the classification extension is not supported"),
        (with_input(0, parameters={"shared_memory_region": "r"}),
         "inputs[0].parameters.shared_memory_region: shared memory is not supported"),
        (b'{"inputs": [}', "the body is not JSON: Expecting value: line 1 column 13 (char 12)"),
        (b'{"inputs": [\xff]}', "the body is not UTF-8 text: byte 12 is 0xff"),
        # orjson refuses it (beyond 64 bits), and Python's int() past 4,300 digits.
        (b'{"inputs": [' + b"7" * 5000 + b"]}", "the body has an integer of more than 4300 digits"),
    ],
)  # fmt: skip
def test_malformed_requests_say_where_and_what_in_one_line(body, message):
    assert refused(body).startswith(message)


def test_the_value_checks_are_the_ones_of_the_grpc_path():
    """Same messages as ``v2.request_matrix`` for the same mistakes (test_v2.py covers them)."""
    body = one_row()
    body["inputs"][1]["data"] = ["forty"]
    assert refused(orjson.dumps(body)) == "input 'age': row 0 is a str ('forty'), expected a number or null"
    body["inputs"][1] |= {"data": [1, 2], "shape": [2]}
    assert refused(orjson.dumps(body)).startswith("inputs have unequal lengths")
    body["inputs"][1] |= {"shape": [1], "datatype": "BYTES", "data": ["1"]}
    assert refused(orjson.dumps(body)).startswith("input 'age': datatype BYTES is not numeric")


# --- Nesting -----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [3, 1000, 1023, 1024, 2000, 100_000])
def test_data_nested_deeper_than_the_shape_is_400_at_any_depth(depth):
    body = orjson.dumps(one_row(age="@")).replace(b'"@"', b"[" * depth + b"1" + b"]" * depth)
    message = refused(body)
    assert message in (
        "input 'age': row 0 is a list: data nested deeper than shape [1]",  # orjson read it (up to 1024)
        "the body is nested too deeply to be a request",  # orjson and json both refused it
    )


def test_deep_nesting_in_a_body_with_nan_is_400_too():
    body = orjson.dumps(one_row(age="@", DebtRatio="NaN!")).replace(b'"@"', b"[" * 5000 + b"1" + b"]" * 5000)
    assert refused(body.replace(b'"NaN!"', b"NaN")) == "the body is nested too deeply to be a request"


def test_rows_nested_as_rank_one_shape_are_too_deep():
    body = {"inputs": [{"name": name, "shape": [2], "datatype": "FP64", "data": [1, 2]} for name in FEATURES]}
    body["inputs"][1] |= {"data": [[40], [41]]}
    assert refused(orjson.dumps(body)) == "input 'age': row 0 is a list: data nested deeper than shape [2]"
    body["inputs"][1] |= {"shape": [2, 1], "data": [[40], [41, 42]]}
    assert (
        refused(orjson.dumps(body))
        == "input 'age': data must be flat or nested as shape [2, 1], one value per row"
    )


# --- Row limit ---------------------------------------------------------------------------


def test_rows_over_the_limit_are_413_from_the_shape_before_any_value(rows):
    body = one_row()
    body["inputs"][4] |= {"shape": [1001], "data": "not even a list"}
    message = refused(orjson.dumps(body), status=413, max_rows=1000)
    assert (
        message
        == "input 'MonthlyIncome': 1001 rows; this server takes at most 1000 rows per request (send smaller batches)"
    )
    decode(null_body(rows), max_rows=len(rows))  # at the limit: taken


def test_binary_rows_over_the_limit_are_413_before_the_sizes_are_checked(rows):
    body, length = binary_rows(rows, count=5)
    assert "5 rows; this server takes at most 4 rows" in refused(body, length, status=413, max_rows=4)
    header = orjson.loads(body[: int(length)])
    header["inputs"][0] |= {"shape": [10**12], "parameters": {"binary_data_size": 8 * 10**12}}
    new_header = orjson.dumps(header)
    refused(new_header + body[int(length) :], str(len(new_header)), status=413, max_rows=1000)


# --- Request ids -------------------------------------------------------------------------


def test_request_id_from_the_body_or_the_header(rows):
    body, _ = triton_body(rows.head(1), binary=False, request_id="from-body")
    assert decode(body, request_id_header="from-header").id == "from-body"
    body, _ = triton_body(rows.head(1), binary=False)
    assert decode(body, request_id_header="from-header").id == "from-header"
    assert decode(body).id is None and decode(body, request_id_header="").id is None
    assert decode(body, request_id_header="x" * 128).id == "x" * 128


@pytest.mark.parametrize(
    "value, message",
    [
        ("x" * 129, "129 characters; a request id has at most 128"),
        ("x" * 100_000, "100000 characters; a request id has at most 128"),
        ("a\nb", "character U+000A at position 1 is not printable"),
        ("a\x00", "character U+0000 at position 1 is not printable"),
        ("a\x85", "character U+0085 at position 1 is not printable"),
        ("\ud800", "character U+D800 at position 0 is not printable"),
    ],
)
def test_request_ids_too_long_or_not_printable_are_400(rows, value, message):
    body = triton_body(rows.head(1), binary=False)[0]
    assert refused(body, request_id_header=value).startswith(f"X-Request-ID: {message}")
    with_id = orjson.loads(body) | {"id": "@"}
    encoded = orjson.dumps(with_id).replace(
        b'"@"', orjson.dumps(value) if value != "\ud800" else b'"\\ud800"'
    )
    assert refused(encoded).startswith(f"id: {message}")
    assert refused(orjson.dumps(with_id | {"id": 7})) == "id: expected a string, got 7"


def test_many_unknown_inputs_or_one_huge_name_make_a_short_message_quickly():
    many = one_row()
    many["inputs"] += [
        {"name": f"x{i}", "shape": [1], "datatype": "FP64", "data": [1]} for i in range(50_000)
    ]
    message = refused(orjson.dumps(many))  # quadratic name checks would take hours here
    assert message.startswith("unknown input(s) ['x0', 'x1', 'x2', 'x3', 'x4'] and 49995 more;")
    huge = one_row()
    huge["inputs"][0] |= {"name": "n" * 1_000_000, "data": [1], "parameters": {"binary_data_size": 8}}
    assert len(refused(orjson.dumps(huge))) < 200
    outputs = orjson.dumps({**one_row(), "outputs": [{"name": "probability"}] * 50_000})
    assert refused(outputs) == "output(s) ['probability'] requested more than once"


def with_datatype(index: int, datatype: str) -> dict:
    body = one_row()
    body["inputs"][index]["datatype"] = datatype
    return body


@pytest.mark.parametrize(
    ("body", "quoted"),
    [
        # json.dumps escapes the lone surrogates (orjson refuses them)
        (json.dumps(with_datatype(0, "\ud800")), "\\ud800"),
        (json.dumps(one_row(**{"\udfff": 1.0})), "\\udfff"),
        (json.dumps({**one_row(), "id": "\udfff"}), "U+DFFF"),
    ],
)
def test_a_lone_surrogate_in_a_body_is_answered_in_text_that_can_be_written(body, quoted):
    """JSON's escaped lone surrogate decodes to a str that UTF-8 cannot encode: quoted in the
    error as it was, MLServer's handler would fail to write the answer (a bare 500)."""
    message = refused(body.encode())
    assert quoted in message
    message.encode("utf-8")
