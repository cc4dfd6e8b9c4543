"""Static checks of the deployment files: hadolint, and `docker compose config` (the services,
their hardening, and where the database password goes)."""

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
    # `credentials` only writes the database's password files; left running, it would also
    # fail `up --wait`, which counts a one-shot container nobody waits for as a failure.
    assert "db" not in services and "credentials" not in services
    assert not services["mlflow"].get("depends_on")
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
    password = f"{uuid.uuid4().hex}:@/%"
    monkeypatch.setenv("POSTGRES_PASSWORD", password)
    config = _compose_config("docker-compose.yml")
    for name, service in config["services"].items():
        assert password not in json.dumps(service), name
        for variable in service.get("environment") or {}:
            assert "PASSWORD" not in variable or variable.endswith("_FILE"), (name, variable)
    assert config["configs"]["db-password"]["content"] == password
    credentials = config["services"]["credentials"]
    assert [c["source"] for c in credentials["configs"]] == ["db-password"]
    assert not [
        s for s, service in config["services"].items() if service.get("configs") and s != "credentials"
    ]
    secrets_dir = next(v["target"] for v in credentials["volumes"] if v.get("source") == "credentials")
    db, mlflow = config["services"]["db"], config["services"]["mlflow"]
    assert db["environment"]["POSTGRES_PASSWORD_FILE"].startswith(secrets_dir + "/")
    assert mlflow["environment"]["PGPASSFILE"].startswith(secrets_dir + "/")
    assert "@" in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]  # user@host, and no password
    assert ":" not in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].split("//", 1)[1].split("@")[0]
    for service in (db, mlflow):
        [mount] = [v for v in service["volumes"] if v.get("source") == "credentials"]
        assert mount["target"] == secrets_dir and mount["read_only"] is True
