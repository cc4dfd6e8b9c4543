"""The pipeline heals itself: real MLflow, a real ``credit-risk serve`` capturing every answer,
a real sidecar shipping the records, outcomes stored by ``monitoring.outcomes``, and
``credit-risk heal --once`` as users run it.

One stack for the module, trained once, used by the tests in order (CI time is tight):

1. Production v1 is trained on half of the bundled sample (rows picked by a hash of their
   content, so the other half is rows v1 never saw). The other half is production traffic:
   first ``CALM_ROWS`` rows as they are, then the rest with two features in other units, as an
   upstream change would send them (``MonthlyIncome`` a year's income, x12;
   ``RevolvingUtilizationOfUnsecuredLines`` in percent, x100). Each row's true label becomes
   its outcome once its traffic is sent.
2. Without a trigger (calm traffic only), nothing is trained.
3. After the shift, ``heal --once --mode auto`` under load: the drift alert names the two
   changed features, the outcome AUC dropped, a challenger trained on the labelled production
   rows wins on the recent rows and is promoted, and serving switches with no failed request.
4. ``credit-risk rollback`` undoes that automatic promotion.
5. In manual mode a passing challenger waits; ``status`` shows it; ``promote`` takes it.
6. Two attempts at once (on "two machines": separate local locks): exactly one trains; its
   challenger brings nothing new (the same rows as Production's) and loses; a third attempt is
   held by the cooldown, and one on the same machine as a running attempt by the local lock.
7. A retrain that fails leaves Production as it was and says why.

The oracles are the test's own ledger of what it sent, what the server answered and each
row's true label, with AUCs from ``sklearn.metrics.roc_auc_score``: never the code under test.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from healing.policy import load_policy
from healing.settings import HealSettings
from model.identity import DATASET_HASH, REGISTERED_MODEL_NAME
from model.schema import FEATURES, TARGET
from monitoring.outcomes import add_outcomes
from serving.settings import MODEL_NAME
from stack import processes, services
from tests.helpers import BIN, Background, credit_risk, free_port, serving_service, wait_for_log_line
from tests.integration.test_serving import v2_body
from tests.integrity_helpers import overwrite_stored_file, read_stored_file, tripwire_of_size
from training import registry
from training.data import load_training_data
from training.promotion_history import Promotion
from training.settings import DEFAULT_EXPERIMENT, TrainingSettings

pytestmark = pytest.mark.integration

UNITS = {"MonthlyIncome": 12.0, "RevolvingUtilizationOfUnsecuredLines": 100.0}
CALM_ROWS = 600
ROWS_PER_REQUEST = 10
SWITCH_WITHIN_S = 60

# The test's policy: the defaults, with windows and minimums sized for 2,500 rows of traffic
# and no cooldown (the tests follow each other within minutes); each test adds its own keys.
PIPELINE_FILE = "artifacts/pipeline.joblib"  # of a version's stored model
BASE_POLICY = {
    "trigger.drift": {"window_hours": 6.0},
    "trigger.outcomes": {"window_days": 1.0, "auc_margin": 0.03, "min_labelled_rows": 500},
    "attempts": {"cooldown_hours": 0.0},
    "data": {"lookback_days": 1.0, "min_production_rows": 300},
    "gate": {"recent_share": 0.3, "min_recent_rows": 200, "min_recent_class_rows": 15, "tolerance": 0.02},
}


def write_policy(path: Path, **changes: dict) -> Path:
    sections = {name: dict(keys) for name, keys in BASE_POLICY.items()}
    for name, keys in changes.items():
        sections.setdefault(name.replace("__", "."), {}).update(keys)
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def shift(frame: pd.DataFrame) -> pd.DataFrame:
    """The features as the upstream change sends them: ``UNITS`` applied."""
    features = frame[list(FEATURES)].copy()
    for name, factor in UNITS.items():
        features[name] = features[name] * factor
    return features


def kaggle_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Rows (``TARGET`` and ``FEATURES``) in the published layout, written here with pandas."""
    out = frame[[TARGET, *FEATURES]].reset_index(drop=True)
    out.index = out.index + 1
    out.to_csv(path, na_rep="NA", index_label="")
    return path


