"""Credentials on disk (``stack.auth_files``): generated once, private, never overwritten, read
back exactly, and an ini that MLflow's own reader reads back to the same values."""

from __future__ import annotations

import os
import stat

import pytest

from stack.auth_files import (
    ADMIN_PASSWORD_FILE_VARIABLE,
    ADMIN_PASSWORD_VARIABLE,
    AUTH_CONFIG_VARIABLE,
    CREDENTIALS_FILE_VARIABLE,
    SECRET_KEY_VARIABLE,
    Credentials,
    CredentialsError,
    admin_credentials,
    auth_config_text,
    check_pair,
    ensure_credentials,
    ensure_secret_key,
    identity_file,
    load_credentials,
    parse_credentials,
    prepare_server,
    read_credentials,
    record_admin,
    unauthorized_message,
    using_credentials,
)

PASSWORD = "a-long-enough-password-%:#;=x"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_generated_credentials_are_private_and_never_overwritten(tmp_path):
    directory = tmp_path / "auth"
    old_umask = os.umask(0o000)  # the worst umask: files would be world-writable by default
    try:
        first = ensure_credentials(directory, "trainer")
    finally:
        os.umask(old_umask)
    path = identity_file(directory, "trainer")
    assert (_mode(directory), _mode(path)) == (0o700, 0o600)
    assert (
        path.read_text() == f"MLFLOW_TRACKING_USERNAME=trainer\nMLFLOW_TRACKING_PASSWORD={first.password}\n"
    )
    assert len(first.password) >= 32
    before = path.stat().st_mtime_ns
    assert ensure_credentials(directory, "trainer") == first
    assert path.stat().st_mtime_ns == before
    assert ensure_credentials(directory, "serving").password != first.password
    path.unlink()  # how a password is rotated: delete its file
    assert ensure_credentials(directory, "trainer").password != first.password


def test_repr_never_shows_the_password():
    credentials = Credentials("trainer", PASSWORD)
    assert PASSWORD not in repr(credentials) and PASSWORD not in str(credentials)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("MLFLOW_TRACKING_USERNAME=trainer\n", "MLFLOW_TRACKING_PASSWORD is missing or empty"),
        ("MLFLOW_TRACKING_PASSWORD=" + PASSWORD + "\n", "MLFLOW_TRACKING_USERNAME is missing or empty"),
        ("MLFLOW_TRACKING_USERNAME=t\nMLFLOW_TRACKING_PASSWORD=short\n", "at least 12 characters"),
        ("MLFLOW_TRACKING_USERNAME=t\nMLFLOW_TRACKING_PASSWORD= " + PASSWORD + "\n", "white space"),
        ("MLFLOW_TRACKING_USERNAME=t\nMLFLOW_TRACKING_PASSWORD=password1234\n", "old published default"),
        ("MLFLOW_TRACKING_USERNAME=t\nPASSWORD=" + PASSWORD + "\n", "line 2 is not"),
        ("MLFLOW_TRACKING_USERNAME=t\nMLFLOW_TRACKING_USERNAME=u\n", "set twice"),
    ],
)
def test_malformed_files_are_refused_naming_the_file(text, message):
    with pytest.raises(CredentialsError, match=message) as raised:
        parse_credentials(text, "/x/trainer.env")
    assert str(raised.value).startswith("/x/trainer.env: ")
    assert PASSWORD not in str(raised.value)


def test_comments_and_blank_lines_are_allowed():
    text = f"# trainer\n\nMLFLOW_TRACKING_USERNAME=trainer\nMLFLOW_TRACKING_PASSWORD={PASSWORD}\n"
    assert parse_credentials(text, "f") == Credentials("trainer", PASSWORD)


def test_a_file_for_another_identity_is_refused(tmp_path):
    identity_file(tmp_path, "trainer").write_text(Credentials("serving", PASSWORD).env_text())
    with pytest.raises(CredentialsError, match="MLFLOW_TRACKING_USERNAME is 'serving', expected 'trainer'"):
        ensure_credentials(tmp_path, "trainer")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CredentialsError, match=r"trainer\.env: no such credentials file"):
        read_credentials(tmp_path / "trainer.env")


