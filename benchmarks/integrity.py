"""Benchmark: what checking a model version costs, against loading it as serving did before.

Starts its own MLflow server on a free port, trains on ``--data`` (the bundled sample by
default; the model's size depends on its trees, not on the rows; the held-out file, and so the
answers check, grows with the rows), then:

1. times the whole load, ``--rounds`` times each, interleaved so that a change in the
   machine's load hits both alike:
   - **before**: ``model.scoring.load("models:/credit-risk-model/1")`` (download and load);
   - **now**: ``model.verified.load_version`` (registry lookups, record and files downloaded,
     ``verify``, ``scoring.load`` of the verified folder, the answers check on every logged
     held-out row in 256-row slices and in one batch), with its steps;
2. downloads version 1 the way the check lays it out and times, ``--rounds`` times each,
   ``build_manifest`` (what training adds), ``verify`` of the intact folder and
   ``model.scoring.load`` of the same folder, as before;
3. reports what training's own recording step took (from its output).

The files are in the page cache after a download, as they are when serving checks what it has
just downloaded; a cold read from disk is not measured. The load average is printed before and
after: on a busy machine every figure grows, the ratio less.

    .venv/bin/python benchmarks/integrity.py [--data PATH] [--rounds 5]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from model import scoring, verified  # noqa: E402
from model.identity import REGISTERED_MODEL_NAME, version_uri  # noqa: E402
from model.integrity import MODEL_DIR, build_manifest, verify  # noqa: E402
from tests.helpers import SAMPLE, credit_risk, mlflow_tracking_server  # noqa: E402


def download(uri: str, version: str, destination: Path) -> Path:
    """Version ``version``'s files and held-out rows, laid out as the check lays them out."""
    client = MlflowClient(uri)
    source = client.get_model_version_download_uri(REGISTERED_MODEL_NAME, version)
    run_id = client.get_model_version(REGISTERED_MODEL_NAME, version).run_id
    return verified.download(client, source, run_id, destination)


def timed(function, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def whole_loads(uri: str, rounds: int) -> tuple[list[float], dict[str, list[float]], int]:
    """``rounds`` loads as before and as now, interleaved; now's steps; held-out rows checked."""
    client = MlflowClient(uri)
    before, now, rows = [], {}, 0
    for _ in range(rounds):
        started = time.perf_counter()
        scoring.load(version_uri("1"))
        before.append(time.perf_counter() - started)
        checked = verified.load_version(REGISTERED_MODEL_NAME, "1", client=client)
        checked.close()
        rows = checked.answers.rows
        for step, seconds in checked.seconds.items():
            now.setdefault(step, []).append(seconds)
    return before, now, rows


def ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:8.1f} ms median ({min(times) * 1e3:.1f} ms fastest)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as directory, mlflow_tracking_server(Path(directory)) as uri:
        trained = credit_risk("train", "--data", str(args.data), tracking_uri=uri)
        if trained.returncode != 0:
            raise SystemExit(trained.stdout + trained.stderr)
        stages = dict(
            re.findall(r"→ (Recording|Gate).*? \.\.\.\n(?:.*\n)*?  done in ([\d.]+) s", trained.stdout)
        )
        print(
            f"training: recording the digests took {stages.get('Recording', '?')} s, the gate "
            f"{stages.get('Gate', '?')} s (both loads checked there)"
        )
        mlflow.set_tracking_uri(uri)  # models:/ is resolved in MLflow's current registry
        before, now, rows = whole_loads(uri, args.rounds)
        print(f"whole load, {args.rounds} rounds interleaved ({rows} held-out rows checked):")
        print(f"  before: scoring.load(models:/)   {ms(before)}")
        for step, times in now.items():
            print(f"  now:    {step:24} {ms(times)}")
        added = statistics.median(now["total"]) - statistics.median(before)
        print(
            f"  added by the checks: {added * 1e3:.0f} ms ({added / statistics.median(before):+.0%} of before)"
        )
        started = time.perf_counter()
        folder = download(uri, "1", Path(directory) / "v1")
        download_s = time.perf_counter() - started
        manifest = build_manifest(folder)
        print(f"data {args.data.name}: {len(manifest.files)} files, {manifest.total_bytes / 1e6:.2f} MB")
        for path, entry in sorted(manifest.files.items(), key=lambda item: -item[1].size)[:4]:
            print(f"  {entry.size / 1e6:8.3f} MB  {path}")
        print(f"download (as serving would)   {download_s * 1e3:8.1f} ms")
        results = {
            "build_manifest (training)": timed(lambda: build_manifest(folder), args.rounds),
            "verify (serving, promote)": timed(lambda: verify(folder, manifest), args.rounds),
            "scoring.load (serving)": timed(lambda: scoring.load(str(folder / MODEL_DIR)), args.rounds),
        }
        for what, times in results.items():
            print(
                f"{what:29} {statistics.median(times) * 1e3:8.1f} ms median ({min(times) * 1e3:.1f} ms fastest)"
            )
        rate = manifest.total_bytes / statistics.median(results["verify (serving, promote)"]) / 1e6
        share = statistics.median(results["verify (serving, promote)"]) / statistics.median(
            results["scoring.load (serving)"]
        )
        print(
            f"verify reads {rate:.0f} MB/s; it adds {share:.2%} to a load; load average {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
