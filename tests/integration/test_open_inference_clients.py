"""Every Open Inference client against a real server (issue 18): missing values as numpy
clients send them (``NaN``), the binary tensor extension both ways, MLServer's own batch
client (``mlserver infer``), and the records captured for all of them.

The oracle is the documented request: V2 JSON with ``null`` for a missing value, answered by
the same server. Every other form must give the same bits, and the same captured record.
The server is one of this module's, with capture on, so that its spool can be read."""

from __future__ import annotations

import json
import math
import subprocess

import grpc
import httpx
import numpy as np
import orjson
import pandas as pd
import pytest
import tritonclient.http as triton
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc.dataplane_pb2_grpc import GRPCInferenceServiceStub
from tritonclient.utils import InferenceServerException

from model.schema import FEATURES, OUTPUT_PREDICTION, OUTPUT_PROBABILITY
from serving.settings import MODEL_NAME
from serving.spool_format import OPEN_SUFFIX, SEALED_SUFFIX, decode
from tests.helpers import BIN, running, serving_service
from tests.integration.test_serving import grpc_array, grpc_inputs, triton_grpc, v2_body
from training.data import load_training_data

pytestmark = pytest.mark.integration

INFER = f"/v2/models/{MODEL_NAME}/infer"
OUTPUTS = (OUTPUT_PREDICTION, OUTPUT_PROBABILITY)


@pytest.fixture(scope="module")
def sample(sample_path) -> pd.DataFrame:
    return load_training_data(sample_path).features.reset_index(drop=True)


@pytest.fixture(scope="module")
def rows(sample) -> pd.DataFrame:
    """40 rows, 16 of them missing MonthlyIncome or NumberOfDependents (or both)."""
    missing = sample[sample.isna().any(axis=1)]
    chosen = pd.concat([missing.head(12), missing[missing["NumberOfDependents"].isna()].head(4),
                        sample.dropna().head(24)])  # fmt: skip
    assert chosen["NumberOfDependents"].isna().sum() >= 4 and chosen["MonthlyIncome"].isna().sum() >= 12
    return chosen.sample(frac=1, random_state=5).reset_index(drop=True)


@pytest.fixture(scope="module")
def server(trained, tracking_uri, tmp_path_factory):
    state = tmp_path_factory.mktemp("open-inference")
    spool = state / "spool"
    service, ports = serving_service(tracking_uri, name="open-inference", CREDIT_RISK_SPOOL_DIR=str(spool))
    with running(service, state):
        yield {"url": f"http://127.0.0.1:{ports['http']}", "spool": spool, **ports}


def rest_null(server, frame: pd.DataFrame, request_id: str = "null-1") -> dict[str, np.ndarray]:
    """The documented request (JSON, ``null`` for missing) and its outputs as arrays."""
    response = httpx.post(server["url"] + INFER, json=v2_body(frame, id=request_id), timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == request_id
    return {o["name"]: np.array(o["data"], dtype="int64" if o["datatype"] == "INT64" else "float64").ravel()
            for o in answer["outputs"]}  # fmt: skip


def triton_inputs(frame: pd.DataFrame, binary: bool) -> list[triton.InferInput]:
    """FP64 columns with ``np.nan`` for a missing value, as a pandas user has them."""
    inputs = []
    for name in FEATURES:
        tensor = triton.InferInput(name, [len(frame)], "FP64")
        tensor.set_data_from_numpy(frame[name].to_numpy(dtype="float64"), binary_data=binary)
        inputs.append(tensor)
    return inputs


def same_bits(got: np.ndarray, expected: np.ndarray) -> bool:
    return got.dtype == expected.dtype and got.tobytes() == expected.tobytes()


# -- tritonclient, HTTP and gRPC ---------------------------------------------------------------

OUTPUT_FORMS = {
    "JSON outputs": lambda: [triton.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS],
    "binary outputs": lambda: [triton.InferRequestedOutput(name, binary_data=True) for name in OUTPUTS],
    "binary_data_output (no outputs named)": lambda: None,
}


@pytest.mark.parametrize("outputs", sorted(OUTPUT_FORMS))
@pytest.mark.parametrize("binary_inputs", [False, True], ids=["JSON inputs", "binary inputs"])
def test_tritonclient_http_with_nan_answers_bit_for_bit_like_null(server, rows, binary_inputs, outputs):
    """Issue 18: NaN in a JSON body was a 422, a binary body a 422."""
    expected = rest_null(server, rows)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server['http']}")
    requested = OUTPUT_FORMS[outputs]()
    result = client.infer(
        MODEL_NAME, triton_inputs(rows, binary_inputs), outputs=requested, request_id="nan-1"
    )
    response = result.get_response()
    assert response["id"] == "nan-1"
    binary_outputs = outputs != "JSON outputs"
    for name in OUTPUTS:
        got = result.as_numpy(name)
        assert got.shape == (len(rows), 1)
        assert same_bits(got.ravel(), expected[name]), name
        sent_raw = "binary_data_size" in (result.get_output(name).get("parameters") or {})
        assert sent_raw is binary_outputs, name


