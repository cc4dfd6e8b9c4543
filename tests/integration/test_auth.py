"""The permission table (``stack.auth_policy``) against a real MLflow 3.17 tracking server started
with ``--app-name basic-auth``, provisioned by ``stack.auth.provision``, every request made with
an identity's own generated credentials.

One server for the module. The fixture provisions it, trains and registers as ``trainer`` (the
real ``credit-risk train``), ships a record batch as ``sidecar`` and ingests an outcome file as
``operator``, so every later check reads or writes real data. The tests that change the server
behind provisioning's back (stray grants, a new admin password) run last and leave it as the
table says.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from model import scoring
from model.identity import HELD_OUT_ARTIFACT, PRODUCTION_ALIAS, PRODUCTION_STAGE, REGISTERED_MODEL_NAME
from model.integrity import MODEL_DIR, RUN_DIR, IntegrityError, build_manifest, verify
from model.schema import FEATURES
from stack import auth_policy as policy
from stack.auth import ProvisioningError, provision
from stack.auth_files import ADMIN_PASSWORD_VARIABLE, Credentials, identity_file, read_credentials
from tests.auth_helpers import As, auth_tracking_server, identity_env, python_as
from tests.helpers import BIN, NOBODY_URL, SAMPLE, mlflow_tracking_server

pytestmark = pytest.mark.integration

NAME = REGISTERED_MODEL_NAME
RECORD = b"request_id,row,probability\nreq-1,0,0.12\n"
OUTCOME = b"request_id,row,outcome\nreq-1,0,1\n"


@dataclass
class AuthStack:
    uri: str
    credentials_dir: Path
    first_report: object
    experiments: dict[str, str]  # role -> id
    record_run: str  # the sidecar's run in the inference experiment
    outcome_run: str  # the operator's run in the outcomes experiment
    training_run: str

    def credentials(self, identity: str) -> Credentials:
        return read_credentials(identity_file(self.credentials_dir, identity))

    def as_(self, identity: str | None) -> As:
        return As(self.uri, None if identity is None else self.credentials(identity))

    def artifact(self, role: str, run_id: str, name: str) -> str:
        return f"{self.experiments[role]}/{run_id}/artifacts/{name}"


def _ok(response, what: str):
    assert response.status_code == 200, f"{what}: {response.status_code} {response.text[:300]}"
    return response.json() if response.content else {}


def _log_run_with_artifact(client: As, experiment_id: str, name: str, content: bytes) -> str:
    run_id = _ok(client.post("/api/2.0/mlflow/runs/create", experiment_id=experiment_id), "create run")[
        "run"
    ]["info"]["run_id"]
    metrics = [{"key": "rows", "value": 1.0, "timestamp": 0, "step": 0}]
    _ok(client.post("/api/2.0/mlflow/runs/log-batch", run_id=run_id, metrics=metrics), "log batch")
    _ok(client.put_artifact(f"{experiment_id}/{run_id}/artifacts/{name}", content), "put artifact")
    return run_id


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("auth")
    credentials_dir = state / "auth"
    with auth_tracking_server(state, credentials_dir, environ={}) as uri:
        first = provision(uri, credentials_dir, environ={})
        experiments = {
            role: first.experiment_ids[policy.Names().experiment(role)] for role in policy.EXPERIMENT_ROLES
        }
        trained = subprocess.run(
            [str(BIN / "credit-risk"), "train", "--data", str(SAMPLE), "--set", "max_iter=20"],
            env=identity_env(credentials_dir, policy.TRAINER, uri),
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert trained.returncode == 0, trained.stdout + trained.stderr
        stack = AuthStack(uri, credentials_dir, first, experiments, "", "", "")
        trainer = stack.as_(policy.TRAINER)
        version = _ok(trainer.get("/api/2.0/mlflow/model-versions/get", name=NAME, version="1"), "get v1")
        version = version["model_version"]
        # A second registration of the same model, so that the operator has something to promote.
        # Registered as training registers: the logged model's URI, its id and its run.
        lineage = {"run_id": version["run_id"], "model_id": version["source"].removeprefix("models:/")}
        _ok(
            trainer.post(
                "/api/2.0/mlflow/model-versions/create", name=NAME, source=version["source"], **lineage
            ),
            "trainer registers v2",
        )
        stack.training_run = version["run_id"]
        stack.record_run = _log_run_with_artifact(
            stack.as_(policy.SIDECAR), experiments[policy.INFERENCE], "records/batch-1.csv", RECORD
        )
        stack.outcome_run = _log_run_with_artifact(
            stack.as_(policy.OPERATOR), experiments[policy.OUTCOMES], "outcomes/file-1.csv", OUTCOME
        )
        yield stack


def _permission(identity: str, resource_type: str, resource: str) -> str | None:
    found = [
        g.permission
        for g in policy.grants_of(identity)
        if g.resource_type == resource_type and g.resource in (resource, policy.EVERY)
    ]
    return found[0] if found else None


# --- Provisioning --------------------------------------------------------------------------


def test_first_provisioning_created_everything(auth_stack):
    changes = auth_stack.first_report.changes
    for identity in policy.SERVICE_IDENTITIES:
        assert f"{identity}: user created" in changes
    for name in auth_stack.first_report.experiment_ids:
        assert any(c.startswith(f"experiment {name!r}: created") for c in changes)
    assert f"registered model {NAME!r}: created" in changes
    assert len([c for c in changes if ": granted " in c]) == len(policy.POLICY)


def test_provisioning_twice_is_a_no_op_and_keeps_passwords(auth_stack):
    # The credentials and the server's files (the auth database beside them changes: passwords
    # are set again, with new salts).
    files = sorted(p for p in auth_stack.credentials_dir.iterdir() if p.suffix != ".db")
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in files}
    report = provision(auth_stack.uri, auth_stack.credentials_dir, environ={})
    assert report.changes == [], report.changes
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in files} == before
    for identity in policy.IDENTITIES:
        whoami = _ok(auth_stack.as_(identity).get("/api/2.0/mlflow/users/current"), identity)
        assert whoami["user"]["username"] == identity
        assert whoami["user"]["is_admin"] is (identity == policy.ADMIN)


def test_every_identity_holds_exactly_its_lines_of_the_table(auth_stack):
    _assert_grants_are_the_tables(auth_stack)


def _assert_grants_are_the_tables(auth_stack, elsewhere=frozenset()):
    """Each identity's grants are its lines of the table, and ``elsewhere`` (grants on resources
    that are not this stack's, which provisioning leaves alone)."""
    admin = auth_stack.as_(policy.ADMIN)
    names = policy.Names()
    for identity in policy.SERVICE_IDENTITIES:
        rows = _ok(admin.get("/api/3.0/mlflow/users/permissions/list", username=identity), identity)[
            "permissions"
        ]
        held = {(r["resource_type"], r["resource_pattern"], r["permission"]) for r in rows}
        held -= {tuple(grant) for who, *grant in elsewhere if who == identity}
        wanted = {
            (
                g.resource_type,
                auth_stack.experiments[g.resource]
                if g.resource_type == policy.EXPERIMENT
                else names.of(g.resource),
                g.permission,
            )
            for g in policy.grants_of(identity)
        }
        assert held == wanted, identity


