"""The identities' credentials on disk, and the files MLflow's basic-auth app needs to start.

A credentials folder (``<state-dir>/auth`` for ``credit-risk up``; a volume or a Secret in
containers) holds:

| file | written | read by |
| --- | --- | --- |
| ``<identity>.env`` | once, with a random password | the identity's processes, through ``CREDIT_RISK_CREDENTIALS_FILE`` |
| ``admin.env`` | once; follows ``CREDIT_RISK_ADMIN_PASSWORD`` when that is set | provisioning, people |
| ``flask_secret_key`` | once | the tracking server (``MLFLOW_FLASK_SERVER_SECRET_KEY``) |
| ``basic_auth.ini`` | whenever its content would change | the tracking server (``MLFLOW_AUTH_CONFIG_PATH``) |

An ``<identity>.env`` file is two lines, ``MLFLOW_TRACKING_USERNAME=<identity>`` and
``MLFLOW_TRACKING_PASSWORD=<password>``: MLflow's own variables, so the file also works with
``docker --env-file`` and ``set -a; . file``.

Invariants:

- Every file is created with mode 0600 in a folder created with mode 0700, whatever the umask;
  rewritten files are replaced atomically, never left half-written.
- A generated password is never overwritten, so a restart keeps it. To rotate one, delete its
  file: the next provisioning generates a new one and sets it on the server.
- There is no default password anywhere. A missing, unreadable or malformed credential is a
  ``CredentialsError`` whose one-line message names the file or variable.
- Standard library only: ``credit-risk`` loads a credentials file before every command.
"""

from __future__ import annotations

import configparser
import io
import os
import secrets
import tempfile
from collections.abc import MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

USERNAME_VARIABLE = "MLFLOW_TRACKING_USERNAME"
PASSWORD_VARIABLE = "MLFLOW_TRACKING_PASSWORD"
CREDENTIALS_FILE_VARIABLE = "CREDIT_RISK_CREDENTIALS_FILE"
ADMIN_PASSWORD_VARIABLE = "CREDIT_RISK_ADMIN_PASSWORD"
ADMIN_PASSWORD_FILE_VARIABLE = "CREDIT_RISK_ADMIN_PASSWORD_FILE"
# What MLflow's basic-auth app reads (mlflow/environment_variables.py).
AUTH_CONFIG_VARIABLE = "MLFLOW_AUTH_CONFIG_PATH"
SECRET_KEY_VARIABLE = "MLFLOW_FLASK_SERVER_SECRET_KEY"

ADMIN = "admin"
SECRET_KEY_FILE = "flask_secret_key"
AUTH_CONFIG_FILE = "basic_auth.ini"
AUTH_DATABASE_FILE = "basic_auth.db"
# MLflow's own rule (mlflow/utils/validation.py ``_validate_password``) and its refused default.
MIN_PASSWORD_LENGTH = 12
_LEGACY_DEFAULT_PASSWORD = "password1234"
_GENERATED_PASSWORD_BYTES = 24  # 32 URL-safe characters, 192 bits


class CredentialsError(RuntimeError):
    """A credential is missing, unreadable or malformed; the message names it, never its value."""


class Credentials(NamedTuple):
    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***)"

    def env_text(self) -> str:
        return f"{USERNAME_VARIABLE}={self.username}\n{PASSWORD_VARIABLE}={self.password}\n"


def identity_file(directory: Path, identity: str, per_identity_folders: bool = False) -> Path:
    """``<directory>/<identity>.env``; with ``per_identity_folders``, ``<directory>/<identity>/<identity>.env``
    for every identity but admin, so that each folder can be its own volume or Secret mounted
    into that identity's containers only. Admin's file stays beside the server's."""
    if per_identity_folders and identity != ADMIN:
        return Path(directory) / identity / f"{identity}.env"
    return Path(directory) / f"{identity}.env"


def check_password(password: str, source: str) -> str:
    """``password`` if MLflow will accept it and a ``.env`` line can hold it unchanged."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise CredentialsError(f"{source}: the password must be at least {MIN_PASSWORD_LENGTH} characters")
    if any(c in password for c in "\r\n\x00"):
        raise CredentialsError(f"{source}: the password must not contain a line break or NUL")
    if password != password.strip():
        raise CredentialsError(f"{source}: the password must not start or end with white space")
    if password == _LEGACY_DEFAULT_PASSWORD:
        raise CredentialsError(f"{source}: that is MLflow's old published default password")
    return password


def parse_credentials(text: str, source: str) -> Credentials:
    """The two lines of an ``<identity>.env`` file, exactly; anything else is refused."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, equals, value = line.partition("=")
        if not equals or key not in (USERNAME_VARIABLE, PASSWORD_VARIABLE):
            raise CredentialsError(
                f"{source}: line {number} is not {USERNAME_VARIABLE}=... or {PASSWORD_VARIABLE}=..."
            )
        if key in values:
            raise CredentialsError(f"{source}: {key} is set twice")
        values[key] = value
    for key in (USERNAME_VARIABLE, PASSWORD_VARIABLE):
        if not values.get(key):
            raise CredentialsError(f"{source}: {key} is missing or empty")
    return Credentials(values[USERNAME_VARIABLE], check_password(values[PASSWORD_VARIABLE], source))


