"""Benchmark: what each component needs in CPU and memory, for the Kubernetes requests and
limits in deploy/kubernetes/.

Starts its own MLflow server (two workers, as everywhere), trains on ``--data`` (the bundled
sample by default; the trainer's peak memory grows with the file), then runs one serving
replica (``credit-risk serve`` with capture on) and its sidecar under single-row load from
16 concurrent clients for ``--seconds``, and prints for each process tree:
resident memory (now and peak) and the CPU it used, in cores, over the load.

    .venv/bin/python benchmarks/footprint.py [--seconds 20] [--data FILE]

Prints figures; asserts nothing. The manifests' comments quote its output with date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.capture_and_shipping import CONCURRENCY, concurrent, serving, sidecar, single_row_bodies  # noqa: E402
from tests.helpers import SAMPLE, credit_risk, mlflow_tracking_server, running  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (MLflow's workers, uvicorn's children)."""
    tree, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            children = (task / "children").read_text().split()
            tree += map(int, children)
            frontier += map(int, children)
    return tree


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_mib(pid: int) -> tuple[float, float]:
    """Resident memory of the tree now, and the sum of each process's peak (VmHWM)."""
    pids = process_tree(pid)
    return (
        sum(_status_kib(p, "VmRSS") for p in pids) / 1024,
        sum(_status_kib(p, "VmHWM") for p in pids) / 1024,
    )


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def report(name: str, pid: int, cpu_before: float, seconds: float) -> None:
    now, peak = memory_mib(pid)
    cores = (cpu_seconds(pid) - cpu_before) / seconds
    print(f"{name:<9} RSS {now:7.0f} MiB  peak {peak:7.0f} MiB  CPU under load {cores:5.2f} cores")


def run(args) -> None:
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, training data {args.data.name}"
    )
    with tempfile.TemporaryDirectory() as tmp, mlflow_tracking_server(Path(tmp)) as tracking_uri:
        root = Path(tmp)
        started = time.perf_counter()
        trained = credit_risk("train", "--data", str(args.data), tracking_uri=tracking_uri)
        if trained.returncode != 0:
            raise SystemExit(f"training failed:\n{trained.stderr[-2000:]}")
        # The trainer is the only child waited for so far: its peak is the children's peak.
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"trainer   peak RSS {peak_mib:7.0f} MiB  wall {time.perf_counter() - started:5.1f} s")

        spool = root / "spool"
        serving_service, url = serving(tracking_uri, "serving", spool)
        sidecar_service = sidecar(tracking_uri, "sidecar", spool)
        with running(serving_service, root) as server, running(sidecar_service, root, timeout=60) as ship:
            for name, pid in (("serving", server.pid), ("sidecar", ship.pid)):
                now, _ = memory_mib(pid)
                print(f"{name:<9} RSS {now:7.0f} MiB  idle, model loaded")
            bodies = single_row_bodies(2000)
            asyncio.run(concurrent(url, bodies, 2))  # warm-up
            # mlflow_tracking_server records its pid under the state folder it was given.
            mlflow_pid = int((root / "pids" / "mlflow.pid").read_text())
            pids = {"serving": server.pid, "sidecar": ship.pid, "mlflow": mlflow_pid}
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            count, _ = asyncio.run(concurrent(url, bodies, args.seconds))
            print(f"load      {count / args.seconds:7.0f} single-row req/s from {CONCURRENCY} clients")
            for name, pid in pids.items():
                report(name, pid, before[name], args.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--data", type=Path, default=SAMPLE, help="training file (default: the bundled sample)"
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
