"""The healing loop once, on the real data: AUC before and after a shift in units, the
challenger's AUC on the recent rows, and the time from the start of ``heal`` to the
challenger being served.

    .venv/bin/python benchmarks/healing_real_data.py [--data FILE] [--rows-per-request 100] [--keep]

1. The file (default ``../shared/data/cs-training-dev.csv``, 120,000 rows) is cut in two by a
   hash of each row's content (another hash than the content split's): Production v1 is
   trained on one half (``credit-risk train``), the other half is production traffic.
2. A real MLflow, ``credit-risk serve`` capturing every answer and the sidecar shipping the
   records, all on free ports in a folder of their own.
3. The traffic is sent with two features in other units, as an upstream change would send
   them (``MonthlyIncome`` a year's income, x12; ``RevolvingUtilizationOfUnsecuredLines`` in
   percent, x100); its true labels are stored as outcomes (``monitoring.outcomes``).
4. ``credit-risk heal --once --mode auto --json`` with the default policy (``heal.toml``),
   while a thread polls the server's readiness for the version it serves.

Prints: Production's AUC on the traffic before the shift (the same rows in the original
units, scored by v1 loaded as serving loads it) and after (the answers the server gave),
both with ``sklearn.metrics.roc_auc_score``; the trigger; the challenger's and Production's
AUC on the recent rows and on the original held-out rows; the time from the start of the heal
command to the server answering with the challenger, with its parts; the load average. The
machine is shared: the load average says how loaded it was. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from model import scoring
from model.identity import REGISTERED_MODEL_NAME, utc_timestamp
from model.schema import COUNTS, FEATURES, TARGET
from monitoring.outcomes import add_outcomes
from serving.settings import MODEL_NAME
from stack import processes, services
from tests.helpers import REAL_DATA, credit_risk, free_port, serving_service
from training.data import load_training_data

UNITS = {"MonthlyIncome": 12.0, "RevolvingUtilizationOfUnsecuredLines": 100.0}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min, {os.cpu_count()} cores)"


def body(frame: pd.DataFrame, request_id: str) -> dict:
    inputs = []
    for name in FEATURES:
        values = frame[name].to_numpy(dtype=np.float64)
        whole = name in COUNTS
        data = [None if np.isnan(v) else (int(v) if whole else float(v)) for v in values]
        datatype = "INT64" if whole else "FP64"
        inputs.append({"name": name, "shape": [len(frame)], "datatype": datatype, "data": data})
    return {"id": request_id, "inputs": inputs}


class Stack:
    def __init__(self, root: Path):
        self.root = root
        self.started: list = []
        port = free_port()
        self.tracking_uri = services.tracking_uri(port)
        self.start(services.mlflow(root / "mlflow", port=port), 300)

    def start(self, service, timeout: float):
        process = processes.start(service, self.root)
        self.started.append(process)
        processes.wait_healthy(service, process, self.root, timeout)

    def serve(self):
        spool = self.root / "spool"
        service, ports = serving_service(
            self.tracking_uri,
            name="serving",
            CREDIT_RISK_SPOOL_DIR=str(spool),
            CREDIT_RISK_REGISTRY_POLL_S="1",
        )
        self.url = f"http://127.0.0.1:{ports['http']}"
        self.start(service, 300)
        sidecar = services.sidecar(self.tracking_uri, spool, free_port(), CREDIT_RISK_FLUSH_INTERVAL_S="2")
        self.sidecar_health = sidecar.health_url
        self.start(sidecar, 120)

    def served_version(self) -> str | None:
        try:
            answer = httpx.get(f"{self.url}/v2/health/ready", timeout=5)
        except httpx.HTTPError:
            return None
        return answer.json().get("version") if answer.status_code == 200 else None

    def stop(self):
        for process in reversed(self.started):
            processes.terminate(process.pid)


def send(stack: Stack, traffic: pd.DataFrame, rows_per_request: int) -> pd.DataFrame:
    """The traffic in the new units; one row per answered row: key, label, probability."""
    shifted = traffic[list(FEATURES)].copy()
    for name, factor in UNITS.items():
        shifted[name] = shifted[name] * factor
    answered = []
    with httpx.Client(base_url=stack.url, timeout=120) as client:
        for start in range(0, len(traffic), rows_per_request):
            part = shifted.iloc[start : start + rows_per_request]
            request_id = f"bench-{uuid.uuid4().hex}"
            response = client.post(f"/v2/models/{MODEL_NAME}/infer", json=body(part, request_id))
            response.raise_for_status()
            probability = next(o["data"] for o in response.json()["outputs"] if o["name"] == "probability")
            answered.append(
                pd.DataFrame(
                    {
                        "request_id": request_id,
                        "row": np.arange(len(part)),
                        "outcome": traffic[TARGET].iloc[start : start + rows_per_request].to_numpy(),
                        "probability": probability,
                    }
                )
            )
    return pd.concat(answered, ignore_index=True)


def wait_shipped(stack: Stack, rows: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(stack.sidecar_health, timeout=10).json()["shipped_records_total"] >= rows:
            return
        time.sleep(1)
    raise TimeoutError(f"the sidecar had not shipped {rows} records after {timeout:.0f} s")


class Watch(threading.Thread):
    """Polls the server's readiness: when it first answers with a version other than ``old``."""

    def __init__(self, stack: Stack, old: str):
        super().__init__(daemon=True)
        self.stack, self.old = stack, old
        self.switched_at: float | None = None
        self.version: str | None = None
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            version = self.stack.served_version()
            if version not in (None, self.old):
                self.switched_at, self.version = time.monotonic(), version
                return
            self.stopping.wait(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA)
    parser.add_argument("--rows-per-request", type=int, default=100)
    parser.add_argument("--keep", action="store_true", help="leave the stack running and its folder in place")
    arguments = parser.parse_args()
    if not arguments.data.is_file():
        # The real data is not distributed with the project: say so, and fail (a benchmark that
        # did not run must not look like one that did).
        print(f"error: the real data is not at {arguments.data}: pass --data FILE", file=sys.stderr)
        sys.exit(1)
    root = Path(tempfile.mkdtemp(prefix="healing-bench-"))
    print(
        f"{utc_timestamp()} on {platform.node()} ({platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}); load average at the start: {load()}; folder {root}",
        flush=True,
    )

    data = load_training_data(arguments.data)
    rows = data.features.assign(**{TARGET: data.target}).reset_index(drop=True)
    half = pd.util.hash_pandas_object(rows, index=False).to_numpy() % 2 == 0
    original, traffic = rows[half], rows[~half].reset_index(drop=True)
    original_path = root / "original.csv"
    out = original[[TARGET, *FEATURES]].reset_index(drop=True)
    out.index = out.index + 1
    out.to_csv(original_path, na_rep="NA", index_label="")
    print(
        f"{arguments.data.name}: {len(rows)} rows; Production trains on {len(original)}, traffic {len(traffic)}"
    )

    stack = Stack(root)
    try:
        started = time.monotonic()
        trained = credit_risk(
            "train", "--data", str(original_path), tracking_uri=stack.tracking_uri, timeout=3600
        )
        assert trained.returncode == 0, trained.stdout + trained.stderr
        print(f"Production v1 trained in {time.monotonic() - started:.0f} s", flush=True)
        client = MlflowClient(stack.tracking_uri)
        v1 = client.get_model_version(REGISTERED_MODEL_NAME, "1")
        stack.serve()
        while stack.served_version() != "1":
            time.sleep(0.5)

        mlflow.set_tracking_uri(stack.tracking_uri)
        served_v1 = scoring.load(f"models:/{REGISTERED_MODEL_NAME}/1")
        before = roc_auc_score(traffic[TARGET], served_v1.score_frame(traffic[list(FEATURES)])[1])
        started = time.monotonic()
        answered = send(stack, traffic, arguments.rows_per_request)
        print(f"sent {len(answered)} shifted rows in {time.monotonic() - started:.0f} s", flush=True)
        after = roc_auc_score(answered["outcome"], answered["probability"])
        outcomes = root / "outcomes.csv"
        answered[["request_id", "row", "outcome"]].to_csv(outcomes, index=False)
        add_outcomes(outcomes, client=client)
        wait_shipped(stack, len(answered))
        print(
            f"Production v1: test ROC AUC {float(v1.tags['test_roc_auc']):.4f} (its held-out rows); on the "
            f"traffic {before:.4f} before the shift, {after:.4f} after it (as served)",
            flush=True,
        )

        print(f"load average before heal: {load()}", flush=True)
        watch = Watch(stack, "1")
        watch.start()
        heal_started = time.monotonic()
        healed = credit_risk(
            "heal", "--once", "--mode", "auto", "--json", "--data", str(original_path),
            tracking_uri=stack.tracking_uri, timeout=7200, CREDIT_RISK_HEAL_LOCK_DIR=str(root),
        )  # fmt: skip
        heal_ended = time.monotonic()
        result = json.loads(healed.stdout)
        watch.join(timeout=300)
        watch.stopping.set()
        print(f"load average after heal: {load()}", flush=True)
        report(client, result, healed, heal_started, heal_ended, watch)
    finally:
        if not arguments.keep:
            stack.stop()
            shutil.rmtree(root, ignore_errors=True)


