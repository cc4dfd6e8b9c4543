"""Benchmark: 1,000 real rows scored through tritonclient HTTP, JSON against binary tensors, on
one server; and the same client against MLServer with a runtime that does nothing (the
ceiling, ``constant_runtime.py``).

Starts its own MLflow server, trains on the bundled sample, then serves it with
``credit-risk serve`` (capture off: this measures the protocol, not the spool) beside
``mlserver start`` on the constant runtime. The first 1,000 rows of the sample (a fifth miss a
value: ``NaN``, as numpy has it) are scored, per round:

- one row per request, 1,000 sequential requests, on one kept-alive connection;
- all 1,000 rows in one request;

each with JSON inputs and outputs and with binary inputs and outputs (``binary_data=True``).
The constant runtime takes only JSON through MLServer's own route, and no ``NaN`` (MLServer's
JSON parser refuses it), so it gets the same rows with 0 for a missing value; it answers one
row whatever it is sent, so only its one-row-per-request figure is a ceiling. Rounds are
interleaved (every case once per round) and the median round is reported, with the load
average, since the machine may be shared. Every answer of ours is checked against the JSON
answer with ``null``, bit for bit.

    .venv/bin/python benchmarks/open_inference_clients.py [--rounds 5] [--json out.json]

Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import tritonclient.http as triton

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.serving import constant_mlserver, machine  # noqa: E402
from model.schema import FEATURES  # noqa: E402
from serving.settings import MODEL_NAME  # noqa: E402
from tests.helpers import credit_risk, mlflow_tracking_server, running, serving_service  # noqa: E402
from training.data import BUNDLED_SAMPLE, load_training_data  # noqa: E402

ROWS = 1000
OUTPUTS = ("prediction", "probability")


def inputs(frame: pd.DataFrame, binary: bool) -> list[triton.InferInput]:
    tensors = []
    for name in FEATURES:
        tensor = triton.InferInput(name, [len(frame)], "FP64")
        tensor.set_data_from_numpy(frame[name].to_numpy(dtype="float64"), binary_data=binary)
        tensors.append(tensor)
    return tensors


def outputs(binary: bool) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]


def one_per_request(client, frame: pd.DataFrame, binary: bool) -> tuple[float, np.ndarray]:
    """Seconds for ``len(frame)`` sequential single-row requests (inputs built beforehand, as
    a client holding its rows would), and the probabilities."""
    requests = [inputs(frame.iloc[[row]], binary) for row in range(len(frame))]
    wanted = outputs(binary)
    started = time.perf_counter()
    results = [client.infer(MODEL_NAME, request, outputs=wanted) for request in requests]
    seconds = time.perf_counter() - started
    return seconds, np.concatenate([result.as_numpy("probability").ravel() for result in results])


def one_request(client, frame: pd.DataFrame, binary: bool) -> tuple[float, np.ndarray]:
    request, wanted = inputs(frame, binary), outputs(binary)
    started = time.perf_counter()
    result = client.infer(MODEL_NAME, request, outputs=wanted)
    seconds = time.perf_counter() - started
    return seconds, result.as_numpy("probability").ravel()


def null_answer(url: str, frame: pd.DataFrame) -> np.ndarray:
    """The documented request: V2 JSON, ``null`` for a missing value."""
    body = {"inputs": [{"name": name, "shape": [len(frame)], "datatype": "FP64",
                        "data": [None if math.isnan(v) else v for v in frame[name].tolist()]} for name in FEATURES]}  # fmt: skip
    answer = httpx.post(f"{url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=120).json()
    return np.array(next(o["data"] for o in answer["outputs"] if o["name"] == "probability")).ravel()


def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="credit-risk-open-inference-bench-"))
    frame = load_training_data(BUNDLED_SAMPLE).features.head(ROWS).reset_index(drop=True)
    results: dict = {"date": f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}", "machine": machine(), "load": []}
    with mlflow_tracking_server(root) as tracking_uri:
        trained = credit_risk("train", "--data", str(BUNDLED_SAMPLE), tracking_uri=tracking_uri)
        if trained.returncode != 0:
            sys.exit(f"training failed:\n{trained.stdout}{trained.stderr}")
        ours, ours_ports = serving_service(tracking_uri, name="ours")
        constant, constant_ports = constant_mlserver(root)
        with running(ours, root), running(constant, root):
            ours_url = f"127.0.0.1:{ours_ports['http']}"
            expected_one = np.concatenate([null_answer(f"http://{ours_url}", frame.iloc[[row]])
                                           for row in range(len(frame))])  # fmt: skip
            expected_all = null_answer(f"http://{ours_url}", frame)
            client = triton.InferenceServerClient(url=ours_url, network_timeout=300)
            ceiling = triton.InferenceServerClient(
                url=f"127.0.0.1:{constant_ports['http']}", network_timeout=300
            )
            zeros = frame.fillna(0)
            cases = {
                "ours, JSON, 1 row per request": lambda: one_per_request(client, frame, False),
                "ours, binary, 1 row per request": lambda: one_per_request(client, frame, True),
                "ours, JSON, 1,000 rows in 1 request": lambda: one_request(client, frame, False),
                "ours, binary, 1,000 rows in 1 request": lambda: one_request(client, frame, True),
                "constant runtime, JSON, 1 row per request": lambda: one_per_request(ceiling, zeros, False),
                "constant runtime, JSON, 1,000 rows in 1 request": lambda: one_request(ceiling, zeros, False),
            }
            timings = {label: [] for label in cases}
            for _ in range(args.rounds):
                results["load"].append(os.getloadavg()[0])
                for label, case in cases.items():
                    seconds, probability = case()
                    timings[label].append(seconds)
                    if label.startswith("ours"):
                        expected = expected_one if "per request" in label else expected_all
                        if probability.tobytes() != expected.tobytes():
                            sys.exit(f"{label}: answers differ from the JSON request with null")
            client.close()
            ceiling.close()
    results["seconds"] = timings
    return results


def report(results: dict) -> None:
    load = results["load"]
    print(f"date: {results['date']}; machine: {results['machine']}")
    print(f"load average (1 min) at each round: {', '.join(f'{value:.1f}' for value in load)}")
    print(
        f"\n{ROWS:,} rows through tritonclient HTTP (median of {len(load)} interleaved rounds; all rounds in s)"
    )
    print(f"  {'case':50} {'median s':>9} {'ms/row':>7}  rounds")
    for label, seconds in results["seconds"].items():
        median = statistics.median(seconds)
        print(
            f"  {label:50} {median:9.3f} {median / ROWS * 1000:7.3f}  {', '.join(f'{s:.3f}' for s in seconds)}"
        )
    print("\nEvery answer of ours equals, bit for bit, the JSON request with null for a missing value.")
    print("The constant runtime gets 0 for a missing value (MLServer's route refuses NaN) and answers")
    print("one row whatever it is sent: its 1,000-row figure is the cost of the request alone.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    results = run(args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
