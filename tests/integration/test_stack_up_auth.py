"""`credit-risk up --auth`: the whole local stack with MLflow's basic-auth app, on free ports in
a throwaway folder that stands for the repository, and the commands run there afterwards with
no variables set, each acting as the identity it needs.

One stack for the module (CI time): the fixture runs ``up --auth`` once, the tests then run in
file order against it (the last one deletes and restores the inference experiment), and the
fixture's end runs ``down``. What each identity may do, line by line, is
tests/integration/test_auth.py against a server provisioned the same way; here the stack that
``up --auth`` starts is checked to hold that same table, and the few refusals the issue names
are asked of it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pandas as pd
import pytest

from model.identity import PRODUCTION_STAGE, REGISTERED_MODEL_NAME
from stack import auth_policy as policy
from stack.auth_files import Credentials, read_credentials
from tests.auth_helpers import As
from tests.helpers import BIN, free_port
from tests.integration.test_stack_up import EXAMPLE, check_read_back, printed_answer, wait_shipped

pytestmark = pytest.mark.integration

NAME = REGISTERED_MODEL_NAME
# Credentials of another server in the shell that runs `up`: serving and the sidecar must not
# inherit them, and training must not use them.
SOMEONE_ELSES = Credentials("someone-else", "someone-elses-password")


@dataclass
class AuthStack:
    folder: Path
    ports: dict[str, int]
    env: dict[str, str]  # no MLFLOW_* or CREDIT_RISK_* credentials: the folder decides
    up: subprocess.CompletedProcess

    @property
    def tracking(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def state(self) -> Path:
        return self.folder / ".credit-risk"

    @property
    def auth(self) -> Path:
        return self.state / "auth"

    def flags(self) -> list[str]:
        return ["--mlflow-port", str(self.ports["mlflow"]), "--http-port", str(self.ports["http"]),
                "--sidecar-port", str(self.ports["sidecar"])]  # fmt: skip

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "credit-risk"), *args], env=env or self.env, cwd=self.folder,
                              capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)  # fmt: skip

    def credentials(self, identity: str) -> Credentials:
        return read_credentials(self.auth / f"{identity}.env")

    def as_(self, identity: str | None) -> As:
        return As(self.tracking, None if identity is None else self.credentials(identity))

    def infer(self, request: dict) -> dict:
        url = f"http://127.0.0.1:{self.ports['http']}/v2/models/credit-risk/infer"
        answer = httpx.post(url, json=request, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def sidecar_health(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.ports['sidecar']}/health", timeout=5).json()

    def pid(self, service: str) -> int:
        return int((self.state / "pids" / f"{service}.pid").read_text())


def _ok(response: httpx.Response, what: str) -> dict:
    assert response.status_code == 200, f"{what}: {response.status_code} {response.text[:300]}"
    return response.json() if response.content else {}


def _clean_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CREDIT_RISK_"))}
    env.pop("MLSERVER_HTTP_PORT", None)
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("repository")
    ports = {name: free_port() for name in ("mlflow", "http", "sidecar", "grpc", "metrics")}
    env = {
        **_clean_environment(),
        "MLSERVER_GRPC_PORT": str(ports["grpc"]),
        "MLSERVER_METRICS_PORT": str(ports["metrics"]),
        "CREDIT_RISK_FLUSH_INTERVAL_S": "1",  # the sidecar ships within a second, not 30
    }
    stack = AuthStack(folder, ports, env, None)
    up_env = {**env, "MLFLOW_TRACKING_USERNAME": SOMEONE_ELSES.username,
              "MLFLOW_TRACKING_PASSWORD": SOMEONE_ELSES.password}  # fmt: skip
    try:
        stack.up = stack.run("up", "--auth", *stack.flags(), env=up_env)
        yield stack
    finally:
        down = stack.run("down", *stack.flags())
    assert down.returncode == 0 and down.stdout.count(": stopped") == 3, down.stdout + down.stderr


def test_up_auth_provisions_trains_registers_promotes_and_serves(stack):
    up = stack.up
    assert up.returncode == 0, up.stdout + up.stderr
    for identity in policy.SERVICE_IDENTITIES:
        assert f"  changed: {identity}: user created\n" in up.stdout
    assert "model:   credit-risk-model version 1 (stage Production)" in up.stdout
    assert "  serving version 1\n" in up.stdout
    assert printed_answer(up.stdout)["model_version"] == "1"
    assert f"MLflow UI:    {stack.tracking} (log in as in {stack.auth / 'admin.env'})" in up.stdout
    assert json.loads((stack.state / "stack.json").read_text())["auth"] is True
    launcher_log = (stack.state / "logs" / "mlflow.log").read_text()
    assert f"auth on: users and grants in sqlite:///{stack.auth / 'basic_auth.db'}; " in launcher_log

    # Every credential private: the folder 0700, each file 0600, one file per identity.
    assert stat.S_IMODE(stack.auth.stat().st_mode) == 0o700
    names = {path.name for path in stack.auth.iterdir()}
    expected = {f"{i}.env" for i in policy.IDENTITIES} | {
        "flask_secret_key",
        "basic_auth.ini",
        "basic_auth.db",
    }
    assert expected <= names, names
    for name in expected:
        assert stat.S_IMODE((stack.auth / name).stat().st_mode) == 0o600, name

    # The processes: MLflow runs the basic-auth app; serving and the sidecar got their own file,
    # none of the shell's credentials, and no password on any command line.
    commands = {
        s: Path(f"/proc/{stack.pid(s)}/cmdline").read_bytes() for s in ("mlflow", "serving", "sidecar")
    }
    assert b"\0--app-name\0basic-auth\0" in commands["mlflow"], commands["mlflow"]
    passwords = [stack.credentials(i).password.encode() for i in policy.IDENTITIES]
    for service, command in commands.items():
        assert not any(password in command for password in passwords), service
    for service, identity in (("serving", policy.SERVING), ("sidecar", policy.SIDECAR)):
        environ = dict(
            line.split(b"=", 1)
            for line in Path(f"/proc/{stack.pid(service)}/environ").read_bytes().split(b"\0")
            if b"=" in line
        )
        assert environ[b"CREDIT_RISK_CREDENTIALS_FILE"] == str(stack.auth / f"{identity}.env").encode()
        assert b"MLFLOW_TRACKING_USERNAME" not in environ and b"MLFLOW_TRACKING_PASSWORD" not in environ, (
            service
        )


def test_the_started_server_holds_the_table_and_refuses_as_the_issue_says(stack):
    admin = stack.as_(policy.ADMIN)
    experiments = {
        role: _ok(admin.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=name), name)[
            "experiment"
        ]["experiment_id"]
        for role, name in ((r, policy.Names().experiment(r)) for r in policy.EXPERIMENT_ROLES)
    }
    for identity in policy.SERVICE_IDENTITIES:
        rows = _ok(admin.get("/api/3.0/mlflow/users/permissions/list", username=identity), identity)[
            "permissions"
        ]
        held = {(r["resource_type"], r["resource_pattern"], r["permission"]) for r in rows}
        wanted = {
            (
                g.resource_type,
                experiments[g.resource]
                if g.resource_type == policy.EXPERIMENT
                else policy.Names().of(g.resource),
                g.permission,
            )
            for g in policy.grants_of(identity)
        }
        assert held == wanted, identity

    anonymous = stack.as_(None)
    assert anonymous.get("/api/2.0/mlflow/registered-models/get", name=NAME).status_code == 401
    assert (
        anonymous.post("/api/2.0/mlflow/runs/create", experiment_id=experiments[policy.TRAINING]).status_code
        == 401
    )
    serving = stack.as_(policy.SERVING)
    refused = {
        "serving moves the stage": serving.post(
            "/api/2.0/mlflow/model-versions/transition-stage", name=NAME, version="1", stage="Archived"
        ),
        "serving tags a version": serving.post(
            "/api/2.0/mlflow/model-versions/set-tag",
            name=NAME,
            version="1",
            key="promotion.source",
            value="x",
        ),
        "serving moves the alias": serving.post(
            "/api/2.0/mlflow/registered-models/alias", name=NAME, alias="production", version="1"
        ),
        "trainer writes records": stack.as_(policy.TRAINER).post(
            "/api/2.0/mlflow/runs/create", experiment_id=experiments[policy.INFERENCE]
        ),
        "sidecar registers a version": stack.as_(policy.SIDECAR).post(
            "/api/2.0/mlflow/model-versions/create", name=NAME, source="models:/x"
        ),
    }
    assert {what: r.status_code for what, r in refused.items()} == dict.fromkeys(refused, 403)


def test_up_auth_again_changes_nothing_and_keeps_the_passwords(stack):
    files = sorted(p for p in stack.auth.iterdir() if p.suffix != ".db")
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in files}
    again = stack.run("up", "--auth", *stack.flags())
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("  already running\n") == 3, again.stdout
    assert "→ Identities and permissions (MLflow basic-auth) ...\n  nothing to change\n" in again.stdout
    assert "nothing to do" in again.stdout and "changed:" not in again.stdout
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in files} == before


def test_up_without_auth_beside_it_says_so_and_stops(stack):
    plain = stack.run("up", *stack.flags())
    assert plain.returncode == 1
    assert plain.stderr.splitlines() == [
        f"error: the local stack in {stack.state} runs with auth on (mlflow, serving, sidecar running): "
        "`credit-risk up --auth` uses it as it is; to start it with auth off, `credit-risk down` first"
    ]
    assert "→ MLflow" not in plain.stdout


def _wait_serving(stack: AuthStack, version: str, timeout: float = 120) -> None:
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        answer = httpx.get(f"http://127.0.0.1:{stack.ports['http']}/v2/models/credit-risk", timeout=5)
        seen = (answer.json().get("parameters") or {}).get("registry_version")
        if seen == version:
            return
        time.sleep(0.5)
    raise AssertionError(f"serving still serves version {seen} after {timeout:.0f} s, not {version}")


def test_commands_run_here_act_as_their_identity_and_serving_follows_a_promotion(stack):
    line = f"tracking server: {stack.tracking} (the local stack, .credit-risk/stack.json)"

    trained = stack.run("train")  # the same data and settings: nothing to train, but it asks as trainer
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert f"{line} as trainer (.credit-risk/auth/trainer.env)\n" in trained.stderr
    assert "nothing to do" in trained.stdout

    # Version 2: the same logged model registered again by the trainer, for the operator to promote.
    trainer = stack.as_(policy.TRAINER)
    first = _ok(trainer.get("/api/2.0/mlflow/model-versions/get", name=NAME, version="1"), "v1")[
        "model_version"
    ]
    lineage = {"run_id": first["run_id"], "model_id": first["source"].removeprefix("models:/")}
    _ok(
        trainer.post("/api/2.0/mlflow/model-versions/create", name=NAME, source=first["source"], **lineage),
        "v2",
    )

    promoted = stack.run("promote", "--version", "2", "--reason", "auth stack follows a promotion")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert promoted.stderr.startswith(f"{line} as operator (.credit-risk/auth/operator.env)\n"), (
        promoted.stderr
    )
    assert f"Promoted {NAME} v2 to {PRODUCTION_STAGE}" in promoted.stdout
    _wait_serving(stack, "2")

    status = stack.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stderr == f"{line} as operator (.credit-risk/auth/operator.env)\n"
    assert f"http://127.0.0.1:{stack.ports['http']}  serving v2, ready" in status.stdout


def test_records_ship_and_read_back_as_monitor_and_not_as_serving(stack, tmp_path):
    health = stack.sidecar_health()
    before = health["shipped_records_total"] + health["pending_records"]
    request = {**EXAMPLE, "id": f"auth-{uuid.uuid4().hex}"}
    answer = stack.infer(request)
    assert answer["model_version"] == "2"
    wait_shipped(stack.ports["sidecar"], rows=before + 2)

    read = stack.run("records", "--model-version", "2", "--output", str(tmp_path / "records.parquet"))
    assert read.returncode == 0, read.stderr
    assert read.stderr.startswith(
        f"tracking server: {stack.tracking} (the local stack, .credit-risk/stack.json) "
        "as monitor (.credit-risk/auth/monitor.env)\n"
    ), read.stderr
    check_read_back(pd.read_parquet(tmp_path / "records.parquet"), answer, request, version="2")

    # The records are personal data: serving, which reads the model, may not read them.
    serving_env = {**stack.env, "CREDIT_RISK_CREDENTIALS_FILE": str(stack.auth / "serving.env")}
    refused = stack.run("records", env=serving_env)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[1].startswith(
        "error: the tracking server refused this to 'serving' (403)"
    )


def test_records_prune_deletes_as_sidecar_and_is_refused_to_monitor(stack):
    """Retention under auth: ``records prune`` run here acts as the sidecar, the one identity
    that may delete record runs and their files; the monitor, which reads them, may not."""
    sidecar, admin = stack.as_(policy.SIDECAR), stack.as_(policy.ADMIN)
    experiment = _ok(
        sidecar.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=policy.Names().inference),
        "get",
    )["experiment"]["experiment_id"]
    old_day = (datetime.now(UTC).date() - timedelta(days=10)).isoformat()
    run_id = _ok(sidecar.post("/api/2.0/mlflow/runs/create", experiment_id=experiment), "create")["run"][
        "info"
    ]["run_id"]
    _ok(sidecar.post("/api/2.0/mlflow/runs/set-tag", run_id=run_id, key="day", value=old_day), "tag")
    record = f"{experiment}/{run_id}/artifacts/records/old.csv"
    _ok(sidecar.put_artifact(record, b"age,income\n41,52000\n"), "upload")

    monitor_env = {**stack.env, "CREDIT_RISK_CREDENTIALS_FILE": str(stack.auth / "monitor.env")}
    refused = stack.run("records", "prune", "--older-than", "7", env=monitor_env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "as monitor" in refused.stderr.splitlines()[0]
    error = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, refused.stderr
    assert error[0].startswith("error: the tracking server refused the prune to 'monitor' (403): "), error
    assert admin.get_artifact(record).status_code == 200

    def active_runs() -> set[str]:
        found = _ok(admin.post("/api/2.0/mlflow/runs/search", experiment_ids=[experiment]), "search")["runs"]
        return {run["info"]["run_id"] for run in found}

    recent = active_runs() - {run_id}
    assert recent, "no records shipped by this module's requests"  # they are minutes old
    pruned = stack.run("records", "prune", "--older-than", "7")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert pruned.stderr.startswith(
        f"tracking server: {stack.tracking} (the local stack, .credit-risk/stack.json) "
        "as sidecar (.credit-risk/auth/sidecar.env)\n"
    ), pruned.stderr
    assert pruned.stdout.startswith("pruned experiment 'credit-risk-inference': 1 runs (1 record files)"), (
        pruned.stdout
    )
    run = _ok(admin.get("/api/2.0/mlflow/runs/get", run_id=run_id), "run")["run"]
    assert run["info"]["lifecycle_stage"] == "deleted"
    assert admin.get_artifact(record).status_code != 200
    # Records minutes old are inside any window: their runs are all still there.
    assert recent <= active_runs()


def _wait_until_shipped(stack: AuthStack, timeout: float = 120) -> None:
    deadline, health = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        health = stack.sidecar_health()
        if health["pending_records"] == 0 and health["last_error"] is None:
            return
        time.sleep(0.5)
    raise AssertionError(f"records still pending after {timeout:.0f} s: {health}")


def test_a_deleted_inference_experiment_is_named_by_the_sidecar_and_restored_by_admin(stack):
    _wait_until_shipped(stack)
    admin = stack.as_(policy.ADMIN)
    experiment = _ok(
        admin.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=policy.Names().inference), "get"
    )["experiment"]["experiment_id"]
    _ok(admin.post("/api/2.0/mlflow/experiments/delete", experiment_id=experiment), "delete")
    stack.infer({**EXAMPLE, "id": f"after-delete-{uuid.uuid4().hex}"})
    message = (
        f"the inference experiment 'credit-risk-inference' ({experiment}) was deleted; only admin can "
        "restore it: `credit-risk auth provision`"
    )
    deadline, health = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        health = stack.sidecar_health()
        if health["last_error"] == f"MlflowException: {message}":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the sidecar never said the experiment was deleted: {health}")
    assert health["pending_records"] == 2

    provisioned = stack.run("auth", "provision")
    assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr
    assert provisioned.stderr == (
        f"tracking server: {stack.tracking} (the local stack, .credit-risk/stack.json) "
        "as admin (.credit-risk/auth/admin.env)\n"
    )
    assert (
        provisioned.stdout
        == f"changed: experiment 'credit-risk-inference': restored ({experiment}), it had been deleted\n"
    )
    _wait_until_shipped(stack)
