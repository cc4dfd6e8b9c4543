"""Benchmark: what checking a model version's files costs, against loading it.

Starts its own MLflow server on a free port, trains on ``--data`` (the bundled sample by
default; the model's size depends on its trees, not on the rows, the held-out file does), then
downloads version 1 the way serving would check it (``model/`` from the version's storage
location, ``run/evaluation/held_out.parquet`` from its run) and times, ``--rounds`` times each:

- ``build_manifest`` (what training adds: hash every file);
- ``verify`` of the intact folder (what serving, promote and rollback add before loading);
- ``model.scoring.load`` of the same folder (what serving does anyway), for comparison.

The files are in the page cache after the download, as they are when serving checks what it
has just downloaded; a cold read from disk is not measured.

    .venv/bin/python benchmarks/integrity.py [--data PATH] [--rounds 5]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
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

from model import scoring  # noqa: E402
from model.identity import HELD_OUT_ARTIFACT, REGISTERED_MODEL_NAME  # noqa: E402
from model.integrity import MODEL_DIR, RUN_DIR, build_manifest, verify  # noqa: E402
from tests.helpers import SAMPLE, credit_risk, mlflow_tracking_server  # noqa: E402


def download(uri: str, version: str, destination: Path) -> Path:
    client = MlflowClient(uri)
    staging = destination / ".download"
    staging.mkdir(parents=True)
    source = client.get_model_version_download_uri(REGISTERED_MODEL_NAME, version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging), tracking_uri=uri)
    Path(local).rename(destination / MODEL_DIR)
    staging.rmdir()
    mlflow.artifacts.download_artifacts(
        run_id=client.get_model_version(REGISTERED_MODEL_NAME, version).run_id,
        artifact_path=HELD_OUT_ARTIFACT,
        dst_path=str(destination / RUN_DIR / Path(HELD_OUT_ARTIFACT).parent),
        tracking_uri=uri,
    )
    return destination


def timed(function, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {platform.processor() or platform.machine()}"
    )
    with tempfile.TemporaryDirectory() as directory, mlflow_tracking_server(Path(directory)) as uri:
        trained = credit_risk("train", "--data", str(args.data), tracking_uri=uri)
        if trained.returncode != 0:
            raise SystemExit(trained.stdout + trained.stderr)
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
