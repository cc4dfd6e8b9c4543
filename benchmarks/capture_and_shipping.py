"""Benchmark: what inference capture costs, and how fast the sidecar ships.

Starts its own MLflow server, trains on the bundled sample, then measures with real
processes on free ports:

1. single-row latency (p50/p99, sequential requests) and throughput at 16 concurrent clients,
   with capture off and on (on = spool writes plus the sidecar running beside MLServer),
   alternating off/on rounds so that drift on the machine does not favour one side;
2. the sidecar's sustained shipping rate into MLflow from a pre-filled spool.

    .venv/bin/python benchmarks/capture_and_shipping.py [--requests 2000] [--seconds 15]

Prints figures; asserts nothing. The README quotes its output with date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
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
from serving.capture import SpoolSettings, SpoolWriter, encode  # noqa: E402
from serving.settings import MODEL_NAME  # noqa: E402
from stack import processes, services  # noqa: E402
from training.data import BUNDLED_SAMPLE, load_training_data  # noqa: E402

BIN = Path(sys.executable).parent
CONCURRENCY = 16


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


def sequential(url: str, bodies: list[dict]) -> list[float]:
    latencies = []
    with httpx.Client(timeout=30) as client:
        for body in bodies:
            started = time.perf_counter()
            client.post(url, json=body).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


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


def start(service, root, timeout=180):
    process = processes.start(service, root)
    processes.wait_healthy(service, process, root, timeout)
    return process


def stop(process):
    processes.terminate(process.pid)
    process.wait(timeout=30)


def serving(tracking_uri, spool: Path | None):
    http = processes.free_port()
    env = {} if spool is None else {"CREDIT_RISK_SPOOL_DIR": str(spool)}
    service = services.serving(
        tracking_uri,
        http,
        grpc_port=processes.free_port(),
        metrics_port=processes.free_port(),
        name=f"serving-{http}",
        **env,
    )
    return service, f"http://{services.LOOPBACK}:{http}/v2/models/{MODEL_NAME}/infer"


def sidecar(tracking_uri, spool: Path):
    port = processes.free_port()
    return services.sidecar(tracking_uri, spool, port, name=f"sidecar-{port}"), port


def measure_serving(tracking_uri, root, capture: bool, bodies, seconds) -> dict:
    spool = root / f"spool-{time.time_ns()}" if capture else None
    service, url = serving(tracking_uri, spool)
    server = start(service, root)
    helper = None
    if capture:
        sidecar_service, _ = sidecar(tracking_uri, spool)
        helper = start(sidecar_service, root, timeout=60)
    try:
        sequential(url, bodies[:200])  # warm-up
        latencies = sequential(url, bodies)
        count, loaded = asyncio.run(concurrent(url, bodies, seconds))
    finally:
        if helper:
            stop(helper)
        stop(server)
    return {
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "rps_16": count / seconds,
        "p50_16_ms": percentile(loaded, 50),
        "p99_16_ms": percentile(loaded, 99),
    }


def measure_shipping(tracking_uri, root, records: int) -> dict:
    spool = root / "spool-shipping"
    writer = SpoolWriter(SpoolSettings(directory=spool))
    features = load_training_data(BUNDLED_SAMPLE).features.reset_index(drop=True)
    identity = {
        "model_name": MODEL_NAME,
        "registered_model": "credit-risk-model",
        "model_version": "1",
        "dataset_hash": "benchmark",
    }
    values = features.to_numpy()
    outputs = {"prediction": np.array([0]), "probability": np.array([0.05])}
    for i in range(records):  # single-row requests: the most lines per record, the worst case
        row = values[[i % len(values)]]
        writer.append(encode(f"bench-{i}", time.time_ns(), identity, list(FEATURES), row, outputs, 1.0), 1)
    writer.close()
    service, port = sidecar(tracking_uri, spool)
    started = time.perf_counter()
    process = start(service, root, timeout=60)
    try:
        while True:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
            if health["shipped_records_total"] >= records:
                break
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
    finally:
        stop(process)
    return {"records": records, "seconds": elapsed, "records_per_s": records / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="sequential single-row requests per round")
    parser.add_argument("--seconds", type=float, default=15, help="duration of the 16-client load per round")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs, alternated")
    parser.add_argument("--ship-records", type=int, default=100_000)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="credit-risk-bench-"))
    mlflow_port = processes.free_port()
    tracking_uri = services.tracking_uri(mlflow_port)
    mlflow = start(services.mlflow(root / "mlflow", port=mlflow_port), root, timeout=120)
    try:
        subprocess.run(
            [str(BIN / "credit-risk"), "train", "--data", str(BUNDLED_SAMPLE)],
            check=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
            capture_output=True,
        )
        bodies = single_row_bodies(args.requests)
        rounds = {"off": [], "on": []}
        for capture in ("off", "on") * args.rounds:
            rounds[capture].append(measure_serving(tracking_uri, root, capture == "on", bodies, args.seconds))
        shipping = measure_shipping(tracking_uri, root, args.ship_records)
    finally:
        stop(mlflow)

    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    print(
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; machine: {os.cpu_count()} cores, {cpu}, "
        f"Python {platform.python_version()}; MLServer with 1 worker process, OMP_NUM_THREADS=1"
    )
    print(
        f"{'capture':8} {'round':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s@16':>9} {'p50@16':>8} {'p99@16':>8}"
    )
    for capture, results in rounds.items():
        for number, r in enumerate(results, 1):
            print(
                f"{capture:8} {number:>5} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['rps_16']:9.0f} "
                f"{r['p50_16_ms']:8.2f} {r['p99_16_ms']:8.2f}"
            )
    p50_off = statistics.median(r["p50_ms"] for r in rounds["off"])
    p50_on = statistics.median(r["p50_ms"] for r in rounds["on"])
    print(
        f"single-row p50: off {p50_off:.2f} ms, on {p50_on:.2f} ms ({(p50_on / p50_off - 1) * 100:+.1f} %; budget +10 %)"
    )
    print(
        f"sidecar shipping: {shipping['records']} records in {shipping['seconds']:.1f} s = "
        f"{shipping['records_per_s']:.0f} records/s into MLflow (goal 5,000)"
    )


if __name__ == "__main__":
    main()
