"""The tracking-server launcher's checks that need no database server (the PostgreSQL ones are
in tests/integration/test_postgres_backend.py)."""

import importlib.util

import pytest
from pydantic import ValidationError

from stack.errors import UsageError, settings_errors
from stack.tracking_server import (
    BackendStoreError,
    Listen,
    TrackingServerSettings,
    check_backend_store,
    describe,
    mlflow_command,
    mlflow_environment,
)

PG_URI = "postgresql+psycopg2://mlflow:s3cret@db:5432/mlflow"


def test_messages_mask_the_password():
    assert describe(PG_URI) == "postgresql+psycopg2://mlflow:***@db:5432/mlflow"


def test_a_uri_that_is_not_a_database_url_is_a_clear_error(monkeypatch):
    with pytest.raises(ValidationError) as flag:
        TrackingServerSettings(backend_store_uri="mlflow:s3cret@db:5432/mlflow", wait_s=0)
    # Named after the flag that gave it, the password masked even though it is no URL.
    assert settings_errors(flag.value) == [
        "--backend-store-uri='mlflow:***@db:5432/mlflow': must be a database URL such as "
        "postgresql+psycopg2://user:password@host:5432/db"
    ]
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "db:5432/mlflow")
    monkeypatch.setenv("CREDIT_RISK_BACKEND_WAIT_S", "soon")
    with pytest.raises(ValidationError) as variables:
        TrackingServerSettings()
    assert settings_errors(variables.value) == [
        "MLFLOW_BACKEND_STORE_URI='db:5432/mlflow': must be a database URL such as "
        "postgresql+psycopg2://user:password@host:5432/db",
        "CREDIT_RISK_BACKEND_WAIT_S='soon': Input should be a valid number, unable to parse string as a number",
    ]


def test_the_defaults_are_sqlite_in_the_local_stack_folder(monkeypatch, tmp_path):
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "CREDIT_RISK_BACKEND_WAIT_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CREDIT_RISK_HOME", str(tmp_path / "home"))
    settings = TrackingServerSettings()
    assert settings.backend_store_uri == f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}"
    assert settings.artifacts() == str(tmp_path / "home" / "mlflow" / "artifacts")
    assert settings.wait_s == 0
    # Flags override the variables.
    monkeypatch.setenv("CREDIT_RISK_BACKEND_WAIT_S", "30")
    assert TrackingServerSettings().wait_s == 30 and TrackingServerSettings(wait_s=5).wait_s == 5


def test_a_missing_driver_fails_at_once_without_waiting():
    assert importlib.util.find_spec("pg8000") is None, "this test needs a driver that is not installed"
    said = []
    with pytest.raises(BackendStoreError, match=r"no database driver \(No module named 'pg8000'\)"):
        check_backend_store(
            "postgresql+pg8000://mlflow:s3cret@127.0.0.1:1/mlflow", wait_s=60, say=said.append
        )
    assert said == []


def test_sqlite_answers_and_its_folder_is_created(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    check_backend_store(uri)
    assert (tmp_path / "new" / "mlflow.db").is_file()


def test_the_password_goes_to_mlflow_in_the_environment_not_the_command_line():
    settings = TrackingServerSettings(backend_store_uri=PG_URI, artifacts_destination="/a", wait_s=0)
    assert not any("s3cret" in part for part in mlflow_command(settings, Listen()))
    assert mlflow_environment(settings)["MLFLOW_BACKEND_STORE_URI"] == PG_URI


def test_artifacts_default_beside_sqlite_and_are_required_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION", raising=False)
    sqlite = TrackingServerSettings(backend_store_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", wait_s=0)
    assert sqlite.artifacts() == str(tmp_path / "artifacts")
    with pytest.raises(ValidationError) as missing:
        TrackingServerSettings(backend_store_uri=PG_URI, artifacts_destination=None, wait_s=0)
    assert settings_errors(missing.value) == [
        "MLFLOW_ARTIFACTS_DESTINATION (or --artifacts-destination) is required with a postgresql backend store"
    ]


def test_listening_flags_are_checked():
    assert mlflow_command(TrackingServerSettings(artifacts_destination="/a"), Listen(port=5001, workers=3))[
        2:6
    ] == [
        "--host",
        "127.0.0.1",
        "--port",
        "5001",
    ]
    with pytest.raises(UsageError, match="--port must be a TCP port"):
        Listen(port=70000)
    with pytest.raises(UsageError, match="--workers must be at least 1"):
        Listen(workers=0)
