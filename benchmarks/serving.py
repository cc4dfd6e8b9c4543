"""Benchmark: serving speed between its floor and its ceiling, in one run.

Starts its own MLflow server, trains on the bundled sample, then measures, side by side on
this machine:

- the floor: the in-process scoring call the server makes (``model.scoring``), one row and
  1,000 rows, and the registered pipeline's own ``predict_proba``;
- the ceiling: MLServer 1.7.1 with a runtime that does nothing (``constant_runtime.py``), with
  the same settings as this project's server (one process, metrics on);
- this project's server (``credit-risk serve``), with capture on and the sidecar shipping;
- ``mlflow models serve`` on the same model with one worker.

REST load comes from wrk (one generator for every target), gRPC load from h2load with a
pre-encoded request; their CPU time is reported so they are visibly not the bottleneck. wrk
repeats one body, so first a correctness pass at the same concurrency sends distinct rows (and
invalid requests) and checks every answer against the in-process prediction for that row: a
fast wrong answer is a failure.

    .venv/bin/python benchmarks/serving.py [--seconds 15] [--rounds 2] [--json serving.json]

Needs wrk and h2load (Debian: ``apt-get install wrk nghttp2-client``). Prints a table and the
targets met or missed; asserts nothing. The README quotes its output with date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import httpx
import numpy as np
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlserver.grpc import dataplane_pb2 as pb  # noqa: E402
from mlserver.grpc.converters import ModelInferRequestConverter  # noqa: E402
from mlserver.grpc.dataplane_pb2_grpc import GRPCInferenceServiceStub  # noqa: E402
from mlserver.types import InferenceRequest  # noqa: E402

from model import scoring  # noqa: E402
from model.identity import REGISTERED_MODEL_NAME  # noqa: E402
from model.schema import COUNTS, FEATURES  # noqa: E402
from serving.settings import MODEL_NAME  # noqa: E402
from stack import processes, services  # noqa: E402
from tests.helpers import BIN, credit_risk, free_port, mlflow_tracking_server, running, serving_service  # noqa: E402
from training.data import BUNDLED_SAMPLE, load_training_data  # noqa: E402

CONCURRENCY = 16
INFER_PATH = f"/v2/models/{MODEL_NAME}/infer"
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("BODY_FILE"), "r")
wrk.body = f:read("*a")
f:close()
"""


# -- requests ---------------------------------------------------------------------------


def v2_body(rows: np.ndarray, request_id: str | None = None) -> dict:
    inputs = []
    for column, name in enumerate(FEATURES):
        values = [None if math.isnan(v) else v for v in rows[:, column].tolist()]
        integer = name in COUNTS
        inputs.append(
            {
                "name": name,
                "shape": [len(rows)],
                "datatype": "INT64" if integer else "FP64",
                "data": [None if v is None else (int(v) if integer else v) for v in values],
            }
        )
    return {"inputs": inputs, **({"id": request_id} if request_id else {})}


def grpc_request(rows: np.ndarray) -> pb.ModelInferRequest:
    """The same request over gRPC, where a missing value is a NaN double (protobuf has no null)."""
    body = v2_body(rows)
    for item in body["inputs"]:
        if any(v is None for v in item["data"]):
            item["datatype"] = "FP64"
            item["data"] = [math.nan if v is None else float(v) for v in item["data"]]
    return ModelInferRequestConverter.from_types(InferenceRequest.model_validate(body), model_name=MODEL_NAME)


def grpc_frame(message: pb.ModelInferRequest) -> bytes:
    """A gRPC length-prefixed message: what h2load sends as the body of every request."""
    payload = message.SerializeToString()
    return struct.pack(">?I", False, len(payload)) + payload


# -- the floor ---------------------------------------------------------------------------


def best_of(function, repeats: int, loops: int) -> float:
    """Seconds per call: the best of ``repeats`` means over ``loops`` calls."""
    function()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(loops):
            function()
        timings.append((time.perf_counter() - started) / loops)
    return min(timings)