# --- Anonymous -------------------------------------------------------------------------------


def test_anonymous_requests_get_401_and_health_answers(auth_stack):
    anonymous = auth_stack.as_(None)
    health = anonymous.get("/health")
    assert (health.status_code, health.text) == (200, "OK")
    refused = {
        "read experiment": anonymous.get(
            "/api/2.0/mlflow/experiments/get-by-name", experiment_name=policy.Names().training
        ),
        "search runs": anonymous.post("/api/2.0/mlflow/runs/search", experiment_ids=["0"]),
        "create run": anonymous.post("/api/2.0/mlflow/runs/create", experiment_id="0"),
        "read model": anonymous.get("/api/2.0/mlflow/registered-models/get", name=NAME),
        # The example: a promotion tag forged with no credentials.
        "set version tag": anonymous.post(
            "/api/2.0/mlflow/model-versions/set-tag",
            name=NAME,
            version="1",
            key="promotion.source",
            value="x",
        ),
        "move stage": anonymous.post(
            "/api/2.0/mlflow/model-versions/transition-stage", name=NAME, version="2", stage=PRODUCTION_STAGE
        ),
        "read artifact": anonymous.get_artifact(
            auth_stack.artifact(policy.INFERENCE, auth_stack.record_run, "records/batch-1.csv")
        ),
        "overwrite artifact": anonymous.put_artifact(
            auth_stack.artifact(policy.TRAINING, auth_stack.training_run, HELD_OUT_ARTIFACT), b"x"
        ),
        "who am I": anonymous.get("/api/2.0/mlflow/users/current"),
        "UI": anonymous.get("/"),
    }
    assert {what: r.status_code for what, r in refused.items()} == dict.fromkeys(refused, 401)
    assert refused["read model"].headers["WWW-Authenticate"] == 'Basic realm="mlflow"'


def test_a_wrong_password_is_401(auth_stack):
    wrong = As(auth_stack.uri, Credentials(policy.TRAINER, "not-the-password-at-all"))
    assert wrong.get("/api/2.0/mlflow/users/current").status_code == 401


# --- The table, line by line ---------------------------------------------------------------


@pytest.mark.parametrize("role", policy.EXPERIMENT_ROLES)
@pytest.mark.parametrize("identity", policy.SERVICE_IDENTITIES)
def test_experiment_access_is_the_tables(auth_stack, identity, role):
    """READ reads, EDIT writes, nothing else does either; deleting the experiment needs MANAGE
    on it, which no service identity has; deleting a run needs MANAGE on runs too, which only the
    sidecar holds (retention), and it reads only the inference experiment."""
    client = auth_stack.as_(identity)
    experiment_id = auth_stack.experiments[role]
    permission = _permission(identity, policy.EXPERIMENT, role)
    read = client.get("/api/2.0/mlflow/experiments/get", experiment_id=experiment_id)
    assert read.status_code == (200 if permission else 403), read.text
    created = client.post("/api/2.0/mlflow/runs/create", experiment_id=experiment_id)
    assert created.status_code == (200 if permission == policy.EDIT else 403), created.text
    if created.status_code == 200:
        run_id = created.json()["run"]["info"]["run_id"]
        deletes_runs = _permission(identity, policy.RUN, policy.EVERY) == policy.MANAGE
        assert client.post("/api/2.0/mlflow/runs/delete", run_id=run_id).status_code == (
            200 if deletes_runs else 403
        )
        assert (identity, role) == (policy.SIDECAR, policy.INFERENCE) or not deletes_runs
    rename = client.post(
        "/api/2.0/mlflow/experiments/update",
        experiment_id=experiment_id,
        new_name=f"renamed-{role}-by-{identity}",
    )
    # EDIT allows renaming an experiment (MLflow checks it as an update): that is in the table.
    assert rename.status_code == (200 if permission == policy.EDIT else 403)
    if rename.status_code == 200:
        back = policy.Names().experiment(role)
        _ok(
            client.post("/api/2.0/mlflow/experiments/update", experiment_id=experiment_id, new_name=back),
            "rename",
        )
    assert client.post("/api/2.0/mlflow/experiments/delete", experiment_id=experiment_id).status_code == 403


