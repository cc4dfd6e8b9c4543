"""Who may do what on the tracking server: this stack's identities and their grants, in the
permissions of MLflow 3.17's basic-auth app.

The table here is the whole policy. ``stack.auth.provision`` applies exactly it (and removes
or reduces any other grant these identities hold on these resources); the tests in
``tests/integration/test_auth.py`` check each line against a real server; ``markdown_table``
renders it for the docs.

How MLflow 3.17 decides (``mlflow/server/auth/__init__.py`` and ``permissions.py``), which is
what the choices below rest on:

- ``default_permission = NO_PERMISSIONS``: without a grant an identity reads and writes
  nothing. A grant is per experiment (by id) or per registered model (by name).
- ``READ`` reads; ``USE`` adds nothing over READ on experiments and registered models (it only
  matters for AI-gateway resources), so it is not used; ``EDIT`` writes (runs, metrics, tags,
  artifacts, versions, stage, alias) but deletes nothing; ``MANAGE`` deletes, restores and
  grants. Only ``admin`` holds MANAGE on an experiment or model (it is an MLflow admin, which
  skips every check).
- Deleting a run, or its files through the artifact proxy, is judged by the ``run`` tier:
  ``delete``/``manage`` there, plus READ on the run's experiment. A grant on that tier is
  wildcard-only (every run) and then decides for every experiment its holder can read; without
  one, the experiment's grant decides. So ``(run, *, MANAGE)`` for an identity that reads only
  the inference experiment lets it delete record runs and their files (retention), and nothing
  else: not the experiment (its delete needs MANAGE on the experiment), not runs elsewhere (it
  reads no other experiment), no grants. That is the ``sidecar``: retention is its job
  (``logging_sidecar.retention``, ``credit-risk records prune``).
- Runs, logged models and their artifacts (``/api/2.0/mlflow-artifacts/...``) are judged by
  their experiment: READ to read, EDIT to write. Loading ``models:/credit-risk-model/N``
  needs READ on the model *and* on the training experiment, where the logged model's files
  are.
- Any authenticated identity may create experiments and registered models (and becomes their
  MANAGE owner) unless it holds a ``DENY`` on the type; a wildcard DENY also overrides every
  grant of that type, so it can only be given to an identity that needs none: ``sidecar``,
  for registered models and prompts (a prompt is a registered model with a tag).
- ``EDIT`` on the registered model also lets its holder rename it and edit its description
  and tags: MLflow checks a rename as an update.
"""

from __future__ import annotations

from dataclasses import dataclass

from logging_sidecar.settings import INFERENCE_EXPERIMENT
from model.identity import REGISTERED_MODEL_NAME
from training.settings import DEFAULT_EXPERIMENT as TRAINING_EXPERIMENT

# Owned by the monitoring package (issues 19 and 20) once it exists; import them from there then.
MONITORING_EXPERIMENT = "credit-risk-monitoring"
OUTCOMES_EXPERIMENT = "credit-risk-outcomes"

ADMIN, TRAINER, OPERATOR, SERVING, SIDECAR, MONITOR = (
    "admin",
    "trainer",
    "operator",
    "serving",
    "sidecar",
    "monitor",
)
IDENTITIES: tuple[str, ...] = (ADMIN, TRAINER, OPERATOR, SERVING, SIDECAR, MONITOR)
# Every identity but admin: created, given a password and granted exactly their lines below.
SERVICE_IDENTITIES: tuple[str, ...] = IDENTITIES[1:]

# MLflow's resource types and permission names, as its REST API spells them.
EXPERIMENT, REGISTERED_MODEL, PROMPT, RUN = "experiment", "registered_model", "prompt", "run"
READ, EDIT, MANAGE, DENY = "READ", "EDIT", "MANAGE", "DENY"
EVERY = "*"

# The protected resources, by role. Experiments are granted by id, models by name.
TRAINING, INFERENCE, MONITORING, OUTCOMES, MODEL = "training", "inference", "monitoring", "outcomes", "model"
EXPERIMENT_ROLES: tuple[str, ...] = (TRAINING, INFERENCE, MONITORING, OUTCOMES)


@dataclass(frozen=True)
class Names:
    """What the protected resources are called in this deployment."""

    training: str = TRAINING_EXPERIMENT
    inference: str = INFERENCE_EXPERIMENT
    monitoring: str = MONITORING_EXPERIMENT
    outcomes: str = OUTCOMES_EXPERIMENT
    model: str = REGISTERED_MODEL_NAME

    def __post_init__(self):
        experiments = [self.experiment(role) for role in EXPERIMENT_ROLES]
        if len(set(experiments)) != len(experiments) or not all(experiments) or not self.model:
            raise ValueError(f"experiment names must be four different non-empty names, got {experiments}")

    def experiment(self, role: str) -> str:
        return getattr(self, role)

    def of(self, resource: str) -> str:
        """The name of ``resource`` (a role, or ``*``)."""
        return resource if resource == EVERY else getattr(self, resource)


@dataclass(frozen=True)
class Grant:
    """One line of the policy: ``identity`` holds ``permission`` on ``resource``."""

    identity: str
    resource_type: str
    resource: str  # a role (TRAINING, ..., MODEL) or EVERY
    permission: str
    allows: str
    refuses: str


