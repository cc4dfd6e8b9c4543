"""Auth wiring that needs no server: which credentials a command acts with (``stack.local``,
``stack.cli.main``), the launcher's auth settings, command and environment
(``stack.tracking_server``), and the services' environments. The running stack with auth on is
tests/integration/test_stack_up_auth.py; the auth database on PostgreSQL is in
tests/integration/test_postgres_backend.py."""

from __future__ import annotations

import os
import stat

import pytest
from pydantic import ValidationError

from stack import auth_policy as policy
from stack import cli, local, services
from stack.auth_files import Credentials, CredentialsError, generated_password, read_credentials
from stack.errors import UsageError, settings_errors
from stack.processes import Service
from stack.tracking_server import (
    Listen,
    TrackingServerSettings,
    auth_off_line,
    check_auth_environment,
    mlflow_command,
    mlflow_environment,
    prepare_auth,
)
from tests.helpers import NOBODY_URL

PG_URI = "postgresql+psycopg2://mlflow:s3cret@db:5432/mlflow"
CREDENTIAL_VARIABLES = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "CREDIT_RISK_CREDENTIALS_FILE",
)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No credentials, no tracking server, no auth settings; the state folder in tmp_path. The
    environment is put back afterwards: ``main`` writes MLflow's variables into it."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "CREDIT_RISK_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CREDIT_RISK_HOME", str(tmp_path / "home"))
    yield tmp_path / "home"
    os.environ.clear()
    os.environ.update(saved)


def _auth_stack(home, auth=True, identities=policy.IDENTITIES):
    """A recorded local stack (no server: nothing here asks it) and its credentials files."""
    local.record_stack(home, NOBODY_URL, 1, 2, 3, auth=auth)
    for identity in identities:
        path = local.auth_dir(home) / f"{identity}.env"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Credentials(identity, generated_password()).env_text())


# --- Which identity a command acts as ----------------------------------------------------


@pytest.mark.parametrize(
    ("command", "identity"),
    [
        ("train", "trainer"),
        ("promote", "operator"),
        ("rollback", "operator"),
        ("status", "operator"),
        ("records", "monitor"),
        ("records prune", "sidecar"),
        ("serve", "serving"),
        ("sidecar", "sidecar"),
    ],
)
def test_each_command_picks_its_identity_on_the_local_stack_with_auth(clean_env, command, identity):
    _auth_stack(clean_env)
    environ = {}
    path = local.select_credentials(command, environ=environ)
    assert path == clean_env / "auth" / f"{identity}.env"
    assert environ == {"CREDIT_RISK_CREDENTIALS_FILE": str(path)}


def test_the_picked_identities_are_the_policys_and_never_admin():
    assert set(local.COMMAND_IDENTITIES.values()) <= set(policy.SERVICE_IDENTITIES)
    # The records are personal data: read as an identity the policy names as their reader.
    assert local.COMMAND_IDENTITIES["records"] in policy.readers_of(policy.INFERENCE)
    # ... and deleted (retention) by the one identity that may delete runs, which reads them.
    pruner = local.COMMAND_IDENTITIES["records prune"]
    assert pruner in policy.readers_of(policy.INFERENCE)
    assert {g.identity for g in policy.POLICY if g.resource_type == policy.RUN} == {pruner}


def test_a_subcommand_acts_as_its_own_line_else_as_its_command():
    assert local.identity_of("records prune") == "sidecar"
    assert local.identity_of("records") == "monitor"
    assert local.identity_of("outcomes add") == local.identity_of("outcomes") == "operator"
    assert local.identity_of("auth provision") is None and local.identity_of("up") is None


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["records", "prune", "--older-than", "30"], "records prune"),
        (["records", "--model-version", "2"], "records"),
        (["auth", "table"], "auth table"),
        (["status"], "status"),
    ],
)
def test_the_command_name_carries_its_subcommand(argv, name):
    assert cli.command_name(cli.build_parser().parse_args(argv)) == name


def test_records_prune_loads_the_sidecars_credentials(clean_env):
    """It then fails (no server answers); by then it holds the sidecar's credentials."""
    _auth_stack(clean_env)
    assert cli.main(["records", "prune", "--older-than", "30"]) == 1
    sidecar = read_credentials(clean_env / "auth" / "sidecar.env")
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == sidecar


@pytest.mark.parametrize("variable", CREDENTIAL_VARIABLES)
def test_credentials_that_are_set_win(clean_env, variable):
    _auth_stack(clean_env)
    environ = {variable: "set-by-the-user"}
    assert local.select_credentials("status", environ=environ) is None
    assert environ == {variable: "set-by-the-user"}


def test_nothing_is_picked_without_auth_another_server_or_an_unknown_command(clean_env, monkeypatch):
    _auth_stack(clean_env, auth=False)
    assert local.select_credentials("status", environ={}) is None
    _auth_stack(clean_env, auth=True)
    for command in ("up", "down", "tracking-server", "auth"):
        assert local.select_credentials(command, environ={}) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # not the local stack
    assert local.select_credentials("status", environ={}) is None


