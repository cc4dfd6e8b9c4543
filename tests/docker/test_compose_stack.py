"""`docker compose up` for real: build, health in order, inference, records, restarts, with
MLflow's runs and registry in the `db` service's PostgreSQL, a generated database password
that no `docker inspect` shows, the hardening each container claims, and MLflow's basic-auth
on by default: anonymous requests refused, each identity only its grants, the admin password
taken from CREDIT_RISK_ADMIN_PASSWORD; the monitor service, acting as `monitor`, computes
windows over the shipped records and exports them on its published port.

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
from logging_sidecar.settings import DEFAULT_PORT as SIDECAR_PORT
from model.identity import REGISTERED_MODEL_NAME
from serving.settings import DEFAULT_HTTP_PORT, MODEL_NAME, SERVING_DIR
from tests.helpers import REPO, free_port

pytestmark = pytest.mark.docker

LONG_RUNNING = ("db", "mlflow", "serving", "sidecar", "monitor")
ONE_SHOT = ("credentials", "provision", "trainer")
CLIENT_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "CREDIT_RISK_CREDENTIALS_FILE")


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
            for name in (
                "MLFLOW_PORT",
                "MLSERVER_HTTP_PORT",
                "MLSERVER_GRPC_PORT",
                "MLSERVER_METRICS_PORT",
                "MONITOR_PORT",
            )
        }
        # Characters a URI or configparser would need escaped: the password travels only as
        # files. The database password is left to be generated (`db_password` reads it).
        self.password_marker = uuid.uuid4().hex
        self.admin_password = f"{self.password_marker}:@/\\%"
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in CLIENT_VARIABLES},
            **{k: str(v) for k, v in self.ports.items()},
            "CREDIT_RISK_IMAGE_TAG": f"test-{suffix}",
            "CREDIT_RISK_FLUSH_INTERVAL_S": "2",
            # A window every 10 s, so that one sees the records this test sends.
            "CREDIT_RISK_MONITOR_EVERY": "10s",
            "CREDIT_RISK_ADMIN_PASSWORD": self.admin_password,
        }
        self.images = [f"credit-risk-{kind}:test-{suffix}" for kind in ("train", "serve")]
        self.mlflow_url = f"http://127.0.0.1:{self.ports['MLFLOW_PORT']}"
        self.infer_url = f"http://127.0.0.1:{self.ports['MLSERVER_HTTP_PORT']}/v2/models/{MODEL_NAME}/infer"
        self.monitor_url = f"http://127.0.0.1:{self.ports['MONITOR_PORT']}"

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
        for service in ONE_SHOT:
            assert by_service[service]["ExitCode"] == 0, by_service[service]
        assert not any(p.get("PublishedPort") for p in by_service["db"].get("Publishers") or []), by_service[
            "db"
        ]

    def sql(self, query: str) -> list[list[str]]:
        """Rows of ``query`` run in MLflow's database, inside the ``db`` container."""
        out = self.run("exec", "-T", "db", "psql", "--username=mlflow", "--dbname=mlflow",
                       "--no-align", "--tuples-only", "--field-separator=|", "--command", query).stdout  # fmt: skip
        return [line.split("|") for line in out.splitlines() if line]

    def active_run_ids(self) -> set[str]:
        """Ids of the active runs in PostgreSQL, where MLflow must keep them."""
        return {row[0] for row in self.sql("SELECT run_uuid FROM runs WHERE lifecycle_stage = 'active'")}

    def tracked_run_ids(self) -> set[str]:
        """Ids of the active runs the tracking server answers with, in every experiment."""
        client = self.client()
        experiments = [e.experiment_id for e in client.search_experiments()]
        return {run.info.run_id for run in client.search_runs(experiments, max_results=50_000)}

    def infer(self, request_id: str) -> dict:
        body = json.loads((SERVING_DIR / "example-request.json").read_text())
        body["id"] = request_id
        response = httpx.post(self.infer_url, json=body, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def client(self) -> MlflowClient:
        """A client acting as admin (the fixture puts admin's credentials in this process)."""
        return MlflowClient(self.mlflow_url)

    def credentials(self, service: str, identity: str) -> tuple[str, str]:
        """The identity's generated credentials, read as the compose header says."""
        text = self.run("exec", "-T", service, "cat", f"/run/credit-risk/auth/{identity}.env").stdout
        values = dict(line.split("=", 1) for line in text.splitlines() if line)
        assert values["MLFLOW_TRACKING_USERNAME"] == identity, text
        return identity, values["MLFLOW_TRACKING_PASSWORD"]

    def db_password(self) -> str:
        return self.run(
            "run",
            "--rm",
            "--no-deps",
            "--no-TTY",
            "credentials",
            "cat",
            "/run/credit-risk/credentials/.db-password",
        ).stdout

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
    if not _docker_usable():  # a failure under CI (tests/conftest.py)
        pytest.skip("no usable Docker engine with Compose v2")
    stack = Compose()
    saved = {name: os.environ.pop(name, None) for name in CLIENT_VARIABLES}
    # MLflow's client in this process acts as admin, with CREDIT_RISK_ADMIN_PASSWORD's password.
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = (
        "admin",
        stack.admin_password,
    )
    try:
        stack.run("build", timeout=1800)
        yield stack
    finally:
        stack.cleanup()
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _check_auth(compose: Compose) -> None:
    """Anonymous requests get 401; serving's credentials read the registry but get 403 on a
    stage, tag or alias change; the sidecar's cannot touch the registry either."""
    api = f"{compose.mlflow_url}/api/2.0/mlflow"
    assert httpx.get(f"{api}/experiments/search", params={"max_results": 1}).status_code == 401
    assert httpx.post(f"{api}/registered-models/create", json={"name": "anonymous"}).status_code == 401
    version = {"name": REGISTERED_MODEL_NAME, "version": "1"}
    changes = [
        (
            "model-versions/transition-stage",
            {**version, "stage": "Archived", "archive_existing_versions": False},
        ),
        ("model-versions/set-tag", {**version, "key": "promotion.forged", "value": "1"}),
        ("registered-models/alias", {"name": REGISTERED_MODEL_NAME, "alias": "forged", "version": "1"}),
    ]
    serving = compose.credentials("serving", "serving")
    read = httpx.get(f"{api}/model-versions/get", params=version, auth=serving)
    assert read.status_code == 200, read.text
    sidecar = compose.credentials("sidecar", "sidecar")
    monitor = compose.credentials("monitor", "monitor")
    read = httpx.get(f"{api}/model-versions/get", params=version, auth=monitor)
    assert read.status_code == 200, read.text
    for path, body in changes:
        for identity in (serving, sidecar, monitor):
            answer = httpx.post(f"{api}/{path}", json=body, auth=identity)
            assert answer.status_code == 403, (identity[0], path, answer.status_code, answer.text)
    assert compose.client().get_model_version(REGISTERED_MODEL_NAME, "1").current_stage == "Production"


def _monitor_window(compose: Compose, rows: int, timeout=300) -> dict:
    """The monitor's /health once its last window holds ``rows`` records (of version 1): the
    window was computed, its run logged, by the service acting as `monitor`."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{compose.monitor_url}/health", timeout=10)
        assert health.status_code == 200, health.text
        body = health.json()
        window = body["last_window"]
        if window is not None and window["rows"] == rows and not window["stale"]:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(2)


def _check_monitor(compose: Compose, records) -> None:
    """The monitor reached MLflow as `monitor` (its log says so, and the grants it needs are
    the monitor's: a 401 or 403 would be its last error), its last window counts exactly the
    records shipped so far, its run is in the monitoring experiment, and /metrics exports the
    window and the process gauges."""
    rows = int((records["model_version"] == "1").sum())
    assert rows == len(records)
    health = _monitor_window(compose, rows)
    assert health["mlflow"]["reachable"] is True and health["last_error"] is None, health
    window = health["last_window"]
    assert window["model_version"] == "1", window
    run = compose.client().get_run(window["monitoring_run_id"])
    assert compose.client().get_experiment(run.info.experiment_id).name == "credit-risk-monitoring"
    log = compose.run("logs", "--no-color", "monitor").stdout
    assert "as monitor (/run/credit-risk/auth/monitor.env)" in log, log[-3000:]
    # MLflow's client says "failed with error code 401 != 200" (403) when it is refused.
    assert "error code 401" not in log and "error code 403" not in log, log[-3000:]
    metrics = httpx.get(f"{compose.monitor_url}/metrics", timeout=10).text
    labels = f'model="{MODEL_NAME}"'
    assert f"credit_risk_monitor_mlflow_up{{{labels}}} 1.0" in metrics, metrics
    assert f"credit_risk_monitor_last_error{{{labels}}} 0.0" in metrics, metrics
    assert f"credit_risk_monitor_last_success_timestamp_seconds{{{labels}}}" in metrics, metrics
    assert f"credit_risk_monitor_interval_seconds{{{labels}}} 10.0" in metrics, metrics
    assert f'credit_risk_window_rows{{{labels},version="1"}} {float(rows)}' in metrics, metrics


def test_fresh_up_restart_and_down_up_keep_everything(compose):
    compose.up()
    _check_auth(compose)
    versions = compose.client().search_model_versions(f"name='{REGISTERED_MODEL_NAME}'")
    assert [(v.version, v.current_stage) for v in versions] == [("1", "Production")]
    runs_before = compose.tracked_run_ids()

    first = {f"docker-{uuid.uuid4().hex}" for _ in range(12)}
    for request_id in first:
        answer = compose.infer(request_id)
        assert answer["model_version"] == "1" and answer["id"] == request_id
    records = compose.wait_for_records(first)
    assert len(records) == 2 * len(first)  # the example request has two rows, each once
    _check_monitor(compose, records)
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
        _check_auth(compose)  # provisioned again (exit 0, checked by up), still closed
        versions = compose.client().search_model_versions(f"name='{REGISTERED_MODEL_NAME}'")
        assert [(v.version, v.current_stage) for v in versions] == [("1", "Production")], how
        # The monitor logs a run per window while this reads, so the tracking server's view is
        # bracketed by two reads of PostgreSQL rather than compared with one.
        in_db_before = compose.active_run_ids()
        seen = compose.tracked_run_ids()
        in_db_after = compose.active_run_ids()
        assert runs_before <= seen, (how, runs_before - seen)  # none lost
        assert in_db_before <= seen <= in_db_after, (how, in_db_before ^ seen, seen ^ in_db_after)
        more = {f"docker-{uuid.uuid4().hex}" for _ in range(3)}
        for request_id in more:
            compose.infer(request_id)
        first |= more
        records = compose.wait_for_records(first)
        assert len(records) == 2 * len(first), how  # nothing lost, nothing twice
        _check_monitor(compose, records)  # back after the outage, the new records counted


def test_no_container_shows_a_password(compose):
    """Every container of the running stack, the one-shot ones included: neither the generated
    database password nor the admin's is in any `docker inspect` (environment, command, labels,
    mounts); each runs as compose claims (read-only root, no capabilities, no privilege gain,
    its memory limit); the password files belong to their one reader, and each client service
    sees only its own identity's; and the database takes that password, and only that one."""
    compose.up()
    db_password = compose.db_password()
    assert len(db_password) >= 32, "generated database password too short"
    config = json.loads(compose.run("config", "--format", "json").stdout)["services"]
    containers = compose.run("ps", "--all", "--quiet").stdout.split()
    assert len(containers) == len(config), containers
    for container in containers:
        raw = subprocess.run(
            ["docker", "inspect", container], capture_output=True, text=True, check=True
        ).stdout
        assert compose.password_marker not in raw and db_password not in raw, container
        [inspect] = json.loads(raw)
        service = inspect["Config"]["Labels"]["com.docker.compose.service"]
        for variable in inspect["Config"]["Env"]:
            name = variable.split("=", 1)[0]
            assert "PASSWORD" not in name or name.endswith("_FILE"), (service, name)
        host = inspect["HostConfig"]
        assert host["ReadonlyRootfs"] is config[service].get("read_only", False), service
        assert host["CapDrop"] == ["ALL"], service
        added = [capability.removeprefix("CAP_") for capability in host["CapAdd"] or []]  # Docker adds CAP_
        assert added == config[service].get("cap_add", []), service
        assert "no-new-privileges:true" in host["SecurityOpt"], service
        assert host["Memory"] == host["MemorySwap"] == int(config[service]["mem_limit"]), service
    owners = {
        ("db", "/run/credit-risk/credentials/db-password"): "999 400",
        ("mlflow", "/run/credit-risk/credentials/pgpass"): "10001 600",
        ("mlflow", "/run/credit-risk/credentials/admin-password"): "10001 400",
        ("mlflow", "/run/credit-risk/auth/admin.env"): "10001 600",
        ("mlflow", "/run/credit-risk/auth/flask_secret_key"): "10001 600",
        ("mlflow", "/run/credit-risk/auth/operator/operator.env"): "10001 600",
        ("serving", "/run/credit-risk/auth/serving.env"): "10001 600",
        ("sidecar", "/run/credit-risk/auth/sidecar.env"): "10001 600",
        ("monitor", "/run/credit-risk/auth/monitor.env"): "10001 600",
    }
    for (service, path), expected in owners.items():
        assert compose.run("exec", "-T", service, "stat", "-c", "%u %a", path).stdout.strip() == expected
    for service in ("serving", "sidecar", "monitor"):
        listing = compose.run("exec", "-T", service, "ls", "-A", "/run/credit-risk/auth").stdout.split()
        assert listing == [f"{service}.env"], (service, listing)
    # The admin password from the environment is the one admin.env holds and the server takes.
    admin_env = compose.run("exec", "-T", "mlflow", "cat", "/run/credit-risk/auth/admin.env").stdout
    assert f"MLFLOW_TRACKING_PASSWORD={compose.admin_password}\n" in admin_env
    # Over the network (host `db`, the container's own address): loopback is `trust` in the
    # image's pg_hba.conf, and no other client connects that way.
    psql = [
        "psql",
        "--host=db",
        "--username=mlflow",
        "--dbname=mlflow",
        "--no-password",
        "--command=SELECT 1",
    ]
    right = compose.run("exec", "-T", "-e", f"PGPASSWORD={db_password}", "db", *psql, check=False)
    assert right.returncode == 0, right.stderr
    wrong = compose.run("exec", "-T", "-e", "PGPASSWORD=mlflow", "db", *psql, check=False)
    assert "password authentication failed" in wrong.stderr, wrong


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


def _as_docker_run_flags(pod: dict, container: dict) -> list[str]:
    """The manifest's security context, memory limit and emptyDir mounts (as tmpfs of their
    sizeLimit), as `docker run` flags."""
    from tests.test_kubernetes_manifests import _bytes

    pod_context, context = pod["securityContext"], container["securityContext"]
    flags = ["--user", f"{pod_context['runAsUser']}:{pod_context['runAsGroup']}"]
    flags += [f"--cap-drop={capability}" for capability in context["capabilities"]["drop"]]
    if context["readOnlyRootFilesystem"]:
        flags.append("--read-only")
    if context["allowPrivilegeEscalation"] is False:
        flags += ["--security-opt", "no-new-privileges"]
    memory = _bytes(container["resources"]["limits"]["memory"])
    flags += [f"--memory={memory}", f"--memory-swap={memory}"]
    scratch = {volume["name"]: volume["emptyDir"] for volume in pod["volumes"] if "emptyDir" in volume}
    flags += [
        arg
        for m in container["volumeMounts"]
        if m["name"] in scratch
        for arg in ("--tmpfs", f"{m['mountPath']}:size={_bytes(scratch[m['name']]['sizeLimit'])}")
    ]
    return flags


def _probe(container: str, port: int, path: str) -> bytes | None:
    """GET from inside the container (its ports are not published); None unless 200."""
    fetch = f"import urllib.request, sys; sys.stdout.buffer.write(urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=4).read())"
    result = subprocess.run(
        ["docker", "exec", container, "python", "-c", fetch], capture_output=True, timeout=30
    )
    return result.stdout if result.returncode == 0 else None


def test_the_kubernetes_serving_pod_runs_under_its_security_context(compose):
    """The serving pod of deploy/kubernetes/40-serving.yaml as docker can run it: both
    containers with the manifest's user, read-only root, no capabilities, emptyDir /tmp, one
    spool volume and each its identity's credentials file where the manifest mounts its Secret,
    against the compose stack's MLflow (same address as in the cluster, auth on). The server
    loads the model from the registry, answers, and the sidecar ships the records."""
    from tests.test_kubernetes_manifests import _container, _env, _pod_specs, _secret_files

    compose.up()
    pod = _pod_specs()["serving"]
    spool = f"{compose.project}-k8s-spool"
    names = {name: f"{compose.project}-k8s-{name}" for name in ("sidecar", "serving")}
    subprocess.run(["docker", "volume", "create", spool], check=True, capture_output=True)
    try:
        for name, container_name in names.items():
            container = _container("serving", name)
            env = {k: v for k, v in _env(container).items() if v is not None}
            env |= {"CREDIT_RISK_REPLICA_ID": "serving-0", "CREDIT_RISK_FLUSH_INTERVAL_S": "2"}
            [spool_mount] = [m for m in container["volumeMounts"] if m["name"] == "spool"]
            # The identity's Secret as compose's `provision` wrote it: its file, on its volume.
            [(secret, key)] = set(_secret_files(pod, container).values())
            [credentials_mount] = {path.rsplit("/", 1)[0] for path in _secret_files(pod, container)}
            identity = secret.removeprefix("mlflow-")
            assert (
                key == f"{identity}.env"
                and env["CREDIT_RISK_CREDENTIALS_FILE"] == f"{credentials_mount}/{key}"
            )
            subprocess.run(
                ["docker", "run", "--detach", "--name", container_name, "--network", f"{compose.project}_default",
                 *_as_docker_run_flags(pod, container), "--volume", f"{spool}:{spool_mount['mountPath']}",
                 "--volume", f"{compose.project}_auth-{identity}:{credentials_mount}:ro",
                 *[arg for k, v in env.items() for arg in ("--env", f"{k}={v}")],
                 compose.images[1], *container["command"]],
                check=True, capture_output=True,
            )  # fmt: skip
        ready = _container("serving", "serving")["readinessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + 300
        while _probe(names["serving"], DEFAULT_HTTP_PORT, ready) is None:
            assert time.monotonic() < deadline, subprocess.run(
                ["docker", "logs", names["serving"]], capture_output=True, text=True
            ).stdout[-3000:]
            time.sleep(2)
        body = (SERVING_DIR / "example-request.json").read_text()
        infer = (
            "import urllib.request; urllib.request.urlopen(urllib.request.Request("
            f"'http://127.0.0.1:{DEFAULT_HTTP_PORT}/v2/models/{MODEL_NAME}/infer', data={body!r}.encode(), "
            "headers={'Content-Type': 'application/json'}), timeout=30)"
        )
        subprocess.run(
            ["docker", "exec", names["serving"], "python", "-c", infer], check=True, capture_output=True
        )
        health = _container("serving", "sidecar")["readinessProbe"]["httpGet"]["path"]
        rows = len(json.loads(body)["inputs"][0]["data"])
        while (
            json.loads(_probe(names["sidecar"], SIDECAR_PORT, health) or b"{}").get(
                "shipped_records_total", 0
            )
            < rows
        ):
            assert time.monotonic() < deadline, subprocess.run(
                ["docker", "logs", names["sidecar"]], capture_output=True, text=True
            ).stdout[-3000:]
            time.sleep(2)
        # Stopped as Kubernetes does it: the server, then the sidecar; both exit cleanly.
        for name in ("serving", "sidecar"):
            subprocess.run(["docker", "stop", "--time", "30", names[name]], check=True, capture_output=True)
            state = subprocess.run(
                ["docker", "inspect", "--format", "{{.State.ExitCode}}", names[name]],
                capture_output=True,
                text=True,
            )
            assert state.stdout.strip() == "0", (name, state.stdout)
    finally:
        subprocess.run(["docker", "rm", "--force", *names.values()], capture_output=True)
        subprocess.run(["docker", "volume", "rm", "--force", spool], capture_output=True)


def test_the_kubernetes_database_pod_runs_under_its_security_context():
    """deploy/kubernetes/11-db.yaml's PostgreSQL as docker can run it: the manifest's user,
    read-only root, no capabilities, emptyDir scratch folders and a data volume, and the Secret
    `db` as the documented command makes it; it initialises, answers the manifest's probe
    command, and stops cleanly."""
    from tests.test_kubernetes_manifests import _container, _pod_specs, documented_db_secret

    if not _docker_usable():  # a failure under CI (tests/conftest.py)
        pytest.skip("no usable Docker engine with Compose v2")
    pod, container = _pod_specs()["db"], _container("db", "db")
    env = {**documented_db_secret(), **{e["name"]: e["value"] for e in container["env"]}}
    name = f"credit-risk-test-db-{uuid.uuid4().hex[:8]}"
    [data] = [m for m in container["volumeMounts"] if m["name"] == "data"]
    try:
        subprocess.run(
            ["docker", "run", "--detach", "--name", name, *_as_docker_run_flags(pod, container),
             "--volume", f"{name}:{data['mountPath']}",
             *[arg for k, v in env.items() for arg in ("--env", f"{k}={v}")], container["image"]],
            check=True, capture_output=True,
        )  # fmt: skip
        probe = ["docker", "exec", name, *container["readinessProbe"]["exec"]["command"]]
        deadline = time.monotonic() + 120
        while subprocess.run(probe, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, subprocess.run(
                ["docker", "logs", name], capture_output=True, text=True
            ).stderr[-3000:]
            time.sleep(2)
        subprocess.run(["docker", "stop", "--time", "30", name], check=True, capture_output=True)
        state = subprocess.run(
            ["docker", "inspect", "--format", "{{.State.ExitCode}}", name], capture_output=True, text=True
        )
        assert state.stdout.strip() == "0", state.stdout
    finally:
        subprocess.run(["docker", "rm", "--force", name], capture_output=True)
        subprocess.run(["docker", "volume", "rm", "--force", name], capture_output=True)
