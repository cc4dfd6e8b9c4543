"""Benchmark: the V2 REST request/response codec against today's path, and what large
requests cost to decode, to size the default row and body limits.

1. **One row, per request** (best of several rounds, µs): decoding a single-row request and
   encoding its answer,
   - today: orjson, MLServer's pydantic ``InferenceRequest`` (what FastAPI validates the body
     into), ``v2.request_matrix``, ``v2.response``, and FastAPI's ``serialize_response`` plus
     MLServer's ``Response.render`` (what the route does with the returned model);
   - ``serving.v2_rest``: the same strict JSON body, the body tritonclient writes with a
     ``NaN`` (the lenient second parse), and tritonclient's binary body with binary outputs.
2. **Large requests** (each in a fresh process): the body's size, the CPU time to decode it
   and encode the answer, the longest single call of the decode (the JSON parse, orjson's or
   for a body with ``NaN`` Python's: either holds the GIL from start to end, which is what
   would keep a liveness probe waiting even with the decode in a thread), and the memory: the
   peak of what Python, orjson and numpy allocate (``tracemalloc``). For 10,000 / 100,000 /
   400,000 rows in JSON (``null``, flat and nested as ``[rows, 1]``, and ``NaN`` as
   tritonclient writes it), binary, ``/predict`` and today's path; and bodies built to cost
   the most memory per byte once parsed (empty lists, two-letter strings) at 8, 16, 32 MiB.

    .venv/bin/python benchmarks/request_codec.py [--rounds 7] [--rows 10000,100000,400000]
        [--adversarial-mib 8,16,32] [--json out.json]

Asserts nothing; prints tables. Numbers from a busy machine are noisy: compare the columns
of one run, not runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.schema import FEATURES, OUTPUT_PREDICTION, OUTPUT_PROBABILITY  # noqa: E402

OUTPUTS = (OUTPUT_PREDICTION, OUTPUT_PROBABILITY)
SAMPLE = REPO / "data" / "cs-training-sample.csv"
PARAMETERS = {
    "registered_model": "credit-risk-model",
    "registry_version": "3",
    "model_uri": "models:/credit-risk-model/3",
    "dataset_hash": "4b292ecf09853201c3445e0d3fa8a6ce7dcccc37ba38bd8b5c3740a674e011d1",
}


def sample_rows(count: int) -> pd.DataFrame:
    frame = pd.read_csv(SAMPLE)[list(FEATURES)].astype("float64")
    return frame.iloc[np.arange(count) % len(frame)].reset_index(drop=True)


def triton_body(frame: pd.DataFrame, binary: bool) -> tuple[bytes, str | None]:
    import tritonclient.http as triton

    inputs = []
    for name in FEATURES:
        tensor = triton.InferInput(name, [len(frame)], "FP64")
        tensor.set_data_from_numpy(frame[name].to_numpy(), binary_data=binary)
        inputs.append(tensor)
    body, length = triton.InferenceServerClient.generate_request_body(inputs, request_id="bench-1")
    return body, None if length is None else str(length)


def null_body(frame: pd.DataFrame) -> bytes:
    inputs = [
        {"name": name, "shape": [len(frame)], "datatype": "FP64",
         "data": [None if math.isnan(value) else value for value in frame[name].tolist()]}
        for name in FEATURES
    ]  # fmt: skip
    return orjson.dumps({"id": "bench-1", "inputs": inputs})


def nested_body(frame: pd.DataFrame) -> bytes:
    """The same request with shape ``[rows, 1]`` and data nested as it: one list per value."""
    request = orjson.loads(null_body(frame))
    for item in request["inputs"]:
        item["shape"], item["data"] = [len(frame), 1], [[value] for value in item["data"]]
    return orjson.dumps(request)


def predict_body(frame: pd.DataFrame) -> bytes:
    return json.dumps(frame.to_dict(orient="records")).encode()  # NaN as Python's json writes it


def scored(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {OUTPUT_PREDICTION: rng.integers(0, 2, rows), OUTPUT_PROBABILITY: rng.random(rows)}


# -- 1. one row per request -------------------------------------------------------------------


def _finish(coroutine):
    """Run a coroutine that never awaits (FastAPI's serialize_response for an async route)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("the coroutine awaited")


def today_path():
    from fastapi.routing import serialize_response
    from mlserver.rest.app import APIRoute
    from mlserver.rest.responses import Response
    from mlserver.types import InferenceRequest, InferenceResponse

    from serving import v2

    async def infer(): ...

    # MLServer's infer route takes its response model from its return annotation, InferenceResponse.
    field = APIRoute("/infer", infer, methods=["POST"], response_model=InferenceResponse).response_field

    def decode(body: bytes):
        payload = InferenceRequest.model_validate(orjson.loads(body))
        return payload, v2.request_matrix(payload, FEATURES), v2.requested_outputs(payload, OUTPUTS)

    def encode(request_id: str, outputs: dict) -> bytes:
        answer = v2.response("credit-risk", "3", outputs, PARAMETERS)
        answer.id = request_id
        content = _finish(serialize_response(field=field, response_content=answer, exclude_unset=True,
                                             exclude_none=True, is_coroutine=True))  # fmt: skip
        return Response(content).body

    return decode, encode


def cpu_us(function, loops: int) -> float:
    """CPU µs per call over ``loops`` calls: CPU time, since this machine may be shared."""
    started = time.process_time()
    for _ in range(loops):
        function()
    return (time.process_time() - started) / loops * 1e6


def one_row(rounds: int) -> list[dict]:
    """Every case once per round, rounds interleaved, the best round of each kept: a burst of
    load from elsewhere then hits all cases alike."""
    from serving.v2_rest import decode_request, encode_response

    frame = sample_rows(200)
    full = frame.dropna().iloc[[0]]
    missing = frame[frame.isna().any(axis=1)].iloc[[0]]
    outputs = scored(1)
    today_decode, today_encode = today_path()
    strict = null_body(full)
    cases = {"today: pydantic + v2.request_matrix + v2.response": (strict, None, None),
             "v2_rest: strict JSON (null)": (strict, None, "json"),
             "v2_rest: tritonclient JSON with NaN": (triton_body(missing, False)[0], None, "json"),
             "v2_rest: tritonclient binary in, binary out": (*triton_body(missing, True), "binary")}  # fmt: skip
    steps = {}
    for label, (body, length, kind) in cases.items():
        if kind is None:
            request_id = today_decode(body)[0].id
            steps[label] = (lambda body=body: today_decode(body),
                            lambda request_id=request_id: today_encode(request_id, outputs))  # fmt: skip
        else:

            def decode(body=body, length=length):
                return decode_request(
                    body, columns=FEATURES, outputs=OUTPUTS, max_rows=100_000, header_length=length
                )

            wanted = decode().outputs
            steps[label] = (decode, lambda wanted=wanted: encode_response("credit-risk", "3", "bench-1", PARAMETERS,
                                                                          outputs, wanted))  # fmt: skip
    best = {label: [math.inf, math.inf] for label in cases}
    for _ in range(rounds):
        for label, functions in steps.items():
            for index, function in enumerate(functions):
                function()
                best[label][index] = min(best[label][index], cpu_us(function, 2000))
    return [{"case": label, "body_bytes": len(cases[label][0]), "decode_us": decode_us, "encode_us": encode_us}
            for label, (decode_us, encode_us) in best.items()]  # fmt: skip


# -- 2. large requests, one process each --------------------------------------------------------


def child(kind: str, path: str, length: str | None) -> dict:
    """Decode (and answer) one request from ``path``: once timed, once under ``tracemalloc``
    for the peak of everything Python and numpy allocate on the way."""
    import tracemalloc

    from serving import flat_json, json_body
    from serving.errors import InvalidRequest
    from serving.v2_rest import decode_request, encode_response

    body = Path(path).read_bytes()
    today_decode, today_encode = today_path()

    def run() -> tuple[int, int, str | None]:
        try:
            if kind == "today":
                payload, values, _ = today_decode(body)
                return len(values), len(today_encode(payload.id, scored(len(values)))), None
            if kind == "predict":
                values, _ = flat_json.request_matrix(body, max_rows=None)
                outputs = scored(len(values)).values()
                answer = flat_json.answer(*outputs, "3", "bench-1", "2026-01-01T00:00:00+00:00", True)
                return len(values), len(orjson.dumps(answer)), None
            decoded = decode_request(
                body, columns=FEATURES, outputs=OUTPUTS, max_rows=None, header_length=length
            )
            rows = len(decoded.matrix)
            answer = encode_response("credit-risk", "3", "bench-1", PARAMETERS, scored(rows), decoded.outputs)
            return rows, len(answer.body), None
        except Exception as failure:  # the adversarial bodies are refused: their cost is what counts
            return 0, 0, f"{type(failure).__name__}: {str(failure)[:70]}"

    gc.collect()
    started, cpu = time.perf_counter(), time.process_time()
    rows, answer_bytes, error = run()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    gc.collect()
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    parse = time.process_time()
    try:  # the longest single call of the decode, which holds the GIL from start to end
        json_body.loads(body if length is None else memoryview(body)[: int(length)])
    except InvalidRequest:
        pass
    return {"rows": rows, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "parse_s": time.process_time() - parse, "traced_peak": peak,
            "answer_bytes": answer_bytes, "error": error}  # fmt: skip


def large(row_counts: list[int], adversarial_mib: list[int]) -> list[dict]:
    cases = []
    for rows in row_counts:
        frame = sample_rows(rows)
        cases += [(f"JSON null, {rows} rows", "v2", lambda f=frame: (null_body(f), None)),
                  (f"JSON null as [rows, 1], {rows} rows", "v2", lambda f=frame: (nested_body(f), None)),
                  (f"JSON NaN (tritonclient), {rows} rows", "v2", lambda f=frame: triton_body(f, False)),
                  (f"binary (tritonclient), {rows} rows", "v2", lambda f=frame: triton_body(f, True)),
                  (f"/predict NaN, {rows} rows", "predict", lambda f=frame: (predict_body(f), None)),
                  (f"today (pydantic), {rows} rows", "today", lambda f=frame: (null_body(f), None))]  # fmt: skip
    for mib in adversarial_mib:  # bodies built to cost the most memory per byte once parsed
        count = (mib << 20) // 3 - 20
        cases += [(f"adversarial: empty lists, {mib} MiB", "v2",
                   lambda n=count: (b'{"parameters":{"x":[' + b"[]," * n + b"[]]}}", None)),
                  (f"adversarial: 2-char strings, {mib} MiB", "v2",
                   lambda n=count * 3 // 5: (b'{"parameters":{"x":[' + b'"ab",' * n + b'""]}}', None))]  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "body"
        for label, kind, build in cases:
            body, length = build()
            path.write_bytes(body)
            del body
            output = subprocess.run(
                [sys.executable, __file__, "--child", kind, str(path), length or "-"],
                capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            ).stdout  # fmt: skip
            result = json.loads(output.splitlines()[-1]) | {"case": label, "body_bytes": path.stat().st_size}
            results.append(result)
            print(
                f"  {label}: {result['cpu_seconds']:.2f} s CPU, {result['traced_peak'] / 2**20:.0f} MiB",
                flush=True,
            )
    return results


def report_one_row(rounds: int) -> list[dict]:
    print("\n1. One row per request (CPU µs, best of interleaved rounds)")
    single = one_row(rounds)
    print(f"{'case':55} {'body B':>7} {'decode':>8} {'encode':>8} {'total':>8}")
    for r in single:
        total = r["decode_us"] + r["encode_us"]
        print(f"{r['case']:55} {r['body_bytes']:7} {r['decode_us']:8.1f} {r['encode_us']:8.1f} {total:8.1f}")
    return single


def report_large(arguments) -> list[dict]:
    print("\n2. Large requests (a fresh process each; decode, then encode the answer)")
    many = large(
        [int(n) for n in arguments.rows.split(",")], [int(n) for n in arguments.adversarial_mib.split(",")]
    )
    print(
        f"{'case':42} {'body MiB':>9} {'B/row':>6} {'CPU s':>6} {'wall s':>7} {'parse s':>8} {'traced MiB':>11}  error"
    )
    for r in many:
        per_row = f"{r['body_bytes'] / r['rows']:6.0f}" if r["rows"] else " " * 6
        print(f"{r['case']:42} {r['body_bytes'] / 2**20:9.1f} {per_row} {r['cpu_seconds']:6.2f} {r['seconds']:7.2f} "
              f"{r['parse_s']:8.2f} {r['traced_peak'] / 2**20:11.0f}  {r['error'] or ''}")  # fmt: skip
    return many


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", default="10000,100000,400000")
    parser.add_argument("--adversarial-mib", default="8,16,32")
    parser.add_argument("--only", choices=["one-row", "large"], help="run one part only")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        kind, path, length = arguments.child
        print(json.dumps(child(kind, path, None if length == "-" else length)))
        return 0
    print(f"{platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
          f"Python {platform.python_version()} · load {os.getloadavg()[0]:.1f}")  # fmt: skip
    single, many = [], []
    if arguments.only != "large":
        single = report_one_row(arguments.rounds)
    if arguments.only != "one-row":
        many = report_large(arguments)
    if arguments.json:
        arguments.json.write_text(json.dumps({"one_row": single, "large": many}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
