"""deploy/kubernetes/ and deploy/kserve/: valid against the Kubernetes schemas (offline,
strict), and in step with docker-compose.yml and the code, so the three cannot drift apart:
images, ports, probe paths (asked of the real processes) and environment variable names."""

from __future__ import annotations

import dataclasses
import re
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
from serving.settings import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    serving_environment,
)
from serving.spool_format import SpoolSettings
from stack import processes, services, tracking_server
from tests.helpers import BIN, REPO, free_port, running

MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
KSERVE = REPO / "deploy" / "kserve" / "inferenceservice.yaml"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
# 1.29: the oldest Kubernetes that runs native sidecars (restartPolicy: Always on an init
# container) by default; and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# The image's own variables (postgres:15-bookworm), not this project's.
POSTGRES_IMAGE_VARIABLES = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PGDATA"}
PROJECT_SOURCES = [
    path
    for package in ("model", "training", "serving", "logging_sidecar", "stack")
    for path in (REPO / package).glob("*.py")
]


def _load(path: Path) -> list[dict]:
    return [resource for resource in yaml.safe_load_all(path.read_text()) if resource]


RESOURCES = [resource for path in MANIFESTS for resource in _load(path)]
[INFERENCE_SERVICE] = _load(KSERVE)


def _named(kind: str, name: str) -> dict:
    [resource] = [r for r in RESOURCES if r["kind"] == kind and r["metadata"]["name"] == name]
    return resource


def _pod_specs() -> dict[str, dict]:
    """Every pod template, by its workload's name, plus the KServe predictor's pod fields."""
    specs = {
        r["metadata"]["name"]: r["spec"]["template"]["spec"]
        for r in RESOURCES
        if r["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    specs["kserve"] = INFERENCE_SERVICE["spec"]["predictor"]
    return specs


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
    errors = []
    for resource in RESOURCES:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(map(str, error.path))
            errors.append(f"{resource['kind']}/{resource['metadata']['name']}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(error.message)  # an unknown kind or apiVersion is a failure, not a skip
    assert RESOURCES and not errors, "\n".join(errors)


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


def test_the_database_account_is_the_one_compose_uses():
    secret = _named("Secret", "db")["stringData"]
    # Compose gives PostgreSQL the password as a file: POSTGRES_PASSWORD_FILE.
    assert set(secret) == {name.removesuffix("_FILE") for name in _compose_env("db")}
    assert _container("db", "db")["envFrom"] == [{"secretRef": {"name": "db"}}]


# Set under compose only, and why.
COMPOSE_ONLY = {
    # libpq's password file on the `credentials` volume; the Deployment passes the password
    # from the Secret into the URI instead.
    ("mlflow", "PGPASSFILE"),
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
                assert set(container["resources"][bound]) == {"cpu", "memory"}, where


def test_the_autoscaler_scales_serving_on_cpu():
    hpa = _named("HorizontalPodAutoscaler", "serving")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "serving",
    }
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


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
    MLFLOW_BACKEND_STORE_URI), on SQLite and a free port: kubelet's probes (Host: the pod's IP)
    get through, and so do clients using the in-cluster URI; any other host is refused."""
    container = _container("mlflow", "mlflow")
    port = free_port()
    command = [str(BIN / "credit-risk")] + [
        f"--port={port}" if arg.startswith("--port=") else arg
        for arg in container["command"][1:]
        if not arg.startswith(("--host=", "--artifacts-destination="))
    ]
    command += ["--host=127.0.0.1", f"--artifacts-destination={tmp_path / 'artifacts'}"]
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
        for probe in _probes(container).values():
            url = f"{services.tracking_uri(port)}{probe['httpGet']['path']}"
            assert httpx.get(url, headers=pod_ip, timeout=10).status_code == 200
        assert httpx.get(api, headers=in_cluster, timeout=10).status_code == 200
        assert httpx.get(api, headers=pod_ip, timeout=10).status_code == 403
