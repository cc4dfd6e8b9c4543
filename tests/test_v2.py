import math

import pytest
from mlserver.types import InferenceRequest

from model.schema import FEATURES
from serving.v2 import InvalidRequest, request_matrix, requested_outputs, response


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