def test_admin_password_from_the_environment(tmp_path):
    # Nothing set: generated and kept.
    generated = admin_credentials(tmp_path, {})
    assert generated.previous is None and admin_credentials(tmp_path, {}).current == generated.current
    # The variable set: it is the password to use; the file still holds the one the server
    # may know, until record_admin (after the server accepted the change).
    changed = admin_credentials(tmp_path, {ADMIN_PASSWORD_VARIABLE: PASSWORD})
    assert changed.current == Credentials("admin", PASSWORD) and changed.previous == generated.current
    assert read_credentials(identity_file(tmp_path, "admin")) == generated.current
    record_admin(tmp_path, changed.current)
    assert _mode(identity_file(tmp_path, "admin")) == 0o600
    assert admin_credentials(tmp_path, {ADMIN_PASSWORD_VARIABLE: PASSWORD}) == (changed.current, None)


def test_admin_password_first_set_from_the_environment_is_written(tmp_path):
    assert admin_credentials(tmp_path, {ADMIN_PASSWORD_VARIABLE: PASSWORD}) == (
        Credentials("admin", PASSWORD),
        None,
    )
    assert read_credentials(identity_file(tmp_path, "admin")).password == PASSWORD


def test_admin_password_from_a_secret_file(tmp_path):
    secret = tmp_path / "admin_password"
    secret.write_text(PASSWORD + "\n")  # as `echo ... > file` and most secret stores write it
    found = admin_credentials(tmp_path / "auth", {ADMIN_PASSWORD_FILE_VARIABLE: str(secret)})
    assert found.current.password == PASSWORD
    with pytest.raises(CredentialsError, match="both CREDIT_RISK_ADMIN_PASSWORD and"):
        admin_credentials(
            tmp_path / "auth", {ADMIN_PASSWORD_FILE_VARIABLE: str(secret), ADMIN_PASSWORD_VARIABLE: "x"}
        )
    with pytest.raises(CredentialsError, match=r"CREDIT_RISK_ADMIN_PASSWORD_FILE=.*cannot read it"):
        admin_credentials(tmp_path / "auth", {ADMIN_PASSWORD_FILE_VARIABLE: str(tmp_path / "absent")})


def test_a_bad_admin_password_names_the_variable_not_the_value(tmp_path):
    with pytest.raises(CredentialsError) as raised:
        admin_credentials(tmp_path, {ADMIN_PASSWORD_VARIABLE: "tooshort"})
    assert str(raised.value) == "CREDIT_RISK_ADMIN_PASSWORD: the password must be at least 12 characters"


def test_the_ini_reads_back_through_mlflows_own_reader(tmp_path, monkeypatch):
    """A ``%`` in the password and a percent-encoded database password survive configparser's
    interpolation, which MLflow's reader applies."""
    from mlflow.server.auth.config import read_auth_config

    uri = "postgresql+psycopg2://mlflow:p%40ss%25word@db:5432/mlflow"
    path = tmp_path / "basic_auth.ini"
    path.write_text(auth_config_text(uri, Credentials("admin", PASSWORD)))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    for variable in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(variable, raising=False)
    config = read_auth_config()
    assert (config.database_uri, config.admin_username, config.admin_password) == (uri, "admin", PASSWORD)
    assert config.default_permission == "NO_PERMISSIONS"
    assert config.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"
    assert config.grant_default_workspace_access is False
    assert config.auth_cache_ttl_seconds == 60


def test_prepare_server_writes_private_files_once(tmp_path):
    environment = prepare_server(tmp_path / "auth", environ={})
    ini = tmp_path / "auth" / "basic_auth.ini"
    assert environment[AUTH_CONFIG_VARIABLE] == str(ini.resolve())
    assert len(environment[SECRET_KEY_VARIABLE]) == 64
    for name in ("basic_auth.ini", "flask_secret_key", "admin.env"):
        assert _mode(tmp_path / "auth" / name) == 0o600, name
    assert f"sqlite:///{(tmp_path / 'auth' / 'basic_auth.db').resolve()}" in ini.read_text()
    assert prepare_server(tmp_path / "auth", environ={}) == environment  # key and ini kept
    assert ensure_secret_key(tmp_path / "auth") == environment[SECRET_KEY_VARIABLE]