def report(client, result, healed, heal_started, heal_ended, watch) -> None:
    print(f"heal: exit {healed.returncode}, state {result['state']}, promoted {result['promoted']}")
    for reason in result["reasons"]:
        print(f"  - {reason}")
    gate = result["gate"]
    if gate.get("decision"):
        print(
            f"recent rows ({gate['rows_recent']}): challenger v{result['candidate_version']} ROC AUC "
            f"{gate['candidate_roc_auc_recent']:.4f}, Production v1 {gate['production_roc_auc_recent']:.4f}; "
            f"original held-out rows ({gate['rows_original']}): {gate['candidate_roc_auc_original']:.4f} vs "
            f"{gate['production_roc_auc_original']:.4f}"
        )
    if gate.get("rows_recent"):
        # The same figures recomputed here, with sklearn, from the rows the gate recorded.
        with tempfile.TemporaryDirectory() as directory:
            recent = pd.read_parquet(
                client.download_artifacts(result["candidate_run_id"], "gate/recent_rows.parquet", directory)
            )
        print(
            f"  recomputed with sklearn from gate/recent_rows.parquet: challenger "
            f"{roc_auc_score(recent[TARGET], recent['candidate_probability']):.4f}, Production "
            f"{roc_auc_score(recent[TARGET], recent['production_probability']):.4f}"
        )
    if result["candidate_run_id"]:
        run = client.get_run(result["candidate_run_id"]).info
        training_s = (run.end_time - run.start_time) / 1000
        print(f"challenger's training run: {training_s:.0f} s (fit, CV, evaluation, model logged)")
    print(f"heal command: {heal_ended - heal_started:.0f} s from start to exit")
    if watch.switched_at is not None:
        print(
            f"heal start -> the server ready with v{watch.version}: {watch.switched_at - heal_started:.0f} s "
            f"({watch.switched_at - heal_ended:+.1f} s after the command exited)"
        )
    else:
        print("the server did not switch")
    if healed.returncode:
        print(healed.stderr[-3000:])


if __name__ == "__main__":
    main()