@pytest.mark.parametrize("identity", policy.SERVICE_IDENTITIES)
def test_registered_model_access_is_the_tables(auth_stack, identity):
    client = auth_stack.as_(identity)
    permission = _permission(identity, policy.REGISTERED_MODEL, policy.MODEL)
    read = client.get("/api/2.0/mlflow/registered-models/get", name=NAME)
    assert read.status_code == (200 if permission in (policy.READ, policy.EDIT) else 403)
    tag = client.post(
        "/api/2.0/mlflow/model-versions/set-tag", name=NAME, version="2", key="note", value=identity
    )
    assert tag.status_code == (200 if permission == policy.EDIT else 403)
    forbidden_to_all = {
        "delete version tag": client.delete(
            "/api/2.0/mlflow/model-versions/delete-tag", name=NAME, version="2", key="note"
        ),
        "delete alias": client.delete(
            "/api/2.0/mlflow/registered-models/alias", name=NAME, alias=PRODUCTION_ALIAS
        ),
        "delete version": client.delete("/api/2.0/mlflow/model-versions/delete", name=NAME, version="2"),
        "delete model": client.delete("/api/2.0/mlflow/registered-models/delete", name=NAME),
    }
    assert {k: r.status_code for k, r in forbidden_to_all.items()} == dict.fromkeys(forbidden_to_all, 403)


