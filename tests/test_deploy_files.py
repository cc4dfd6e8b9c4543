"""Static checks of the deployment files: hadolint and `docker compose config`."""

import json
import shutil
import subprocess

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
    assert not services["mlflow"].get("depends_on")
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("sqlite:////")
