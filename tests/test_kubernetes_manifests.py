"""deploy/kubernetes/ and deploy/kserve/: valid against the Kubernetes schemas (offline,
strict), and in step with docker-compose.yml and the code, so the three cannot drift apart:
images, ports, probe paths (asked of the real processes) and environment variable names. Then
the hygiene rules every pod follows (no API token, bounded ephemeral storage, no committed
secret), the NetworkPolicies evaluated as who may reach whom, and the drain Job template
against the sidecar it stands in for. Commands that docs/operations.md documents (the Secret,
the operator's pod) are parsed from it and checked, so the page cannot drift either."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import secrets
import shlex
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import kubernetes_validate
import mlflow.environment_variables
import pytest
import yaml
from mlflow.cli import server as mlflow_server_command
from mlserver.settings import Settings as MLServerSettings

from logging_sidecar.settings import DEFAULT_PORT as SIDECAR_PORT
from monitoring.settings import DEFAULT_PORT as MONITOR_PORT
from serving.settings import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    serving_environment,
)
from serving.spool_format import SpoolSettings
from stack import auth_files, processes, services, tracking_server
from stack.auth_policy import IDENTITIES, SERVICE_IDENTITIES
from tests.helpers import BIN, REPO, free_port, running
from tests.network_policies import Endpoint, connection_allowed, selects

# What `kubectl apply -f deploy/kubernetes/` applies: that folder's files, not its subfolders.
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
JOB_TEMPLATES = sorted((REPO / "deploy" / "kubernetes" / "jobs").glob("*.yaml"))
KSERVE = REPO / "deploy" / "kserve" / "inferenceservice.yaml"
OPERATIONS = REPO / "docs" / "operations.md"
NAMESPACE = "credit-risk"
SERVICE_ACCOUNT = "credit-risk"
# The ordinal the drain Job template is instantiated with here (any removed replica's).
ORDINAL = 3
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
# 1.29: the oldest Kubernetes that runs native sidecars (restartPolicy: Always on an init
# container) by default; and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# The image's own variables (postgres:15-bookworm), not this project's.
POSTGRES_IMAGE_VARIABLES = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PGDATA"}
PROJECT_SOURCES = [
    path
    for package in ("model", "training", "serving", "logging_sidecar", "monitoring", "stack")
    for path in (REPO / package).glob("*.py")
]


def _load(path: Path, text: str | None = None) -> list[dict]:
    return [resource for resource in yaml.safe_load_all(text or path.read_text()) if resource]


def _template_substitution(path: Path) -> tuple[str, str]:
    """The ``sed "s/OLD/NEW/g"`` that a template's header tells users to run."""
    where = re.escape(str(path.relative_to(REPO)))
    [(old, new)] = re.findall(r'^#\s+sed "s/([^/]+)/([^/]+)/g" ' + where, path.read_text(), re.M)
    return old, new


def _instantiate(path: Path, ordinal: int) -> list[dict]:
    """A template as its documented ``sed`` makes it for ``ordinal``."""
    old, new = _template_substitution(path)
    return _load(path, path.read_text().replace(old, new.replace("$N", str(ordinal))))


RESOURCES = [resource for path in MANIFESTS for resource in _load(path)]
TEMPLATES = [resource for path in JOB_TEMPLATES for resource in _instantiate(path, ORDINAL)]
KSERVE_RESOURCES = _load(KSERVE)
[INFERENCE_SERVICE] = [r for r in KSERVE_RESOURCES if r["kind"] == "InferenceService"]
EVERYTHING = RESOURCES + TEMPLATES + KSERVE_RESOURCES


def _named(kind: str, name: str) -> dict:
    [resource] = [r for r in RESOURCES if r["kind"] == kind and r["metadata"]["name"] == name]
    return resource


def _workloads() -> list[dict]:
    return [r for r in RESOURCES + TEMPLATES if r["kind"] in ("Deployment", "StatefulSet", "Job")]