def test_serving_reads_the_model_and_cannot_change_what_is_served(auth_stack):
    serving = auth_stack.as_(policy.SERVING)
    refused = {
        "move stage": serving.post(
            "/api/2.0/mlflow/model-versions/transition-stage",
            name=NAME,
            version="2",
            stage=PRODUCTION_STAGE,
            archive_existing_versions=True,
        ),
        "set version tag": serving.post(
            "/api/2.0/mlflow/model-versions/set-tag",
            name=NAME,
            version="1",
            key="promotion.source",
            value="x",
        ),
        "set alias": serving.post(
            "/api/2.0/mlflow/registered-models/alias", name=NAME, alias=PRODUCTION_ALIAS, version="2"
        ),
        "new version": serving.post(
            "/api/2.0/mlflow/model-versions/create",
            name=NAME,
            source=f"runs:/{auth_stack.training_run}/model",
        ),
        "rename model": serving.post("/api/2.0/mlflow/registered-models/rename", name=NAME, new_name="x"),
        "overwrite a model file": serving.put_artifact(
            auth_stack.artifact(policy.TRAINING, auth_stack.training_run, HELD_OUT_ARTIFACT), b"x"
        ),
    }
    assert {k: r.status_code for k, r in refused.items()} == dict.fromkeys(refused, 403)
    loaded = python_as(
        auth_stack.credentials_dir,
        policy.SERVING,
        auth_stack.uri,
        "from model import scoring; from model.identity import PRODUCTION_MODEL_URI\n"
        "m = scoring.load(PRODUCTION_MODEL_URI)\n"
        "p, q = m.score_frame(m.pyfunc.input_example)\n"
        "print('scored', len(q), m.pyfunc.metadata.run_id)",
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split()[:2] == ["scored", "5"]


def test_trainer_trained_registered_and_promoted_through_the_gate(auth_stack):
    version = _ok(
        auth_stack.as_(policy.TRAINER).get("/api/2.0/mlflow/model-versions/get", name=NAME, version="1"), "v1"
    )
    tags = {t["key"]: t["value"] for t in version["model_version"]["tags"]}
    assert tags["promotion.source"] == "gate" and tags["promotion.seq"] == "1"


def test_trainer_cannot_write_to_the_inference_experiment(auth_stack):
    trainer = auth_stack.as_(policy.TRAINER)
    record = auth_stack.artifact(policy.INFERENCE, auth_stack.record_run, "records/batch-1.csv")
    refused = {
        "create run": trainer.post(
            "/api/2.0/mlflow/runs/create", experiment_id=auth_stack.experiments[policy.INFERENCE]
        ),
        "log to a record run": trainer.post(
            "/api/2.0/mlflow/runs/log-batch",
            run_id=auth_stack.record_run,
            metrics=[{"key": "x", "value": 1, "timestamp": 0, "step": 0}],
        ),
        "tag a record run": trainer.post(
            "/api/2.0/mlflow/runs/set-tag", run_id=auth_stack.record_run, key="x", value="y"
        ),
        "overwrite a record file": trainer.put_artifact(record, b"forged"),
        "add a record file": trainer.put_artifact(
            auth_stack.artifact(policy.INFERENCE, auth_stack.record_run, "records/forged.csv"), b"forged"
        ),
        "delete a record file": trainer.request("DELETE", f"/api/2.0/mlflow-artifacts/artifacts/{record}"),
    }
    assert {k: r.status_code for k, r in refused.items()} == dict.fromkeys(refused, 403)
    # It reads them (the healing loop trains on them), and they are as the sidecar wrote them.
    assert trainer.get_artifact(record).content == RECORD


def test_sidecar_ships_records_and_cannot_touch_the_registry(auth_stack):
    sidecar = auth_stack.as_(policy.SIDECAR)
    refused = {
        "read model": sidecar.get("/api/2.0/mlflow/registered-models/get", name=NAME),
        "new version": sidecar.post(
            "/api/2.0/mlflow/model-versions/create", name=NAME, source=f"runs:/{auth_stack.record_run}/x"
        ),
        "set version tag": sidecar.post(
            "/api/2.0/mlflow/model-versions/set-tag", name=NAME, version="1", key="k", value="v"
        ),
        "move stage": sidecar.post(
            "/api/2.0/mlflow/model-versions/transition-stage", name=NAME, version="2", stage=PRODUCTION_STAGE
        ),
        "set alias": sidecar.post(
            "/api/2.0/mlflow/registered-models/alias", name=NAME, alias=PRODUCTION_ALIAS, version="2"
        ),
        "create another model": sidecar.post(
            "/api/2.0/mlflow/registered-models/create", name="sidecar-model"
        ),
        "create a prompt": sidecar.post(
            "/api/2.0/mlflow/registered-models/create",
            name="sidecar-prompt",
            tags=[{"key": "mlflow.prompt.is_prompt", "value": "true"}],
        ),
        "search versions": sidecar.get("/api/2.0/mlflow/model-versions/search", filter=f"name='{NAME}'"),
        "read the training run": sidecar.get("/api/2.0/mlflow/runs/get", run_id=auth_stack.training_run),
        "write to training": sidecar.post(
            "/api/2.0/mlflow/runs/create", experiment_id=auth_stack.experiments[policy.TRAINING]
        ),
        "delete the training run": sidecar.post(
            "/api/2.0/mlflow/runs/delete", run_id=auth_stack.training_run
        ),
        "delete a training file": sidecar.request(
            "DELETE",
            f"/api/2.0/mlflow-artifacts/artifacts/{auth_stack.experiments[policy.TRAINING]}/"
            f"{auth_stack.training_run}/artifacts",
        ),
        "delete the inference experiment": sidecar.post(
            "/api/2.0/mlflow/experiments/delete", experiment_id=auth_stack.experiments[policy.INFERENCE]
        ),
    }
    statuses = {k: r.status_code for k, r in refused.items()}
    # Searching versions is filtered rather than refused: the answer is empty.
    assert (
        statuses.pop("search versions") == 200
        and refused["search versions"].json().get("model_versions", []) == []
    )
    assert statuses == dict.fromkeys(statuses, 403)
    run_id = _log_run_with_artifact(
        sidecar, auth_stack.experiments[policy.INFERENCE], "records/batch-2.csv", RECORD
    )
    back = sidecar.get_artifact(auth_stack.artifact(policy.INFERENCE, run_id, "records/batch-2.csv"))
    assert (back.status_code, back.content) == (200, RECORD)
    # Retention (logging_sidecar.retention): it deletes a record run's files, then the run.
    deleted = sidecar.request(
        "DELETE",
        f"/api/2.0/mlflow-artifacts/artifacts/{auth_stack.artifact(policy.INFERENCE, run_id, 'records')}",
    )
    assert deleted.status_code == 200, deleted.text
    assert (
        sidecar.get_artifact(auth_stack.artifact(policy.INFERENCE, run_id, "records/batch-2.csv")).status_code
        != 200
    )
    _ok(sidecar.post("/api/2.0/mlflow/runs/delete", run_id=run_id), "delete the record run")


def test_sidecar_through_mlflows_own_client(auth_stack):
    """The calls ``logging_sidecar.shipper`` makes, with MLflow's client and the sidecar's file."""
    shipped = python_as(
        auth_stack.credentials_dir,
        policy.SIDECAR,
        auth_stack.uri,
        "import tempfile, pathlib\n"
        "from mlflow.tracking import MlflowClient\n"
        "from mlflow.exceptions import MlflowException\n"
        "c = MlflowClient()\n"
        f"e = c.get_experiment_by_name({policy.Names().inference!r}).experiment_id\n"
        "r = c.create_run(e).info.run_id\n"
        "d = pathlib.Path(tempfile.mkdtemp()); (d / 'b.csv').write_text('x')\n"
        "c.log_artifact(r, str(d / 'b.csv'), 'records'); c.log_metric(r, 'rows', 1); c.set_terminated(r)\n"
        "print('listed', [f.path for f in c.list_artifacts(r, 'records')])\n"
        "try:\n"
        f"    c.set_registered_model_alias({NAME!r}, 'production', '2')\n"
        "except MlflowException as error:\n"
        "    print('refused', error.get_http_status_code())\n",
    )
    assert shipped.returncode == 0, shipped.stderr[-3000:]
    assert "listed ['records/b.csv']" in shipped.stdout and "refused 403" in shipped.stdout


def test_monitor_reads_records_and_outcomes_and_writes_monitoring_runs_only(auth_stack):
    monitor = auth_stack.as_(policy.MONITOR)
    record = monitor.get_artifact(
        auth_stack.artifact(policy.INFERENCE, auth_stack.record_run, "records/batch-1.csv")
    )
    outcome = monitor.get_artifact(
        auth_stack.artifact(policy.OUTCOMES, auth_stack.outcome_run, "outcomes/file-1.csv")
    )
    assert (record.content, outcome.content) == (RECORD, OUTCOME)
    reference = monitor.get(
        "/api/2.0/mlflow/artifacts/list", run_id=auth_stack.training_run, path="reference"
    )
    assert [f["path"] for f in _ok(reference, "list reference")["files"]] == [
        "reference/training_sample.parquet"
    ]
    production = _ok(
        monitor.post(
            "/api/2.0/mlflow/registered-models/get-latest-versions", name=NAME, stages=[PRODUCTION_STAGE]
        ),
        "latest",
    )
    assert production["model_versions"][0]["run_id"] == auth_stack.training_run
    _log_run_with_artifact(monitor, auth_stack.experiments[policy.MONITORING], "report/drift.json", b"{}")
    refused = {
        f"write to {role}": monitor.post(
            "/api/2.0/mlflow/runs/create", experiment_id=auth_stack.experiments[role]
        )
        for role in (policy.INFERENCE, policy.OUTCOMES, policy.TRAINING)
    }
    refused["overwrite a record"] = monitor.put_artifact(
        auth_stack.artifact(policy.INFERENCE, auth_stack.record_run, "records/batch-1.csv"), b"x"
    )
    refused["move stage"] = monitor.post(
        "/api/2.0/mlflow/model-versions/transition-stage", name=NAME, version="2", stage=PRODUCTION_STAGE
    )
    refused["set alias"] = monitor.post(
        "/api/2.0/mlflow/registered-models/alias", name=NAME, alias="x", version="2"
    )
    assert {k: r.status_code for k, r in refused.items()} == dict.fromkeys(refused, 403)


def test_operator_promotes_rolls_back_and_writes_only_outcomes(auth_stack):
    def credit_risk_as_operator(*args):
        return subprocess.run(
            [str(BIN / "credit-risk"), *args],
            env=identity_env(auth_stack.credentials_dir, policy.OPERATOR, auth_stack.uri),
            capture_output=True,
            text=True,
            timeout=600,
        )

    promoted = credit_risk_as_operator("promote", "--version", "2", "--reason", "auth test")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    status = credit_risk_as_operator("status", "--json", "--server", NOBODY_URL)
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["production"]["version"] == "2"
    rolled = credit_risk_as_operator("rollback", "--reason", "auth test")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    client = auth_stack.as_(policy.OPERATOR)
    model = _ok(client.get("/api/2.0/mlflow/registered-models/get", name=NAME), "model")["registered_model"]
    assert {a["alias"]: a["version"] for a in model.get("aliases", [])}[PRODUCTION_ALIAS] == "1"
    refused = {
        "write to training": client.post(
            "/api/2.0/mlflow/runs/create", experiment_id=auth_stack.experiments[policy.TRAINING]
        ),
        "write to inference": client.post(
            "/api/2.0/mlflow/runs/create", experiment_id=auth_stack.experiments[policy.INFERENCE]
        ),
        "read inference": client.get(
            "/api/2.0/mlflow/experiments/get", experiment_id=auth_stack.experiments[policy.INFERENCE]
        ),
        "overwrite a model file": client.put_artifact(
            auth_stack.artifact(policy.TRAINING, auth_stack.training_run, HELD_OUT_ARTIFACT), b"x"
        ),
    }
    assert {k: r.status_code for k, r in refused.items()} == dict.fromkeys(refused, 403)
    # EDIT on the model includes registering versions from any run the operator can read: which
    # is why a version's integrity record is anchored in the training experiment, not the registry.
    version = _ok(client.get("/api/2.0/mlflow/model-versions/get", name=NAME, version="1"), "v1")[
        "model_version"
    ]
    lineage = {"run_id": version["run_id"], "model_id": version["source"].removeprefix("models:/")}
    _ok(
        client.post("/api/2.0/mlflow/model-versions/create", name=NAME, source=version["source"], **lineage),
        "v3",
    )


def test_only_admin_sidecar_and_named_readers_read_the_inference_records(auth_stack):
    experiment_id = auth_stack.experiments[policy.INFERENCE]
    record = auth_stack.artifact(policy.INFERENCE, auth_stack.record_run, "records/batch-1.csv")
    readers = set()
    for identity in policy.IDENTITIES:
        client = auth_stack.as_(identity)
        runs = _ok(client.post("/api/2.0/mlflow/runs/search", experiment_ids=[experiment_id]), identity).get(
            "runs", []
        )
        checks = {
            client.get("/api/2.0/mlflow/experiments/get", experiment_id=experiment_id).status_code,
            client.get("/api/2.0/mlflow/runs/get", run_id=auth_stack.record_run).status_code,
            client.get_artifact(record).status_code,
            client.get(
                "/api/2.0/mlflow-artifacts/artifacts",
                path=f"{experiment_id}/{auth_stack.record_run}/artifacts/records",
            ).status_code,
        }
        assert checks in ({200}, {403}), (identity, checks)
        assert bool(runs) == (checks == {200}), identity  # a search is filtered, not refused
        if checks == {200}:
            readers.add(identity)
    assert readers == set(policy.readers_of(policy.INFERENCE)) == {"admin", "trainer", "sidecar", "monitor"}


# --- Integrity on a real version -------------------------------------------------------------


def _download_as_serving_would(auth_stack, version: str, destination: Path, monkeypatch) -> Path:
    """The version's files from their storage location (not ``models:/``, whose client adds a
    file of its own) and its run's held-out rows, in ``model.integrity``'s layout."""
    serving = auth_stack.credentials(policy.SERVING)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", serving.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", serving.password)
    client = MlflowClient(auth_stack.uri)
    source = client.get_model_version_download_uri(NAME, version)
    run_id = client.get_model_version(NAME, version).run_id
    # download_artifacts returns the local copy of the folder, named as in the store.
    staging = destination / ".download"
    staging.mkdir(parents=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(staging), tracking_uri=auth_stack.uri
    )
    Path(local).rename(destination / MODEL_DIR)
    staging.rmdir()
    mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path=HELD_OUT_ARTIFACT,
        dst_path=str(destination / RUN_DIR / Path(HELD_OUT_ARTIFACT).parent),
        tracking_uri=auth_stack.uri,
    )
    return destination