def test_tritonclient_grpc_with_nan_answers_bit_for_bit_like_null(server, rows):
    expected = rest_null(server, rows)
    answer = triton_grpc(server["grpc"], [{"id": "grpc-nan", "inputs": grpc_inputs(rows)}])["grpc-nan"]
    assert answer["id"] == "grpc-nan", answer
    for name in OUTPUTS:
        assert same_bits(grpc_array(answer["outputs"][name]).ravel(), expected[name]), name


def test_a_large_answer_is_compressed_off_the_loop_and_the_same(server, sample):
    """A body over 64 KiB is answered by the large-request thread, which also compresses the
    answer for a client that takes gzip (``serving.offload``)."""
    body = json.dumps(v2_body(sample.head(2000), id="large")).encode()
    assert len(body) > 64 << 10
    packed = httpx.post(server["url"] + INFER, content=body, headers={"Accept-Encoding": "gzip"}, timeout=60)
    plain = httpx.post(
        server["url"] + INFER, content=body, headers={"Accept-Encoding": "identity"}, timeout=60
    )
    assert packed.status_code == plain.status_code == 200
    assert packed.headers["content-encoding"] == "gzip" and "content-encoding" not in plain.headers
    assert packed.content == plain.content  # httpx inflated it
    assert json.loads(plain.content)["id"] == "large"


# -- mlserver infer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_file(sample, tmp_path_factory) -> tuple:
    """1,000 requests of one real row each, a fifth of them missing a value, as ``mlserver
    infer`` reads them: one V2 JSON request per line, ``null`` for a missing value (it decodes
    each with numpy and sends the row through tritonclient, which writes ``NaN``)."""
    missing = sample[sample.isna().any(axis=1)].head(200)
    frame = (
        pd.concat([missing, sample.dropna().head(800)]).sample(frac=1, random_state=11).reset_index(drop=True)
    )
    assert frame.isna().any(axis=1).sum() == 200
    path = tmp_path_factory.mktemp("mlserver-infer") / "requests.jsonl"
    with path.open("w") as out:
        for index, row in frame.iterrows():
            inputs = [{"name": name, "shape": [1], "datatype": "FP64",
                       "data": [None if math.isnan(row[name]) else row[name]]} for name in FEATURES]  # fmt: skip
            out.write(json.dumps({"id": f"row-{index}", "inputs": inputs}) + "\n")
    return path, frame