def measure_floor(model: scoring.LoadedModel, rows: np.ndarray) -> dict:
    """Timed with one OpenMP thread, as the server runs (OMP_NUM_THREADS=1): with a thread per
    core, scikit-learn's 1,000-row predict_proba took ~200 ms in one run here, an
    oversubscription figure, not the model's cost."""
    frame_1000 = load_training_data(BUNDLED_SAMPLE).features.head(1000)
    with threadpool_limits(1):
        return _timed_floor(model, rows, frame_1000)


def _timed_floor(model: scoring.LoadedModel, rows: np.ndarray, frame_1000) -> dict:
    return {
        "score_1_row_us": best_of(lambda: model.score(rows[:1]), 7, 500) * 1e6,
        "score_1000_rows_ms": best_of(lambda: model.score(rows[:1000]), 5, 5) * 1e3,
        "predict_proba_1000_rows_ms": best_of(lambda: model.scorer.pipeline.predict_proba(frame_1000), 5, 5)
        * 1e3,
    }


# -- correctness -------------------------------------------------------------------------


async def rest_correctness(url: str, rows: np.ndarray, expected: np.ndarray) -> dict:
    """Distinct single-row requests (every 10th invalid) from 16 clients at once."""
    wrong, failed, refused, bad_accepted = [], 0, 0, 0
    queue = list(range(len(rows)))

    async def client_loop(client):
        nonlocal failed, refused, bad_accepted
        while queue:
            i = queue.pop()
            body = v2_body(rows[i : i + 1], request_id=f"check-{i}")
            invalid = i % 10 == 0
            if invalid:
                body["inputs"][1]["data"] = ["forty"]
            response = await client.post(url, json=body)
            if invalid:
                refused += response.status_code == 400
                bad_accepted += response.status_code == 200
                continue
            if response.status_code != 200:
                failed += 1
                continue
            answer = response.json()
            got = {o["name"]: o["data"][0] for o in answer["outputs"]}
            if answer["id"] != f"check-{i}" or got["probability"] != expected[i]:
                wrong.append(i)

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(CONCURRENCY)))
    invalid = len(range(0, len(rows), 10))
    return {"checked": len(rows) - invalid, "wrong": len(wrong), "failed": failed,
            "invalid_sent": invalid, "invalid_refused_400": refused, "invalid_accepted": bad_accepted}  # fmt: skip


async def grpc_correctness(address: str, rows: np.ndarray, expected: np.ndarray) -> dict:
    wrong, failed = [], 0
    queue = list(range(len(rows)))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = GRPCInferenceServiceStub(channel)

        async def client_loop():
            nonlocal failed
            while queue:
                i = queue.pop()
                try:
                    answer = await stub.ModelInfer(grpc_request(rows[i : i + 1]))
                except grpc.aio.AioRpcError:
                    failed += 1
                    continue
                probability = next(o for o in answer.outputs if o.name == "probability")
                if probability.contents.fp64_contents[0] != expected[i]:
                    wrong.append(i)

        await asyncio.gather(*(client_loop() for _ in range(CONCURRENCY)))
    return {"checked": len(rows), "wrong": len(wrong), "failed": failed}


# -- load --------------------------------------------------------------------------------


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url: str, body_file: Path, script: Path, seconds: float, connections: int) -> dict:
    cpu = _children_cpu_s()
    result = subprocess.run(
        ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        env={**os.environ, "BODY_FILE": str(body_file)}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    out = result.stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, sockets.groups())) if sockets else 0)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        # wrk prints no percentiles when no request was answered: no latency to report.
        "p50_ms": _ms(latency["50"]) if "50" in latency else float("nan"),
        "p99_ms": _ms(latency["99"]) if "99" in latency else float("nan"),
        "errors": errors,
        "generator_cpu_s": _children_cpu_s() - cpu,
        "seconds": seconds,
    }


