"""What one request may cost a real server (issue 17, "Bounded requests"): the body limit after
decompression, the row limit on every route, nesting, request ids, and probes answered while
a request at the row limit is scored.

Two servers of their own (``credit-risk serve``): one with the default limits (8 MiB of body,
100,000 rows), whose process is measured (``/proc/<pid>/status``), and one with small limits
set through the environment, which shows the settings reach every route and gRPC's own
message limit."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
import tritonclient.http as triton
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc.dataplane_pb2_grpc import GRPCInferenceServiceStub

from model.schema import FEATURES
from serving.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_ROWS
from serving.settings import MODEL_NAME, serving_environment
from tests.helpers import running, serving_service
from tests.integration.test_serving import flat, grpc_tensor, triton_grpc, v2_body
from tests.test_body_limit import deflate_bomb, members_bomb
from tests.test_serving_settings import serve
from training.data import load_training_data

pytestmark = pytest.mark.integration

MiB = 1 << 20
INFER = f"/v2/models/{MODEL_NAME}/infer"
SMALL_ROWS, SMALL_BODY = 50, 256 << 10
PROBE_TIMEOUT_S = 1.0  # a probe's timeout, as kubelet's timeoutSeconds: 1


@pytest.fixture(scope="module")
def sample(sample_path) -> pd.DataFrame:
    """The bundled sample's 5,000 rows; a fifth miss a value."""
    return load_training_data(sample_path).features.reset_index(drop=True)


@pytest.fixture(scope="module")
def server(trained, tracking_uri, tmp_path_factory):
    """``credit-risk serve`` with the default limits; ``pid`` is the MLServer process."""
    service, ports = serving_service(tracking_uri, name="limits")
    with running(service, tmp_path_factory.mktemp("limits")) as process:
        yield {"url": f"http://127.0.0.1:{ports['http']}", "pid": process.pid, **ports}


@pytest.fixture(scope="module")
def small(trained, tracking_uri, tmp_path_factory):
    """``credit-risk serve`` with limits of 50 rows and 256 KiB, from the environment."""
    service, ports = serving_service(
        tracking_uri,
        name="small-limits",
        CREDIT_RISK_MAX_ROWS=str(SMALL_ROWS),
        CREDIT_RISK_MAX_BODY_BYTES=str(SMALL_BODY),
    )
    with running(service, tmp_path_factory.mktemp("small-limits")):
        yield {"url": f"http://127.0.0.1:{ports['http']}", **ports}


