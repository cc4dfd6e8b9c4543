"""The tracking-server launcher's checks that need no database server (the PostgreSQL ones are
in tests/integration/test_postgres_backend.py)."""

import importlib.util

import pytest

from stack.tracking_server import (
    BackendStoreError,
    TrackingServerSettings,
    check_backend_store,
    describe,
    mlflow_command,
    mlflow_environment,
)

PG_URI = "postgresql+psycopg2://mlflow:s3cret@db:5432/mlflow"


def test_messages_mask_the_password():
    assert describe(PG_URI) == "postgresql+psycopg2://mlflow:***@db:5432/mlflow"


def test_a_uri_that_is_not_a_database_url_is_a_clear_error():
    with pytest.raises(ValueError, match="not a database URL"):
        TrackingServerSettings(backend_store_uri="db:5432/mlflow", wait_s=0)


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
    assert not any("s3cret" in part for part in mlflow_command(settings))
    assert mlflow_environment(settings)["MLFLOW_BACKEND_STORE_URI"] == PG_URI


def test_artifacts_default_beside_sqlite_and_are_required_otherwise(tmp_path):
    sqlite = TrackingServerSettings(backend_store_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", wait_s=0)
    assert sqlite.artifacts() == str(tmp_path / "artifacts")
    with pytest.raises(ValueError, match="MLFLOW_ARTIFACTS_DESTINATION"):
        TrackingServerSettings(backend_store_uri=PG_URI, artifacts_destination=None, wait_s=0).artifacts()
