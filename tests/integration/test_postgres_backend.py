"""MLflow on a real PostgreSQL server: training, registration, promotion, serving and
shipping, the launcher's answer to a database it cannot use, and auth with its users and
grants in the same database.

The server is Debian's ``postgresql`` package (installed by ``.ci/run``): ``initdb`` refuses
to run as root, so the cluster and its server run as the ``postgres`` user, in a temporary
folder, on a free port. ``CREDIT_RISK_REQUIRE_POSTGRES=1`` turns the skip into a failure.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import create_engine, inspect, text

from logging_sidecar.reader import read_records
from model.identity import PRODUCTION_ALIAS, REGISTERED_MODEL_NAME
from serving.settings import MODEL_NAME, SERVING_DIR
from stack import auth_policy as policy
from stack import processes, services
from stack.auth import provision
from tests.helpers import REFUSED_PORT, credit_risk, free_port, running, serving_service

pytestmark = pytest.mark.integration

USER = "mlflow"
NO_SERVER = "http://127.0.0.1:9"  # the launcher never talks to MLflow; the helper wants a URI


def _postgres_bin() -> Path | None:
    """Debian keeps the server programs off PATH, under /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass(frozen=True)
class Cluster:
    folder: Path
    bin: Path
    password: str
    port: int

    def url(self, database: str = USER, password: str | None = None, port: int | None = None) -> str:
        password = self.password if password is None else password
        return f"postgresql+psycopg2://{USER}:{password}@127.0.0.1:{port or self.port}/{database}"


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def new_cluster() -> Cluster:
    """An initialised, stopped cluster whose superuser is ``mlflow`` with a random password."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        message = "PostgreSQL server programs not found (Debian package `postgresql`)"
        if os.environ.get("CREDIT_RISK_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"CREDIT_RISK_REQUIRE_POSTGRES=1 but {message}")
        pytest.skip(message)
    folder = Path(tempfile.mkdtemp(prefix="credit-risk-pg-"))
    password = secrets.token_urlsafe(12)
    (folder / "password").write_text(password + "\n")
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in (folder, folder / "password"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    subprocess.run(
        [*_as_postgres(), str(bin_dir / "initdb"), "--pgdata", str(folder / "data"), "--username", USER,
         f"--pwfile={folder / 'password'}", "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return Cluster(folder, bin_dir, password, free_port())


@contextmanager
def serving_cluster(cluster: Cluster):
    """The cluster's server, listening on 127.0.0.1 only; stopped (fast shutdown) on exit."""
    with open(cluster.folder / "server.log", "ab") as log:
        server = subprocess.Popen(
            [*_as_postgres(), str(cluster.bin / "postgres"), "-D", str(cluster.folder / "data"),
             "-p", str(cluster.port), "-k", str(cluster.folder), "-c", "listen_addresses=127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        ready = [str(cluster.bin / "pg_isready"), "--quiet", "--host=127.0.0.1", f"--port={cluster.port}"]
        deadline = time.monotonic() + 60
        while subprocess.run(ready, check=False).returncode != 0:
            assert server.poll() is None, (cluster.folder / "server.log").read_text()
            assert time.monotonic() < deadline, (cluster.folder / "server.log").read_text()
            time.sleep(0.3)
        yield server
    finally:
        os.killpg(server.pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            processes.terminate(server.pid)


def create_database(cluster: Cluster, name: str) -> None:
    engine = create_engine(cluster.url("postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()


@pytest.fixture(scope="module")
def postgres():
    cluster = new_cluster()
    try:
        with serving_cluster(cluster):
            create_database(cluster, USER)
            yield cluster
    finally:
        shutil.rmtree(cluster.folder, ignore_errors=True)


def _tracking_server(*args: str, **env: str) -> subprocess.CompletedProcess:
    return credit_risk("tracking-server", "--port", str(free_port()), *args, tracking_uri=NO_SERVER,
                       timeout=120, **env)  # fmt: skip


def _assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: backend store "), result.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


def _infer(url: str, request_id: str) -> dict:
    body = json.loads((SERVING_DIR / "example-request.json").read_text())
    body["id"] = request_id
    answer = httpx.post(f"{url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _wait_for_records(client: MlflowClient, ids: set[str], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_records(client=client, deduplicate=False)
        if not records.empty and set(records["request_id"]) >= ids:
            return records
        time.sleep(1)
    raise AssertionError(f"records of {len(ids)} requests not in MLflow after {timeout} s")


def _production(client: MlflowClient) -> tuple[str, str]:
    [holder] = [
        v.version
        for v in client.search_model_versions(f"name='{REGISTERED_MODEL_NAME}'")
        if v.current_stage == "Production"
    ]
    return holder, client.get_model_version_by_alias(REGISTERED_MODEL_NAME, PRODUCTION_ALIAS).version


def test_train_register_promote_serve_and_ship_on_postgresql(postgres, sample_path, tmp_path):
    port = free_port()
    mlflow = services.mlflow(tmp_path / "mlflow", port=port, backend_store_uri=postgres.url())
    uri = services.tracking_uri(port)
    client = MlflowClient(uri)
    with running(mlflow, tmp_path, timeout=120):
        trained = credit_risk("train", "--data", str(sample_path), tracking_uri=uri)
        assert trained.returncode == 0, trained.stdout + trained.stderr
        assert _production(client) == ("1", "1")
        again = credit_risk("train", "--data", str(sample_path), "--retrain", "--set", "max_iter=60",
                            tracking_uri=uri)  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr
        # The gate may or may not have promoted version 2: promote whichever is not in Production.
        target = "1" if _production(client)[0] == "2" else "2"
        promoted = credit_risk("promote", "--version", target, "--reason", "postgres test", tracking_uri=uri)
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        assert _production(client) == (target, target)

        service, ports = serving_service(uri, CREDIT_RISK_SPOOL_DIR=str(tmp_path / "spool"))
        sidecar = services.sidecar(uri, tmp_path / "spool", free_port(),
                                   CREDIT_RISK_FLUSH_RECORDS="5", CREDIT_RISK_FLUSH_INTERVAL_S="1")  # fmt: skip
        with running(service, tmp_path), running(sidecar, tmp_path, timeout=60):
            url = f"http://127.0.0.1:{ports['http']}"
            ids = {f"pg-{uuid.uuid4().hex}" for _ in range(8)}
            for request_id in ids:
                assert _infer(url, request_id)["model_version"] == target
            records = _wait_for_records(client, ids)
    assert len(records) == 2 * len(ids)  # two rows per request, each once
    assert set(records["model_version"]) == {target}

    # All of it lives in PostgreSQL: MLflow kept no SQLite file, and the tables say the same.
    assert not list((tmp_path / "mlflow").glob("*.db"))
    engine = create_engine(postgres.url())
    with engine.connect() as connection:
        stages = dict(
            connection.execute(
                text("SELECT version, current_stage FROM model_versions WHERE name = :name"),
                {"name": REGISTERED_MODEL_NAME},
            ).all()
        )
        experiments = {row[0] for row in connection.execute(text("SELECT name FROM experiments")).all()}
    engine.dispose()
    assert stages[int(target)] == "Production" and set(stages) == {1, 2}
    assert "credit-risk-inference" in experiments

    # A new server process on the same database has everything.
    with running(mlflow, tmp_path, timeout=120):
        assert _production(client) == (target, target)
        assert len(read_records(client=client, deduplicate=False)) == 2 * len(ids)


def test_bad_credentials_are_one_clear_line_without_the_password(postgres, tmp_path):
    wrong = "not-" + postgres.password
    result = _tracking_server("--artifacts-destination", str(tmp_path),
                              "--backend-store-uri", postgres.url(password=wrong), "--wait-s", "30")  # fmt: skip
    line = _assert_one_error_line(result, "password authentication failed", f"{USER}:***@")
    assert wrong not in result.stdout + result.stderr, line
    assert "waiting" not in result.stdout  # waiting cannot fix a wrong password


def test_an_unknown_database_is_refused_at_once(postgres, tmp_path):
    result = _tracking_server("--artifacts-destination", str(tmp_path), "--wait-s", "30",
                              MLFLOW_BACKEND_STORE_URI=postgres.url("no_such_db"))  # fmt: skip
    _assert_one_error_line(result, 'database "no_such_db" does not exist')


def test_an_unreachable_database_is_one_clear_line(postgres, tmp_path):
    nobody = postgres.url(port=REFUSED_PORT)
    at_once = _tracking_server("--artifacts-destination", str(tmp_path), "--backend-store-uri", nobody)
    _assert_one_error_line(at_once, "Connection refused")
    waited = _tracking_server("--artifacts-destination", str(tmp_path), "--backend-store-uri", nobody,
                              CREDIT_RISK_BACKEND_WAIT_S="3")  # fmt: skip
    _assert_one_error_line(waited, "(waited 3 s)", "Connection refused")
    assert "waiting for backend store" in waited.stdout, waited.stdout


def test_mlflow_waits_for_a_database_that_starts_later(tmp_path):
    """What compose relies on after `restart`: MLflow started first waits, then comes up."""
    cluster = new_cluster()
    try:
        port = free_port()
        mlflow = services.mlflow(tmp_path / "mlflow", port=port, backend_store_uri=cluster.url("postgres"))
        mlflow = processes.Service(mlflow.name, [*mlflow.command, "--wait-s", "120"], mlflow.health_url,
                                   mlflow.env)  # fmt: skip
        log = mlflow.log_path(tmp_path)
        process = processes.start(mlflow, tmp_path)
        try:
            deadline = time.monotonic() + 60
            while "waiting for backend store" not in (log.read_text() if log.exists() else ""):
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
            with serving_cluster(cluster):
                processes.wait_healthy(mlflow, process, tmp_path, timeout=120)
                assert MlflowClient(services.tracking_uri(port)).search_experiments()
        finally:
            processes.terminate(process.pid)
            process.wait(timeout=30)
    finally:
        shutil.rmtree(cluster.folder, ignore_errors=True)


@pytest.mark.parametrize("given_by", ["flag", "variable"])
def test_up_passes_its_backend_store_uri_to_mlflow(postgres, tmp_path, given_by):
    """`credit-risk up --backend-store-uri` or `MLFLOW_BACKEND_STORE_URI`: the URI reaches the
    launcher, whose refusal stops `up` with the reason (the same server path as the first
    test, which trains on it)."""
    wrong = "not-" + postgres.password
    flags = ["--state-dir", str(tmp_path), "--mlflow-port", str(free_port()),
             "--http-port", str(free_port()), "--sidecar-port", str(free_port())]  # fmt: skip
    uri = postgres.url(password=wrong)
    if given_by == "flag":
        up = credit_risk("up", *flags, "--backend-store-uri", uri, tracking_uri=NO_SERVER)
    else:
        up = credit_risk("up", *flags, tracking_uri=NO_SERVER, MLFLOW_BACKEND_STORE_URI=uri)
    assert up.returncode == 1, up.stdout + up.stderr
    assert "mlflow exited with code 1 before it was healthy" in up.stderr, up.stderr
    assert 'password authentication failed for user "mlflow"' in up.stderr, up.stderr
    assert "Traceback" not in up.stderr and wrong not in up.stdout + up.stderr
    down = credit_risk("down", *flags, tracking_uri=NO_SERVER)
    assert down.returncode == 0 and "mlflow: not running" in down.stdout, down.stdout + down.stderr


def test_auth_keeps_users_and_grants_in_the_backend_stores_database(postgres, tmp_path):
    """`credit-risk tracking-server --auth` on PostgreSQL: by default the auth app's tables go
    into MLflow's own database, beside MLflow's (no clash: its own names and alembic version
    table), and nothing of auth is left on the auth folder's disk but the config and secrets."""
    create_database(postgres, "mlflow_auth")
    uri = postgres.url("mlflow_auth")
    port, auth_dir = free_port(), tmp_path / "auth"
    mlflow = services.mlflow(tmp_path / "mlflow", port=port, backend_store_uri=uri, auth_dir=auth_dir)
    tracking = services.tracking_uri(port)
    with running(mlflow, tmp_path, timeout=180):
        first = provision(tracking, auth_dir, environ={})
        assert "serving: user created" in first.changes, first.changes
        anonymous = httpx.get(f"{tracking}/api/2.0/mlflow/registered-models/get",
                              params={"name": REGISTERED_MODEL_NAME}, timeout=30)  # fmt: skip
        assert anonymous.status_code == 401
    log = mlflow.log_path(tmp_path).read_text()
    masked = uri.replace(postgres.password, "***")
    assert f"auth on: users and grants in {masked} (the backend store's database); " in log, log
    assert postgres.password not in log
    assert not (auth_dir / "basic_auth.db").exists()
    engine = create_engine(uri)
    tables = set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        users = {row[0] for row in connection.execute(text("SELECT username FROM users")).all()}
        experiments = {row[0] for row in connection.execute(text("SELECT name FROM experiments")).all()}
    engine.dispose()
    assert {"users", "roles", "role_permissions", "user_role_assignments", "alembic_version_auth"} <= tables
    assert {"experiments", "runs", "registered_models", "model_versions", "alembic_version"} <= tables
    # Users and the experiments they are granted on, side by side in the one database.
    assert users == set(policy.IDENTITIES)
    assert {"credit-risk-training", "credit-risk-inference"} <= experiments


def test_an_auth_database_that_refuses_is_one_clear_line(postgres, tmp_path):
    wrong = "not-" + postgres.password
    result = _tracking_server("--artifacts-destination", str(tmp_path), "--backend-store-uri", postgres.url(),
                              "--auth", "--auth-dir", str(tmp_path / "auth"),
                              "--auth-database-uri", postgres.url(password=wrong))  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"error: auth database postgresql+psycopg2://{USER}:***@127.0.0.1:{postgres.port}/{USER} refused: "
        f'connection to server at "127.0.0.1", port {postgres.port} failed: FATAL:  password authentication '
        f'failed for user "{USER}"'
    ]
    assert wrong not in result.stdout + result.stderr