@pytest.mark.parametrize(
    "flags", [["-w", "8"], ["-w", "8", "-s", "5"], ["-w", "8", "-b"]], ids=["one row", "-s 5", "binary"]
)
def test_mlserver_infer_answers_every_row_like_rest(server, batch_file, flags, tmp_path):
    """Issue 18: 203 of 1,000 single-row requests failed after 3 retries each; with ``-s 5``
    only 350 rows were answered."""
    path, frame = batch_file
    output = tmp_path / "answers.jsonl"
    run = subprocess.run(
        [str(BIN / "mlserver"), "infer", "-u", f"127.0.0.1:{server['http']}", "-m", MODEL_NAME,
         "-i", str(path), "-o", str(output), *flags],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    failed = [answer for answer in answers if "error" in answer]
    assert not failed, f"{len(failed)} failures, e.g. {failed[:2]}"
    by_index = {answer["parameters"]["batch_index"]: answer for answer in answers}
    assert sorted(by_index) == list(range(len(frame)))
    expected = {name: np.concatenate([rest_null(server, frame.iloc[start : start + 250])[name]
                                      for start in range(0, len(frame), 250)]) for name in OUTPUTS}  # fmt: skip
    for name, dtype in ((OUTPUT_PREDICTION, "int64"), (OUTPUT_PROBABILITY, "float64")):
        got = np.array([next(o["data"] for o in by_index[i]["outputs"] if o["name"] == name)[0]
                        for i in range(len(frame))], dtype=dtype)  # fmt: skip
        assert same_bits(got, expected[name]), name
    assert all(by_index[i]["id"] == f"row-{i}" for i in range(len(frame)))


# -- the records ------------------------------------------------------------------------------


def records(spool) -> dict[str, dict]:
    """Every record in the spool by request id (the segments, open or sealed)."""
    found = {}
    for path in sorted(spool.iterdir()):
        if path.name.endswith((OPEN_SUFFIX, SEALED_SUFFIX)):
            for line in path.read_bytes().splitlines():
                record = decode(line, default_replica="")
                found[record["request_id"]] = record
    return found


def test_the_records_of_every_form_are_the_record_of_null(server, rows):
    """The same rows as documented (null), as tritonclient sends them (NaN in JSON, binary
    tensors, gRPC), and on ``/predict`` with NaN: the features and outputs captured are the
    same, bit for bit once parsed."""
    rest_null(server, rows, "rec-null")
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server['http']}")
    client.infer(MODEL_NAME, triton_inputs(rows, binary=False), request_id="rec-nan")
    client.infer(MODEL_NAME, triton_inputs(rows, binary=True), request_id="rec-binary")
    triton_grpc(server["grpc"], [{"id": "rec-grpc", "inputs": grpc_inputs(rows)}])
    predict = json.dumps(rows.to_dict(orient="records")).encode()  # Python's json writes NaN
    assert b"NaN" in predict
    flat = httpx.post(server["url"] + "/predict", content=predict, headers={"X-Request-ID": "rec-predict"},
                      timeout=30)  # fmt: skip
    assert flat.status_code == 200, flat.text
    found = records(server["spool"])
    reference = found["rec-null"]
    assert reference["features"]["MonthlyIncome"].count(None) == rows["MonthlyIncome"].isna().sum() > 0
    for request_id in ("rec-nan", "rec-binary", "rec-grpc", "rec-predict"):
        record = found[request_id]
        for field in ("features", "outputs", "model_version", "dataset_hash", "registered_model"):
            assert record[field] == reference[field], (request_id, field)


# -- bad binary bodies, Infinity --------------------------------------------------------------


def binary_request(frame: pd.DataFrame) -> tuple[dict, bytes]:
    body, length = triton.InferenceServerClient.generate_request_body(triton_inputs(frame, binary=True))
    return orjson.loads(body[:length]), body[length:]


def post_binary(server, header: dict, tensors: bytes, length: int | None = None) -> httpx.Response:
    head = orjson.dumps(header)
    return httpx.post(
        server["url"] + INFER,
        content=head + tensors,
        headers={"Inference-Header-Content-Length": str(len(head) if length is None else length)},
        timeout=30,
    )


