"""Benchmark: what inference capture costs, and how fast the sidecar ships.

Starts its own MLflow server, trains on the bundled sample, then measures with real
processes on free ports:

1. single-row latency (p50/p99) and throughput at 16 concurrent clients, capture off and on,
   from two MLServers running side by side (on = spool writes plus the sidecar shipping
   beside it): sequential requests go to both in turn and load rounds alternate, so that
   whatever else the machine does (its run-to-run noise is ~±10 %) hits both sides alike;
2. the sidecar's sustained shipping rate into MLflow from a pre-filled spool.

    .venv/bin/python benchmarks/capture_and_shipping.py [--requests 3000] [--seconds 15] [--rounds 3]

Prints figures; asserts nothing. The README quotes its output with date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.schema import FEATURES  # noqa: E402
from serving.capture import SpoolWriter  # noqa: E402
from serving.settings import MODEL_NAME  # noqa: E402
from serving.spool_format import SpoolSettings, encode  # noqa: E402
from stack import services  # noqa: E402
from tests.helpers import credit_risk, free_port, mlflow_tracking_server, running, serving_service  # noqa: E402
from training.data import BUNDLED_SAMPLE, load_training_data  # noqa: E402

CONCURRENCY = 16
# Who "scored" the records written straight to a spool (capture cost, shipping rate).
SPOOL_IDENTITY = {"model_name": MODEL_NAME, "registered_model": "credit-risk-model",
                  "model_version": "1", "dataset_hash": "0" * 64}  # fmt: skip


def single_row_bodies(count: int) -> list[dict]:
    rows = load_training_data(BUNDLED_SAMPLE).features.reset_index(drop=True)
    bodies = []
    for i in range(count):
        row = rows.iloc[i % len(rows)]
        bodies.append(
            {
                "inputs": [
                    {
                        "name": name,
                        "shape": [1],
                        "datatype": "FP64",
                        "data": [None if np.isnan(row[name]) else float(row[name])],
                    }
                    for name in FEATURES
                ]
            }
        )
    return bodies


async def concurrent(url: str, bodies: list[dict], seconds: float) -> tuple[int, list[float]]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

    async def client_loop(client, offset):
        i = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            (await client.post(url, json=bodies[i % len(bodies)])).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
            i += CONCURRENCY

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, n) for n in range(CONCURRENCY)))
    return len(latencies), latencies


def percentile(values, q):
    return float(np.percentile(values, q))


def serving(tracking_uri, name: str, spool: Path | None):
    # An empty spool folder turns capture off, whatever the caller's environment says.
    service, ports = serving_service(
        tracking_uri, name=name, CREDIT_RISK_SPOOL_DIR="" if spool is None else str(spool)
    )
    return service, f"http://{services.LOOPBACK}:{ports['http']}/v2/models/{MODEL_NAME}/infer"


def sidecar(tracking_uri, name: str, spool: Path):
    return services.sidecar(tracking_uri, spool, free_port(), name=name)


def shipped_records(sidecar_service) -> int:
    return httpx.get(sidecar_service.health_url, timeout=10).json()["shipped_records_total"]


def paired_sequential(urls: dict[str, str], bodies: list[dict]) -> dict[str, list[float]]:
    """Single-row requests sent to both servers in turn (order swapped every pair), so that
    whatever else the machine does hits both sides alike."""
    latencies = {name: [] for name in urls}
    names = list(urls)
    with httpx.Client(timeout=30) as client:
        for i, body in enumerate(bodies):
            for name in names if i % 2 == 0 else reversed(names):
                started = time.perf_counter()
                client.post(urls[name], json=body).raise_for_status()
                latencies[name].append((time.perf_counter() - started) * 1000)
    return latencies


def measure_serving(tracking_uri, root, bodies, seconds: float, rounds: int) -> dict:
    """Capture off and on side by side: two MLServers, the second with a spool and a sidecar."""
    spool = root / "spool-serving"
    off_service, off_url = serving(tracking_uri, "serving-off", None)
    on_service, on_url = serving(tracking_uri, "serving-on", spool)
    sidecar_service = sidecar(tracking_uri, "sidecar-serving", spool)
    urls = {"off": off_url, "on": on_url}
    with running(off_service, root), running(on_service, root), running(sidecar_service, root, timeout=60):
        paired_sequential(urls, bodies[:200])  # warm-up
        sequential_ms = paired_sequential(urls, bodies)
        loaded = {"off": [], "on": []}
        for name in ("off", "on") * rounds:
            count, latencies = asyncio.run(concurrent(urls[name], bodies, seconds))
            loaded[name].append((count / seconds, latencies))
    return {"sequential_ms": sequential_ms, "loaded": loaded}


def measure_capture_cost(root, repeats: int = 5000) -> dict:
    """What capture adds inside MLServer for one single-row request: encoding and one write."""
    features = load_training_data(BUNDLED_SAMPLE).features.to_numpy()[:1]
    outputs = {"prediction": np.array([0]), "probability": np.array([0.05])}
    writer = SpoolWriter(SpoolSettings(directory=root / "spool-cost"))
    encode_us, append_us = [], []
    for i in range(repeats):
        started = time.perf_counter()
        line = encode(
            f"cost-{i}", time.time_ns(), SPOOL_IDENTITY, list(FEATURES), features, outputs, 1.0, "bench"
        )
        encoded = time.perf_counter()
        writer.append(line, 1)
        encode_us.append((encoded - started) * 1e6)
        append_us.append((time.perf_counter() - encoded) * 1e6)
    writer.close()
    return {"encode_us": statistics.median(encode_us), "append_us": statistics.median(append_us)}


def measure_shipping(tracking_uri, root, records: int) -> dict:
    spool = root / "spool-shipping"
    writer = SpoolWriter(SpoolSettings(directory=spool))
    values = load_training_data(BUNDLED_SAMPLE).features.to_numpy()
    outputs = {"prediction": np.array([0]), "probability": np.array([0.05])}
    for i in range(records):  # single-row requests: the most lines per record, the worst case
        row = values[[i % len(values)]]
        line = encode(
            f"bench-{i}", time.time_ns(), SPOOL_IDENTITY, list(FEATURES), row, outputs, 1.0, "bench"
        )
        writer.append(line, 1)
    writer.close()
    service = sidecar(tracking_uri, "sidecar-shipping", spool)
    started = time.perf_counter()
    with running(service, root, timeout=60):
        while shipped_records(service) < records:
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
    return {"records": records, "seconds": elapsed, "records_per_s": records / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="sequential single-row requests per side")
    parser.add_argument("--seconds", type=float, default=15, help="duration of the 16-client load per round")
    parser.add_argument("--rounds", type=int, default=3, help="16-client rounds per side, alternated")
    parser.add_argument("--ship-records", type=int, default=100_000)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="credit-risk-bench-"))
    with mlflow_tracking_server(root) as tracking_uri:
        trained = credit_risk("train", "--data", str(BUNDLED_SAMPLE), tracking_uri=tracking_uri)
        if trained.returncode != 0:
            sys.exit(f"training failed:\n{trained.stdout}{trained.stderr}")
        bodies = single_row_bodies(args.requests)
        serving_figures = measure_serving(tracking_uri, root, bodies, args.seconds, args.rounds)
        shipping = measure_shipping(tracking_uri, root, args.ship_records)
        cost = measure_capture_cost(root)

    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    print(
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; machine: {os.cpu_count()} cores, {cpu}, "
        f"Python {platform.python_version()}; MLServer in one process (no worker pool), OMP_NUM_THREADS=1"
    )
    sequential_ms = serving_figures["sequential_ms"]
    p50 = {name: percentile(values, 50) for name, values in sequential_ms.items()}
    print(f"single-row latency, {args.requests} sequential requests per side, sent to both in turn:")
    for name, values in sequential_ms.items():
        print(f"  capture {name:3}  p50 {p50[name]:6.2f} ms  p99 {percentile(values, 99):6.2f} ms")
    print(f"  p50 with capture on: {(p50['on'] / p50['off'] - 1) * 100:+.1f} % (budget +10 %)")
    print(f"16 concurrent clients, {args.seconds:g} s per round, rounds alternated:")
    for name, results in serving_figures["loaded"].items():
        for number, (rate, latencies) in enumerate(results, 1):
            print(
                f"  capture {name:3}  round {number}  {rate:5.0f} req/s  "
                f"p50 {percentile(latencies, 50):6.1f} ms  p99 {percentile(latencies, 99):6.1f} ms"
            )
    print(
        f"capture cost inside MLServer per single-row request (median): encode {cost['encode_us']:.1f} µs, "
        f"append to the spool {cost['append_us']:.1f} µs"
    )
    print(
        f"sidecar shipping: {shipping['records']} records in {shipping['seconds']:.1f} s = "
        f"{shipping['records_per_s']:.0f} records/s into MLflow (goal 5,000)"
    )


if __name__ == "__main__":
    main()