def read_credentials(path: Path) -> Credentials:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialsError(f"{path}: no such credentials file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CredentialsError(f"{path}: cannot read it ({type(error).__name__}: {error})") from None
    return parse_credentials(text, str(path))


def private_folder(directory: Path) -> Path:
    """``directory``, created with mode 0700 if it does not exist (an existing one is left as is:
    it may be a mounted volume or Secret)."""
    directory = Path(directory)
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
    return directory


def write_once(path: Path, text: str) -> bool:
    """Create ``path`` (mode 0600) holding ``text``; False, untouched, if it already exists."""
    private_folder(path.parent)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(descriptor, 0o600)  # whatever the umask
        with open(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # never leave a half-written credential behind
        raise
    return True


def replace_private(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` (mode 0600) atomically; False if it already held exactly it."""
    private_folder(path.parent)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(descriptor, 0o600)
        with open(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


def generated_password() -> str:
    return secrets.token_urlsafe(_GENERATED_PASSWORD_BYTES)


def ensure_credentials(directory: Path, identity: str, per_identity_folders: bool = False) -> Credentials:
    """``identity``'s credentials from its file, made with a random password the first time."""
    path = identity_file(directory, identity, per_identity_folders)
    if not path.exists():
        write_once(path, Credentials(identity, generated_password()).env_text())
    credentials = read_credentials(path)
    if credentials.username != identity:
        raise CredentialsError(
            f"{path}: {USERNAME_VARIABLE} is {credentials.username!r}, expected {identity!r}"
        )
    return credentials


def admin_password_from(environ: MutableMapping[str, str]) -> str | None:
    """The admin password the environment asks for (``CREDIT_RISK_ADMIN_PASSWORD``, or the file
    ``CREDIT_RISK_ADMIN_PASSWORD_FILE`` names, e.g. a compose or Kubernetes secret), or None."""
    direct, file = environ.get(ADMIN_PASSWORD_VARIABLE), environ.get(ADMIN_PASSWORD_FILE_VARIABLE)
    if direct and file:
        raise CredentialsError(
            f"both {ADMIN_PASSWORD_VARIABLE} and {ADMIN_PASSWORD_FILE_VARIABLE} are set: use one"
        )
    if file:
        try:
            content = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CredentialsError(
                f"{ADMIN_PASSWORD_FILE_VARIABLE}={file}: cannot read it ({error})"
            ) from None
        # A secret file usually ends with a newline that is not part of the password.
        password = content[:-1] if content.endswith("\n") else content
        return check_password(password, f"{ADMIN_PASSWORD_FILE_VARIABLE}={file}") if password else None
    if direct:
        return check_password(direct, ADMIN_PASSWORD_VARIABLE)
    return None


class AdminCredentials(NamedTuple):
    """The admin password to use, and the one on disk before it if the environment changed it
    (the server may still know only that one)."""

    current: Credentials
    previous: Credentials | None


def admin_credentials(directory: Path, environ: MutableMapping[str, str] = os.environ) -> AdminCredentials:
    """The admin's credentials: from the environment when it sets a password, else from
    ``admin.env``, else generated (and written) now. ``admin.env`` is rewritten to a new
    password from the environment only by ``record_admin``, once the server accepted it."""
    path = identity_file(directory, ADMIN)
    wanted = admin_password_from(environ)
    if wanted is not None and not path.exists():
        write_once(path, Credentials(ADMIN, wanted).env_text())
    on_disk = ensure_credentials(directory, ADMIN)
    if wanted is None or wanted == on_disk.password:
        return AdminCredentials(on_disk, None)
    return AdminCredentials(Credentials(ADMIN, wanted), on_disk)


def record_admin(directory: Path, credentials: Credentials) -> bool:
    return replace_private(identity_file(directory, ADMIN), credentials.env_text())


def ensure_secret_key(directory: Path) -> str:
    path = Path(directory) / SECRET_KEY_FILE
    write_once(path, secrets.token_hex(32) + "\n")
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < 32:
        raise CredentialsError(f"{path}: the secret key is shorter than 32 characters")
    return key


# How long each server worker trusts a password it has checked. MLflow hashes passwords with
# scrypt (werkzeug's default), which costs 0.1-0.9 s of server CPU per check on this machine,
# and checks on every request unless this cache is on. The price: a changed or deleted password
# keeps working for up to this long on the workers that did not handle the change.
AUTH_CACHE_TTL_S = 60


def auth_config_text(database_uri: str, admin: Credentials, cache_ttl_s: int = AUTH_CACHE_TTL_S) -> str:
    """MLflow's ``basic_auth.ini``: nobody may do anything without a grant, and the admin it
    creates on an empty auth database. Values are escaped for configparser's interpolation
    (a ``%`` in a password or a percent-encoded URL)."""
    config = configparser.ConfigParser(interpolation=None)
    config["mlflow"] = {
        "default_permission": "NO_PERMISSIONS",
        "database_uri": database_uri.replace("%", "%%"),
        "admin_username": admin.username,
        "admin_password": admin.password.replace("%", "%%"),
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
        "auth_cache_ttl_seconds": str(cache_ttl_s),
    }
    buffer = io.StringIO()
    config.write(buffer)
    return buffer.getvalue()


def default_auth_database(directory: Path) -> str:
    return f"sqlite:///{(Path(directory) / AUTH_DATABASE_FILE).resolve()}"


def prepare_server(
    directory: Path,
    database_uri: str | None = None,
    config_path: Path | None = None,
    environ: MutableMapping[str, str] = os.environ,
    cache_ttl_s: int = AUTH_CACHE_TTL_S,
) -> dict[str, str]:
    """Write what the tracking server needs before it starts with ``--app-name basic-auth``;
    return the variables to start it with. ``config_path`` may lie outside ``directory`` when
    that is read-only (a mounted Secret holding ``admin.env`` and ``flask_secret_key``)."""
    directory = private_folder(directory)
    admin = admin_credentials(directory, environ).current
    config_path = Path(config_path or directory / AUTH_CONFIG_FILE)
    config = auth_config_text(database_uri or default_auth_database(directory), admin, cache_ttl_s)
    replace_private(config_path, config)
    return {
        AUTH_CONFIG_VARIABLE: str(config_path.resolve()),
        SECRET_KEY_VARIABLE: ensure_secret_key(directory),
    }


@contextmanager
def using_credentials(path: Path, environ: MutableMapping[str, str] = os.environ):
    """Within the block, MLflow's client in this process acts as the identity of the file at
    ``path`` (``credit-risk up`` trains in-process as ``trainer``); the variables are put back
    afterwards, so that processes started later do not inherit them."""
    credentials = read_credentials(Path(path))
    saved = {variable: environ.get(variable) for variable in (USERNAME_VARIABLE, PASSWORD_VARIABLE)}
    environ[USERNAME_VARIABLE], environ[PASSWORD_VARIABLE] = credentials
    try:
        yield credentials
    finally:
        for variable, value in saved.items():
            if value is None:
                environ.pop(variable, None)
            else:
                environ[variable] = value


def load_credentials(environ: MutableMapping[str, str] = os.environ) -> Credentials | None:
    """Put the credentials of the file ``CREDIT_RISK_CREDENTIALS_FILE`` names into
    ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD`` of ``environ`` (this process
    and its children), where MLflow's client reads them. None when the variable is unset.

    The password then lives in a file a container mounts, not in a variable ``docker inspect``
    or a pod spec shows. Set the MLflow variables yourself, or this one, not both differently.
    """
    if not (path := environ.get(CREDENTIALS_FILE_VARIABLE)):
        check_pair(environ)
        return None
    credentials = read_credentials(Path(path))
    for variable, value in (
        (USERNAME_VARIABLE, credentials.username),
        (PASSWORD_VARIABLE, credentials.password),
    ):
        if environ.get(variable, value) != value:
            raise CredentialsError(
                f"{CREDENTIALS_FILE_VARIABLE}={path} and {variable} are both set, differently: use one"
            )
    environ[USERNAME_VARIABLE], environ[PASSWORD_VARIABLE] = credentials
    return credentials


def check_pair(environ: MutableMapping[str, str] = os.environ) -> None:
    """Refuse half a pair of MLflow credentials, which MLflow would send as is."""
    has_user, has_password = bool(environ.get(USERNAME_VARIABLE)), bool(environ.get(PASSWORD_VARIABLE))
    if has_user != has_password:
        present, absent = (
            (USERNAME_VARIABLE, PASSWORD_VARIABLE) if has_user else (PASSWORD_VARIABLE, USERNAME_VARIABLE)
        )
        raise CredentialsError(f"{present} is set but {absent} is not")


def unauthorized_message(tracking_uri: str, environ: MutableMapping[str, str] = os.environ) -> str:
    """What to tell a user whose request the tracking server answered 401."""
    if file := environ.get(CREDENTIALS_FILE_VARIABLE):
        return f"the tracking server at {tracking_uri} refused the credentials in {file} (401)"
    if environ.get(USERNAME_VARIABLE):
        return (
            f"the tracking server at {tracking_uri} refused the credentials of "
            f"{environ[USERNAME_VARIABLE]!r} in {USERNAME_VARIABLE}/{PASSWORD_VARIABLE} (401)"
        )
    return (
        f"the tracking server at {tracking_uri} requires credentials (401): set "
        f"{CREDENTIALS_FILE_VARIABLE} to an identity's .env file (e.g. .credit-risk/auth/operator.env), "
        f"or {USERNAME_VARIABLE} and {PASSWORD_VARIABLE}"
    )