def _pod_specs() -> dict[str, dict]:
    """Every pod template, by its ``app.kubernetes.io/name`` label (the workload's name, or
    ``drain-spool`` for the drain Job template), plus the KServe predictor's pod fields."""
    specs = {
        r["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]: r["spec"]["template"]["spec"]
        for r in _workloads()
    }
    specs["kserve"] = INFERENCE_SERVICE["spec"]["predictor"]
    return specs


def _pod_labels() -> dict[str, dict]:
    """The labels each pod gets: its template's, or KServe's copy of the InferenceService's."""
    labels = {
        r["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]: r["spec"]["template"][
            "metadata"
        ]["labels"]
        for r in _workloads()
    }
    labels["kserve"] = {
        **INFERENCE_SERVICE["metadata"].get("labels", {}),
        "serving.kserve.io/inferenceservice": INFERENCE_SERVICE["metadata"]["name"],
        "component": "predictor",
    }
    return labels


def _containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def _container(workload: str, name: str) -> dict:
    [container] = [c for c in _containers(_pod_specs()[workload]) if c["name"] == name]
    return container


def _env(container: dict) -> dict[str, str | None]:
    """Name to literal value (None when it comes from a Secret or a field)."""
    return {entry["name"]: entry.get("value") for entry in container.get("env", [])}


def _compose_default(text: str) -> str:
    """``${VAR:-default}`` as compose resolves it with VAR unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def _compose_env(service: str) -> dict[str, str]:
    return {k: _compose_default(str(v)) for k, v in COMPOSE["services"][service]["environment"].items()}


def _compose_health_url(service: str) -> str:
    return re.search(r"https?://[^']+", COMPOSE["services"][service]["healthcheck"]["test"][-1]).group(0)


# -- schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version):
    """The folder's resources, the drain Job as its documented `sed` makes it, and the KServe
    file's NetworkPolicy (its InferenceService has no schema offline: see below)."""
    errors = []
    checked = RESOURCES + TEMPLATES + [r for r in KSERVE_RESOURCES if r is not INFERENCE_SERVICE]
    for resource in checked:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(map(str, error.path))
            errors.append(f"{resource['kind']}/{resource['metadata']['name']}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(error.message)  # an unknown kind or apiVersion is a failure, not a skip
    assert RESOURCES and TEMPLATES and not errors, "\n".join(errors)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kserve_predictor_is_a_valid_pod_spec(version):
    """No KServe schema ships offline: its predictor inlines a PodSpec, checked as a Pod here;
    KServe's own fields (replicas, scaling) are left out and not validated."""
    kserve_fields = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"}
    predictor = INFERENCE_SERVICE["spec"]["predictor"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "predictor"},
        "spec": {k: v for k, v in predictor.items() if k not in kserve_fields},
    }
    kubernetes_validate.validate(pod, version, strict=True)


# -- in step with compose and the code ---------------------------------------------------------

# Container name in the manifests -> the compose service running the same thing.
SAME_AS_COMPOSE = {
    ("mlflow", "mlflow"): "mlflow",
    ("trainer", "trainer"): "trainer",
    ("serving", "serving"): "serving",
    ("serving", "sidecar"): "sidecar",
    ("kserve", "kserve-container"): "serving",
    ("kserve", "sidecar"): "sidecar",
    ("provision", "provision"): "provision",
    ("monitor", "monitor"): "monitor",
}


@pytest.mark.parametrize(("workload", "container", "service"), [(*k, v) for k, v in SAME_AS_COMPOSE.items()])
def test_images_and_commands_are_the_ones_compose_runs(workload, container, service):
    manifest = _container(workload, container)
    compose = COMPOSE["services"][service]
    assert manifest["image"] == _compose_default(compose["image"])
    if service != "mlflow":  # its flags are compared in test_mlflow_runs_as_compose_runs_it
        assert manifest["command"] == compose["command"]


def test_the_database_image_is_the_one_compose_runs():
    assert _container("db", "db")["image"] == COMPOSE["services"]["db"]["image"]


def test_mlflow_runs_as_compose_runs_it():
    """The same launcher and flags; --allowed-hosts adds the in-cluster names, --wait-s is longer
    (everything is applied at once), and the store is the same PostgreSQL URI shape."""

    def flags(command):
        return {arg.split("=")[0]: arg for arg in command if arg.startswith("--")}

    container = _container("mlflow", "mlflow")
    compose = COMPOSE["services"]["mlflow"]
    assert container["command"][:2] == compose["command"][:2] == ["credit-risk", "tracking-server"]
    manifest_flags, compose_flags = flags(container["command"]), flags(compose["command"])
    assert set(manifest_flags) == set(compose_flags)
    for flag in ("--host", "--port", "--artifacts-destination", "--workers"):
        assert manifest_flags[flag] == compose_flags[flag]
    assert manifest_flags["--workers"] == f"--workers={tracking_server.DEFAULT_WORKERS}"
    compose_hosts = compose_flags["--allowed-hosts"].split("=", 1)[1].split(",")
    assert set(compose_hosts) <= set(manifest_flags["--allowed-hosts"].split("=", 1)[1].split(","))
    # The same database, user and name; the password comes from the Secret here, and from
    # libpq's password file under compose (docker-compose.yml's `credentials`), never from
    # a variable that `docker inspect` shows.
    assert re.fullmatch(
        r"postgresql\+psycopg2://\$\(POSTGRES_USER\):\$\(POSTGRES_PASSWORD\)@db:5432/\$\(POSTGRES_DB\)",
        _env(container)["MLFLOW_BACKEND_STORE_URI"],
    )
    compose_env = _compose_env("mlflow")
    assert compose_env["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg2://mlflow@db:5432/mlflow"
    assert compose_env["PGPASSFILE"].startswith("/run/credit-risk/credentials/")
    # MLflow's basic-auth app in both, its admin.env and secret key in the same folder.
    assert "--auth" in container["command"] and "--auth" in compose["command"]
    for flag in ("--auth-dir", "--auth-config"):
        assert manifest_flags[flag] == compose_flags[flag]


# -- the database's credentials: a Secret made by a documented command --------------------------


def _documented_commands(text: str, start: str) -> list[list[str]]:
    """Every shell command in ``text`` that begins with ``start``, continuation lines joined,
    as the shell would split it (``$(...)`` left as written)."""
    joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    return [
        shlex.split(line.strip().lstrip("#").strip())
        for line in joined.splitlines()
        if line.strip().lstrip("#").strip().startswith(start)
    ]


SECRET_COMMAND = "kubectl -n credit-risk create secret generic db "


def documented_db_secret() -> dict[str, str]:
    """The Secret `db` as the command in docs/operations.md makes it, with the password it
    generates (``$(openssl rand -hex 24)``) generated the same way here."""
    [command] = [
        c for c in _documented_commands(OPERATIONS.read_text(), SECRET_COMMAND) if "--dry-run=client" not in c
    ]
    literals = dict(arg.removeprefix("--from-literal=").split("=", 1) for arg in command[7:])
    assert command[7:] == [f"--from-literal={k}={v}" for k, v in literals.items()], command
    generated = {"$(openssl rand -hex 24)": secrets.token_hex(24)}
    return {key: generated.get(value, value) for key, value in literals.items()}


def test_no_secret_value_is_committed():
    """No Secret in any file that `kubectl apply` takes, and no password-like variable with a
    literal value: credentials come from a Secret made by hand (or, later, generated)."""
    assert not [r["metadata"]["name"] for r in EVERYTHING if r["kind"] == "Secret"]
    for workload, spec in _pod_specs().items():
        for container in _containers(spec):
            for name, value in _env(container).items():
                if re.search(r"PASSWORD|SECRET|TOKEN|_KEY$", name):
                    assert value is None, f"{workload}/{container['name']}: {name} has a committed value"


def test_the_documented_secret_command_makes_what_the_pods_read():
    """The command in docs/operations.md and in 11-db.yaml's header is the same, generates the
    password, and makes exactly the keys the pods read: the postgres image's account, which is
    also compose's (there POSTGRES_PASSWORD is a file: POSTGRES_PASSWORD_FILE)."""
    [in_docs] = [
        c for c in _documented_commands(OPERATIONS.read_text(), SECRET_COMMAND) if "--dry-run=client" not in c
    ]
    [in_manifest] = _documented_commands(
        (REPO / "deploy" / "kubernetes" / "11-db.yaml").read_text(), SECRET_COMMAND
    )
    assert in_docs == in_manifest
    secret = documented_db_secret()
    assert re.fullmatch(r"[0-9a-f]{48}", secret["POSTGRES_PASSWORD"])  # generated, and URI-safe
    compose_account = {name.removesuffix("_FILE") for name in _compose_env("db")}
    assert set(secret) == compose_account == {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
    assert _container("db", "db")["envFrom"] == [{"secretRef": {"name": "db"}}]
    referenced = {
        entry["valueFrom"]["secretKeyRef"]["key"]
        for spec in _pod_specs().values()
        for container in _containers(spec)
        for entry in container.get("env", [])
        if "secretKeyRef" in entry.get("valueFrom", {})
    }
    assert referenced == set(secret)
    for spec in _pod_specs().values():
        for container in _containers(spec):
            for entry in container.get("env", []):
                if "secretKeyRef" in entry.get("valueFrom", {}):
                    assert entry["valueFrom"]["secretKeyRef"]["name"] == "db"


# -- the tracking server's identities: a Secret each, made by documented commands ---------------

AUTH_SECRET_COMMAND = "kubectl -n credit-risk create secret generic mlflow-"
CREDENTIALS_COMMAND = "credit-risk auth credentials "
MLFLOW_MANIFEST = REPO / "deploy" / "kubernetes" / "20-mlflow.yaml"
CREDENTIALS_DIR = "/run/credit-risk/auth"
# Which identity each container acts as (stack/auth_policy.py); `provision` acts as admin and
# reads every identity's file.
IDENTITY = {
    ("mlflow", "mlflow"): "admin",
    ("trainer", "trainer"): "trainer",
    ("serving", "serving"): "serving",
    ("serving", "sidecar"): "sidecar",
    ("drain-spool", "drain"): "sidecar",
    ("kserve", "kserve-container"): "serving",
    ("kserve", "sidecar"): "sidecar",
    ("provision", "provision"): "admin",
    ("monitor", "monitor"): "monitor",
}


def _secret_files(spec: dict, container: dict) -> dict[str, tuple[str, str]]:
    """Path in the container -> (Secret, key) of every Secret file it mounts."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})  # else a claim of a volumeClaimTemplate
        sources = [volume] if "secret" in volume else volume.get("projected", {}).get("sources", [])
        for source in sources:
            if secret := source.get("secret"):
                name = secret.get("secretName") or secret.get("name")
                for item in secret["items"]:  # every key named: nothing else of the Secret lands
                    files[f"{mount['mountPath']}/{item['path']}"] = (name, item["key"])
            assert mount.get("readOnly") is True or not sources, (container["name"], mount["name"])
    return files


def test_every_container_that_talks_to_mlflow_has_its_own_identity_only():
    """Each MLflow client names its identity's file in CREDIT_RISK_CREDENTIALS_FILE, mounted
    read-only from that identity's Secret, and mounts no other identity's; the files are
    readable by the pod's group only."""
    seen = set()
    for workload, spec in _pod_specs().items():
        for container in _containers(spec):
            env = _env(container)
            talks = "MLFLOW_TRACKING_URI" in env or (workload, container["name"]) == ("mlflow", "mlflow")
            files = _secret_files(spec, container)
            if not talks:
                assert not files, (workload, container["name"])
                continue
            identity = IDENTITY[(workload, container["name"])]
            seen.add((workload, container["name"]))
            secrets_mounted = {secret for secret, _ in files.values()}
            if workload == "provision":
                assert files == {
                    f"{CREDENTIALS_DIR}/admin.env": ("mlflow-admin", "admin.env"),
                    **{
                        f"{CREDENTIALS_DIR}/{i}/{i}.env": (f"mlflow-{i}", f"{i}.env")
                        for i in SERVICE_IDENTITIES
                    },
                }
            elif identity == "admin":
                assert files == {
                    f"{CREDENTIALS_DIR}/admin.env": ("mlflow-admin", "admin.env"),
                    f"{CREDENTIALS_DIR}/flask_secret_key": ("mlflow-admin", "flask_secret_key"),
                }
            else:
                path = f"{CREDENTIALS_DIR}/{identity}.env"
                assert env["CREDIT_RISK_CREDENTIALS_FILE"] == path, (workload, container["name"])
                assert files == {path: (f"mlflow-{identity}", f"{identity}.env")}, (
                    workload,
                    container["name"],
                )
                assert secrets_mounted == {f"mlflow-{identity}"}
            assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"] == 10001, (
                workload
            )
            for volume in spec["volumes"]:
                if "secret" in volume or "projected" in volume:
                    mode = (volume.get("secret") or volume["projected"])["defaultMode"]
                    assert mode == 0o440, (workload, volume["name"])
    assert seen == set(IDENTITY)


def _documented_auth_commands() -> tuple[list[str], list[list[str]]]:
    text = MLFLOW_MANIFEST.read_text()
    [credentials] = _documented_commands(text, CREDENTIALS_COMMAND)
    return credentials, _documented_commands(text, AUTH_SECRET_COMMAND)


def test_the_documented_auth_secret_commands_make_what_the_pods_mount(tmp_path, monkeypatch):
    """The commands in 20-mlflow.yaml's header, run for real (the credentials command) and as
    kubectl would read them (each --from-file names an existing file whose name is the key):
    a Secret per identity, each with only its own file, generated passwords, and exactly the
    keys the pods mount."""
    from stack import auth_cli

    credentials, secret_commands = _documented_auth_commands()
    monkeypatch.chdir(tmp_path)
    for name in ("CREDIT_RISK_ADMIN_PASSWORD", "CREDIT_RISK_ADMIN_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert credentials[:3] == ["credit-risk", "auth", "credentials"]
    assert auth_cli.main(credentials[1:]) == 0
    made: dict[str, dict[str, str]] = {}
    for command in secret_commands:
        assert command[:6] == ["kubectl", "-n", NAMESPACE, "create", "secret", "generic"], command
        name, sources = command[6], command[7:]
        assert all(arg.startswith("--from-file=") for arg in sources), command
        made[name] = {}
        for arg in sources:
            path = tmp_path / arg.removeprefix("--from-file=")
            assert path.stat().st_mode & 0o077 == 0, path  # as written: the owner's only
            made[name][path.name] = path.read_text()
    assert set(made) == {f"mlflow-{identity}" for identity in IDENTITIES}
    for identity in IDENTITIES:
        parsed = auth_files.parse_credentials(made[f"mlflow-{identity}"][f"{identity}.env"], identity)
        assert parsed.username == identity and len(parsed.password) >= 32
    assert set(made["mlflow-admin"]) == {"admin.env", auth_files.SECRET_KEY_FILE}
    passwords = [
        auth_files.parse_credentials(made[f"mlflow-{i}"][f"{i}.env"], i).password for i in IDENTITIES
    ]
    assert len(set(passwords)) == len(passwords)
    mounted = {
        pair
        for workload, spec in _pod_specs().items()
        for container in _containers(spec)
        for pair in _secret_files(spec, container).values()
    }
    made_pairs = {(secret, key) for secret, keys in made.items() for key in keys}
    # Every file a pod mounts is made; every identity's is used by its own pods (besides
    # `provision`, which reads them all), but the operator's, which is for people.
    assert mounted <= made_pairs
    used = {
        pair
        for workload, spec in _pod_specs().items()
        if workload != "provision"
        for container in _containers(spec)
        for pair in _secret_files(spec, container).values()
    }
    assert made_pairs - used == {("mlflow-operator", "operator.env")}


# Set under compose only, and why.
COMPOSE_ONLY = {
    # libpq's password file on the `credentials` volume; the Deployment passes the password
    # from the Secret into the URI instead.
    ("mlflow", "PGPASSFILE"),
    # CREDIT_RISK_ADMIN_PASSWORD, as a file that compose's `credentials` writes; in Kubernetes
    # the admin's password is the one in its Secret.
    ("mlflow", "CREDIT_RISK_ADMIN_PASSWORD_FILE"),
    ("provision", "CREDIT_RISK_ADMIN_PASSWORD_FILE"),
}


def test_every_compose_variable_is_set_in_the_manifests_too():
    for (workload, container), service in SAME_AS_COMPOSE.items():
        if workload == "kserve":
            continue  # the KServe example sets only what differs from the image
        missing = {
            name for name in set(_compose_env(service)) - set(_env(_container(workload, container)))
            if (service, name) not in COMPOSE_ONLY
        }  # fmt: skip
        assert not missing, f"{workload}/{container} lacks compose's {sorted(missing)}"


def test_ports_are_the_code_defaults_and_compose_ports():
    serving = _container("serving", "serving")
    ports = {p["name"]: p["containerPort"] for p in serving["ports"]}
    assert ports == {"http": DEFAULT_HTTP_PORT, "grpc": DEFAULT_GRPC_PORT, "metrics": DEFAULT_METRICS_PORT}
    env = _env(serving)
    assert {env["MLSERVER_HTTP_PORT"], env["MLSERVER_GRPC_PORT"], env["MLSERVER_METRICS_PORT"]} == {
        str(port) for port in ports.values()
    }
    compose_targets = {int(p.rsplit(":", 1)[1]) for p in COMPOSE["services"]["serving"]["ports"]}
    assert compose_targets == set(ports.values())

    sidecar = _container("serving", "sidecar")
    assert [p["containerPort"] for p in sidecar["ports"]] == [SIDECAR_PORT]
    assert _env(sidecar)["CREDIT_RISK_SIDECAR_PORT"] == str(SIDECAR_PORT)
    assert urlparse(_compose_health_url("sidecar")).port == SIDECAR_PORT

    mlflow = _container("mlflow", "mlflow")
    assert [p["containerPort"] for p in mlflow["ports"]] == [services.MLFLOW_PORT]
    assert f"--port={services.MLFLOW_PORT}" in mlflow["command"]
    assert _named("Service", "mlflow")["spec"]["ports"][0]["port"] == services.MLFLOW_PORT

    [kserve_port] = _container("kserve", "kserve-container")["ports"]
    assert kserve_port["containerPort"] == DEFAULT_HTTP_PORT

    monitor = _container("monitor", "monitor")
    assert [p["containerPort"] for p in monitor["ports"]] == [MONITOR_PORT]
    assert _env(monitor)["CREDIT_RISK_MONITOR_PORT"] == str(MONITOR_PORT)
    assert _service_ports("monitor") == {MONITOR_PORT}
    assert [int(p.rsplit(":", 1)[1]) for p in COMPOSE["services"]["monitor"]["ports"]] == [MONITOR_PORT]
    assert urlparse(_compose_health_url("monitor")).port == MONITOR_PORT


def test_the_monitor_runs_as_compose_runs_it():
    """The same interval, window and address as compose's defaults (which are the code's), one
    replica that a rollout never doubles (each would log its own run of a window), and the
    prometheus.yml job scraping it by the Service's name and port."""
    from monitoring.settings import MonitorSettings, format_duration

    env, compose = _env(_container("monitor", "monitor")), _compose_env("monitor")
    for name in ("CREDIT_RISK_MONITOR_EVERY", "CREDIT_RISK_MONITOR_WINDOW", "CREDIT_RISK_MONITOR_HOST"):
        assert env[name] == compose[name], name
    fields = MonitorSettings.model_fields
    assert env["CREDIT_RISK_MONITOR_EVERY"] == format_duration(fields["every"].default)
    assert env["CREDIT_RISK_MONITOR_WINDOW"] == format_duration(fields["window"].default)
    assert env["CREDIT_RISK_MONITOR_HOST"] == "0.0.0.0"
    deployment = _named("Deployment", "monitor")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == "credit-risk-monitor"]
    assert job["static_configs"] == [{"targets": [f"monitor:{MONITOR_PORT}"]}]


def test_services_reach_ports_their_pods_declare():
    pods = {
        r["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]: r["spec"]["template"]["spec"]
        for r in RESOURCES
        if r["kind"] in ("Deployment", "StatefulSet")
    }
    for service in (r for r in RESOURCES if r["kind"] == "Service"):
        declared = {
            p["name"]: p["containerPort"]
            for c in _containers(pods[service["spec"]["selector"]["app.kubernetes.io/name"]])
            for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert declared.get(port["targetPort"]) == port["port"], (service["metadata"]["name"], port)


def test_every_client_finds_mlflow_where_compose_does():
    uris = {
        _env(c).get("MLFLOW_TRACKING_URI")
        for spec in _pod_specs().values()
        for c in _containers(spec)
        if "MLFLOW_TRACKING_URI" in _env(c)
    }
    assert uris == {COMPOSE["x-mlflow-client"]["MLFLOW_TRACKING_URI"]}
    host = urlparse(uris.pop())
    assert (host.hostname, host.port) == ("mlflow", services.MLFLOW_PORT)


def _variable_names() -> set[str]:
    return {name for spec in _pod_specs().values() for c in _containers(spec) for name in _env(c)}


def _is_read_by_the_code(name: str) -> bool:
    if name.startswith("MLSERVER_"):
        return name.removeprefix("MLSERVER_").lower() in MLServerSettings.model_fields
    if name.startswith("MLFLOW_"):
        server_flags = {param.envvar for param in mlflow_server_command.params}
        return hasattr(mlflow.environment_variables, name) or name in server_flags
    if name.startswith("CREDIT_RISK_"):
        return any(f'"{name}"' in path.read_text() for path in PROJECT_SOURCES)
    return name in POSTGRES_IMAGE_VARIABLES or name in serving_environment({})


@pytest.mark.parametrize(
    "name",
    sorted(_variable_names()),
)
def test_every_variable_in_the_manifests_is_read_by_the_code(name):
    assert _is_read_by_the_code(name), f"{name} is set in the manifests but nothing reads it"


def test_values_that_the_code_also_defaults_agree():
    serving = _env(_container("serving", "serving"))
    assert serving["OMP_NUM_THREADS"] == serving_environment({})["OMP_NUM_THREADS"]
    spool_dir = COMPOSE["services"]["serving"]["volumes"][0].split(":")[1]
    for workload, name in (("serving", "serving"), ("serving", "sidecar"), ("kserve", "kserve-container")):
        container = _container(workload, name)
        assert _env(container)["CREDIT_RISK_SPOOL_DIR"] == spool_dir
        assert spool_dir in {mount["mountPath"] for mount in container["volumeMounts"]}


# -- what the serving pod must do -----------------------------------------------------------


def test_each_serving_replica_has_its_own_spool_volume_above_the_spool_limit(monkeypatch):
    statefulset = _named("StatefulSet", "serving")
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert all(v["name"] != "spool" for v in statefulset["spec"]["template"]["spec"]["volumes"])
    size = claim["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Gi")
    monkeypatch.delenv("CREDIT_RISK_SPOOL_MAX_BYTES", raising=False)
    assert int(size.removesuffix("Gi")) << 30 > SpoolSettings().max_bytes


@pytest.mark.parametrize("workload", ["serving", "kserve"])
def test_the_sidecar_is_a_native_sidecar_that_knows_its_replica(workload):
    spec = _pod_specs()[workload]
    [sidecar] = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    for container in _containers(spec):
        [replica_id] = [e for e in container["env"] if e["name"] == "CREDIT_RISK_REPLICA_ID"]
        assert replica_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("workload", ["serving", "kserve"])
def test_the_grace_period_covers_endpoint_removal_and_the_sidecar_drain(workload):
    spec = _pod_specs()[workload]
    [server] = spec["containers"]
    [sleep, seconds] = server["lifecycle"]["preStop"]["exec"]["command"]
    drain_s = float(_env(spec["initContainers"][0])["CREDIT_RISK_SIDECAR_DRAIN_S"])
    assert sleep == "sleep" and int(seconds) > 0
    assert spec["terminationGracePeriodSeconds"] > int(seconds) + drain_s


def test_every_pod_runs_as_non_root_with_no_capabilities_and_bounded_resources():
    for workload, spec in _pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True, workload
        for container in _containers(spec):
            where = f"{workload}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) == {"cpu", "memory", "ephemeral-storage"}, where


def test_the_autoscaler_scales_serving_on_cpu():
    hpa = _named("HorizontalPodAutoscaler", "serving")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "serving",
    }
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


# -- hygiene of every pod ----------------------------------------------------------------------

_UNITS = {
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}
# What each container's logs may take: the kubelet keeps 5 rotated files of 10 MiB by default.
LOG_BYTES = 64 << 20


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?|k)?", str(quantity)).groups()
    return int(number) * _UNITS.get(unit, 1)


def test_no_pod_gets_a_service_account_token():
    [account] = [r for r in RESOURCES if r["kind"] == "ServiceAccount"]
    assert account["metadata"]["name"] == SERVICE_ACCOUNT
    assert account["automountServiceAccountToken"] is False
    assert not [
        r for r in EVERYTHING if r["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    for workload, spec in _pod_specs().items():
        assert spec["serviceAccountName"] == SERVICE_ACCOUNT, workload
        assert spec["automountServiceAccountToken"] is False, workload


def test_every_emptydir_has_a_size_limit():
    for workload, spec in _pod_specs().items():
        for volume in spec.get("volumes", []):
            if "emptyDir" in volume:
                assert _bytes(volume["emptyDir"]["sizeLimit"]) > 0, (workload, volume["name"])


def test_every_container_bounds_its_ephemeral_storage():
    """Requests and limits on every container; a pod is evicted when its containers' logs and
    its emptyDirs pass the sum of their limits, so that sum leaves each emptyDir its size limit
    and each container room for its logs."""
    for workload, spec in _pod_specs().items():
        containers = _containers(spec)
        for container in containers:
            request = _bytes(container["resources"]["requests"]["ephemeral-storage"])
            limit = _bytes(container["resources"]["limits"]["ephemeral-storage"])
            assert 0 < request <= limit, (workload, container["name"])
        scratch = sum(_bytes(v["emptyDir"]["sizeLimit"]) for v in spec.get("volumes", []) if "emptyDir" in v)
        limits = sum(_bytes(c["resources"]["limits"]["ephemeral-storage"]) for c in containers)
        assert limits >= scratch + LOG_BYTES * len(containers), workload


def test_no_replicas_on_a_workload_an_autoscaler_owns():
    """`kubectl apply` would reset the count the autoscaler chose; the first count is the
    autoscaler's minReplicas, which leaves the disruption budget a replica to spare."""
    autoscalers = [r for r in RESOURCES if r["kind"] == "HorizontalPodAutoscaler"]
    assert autoscalers
    for hpa in autoscalers:
        target = hpa["spec"]["scaleTargetRef"]
        workload = _named(target["kind"], target["name"])
        assert "replicas" not in workload["spec"], target["name"]
        [budget] = [
            r
            for r in RESOURCES
            if r["kind"] == "PodDisruptionBudget" and r["spec"]["selector"] == workload["spec"]["selector"]
        ]
        assert hpa["spec"]["minReplicas"] > budget["spec"]["minAvailable"]


# -- network policies ---------------------------------------------------------------------------

POLICIES = [r for r in RESOURCES + KSERVE_RESOURCES if r["kind"] == "NetworkPolicy"]
OPERATOR_COMMAND = "kubectl -n credit-risk run operator "


def _strategic_merge(base: dict, patch: dict) -> dict:
    """kubectl's strategic merge for what the operator's --overrides holds: maps merge, and the
    pod's `containers` merge by name."""
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if key == "containers":
            by_name = {c["name"]: c for c in merged["containers"]}
            for container in value:
                by_name[container["name"]] = _strategic_merge(by_name.get(container["name"], {}), container)
            merged["containers"] = list(by_name.values())
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _strategic_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _flag(command: list[str], name: str) -> list[str]:
    return [arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}=")]


def operator_pod() -> dict:
    """The Pod that the documented `kubectl run operator ...` creates (kubectl run's pod, its
    --labels, --image, --env, then --overrides merged in the strategic way it names)."""
    [command] = _documented_commands(OPERATIONS.read_text(), OPERATOR_COMMAND)
    name = command[4]
    separator = command.index("--")
    assert _flag(command, "override-type") == ["strategic"] and "--restart=Never" in command
    labels = dict(pair.split("=", 1) for label in _flag(command, "labels") for pair in label.split(","))
    [image] = _flag(command, "image")
    env = [dict(zip(("name", "value"), e.split("=", 1), strict=True)) for e in _flag(command, "env")]
    [overrides] = _flag(command, "overrides")
    generated = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": name, "image": image, "env": env, "args": command[separator + 1 :]}],
        },
    }
    return _strategic_merge(generated, {"spec": json.loads(overrides)["spec"]})


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_documented_operator_pod_is_valid_and_restricted(version):
    """Valid, and within the namespace's `restricted` Pod Security profile (the rules that
    apply to it: non-root, no privilege escalation, all capabilities dropped, a seccomp
    profile), with no API token; it runs `credit-risk` from the trainer's image."""
    pod = operator_pod()
    kubernetes_validate.validate(pod, version, strict=True)
    namespace = _named("Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False and spec["serviceAccountName"] == SERVICE_ACCOUNT
    [container] = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["image"] == _container("trainer", "trainer")["image"]
    assert container["args"][0] == "credit-risk"
    assert {e["name"]: e["value"] for e in container["env"]} == {
        "MLFLOW_TRACKING_URI": COMPOSE["x-mlflow-client"]["MLFLOW_TRACKING_URI"],
        "CREDIT_RISK_CREDENTIALS_FILE": "/run/credit-risk/auth/operator.env",
    }
    # It acts as operator: that identity's Secret alone, group-readable, where the file is named.
    [volume] = spec["volumes"]
    assert volume["secret"] == {"secretName": "mlflow-operator", "defaultMode": 0o440}
    assert spec["securityContext"]["fsGroup"] == 10001
    assert container["volumeMounts"] == [
        {"name": volume["name"], "mountPath": "/run/credit-risk/auth", "readOnly": True}
    ]


def _pods() -> dict[str, Endpoint]:
    """Every pod of the namespace (the operator's as documented), and pods elsewhere."""
    namespace_labels = {
        **_named("Namespace", NAMESPACE)["metadata"]["labels"],
        "kubernetes.io/metadata.name": NAMESPACE,
    }
    ours = {
        name: Endpoint(name, labels, NAMESPACE, namespace_labels) for name, labels in _pod_labels().items()
    }
    ours["operator"] = Endpoint("operator", operator_pod()["metadata"]["labels"], NAMESPACE, namespace_labels)
    ours["unlabelled"] = Endpoint("unlabelled", {"run": "debug"}, NAMESPACE, namespace_labels)
    elsewhere = {
        "prometheus": Endpoint(
            "prometheus",
            {"app.kubernetes.io/name": "prometheus"},
            "monitoring",
            {"kubernetes.io/metadata.name": "monitoring", "credit-risk/monitoring": "true"},
        ),
        "client": Endpoint(
            "client", {"app": "loan-desk"}, "lending", {"kubernetes.io/metadata.name": "lending"}
        ),
        "mlflow-lookalike": Endpoint(  # the right labels in another namespace reach nothing
            "mlflow-lookalike",
            {"app.kubernetes.io/name": "mlflow", "credit-risk/mlflow-client": "true"},
            "other",
            {"kubernetes.io/metadata.name": "other"},
        ),
        "dns": Endpoint(
            "dns", {"k8s-app": "kube-dns"}, "kube-system", {"kubernetes.io/metadata.name": "kube-system"}
        ),
        "internet": Endpoint("internet", pod=False),
    }
    return ours | elsewhere


def _service_ports(service: str) -> set[int]:
    return {port["port"] for port in _named("Service", service)["spec"]["ports"]}


def _reach(source: str, destination: str, port: int, protocol: str = "TCP") -> bool:
    pods = _pods()
    return connection_allowed(POLICIES, pods[source], pods[destination], port, protocol)


def test_the_policy_evaluator_follows_the_api_rules():
    """Hand-worked cases from the NetworkPolicy reference, so that the checks below rest on
    the API's rules and not on the evaluator's say-so."""
    ns = {"kubernetes.io/metadata.name": "a"}
    web = Endpoint("web", {"app": "web"}, "a", ns)
    db = Endpoint("db", {"app": "db"}, "a", ns)
    other_ns_web = Endpoint("web-b", {"app": "web"}, "b", {"kubernetes.io/metadata.name": "b", "team": "x"})

    def policy(spec: dict, namespace: str = "a") -> dict:
        return {"metadata": {"name": "p", "namespace": namespace}, "spec": spec}

    assert connection_allowed([], web, db, 5432)  # no policy: not isolated
    ingress_db = policy(
        {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 5432}]}]}
    )  # fmt: skip
    assert connection_allowed([ingress_db], web, db, 5432)
    assert not connection_allowed([ingress_db], web, db, 5433)  # port not listed
    assert not connection_allowed([ingress_db], other_ns_web, db, 5432)  # podSelector alone: own namespace
    assert connection_allowed([ingress_db], db, web, 80)  # web is not selected: open
    # policyTypes omitted, no egress rules: egress is not isolated.
    assert connection_allowed([ingress_db], db, other_ns_web, 443)
    # One peer with both selectors (AND) against two peers (OR).
    both = {
        "namespaceSelector": {"matchLabels": {"team": "x"}},
        "podSelector": {"matchLabels": {"app": "db"}},
    }
    anded = policy({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [both]}]})
    ored = policy(
        {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [{"namespaceSelector": both["namespaceSelector"]}, {"podSelector": both["podSelector"]}]}]}
    )  # fmt: skip
    assert not connection_allowed([anded], other_ns_web, db, 5432)
    assert connection_allowed([ored], other_ns_web, db, 5432)
    # An egress-only default deny with a DNS rule: port 53 anywhere, nothing else.
    dns_only = policy(
        {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"protocol": "UDP", "port": 53}]}],
        }
    )
    outside = Endpoint("8.8.8.8", pod=False)
    assert connection_allowed([dns_only], web, outside, 53, "UDP")
    assert not connection_allowed([dns_only], web, outside, 53, "TCP")
    assert not connection_allowed([dns_only], web, db, 5432)
    # matchExpressions: NotIn also selects pods without the key.
    assert selects(
        {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["x"]}]}, {"app": "web"}
    )
    assert not selects({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {"app": "web"})
    with pytest.raises(ValueError):
        connection_allowed(
            [policy({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]})], web, db, 80
        )


