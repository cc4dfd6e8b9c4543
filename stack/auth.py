"""Provisioning: this stack's experiments, registered model, identities, passwords and exactly
their grants (``stack.auth_policy``), on a running tracking server started with MLflow's
basic-auth app, done as its admin.

``provision`` is idempotent and converges: run again on an unchanged server it changes
nothing and says so. Each run

1. logs in as ``admin`` (``admin.env``, or ``CREDIT_RISK_ADMIN_PASSWORD``; when that variable
   changed, it logs in with the password ``admin.env`` still holds, moves the admin to the new
   one and only then rewrites ``admin.env``);
2. creates the four experiments and the registered model if missing, and restores a deleted
   experiment; the admin creates them, so no other identity becomes their owner (MLflow makes
   the creator of an experiment or model its MANAGE holder);
3. for each other identity: creates the user with the password in its ``<identity>.env``
   (generated the first time) or sets that password again (it reports the change when the
   server refused the file's password), and clears an admin flag it should not have;
4. grants exactly the policy's lines and removes or reduces any other grant these identities
   hold that reaches these resources: on them by id or name, on every resource of their type
   (``*``), on a sub-resource tier (runs, logged models, versions, ...) or on the workspace;
   a role other than the identity's own that carries such a grant is unassigned from it.
   Grants of these identities on other resources are left in place and reported;
5. reports other users who can read the inference records (MLflow admins, grants), without
   changing them: they are not this stack's identities.

Everything goes through MLflow's REST API with the admin's credentials, one request at a time;
a refusal is a ``ProvisioningError`` with one line naming the request and MLflow's reason.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from stack import auth_policy as policy
from stack.auth_files import (
    ADMIN,
    SECRET_KEY_FILE,
    Credentials,
    admin_credentials,
    ensure_credentials,
    ensure_secret_key,
    identity_file,
    record_admin,
)
from training.registry import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

# Every experiment here is model work, none is GenAI: the MLflow UI opens them as model training.
_EXPERIMENT_KIND = {"key": EXPERIMENT_KIND_TAG, "value": MODEL_TRAINING_KIND}
# Grants on these tiers are wildcard-only in MLflow 3.17 and decide for every experiment or
# model at once (permissions.TYPE), so any such grant reaches this stack's resources.
_SUB_RESOURCE_TYPES = frozenset(
    {
        "run",
        "trace",
        "assessment",
        "logged_model",
        "review_queue",
        "registered_model_version",
        "prompt_version",
        "scorer",
        "scorer_version",
    }
)
_TIMEOUT_S = 30


class ProvisioningError(RuntimeError):
    """Provisioning could not finish; one line, with no password in it."""


class Refused(ProvisioningError):
    def __init__(self, message: str, status: int, error_code: str | None):
        super().__init__(message)
        self.status, self.error_code = status, error_code


class AdminClient:
    """The REST requests provisioning makes, as one user (the admin, or anyone for ``login``)."""

    def __init__(self, tracking_uri: str, credentials: Credentials, timeout: float = _TIMEOUT_S):
        self.tracking_uri = tracking_uri.rstrip("/")
        self.username = credentials.username
        self._http = httpx.Client(base_url=self.tracking_uri, auth=tuple(credentials), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, *, missing_ok: bool = False, **kwargs) -> dict | None:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ProvisioningError(
                f"tracking server at {self.tracking_uri} did not answer {method} {path}: {error}"
            ) from None
        if response.status_code == 401:
            raise Refused(
                f"the tracking server at {self.tracking_uri} refused the credentials of {self.username!r} (401)",
                401,
                None,
            )
        if missing_ok and response.status_code == 404:
            return None
        if response.status_code >= 400:
            try:
                body = response.json()
                code, message = body.get("error_code"), body.get("message", "")
            except ValueError:
                code, message = None, response.text.strip()[:300]
            raise Refused(
                f"{method} {path} answered {response.status_code}: {code or ''} {message}".strip(),
                response.status_code,
                code,
            )
        return response.json() if response.content else {}

    def login(self) -> bool:
        """Whether these credentials are accepted; raises if the server has no basic-auth app."""
        try:
            self.call("GET", "/api/2.0/mlflow/users/current")
            return True
        except Refused as error:
            if error.status == 401:
                return False
            if error.status == 404:
                raise ProvisioningError(
                    f"the tracking server at {self.tracking_uri} has no users API: it was not started "
                    "with --app-name basic-auth"
                ) from None
            raise

    # Users and grants
    def user(self, username: str) -> dict | None:
        found = self.call("GET", "/api/2.0/mlflow/users/get", params={"username": username}, missing_ok=True)
        return None if found is None else found["user"]

    def users(self) -> list[dict]:
        return self.call("GET", "/api/2.0/mlflow/users/list").get("users", [])

    def create_user(self, credentials: Credentials) -> dict:
        body = {"username": credentials.username, "password": credentials.password}
        return self.call("POST", "/api/2.0/mlflow/users/create", json=body)["user"]

    def set_password(self, credentials: Credentials, current: str | None = None) -> None:
        body = {"username": credentials.username, "password": credentials.password}
        if current is not None:  # changing one's own password needs the current one
            body["current_password"] = current
        self.call("PATCH", "/api/2.0/mlflow/users/update-password", json=body)

    def set_admin(self, username: str, is_admin: bool) -> None:
        self.call(
            "PATCH", "/api/2.0/mlflow/users/update-admin", json={"username": username, "is_admin": is_admin}
        )

    def permissions(self, username: str) -> list[dict]:
        found = self.call("GET", "/api/3.0/mlflow/users/permissions/list", params={"username": username})
        return found.get("permissions", [])

    def role_permissions(self, role_id: int) -> list[dict]:
        found = self.call("GET", "/api/3.0/mlflow/roles/permissions/list", params={"role_id": str(role_id)})
        return found.get("role_permissions", [])

    def grant(self, username: str, resource_type: str, resource_id: str, permission: str) -> None:
        body = {
            "username": username,
            "resource_type": resource_type,
            "resource_id": resource_id,
            "permission": permission,
        }
        self.call("POST", "/api/3.0/mlflow/users/permissions/grant", json=body)

    def update_role_permission(self, role_permission_id: int, permission: str) -> None:
        body = {"role_permission_id": role_permission_id, "permission": permission}
        self.call("PATCH", "/api/3.0/mlflow/roles/permissions/update", json=body)

    def remove_role_permission(self, role_permission_id: int) -> None:
        self.call(
            "DELETE",
            "/api/3.0/mlflow/roles/permissions/remove",
            json={"role_permission_id": role_permission_id},
        )

    def unassign_role(self, username: str, role_id: int) -> None:
        self.call("DELETE", "/api/3.0/mlflow/roles/unassign", json={"username": username, "role_id": role_id})

    # Resources
    def experiment(self, name: str) -> dict | None:
        found = self.call(
            "GET",
            "/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": name},
            missing_ok=True,
        )
        return None if found is None else found["experiment"]

    def create_experiment(self, name: str) -> str:
        body = {"name": name, "tags": [_EXPERIMENT_KIND]}
        return self.call("POST", "/api/2.0/mlflow/experiments/create", json=body)["experiment_id"]

    def restore_experiment(self, experiment_id: str) -> None:
        self.call("POST", "/api/2.0/mlflow/experiments/restore", json={"experiment_id": experiment_id})

    def registered_model(self, name: str) -> dict | None:
        found = self.call(
            "GET", "/api/2.0/mlflow/registered-models/get", params={"name": name}, missing_ok=True
        )
        return None if found is None else found["registered_model"]

    def create_registered_model(self, name: str) -> None:
        self.call("POST", "/api/2.0/mlflow/registered-models/create", json={"name": name})


@dataclass
class Report:
    """What provisioning changed, and what it saw and left alone."""

    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    experiment_ids: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True)
class _Resources:
    """The protected resources as grants name them: experiments by id, the model by name."""

    names: policy.Names
    experiment_ids: dict[str, str]  # role -> id

    def pattern(self, grant: policy.Grant) -> str:
        if grant.resource == policy.EVERY:
            return policy.EVERY
        if grant.resource_type == policy.EXPERIMENT:
            return self.experiment_ids[grant.resource]
        return self.names.of(grant.resource)

    def describe(self, resource_type: str, pattern: str) -> str:
        if pattern == policy.EVERY:
            return f"every {resource_type}"
        if resource_type == policy.EXPERIMENT:
            by_id = {v: self.names.experiment(k) for k, v in self.experiment_ids.items()}
            return f"experiment {by_id.get(pattern, pattern)!r} ({pattern})"
        return f"{resource_type} {pattern!r}"

    def reaches(self, row: dict) -> bool:
        """Whether a grant row can decide access to one of the protected resources."""
        kind, pattern = row["resource_type"], row["resource_pattern"]
        if kind in _SUB_RESOURCE_TYPES or kind == "workspace" or pattern == policy.EVERY:
            return True
        if kind == policy.EXPERIMENT:
            return pattern in self.experiment_ids.values()
        return kind in (policy.REGISTERED_MODEL, policy.PROMPT) and pattern == self.names.model


@contextmanager
def _session(tracking: str, credentials: Credentials):
    client = AdminClient(tracking, credentials)
    try:
        yield client
    finally:
        client.close()


def _accepts(tracking: str, credentials: Credentials) -> bool:
    with _session(tracking, credentials) as client:
        return client.login()


def _log_in_as_admin(tracking: str, directory: Path, environ, report: Report) -> AdminClient:
    wanted, previous = admin_credentials(directory, environ)
    client = AdminClient(tracking, wanted)
    if client.login():
        if previous is not None and record_admin(directory, wanted):
            report.changes.append(
                f"{identity_file(directory, ADMIN)}: now holds the admin password the server has"
            )
    elif previous is not None and _accepts(tracking, previous):
        with _session(tracking, previous) as old:
            old.set_password(wanted, current=previous.password)
        record_admin(directory, wanted)
        report.changes.append("admin: password changed to CREDIT_RISK_ADMIN_PASSWORD's")
    else:
        client.close()
        raise ProvisioningError(
            f"the tracking server at {tracking} refused the admin password "
            f"({'CREDIT_RISK_ADMIN_PASSWORD' if previous else identity_file(directory, ADMIN)}): its auth "
            "database has another admin password; set CREDIT_RISK_ADMIN_PASSWORD to it"
        )
    user = client.user(ADMIN)
    if user is None or not user.get("is_admin"):
        client.close()
        raise ProvisioningError(f"user {ADMIN!r} on {tracking} is not an MLflow admin; cannot provision")
    return client


def _ensure_resources(client: AdminClient, names: policy.Names, report: Report) -> _Resources:
    ids = {}
    for role in policy.EXPERIMENT_ROLES:
        name = names.experiment(role)
        found = client.experiment(name)
        if found is None:
            try:
                ids[role] = client.create_experiment(name)
                report.changes.append(f"experiment {name!r}: created ({ids[role]})")
                continue
            except Refused as error:  # created meanwhile by another provisioning
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = client.experiment(name)
        ids[role] = found["experiment_id"]
        if found.get("lifecycle_stage") == "deleted":
            client.restore_experiment(ids[role])
            report.changes.append(f"experiment {name!r}: restored ({ids[role]}), it had been deleted")
    if client.registered_model(names.model) is None:
        try:
            client.create_registered_model(names.model)
            report.changes.append(f"registered model {names.model!r}: created")
        except Refused as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    report.experiment_ids = {names.experiment(role): ids[role] for role in policy.EXPERIMENT_ROLES}
    return _Resources(names, ids)


def _ensure_user(client: AdminClient, credentials: Credentials, report: Report) -> dict:
    name = credentials.username
    user = client.user(name)
    if user is None:
        try:
            user = client.create_user(credentials)
            report.changes.append(f"{name}: user created")
        except Refused as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            user = client.user(name)
    # Set on every run: a login check alone can be fooled for a minute by a worker's credential
    # cache (AUTH_CACHE_TTL_S) after the password was changed on another worker.
    refused = not _accepts(client.tracking_uri, credentials)
    client.set_password(credentials)
    if refused:
        report.changes.append(
            f"{name}: password set to the one in its credentials file (the server had another)"
        )
    if user.get("is_admin"):
        client.set_admin(name, False)
        report.changes.append(f"{name}: was an MLflow admin, no longer")
    return user


def _apply_grants(client: AdminClient, user: dict, resources: _Resources, report: Report) -> None:
    name, own_role = user["username"], f"__user_{user['id']}__"
    wanted = {
        (grant.resource_type, resources.pattern(grant)): grant.permission for grant in policy.grants_of(name)
    }
    held: dict[tuple[str, str], dict] = {}
    unassigned = set()
    for row in client.permissions(name):
        key = (row["resource_type"], row["resource_pattern"])
        where = resources.describe(*key)
        if row["role_name"] != own_role:
            if resources.reaches(row) and row["role_id"] not in unassigned:
                unassigned.add(row["role_id"])
                client.unassign_role(name, row["role_id"])
                report.changes.append(
                    f"{name}: role {row['role_name']!r} unassigned (it grants {row['permission']} on {where})"
                )
            continue
        if key in wanted or resources.reaches(row):
            held[key] = row
        else:
            report.notes.append(
                f"{name}: holds {row['permission']} on {where}, not this stack's; left in place"
            )
    ids = None
    for key, row in held.items():
        if wanted.get(key) == row["permission"]:
            continue
        ids = ids or {
            (p["resource_type"], p["resource_pattern"]): p["id"]
            for p in client.role_permissions(row["role_id"])
        }
        where = resources.describe(*key)
        if key in wanted:
            client.update_role_permission(ids[key], wanted[key])
            report.changes.append(f"{name}: {row['permission']} on {where} changed to {wanted[key]}")
        else:
            client.remove_role_permission(ids[key])
            report.changes.append(f"{name}: {row['permission']} on {where} removed")
    for key, permission in wanted.items():
        if key not in held:
            client.grant(name, *key, permission)
            report.changes.append(f"{name}: granted {permission} on {resources.describe(*key)}")


def _note_other_readers(client: AdminClient, resources: _Resources, report: Report) -> None:
    """Who else can read the inference records: not changed, since they are not ours."""
    inference = resources.experiment_ids[policy.INFERENCE]
    allowed = set(policy.readers_of(policy.INFERENCE))
    for user in client.users():
        name = user["username"]
        if name in allowed:
            continue
        if user.get("is_admin"):
            report.notes.append(f"{name}: an MLflow admin, so it can read the inference records")
            continue
        for row in client.permissions(name):
            if row["permission"] != policy.DENY and (
                (
                    row["resource_type"] == policy.EXPERIMENT
                    and row["resource_pattern"] in (inference, policy.EVERY)
                )
                or row["resource_type"] == "workspace"
            ):
                report.notes.append(
                    f"{name}: holds {row['permission']} on {resources.describe(row['resource_type'], row['resource_pattern'])}, "
                    "so it can read the inference records"
                )


def provision(
    tracking: str,
    directory: Path,
    names: policy.Names | None = None,
    environ: MutableMapping[str, str] = os.environ,
    per_identity_folders: bool = False,
) -> Report:
    """Bring the server at ``tracking`` to the policy; credentials live in ``directory``
    (laid out as ``auth_files.identity_file`` says)."""
    names, directory, report = names or policy.Names(), Path(directory), Report()
    client = _log_in_as_admin(tracking, directory, environ, report)
    try:
        resources = _ensure_resources(client, names, report)
        for identity in policy.SERVICE_IDENTITIES:
            credentials = ensure_credentials(directory, identity, per_identity_folders)
            user = _ensure_user(client, credentials, report)
            _apply_grants(client, user, resources, report)
        _note_other_readers(client, resources, report)
    finally:
        client.close()
    return report


def names_from_environment(environ: MutableMapping[str, str] = os.environ) -> policy.Names:
    """The protected resources as this deployment names them (the variables the trainer, the
    sidecar and the monitor read)."""
    defaults = policy.Names()
    return policy.Names(
        training=environ.get("MLFLOW_EXPERIMENT_NAME") or defaults.training,
        inference=environ.get("CREDIT_RISK_INFERENCE_EXPERIMENT") or defaults.inference,
        monitoring=environ.get("CREDIT_RISK_MONITORING_EXPERIMENT") or defaults.monitoring,
        outcomes=environ.get("CREDIT_RISK_OUTCOMES_EXPERIMENT") or defaults.outcomes,
    )


def write_credentials(
    directory: Path, environ: MutableMapping[str, str] = os.environ, per_identity_folders: bool = False
) -> list[Path]:
    """Every identity's credentials file and the server's secret key, without a server (for
    Kubernetes Secrets): existing files are kept."""
    directory = Path(directory)
    admin_credentials(directory, environ)
    for identity in policy.SERVICE_IDENTITIES:
        ensure_credentials(directory, identity, per_identity_folders)
    ensure_secret_key(directory)
    files = [identity_file(directory, i, per_identity_folders) for i in policy.IDENTITIES]
    return [*files, directory / SECRET_KEY_FILE]