def test_a_missing_identity_file_names_it(clean_env):
    _auth_stack(clean_env, identities=("trainer",))
    with pytest.raises(CredentialsError) as raised:
        local.select_credentials("promote", environ={})
    assert str(raised.value) == (
        f"the local stack ({clean_env / 'stack.json'}) runs with auth on, but "
        f"{clean_env / 'auth' / 'operator.env'} is missing: run `credit-risk up --auth` here again, "
        "or set CREDIT_RISK_CREDENTIALS_FILE"
    )


def test_the_tracking_server_line_names_the_identity_and_where_it_comes_from():
    assert local.acting_as({}) == ""
    assert local.acting_as({"MLFLOW_TRACKING_USERNAME": "operator", "MLFLOW_TRACKING_PASSWORD": "x"}) == (
        " as operator (MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD)"
    )
    from_file = {
        "MLFLOW_TRACKING_USERNAME": "operator",
        "MLFLOW_TRACKING_PASSWORD": "x",
        "CREDIT_RISK_CREDENTIALS_FILE": ".credit-risk/auth/operator.env",
    }
    assert local.acting_as(from_file) == " as operator (.credit-risk/auth/operator.env)"


def test_an_older_stack_record_reads_as_auth_off(tmp_path):
    path = tmp_path / "stack.json"
    path.write_text(
        '{"tracking_uri": "http://127.0.0.1:5000", "mlflow_port": 5000, "http_port": 8080, '
        '"sidecar_port": 8083, "started_at": "2026-11-01T00:00:00.000Z"}'
    )
    assert local.StackRecord.read(path).auth is False


# --- main: credentials before any command ------------------------------------------------


def test_main_loads_the_picked_file_into_mlflows_variables(clean_env, monkeypatch, capsys):
    """The command fails later (no server answers); by then the operator's credentials are set."""
    _auth_stack(clean_env)
    code = cli.main(["status"])
    assert code == 1
    operator = read_credentials(clean_env / "auth" / "operator.env")
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == operator
    assert "does not answer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"MLFLOW_TRACKING_PASSWORD": "x" * 20},
            "MLFLOW_TRACKING_PASSWORD is set but MLFLOW_TRACKING_USERNAME is not",
        ),
        (
            {"MLFLOW_TRACKING_USERNAME": "someone"},
            "MLFLOW_TRACKING_USERNAME is set but MLFLOW_TRACKING_PASSWORD is not",
        ),
        (
            {"CREDIT_RISK_CREDENTIALS_FILE": "{file}", "MLFLOW_TRACKING_USERNAME": "someone-else"},
            "CREDIT_RISK_CREDENTIALS_FILE={file} and MLFLOW_TRACKING_USERNAME are both set, differently: use one",
        ),
        ({"CREDIT_RISK_CREDENTIALS_FILE": "{nowhere}"}, "{nowhere}: no such credentials file"),
    ],
)
def test_unusable_credentials_in_the_environment_are_usage_errors(
    clean_env, monkeypatch, capsys, tmp_path, env, expected
):
    file = tmp_path / "operator.env"
    file.write_text(Credentials("operator", generated_password()).env_text())
    paths = {"file": file, "nowhere": tmp_path / "nowhere.env"}
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(**paths))
    assert cli.main(["status"]) == 2
    assert capsys.readouterr().err == f"error: {expected.format(**paths)}\n"


