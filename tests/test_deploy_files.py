"""Static checks of the deployment files: hadolint, and `docker compose config` (the services,
their hardening, where the passwords go, and MLflow's basic-auth on by default)."""

import json
import shutil
import subprocess
import uuid

import pytest

from tests.helpers import BIN, REPO


def test_dockerfiles_pass_hadolint():
    result = subprocess.run(
        [str(BIN / "hadolint"), "Dockerfile.train", "Dockerfile.serve"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _compose_config(*files: str) -> dict:
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    ):
        pytest.skip("`docker compose` is not available")  # a failure under CI (tests/conftest.py)
    flags = [arg for name in files for arg in ("-f", name)]
    result = subprocess.run(
        ["docker", "compose", *flags, "config", "--format", "json"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_runs_mlflow_on_an_unpublished_postgresql():
    services = _compose_config("docker-compose.yml")["services"]
    assert services["db"]["image"] == "postgres:15-bookworm"
    assert not services["db"].get("ports")
    assert services["mlflow"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")


def test_sqlite_override_leaves_the_database_out():
    services = _compose_config("docker-compose.yml", "docker-compose.sqlite.yml")["services"]
    assert "db" not in services
    # `credentials` stays (the admin password file, the auth volumes' owner) and MLflow waits
    # for it: `up --wait` counts a one-shot container nobody waits for as a failure.
    assert set(services["mlflow"]["depends_on"]) == {"credentials"}
    assert services["mlflow"]["depends_on"]["credentials"]["condition"] == "service_completed_successfully"
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("sqlite:////")


# -- hardening: every service of both files ------------------------------------------------------

COMPOSE_FILES = [("docker-compose.yml",), ("docker-compose.yml", "docker-compose.sqlite.yml")]
# Services whose root filesystem is writable, and why.
WRITABLE_ROOT = {
    # compose copies the password config into it, which it refuses for a read-only container
    "credentials": "configs",
}
# Capabilities added back, and why.
ADDED_CAPABILITIES = {
    # gives each password file to its one reader (libpq refuses a file others may read)
    "credentials": ["CHOWN"],
}


@pytest.mark.parametrize("files", COMPOSE_FILES, ids=["postgres", "sqlite"])
def test_every_service_is_hardened(files):
    """A memory limit that swap cannot stretch, no capabilities but the listed ones, no
    privilege gain, a read-only root (but the listed ones), and a size on every tmpfs, which
    lives in memory and so counts against the limit."""
    services = _compose_config(*files)["services"]
    for name, service in services.items():
        limit = service.get("mem_limit")
        assert limit and int(limit) > 0, name
        assert int(service.get("memswap_limit", 0)) == int(limit), name
        assert service.get("cap_drop") == ["ALL"], name
        assert service.get("cap_add", []) == ADDED_CAPABILITIES.get(name, []), name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("read_only", False) is (name not in WRITABLE_ROOT), name
        assert not service.get("privileged") and "tmpfs" not in service, name  # sizes below
        for volume in service.get("volumes", []):
            if volume["type"] == "tmpfs":
                size = volume["tmpfs"]["size"]
                assert 0 < int(size) < int(limit), (name, volume["target"])
    if files == ("docker-compose.yml",):
        assert set(WRITABLE_ROOT) | set(ADDED_CAPABILITIES) <= set(services)


def test_no_password_reaches_a_container_but_as_a_file(monkeypatch):
    """With a password set, it appears in no service's environment, command or labels: only in
    the config that `credentials` writes to files, and the services read those files."""
    password, admin_password = f"{uuid.uuid4().hex}:@/%", f"{uuid.uuid4().hex}:@/%"
    monkeypatch.setenv("POSTGRES_PASSWORD", password)
    monkeypatch.setenv("CREDIT_RISK_ADMIN_PASSWORD", admin_password)
    config = _compose_config("docker-compose.yml")
    for name, service in config["services"].items():
        assert password not in json.dumps(service) and admin_password not in json.dumps(service), name
        for variable in service.get("environment") or {}:
            assert "PASSWORD" not in variable or variable.endswith("_FILE"), (name, variable)
    assert config["configs"]["db-password"]["content"] == password + "\n"
    assert config["configs"]["admin-password"]["content"] == admin_password + "\n"
    credentials = config["services"]["credentials"]
    assert [c["source"] for c in credentials["configs"]] == ["db-password", "admin-password"]
    assert not [
        s for s, service in config["services"].items() if service.get("configs") and s != "credentials"
    ]
    secrets_dir = next(v["target"] for v in credentials["volumes"] if v.get("source") == "credentials")
    db, mlflow = config["services"]["db"], config["services"]["mlflow"]
    assert db["environment"]["POSTGRES_PASSWORD_FILE"].startswith(secrets_dir + "/")
    assert mlflow["environment"]["PGPASSFILE"].startswith(secrets_dir + "/")
    assert "@" in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]  # user@host, and no password
    assert ":" not in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].split("//", 1)[1].split("@")[0]
    for name in ("mlflow", "provision"):
        admin_file = config["services"][name]["environment"]["CREDIT_RISK_ADMIN_PASSWORD_FILE"]
        assert admin_file.startswith(secrets_dir + "/"), name
    for service in (db, mlflow, config["services"]["provision"]):
        [mount] = [v for v in service["volumes"] if v.get("source") == "credentials"]
        assert mount["target"] == secrets_dir and mount["read_only"] is True


# -- authentication: on, with no default password -------------------------------------------------

AUTH_DIR = "/run/credit-risk/auth"
# The compose services that talk to MLflow, and the identity each acts as.
CLIENT_IDENTITIES = {"trainer": "trainer", "serving": "serving", "sidecar": "sidecar", "monitor": "monitor"}


@pytest.mark.parametrize("files", COMPOSE_FILES, ids=["postgres", "sqlite"])
def test_auth_is_on_with_no_default_password(files, monkeypatch):
    """With no password variable set, no password is in the configuration (they are generated
    at the first start); MLflow runs the basic-auth app; `provision` runs once MLflow is healthy,
    before every client, and writes each identity's file to that identity's own volume."""
    for name in ("POSTGRES_PASSWORD", "CREDIT_RISK_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    config = _compose_config(*files)
    assert {name: c["content"] for name, c in config["configs"].items()} == {
        # A newline only: compose drops a config whose content is empty.
        "db-password": "\n",
        "admin-password": "\n",
    }
    services = config["services"]
    command = services["mlflow"]["command"]
    assert "--auth" in command and f"--auth-dir={AUTH_DIR}" in command
    provision = services["provision"]
    assert provision["depends_on"]["mlflow"]["condition"] == "service_healthy"
    script = provision["command"][-1]
    assert "credit-risk auth provision " in script
    assert f"--credentials-dir={AUTH_DIR} --per-identity-folders" in script
    provision_mounts = {v["target"]: v["source"] for v in provision["volumes"] if v["type"] == "volume"}
    for service, identity in CLIENT_IDENTITIES.items():
        spec = services[service]
        assert spec["environment"]["CREDIT_RISK_CREDENTIALS_FILE"] == f"{AUTH_DIR}/{identity}.env", service
        assert spec["depends_on"]["provision"]["condition"] == "service_completed_successfully", service
        auth_mounts = [v for v in spec["volumes"] if str(v.get("source", "")).startswith("auth")]
        assert [(v["source"], v["target"], v.get("read_only")) for v in auth_mounts] == [
            (f"auth-{identity}", AUTH_DIR, True)
        ], service
        # `provision` writes <identity>/<identity>.env: that folder is the identity's volume.
        assert provision_mounts[f"{AUTH_DIR}/{identity}"] == f"auth-{identity}"
        # Nobody else mounts it, but the one-shots that write it.
        others = {
            name
            for name, other in services.items()
            for v in other.get("volumes", [])
            if v.get("source") == f"auth-{identity}"
        }
        assert others == {service, "credentials", "provision"}, identity
    assert provision_mounts[AUTH_DIR] == "auth"
    # The admin's volume: MLflow and the one-shots only.
    assert {
        name for name, s in services.items() for v in s.get("volumes", []) if v.get("source") == "auth"
    } == {
        "credentials",
        "mlflow",
        "provision",
    }


# -- the monitor service (issue 19) ---------------------------------------------------------------


def test_the_monitor_is_a_service_on_its_own_published_port(monkeypatch):
    """`credit-risk monitor --every` on every address inside its container, its port published
    on CREDIT_RISK_BIND (loopback by default) as MONITOR_PORT says, the interval and window
    from documented variables, a healthcheck on /health/live (the one path that fails only
    when a restart helps), started once the trainer has made a Production version."""
    from monitoring.settings import DEFAULT_PORT, MonitorSettings

    for name in (
        "MONITOR_PORT",
        "CREDIT_RISK_BIND",
        "CREDIT_RISK_MONITOR_EVERY",
        "CREDIT_RISK_MONITOR_WINDOW",
    ):
        monkeypatch.delenv(name, raising=False)
    monitor = _compose_config("docker-compose.yml")["services"]["monitor"]
    assert monitor["image"] == "credit-risk-train:local"
    assert monitor["command"] == ["credit-risk", "monitor", "--every"]
    environment = monitor["environment"]
    assert environment["CREDIT_RISK_MONITOR_HOST"] == "0.0.0.0"
    assert int(environment["CREDIT_RISK_MONITOR_PORT"]) == DEFAULT_PORT
    defaults = MonitorSettings.model_fields
    assert environment["CREDIT_RISK_MONITOR_EVERY"] == "15m" == _duration(defaults["every"].default)
    assert environment["CREDIT_RISK_MONITOR_WINDOW"] == "24h" == _duration(defaults["window"].default)
    [port] = monitor["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == (
        "127.0.0.1",
        str(DEFAULT_PORT),
        DEFAULT_PORT,
    )
    assert monitor["healthcheck"]["test"][-1].count(f"http://127.0.0.1:{DEFAULT_PORT}/health/live'") == 1
    assert {name: d["condition"] for name, d in monitor["depends_on"].items()} == {
        "provision": "service_completed_successfully",
        "mlflow": "service_healthy",
        "trainer": "service_completed_successfully",
    }
    assert monitor["restart"] == "unless-stopped"

    monkeypatch.setenv("MONITOR_PORT", "18084")
    monkeypatch.setenv("CREDIT_RISK_BIND", "0.0.0.0")
    monkeypatch.setenv("CREDIT_RISK_MONITOR_EVERY", "1m")
    monitor = _compose_config("docker-compose.yml")["services"]["monitor"]
    [port] = monitor["ports"]
    assert (port["host_ip"], port["published"]) == ("0.0.0.0", "18084")
    assert monitor["environment"]["CREDIT_RISK_MONITOR_EVERY"] == "1m"


def _duration(value) -> str:
    from monitoring.settings import format_duration

    return format_duration(value)