# -- the server's memory --------------------------------------------------------------------


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (``VmRSS``) and at its peak (``VmHWM``), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    """Start ``VmHWM`` again from the current resident memory (Linux's ``clear_refs``, 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# -- body limit ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoding, build", [("gzip", members_bomb), ("deflate", deflate_bomb)], ids=["gzip", "deflate"]
)
def test_a_compression_bomb_is_413_and_costs_the_server_about_the_limit(server, encoding, build):
    """Issue 17's bomb: ~2 MB on the wire inflating to 2 GiB (the server grew by 4,097 MB
    before). Inflation stops one byte past the limit, so the server holds at most the limit
    in one growing buffer; a buffer that grows may be copied once, hence twice the limit,
    plus 8 MiB for the interpreter's and the allocator's own slack."""
    bomb = build(2048 * MiB)
    assert len(bomb) < 2.5 * MiB
    bound_mib = 2 * DEFAULT_MAX_BODY_BYTES / MiB + 8
    pid = server["pid"]
    reset_peak(pid)
    before = memory_mib(pid)
    response = httpx.post(
        server["url"] + INFER,
        content=bomb,
        headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
        timeout=120,
    )
    after = memory_mib(pid)
    grew = after["VmHWM"] - before["VmRSS"]
    print(f"{encoding} bomb: RSS {before['VmRSS']:.0f} MiB before, peak {after['VmHWM']:.0f}, "
          f"after {after['VmRSS']:.0f}: grew {grew:.1f} MiB at most (bound {bound_mib:.0f})")  # fmt: skip
    assert response.status_code == 413, response.text
    assert response.json() == {
        "error": f"the body inflates past this server's limit of {DEFAULT_MAX_BODY_BYTES} bytes per "
        "request body (counted after decompression)"
    }
    assert grew <= bound_mib
    assert httpx.get(server["url"] + "/v2/health/ready", timeout=10).status_code == 200
    metrics = httpx.get(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10).text
    assert 'credit_risk_request_bodies_refused_total{model="credit-risk",status="413"}' in metrics


def test_a_compressed_body_within_the_limit_is_answered_like_the_plain_one(server, sample):
    import gzip

    body = json.dumps(v2_body(sample.head(100), id="gz")).encode()
    plain = httpx.post(server["url"] + INFER, content=body, timeout=30)
    packed = httpx.post(server["url"] + INFER, content=gzip.compress(body), timeout=30,
                        headers={"Content-Encoding": "gzip"})  # fmt: skip
    assert plain.status_code == packed.status_code == 200, packed.text
    assert plain.content == packed.content


def test_the_body_and_grpc_message_limits_follow_the_setting(small, sample):
    over = b" " * (SMALL_BODY + 1)
    response = httpx.post(small["url"] + INFER, content=over, timeout=30)
    assert response.status_code == 413
    assert (
        f"the body is {SMALL_BODY + 1} bytes, over this server's limit of {SMALL_BODY} bytes" in response.text
    )
    # A binary body counts whole, JSON header and raw tensors (80 bytes a row here).
    binary_body, headers = triton_body(tiled(sample, SMALL_BODY // 80 + 1), binary=True)
    assert len(binary_body) > SMALL_BODY
    response = httpx.post(small["url"] + INFER, content=binary_body, headers=headers, timeout=30)
    assert response.status_code == 413
    assert (
        f"the body is {len(binary_body)} bytes, over this server's limit of {SMALL_BODY} bytes"
        in response.text
    )
    inputs = [grpc_tensor(name, np.zeros(SMALL_BODY // 8 // len(FEATURES) + 100)) for name in FEATURES]
    answer = triton_grpc(small["grpc"], [{"id": "big", "inputs": inputs}])["big"]
    assert answer["status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED), answer
    assert f"vs. {SMALL_BODY})" in answer["message"]  # grpc's own "Received message larger than max"


def test_the_grpc_message_limit_defaults_to_the_body_limit():
    assert serving_environment({})["MLSERVER_GRPC_MAX_MESSAGE_LENGTH"] == str(DEFAULT_MAX_BODY_BYTES)
    assert (
        serving_environment({"CREDIT_RISK_MAX_BODY_BYTES": "1000"})["MLSERVER_GRPC_MAX_MESSAGE_LENGTH"]
        == "1000"
    )
    chosen = {"CREDIT_RISK_MAX_BODY_BYTES": "1000", "MLSERVER_GRPC_MAX_MESSAGE_LENGTH": "5000"}
    assert serving_environment(chosen)["MLSERVER_GRPC_MAX_MESSAGE_LENGTH"] == "5000"


@pytest.mark.parametrize("variable", ["CREDIT_RISK_MAX_ROWS", "CREDIT_RISK_MAX_BODY_BYTES"])
def test_serve_with_a_bad_limit_exits_2_naming_it(tmp_path, variable):
    result = serve(tmp_path, **{variable: "lots"})
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr and "lots" in result.stderr and "Traceback" not in result.stderr


# -- row limit ----------------------------------------------------------------------------


def tiled(sample: pd.DataFrame, rows: int) -> pd.DataFrame:
    return sample.iloc[np.arange(rows) % len(sample)].reset_index(drop=True)


def triton_body(frame: pd.DataFrame, binary: bool, datatype: str = "FP64") -> tuple[bytes, dict]:
    """The body and headers tritonclient.http sends for ``frame`` (NaN for missing values)."""
    inputs = []
    for name in FEATURES:
        tensor = triton.InferInput(name, [len(frame)], datatype)
        tensor.set_data_from_numpy(frame[name].to_numpy(dtype=datatype.lower().replace("fp", "float")),
                                   binary_data=binary)  # fmt: skip
        inputs.append(tensor)
    body, length = triton.InferenceServerClient.generate_request_body(inputs)
    return body, ({"Inference-Header-Content-Length": str(length)} if length is not None else {})


def over_limit(limit: int) -> str:
    return f"{limit + 1} rows; this server takes at most {limit} rows per request (send smaller batches)"


def test_rows_over_the_limit_are_413_on_every_route(server, small, sample):
    """At the default limit for V2 JSON, binary and gRPC. ``/predict`` cannot carry 100,001 rows
    within 8 MiB (~290 bytes a row: the body limit answers first), so its row limit is shown on
    the server with small limits, with V2 JSON beside it."""
    frame = tiled(sample, DEFAULT_MAX_ROWS + 1)
    json_body = json.dumps(v2_body(frame)).encode()
    binary_body, headers = triton_body(frame, binary=True)
    assert len(json_body) < DEFAULT_MAX_BODY_BYTES and len(binary_body) < DEFAULT_MAX_BODY_BYTES
    for body, extra in ((json_body, {}), (binary_body, headers)):
        response = httpx.post(server["url"] + INFER, content=body, headers=extra, timeout=120)
        assert response.status_code == 413, response.text
        assert response.json()["error"].endswith(over_limit(DEFAULT_MAX_ROWS))
    # FP32 keeps 100,001 rows within gRPC's message limit; tritonclient sends them raw.
    inputs = [{"name": name, "datatype": "FP32", "shape": [len(frame)],
               "data": frame[name].to_numpy(dtype="<f4").tobytes().hex()} for name in FEATURES]  # fmt: skip
    answer = triton_grpc(server["grpc"], [{"id": "many", "inputs": inputs}])["many"]
    assert answer["status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED), answer
    assert answer["message"].endswith(over_limit(DEFAULT_MAX_ROWS))

    few = tiled(sample, SMALL_ROWS + 1)
    response = httpx.post(small["url"] + "/predict", json=flat(few), timeout=30)
    assert response.status_code == 413 and response.json() == {"error": over_limit(SMALL_ROWS)}
    response = httpx.post(small["url"] + INFER, json=v2_body(few), timeout=30)
    assert response.status_code == 413 and response.json()["error"].endswith(over_limit(SMALL_ROWS))
    assert (
        httpx.post(small["url"] + "/predict", json=flat(few.head(SMALL_ROWS)), timeout=30).status_code == 200
    )


# -- nesting and request ids ----------------------------------------------------------------


def test_data_nested_a_thousand_levels_deep_is_400(server, sample):
    body = v2_body(sample.head(1))
    next(item for item in body["inputs"] if item["name"] == "age")["data"] = ["@"]
    for depth, message in (
        (1000, "input 'age': row 0 is a list: data nested deeper than shape [1]"),
        (100_000, "the body is nested too deeply to be a request"),
    ):
        content = json.dumps(body).replace('"@"', "[" * depth + "1" + "]" * depth)
        response = httpx.post(server["url"] + INFER, content=content, timeout=30)
        assert response.status_code == 400 and response.json() == {"error": message}
    row = flat(sample.head(1))[0] | {"age": "@"}
    content = json.dumps(row).replace('"@"', "[" * 1000 + "1" + "]" * 1000)
    response = httpx.post(server["url"] + "/predict", content=content, timeout=30)
    assert response.status_code == 400
    assert response.json() == {"error": "field 'age' is a list, expected a number or null"}


def test_request_ids_over_128_characters_or_with_control_characters_are_400(server, sample):
    url = server["url"]
    body = v2_body(sample.head(1))
    cases = [
        ({**body, "id": "x" * 129}, {}, INFER, "id: 129 characters; a request id has at most 128"),
        ({**body, "id": "a\nb"}, {}, INFER, "id: character U+000A at position 1 is not printable"),
        # Echoed in Ce-Id, a Latin-1 header: this one was scored, then answered a bare 500.
        ({**body, "id": "x€"}, {}, INFER, "id: character U+20AC at position 1 is not printable ASCII"),
        (body, {"X-Request-ID": "x" * 129}, INFER, "X-Request-ID: 129 characters; a request id has at most 128"),
        (body, {"X-Request-ID": "a\tb"}, INFER, "X-Request-ID: character U+0009 at position 1 is not printable"),
        (flat(sample.head(1))[0], {"X-Request-ID": "x" * 129}, "/predict",
         "X-Request-ID: 129 characters; a request id has at most 128"),
    ]  # fmt: skip
    for content, headers, path, message in cases:
        response = httpx.post(url + path, json=content, headers=headers, timeout=30)
        assert response.status_code == 400, (message, response.text)
        assert response.json()["error"].startswith(message)
        assert len(response.headers.get("ce-id", "")) <= 128
    longest = httpx.post(url + INFER, json={**body, "id": "x" * 128}, timeout=30)
    assert longest.status_code == 200 and longest.json()["id"] == longest.headers["ce-id"] == "x" * 128
    request = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        id="x" * 129,
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name=name, datatype="FP64", shape=[1], contents=pb.InferTensorContents(fp64_contents=[1.0]))
            for name in FEATURES],
    )  # fmt: skip
    with (
        grpc.insecure_channel(f"127.0.0.1:{server['grpc']}") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "id: 129 characters; a request id has at most 128"


# -- probes while a request at the row limit is scored ----------------------------------------


def probe(port: int, path: str) -> tuple[float, float, int | str]:
    """A probe as kubelet makes it: a new connection, one GET, the whole within the timeout.
    Returns when it started and ended (``time.monotonic``) and the status, or why it failed."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_S)
    try:
        connection.request("GET", path)
        outcome = connection.getresponse().status
    except OSError as error:  # a timeout or a refused connection
        outcome = f"{type(error).__name__}: {error}"
    finally:
        connection.close()
    ended = time.monotonic()
    if ended - started > PROBE_TIMEOUT_S and outcome == 200:
        outcome = f"answered after {ended - started:.2f} s"  # slow at every step, over the timeout in all
    return started, ended, outcome