def test_downloaded_version_verifies_loads_and_answers_as_trained(auth_stack, tmp_path, monkeypatch):
    folder = _download_as_serving_would(auth_stack, "1", tmp_path / "v1", monkeypatch)
    manifest = build_manifest(folder)
    paths = set(manifest.files)
    assert {
        f"{MODEL_DIR}/MLmodel",
        f"{MODEL_DIR}/python_model.pkl",
        f"{RUN_DIR}/{HELD_OUT_ARTIFACT}",
    } <= paths
    assert f"{MODEL_DIR}/artifacts/pipeline.joblib" in paths and f"{MODEL_DIR}/code/model/pyfunc.py" in paths
    assert not any(p.endswith("registered_model_meta") for p in paths)
    verify(folder, manifest)
    # Loaded from the verified folder alone, it answers its held-out rows as training did.
    loaded = scoring.load(str(folder / MODEL_DIR))
    held_out = pd.read_parquet(folder / RUN_DIR / HELD_OUT_ARTIFACT)
    _, probability = loaded.score_frame(held_out[list(FEATURES)])
    assert np.array_equal(probability, held_out["probability"].to_numpy())


def test_downloaded_version_tampered_missing_or_extra_is_named(auth_stack, tmp_path, monkeypatch):
    folder = _download_as_serving_would(auth_stack, "1", tmp_path / "v1", monkeypatch)
    manifest = build_manifest(folder)
    cases = {
        "tampered": (f"{MODEL_DIR}/python_model.pkl", "content differs"),
        "missing": (f"{RUN_DIR}/{HELD_OUT_ARTIFACT}", "missing"),
        "extra": (f"{MODEL_DIR}/code/model/sitecustomize.py", "extra"),
    }
    for case, (path, problem) in cases.items():
        copy = tmp_path / case
        shutil.copytree(folder, copy)
        target = copy / path
        if case == "tampered":
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0xFF
            target.write_bytes(bytes(data))
        elif case == "missing":
            target.unlink()
        else:
            target.write_text("import os\n")
        with pytest.raises(IntegrityError) as raised:
            verify(copy, manifest)
        assert (raised.value.path, raised.value.problem) == (path, problem), case