def test_bad_binary_bodies_are_400_naming_the_input(server, rows):
    header, tensors = binary_request(rows.head(3))
    wrong_size = json.loads(json.dumps(header))
    wrong_size["inputs"][1]["parameters"]["binary_data_size"] = 16
    cases = [
        (post_binary(server, wrong_size, tensors),
         "input 'age': binary_data_size 16 does not match its shape: 3 FP64 value(s) are 24 bytes"),
        (post_binary(server, header, tensors[:-5]),
         f"input '{FEATURES[-1]}': binary_data_size 24 goes past the end of the body (19 bytes left): "
         "is the body truncated?"),
    ]  # fmt: skip
    for response, message in cases:
        assert response.status_code == 400 and response.json() == {"error": message}
    total = len(orjson.dumps(header)) + len(tensors)
    past = post_binary(server, header, tensors, length=total + 10)
    assert past.status_code == 400
    assert past.json() == {
        "error": f"Inference-Header-Content-Length is {total + 10}, past the end of the body ({total} bytes): "
        "is the body truncated?"
    }


def test_infinity_is_400_naming_the_input_and_the_row_on_every_route(server, rows):
    frame = rows.head(4).copy()
    frame.loc[2, "DebtRatio"] = np.inf
    message = "input 'DebtRatio': row 2 is Infinity; expected a finite number"
    for binary in (False, True):
        client = triton.InferenceServerClient(url=f"127.0.0.1:{server['http']}")
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL_NAME, triton_inputs(frame, binary))
        assert refused.value.status() == "400" and message in refused.value.message()
    predict = json.dumps(frame.to_dict(orient="records")).encode()
    response = httpx.post(server["url"] + "/predict", content=predict, timeout=30)
    assert response.status_code == 400
    assert response.json() == {
        "error": "row 2: field 'DebtRatio' is Infinity; expected a finite number (null or NaN for a missing value)"
    }


# -- what the server says about itself ----------------------------------------------------------


def test_metadata_says_datatypes_shapes_and_that_values_may_be_missing(server):
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server['http']}")
    metadata = client.get_model_metadata(MODEL_NAME)
    assert [
        (i["name"], i["datatype"], i["shape"], i["parameters"].get("nullable")) for i in metadata["inputs"]
    ] == [(name, "FP64", [-1], True) for name in FEATURES]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        (OUTPUT_PREDICTION, "INT64", [-1, 1]),
        (OUTPUT_PROBABILITY, "FP64", [-1, 1]),
    ]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    with grpc.insecure_channel(f"127.0.0.1:{server['grpc']}") as channel:
        over_grpc = GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME))
    assert [(i.name, list(i.shape), i.parameters["nullable"].bool_param) for i in over_grpc.inputs] == [
        (name, [-1], True) for name in FEATURES
    ]


def test_answers_keep_mlservers_headers_and_metrics(server, rows):
    """What MLServer's own route gave besides the body: the CloudEvents headers (``Ce-Id`` is
    the request id) and the ``model_infer_request_*`` metrics. ``X-Request-ID`` names a
    request whose body has no id."""

    def succeeded() -> float:
        text = httpx.get(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10).text
        line = f'model_infer_request_success_total{{model="{MODEL_NAME}",version="None"}} '
        return float(next((row for row in text.splitlines() if row.startswith(line)), line + "0").split()[-1])

    before = succeeded()
    response = httpx.post(server["url"] + INFER, json=v2_body(rows.head(2)), headers={"X-Request-ID": "hdr-7"},
                          timeout=30)  # fmt: skip
    assert response.status_code == 200 and response.json()["id"] == "hdr-7"
    assert response.headers["ce-id"] == response.headers["ce-requestid"] == "hdr-7"
    assert response.headers["ce-type"] == "io.seldon.serving.inference.response"
    assert response.headers["ce-modelid"] == MODEL_NAME
    assert succeeded() == before + 1
    generated = httpx.post(server["url"] + INFER, json=v2_body(rows.head(2)), timeout=30).json()["id"]
    assert len(generated) == 36  # a UUID, as MLServer makes one
