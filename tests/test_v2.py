import math
import subprocess
import sys

import numpy as np
import orjson
import pytest
from mlserver.types import InferenceRequest

from model.schema import FEATURES
from serving.json_body import INFINITY, NEG_INFINITY
from serving.v2 import InvalidRequest, RequestTooLarge, request_matrix, requested_outputs, response
from tests.helpers import REPO


def payload(overrides=None, drop=(), extra=None):
    inputs = {
        name: {"name": name, "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]}
        for name in FEATURES
        if name not in drop
    }
    for name, change in (overrides or {}).items():
        inputs[name] = {**inputs[name], **change}
    items = list(inputs.values()) + list(extra or [])
    return InferenceRequest.model_validate({"inputs": items})


def test_ints_floats_and_nulls_become_float64_nan_in_feature_order():
    matrix = request_matrix(
        payload(
            {
                "age": {"datatype": "INT64", "data": [40, None]},
                "DebtRatio": {"shape": [2, 1], "data": [[0.5], [1]]},
            }
        ),
        FEATURES,
    )
    assert matrix.dtype == "float64" and matrix.shape == (2, len(FEATURES))
    age, debt_ratio = FEATURES.index("age"), FEATURES.index("DebtRatio")
    assert matrix[0, age] == 40.0 and math.isnan(matrix[1, age])
    assert matrix[:, debt_ratio].tolist() == [0.5, 1.0]


@pytest.mark.parametrize(
    "request_, message",
    [
        (payload(drop=["age"]), "missing input(s) ['age']"),
        (
            payload(extra=[{"name": "Income", "shape": [2], "datatype": "FP64", "data": [1, 2]}]),
            "unknown input(s) ['Income']",
        ),
        (
            payload({"age": {"datatype": "BYTES", "data": ["40", "41"]}}),
            "input 'age': datatype BYTES is not numeric",
        ),
        (payload({"age": {"data": ["forty", 41]}}), "input 'age': row 0 is a str ('forty')"),
        (payload({"age": {"data": [True, 41]}}), "input 'age': row 0 is a boolean"),
        (payload({"age": {"datatype": "BOOL", "data": [True, False]}}), "datatype BOOL is not numeric"),
        (
            payload({"age": {"shape": [2, 2], "data": [1, 2, 3, 4]}}),
            "shape [2, 2] is not [rows] or [rows, 1]",
        ),
        (payload({"age": {"shape": [3], "data": [1, 2]}}), "announces 3 value(s), data has 2"),
        (payload({"age": {"shape": [3], "data": [1, 2, 3]}}), "inputs have unequal lengths"),
        (payload({"age": {"shape": [0], "data": []}}), "shape [0] is not [rows]"),
        (payload({"age": {"datatype": "INT64", "data": [10**400, 1]}}), "row 0 is an integer too large"),
        (payload({"age": {"data": [1.0, math.inf]}}), "input 'age': row 1 is infinite or too large"),
        (
            payload({"age": {"data": [1.0, INFINITY]}}),
            "input 'age': row 1 is Infinity; expected a finite number",
        ),
        (payload({"age": {"data": [NEG_INFINITY, 1]}}), "input 'age': row 0 is -Infinity"),
        (
            payload({"age": {"data": [[1.0], [2.0]]}}),
            "input 'age': row 0 is a list: data nested deeper than shape [2]",
        ),
        (
            payload({"age": {"data": [1.0, {"a": 1}]}}),
            "input 'age': row 1 is an object, expected a number or null",
        ),
        (payload({"age": {"data": 1.0, "shape": [1]}}), "input 'age': data must be a list, got 1.0"),
    ],
)
def test_bad_requests_name_the_input_and_the_problem(request_, message):
    with pytest.raises(InvalidRequest) as error:
        request_matrix(request_, FEATURES)
    assert message in str(error.value)
    assert error.value.status_code == 400


def test_duplicated_inputs_are_refused():
    request_ = payload(extra=[{"name": "age", "shape": [2], "datatype": "FP64", "data": [1, 2]}])
    with pytest.raises(InvalidRequest, match=r"\['age'\] given more than once"):
        request_matrix(request_, FEATURES)


def test_requested_outputs():
    request_ = InferenceRequest.model_validate({"inputs": [], "outputs": [{"name": "probability"}]})
    assert requested_outputs(request_, ["prediction", "probability"]) == ["probability"]
    request_.outputs[0].name = "score"
    with pytest.raises(InvalidRequest, match=r"unknown output\(s\) \['score'\]"):
        requested_outputs(request_, ["prediction", "probability"])


def test_invalid_request_survives_pickling_between_workers():
    import pickle

    error = pickle.loads(pickle.dumps(InvalidRequest("input 'age': bad")))
    assert error.status_code == 400 and str(error) == "input 'age': bad"


def test_response_is_what_the_pandas_codec_gives_for_the_same_outputs():
    import numpy as np
    import pandas as pd
    from mlserver.codecs import PandasCodec

    outputs = {"prediction": np.array([1, 0]), "probability": np.array([0.4, 0.1])}
    built = response("credit-risk", "3", outputs, {"registry_version": "3"})
    expected = PandasCodec.encode_response("credit-risk", pd.DataFrame(outputs), "3")
    assert built.outputs == expected.outputs
    assert built.parameters.content_type == expected.parameters.content_type == "pd"
    assert built.parameters.model_extra == {"registry_version": "3"}


def test_nan_and_null_give_the_same_matrix_bit_for_bit():
    odd_nan = float(np.array([0xFFF8000000000001], dtype=np.uint64).view(np.float64)[0])  # sign, payload
    nan = request_matrix(
        payload({"age": {"data": [math.nan, 1.0]}, "DebtRatio": {"data": [2.0, odd_nan]}}), FEATURES
    )
    null = request_matrix(
        payload({"age": {"data": [None, 1.0]}, "DebtRatio": {"data": [2.0, None]}}), FEATURES
    )
    assert np.array_equal(nan.view(np.uint64), null.view(np.uint64))
    assert np.isnan(null[0, FEATURES.index("age")]) and np.isnan(null[1, FEATURES.index("DebtRatio")])


def test_rows_over_the_limit_are_413_before_any_value_is_read():
    many = payload({name: {"shape": [5], "data": [1, 2, 3, 4, 5]} for name in FEATURES})
    assert request_matrix(many, FEATURES, max_rows=5).shape == (5, len(FEATURES))
    with pytest.raises(
        RequestTooLarge, match="5 rows; this server takes at most 4 rows per request"
    ) as error:
        request_matrix(many, FEATURES, max_rows=4)
    assert error.value.status_code == 413
    declared = payload({"MonthlyIncome": {"shape": [10**9], "data": ["not", "read"]}})
    with pytest.raises(RequestTooLarge, match="input 'MonthlyIncome': 1000000000 rows"):
        request_matrix(declared, FEATURES, max_rows=1000)


_TRITON_GRPC_REQUEST = """
import sys, numpy as np, tritonclient.grpc as grpcclient
from tritonclient.grpc._utils import _get_inference_request
columns = np.array(eval(sys.stdin.read()), dtype=np.float64).T
inputs = []
for name, column in zip(sys.argv[1:], columns):
    tensor = grpcclient.InferInput(name, [len(column)], "FP64")
    tensor.set_data_from_numpy(column)
    inputs.append(tensor)
request = _get_inference_request("credit-risk", inputs, "", "", None, 0, False, False, 0, None, None)
sys.stdout.buffer.write(request.SerializeToString())
"""


def test_tritonclient_grpc_nan_rows_decode_like_rest_null():
    """tritonclient's gRPC message (built in its own process: its protobuf module and MLServer's
    cannot share one), read by MLServer's own converter, gives the matrix of the REST request
    with null for the same rows."""
    from mlserver.grpc import dataplane_pb2
    from mlserver.grpc.converters import ModelInferRequestConverter

    rows = [[0.5, 40, 0, 0.3, math.nan, 5, 0, 1, 0, math.nan], [0.1, 30, 1, 0.2, 5000.0, 3, 0, 0, 0, 2]]
    built = subprocess.run(
        [sys.executable, "-c", _TRITON_GRPC_REQUEST, *FEATURES],
        input=repr(rows).replace("nan", "float('nan')").encode(),
        capture_output=True,
        check=True,
        cwd=REPO,
    ).stdout
    grpc_request = ModelInferRequestConverter.to_types(dataplane_pb2.ModelInferRequest.FromString(built))
    null = [[None if math.isnan(value) else value for value in row] for row in rows]
    rest = InferenceRequest.model_validate(
        orjson.loads(orjson.dumps({"inputs": [
            {"name": name, "shape": [2], "datatype": "FP64", "data": [row[j] for row in null]}
            for j, name in enumerate(FEATURES)
        ]}))
    )  # fmt: skip
    grpc_matrix, rest_matrix = request_matrix(grpc_request, FEATURES), request_matrix(rest, FEATURES)
    assert np.array_equal(grpc_matrix.view(np.uint64), rest_matrix.view(np.uint64))
    assert np.array_equal(rest_matrix, np.array(rows), equal_nan=True)