def test_a_missing_file_of_the_local_stack_is_a_failure_not_a_usage_error(clean_env, capsys):
    _auth_stack(clean_env, identities=())
    assert cli.main(["records"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the local stack (") and "monitor.env is missing" in err


# --- The launcher ----------------------------------------------------------------------------


def test_auth_defaults_follow_the_state_folder_and_the_backend_store(clean_env):
    settings = TrackingServerSettings()
    assert settings.auth is False
    assert settings.auth_dir == clean_env / "auth"
    assert settings.auth_database() == f"sqlite:///{(clean_env / 'auth' / 'basic_auth.db').resolve()}"
    assert settings.auth_config_path() == clean_env / "auth" / "basic_auth.ini"
    # PostgreSQL: users and grants in MLflow's own database; a given URI wins.
    on_postgres = TrackingServerSettings(backend_store_uri=PG_URI, artifacts_destination="/a")
    assert on_postgres.auth_database() == PG_URI
    other = "postgresql+psycopg2://auth:pw@db:5432/auth"
    assert (
        TrackingServerSettings(
            backend_store_uri=PG_URI, artifacts_destination="/a", auth_database_uri=other
        ).auth_database()
        == other
    )


def test_auth_variables_and_bad_values(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("CREDIT_RISK_AUTH", "1")
    monkeypatch.setenv("CREDIT_RISK_AUTH_DIR", str(tmp_path / "secrets"))
    monkeypatch.setenv("CREDIT_RISK_AUTH_CONFIG", str(tmp_path / "ini" / "auth.ini"))
    settings = TrackingServerSettings()
    assert (settings.auth, settings.auth_dir, settings.auth_config_path()) == (
        True,
        tmp_path / "secrets",
        tmp_path / "ini" / "auth.ini",
    )
    monkeypatch.setenv("CREDIT_RISK_AUTH", "maybe")
    monkeypatch.setenv("CREDIT_RISK_AUTH_DATABASE_URI", "auth:s3cret@db/auth")
    with pytest.raises(ValidationError) as raised:
        TrackingServerSettings()
    assert settings_errors(raised.value) == [
        "CREDIT_RISK_AUTH='maybe': Input should be a valid boolean, unable to interpret input",
        "CREDIT_RISK_AUTH_DATABASE_URI='auth:***@db/auth': must be a database URL such as "
        "postgresql+psycopg2://user:password@host:5432/db",
    ]


def test_the_command_gets_the_app_only_with_auth(clean_env):
    off, on = TrackingServerSettings(), TrackingServerSettings(auth=True)
    assert "--app-name" not in mlflow_command(off, Listen())
    assert mlflow_command(on, Listen())[-2:] == ["--app-name", "basic-auth"]


def test_secrets_reach_mlflow_in_its_environment_only(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("CREDIT_RISK_ADMIN_PASSWORD", "an-admin-password-from-the-environment")
    settings = TrackingServerSettings(auth=True)
    env = prepare_auth(settings)
    assert set(env) == {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    command = mlflow_command(settings, Listen())
    assert not any(value in " ".join(command) for value in env.values())
    mlflow_env = mlflow_environment(settings, env)
    assert {k: mlflow_env[k] for k in env} == env
    assert "CREDIT_RISK_ADMIN_PASSWORD" not in mlflow_env  # the launcher's alone
    # Everything is private: the folder, the config, the key, admin's file, the SQLite database.
    auth = clean_env / "auth"
    assert stat.S_IMODE(auth.stat().st_mode) == 0o700
    for name in ("basic_auth.ini", "flask_secret_key", "admin.env", "basic_auth.db"):
        assert stat.S_IMODE((auth / name).stat().st_mode) == 0o600, name
    assert "an-admin-password-from-the-environment" in (auth / "admin.env").read_text()
    # Without auth, nothing of it is added.
    assert "MLFLOW_AUTH_CONFIG_PATH" not in mlflow_environment(TrackingServerSettings(), env)


def test_admin_overrides_and_unusable_admin_passwords_are_refused_before_anything_starts(
    clean_env, monkeypatch
):
    settings = TrackingServerSettings(auth=True)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "whatever-it-is-123")
    with pytest.raises(
        UsageError, match="MLFLOW_AUTH_ADMIN_PASSWORD set: with --auth the admin's password is"
    ):
        check_auth_environment(settings)
    check_auth_environment(TrackingServerSettings())  # without auth it does not matter
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD")
    monkeypatch.setenv("CREDIT_RISK_ADMIN_PASSWORD", "short")
    with pytest.raises(UsageError, match="CREDIT_RISK_ADMIN_PASSWORD: the password must be at least 12"):
        check_auth_environment(settings)
    assert not (clean_env / "auth").exists()


def test_the_auth_off_line_is_one_line_saying_who():
    loopback = auth_off_line(Listen(port=5000))
    assert loopback == (
        "auth off: anyone on this machine can read and change every run, model version, stage and alias "
        "at 127.0.0.1:5000, Production included; --auth (CREDIT_RISK_AUTH=1) turns on MLflow's basic-auth"
    )
    assert auth_off_line(Listen(host="0.0.0.0", port=5000)).startswith("auth off: anyone who reaches it ")


# --- Services ------------------------------------------------------------------------------


def test_the_tracking_server_service_is_explicit_about_auth(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDIT_RISK_AUTH", "1")  # inherited: must not turn auth on
    off = services.mlflow(tmp_path / "mlflow", port=1234)
    assert off.environment()["CREDIT_RISK_AUTH"] == "0" and "--auth-dir" not in off.command
    on = services.mlflow(tmp_path / "mlflow", port=1234, auth_dir=tmp_path / "auth")
    assert on.environment()["CREDIT_RISK_AUTH"] == "1"
    assert on.command[-2:] == ["--auth-dir", str((tmp_path / "auth").resolve())]


def test_a_service_can_drop_inherited_variables(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "the-person-running-up")
    service = Service("x", ["true"], "http://127.0.0.1:1/", {"MLFLOW_TRACKING_USERNAME": None, "A": "1"})
    env = service.environment()
    assert "MLFLOW_TRACKING_USERNAME" not in env and env["A"] == "1"
