"""`docker compose up` for real: build, health in order, inference, records, restarts, with
MLflow's runs and registry in the `db` service's PostgreSQL.

Runs under its own project name, image tag and free published ports, so it never touches a
user's stack, and removes everything it created (containers, volumes, network, images).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import httpx
import pytest
from mlflow.tracking import MlflowClient

from logging_sidecar.reader import read_records
from serving.settings import MODEL_NAME, SERVING_DIR
from tests.helpers import REPO, free_port
from training.registry import REGISTERED_MODEL_NAME

pytestmark = pytest.mark.docker

LONG_RUNNING = ("db", "mlflow", "serving", "sidecar")


def _docker_usable() -> bool:
    try:
        return (
            subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
            and subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


class Compose:
    def __init__(self):
        suffix = uuid.uuid4().hex[:8]
        self.project = f"credit-risk-test-{suffix}"
        self.ports = {
            name: free_port()
            for name in ("MLFLOW_PORT", "MLSERVER_HTTP_PORT", "MLSERVER_GRPC_PORT", "MLSERVER_METRICS_PORT")
        }
        self.env = {
            **os.environ,
            **{k: str(v) for k, v in self.ports.items()},
            "CREDIT_RISK_IMAGE_TAG": f"test-{suffix}",
            "CREDIT_RISK_FLUSH_INTERVAL_S": "2",
        }
        self.images = [f"credit-risk-{kind}:test-{suffix}" for kind in ("train", "serve")]
        self.mlflow_url = f"http://127.0.0.1:{self.ports['MLFLOW_PORT']}"
        self.infer_url = f"http://127.0.0.1:{self.ports['MLSERVER_HTTP_PORT']}/v2/models/{MODEL_NAME}/infer"

    def run(self, *args, timeout=900, check=True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["docker", "compose", "-p", self.project, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            logs = self.run("logs", "--no-color", "--tail", "50", check=False).stdout
            raise AssertionError(f"docker compose {' '.join(args)} failed:\n{result.stderr}\n{logs}")
        return result

    def up(self):
        self.run("up", "--detach", "--wait", "--wait-timeout", "600")
        out = self.run("ps", "--all", "--format", "json").stdout
        # Compose prints one JSON object per line (older releases: one JSON array).
        states = (
            json.loads(out)
            if out.lstrip().startswith("[")
            else [json.loads(line) for line in out.splitlines() if line.strip()]
        )
        by_service = {s["Service"]: s for s in states}
        for service in LONG_RUNNING:
            assert by_service[service]["Health"] == "healthy", by_service[service]
        assert by_service["trainer"]["ExitCode"] == 0, by_service["trainer"]
        assert not any(p.get("PublishedPort") for p in by_service["db"].get("Publishers") or []), by_service[
            "db"
        ]

    def sql(self, query: str) -> list[list[str]]:
        """Rows of ``query`` run in MLflow's database, inside the ``db`` container."""
        out = self.run("exec", "-T", "db", "psql", "--username=mlflow", "--dbname=mlflow",
                       "--no-align", "--tuples-only", "--field-separator=|", "--command", query).stdout  # fmt: skip
        return [line.split("|") for line in out.splitlines() if line]

    def infer(self, request_id: str) -> dict:
        body = json.loads((SERVING_DIR / "example-request.json").read_text())
        body["id"] = request_id
        response = httpx.post(self.infer_url, json=body, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def client(self) -> MlflowClient:
        return MlflowClient(self.mlflow_url)

    def wait_for_records(self, expected_ids: set[str], timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = read_records(client=self.client(), deduplicate=False)
            if set(records["request_id"]) >= expected_ids:
                return records
            time.sleep(2)
        raise AssertionError(f"records of {len(expected_ids)} requests not in MLflow after {timeout} s")

    def cleanup(self):
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False)
        subprocess.run(["docker", "image", "rm", "--force", *self.images], capture_output=True)


@pytest.fixture(scope="module")
def compose():
    if not _docker_usable():
        if os.environ.get("CREDIT_RISK_REQUIRE_DOCKER") == "1":
            pytest.fail("CREDIT_RISK_REQUIRE_DOCKER=1 but no usable Docker engine with Compose v2")
        pytest.skip("no usable Docker engine with Compose v2")
    stack = Compose()
    try:
        stack.run("build", timeout=1800)
        yield stack
    finally:
        stack.cleanup()


def test_fresh_up_restart_and_down_up_keep_everything(compose):
    compose.up()
    versions = compose.client().search_model_versions(f"name='{REGISTERED_MODEL_NAME}'")
    assert [(v.version, v.current_stage) for v in versions] == [("1", "Production")]
    runs_before = len(
        compose.client().search_runs([e.experiment_id for e in compose.client().search_experiments()])
    )

    first = {f"docker-{uuid.uuid4().hex}" for _ in range(12)}
    for request_id in first:
        answer = compose.infer(request_id)
        assert answer["model_version"] == "1" and answer["id"] == request_id
    records = compose.wait_for_records(first)
    assert len(records) == 2 * len(first)  # the example request has two rows, each once
    # Runs and registry are in PostgreSQL, not in a SQLite file on MLflow's volume.
    assert compose.sql(
        f"SELECT version, current_stage FROM model_versions WHERE name = '{REGISTERED_MODEL_NAME}'"
    ) == [["1", "Production"]]
    assert "mlflow.db" not in compose.run("exec", "-T", "mlflow", "ls", "/var/lib/credit-risk/mlflow").stdout

    for how in (("restart",), ("down", "up")):
        if how == ("restart",):
            compose.run("restart", "--timeout", "20")
            compose.run("up", "--detach", "--wait", "--wait-timeout", "600")  # wait for health again
        else:
            compose.run("down", "--timeout", "20")
            compose.up()
        trainer_log = compose.run("logs", "--no-color", "trainer").stdout
        assert "nothing to do" in trainer_log, trainer_log
        versions = compose.client().search_model_versions(f"name='{REGISTERED_MODEL_NAME}'")
        assert [(v.version, v.current_stage) for v in versions] == [("1", "Production")], how
        runs_after = len(
            compose.client().search_runs([e.experiment_id for e in compose.client().search_experiments()])
        )
        assert runs_after >= runs_before, how
        assert compose.sql("SELECT count(*) FROM runs WHERE lifecycle_stage = 'active'") == [
            [str(runs_after)]
        ], how
        more = {f"docker-{uuid.uuid4().hex}" for _ in range(3)}
        for request_id in more:
            compose.infer(request_id)
        first |= more
        records = compose.wait_for_records(first)
        assert len(records) == 2 * len(first), how  # nothing lost, nothing twice


def _started_at(compose: Compose, service: str) -> str:
    container = compose.run("ps", "--quiet", service).stdout.strip()
    inspect = subprocess.run(["docker", "inspect", container], capture_output=True, text=True, check=True)
    return json.loads(inspect.stdout)[0]["State"]["StartedAt"]


def test_a_promotion_while_up_is_served_without_a_restart(compose):
    """The stack is up (previous test); a second trainer run promotes version 2 and the
    running server swaps to it by itself."""
    started = _started_at(compose, "serving")
    trained = compose.run(
        "run", "--rm", "--no-TTY", "trainer", "credit-risk", "train", "--retrain", "--set", "max_iter=60", "--force-promote",
        timeout=900,
    )  # fmt: skip
    assert "version 2 (stage Production)" in trained.stdout, trained.stdout
    deadline = time.monotonic() + 60
    while (answer := compose.infer(f"docker-{uuid.uuid4().hex}"))["model_version"] != "2":
        assert time.monotonic() < deadline, answer
        time.sleep(1)
    assert _started_at(compose, "serving") == started  # same container, no restart
    request_id = f"docker-{uuid.uuid4().hex}"
    compose.infer(request_id)
    records = compose.wait_for_records({request_id})
    assert set(records.loc[records["request_id"] == request_id, "model_version"]) == {"2"}