def test_a_models_uri_download_carries_a_file_of_the_clients_own(auth_stack, tmp_path, monkeypatch):
    """Why serving must download the version's storage location: MLflow's client writes
    ``registered_model_meta`` into every ``models:/`` download, which a manifest of the stored
    files rightly calls extra."""
    folder = _download_as_serving_would(auth_stack, "1", tmp_path / "v1", monkeypatch)
    manifest = build_manifest(folder)
    via_models_uri = tmp_path / "via-models-uri"
    shutil.copytree(folder, via_models_uri)
    shutil.rmtree(via_models_uri / MODEL_DIR)
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_stack.uri)  # models:/ is resolved in the default registry
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{NAME}/1", dst_path=str(staging), tracking_uri=auth_stack.uri
    )
    Path(local).rename(via_models_uri / MODEL_DIR)
    with pytest.raises(IntegrityError) as raised:
        verify(via_models_uri, manifest)
    assert (raised.value.path, raised.value.problem) == (f"{MODEL_DIR}/registered_model_meta", "extra")


# --- Errors and repairs (these run last: they change the server behind provisioning's back) ---


def test_provisioning_errors_are_one_line(auth_stack, tmp_path):
    nowhere = NOBODY_URL
    with pytest.raises(ProvisioningError, match=f"tracking server at {nowhere} did not answer"):
        provision(nowhere, auth_stack.credentials_dir, environ={})
    wrong = tmp_path / "auth"
    wrong.mkdir()
    identity_file(wrong, "admin").write_text(Credentials("admin", "a-wrong-admin-password").env_text())
    with pytest.raises(ProvisioningError) as raised:
        provision(auth_stack.uri, wrong, environ={})
    assert "refused the admin password" in str(raised.value) and "\n" not in str(raised.value)
    assert "a-wrong-admin-password" not in str(raised.value)