def grpc_at_the_limit(port: int, frame: pd.DataFrame) -> pb.ModelInferResponse:
    """The request tritonclient.grpc sends: raw little-endian tensors."""
    request = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP64", shape=[len(frame)])
                for name in FEATURES],
        raw_input_contents=[frame[name].to_numpy(dtype="<f8").tobytes() for name in FEATURES],
    )  # fmt: skip
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)]
    ) as channel:
        return GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=300)


def probabilities(kind: str, answer) -> np.ndarray:
    if kind == "grpc":  # raw outputs, since the request was raw
        index = [output.name for output in answer.outputs].index("probability")
        return np.frombuffer(answer.raw_output_contents[index], dtype="<f8")
    header = answer.headers.get("inference-header-content-length")
    result = triton.InferResult.from_response_body(answer.content, header_length=header and int(header))
    return result.as_numpy("probability").ravel()


class AtTheLimit(threading.Thread):
    """One request of ``DEFAULT_MAX_ROWS`` rows on a thread of its own; ``sent`` is when its
    body had been handed to the connection, ``answered`` when the answer was in."""

    def __init__(self, server: dict, kind: str, frame: pd.DataFrame):
        super().__init__(daemon=True)
        self.server, self.kind, self.frame = server, kind, frame
        self.sent = self.answered = None
        self.answer = self.error = None

    def run(self):
        try:
            if self.kind == "grpc":
                self.sent = time.monotonic()
                self.answer = grpc_at_the_limit(self.server["grpc"], self.frame)
            else:
                body, headers = (
                    triton_body(self.frame, binary=self.kind == "binary")
                    if self.kind != "json null"
                    else (json.dumps(v2_body(self.frame)).encode(), {})
                )
                self.answer = httpx.post(self.server["url"] + INFER, content=self._then_sent(body),
                                         headers=headers, timeout=300)  # fmt: skip
        except Exception as error:  # reported by the test
            self.error = error
        self.answered = time.monotonic()

    def _then_sent(self, body: bytes):
        yield body
        self.sent = time.monotonic()  # httpx asks for more once the body is written