def h2load(address: str, frame_file: Path, seconds: float, log: Path) -> dict:
    cpu = _children_cpu_s()
    result = subprocess.run(
        ["h2load", f"-c{CONCURRENCY}", "-m1", "-t2", f"-D{seconds:g}", "--warm-up-time=1", f"--log-file={log}",
         "-d", str(frame_file), "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://{address}{GRPC_PATH}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    durations_ms = [int(line.split()[2]) / 1000 for line in log.read_text().splitlines() if line.strip()]
    statuses = [line.split()[1] for line in log.read_text().splitlines() if line.strip()]
    return {
        "rps": float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", result.stdout).group(1)),
        "p50_ms": float(np.percentile(durations_ms, 50)),
        "p99_ms": float(np.percentile(durations_ms, 99)),
        "errors": sum(status != "200" for status in statuses),
        "generator_cpu_s": _children_cpu_s() - cpu,
        "seconds": seconds,
    }


# -- the servers -------------------------------------------------------------------------


def constant_mlserver(root: Path) -> tuple[processes.Service, dict]:
    folder = root / "constant"
    folder.mkdir()
    (folder / "model-settings.json").write_text(
        json.dumps({"name": MODEL_NAME, "implementation": "benchmarks.constant_runtime.ConstantRuntime"})
    )
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    env = {"MLSERVER_HTTP_PORT": str(ports["http"]), "MLSERVER_GRPC_PORT": str(ports["grpc"]),
           "MLSERVER_METRICS_PORT": str(ports["metrics"]), "MLSERVER_PARALLEL_WORKERS": "0",
           "MLSERVER_HOST": services.LOOPBACK, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # fmt: skip
    command = [str(BIN / "mlserver"), "start", str(folder)]
    return processes.Service(
        "constant", command, f"http://{services.LOOPBACK}:{ports['http']}/v2/health/ready", env
    ), ports


def mlflow_models_serve(tracking_uri: str, version: str) -> tuple[processes.Service, int]:
    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{REGISTERED_MODEL_NAME}/{version}",
               "--env-manager", "local", "-h", services.LOOPBACK, "-p", str(port), "-w", "1"]  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return processes.Service(
        "mlflow-models-serve", command, f"http://{services.LOOPBACK}:{port}/ping", env
    ), port


def dataframe_split_body(rows: np.ndarray) -> dict:
    data = [[None if math.isnan(v) else v for v in row] for row in rows.tolist()]
    return {"dataframe_split": {"columns": list(FEATURES), "data": data}}


# -- the run -----------------------------------------------------------------------------


def machine() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return f"{os.cpu_count()} cores ({cpu}), {memory_gb:.0f} GB, Python {platform.python_version()}"


def run(args) -> dict:
    for tool in ("wrk", "h2load"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian: apt-get install wrk nghttp2-client)")
    root = Path(tempfile.mkdtemp(prefix="credit-risk-serving-bench-"))
    script = root / "post.lua"
    script.write_text(WRK_SCRIPT)
    features = load_training_data(BUNDLED_SAMPLE).features.to_numpy()
    results: dict = {"date": f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}", "machine": machine()}

    with mlflow_tracking_server(root) as tracking_uri:
        trained = credit_risk("train", "--data", str(BUNDLED_SAMPLE), tracking_uri=tracking_uri)
        if trained.returncode != 0:
            sys.exit(f"training failed:\n{trained.stdout}{trained.stderr}")
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        model = scoring.load(f"models:/{REGISTERED_MODEL_NAME}/1")
        expected = model.score(features)[1]
        results["floor"] = measure_floor(model, features)

        one_row, thousand = root / "one.json", root / "thousand.json"
        one_row.write_text(json.dumps(v2_body(features[:1])))
        thousand.write_text(json.dumps(v2_body(features[:1000])))
        frame_file = root / "one.grpc"
        frame_file.write_bytes(grpc_frame(grpc_request(features[:1])))
        mlflow_one = root / "mlflow-one.json"
        mlflow_one.write_text(json.dumps(dataframe_split_body(features[:1])))

        spool = root / "spool"
        ours, ours_ports = serving_service(tracking_uri, CREDIT_RISK_SPOOL_DIR=str(spool))
        sidecar = services.sidecar(tracking_uri, spool, free_port())
        constant, constant_ports = constant_mlserver(root)
        mlflow_serve, mlflow_port = mlflow_models_serve(tracking_uri, "1")
        ours_url = f"http://{services.LOOPBACK}:{ours_ports['http']}"
        constant_url = f"http://{services.LOOPBACK}:{constant_ports['http']}"
        mlflow_url = f"http://{services.LOOPBACK}:{mlflow_port}/invocations"
        with running(ours, root), running(sidecar, root, timeout=60), running(constant, root), \
                running(mlflow_serve, root):  # fmt: skip
            checked = features[: args.check_rows]
            results["correctness"] = {
                "rest": asyncio.run(rest_correctness(ours_url + INFER_PATH, checked, expected)),
                "grpc": asyncio.run(
                    grpc_correctness(f"{services.LOOPBACK}:{ours_ports['grpc']}", checked, expected)
                ),
            }
            mlflow_answer = httpx.post(
                mlflow_url, json=dataframe_split_body(features[:200]), timeout=60
            ).json()
            results["correctness"]["mlflow_models_serve_same_answers"] = [
                p["probability"] for p in mlflow_answer["predictions"]
            ] == expected[:200].tolist()

            shipped_before = httpx.get(sidecar.health_url, timeout=10).json()["shipped_records_total"]
            rounds = {"constant": [], "ours": [], "mlflow": [], "constant_grpc": [], "ours_grpc": []}
            for number in range(args.rounds):
                rounds["constant"].append(
                    wrk(constant_url + INFER_PATH, one_row, script, args.seconds, CONCURRENCY)
                )
                rounds["ours"].append(wrk(ours_url + INFER_PATH, one_row, script, args.seconds, CONCURRENCY))
                rounds["mlflow"].append(wrk(mlflow_url, mlflow_one, script, args.seconds, CONCURRENCY))
                for name, port in (
                    ("constant_grpc", constant_ports["grpc"]),
                    ("ours_grpc", ours_ports["grpc"]),
                ):
                    log = root / f"{name}-{number}.log"
                    rounds[name].append(h2load(f"{services.LOOPBACK}:{port}", frame_file, args.seconds, log))
            results["load"] = rounds
            results["sequential"] = {
                "constant": wrk(constant_url + INFER_PATH, one_row, script, args.seconds, 1),
                "ours": wrk(ours_url + INFER_PATH, one_row, script, args.seconds, 1),
                "ours_1000_rows": wrk(ours_url + INFER_PATH, thousand, script, args.seconds, 1),
            }
            time.sleep(2)
            results["sidecar_shipped_during_run"] = (
                httpx.get(sidecar.health_url, timeout=10).json()["shipped_records_total"] - shipped_before
            )
    return results


def best(rounds: list[dict]) -> dict:
    """The round with the median throughput: neither the luckiest nor the unluckiest."""
    ordered = sorted(rounds, key=lambda r: r["rps"])
    return ordered[(len(ordered) - 1) // 2]


def report(results: dict) -> None:
    floor, load, sequential = results["floor"], results["load"], results["sequential"]
    rows = [(name, best(load[key])) for name, key in (
        ("MLServer, constant runtime (ceiling), REST", "constant"),
        ("credit-risk serve, REST", "ours"),
        ("mlflow models serve -w 1, REST", "mlflow"),
        ("MLServer, constant runtime, gRPC", "constant_grpc"),
        ("credit-risk serve, gRPC", "ours_grpc"),
    )]  # fmt: skip
    print(f"date: {results['date']}; machine: {results['machine']}")
    print(f"in-process scoring (the floor): 1 row {floor['score_1_row_us']:.0f} µs; 1,000 rows "
          f"{floor['score_1000_rows_ms']:.1f} ms (pipeline.predict_proba: {floor['predict_proba_1000_rows_ms']:.1f} ms)")  # fmt: skip
    print(f"\n{CONCURRENCY} connections, single-row requests (median round of {len(load['ours'])}):")
    print(f"  {'target':45} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'generator CPU':>14}")
    for name, figures in rows:
        share = figures["generator_cpu_s"] / figures["seconds"] * 100
        print(f"  {name:45} {figures['rps']:8.0f} {figures['p50_ms']:8.2f} {figures['p99_ms']:8.2f} "
              f"{figures['errors']:7d} {share:12.0f} %")  # fmt: skip
    every = {key: ", ".join(f"{r['rps']:.0f}" for r in results_) for key, results_ in load.items()}
    print("  all rounds, req/s: " + "; ".join(f"{key} {rates}" for key, rates in every.items()))
    print("\none connection, sequential:")
    for key, text in (("constant", "constant runtime, 1 row"), ("ours", "credit-risk serve, 1 row"),
                      ("ours_1000_rows", "credit-risk serve, 1,000 rows")):  # fmt: skip
        figures = sequential[key]
        print(
            f"  {text:32} p50 {figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms  {figures['rps']:7.0f} req/s"
        )
    print(
        f"\ncorrectness at {CONCURRENCY} concurrent clients, distinct rows: {json.dumps(results['correctness'])}"
    )
    print(f"sidecar shipped {results['sidecar_shipped_during_run']} records during the load")

    ours, constant, mlflow = best(load["ours"]), best(load["constant"]), best(load["mlflow"])
    correct = results["correctness"]
    targets = [
        ("REST >= 1,500 req/s", ours["rps"] >= 1500, f"{ours['rps']:.0f}"),
        ("REST >= 45 % of the constant runtime", ours["rps"] >= 0.45 * constant["rps"],
         f"{ours['rps'] / constant['rps'] * 100:.0f} %"),
        ("REST p99 <= 25 ms", ours["p99_ms"] <= 25, f"{ours['p99_ms']:.1f} ms"),
        ("REST zero errors", all(r["errors"] == 0 for r in load["ours"] + load["ours_grpc"]),
         f"{sum(r['errors'] for r in load['ours'] + load['ours_grpc'])}"),
        ("REST >= 10 x mlflow models serve", ours["rps"] >= 10 * mlflow["rps"], f"{ours['rps'] / mlflow['rps']:.1f} x"),
        ("sequential p50 <= constant p50 + 2 x scoring call",
         sequential["ours"]["p50_ms"] <= sequential["constant"]["p50_ms"] + 2 * floor["score_1_row_us"] / 1000,
         f"{sequential['ours']['p50_ms']:.2f} vs {sequential['constant']['p50_ms'] + 2 * floor['score_1_row_us'] / 1000:.2f} ms"),
        ("1,000 rows <= 2 x predict_proba + 5 ms",
         sequential["ours_1000_rows"]["p50_ms"] <= 2 * floor["predict_proba_1000_rows_ms"] + 5,
         f"{sequential['ours_1000_rows']['p50_ms']:.1f} vs {2 * floor['predict_proba_1000_rows_ms'] + 5:.1f} ms"),
        ("answers exact (REST, gRPC, mlflow models serve)",
         correct["rest"]["wrong"] == correct["rest"]["failed"] == correct["grpc"]["wrong"] == correct["grpc"]["failed"] == 0
         and correct["rest"]["invalid_refused_400"] == correct["rest"]["invalid_sent"]
         and correct["mlflow_models_serve_same_answers"], "see correctness"),
        ("sidecar shipping during the run", results["sidecar_shipped_during_run"] > 0,
         f"{results['sidecar_shipped_during_run']} records"),
    ]  # fmt: skip
    print("\ntargets:")
    for text, met, figure in targets:
        print(f"  {'met   ' if met else 'MISSED'} {text:52} {figure}")
    results["targets"] = {text: {"met": bool(met), "figure": figure} for text, met, figure in targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15, help="duration of each load measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the 16-connection loads, alternated")
    parser.add_argument("--check-rows", type=int, default=2000, help="distinct rows in the correctness pass")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    results = run(args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
