"""The MLServer version ``serving.mlserver_hooks`` is pinned to (and ``credit-risk serve`` with
another one installed), and what ``ready`` means to MLServer's readers."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from mlserver.errors import MLServerError
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc.converters import ModelInferRequestConverter
from mlserver.settings import ModelSettings

from serving import mlserver_hooks
from serving.runtime import CreditRiskRuntime
from serving.settings import MODEL_SETTINGS_PATH
from tests.test_serving_settings import serve


def test_the_installed_mlserver_is_the_pinned_one():
    mlserver_hooks.check_mlserver_version()  # what the import did; it would have raised
    mlserver_hooks.check_mlserver_version(mlserver_hooks.MLSERVER_VERSION)


@pytest.mark.parametrize("other", ["1.7.0", "1.8.0", "1.7.1.post1", "2.0.0"])
def test_any_other_mlserver_version_is_refused_in_one_line(other):
    with pytest.raises(ImportError) as refused:
        mlserver_hooks.check_mlserver_version(other)
    assert refused.value.name == "serving.mlserver_hooks"
    message = str(refused.value)
    assert "\n" not in message
    assert f"MLServer {other} is installed" in message and "install mlserver==1.7.1" in message


def test_serve_with_another_mlserver_installed_exits_1_with_one_line(tmp_path):
    """Another installed MLServer, as ``importlib.metadata`` sees it: a distribution record of
    mlserver 9.9.9 ahead of the real one on the path (MLServer's code itself is unchanged)."""
    shadow = tmp_path / "shadow"
    record = shadow / "mlserver-9.9.9.dist-info"
    record.mkdir(parents=True)
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: mlserver\nVersion: 9.9.9\n")
    path = os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))
    result = serve(tmp_path, PYTHONPATH=path)
    assert result.returncode == 1, result.stderr
    # The line naming the tracking server, that every command prints first, and the error.
    assert result.stderr.splitlines()[1:] == [
        "error: MLServer 9.9.9 is installed, but serving.mlserver_hooks is written for MLServer 1.7.1 "
        "only (it overrides MLServer's private code): install mlserver==1.7.1"
    ]


@pytest.mark.parametrize("server", ["http", "metrics"])
def test_serve_on_a_port_in_use_exits_1_naming_it(tmp_path, server):
    """uvicorn ends the process with sys.exit(3) and tracebacks on its own; gRPC's taken port
    is checked in ``test_following.py``."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, ports={server: port})
    assert result.returncode == 1, result.stderr
    what = {"http": "HTTP", "metrics": "metrics"}[server]
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot serve: cannot listen for {what} on 127.0.0.1:{port}: [Errno 98] error while "
        f"attempting to bind on address ('127.0.0.1', {port}): address already in use"
    )
    assert "Traceback" not in result.stderr


def test_ready_is_mlservers_load_and_a_served_version():
    runtime = CreditRiskRuntime(ModelSettings.model_validate_json(MODEL_SETTINGS_PATH.read_text()))
    assert runtime.ready is False  # MLModel.__init__ wrote False
    runtime.ready = True  # what MLServer writes after load() returned True
    assert runtime.ready is False, "no version in the slot yet"
    runtime._served = object()  # what the follower's swap does
    assert runtime.ready is True
    runtime.ready = False  # what MLServer writes after unload() returned True
    assert runtime.ready is False


def _tensor(name: str, datatype: str, shape: list[int], **contents) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents)
    )


def _request(*tensors, raw=()) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="credit-risk", inputs=list(tensors), raw_input_contents=list(raw))


WELL_FORMED_RAW = {
    "FP64": _request(_tensor("age", "FP64", [3]), raw=[struct.pack("<3d", 30, 40, 50)]),
    "INT64 [2, 1]": _request(_tensor("age", "INT64", [2, 1]), raw=[struct.pack("<2q", 30, 40)]),
    "raw and contents": _request(
        _tensor("age", "FP64", [1], fp64_contents=[30.0]),
        _tensor("DebtRatio", "FP64", [1]),
        raw=[struct.pack("<d", 0.5)],
    ),
    "no raw": _request(_tensor("age", "FP64", [1], fp64_contents=[30.0])),
    "BYTES": _request(_tensor("age", "BYTES", [1]), raw=[struct.pack("<I", 2) + b"30"]),
}
MALFORMED_RAW = {
    "too short": (
        _request(_tensor("age", "FP64", [3]), raw=[struct.pack("<2d", 30, 40)]),
        "input 'age': shape [3] of FP64 needs 24 raw bytes, got 16",
    ),
    "too long": (
        _request(_tensor("age", "INT64", [1]), raw=[struct.pack("<2q", 30, 40)]),
        "input 'age': shape [1] of INT64 needs 8 raw bytes, got 16",
    ),
    "too few entries": (
        _request(_tensor("age", "FP64", [1]), _tensor("DebtRatio", "FP64", [1]), raw=[struct.pack("<d", 30)]),
        "raw_input_contents has 1 entries for 2 input(s) without contents",
    ),
    "unknown datatype": (
        _request(_tensor("age", "FOO", [1]), raw=[struct.pack("<d", 30)]),
        "input 'age': datatype 'FOO' is not an Open Inference datatype",
    ),
    "negative dimension": (
        _request(_tensor("age", "FP64", [-1]), raw=[b""]),
        "input 'age': shape [-1] has a negative dimension",
    ),
    "BYTES cut short": (
        _request(_tensor("age", "BYTES", [1]), raw=[struct.pack("<I", 5) + b"30"]),
        "input 'age': raw BYTES end inside an element",
    ),
}


@pytest.mark.parametrize("case", sorted(WELL_FORMED_RAW))
def test_raw_tensors_mlserver_unpacks_pass(case):
    request = WELL_FORMED_RAW[case]
    assert mlserver_hooks.raw_tensor_problem(request) is None
    ModelInferRequestConverter.to_types(request)  # MLServer unpacks it


@pytest.mark.parametrize("case", sorted(MALFORMED_RAW))
def test_raw_tensors_mlserver_cannot_unpack_are_named(case):
    request, problem = MALFORMED_RAW[case]
    assert mlserver_hooks.raw_tensor_problem(request).startswith(problem)
    with pytest.raises(Exception) as crashed:  # what MLServer alone would answer INTERNAL with
        ModelInferRequestConverter.to_types(request)
    assert "age" not in str(crashed.value)


@pytest.mark.parametrize("case", sorted(MALFORMED_RAW))
def test_grpc_decoding_failures_are_400s_naming_the_input(case):
    """The servicer's wrapped decoding: what MLServer raised becomes the 400 gRPC answers
    INVALID_ARGUMENT (its context is not read before decoding fails)."""
    request, problem = MALFORMED_RAW[case]
    servicer = mlserver_hooks.ServingInferenceServicer(data_plane=None, model_repository_handlers=None)
    with pytest.raises(MLServerError) as refused:
        servicer._InsertHeaders(request, context=None)
    assert refused.value.status_code == 400 and str(refused.value).startswith(problem)