def test_the_namespace_denies_everything_by_default():
    [default] = [p for p in POLICIES if p["spec"]["podSelector"] == {}]
    assert set(default["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not default["spec"].get("ingress") and not default["spec"].get("egress")
    assert all(p["metadata"]["namespace"] == NAMESPACE for p in POLICIES)


def test_every_policy_selects_pods_that_exist_and_admits_only_ports_they_serve():
    """A policy selecting no pod is a typo; an admitted port no selected pod declares, a
    mismatch. The ports each pod admits from anywhere at all are the ports its Services route
    to (serving: both its Services; mlflow, db: theirs; KServe's predictor: its V2 port)."""
    specs = {**_pod_specs(), "operator": operator_pod()["spec"]}  # the pods the stack runs
    pods = _pods()
    for policy in POLICIES:
        selected = [name for name in specs if selects(policy["spec"]["podSelector"], pods[name].labels)]
        assert selected, policy["metadata"]["name"]
        declared = {
            p["containerPort"]
            for name in selected
            for c in _containers(specs[name])
            for p in c.get("ports", [])
        }
        for rule in policy["spec"].get("ingress", []):
            admitted = {p["port"] for p in rule["ports"]}
            assert admitted <= declared, (policy["metadata"]["name"], admitted - declared)
    everyone = [p for p in _pods().values() if p.pod]
    all_ports = {
        p["containerPort"] for s in specs.values() for c in _containers(s) for p in c.get("ports", [])
    }

    def admitted(name: str) -> set[int]:
        return {
            port
            for port in all_ports
            if any(connection_allowed(POLICIES, source, pods[name], port) for source in everyone)
        }

    assert admitted("serving") == _service_ports("serving") | _service_ports("serving-headless")
    assert admitted("mlflow") == _service_ports("mlflow")
    assert admitted("db") == _service_ports("db")
    assert admitted("kserve") == {
        p["containerPort"] for p in _container("kserve", "kserve-container")["ports"]
    }
    assert admitted("monitor") == _service_ports("monitor")
    for name in ("trainer", "drain-spool", "provision"):
        assert admitted(name) == set(), name


MLFLOW_CLIENTS = {"trainer", "serving", "drain-spool", "kserve", "operator", "provision", "monitor"}


def test_mlflow_is_reached_only_by_its_clients_and_reaches_only_the_database():
    port = services.MLFLOW_PORT
    for name in _pods():
        assert _reach(name, "mlflow", port) == (name in MLFLOW_CLIENTS), name
    [db_port] = _service_ports("db")
    for name in _pods():
        assert _reach(name, "db", db_port) == (name == "mlflow"), name
    for destination, port in (("internet", 443), ("serving", DEFAULT_HTTP_PORT), ("prometheus", 9090)):
        assert not _reach("mlflow", destination, port), destination


def test_the_database_reaches_nothing_and_clients_reach_only_mlflow():
    destinations = [n for n, e in _pods().items() if n not in ("mlflow",)]
    for destination in destinations:
        assert not _reach("db", destination, 53, "UDP") and not _reach("db", destination, 443), destination
    for client in MLFLOW_CLIENTS - {"operator"}:
        assert not _reach(client, "internet", 443), client
        assert not _reach(client, "db", 5432), client
        assert not _reach(client, "client", DEFAULT_HTTP_PORT), client
        assert not _reach(client, "serving", DEFAULT_HTTP_PORT) or client == "serving", client


def test_names_resolve_for_the_pods_that_need_them_only():
    for name in MLFLOW_CLIENTS | {"mlflow"}:
        for protocol in ("UDP", "TCP"):
            assert _reach(name, "dns", 53, protocol), (name, protocol)
    for name in ("db", "unlabelled"):
        assert not _reach(name, "dns", 53, "UDP"), name


def test_serving_answers_everyone_and_its_metrics_only_monitoring():
    for port in _service_ports("serving"):
        for source in ("client", "prometheus", "operator"):
            assert _reach(source, "serving", port), (source, port)
        assert not _reach("unlabelled", "serving", port)  # its own egress is denied
        assert _reach("client", "kserve", DEFAULT_HTTP_PORT)
    metrics = _service_ports("serving-headless") - _service_ports("serving")
    assert metrics == {DEFAULT_METRICS_PORT, SIDECAR_PORT}
    for port in metrics:
        for source in _pods():
            assert _reach(source, "serving", port) == (source == "prometheus"), (source, port)


def test_the_monitor_is_scraped_only_from_monitoring_and_reaches_only_mlflow():
    for source in _pods():
        assert _reach(source, "monitor", MONITOR_PORT) == (source == "prometheus"), source
    assert _reach("monitor", "mlflow", services.MLFLOW_PORT)
    for destination, port in (
        ("serving", DEFAULT_HTTP_PORT),
        ("db", 5432),
        ("internet", 443),
        ("prometheus", 9090),
        ("client", DEFAULT_HTTP_PORT),
    ):
        assert not _reach("monitor", destination, port), destination


# -- the drain Job: the sidecar, once, on a spool left behind ----------------------------------


def _drain_job() -> dict:
    [job] = [r for r in TEMPLATES if r["kind"] == "Job"]
    return job


def test_the_drain_job_is_a_template_that_kubectl_apply_of_the_folder_leaves_out():
    [template] = JOB_TEMPLATES
    assert template.parent.name == "jobs" and template not in MANIFESTS
    [raw] = _load(template)
    dns_name = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
    assert not dns_name.fullmatch(raw["metadata"]["name"])  # applied unedited, it is refused
    assert dns_name.fullmatch(_drain_job()["metadata"]["name"])
    # docs/operations.md runs the same substitution the template's header documents, and finds
    # the claims by the labels the StatefulSet gives them (its selector's).
    old, new = _template_substitution(template)
    docs = OPERATIONS.read_text()
    assert f'sed "s/{old}/{new}/g" {template.relative_to(REPO)} | kubectl apply -f -' in docs
    [selector] = re.findall(r"kubectl -n credit-risk get pvc -l (\S+)", docs)
    assert dict([selector.split("=")]) == _named("StatefulSet", "serving")["spec"]["selector"]["matchLabels"]


def test_the_drain_job_runs_the_sidecar_once_as_the_removed_replica():
    job = _drain_job()
    spec = job["spec"]["template"]["spec"]
    [drain] = spec["containers"]
    sidecar = _container("serving", "sidecar")
    statefulset = _named("StatefulSet", "serving")
    serving_pod = statefulset["spec"]["template"]["spec"]
    spool_dir = _env(sidecar)["CREDIT_RISK_SPOOL_DIR"]
    assert drain["command"] == ["credit-risk", "sidecar", "--drain-once", "--spool-dir", spool_dir]
    assert drain["image"] == sidecar["image"]
    replica = f"{statefulset['metadata']['name']}-{ORDINAL}"
    assert _env(drain) == {**_env(sidecar), "CREDIT_RISK_REPLICA_ID": replica}
    assert drain["securityContext"] == sidecar["securityContext"]
    assert spec["securityContext"] == serving_pod["securityContext"]
    for bound in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert drain["resources"][bound][resource] == sidecar["resources"][bound][resource]
    [claim_template] = statefulset["spec"]["volumeClaimTemplates"]
    [spool] = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    # The StatefulSet names each replica's claim <template>-<statefulset>-<ordinal>.
    assert spool["persistentVolumeClaim"]["claimName"] == f"{claim_template['metadata']['name']}-{replica}"
    mounts = {m["name"]: m["mountPath"] for m in drain["volumeMounts"]}
    assert mounts[spool["name"]] == spool_dir
    assert spec["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] >= 1
    assert selects(
        next(p for p in POLICIES if p["metadata"]["name"] == "mlflow-clients")["spec"]["podSelector"],
        job["spec"]["template"]["metadata"]["labels"],
    )


# -- probe paths, asked of the real processes (on free ports) -----------------------------------------------


def _probes(container: dict) -> dict[str, dict]:
    return {
        kind: container[kind]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }


@pytest.mark.integration
def test_serving_probes_are_answered_by_the_real_server(tmp_path):
    """No MLflow to follow: the server is live (200) and not ready (503 with the reason),
    which is what each probe must tell apart. A wrong path would answer 404."""
    nowhere = services.tracking_uri(free_port())
    service = services.serving(nowhere, free_port(), grpc_port=free_port(), metrics_port=free_port())
    port = urlparse(service.health_url).port
    live = dataclasses.replace(service, health_url=f"http://{services.LOOPBACK}:{port}/v2/health/live")
    compose_ready = urlparse(_compose_health_url("serving")).path
    with running(live, tmp_path, timeout=120):
        for workload, name in (("serving", "serving"), ("kserve", "kserve-container")):
            probes = _probes(_container(workload, name))
            assert compose_ready == probes["readinessProbe"]["httpGet"]["path"]
            for kind, probe in probes.items():
                answer = httpx.get(f"http://{services.LOOPBACK}:{port}{probe['httpGet']['path']}", timeout=10)
                if kind == "readinessProbe":
                    assert answer.status_code == 503 and answer.json()["ready"] is False, answer.text
                else:
                    assert answer.status_code == 200, (kind, answer.text)


def _sidecar(tmp_path: Path):
    port = free_port()
    service = services.sidecar(services.tracking_uri(free_port()), tmp_path / "spool", port)
    return service, port


@pytest.mark.integration
def test_sidecar_startup_and_readiness_probes_are_answered_by_the_real_sidecar(tmp_path):
    service, port = _sidecar(tmp_path)
    probes = _probes(_container("serving", "sidecar"))
    assert urlparse(_compose_health_url("sidecar")).path == probes["readinessProbe"]["httpGet"]["path"]
    with running(service, tmp_path, timeout=60):
        for kind in ("startupProbe", "readinessProbe"):
            path = probes[kind]["httpGet"]["path"]
            assert httpx.get(f"http://{services.LOOPBACK}:{port}{path}", timeout=10).status_code == 200


@pytest.mark.integration
def test_sidecar_liveness_probe_is_answered_by_the_real_sidecar(tmp_path):
    service, port = _sidecar(tmp_path)
    path = _container("serving", "sidecar")["livenessProbe"]["httpGet"]["path"]
    with running(service, tmp_path, timeout=60):
        assert httpx.get(f"http://{services.LOOPBACK}:{port}{path}", timeout=10).status_code == 200


@pytest.mark.integration
def test_mlflow_started_with_the_manifests_flags_answers_its_probes(tmp_path):
    """MLflow as the Deployment starts it (its --allowed-hosts, the backend store from
    MLFLOW_BACKEND_STORE_URI, basic-auth on), on SQLite and a free port: kubelet's probes
    (Host: the pod's IP) get through without credentials; clients using the in-cluster URI need
    them; any other host is refused."""
    container = _container("mlflow", "mlflow")
    port = free_port()
    command = [str(BIN / "credit-risk")] + [
        f"--port={port}" if arg.startswith("--port=") else arg
        for arg in container["command"][1:]
        if not arg.startswith(("--host=", "--artifacts-destination=", "--auth-dir=", "--auth-config="))
    ]
    auth_dir = tmp_path / "auth"
    command += [
        "--host=127.0.0.1",
        f"--artifacts-destination={tmp_path / 'artifacts'}",
        f"--auth-dir={auth_dir}",
        f"--auth-config={tmp_path / 'tmp' / 'basic_auth.ini'}",
    ]
    assert "--auth" in command
    env = {
        name: value for name, value in _env(container).items() if value and name.startswith("MLFLOW_SERVER_")
    }
    env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    service = processes.Service("mlflow-k8s", command, services.tracking_uri(port) + "/health", env)
    pod_ip = {"Host": f"10.1.2.3:{services.MLFLOW_PORT}"}
    in_cluster = {"Host": urlparse(COMPOSE["x-mlflow-client"]["MLFLOW_TRACKING_URI"]).netloc}
    api = f"{services.tracking_uri(port)}/api/2.0/mlflow/experiments/search?max_results=1"
    with running(service, tmp_path, timeout=120):
        assert (tmp_path / "mlflow.db").exists()  # the store came from the environment
        for probe in _probes(container).values():  # answered without credentials
            url = f"{services.tracking_uri(port)}{probe['httpGet']['path']}"
            assert httpx.get(url, headers=pod_ip, timeout=10).status_code == 200
        admin = auth_files.read_credentials(auth_files.identity_file(auth_dir, auth_files.ADMIN))
        assert httpx.get(api, headers=in_cluster, timeout=10).status_code == 401
        assert httpx.get(api, headers=in_cluster, auth=tuple(admin), timeout=10).status_code == 200
        assert httpx.get(api, headers=pod_ip, auth=tuple(admin), timeout=10).status_code == 403


@pytest.mark.integration
def test_monitor_probes_are_answered_by_the_real_monitor(tmp_path):
    """`credit-risk monitor --every` as the Deployment runs it (its settings, a free port, no
    MLflow to reach): every probe path answers 200 during an MLflow outage, which /health
    reports, and /metrics is served on the same port."""
    container = _container("monitor", "monitor")
    port = free_port()
    env = {name: value for name, value in _env(container).items() if value is not None}
    env |= {
        "MLFLOW_TRACKING_URI": services.tracking_uri(free_port()),
        "CREDIT_RISK_MONITOR_HOST": services.LOOPBACK,
        "CREDIT_RISK_MONITOR_PORT": str(port),
        # No credentials: nothing answers to refuse them.
        "CREDIT_RISK_CREDENTIALS_FILE": None,
        "MLFLOW_TRACKING_USERNAME": None,
        "MLFLOW_TRACKING_PASSWORD": None,
    }
    base = f"http://{services.LOOPBACK}:{port}"
    command = [str(BIN / "credit-risk"), *container["command"][1:]]
    service = processes.Service("monitor-k8s", command, f"{base}/health/live", env)
    probes = _probes(container)
    assert urlparse(_compose_health_url("monitor")).path == probes["livenessProbe"]["httpGet"]["path"]
    with running(service, tmp_path, timeout=120):
        for probe in probes.values():
            assert probe["httpGet"]["port"] == container["ports"][0]["name"]
            answer = httpx.get(f"{base}{probe['httpGet']['path']}", timeout=10)
            assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{base}/health", timeout=10).json())["mlflow"]["reachable"] is None:
            assert time.monotonic() < deadline, health
            time.sleep(0.5)
        assert health["mlflow"]["reachable"] is False and health["every"] == env["CREDIT_RISK_MONITOR_EVERY"]
        assert 'credit_risk_monitor_mlflow_up{model="credit-risk"} 0.0' in httpx.get(f"{base}/metrics").text