@pytest.mark.parametrize("kind", ["json null", "json NaN", "binary", "grpc"])
def test_probes_answer_within_a_second_while_a_request_at_the_row_limit_is_scored(server, sample, kind):
    """Issue 17: during a 400,000-row request liveness did not answer for 4.1 s. A request at
    the row limit is decoded, scored and encoded in the large-request thread; every probe made
    while it is in flight (its body sent, its answer not yet in) must answer 200 within 1 s,
    and there must be several. Its answer is checked against the same rows scored in one
    5,000-row request: scoring in slices gives the same bits."""
    frame = tiled(sample, DEFAULT_MAX_ROWS)
    reference = httpx.post(server["url"] + INFER, json=v2_body(sample), timeout=120)
    assert reference.status_code == 200, reference.text
    expected = np.array(next(o["data"] for o in reference.json()["outputs"] if o["name"] == "probability"))
    pid = server["pid"]
    reset_peak(pid)
    before = memory_mib(pid)
    request = AtTheLimit(server, kind, frame)
    request.start()
    probes = []
    while request.is_alive():
        for path in ("/v2/health/live", "/v2/health/ready"):
            probes.append((path, *probe(server["http"], path)))
        time.sleep(0.05)
    request.join()
    assert request.error is None, request.error
    if kind != "grpc":
        assert request.answer.status_code == 200, request.answer.text
    peak = memory_mib(pid)["VmHWM"]
    during = [p for p in probes if request.sent <= p[1] and p[2] <= request.answered]
    slowest = max(ended - started for _, started, ended, _ in during) if during else None
    print(f"{kind}: answered {request.answered - request.sent:.1f} s after its body was sent; "
          f"{len(during)} probes meanwhile, slowest {slowest}; server RSS {before['VmRSS']:.0f} MiB, "
          f"peak {peak:.0f} MiB")  # fmt: skip
    assert len(during) >= 4, f"only {len(during)} probes while the request was in flight"
    assert {path for path, *_ in during} == {"/v2/health/live", "/v2/health/ready"}
    failed = [(path, round(started - request.sent, 2), outcome) for path, started, _, outcome in during
              if outcome != 200]  # fmt: skip
    assert not failed, f"probes that did not answer 200 within {PROBE_TIMEOUT_S} s: {failed}"
    got = probabilities(kind, request.answer)
    assert len(got) == DEFAULT_MAX_ROWS
    assert got.tobytes() == expected[np.arange(DEFAULT_MAX_ROWS) % len(sample)].tobytes()