class VersionedLoad(Background):
    """Client threads sending one-row requests (rows of the shifted traffic, so that the records
    they leave look like the rest of it) until stopped, a few per second each. Every request's
    outcome is kept as (time, status, version): a transport error (refused, reset, timed out)
    has status None and counts as a failed request, like any answer other than 200."""

    join_timeout_s = 90.0

    def __init__(self, url: str, rows: pd.DataFrame, clients: int = 2):
        super().__init__(clients)
        self.url, self.rows = url, rows
        self.answers: list[tuple[float, int | None, str | None]] = []

    def _run(self):
        random = np.random.default_rng()
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stopping.is_set():
                row = self.rows.iloc[[int(random.integers(len(self.rows)))]].reset_index(drop=True)
                try:
                    response = client.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(row))
                except httpx.RequestError:
                    self.answers.append((time.monotonic(), None, None))
                    self.stopping.wait(0.1)
                    continue
                version = response.json().get("model_version") if response.status_code == 200 else None
                self.answers.append((time.monotonic(), response.status_code, version))
                self.stopping.wait(0.1)


@dataclass(frozen=True)
class Sent:
    """One answered row, as the test sent and saw it."""

    request_id: str
    row_index: int
    label: int
    probability: float
    version: str
    features: tuple


class HealStack:
    """MLflow, MLServer with capture, the sidecar; the traffic sent and its answers."""

    def __init__(self, root: Path, sample_path: Path):
        self.root = root
        data = load_training_data(sample_path)
        rows = data.features.assign(**{TARGET: data.target}).reset_index(drop=True)
        # Half the sample by a hash of the row (another hash than the content split's).
        digest = pd.util.hash_pandas_object(rows, index=False).to_numpy()
        original = digest % 2 == 0
        self.original_path = kaggle_csv(rows[original], root / "original.csv")
        self.traffic = rows[~original].reset_index(drop=True)
        self.sent: list[Sent] = []
        self.processes: dict[str, tuple] = {}
        self.spool = root / "spool"
        port = free_port()
        self.tracking_uri = services.tracking_uri(port)
        self._start("mlflow", services.mlflow(root / "mlflow", port=port), 120)
        self.client = MlflowClient(self.tracking_uri)

    def _start(self, name: str, service, timeout: float):
        process = processes.start(service, self.root)
        self.processes[name] = (service, process)
        processes.wait_healthy(service, process, self.root, timeout)

    def start_serving(self):
        service, ports = serving_service(
            self.tracking_uri,
            name="serving-heal",
            CREDIT_RISK_SPOOL_DIR=str(self.spool),
            CREDIT_RISK_REGISTRY_POLL_S="0.5",
        )
        self.url = f"http://127.0.0.1:{ports['http']}"
        self._start("serving", service, 180)
        sidecar = services.sidecar(
            self.tracking_uri,
            self.spool,
            free_port(),
            CREDIT_RISK_FLUSH_RECORDS="200",
            CREDIT_RISK_FLUSH_INTERVAL_S="1",
        )
        self.sidecar_health = sidecar.health_url
        self._start("sidecar", sidecar, 60)

    def stop(self):
        for _, process in reversed(list(self.processes.values())):
            processes.terminate(process.pid)

    def served_version(self) -> str | None:
        answer = httpx.get(f"{self.url}/v2/health/ready", timeout=10)
        return answer.json().get("version") if answer.status_code == 200 else None

    def wait_serving(self, version: str, timeout: float = SWITCH_WITHIN_S) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.served_version() == version:
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(f"not serving v{version} after {timeout} s: {self.served_version()}")

    def send(self, frame: pd.DataFrame, shifted: bool) -> list[Sent]:
        """``frame``'s rows in requests of ``ROWS_PER_REQUEST``, features in the new units when
        ``shifted``; each answered row is kept with its label and the answer."""
        features = shift(frame) if shifted else frame[list(FEATURES)].copy()
        sent = []
        for start in range(0, len(frame), ROWS_PER_REQUEST):
            part = features.iloc[start : start + ROWS_PER_REQUEST].reset_index(drop=True)
            request_id = f"heal-{uuid.uuid4().hex}"
            response = httpx.post(
                f"{self.url}/v2/models/{MODEL_NAME}/infer", json=v2_body(part, id=request_id), timeout=60
            )
            assert response.status_code == 200, response.text
            answer = response.json()
            probability = next(o["data"] for o in answer["outputs"] if o["name"] == "probability")
            labels = frame[TARGET].iloc[start : start + ROWS_PER_REQUEST].to_numpy()
            for row, values in enumerate(part.itertuples(index=False)):
                sent.append(
                    Sent(
                        request_id,
                        row,
                        int(labels[row]),
                        float(probability[row]),
                        answer["model_version"],
                        values,
                    )
                )
        self.sent += sent
        return sent

    def wait_shipped(self, timeout: float = 180):
        deadline = time.monotonic() + timeout
        health = {}
        while time.monotonic() < deadline:
            try:
                health = httpx.get(self.sidecar_health, timeout=5).json()
                if health["shipped_records_total"] >= len(self.sent):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not all {len(self.sent)} records shipped: {health}")

    def add_outcomes(self, sent: list[Sent], name: str):
        path = self.root / name
        pd.DataFrame(
            {
                "request_id": [s.request_id for s in sent],
                "row": [s.row_index for s in sent],
                "outcome": [s.label for s in sent],
            }
        ).to_csv(path, index=False)
        return add_outcomes(path, client=self.client)

    def heal(
        self, policy: Path, *args: str, timeout: float = 900, **env
    ) -> tuple[subprocess.CompletedProcess, dict]:
        done = credit_risk(
            "heal", "--once", "--json", "--data", str(self.original_path), "--policy", str(policy), *args,
            tracking_uri=self.tracking_uri, timeout=timeout, CREDIT_RISK_HEAL_LOCK_DIR=str(self.root), **env,
        )  # fmt: skip
        try:
            return done, json.loads(done.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"no JSON on stdout (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
            ) from None

    def versions(self) -> dict[str, object]:
        found = self.client.search_model_versions(f"name = '{REGISTERED_MODEL_NAME}'")
        return {str(v.version): v for v in found}

    def version(self, number: str):
        return self.client.get_model_version(REGISTERED_MODEL_NAME, number)

    def production(self) -> str:
        return str(registry.production_version(self.client).version)

    def attempt(self, run_id: str):
        return self.client.get_run(run_id)

    def artifact(self, run_id: str, path: str) -> Path:
        return Path(self.client.download_artifacts(run_id, path, tempfile.mkdtemp(dir=self.root)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, sample_path):
    stack = HealStack(tmp_path_factory.mktemp("healing"), sample_path)
    try:
        trained = credit_risk("train", "--data", str(stack.original_path), tracking_uri=stack.tracking_uri)
        assert trained.returncode == 0, trained.stdout + trained.stderr
        stack.start_serving()
        stack.wait_serving("1")
        calm = stack.traffic.iloc[:CALM_ROWS]
        stack.add_outcomes(stack.send(calm, shifted=False), "calm-outcomes.csv")
        stack.wait_shipped()
        yield stack
    finally:
        stack.stop()


def test_without_a_trigger_nothing_is_trained(stack, tmp_path):
    done, result = stack.heal(write_policy(tmp_path / "policy.toml"), "--mode", "auto")
    assert done.returncode == 0, done.stderr
    assert result["triggered"] is False and result["state"] == "not-triggered"
    assert result["candidate_version"] is None and result["promoted"] is False
    assert result["gate"]["decision"] is None
    assert set(stack.versions()) == {"1"} and stack.production() == "1"
    drift = result["trigger"]["drift"]
    assert drift["rows"] == CALM_ROWS and drift["alert_features"] == []
    assert max(drift["psi"].values()) < 0.25
    # The attempt is a run, and says what it looked at and why nothing was trained.
    run = stack.attempt(result["attempt_run_id"])
    assert stack.client.get_experiment(run.info.experiment_id).name == DEFAULT_EXPERIMENT
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["heal.attempt"] == "true" and tags["heal.state"] == "not-triggered"
    assert tags["heal.triggered"] == "false" and tags["heal.production_version"] == "1"
    reasons = tags["heal.reasons"]
    assert "no trigger: drift: PSI alert on 0 feature(s) over 600 rows" in reasons
    assert "no trigger: outcomes:" in reasons and "nothing trained: no trigger fired" in reasons
    assert result["reasons"] == reasons.split("\n")


def test_the_monitor_service_runs_the_policy_after_each_window(stack, tmp_path):
    """``credit-risk monitor --every --heal``: after its first window the service runs one
    attempt (``credit-risk heal --once`` in a child, without the monitor's credentials), which
    is a run of its own; nothing triggers on calm traffic, so nothing is trained."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started_ms = int(time.time() * 1000)
    service = processes.Service(
        "monitor-heal",
        [str(BIN / "credit-risk"), "monitor", "--every", "1h", "--heal"],
        f"{url}/health/live",
        {
            "MLFLOW_TRACKING_URI": stack.tracking_uri,
            "CREDIT_RISK_MONITOR_PORT": str(port),
            "CREDIT_RISK_HEAL_POLICY": str(write_policy(tmp_path / "policy.toml")),
            "CREDIT_RISK_DATA": str(stack.original_path),
            "CREDIT_RISK_HEAL_LOCK_DIR": str(stack.root),
        },
    )
    process = processes.start(service, tmp_path)
    try:
        processes.wait_healthy(service, process, tmp_path, timeout=120)
        # The hook's line once the child has exited 0 (stack.heal_hook), with its result.
        line = wait_for_log_line(service.log_path(tmp_path), "healing attempt ", timeout=600)
        assert ": not-triggered, triggered False, challenger None, promoted False" in line, line

        def attempts():
            runs = stack.client.search_runs(
                [stack.client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id],
                filter_string=f"tags.`heal.attempt` = 'true' and attributes.start_time >= {started_ms}",
            )
            return [run for run in runs if run.info.status == "FINISHED"]

        (attempt,) = attempts()
        assert attempt.info.run_id in line and attempt.data.tags["heal.state"] == "not-triggered"
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["last_window"] is not None and health["after_window_error"] is None
        assert set(stack.versions()) == {"1"} and stack.production() == "1"
    finally:
        processes.terminate(process.pid)


def _ledger(sent: list[Sent]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "request_id": [s.request_id for s in sent],
            "row_index": [s.row_index for s in sent],
            "label": [s.label for s in sent],
            "probability": [s.probability for s in sent],
            "version": [s.version for s in sent],
        }
    )


def _rows(frame: pd.DataFrame) -> np.ndarray:
    """Rows as sortable tuples (NaN as -1: every feature is >= 0), for comparing multisets."""
    values = np.ascontiguousarray(
        np.nan_to_num(frame[[TARGET, *FEATURES]].to_numpy(dtype=np.float64), nan=-1.0)
    )
    return np.sort(values.view([("", np.float64)] * values.shape[1]).ravel())


@pytest.fixture(scope="module")
def healed(stack, tmp_path_factory):
    """The shifted traffic, its outcomes, then ``heal --once --mode auto`` under load."""
    shifted = stack.send(stack.traffic.iloc[CALM_ROWS:], shifted=True)
    stack.add_outcomes(shifted, "shifted-outcomes.csv")
    stack.wait_shipped()
    policy = write_policy(tmp_path_factory.mktemp("auto") / "policy.toml", data={"production_weight": 3})
    with VersionedLoad(stack.url, shift(stack.traffic.iloc[CALM_ROWS:])) as load:
        time.sleep(1)
        started = time.monotonic()
        done, result = stack.heal(policy, "--mode", "auto")
        ended = time.monotonic()
        switched = stack.wait_serving(result["candidate_version"]) if result["promoted"] else None
        time.sleep(2)
    return {"done": done, "result": result, "load": load, "heal_s": ended - started, "switch_s": switched}


def test_after_a_shift_in_units_the_drift_alert_names_the_changed_features(healed):
    done, result = healed["done"], healed["result"]
    assert done.returncode == 0, done.stderr
    assert result["triggered"] is True and result["production_version"] == "1"
    drift = result["trigger"]["drift"]
    assert drift["fired"] is True
    assert drift["alert_features"] == sorted(UNITS)  # the changed features, and no other
    assert any(reason.startswith("TRIGGER: drift: PSI alert on 2 feature(s)") for reason in result["reasons"])


def test_the_outcome_auc_of_production_on_that_traffic_dropped(stack, healed):
    result = healed["result"]
    ledger = _ledger(stack.sent)
    assert set(ledger["version"]) == {"1"}  # the traffic before the heal: all answered by v1
    calm, shifted = ledger.iloc[:CALM_ROWS], ledger.iloc[CALM_ROWS:]
    auc_calm = roc_auc_score(calm["label"], calm["probability"])
    auc_shifted = roc_auc_score(shifted["label"], shifted["probability"])
    training_auc = float(stack.version("1").tags["test_roc_auc"])
    assert auc_shifted < auc_calm - 0.05 and auc_shifted < training_auc - 0.05, (auc_calm, auc_shifted)
    outcomes = result["trigger"]["outcomes"]
    # The monitor's AUC is over every labelled record of v1: the test's whole ledger.
    assert outcomes["rows"] == len(ledger)
    assert abs(outcomes["roc_auc"] - roc_auc_score(ledger["label"], ledger["probability"])) < 1e-12
    assert outcomes["training_roc_auc"] == training_auc and outcomes["fired"] is True


def test_a_challenger_trained_on_the_labelled_production_rows_won_on_the_recent_rows(stack, healed):
    result = healed["result"]
    ledger = _ledger(stack.sent)
    version = result["candidate_version"]
    assert version is not None and result["gate"]["decision"] == "passed"
    tags = stack.version(version).tags
    assert tags["heal.challenges"] == "1" and tags["heal.attempt_run_id"] == result["attempt_run_id"]
    assert tags["heal.original_dataset_hash"] == stack.version("1").tags[DATASET_HASH]
    run = stack.client.get_run(result["candidate_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == result["attempt_run_id"]

    # The out-of-time rows are the most recent labelled rows: the last 30 % the test sent.
    recent_count = math.ceil(0.3 * len(ledger))
    recent = pd.read_parquet(stack.artifact(result["candidate_run_id"], "gate/recent_rows.parquet"))
    expected = ledger.iloc[-recent_count:].reset_index(drop=True)
    assert recent["request_id"].tolist() == expected["request_id"].tolist()
    assert recent["row_index"].tolist() == expected["row_index"].tolist()
    assert recent[TARGET].tolist() == expected["label"].tolist()
    # Production was scored as it served them: its probabilities are the answers, bit for bit.
    assert (
        recent["production_probability"].to_numpy().tobytes() == expected["probability"].to_numpy().tobytes()
    )
    candidate_auc = roc_auc_score(recent[TARGET], recent["candidate_probability"])
    production_auc = roc_auc_score(expected["label"], expected["probability"])
    gate = result["gate"]
    assert gate["rows_recent"] == recent_count
    assert abs(gate["candidate_roc_auc_recent"] - candidate_auc) < 1e-12
    assert abs(gate["production_roc_auc_recent"] - production_auc) < 1e-12
    assert candidate_auc > production_auc
    assert gate["candidate_roc_auc_original"] >= gate["production_roc_auc_original"] - 0.02
    assert float(tags["gate.recent.candidate_roc_auc"]) == round(candidate_auc, 6)

    # It trained on the original file plus every other labelled row, three times each, with the
    # features as they arrived (shifted) and their true labels; never on a recent row.
    trained = ledger.iloc[:-recent_count]
    assert run.data.tags["heal.data.production_rows"] == str(len(trained))
    keys = pd.read_parquet(stack.artifact(result["candidate_run_id"], "heal/production_rows.parquet"))
    assert keys[keys["role"] == "train"]["request_id"].tolist() == trained["request_id"].tolist()
    (training_file,) = stack.artifact(result["attempt_run_id"], "heal/training_file").iterdir()
    assert run.data.tags[DATASET_HASH] == tags[DATASET_HASH]
    sent_rows = pd.concat(
        [
            stack.traffic.iloc[:CALM_ROWS][list(FEATURES)],
            shift(stack.traffic.iloc[CALM_ROWS:]),
        ],
        ignore_index=True,
    ).assign(**{TARGET: stack.traffic[TARGET].to_numpy()})
    original = pd.read_csv(stack.original_path, index_col=0, na_values=["NA"])
    expected_rows = pd.concat([original, *([sent_rows.iloc[: len(trained)]] * 3)], ignore_index=True)
    written = pd.read_csv(training_file, index_col=0, na_values=["NA"])
    assert len(written) == len(original) + 3 * len(trained)
    assert np.array_equal(_rows(written), _rows(expected_rows))


def test_it_was_promoted_and_serving_switched_under_load_with_zero_failed_requests(stack, healed):
    result, load = healed["result"], healed["load"]
    version = result["candidate_version"]
    assert result["promoted"] is True and result["state"] == "promoted"
    assert stack.production() == version
    tags = stack.version(version).tags
    assert tags["promotion.source"] == "heal" and tags["promotion.previous"] == "1"
    assert tags["heal.challenger"] == "promoted"
    failed = [answer for answer in load.answers if answer[1] != 200]  # transport errors included
    assert not failed, f"{len(failed)} of {len(load.answers)} requests failed: {failed[:5]}"
    versions = [answer[2] for answer in load.answers]
    assert set(versions) == {"1", version}, set(versions)  # every answer names its version
    first_new = versions.index(version)
    assert all(v == version for v in versions[first_new + 5 :])  # in-flight stragglers aside
    print(
        f"heal took {healed['heal_s']:.0f} s; serving answered v{version} {healed['switch_s']:.1f} s after it "
        f"returned; {len(load.answers)} requests under load, none failed"
    )


def test_the_run_and_version_tags_tell_the_story(stack, healed):
    result = healed["result"]
    attempt = stack.attempt(result["attempt_run_id"])
    tags = attempt.data.tags
    assert stack.client.get_experiment(attempt.info.experiment_id).name == DEFAULT_EXPERIMENT
    assert attempt.info.status == "FINISHED"
    assert tags["heal.state"] == "promoted" and tags["heal.triggered"] == "true"
    assert (
        tags["heal.production_version"] == "1"
        and tags["heal.candidate_version"] == result["candidate_version"]
    )
    assert tags["heal.trained"] == "true" and tags["heal.promoted"] == "true"
    assert tags["heal.reasons"].split("\n") == result["reasons"]
    sources = {batch["source_sha256"] for batch in result["data"]["outcome_batches"]}
    assert len(sources) == 2 and set(tags["heal.data.outcome_sources_sha256"].split(",")) == sources
    version = stack.version(result["candidate_version"]).tags
    assert version["gate.kind"] == "out-of-time" and version["gate.decision"] == "passed"
    assert version["heal.trigger"].startswith("drift: PSI alert on 2 feature(s)")
    assert "promoted v" in result["reasons"][-1] and "source heal" in result["reasons"][-1]
    saved = json.loads(stack.artifact(result["attempt_run_id"], "heal/result.json").read_text())
    assert saved == result


def test_rollback_undoes_the_automatic_promotion_like_any_other(stack, healed):
    version = healed["result"]["candidate_version"]
    done = credit_risk(
        "rollback", "--reason", "undo the automatic promotion", tracking_uri=stack.tracking_uri
    )
    assert done.returncode == 0, done.stderr
    assert stack.production() == "1"
    stack.wait_serving("1")
    undone = Promotion.from_version(stack.version(version))
    assert undone.source == "heal" and undone.rolled_back
    assert Promotion.from_version(stack.version("1")).source == "rollback"


def test_in_manual_mode_a_passed_challenger_waits_until_promote(stack, healed, tmp_path):
    policy = write_policy(tmp_path / "policy.toml", data={"production_weight": 3})  # mode: the default
    done, result = stack.heal(policy)
    assert done.returncode == 0, done.stderr
    version = result["candidate_version"]
    assert result["mode"] == "manual" and result["state"] == "waiting" and result["promoted"] is False
    assert result["gate"]["decision"] == "passed"
    assert stack.production() == "1" and stack.version(version).tags["heal.challenger"] == "waiting"
    command = f"credit-risk promote --version {version}"
    assert command in result["reasons"][-1]
    status = credit_risk("status", "--json", "--server", stack.url, tracking_uri=stack.tracking_uri)
    report = json.loads(status.stdout)
    assert [item["version"] for item in report["waiting_challengers"]] == [version]
    assert report["waiting_challengers"][0]["challenges"] == "1"
    assert command in report["waiting_challengers"][0]["command"]
    text = credit_risk("status", "--server", stack.url, tracking_uri=stack.tracking_uri).stdout
    assert "Waiting for an operator" in text and command in text
    time.sleep(3)  # nothing moves by itself
    assert stack.production() == "1" and stack.served_version() == "1"

    # The drift still triggers and the policy has no cooldown: the next challenger passes too,
    # and takes the place of the one waiting (one challenger waits at a time).
    done, newer = stack.heal(policy)
    assert done.returncode == 0, done.stderr
    assert newer["state"] == "waiting" and newer["candidate_version"] not in (None, version)
    latest = newer["candidate_version"]
    assert f"v{version}, the challenger that waited before, is superseded by v{latest}" in newer["reasons"]
    superseded = stack.version(version).tags
    assert superseded["heal.challenger"] == "superseded" and superseded["heal.superseded_by"] == latest
    report = json.loads(
        credit_risk("status", "--json", "--server", stack.url, tracking_uri=stack.tracking_uri).stdout
    )
    assert [item["version"] for item in report["waiting_challengers"]] == [latest]
    assert stack.production() == "1"

    version = latest
    promoted = credit_risk(
        "promote", "--version", version, "--reason", "reviewed", tracking_uri=stack.tracking_uri
    )
    assert promoted.returncode == 0, promoted.stderr
    stack.wait_serving(version)
    report = json.loads(
        credit_risk("status", "--json", "--server", stack.url, tracking_uri=stack.tracking_uri).stdout
    )
    assert report["waiting_challengers"] == []
    assert report["production"]["version"] == version


@pytest.fixture(scope="module")
def concurrent(stack, tmp_path_factory):
    """Two attempts started at once, each with a lock folder of its own (as on two machines,
    so that only the lease in MLflow keeps them apart). The schedule triggers them; Production
    is the challenger promoted by hand above, and no outcome came since: the challenger gets
    exactly Production's rows. No cooldown for these two (the manual attempt above trained
    minutes ago); the next attempt's policy has one (``cooldown_policy``)."""
    root = tmp_path_factory.mktemp("concurrent")
    policy = write_policy(
        root / "policy.toml", trigger__schedule={"every_days": 1e-6}, data={"production_weight": 3}
    )
    production = stack.production()
    started = []
    for name in ("a", "b"):
        (root / name).mkdir()
        started.append(
            subprocess.Popen(
                _heal_command(stack, policy),
                env={
                    **os.environ,
                    "MLFLOW_TRACKING_URI": stack.tracking_uri,
                    "CREDIT_RISK_HEAL_LOCK_DIR": str(root / name),
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [process.communicate(timeout=900) for process in started]
    results = [json.loads(stdout) for stdout, _ in outputs]
    return {"policy": policy, "production": production, "results": results, "stderr": [e for _, e in outputs]}


def _heal_command(stack, policy: Path) -> list[str]:
    return [str(BIN / "credit-risk"), "heal", "--once", "--json", "--data", str(stack.original_path),
            "--policy", str(policy)]  # fmt: skip


def test_two_attempts_at_once_exactly_one_trains(stack, concurrent):
    results = concurrent["results"]
    trained = [r for r in results if r["candidate_version"] is not None]
    held = [r for r in results if r["candidate_version"] is None]
    assert len(trained) == 1 and len(held) == 1, [(r["state"], r["reasons"][-1]) for r in results]
    assert held[0]["state"] == "skipped"
    assert "holds the lease" in held[0]["reasons"][-1] or "goes first" in held[0]["reasons"][-1]
    for result in results:
        assert stack.attempt(result["attempt_run_id"]).data.tags["heal.state"] == result["state"]


def test_a_challenger_that_loses_is_registered_refused_and_recorded(stack, concurrent):
    (result,) = [r for r in concurrent["results"] if r["candidate_version"] is not None]
    assert result["triggered"] and result["trigger"]["schedule"]["fired"]
    assert result["state"] == "rejected" and result["promoted"] is False
    version = result["candidate_version"]
    # The same rows as Production's: the same model, a tie on the recent rows, not better.
    gate = result["gate"]
    assert gate["decision"] == "rejected"
    assert gate["candidate_roc_auc_recent"] == gate["production_roc_auc_recent"]
    assert "not better on the recent rows" in gate["reason"]
    assert stack.production() == concurrent["production"]
    tags = stack.version(version).tags
    assert tags["heal.challenger"] == "rejected" and tags["gate.decision"] == "rejected"
    assert tags["gate.reason"] == gate["reason"]
    assert "rejected by the gate, not promoted" in result["reasons"][-1]
    assert stack.attempt(result["attempt_run_id"]).data.tags["heal.state"] == "rejected"
    status = json.loads(
        credit_risk("status", "--json", "--server", stack.url, tracking_uri=stack.tracking_uri).stdout
    )
    assert status["waiting_challengers"] == []


def test_the_cooldown_holds_the_next_attempt(stack, concurrent, tmp_path):
    (trained,) = [r for r in concurrent["results"] if r["candidate_version"] is not None]
    versions = set(stack.versions())
    cooldown_policy = write_policy(
        tmp_path / "policy.toml",
        trigger__schedule={"every_days": 1e-6},
        attempts={"cooldown_hours": 1.0},
        data={"production_weight": 3},
    )
    done, result = stack.heal(cooldown_policy)
    assert done.returncode == 0, done.stderr
    assert result["triggered"] is True and result["state"] == "skipped"
    assert result["candidate_version"] is None and set(stack.versions()) == versions
    assert f"cooldown: attempt {trained['attempt_run_id']} started training" in result["reasons"][-1]


def test_an_attempt_on_a_machine_where_one_runs_is_skipped_by_the_local_lock(stack, tmp_path):
    policy = write_policy(tmp_path / "policy.toml", trigger__schedule={"every_days": 1e-6})
    lock = HealSettings(lock_dir=stack.root, training=TrainingSettings()).lock_path(stack.tracking_uri)
    versions = set(stack.versions())
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done, result = stack.heal(policy)
    assert done.returncode == 0, done.stderr
    assert result["state"] == "skipped" and str(lock) in result["reasons"][-1]
    assert result["candidate_version"] is None and set(stack.versions()) == versions


def test_another_original_file_is_refused_before_anything_is_trained(stack, tmp_path):
    """The original file must be the one Production's line was trained on (its SHA-256, as
    recorded): a file with one row less is refused, named, and nothing is registered."""
    original = pd.read_csv(stack.original_path, index_col=0, na_values=["NA"])
    other = kaggle_csv(original.iloc[1:], tmp_path / "other.csv")
    policy = write_policy(tmp_path / "policy.toml", trigger__schedule={"every_days": 1e-6})
    versions, production = set(stack.versions()), stack.production()
    done, result = stack.heal(policy, "--data", str(other))
    assert done.returncode == 1, done.stderr
    assert result["triggered"] is True and result["state"] == "refused"
    assert result["candidate_version"] is None and set(stack.versions()) == versions
    assert stack.production() == production
    reason = result["reasons"][-1]
    assert f"the original training file {other}" in reason and "pass --allow-other-data" in reason
    assert f"error: heal attempt refused: {reason}" in done.stderr
    assert stack.attempt(result["attempt_run_id"]).data.tags["heal.state"] == "refused"


def test_a_challenger_whose_files_change_before_the_gate_is_refused_and_never_promoted(
    stack, tmp_path, monkeypatch
):
    """Between its registration and the gate, the challenger's stored pipeline is overwritten
    through the artifact proxy with a pickle that would touch a marker file if loaded: the gate
    loads it as serving does, the integrity check refuses it by name before anything is
    unpickled, and nothing moves, even in auto mode. Called in-process (to reach that moment)."""
    from healing.heal import heal_once
    from training import gate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)
    client = MlflowClient(stack.tracking_uri)
    production = stack.production()
    marker = tmp_path / "unpickled"
    challenge = gate.challenge

    def tampered_then_gated(client_, version, *args, **kwargs):
        original = read_stored_file(client, version, PIPELINE_FILE)
        overwrite_stored_file(client, version, PIPELINE_FILE, tripwire_of_size(marker, len(original)))
        return challenge(client_, version, *args, **kwargs)

    monkeypatch.setattr(gate, "challenge", tampered_then_gated)
    policy = write_policy(
        tmp_path / "policy.toml", trigger__schedule={"every_days": 1e-6}, data={"production_weight": 3}
    )
    result = heal_once(
        settings=HealSettings(lock_dir=tmp_path, training=TrainingSettings(data=stack.original_path)),
        policy=load_policy(policy),
        mode="auto",
        client=client,
    )
    assert result.state == "refused" and not result.ok and result.promoted is False
    assert result.gate["decision"] == "refused"
    assert PIPELINE_FILE in result.gate["reason"] and "content differs" in result.gate["reason"]
    assert result.reasons[-1].startswith("refused by the gate, never promoted:")
    assert not marker.exists()  # refused before anything was unpickled
    assert stack.production() == production and stack.served_version() == production
    assert stack.version(result.candidate_version).tags["heal.challenger"] == "refused"
    assert stack.attempt(result.attempt_run_id).data.tags["heal.state"] == "refused"


def test_a_failed_retrain_leaves_production_as_it_was_and_says_why(stack, tmp_path, monkeypatch):
    """The trainer refuses the challenger's file (a negative value in an original row, injected
    into the rows read, the file's recorded hash kept): the attempt fails, is recorded as
    failed with the error, and nothing moves. Called in-process, as the monitor service calls it."""
    from healing.heal import heal_once

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)
    production, versions = stack.production(), set(stack.versions())
    original = load_training_data(stack.original_path)
    original.features.iloc[0, 0] = -1.0
    policy = write_policy(tmp_path / "policy.toml", trigger__schedule={"every_days": 1e-6})
    result = heal_once(
        settings=HealSettings(lock_dir=tmp_path, training=TrainingSettings(data=stack.original_path)),
        policy=load_policy(policy),
        mode="auto",
        original=original,
        client=MlflowClient(stack.tracking_uri),
    )
    assert result.state == "failed" and not result.ok and result.promoted is False
    assert "DataError" in result.error and "RevolvingUtilizationOfUnsecuredLines" in result.error
    assert result.reasons[-1].startswith("failed, Production left as it was: DataError")
    assert stack.production() == production and set(stack.versions()) == versions
    attempt = stack.attempt(result.attempt_run_id)
    assert attempt.info.status == "FAILED"
    assert attempt.data.tags["heal.state"] == "failed" and attempt.data.tags["heal.error"] == result.error
    assert attempt.data.tags["heal.trained"] == "true"  # it counts for the cooldown
