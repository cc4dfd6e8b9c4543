"""MLServer serving the Production model from a real registry, over REST, gRPC and tritonclient."""

import json
import math
import re
import subprocess
import sys

import grpc
import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from model.identity import DATASET_HASH, PRODUCTION_MODEL_URI, REGISTERED_MODEL_NAME
from model.schema import COUNTS, FEATURES
from serving.settings import MODEL_NAME, MODEL_URI, SERVING_DIR
from tests.helpers import REPO
from training.data import load_training_data, sha256_of_file
from training.registry import production_version

pytestmark = pytest.mark.integration

# model.identity.utc_timestamp's format, written out independently: ISO 8601, UTC, ms, Z.
UTC_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def v2_body(frame: pd.DataFrame, integer_counts=True, **extra) -> dict:
    inputs = []
    for name in FEATURES:
        values = [None if math.isnan(v) else v for v in frame[name].tolist()]
        as_int = integer_counts and name in COUNTS
        inputs.append(
            {
                "name": name,
                "shape": [len(frame)],
                "datatype": "INT64" if as_int else "FP64",
                "data": [None if v is None else (int(v) if as_int else v) for v in values],
            }
        )
    return {"inputs": inputs, **extra}


def infer(mlserver, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{mlserver['url']}/v2/models/{MODEL_NAME}/infer", json=body, timeout=30, **kwargs)


def outputs(response) -> dict:
    return {o["name"]: o["data"] for o in response.json()["outputs"]}


@pytest.fixture(scope="module")
def rows(sample_path):
    return load_training_data(sample_path).features.head(64).reset_index(drop=True)


def test_model_settings_agree_with_the_registry_names():
    assert MODEL_URI == PRODUCTION_MODEL_URI


def test_inference_equals_the_registered_model_bit_for_bit(mlserver, tracking_uri, rows, sample_path):
    response = infer(mlserver, v2_body(rows, id="request-1"))
    assert response.status_code == 200, response.text
    answer = response.json()
    version = production_version(MlflowClient(tracking_uri)).version
    assert answer["id"] == "request-1"
    assert answer["model_version"] == version
    assert answer["parameters"]["registry_version"] == version
    assert answer["parameters"]["dataset_hash"] == sha256_of_file(sample_path)

    mlflow.set_tracking_uri(tracking_uri)
    expected = mlflow.pyfunc.load_model(f"models:/credit-risk-model/{version}").predict(rows)
    got = outputs(response)
    assert np.array_equal(np.array(got["probability"]).ravel(), expected["probability"].to_numpy())
    assert np.array_equal(np.array(got["prediction"]).ravel(), expected["prediction"].to_numpy())
    assert rows.isna().any().any(), "the rows should include missing values"


def test_integer_and_float_inputs_give_the_same_answer(mlserver, rows):
    as_ints, as_floats = infer(mlserver, v2_body(rows)), infer(mlserver, v2_body(rows, integer_counts=False))
    assert as_ints.status_code == as_floats.status_code == 200
    assert outputs(as_ints) == outputs(as_floats)


def test_requested_outputs_only(mlserver, rows):
    response = infer(mlserver, v2_body(rows.head(3), outputs=[{"name": "probability"}]))
    assert response.status_code == 200 and list(outputs(response)) == ["probability"]


def test_metadata_names_registry_version_and_dataset_hash(mlserver, tracking_uri, sample_path):
    metadata = httpx.get(f"{mlserver['url']}/v2/models/{MODEL_NAME}", timeout=10).json()
    version = production_version(MlflowClient(tracking_uri)).version
    assert metadata["versions"] == [version]
    assert metadata["parameters"]["registry_version"] == version
    assert metadata["parameters"]["dataset_hash"] == sha256_of_file(sample_path)
    assert [i["name"] for i in metadata["inputs"]] == list(FEATURES)


def test_metrics_are_labelled_with_version_and_dataset_hash(mlserver, tracking_uri, rows, sample_path):
    assert infer(mlserver, v2_body(rows.head(5))).status_code == 200
    text = httpx.get(f"http://127.0.0.1:{mlserver['metrics']}/metrics", timeout=10).text
    version = production_version(MlflowClient(tracking_uri)).version
    labels = f'dataset_hash="{sha256_of_file(sample_path)}",model="{MODEL_NAME}",version="{version}"'
    assert f"credit_risk_model_info{{{labels}}} 1.0" in text
    assert f"credit_risk_rows_scored_total{{{labels}}}" in text


def _readme_example_response() -> dict:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Calling the model") :]
    return json.loads(section[section.index("```json") + len("```json") : section.index("```\n\n-")])


def test_example_request_gets_the_answer_shown_in_the_readme(mlserver):
    """The model trained on the bundled sample with the defaults answers exactly as documented."""
    body = json.loads((SERVING_DIR / "example-request.json").read_text())
    response = infer(mlserver, body)
    assert response.status_code == 200, response.text
    shown, answer = _readme_example_response(), response.json()
    assert answer["outputs"] == shown["outputs"]
    assert answer["id"] == shown["id"]
    assert answer["parameters"]["dataset_hash"] == shown["parameters"]["dataset_hash"]


def _bad(rows, name, **change):
    body = v2_body(rows.head(3))
    for item in body["inputs"]:
        if item["name"] == name:
            item.update(change)
    return body


def _without(rows, name):
    body = v2_body(rows.head(3))
    body["inputs"] = [i for i in body["inputs"] if i["name"] != name]
    return body


def _with_extra(rows):
    body = v2_body(rows.head(3))
    body["inputs"].append({"name": "Income", "shape": [3], "datatype": "FP64", "data": [1, 2, 3]})
    return body


BAD_INPUTS = {
    "unknown column": (_with_extra, "unknown input(s) ['Income']"),
    "missing column": (lambda r: _without(r, "age"), "missing input(s) ['age']"),
    "string for a number": (lambda r: _bad(r, "age", data=["forty", 40, 41]), "input 'age': row 0 is a str"),
    "bool for a number": (lambda r: _bad(r, "age", data=[True, 40, 41]), "input 'age': row 0 is a boolean"),
    "BYTES datatype": (
        lambda r: _bad(r, "age", datatype="BYTES", data=["1", "2", "3"]),
        "datatype BYTES is not numeric",
    ),
    "negative count": (
        lambda r: _bad(r, "NumberOfDependents", data=[1, -1, 0]),
        "NumberOfDependents: must be >= 0",
    ),
    "fractional count": (
        lambda r: _bad(r, "NumberOfDependents", datatype="FP64", data=[1, 0.5, 0]),
        "NumberOfDependents: must be a whole number",
    ),
    "negative amount": (
        lambda r: _bad(r, "MonthlyIncome", data=[-5.0, 1.0, 2.0]),
        "MonthlyIncome: must be >= 0",
    ),
    "wrong shape": (
        lambda r: _bad(r, "age", shape=[3, 2], data=[1, 2, 3, 4, 5, 6]),
        "shape [3, 2] is not [rows] or [rows, 1]",
    ),
    "shape and data disagree": (lambda r: _bad(r, "age", shape=[4]), "announces 4 value(s), data has 3"),
    "unequal lengths": (lambda r: _bad(r, "age", shape=[2], data=[40, 41]), "inputs have unequal lengths"),
    "unknown output": (
        lambda r: {**v2_body(r.head(1)), "outputs": [{"name": "score"}]},
        "unknown output(s) ['score']",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_400_naming_the_problem(mlserver, rows, case):
    build, message = BAD_INPUTS[case]
    response = infer(mlserver, build(rows))
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_malformed_bodies_are_400_with_one_line_saying_where_and_what(mlserver, rows):
    """Not a pydantic dump, not a 422 (what MLServer's own route answers)."""
    url = f"{mlserver['url']}/v2/models/{MODEL_NAME}/infer"
    body = v2_body(rows.head(1))
    next(item for item in body["inputs"] if item["name"] == "age")["data"] = ["@"]
    beyond_float64 = json.dumps(body).replace('"@"', "1" + "0" * 400)
    cases = {
        b"not json": "the body is not JSON: Expecting value: line 1 column 1 (char 0)",
        b"{}": "inputs: missing; expected a list with one input per feature",
        b'{"inputs": [{"name": "age"}]}': "input 'age' (inputs[0]) has no data; send one of the two",
        beyond_float64.encode(): "input 'age': row 0 is an integer too large for a 64-bit float",
    }
    for content, message in cases.items():
        response = httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=10)
        assert response.status_code == 400, (content[:40], response.status_code, response.text)
        assert response.json() == {"error": message}


def test_the_mlflow_scoring_route_is_not_a_side_door(mlserver):
    response = httpx.post(f"{mlserver['url']}/invocations", json={"inputs": []}, timeout=10)
    assert response.status_code == 404


def test_tritonclient_http(mlserver, rows):
    """The plain case; missing values, binary tensors and every output form are in
    ``test_open_inference_clients.py``."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{mlserver['http']}")
    assert client.is_model_ready(MODEL_NAME)
    frame = rows.head(8).fillna(0)
    inputs = []
    for name in FEATURES:
        tensor = triton.InferInput(name, [len(frame)], "FP64")
        tensor.set_data_from_numpy(frame[name].to_numpy(dtype="float64"), binary_data=False)
        inputs.append(tensor)
    requested = [triton.InferRequestedOutput(n, binary_data=False) for n in ("prediction", "probability")]
    result = client.infer(MODEL_NAME, inputs, outputs=requested, request_id="triton-1")
    expected = outputs(infer(mlserver, v2_body(frame)))
    assert result.as_numpy("probability").ravel().tolist() == np.ravel(expected["probability"]).tolist()
    assert result.get_response()["id"] == "triton-1"
    # Without explicit outputs tritonclient asks binary_data_output: the outputs come back raw.
    plain = client.infer(MODEL_NAME, inputs)
    assert plain.as_numpy("probability").ravel().tolist() == np.ravel(expected["probability"]).tolist()
    assert all("binary_data_size" in output["parameters"] for output in plain.get_response()["outputs"])
    log = mlserver["log"].read_text()
    assert "binary_data_output" not in log and "Unrecognized params" not in log


def flat(frame: pd.DataFrame, underscores=False) -> list[dict]:
    rows = []
    for _, row in frame.iterrows():
        rows.append(
            {
                (name.replace("-", "_") if underscores else name): (None if math.isnan(v) else v)
                for name, v in row.items()
            }
        )
    return rows


def predict_flat(mlserver, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{mlserver['url']}/predict", json=body, timeout=30, **kwargs)


def test_seed_predict_answers_like_v2_with_either_spelling(mlserver, rows):
    expected = outputs(infer(mlserver, v2_body(rows.head(5))))
    probabilities = np.ravel(expected["probability"]).tolist()
    predictions = np.ravel(expected["prediction"]).tolist()
    for underscores in (False, True):
        single = predict_flat(
            mlserver, flat(rows.head(1), underscores)[0], headers={"X-Request-ID": "seed-1"}
        )
        assert single.status_code == 200, single.text
        answer = single.json()
        assert set(answer) == {"prediction", "probability", "model_version", "request_id", "timestamp"}
        assert (answer["probability"], answer["prediction"]) == (probabilities[0], predictions[0])
        assert answer["request_id"] == "seed-1" and UTC_TIMESTAMP.fullmatch(answer["timestamp"])
        batch = predict_flat(mlserver, flat(rows.head(5), underscores))
        assert batch.status_code == 200, batch.text
        assert [a["probability"] for a in batch.json()] == probabilities
        assert [a["prediction"] for a in batch.json()] == predictions
        assert len({a["request_id"] for a in batch.json()}) == 1


SEED_BAD_INPUTS = {
    "unknown field": (lambda r: {**r, "Income": 1}, "unknown field 'Income'"),
    "missing field": (lambda r: {k: v for k, v in r.items() if k != "age"}, "missing field(s) ['age']"),
    "string": (lambda r: {**r, "age": "forty"}, "field 'age' is a str ('forty')"),
    "negative": (lambda r: {**r, "NumberOfDependents": -1}, "NumberOfDependents: must be >= 0"),
    "both spellings": (
        lambda r: {**r, "NumberOfTime30_59DaysPastDueNotWorse": 0},
        "field 'NumberOfTime30-59DaysPastDueNotWorse' given twice",
    ),
    "a batch row": (lambda r: [r, {**r, "age": True}], "row 1: field 'age' is a boolean"),
    "empty batch": (lambda r: [], "an empty list has nothing to score"),
    "not an object": (lambda r: 42, "expected a JSON object of the ten features"),
}


@pytest.mark.parametrize("case", sorted(SEED_BAD_INPUTS))
def test_seed_predict_bad_input_is_400_naming_the_field(mlserver, rows, case):
    build, message = SEED_BAD_INPUTS[case]
    response = predict_flat(mlserver, build(flat(rows.head(1))[0]))
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_seed_predict_refuses_a_body_that_is_not_json(mlserver):
    response = httpx.post(f"{mlserver['url']}/predict", content=b"{nope", timeout=10)
    assert response.status_code == 400 and "not JSON" in response.json()["error"]


def test_seed_model_info_and_health_describe_the_served_version(mlserver, tracking_uri, sample_path):
    version = production_version(MlflowClient(tracking_uri))
    info = httpx.get(f"{mlserver['url']}/model/info", timeout=10).json()
    assert info["model_name"] == "credit-risk-model" and info["model_version"] == version.version
    assert info["model_stage"] == "Production" and info["run_id"] == version.run_id
    assert info["model_uri"] == f"models:/credit-risk-model/{version.version}"
    assert info["dataset_hash"] == sha256_of_file(sample_path)
    assert 0.5 < info["metrics"]["test_roc_auc"] <= 1 and UTC_TIMESTAMP.fullmatch(info["promoted_at"])
    health = httpx.get(f"{mlserver['url']}/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["model_loaded"] is True and health.json()["model_version"] == version.version


def test_seed_rejections_are_counted_like_v2(mlserver, rows):
    def rejected() -> float:
        text = httpx.get(f"http://127.0.0.1:{mlserver['metrics']}/metrics", timeout=10).text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("credit_risk_requests_rejected_total{")
        )

    before = rejected()
    assert predict_flat(mlserver, {"age": "x"}).status_code == 400
    assert infer(mlserver, {"inputs": []}).status_code == 400
    assert rejected() == before + 2


# -- gRPC: tritonclient against the same server, compared with its REST answers ----------

_GRPC_DATATYPES = {np.dtype("int64"): "INT64", np.dtype("float64"): "FP64"}


def grpc_tensor(name: str, values: np.ndarray) -> dict:
    """One input for ``triton_grpc_client``: its bytes, exactly."""
    return {
        "name": name,
        "datatype": _GRPC_DATATYPES[values.dtype],
        "shape": [len(values)],
        "data": values.astype(values.dtype.newbyteorder("<")).tobytes().hex(),
    }


def grpc_inputs(frame: pd.DataFrame) -> list[dict]:
    """A count column without missing values as INT64, every other column as FP64 with NaN
    for a missing value (gRPC tensors have no null)."""
    inputs = []
    for name in FEATURES:
        column = frame[name].to_numpy(dtype="float64")
        as_int = name in COUNTS and not np.isnan(column).any()
        inputs.append(grpc_tensor(name, column.astype("int64") if as_int else column))
    return inputs


def grpc_array(output: dict) -> np.ndarray:
    dtype = {"INT64": "<i8", "FP64": "<f8"}[output["datatype"]]
    return np.frombuffer(bytes.fromhex(output["data"]), dtype=dtype).reshape(output["shape"])


def _replaced(frame: pd.DataFrame, name: str, values: np.ndarray) -> list[dict]:
    return [grpc_tensor(name, values) if item["name"] == name else item for item in grpc_inputs(frame)]


GRPC_BAD_REQUESTS = {
    "negative age": (lambda f: _replaced(f, "age", np.array([30.0, -1.0, 40.0])), "age: must be >= 0"),
    "unknown input": (
        lambda f: [*grpc_inputs(f), grpc_tensor("Income", np.ones(len(f)))],
        "unknown input(s) ['Income']",
    ),
    "unequal lengths": (lambda f: _replaced(f, "age", np.array([30.0, 40.0])), "'age': 2"),
}


def triton_grpc(port: int, requests: list[dict], timeout: float = 120) -> dict[str, dict]:
    """tritonclient.grpc's answers to ``requests`` (``triton_grpc_client``'s format), by id.

    tritonclient runs in a process of its own (``triton_grpc_client`` says why)."""
    spec = {"url": f"127.0.0.1:{port}", "model": MODEL_NAME, "requests": requests}
    client = subprocess.run(
        [sys.executable, "-m", "tests.integration.triton_grpc_client"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    assert client.returncode == 0, client.stderr
    answers = json.loads(client.stdout)
    return dict(zip([request["id"] for request in requests], answers, strict=True))


@pytest.fixture(scope="module")
def grpc_answers(mlserver, rows) -> dict[str, dict]:
    """tritonclient.grpc's answers: ``rows`` as request ``grpc-1``, then each bad request."""
    requests = [{"id": "grpc-1", "inputs": grpc_inputs(rows)}]
    requests += [
        {"id": case, "inputs": build(rows.head(3))} for case, (build, _) in GRPC_BAD_REQUESTS.items()
    ]
    return triton_grpc(mlserver["grpc"], requests)


def test_grpc_inference_equals_rest_bit_for_bit(mlserver, grpc_answers, tracking_uri, rows, sample_path):
    missing = rows.columns[rows.isna().any()]
    assert any(name in COUNTS for name in missing) and any(name not in COUNTS for name in missing), (
        "the rows should miss values in a count and in an amount"
    )
    sent = {item["datatype"] for item in grpc_inputs(rows)}
    assert sent == {"INT64", "FP64"}, sent
    answer = grpc_answers["grpc-1"]
    assert "outputs" in answer, answer
    rest = infer(mlserver, v2_body(rows, id="rest-1"))
    assert rest.status_code == 200, rest.text
    expected = outputs(rest)

    probability, prediction = (
        grpc_array(answer["outputs"]["probability"]),
        grpc_array(answer["outputs"]["prediction"]),
    )
    assert probability.shape == prediction.shape == (len(rows), 1)
    assert probability.tobytes() == np.array(expected["probability"], dtype="<f8").tobytes()
    assert prediction.tobytes() == np.array(expected["prediction"], dtype="<i8").tobytes()

    version = production_version(MlflowClient(tracking_uri)).version
    assert answer["id"] == "grpc-1" and answer["model_version"] == version
    parameters = answer["parameters"]
    assert parameters["registry_version"] == version
    assert parameters["model_uri"] == f"models:/{REGISTERED_MODEL_NAME}/{version}"
    assert parameters[DATASET_HASH] == sha256_of_file(sample_path)
    assert parameters == rest.json()["parameters"]


@pytest.mark.parametrize("case", sorted(GRPC_BAD_REQUESTS))
def test_grpc_bad_request_is_invalid_argument_naming_the_input(grpc_answers, case):
    answer = grpc_answers[case]
    assert answer.get("status") == str(grpc.StatusCode.INVALID_ARGUMENT), answer
    assert GRPC_BAD_REQUESTS[case][1] in answer["message"], answer


def test_grpc_malformed_raw_tensor_is_invalid_argument_naming_the_input(mlserver, rows):
    """Raw bytes that do not fit an input's shape: MLServer alone answers INTERNAL ("unpack
    requires a buffer of 24 bytes"); ``serving.mlserver_hooks`` names the input. Sent with
    MLServer's own stubs, since tritonclient never builds such a request."""
    from mlserver.grpc import dataplane_pb2 as pb
    from mlserver.grpc.dataplane_pb2_grpc import GRPCInferenceServiceStub

    frame = rows.head(3)
    inputs = [pb.ModelInferRequest.InferInputTensor(name=n, datatype="FP64", shape=[3]) for n in FEATURES]
    raw = [frame[name].to_numpy(dtype="<f8").tobytes() for name in FEATURES]
    raw[FEATURES.index("age")] = raw[FEATURES.index("age")][:16]
    request = pb.ModelInferRequest(model_name=MODEL_NAME, inputs=inputs, raw_input_contents=raw)
    with grpc.insecure_channel(f"127.0.0.1:{mlserver['grpc']}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'age': shape [3] of FP64 needs 24 raw bytes, got 16" in refused.value.details()
        raw[FEATURES.index("age")] = frame["age"].to_numpy(dtype="<f8").tobytes()
        whole = stub.ModelInfer(
            pb.ModelInferRequest(model_name=MODEL_NAME, inputs=inputs, raw_input_contents=raw)
        )
        assert [output.name for output in whole.outputs] == ["prediction", "probability"]