def test_provisioning_a_server_without_auth_says_so(tmp_path):
    with (
        mlflow_tracking_server(tmp_path) as uri,
        pytest.raises(ProvisioningError, match="--app-name basic-auth"),
    ):
        provision(uri, tmp_path / "auth", environ={})


def test_stray_grants_roles_admin_flags_and_passwords_are_put_back(auth_stack):
    admin = auth_stack.as_(policy.ADMIN)
    experiments = auth_stack.experiments
    other = _ok(admin.post("/api/2.0/mlflow/experiments/create", name="someone-elses"), "create")[
        "experiment_id"
    ]

    def grant(username, resource_type, resource_id, permission):
        body = {
            "username": username,
            "resource_type": resource_type,
            "resource_id": resource_id,
            "permission": permission,
        }
        _ok(admin.post("/api/3.0/mlflow/users/permissions/grant", **body), f"grant {body}")

    grant(policy.TRAINER, policy.EXPERIMENT, experiments[policy.MONITORING], "READ")  # not in the table
    grant(policy.MONITOR, "run", "*", "EDIT")  # a sub-resource tier: reaches every experiment's runs
    grant(policy.OPERATOR, policy.EXPERIMENT, other, "READ")  # not ours: left in place, reported
    rows = _ok(admin.get("/api/3.0/mlflow/users/permissions/list", username=policy.SERVING), "list")[
        "permissions"
    ]
    serving_role = rows[0]["role_id"]
    role_permissions = _ok(admin.get("/api/3.0/mlflow/roles/permissions/list", role_id=serving_role), "rp")
    on_model = next(
        p for p in role_permissions["role_permissions"] if p["resource_type"] == policy.REGISTERED_MODEL
    )
    _ok(
        admin.request(
            "PATCH",
            "/api/3.0/mlflow/roles/permissions/update",
            json={"role_permission_id": on_model["id"], "permission": "MANAGE"},
        ),
        "raise",
    )
    role = _ok(
        admin.post("/api/3.0/mlflow/roles/create", name="everything-reader", workspace="default"), "role"
    )["role"]
    _ok(
        admin.post(
            "/api/3.0/mlflow/roles/permissions/add",
            role_id=role["id"],
            resource_type="experiment",
            resource_pattern="*",
            permission="READ",
        ),
        "add",
    )
    _ok(admin.post("/api/3.0/mlflow/roles/assign", username=policy.SIDECAR, role_id=role["id"]), "assign")
    _ok(
        admin.request(
            "PATCH", "/api/2.0/mlflow/users/update-admin", json={"username": policy.MONITOR, "is_admin": True}
        ),
        "admin flag",
    )
    _ok(
        admin.request(
            "PATCH",
            "/api/2.0/mlflow/users/update-password",
            json={"username": policy.TRAINER, "password": "changed-behind-our-back"},
        ),
        "pw",
    )
    assert (
        auth_stack.as_(policy.SIDECAR)
        .get("/api/2.0/mlflow/experiments/get", experiment_id=experiments[policy.TRAINING])
        .status_code
        == 200
    )

    report = provision(auth_stack.uri, auth_stack.credentials_dir, environ={})
    names = policy.Names()
    expected = {
        f"trainer: READ on experiment {names.monitoring!r} ({experiments[policy.MONITORING]}) removed",
        "serving: MANAGE on registered_model 'credit-risk-model' changed to READ",
        "sidecar: role 'everything-reader' unassigned (it grants READ on every experiment)",
        "monitor: was an MLflow admin, no longer",
        "monitor: EDIT on every run removed",
    }
    # Reported when the server refused the file's password, which a worker's credential cache
    # may hide for up to a minute; set again either way, which the last checks prove.
    password_line = "trainer: password set to the one in its credentials file (the server had another)"
    assert set(report.changes) - {password_line} == expected, report.changes
    assert (
        f"operator: holds READ on experiment '{other}' ({other}), not this stack's; left in place"
        in report.notes
    )
    _assert_grants_are_the_tables(auth_stack, elsewhere={(policy.OPERATOR, policy.EXPERIMENT, other, "READ")})
    sidecar = auth_stack.as_(policy.SIDECAR)
    assert (
        sidecar.get("/api/2.0/mlflow/experiments/get", experiment_id=experiments[policy.TRAINING]).status_code
        == 403
    )
    assert auth_stack.as_(policy.TRAINER).get("/api/2.0/mlflow/users/current").status_code == 200
    behind_our_back = As(auth_stack.uri, Credentials(policy.TRAINER, "changed-behind-our-back"))
    assert behind_our_back.get("/api/2.0/mlflow/users/current").status_code == 401
    assert (
        auth_stack.as_(policy.MONITOR).get("/api/2.0/mlflow/users/current").json()["user"]["is_admin"]
        is False
    )
    assert provision(auth_stack.uri, auth_stack.credentials_dir, environ={}).changes == []