def test_load_credentials_puts_the_file_into_mlflows_variables(tmp_path):
    path = identity_file(tmp_path, "serving")
    path.write_text(Credentials("serving", PASSWORD).env_text())
    environ = {CREDENTIALS_FILE_VARIABLE: str(path)}
    assert load_credentials(environ) == Credentials("serving", PASSWORD)
    assert (
        environ["MLFLOW_TRACKING_USERNAME"] == "serving" and environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    )
    assert load_credentials(environ) == Credentials("serving", PASSWORD)  # a child process inherits both
    environ["MLFLOW_TRACKING_USERNAME"] = "trainer"
    with pytest.raises(CredentialsError, match="MLFLOW_TRACKING_USERNAME are both set, differently"):
        load_credentials(environ)


def test_load_credentials_without_a_file(tmp_path):
    assert load_credentials({}) is None
    assert load_credentials({"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": PASSWORD}) is None
    with pytest.raises(
        CredentialsError, match="MLFLOW_TRACKING_USERNAME is set but MLFLOW_TRACKING_PASSWORD is not"
    ):
        load_credentials({"MLFLOW_TRACKING_USERNAME": "u"})
    with pytest.raises(
        CredentialsError, match="MLFLOW_TRACKING_PASSWORD is set but MLFLOW_TRACKING_USERNAME is not"
    ):
        check_pair({"MLFLOW_TRACKING_PASSWORD": PASSWORD})
    with pytest.raises(CredentialsError, match=r"absent\.env: no such credentials file"):
        load_credentials({CREDENTIALS_FILE_VARIABLE: str(tmp_path / "absent.env")})


def test_unauthorized_message_says_what_to_set():
    uri = "http://mlflow:5000"
    assert "requires credentials (401): set CREDIT_RISK_CREDENTIALS_FILE" in unauthorized_message(uri, {})
    assert "refused the credentials in /a/b.env" in unauthorized_message(
        uri, {CREDENTIALS_FILE_VARIABLE: "/a/b.env"}
    )
    message = unauthorized_message(
        uri, {"MLFLOW_TRACKING_USERNAME": "x", "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    )
    assert "refused the credentials of 'x'" in message and PASSWORD not in message


def test_using_credentials_puts_the_variables_back(tmp_path):
    path = identity_file(tmp_path, "trainer")
    path.write_text(Credentials("trainer", PASSWORD).env_text())
    environ = {"MLFLOW_TRACKING_URI": "http://x"}
    with using_credentials(path, environ) as credentials:
        assert credentials.username == "trainer"
        assert (environ["MLFLOW_TRACKING_USERNAME"], environ["MLFLOW_TRACKING_PASSWORD"]) == (
            "trainer",
            PASSWORD,
        )
    assert environ == {"MLFLOW_TRACKING_URI": "http://x"}
    environ["MLFLOW_TRACKING_USERNAME"] = "someone"
    with pytest.raises(RuntimeError), using_credentials(path, environ):
        raise RuntimeError("training failed")
    assert environ == {"MLFLOW_TRACKING_URI": "http://x", "MLFLOW_TRACKING_USERNAME": "someone"}


def test_per_identity_folders(tmp_path):
    """One folder per identity (one volume or Secret each); admin's file stays at the top."""
    assert (
        identity_file(tmp_path, "serving", per_identity_folders=True) == tmp_path / "serving" / "serving.env"
    )
    assert identity_file(tmp_path, "admin", per_identity_folders=True) == tmp_path / "admin.env"
    credentials = ensure_credentials(tmp_path, "serving", per_identity_folders=True)
    assert read_credentials(tmp_path / "serving" / "serving.env") == credentials
    assert _mode(tmp_path / "serving") == 0o700