POLICY: tuple[Grant, ...] = (
    Grant(
        TRAINER,
        EXPERIMENT,
        TRAINING,
        EDIT,
        "train: create runs, log parameters, metrics, artifacts and models, set run and experiment tags; "
        "also (any EDIT) rename the experiment and change any of its runs",
        "delete or restore runs or the experiment, grant permissions",
    ),
    Grant(
        TRAINER,
        REGISTERED_MODEL,
        MODEL,
        EDIT,
        "register versions, tag them, move stage Production and alias production (the gate); "
        "also (any EDIT) rename the model",
        "delete versions, version tags, aliases or the model",
    ),
    Grant(
        TRAINER,
        EXPERIMENT,
        INFERENCE,
        READ,
        "read the inference records a challenger trains on (healing)",
        "write to it",
    ),
    Grant(
        TRAINER,
        EXPERIMENT,
        OUTCOMES,
        READ,
        "read the outcomes a challenger trains on (healing)",
        "write to it",
    ),
    Grant(
        OPERATOR,
        REGISTERED_MODEL,
        MODEL,
        EDIT,
        "promote and rollback (stage, alias, promotion tags), status; also (any EDIT) register a version "
        "from a run it can read, rename the model",
        "delete versions, version tags, aliases or the model",
    ),
    Grant(
        OPERATOR,
        EXPERIMENT,
        TRAINING,
        READ,
        "load and check a version before promoting it, read its run for status",
        "write to it",
    ),
    Grant(
        OPERATOR,
        EXPERIMENT,
        OUTCOMES,
        EDIT,
        "ingest outcomes: create runs, log outcome files; also (any EDIT) rename the experiment, change its runs",
        "delete or restore runs or the experiment",
    ),
    Grant(
        SERVING,
        REGISTERED_MODEL,
        MODEL,
        READ,
        "find the Production version, read versions and their tags",
        "new version, stage, alias, tag",
    ),
    Grant(
        SERVING,
        EXPERIMENT,
        TRAINING,
        READ,
        "download a version's files, its manifest and held-out rows",
        "write to it",
    ),
    Grant(
        SIDECAR,
        EXPERIMENT,
        INFERENCE,
        EDIT,
        "ship records: create runs, log record batches and metrics; also (any EDIT) rename the experiment, "
        "change any record run",
        "delete or restore the experiment (deleting its runs: the next line)",
    ),
    Grant(
        SIDECAR,
        RUN,
        EVERY,
        MANAGE,
        "retention: delete record runs and their files, in the experiments it reads (the inference one only)",
        "runs of any other experiment (it reads none), the experiment itself, grants",
    ),
    Grant(
        SIDECAR,
        REGISTERED_MODEL,
        EVERY,
        DENY,
        "nothing",
        "read, create or change any registered model, credit-risk-model included",
    ),
    Grant(SIDECAR, PROMPT, EVERY, DENY, "nothing", "the same for prompts (registered models with a tag)"),
    Grant(MONITOR, EXPERIMENT, INFERENCE, READ, "read the inference records", "write to it"),
    Grant(MONITOR, EXPERIMENT, OUTCOMES, READ, "read the outcomes", "write to it"),
    Grant(
        MONITOR,
        EXPERIMENT,
        MONITORING,
        EDIT,
        "log monitoring runs: metrics, reports; also (any EDIT) rename the experiment, change its runs",
        "delete or restore runs or the experiment",
    ),
    Grant(
        MONITOR,
        REGISTERED_MODEL,
        MODEL,
        READ,
        "find the Production version and its training run",
        "new version, stage, alias, tag",
    ),
    Grant(
        MONITOR,
        EXPERIMENT,
        TRAINING,
        READ,
        "read the version's reference profile (logged with its run)",
        "write to it",
    ),
)


def grants_of(identity: str) -> tuple[Grant, ...]:
    if identity not in IDENTITIES:
        raise ValueError(f"unknown identity {identity!r} (known: {', '.join(IDENTITIES)})")
    return tuple(grant for grant in POLICY if grant.identity == identity)


def readers_of(role: str) -> tuple[str, ...]:
    """Identities that may read experiment ``role`` (admin always may)."""
    return (ADMIN, *(g.identity for g in POLICY if g.resource_type == EXPERIMENT and g.resource == role))


def markdown_table(names: Names = Names()) -> str:
    """The policy as a Markdown table, resources under their names in this deployment."""
    lines = [
        "| identity | resource | permission | allows | refused (403) |",
        "| --- | --- | --- | --- | --- |",
        "| `admin` | everything | MLflow admin | create users, grant, delete, restore; "
        "every check is skipped for it | nothing |",
    ]
    for grant in POLICY:
        kind = {EXPERIMENT: "experiment", REGISTERED_MODEL: "registered model", PROMPT: "prompt", RUN: "run"}
        name = "every" if grant.resource == EVERY else f"`{names.of(grant.resource)}`"
        lines.append(
            f"| `{grant.identity}` | {kind[grant.resource_type]} {name} | {grant.permission} | "
            f"{grant.allows} | {grant.refuses} |"
        )
    return "\n".join(lines)