def test_admin_password_follows_the_environment(auth_stack):
    old = auth_stack.credentials(policy.ADMIN)
    new = "a-new-admin-password-from-the-environment"
    report = provision(auth_stack.uri, auth_stack.credentials_dir, environ={ADMIN_PASSWORD_VARIABLE: new})
    assert report.changes == ["admin: password changed to CREDIT_RISK_ADMIN_PASSWORD's"]
    assert auth_stack.credentials(policy.ADMIN) == Credentials("admin", new)
    assert (
        As(auth_stack.uri, Credentials("admin", new)).get("/api/2.0/mlflow/users/current").status_code == 200
    )
    # The old password is refused once the workers' credential caches forget it (60 s at most).
    assert provision(auth_stack.uri, auth_stack.credentials_dir, environ={}).changes == []
    assert old.password != new


def test_per_identity_folders_hold_the_same_identities(auth_stack, tmp_path):
    """The layout compose and Kubernetes mount (one volume or Secret per identity) provisions
    the same users: the same passwords in other places change nothing."""
    nested = tmp_path / "auth"
    nested.mkdir()
    shutil.copy2(identity_file(auth_stack.credentials_dir, policy.ADMIN), nested / "admin.env")
    for identity in policy.SERVICE_IDENTITIES:
        (nested / identity).mkdir()
        shutil.copy2(
            identity_file(auth_stack.credentials_dir, identity), nested / identity / f"{identity}.env"
        )
    report = provision(auth_stack.uri, nested, environ={}, per_identity_folders=True)
    assert report.changes == []
    assert sorted(p.name for p in nested.iterdir()) == sorted(["admin.env", *policy.SERVICE_IDENTITIES])


def test_editors_of_the_model_may_rename_it(auth_stack):
    """MLflow 3.17 checks a rename as an update: EDIT on the registered model allows it (and
    moves every grant to the new name). Said in the table's notes; renamed back here."""
    trainer, admin = auth_stack.as_(policy.TRAINER), auth_stack.as_(policy.ADMIN)
    _ok(
        trainer.post("/api/2.0/mlflow/registered-models/rename", name=NAME, new_name=f"{NAME}-renamed"),
        "rename",
    )
    try:
        serving = auth_stack.as_(policy.SERVING)
        # serving's grant moved with the name: it reads the renamed model, and nothing answers at
        # the old name (403 rather than 404: MLflow does not say what exists to those without a grant).
        assert serving.get("/api/2.0/mlflow/registered-models/get", name=f"{NAME}-renamed").status_code == 200
        assert serving.get("/api/2.0/mlflow/registered-models/get", name=NAME).status_code == 403
    finally:
        _ok(
            admin.post("/api/2.0/mlflow/registered-models/rename", name=f"{NAME}-renamed", new_name=NAME),
            "back",
        )
    _assert_grants_are_the_tables(
        auth_stack, elsewhere={(policy.OPERATOR, policy.EXPERIMENT, _someone_elses(auth_stack), "READ")}
    )


def _someone_elses(auth_stack) -> str:
    found = auth_stack.as_(policy.ADMIN).get(
        "/api/2.0/mlflow/experiments/get-by-name", experiment_name="someone-elses"
    )
    return found.json()["experiment"]["experiment_id"] if found.status_code == 200 else "none"


def test_any_identity_may_create_experiments_and_all_but_the_sidecar_models(auth_stack):
    """With workspaces off (this stack), MLflow 3.17 lets every authenticated user create
    experiments and registered models, and makes it their MANAGE owner; only a wildcard DENY
    refuses it, which would also override every grant of the type. None of this reaches the
    stack's resources; provisioning reports such grants and leaves them."""
    for identity in policy.SERVICE_IDENTITIES:
        client = auth_stack.as_(identity)
        experiment = client.post("/api/2.0/mlflow/experiments/create", name=f"made-by-{identity}")
        model = client.post("/api/2.0/mlflow/registered-models/create", name=f"made-by-{identity}")
        assert experiment.status_code == 200, identity
        assert model.status_code == (403 if identity == policy.SIDECAR else 200), identity
    notes = provision(auth_stack.uri, auth_stack.credentials_dir, environ={}).notes
    assert (
        "serving: holds MANAGE on registered_model 'made-by-serving', not this stack's; left in place"
        in notes
    )
    assert any(n.startswith("sidecar: holds MANAGE on experiment") for n in notes)


def test_a_deleted_experiment_is_restored_by_provisioning(auth_stack):
    """Deleting or restoring an experiment needs MANAGE: only the admin, so the sidecar can no
    longer restore the inference experiment itself; provisioning does."""
    admin, sidecar = auth_stack.as_(policy.ADMIN), auth_stack.as_(policy.SIDECAR)
    experiment_id = auth_stack.experiments[policy.INFERENCE]
    _ok(admin.post("/api/2.0/mlflow/experiments/delete", experiment_id=experiment_id), "delete")
    assert sidecar.post("/api/2.0/mlflow/experiments/restore", experiment_id=experiment_id).status_code == 403
    report = provision(auth_stack.uri, auth_stack.credentials_dir, environ={})
    name = policy.Names().inference
    assert report.changes == [f"experiment {name!r}: restored ({experiment_id}), it had been deleted"]
    _ok(sidecar.post("/api/2.0/mlflow/runs/create", experiment_id=experiment_id), "ship again")
