"""``credit-risk promote``, ``rollback`` and ``status``: the operator's commands. Production
moved by hand, and what is in it, recorded in and read from the registry
(``training.registry``, with the rules in ``training.promotion_history``), and what the
MLServer instances actually serve, asked over HTTP.

Exit codes (``stack.errors``): 0 done (or nothing to do), 1 refused or failed (the registry is
unchanged), 2 bad arguments. Flags are checked before anything talks to MLflow. MLflow and the
registry are imported inside the commands, so that `credit-risk --help` stays fast.
"""

from __future__ import annotations

import json
import sys

import httpx
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.identity import (
    DATASET_HASH,
    ENV_PREFIX,
    PRODUCTION_ALIAS,
    PRODUCTION_STAGE,
    REGISTERED_MODEL_NAME,
    TEST_ROC_AUC_TAG,
    version_uri,
)
from model.integrity import MANIFEST_DIGEST_TAG, SHORT_DIGEST_LENGTH
from serving.settings import DEFAULT_HTTP_PORT, MODEL_NAME
from stack.errors import UsageError
from stack.local import TrackingServer, use_tracking_server
from stack.services import LOOPBACK
from training.promotion_history import ACTOR_VARIABLE, PromotionError, default_actor

_SERVER_TIMEOUT_S = 5.0
_DETAIL_CHARS = 300


class OperatorSettings(BaseSettings):
    """What the operator's commands read from the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    actor: str = Field(
        default_factory=default_actor,
        validation_alias=ACTOR_VARIABLE,
        description="who promotions and rollbacks are recorded as made by (default user@host)",
    )
    mlserver_http_port: int = Field(
        DEFAULT_HTTP_PORT,
        gt=0,
        lt=65536,
        validation_alias="MLSERVER_HTTP_PORT",
        description="MLServer's own variable: the port of the local server status asks by default",
    )

    @field_validator("actor")
    @classmethod
    def _someone(cls, value: str) -> str:
        return value.strip() or default_actor()


def default_servers(settings: OperatorSettings, server: TrackingServer) -> list[str]:
    """The MLServer ``status`` asks unless told: the local stack's when that is the tracking
    server in use (and ``MLSERVER_HTTP_PORT`` does not say otherwise), else the local one on
    ``$MLSERVER_HTTP_PORT`` or MLServer's default port."""
    port = settings.mlserver_http_port
    if server.stack is not None and "mlserver_http_port" not in settings.model_fields_set:
        port = server.stack.http_port
    return [f"http://{LOOPBACK}:{port}"]


def add_parsers(subparsers) -> None:
    promote = subparsers.add_parser(
        "promote",
        help="put a version in Production by hand (stage and alias), recording who, when and why",
        description="Check version N exactly as serving will (its run in the training experiment, "
        "its files against the digests recorded at training, before anything is unpickled; its "
        "logged held-out rows answered bit for bit as at training), load it and score its input "
        "example; if that works, move stage Production and alias production to it (archiving the "
        "previous holder) "
        "and record who ($CREDIT_RISK_ACTOR or user@host), when and why as tags on the version. "
        "The gate is bypassed on purpose.",
    )
    promote.add_argument("--version", required=True, metavar="N", help="registry version number")
    promote.add_argument("--reason", required=True, help="why; recorded on the version")
    promote.set_defaults(handler=run_promote)

    rollback = subparsers.add_parser(
        "rollback",
        help="put back the version that held Production before the current one",
        description="Put back the version that held Production before the current holder got it, "
        "skipping holders that were themselves rolled back, so a second rollback steps one "
        "further back. The target is checked, loaded and scored first, as for promote: a target "
        "trained with code that answers differently is refused.",
    )
    rollback.add_argument("--reason", help="why; recorded on the version put back")
    rollback.set_defaults(handler=run_rollback)

    status = subparsers.add_parser(
        "status",
        help="what is in Production, how it got there, and what servers actually serve",
        description="Show the Production version, its dataset hash and held-out scores, its "
        "promotion and the previous holders, any divergence between stage and alias or change "
        "made outside credit-risk, and for each server the version it serves and its readiness.",
    )
    status.add_argument(
        "--server",
        dest="servers",
        action="append",
        metavar="URL",
        help="an MLServer to ask (repeatable; default: the local stack's, or "
        "http://127.0.0.1:$MLSERVER_HTTP_PORT)",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=run_status)


def _version_number(text: str) -> str:
    if not text.strip().isdigit() or int(text) < 1:
        raise UsageError(f"--version must be a registry version number such as 3, got {text!r}")
    return str(int(text))


def _reason(text: str | None) -> str:
    from mlflow.utils.validation import MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH

    text = (text or "").strip()
    if len(text) > MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH:
        raise UsageError(
            f"--reason has {len(text)} characters; the registry keeps at most "
            f"{MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH}"
        )
    return text


def _registry():
    """The tracking server in use (said on stderr) and a client for it, once it answers."""
    from mlflow.tracking import MlflowClient

    from training.train import check_tracking_server

    server = use_tracking_server()
    check_tracking_server(uri=server.uri)
    return server, MlflowClient(server.uri)


def _warn(messages: list[str]) -> None:
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)


def _next_rollback(client) -> str:
    from training import registry

    try:
        return f"A rollback now would go to v{registry.read_state(client).rollback_target()}"
    except PromotionError:
        return "A rollback now would find no earlier holder to go to"


def _verification():
    """The training experiment and any unverified versions allowed, read from the environment
    as serving reads them (``model.verified``, imported here: it imports MLflow)."""
    from model.verified import VerificationSettings

    return VerificationSettings()


def run_promote(args) -> int:
    from training import registry
    from training.servability import check_servable

    version = _version_number(args.version)
    reason = _reason(args.reason)
    if not reason:
        raise UsageError("--reason must say why (it is recorded on the version)")
    settings, verification = OperatorSettings(), _verification()
    _, client = _registry()
    state = registry.read_state(client)
    state.version(version)
    if state.holder == version and not state.divergences() and not state.unrecorded_holder:
        print(f"v{version} is already in {PRODUCTION_STAGE} (stage and alias); nothing changed")
        return 0
    _warn(state.outside_changes())
    _warn(f"{text}; promote moves both to v{version}" for text in state.divergences())
    scored = check_servable(version, verification)
    print(f"Checked v{version}: it loads as serving loads it and scored {scored}")
    promotion = registry.promote(client, version, actor=settings.actor, reason=reason, source="cli")
    archived = f"v{promotion.previous} archived" if promotion.previous else "nothing to archive"
    print(
        f"Promoted {REGISTERED_MODEL_NAME} v{version} to {PRODUCTION_STAGE} "
        f"(promotion #{promotion.seq}); {archived}; alias {PRODUCTION_ALIAS} → v{version}\n"
        f"Recorded on v{version}: by {promotion.by} at {promotion.at}, reason {promotion.reason!r}\n"
        f"{_next_rollback(client)}"
    )
    return 0


def run_rollback(args) -> int:
    from training import registry
    from training.servability import check_servable

    reason = _reason(args.reason)
    settings, verification = OperatorSettings(), _verification()
    _, client = _registry()
    state = registry.read_state(client)
    target = state.rollback_target()
    _warn(state.outside_changes())
    _warn(
        f"{text}; rolling back from stage {PRODUCTION_STAGE} (what serving follows), "
        f"and both move to v{target}"
        for text in state.divergences()
    )
    scored = check_servable(target, verification)
    print(f"Checked v{target}: it loads as serving loads it and scored {scored}")
    undone, new = registry.rollback(client, actor=settings.actor, reason=reason, expected=target)
    print(
        f"Rolled back {REGISTERED_MODEL_NAME}: {PRODUCTION_STAGE} "
        f"v{undone.version} → v{new.version} (promotion #{new.seq}); v{undone.version} archived; "
        f"alias {PRODUCTION_ALIAS} → v{new.version}\n"
        f"Recorded on v{new.version}: by {new.by} at {new.at}, reason {new.reason!r}; "
        f"v{undone.version}'s promotion #{undone.seq} is marked rolled back\n"
        f"{_next_rollback(client)}"
    )
    return 0


# --- status ---------------------------------------------------------------------------------


def probe_server(url: str, production: str | None = None) -> dict:
    """Which version ``url`` serves and whether it is ready; never raises for a dead server.
    When it is ready but serves another version than ``production`` (a version refused or not
    loaded yet), ``detail`` is its own account of why (its readiness ``status``)."""
    url = url.rstrip("/")
    found = {"url": url, "reachable": False, "version": None, "ready": False, "detail": ""}
    try:
        ready = httpx.get(f"{url}/v2/health/ready", timeout=_SERVER_TIMEOUT_S)
        metadata = httpx.get(f"{url}/v2/models/{MODEL_NAME}", timeout=_SERVER_TIMEOUT_S)
    except httpx.HTTPError as error:
        found["detail"] = f"unreachable: {str(error) or type(error).__name__}"
        return found
    found["reachable"] = True
    found["ready"] = ready.status_code == 200
    details = []
    if not found["ready"]:
        # The server's own account in full (it names the refused file), else its body, cut short.
        reason = _readiness_status(ready) or ready.text.strip()[:_DETAIL_CHARS]
        details.append(f"ready answered {ready.status_code} {reason}".strip())
    try:
        metadata.raise_for_status()
        found["version"] = (metadata.json().get("parameters") or {}).get("registry_version")
    except (httpx.HTTPStatusError, ValueError):
        details.append(
            f"model metadata answered {metadata.status_code} {metadata.text.strip()[:_DETAIL_CHARS]}".strip()
        )
    if found["ready"] and found["version"] is not None and production not in (None, found["version"]):
        details.append(_readiness_status(ready))
    found["detail"] = "; ".join(detail for detail in details if detail)
    return found


def _readiness_status(ready: httpx.Response) -> str:
    try:
        return str(ready.json().get("status") or "")
    except (ValueError, AttributeError):
        return ""


def _held_out_scores(client, version) -> dict:
    from mlflow.exceptions import MlflowException

    from training import registry

    scores = {"version_tag": version.tags.get(TEST_ROC_AUC_TAG), "run_id": version.run_id}
    metrics = {}
    try:
        if version.run_id:
            run = client.get_run(version.run_id)
            metrics = run.data.metrics
            route = f"experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            scores["run_url"] = registry.ui_url(client.tracking_uri, route)
    except MlflowException as error:
        scores["run_error"] = error.message
    scores["run_metrics"] = {
        name: value for name, value in sorted(metrics.items()) if name.startswith("test_")
    }
    return scores


def waiting_challengers(state) -> list[dict]:
    """Challengers that passed the healing gate in manual mode and wait for an operator:
    tagged ``heal.challenger=waiting``, not in Production and never promoted. Newest first."""
    from healing import tags as heal

    waiting = []
    for number, version in state.versions.items():
        tags = version.tags
        if not heal.is_waiting(number, tags, state.holder):
            continue
        challenged = tags.get(heal.CHALLENGES)
        waiting.append(
            {
                "version": number,
                "challenges": challenged,
                "production_moved": challenged != state.holder,
                "attempt_run_id": tags.get(heal.ATTEMPT_RUN),
                "gate_reason": tags.get("gate.reason"),
                "recent_rows": tags.get("gate.recent.rows"),
                "candidate_roc_auc_recent": tags.get("gate.recent.candidate_roc_auc"),
                "production_roc_auc_recent": tags.get("gate.recent.production_roc_auc"),
                "command": f"credit-risk promote --version {number} --reason 'reviewed challenger v{number}'",
            }
        )
    return sorted(waiting, key=lambda item: int(item["version"]), reverse=True)


def _waiting_lines(report: dict) -> list[str]:
    lines = []
    for item in report.get("waiting_challengers", []):
        moved = (
            f" (Production has moved since: the comparison was with v{item['challenges']})"
            if item["production_moved"]
            else ""
        )
        lines += [
            f"  v{item['version']}  challenger of v{item['challenges']}, passed the healing gate{moved}: "
            f"recent ROC AUC {item['candidate_roc_auc_recent']} vs {item['production_roc_auc_recent']} "
            f"on {item['recent_rows']} rows (attempt run {item['attempt_run_id']})",
            f"        to promote it: {item['command']}",
        ]
    return ["Waiting for an operator (healing, mode manual):", *lines] if lines else []


def status_report(client, state, servers: list[str]) -> dict:
    from training.promotion_history import Promotion

    holder = state.holder
    production = None
    if holder is not None:
        version = state.versions[holder]
        record = Promotion.from_version(version)
        production = {
            "version": holder,
            "model_uri": version_uri(holder),
            "dataset_hash": version.tags.get(DATASET_HASH),
            "integrity_record": version.tags.get(MANIFEST_DIGEST_TAG),
            "held_out": _held_out_scores(client, version),
            "promotion": None if state.unrecorded_holder or record is None else record.as_dict(),
        }
    try:
        rollback_target = state.rollback_target()
    except PromotionError:
        rollback_target = None
    return {
        "registered_model": REGISTERED_MODEL_NAME,
        "tracking_uri": client.tracking_uri,
        "production": production,
        "stage_versions": state.stage_versions,
        "alias": {"name": PRODUCTION_ALIAS, "version": state.alias_version},
        "divergences": state.divergences(),
        "outside_changes": state.outside_changes(),
        "rollback_target": rollback_target,
        "history": [
            {**record.as_dict(), "stage": state.versions[record.version].current_stage}
            for record in state.history
        ],
        "servers": [probe_server(url, holder) for url in servers],
        "waiting_challengers": waiting_challengers(state),
    }


def _scores_line(held_out: dict) -> str:
    parts = []
    if held_out["version_tag"]:
        parts.append(f"test_roc_auc {held_out['version_tag']} (version tag)")
    run = f"run {held_out['run_id']}"
    if held_out["run_metrics"]:
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in held_out["run_metrics"].items())
        parts.append(f"{run}: {metrics}")
    else:
        parts.append(f"{run}: {held_out.get('run_error', 'no test_* metrics')}")
    return "; ".join(parts)


def _integrity_line(digest: str | None) -> str:
    if not digest:
        return "no digests recorded on the version (trained before them? serving refuses such a version)"
    # The version's tag is a copy for people; serving, promote and rollback check the run's.
    return f"manifest sha256 {digest[:SHORT_DIGEST_LENGTH]} (copy of the training run's record, which serving checks)"


def _quoted_reason(record: dict) -> str:
    return repr(record["reason"]) if record["reason"] else "(no reason given)"


def _promotion_line(record: dict) -> str:
    previous = f"v{record['previous']}" if record["previous"] else "none"
    return (
        f"#{record['seq']} at {record['at']} by {record['by']} via {record['source']}: "
        f"{_quoted_reason(record)} (previous holder {previous})"
    )


def _server_line(server: dict, holder: str | None) -> str:
    if not server["reachable"]:
        return f"  {server['url']}  {server['detail']}"
    version = f"serving v{server['version']}" if server["version"] else "serving no model"
    if server["version"] and server["version"] != holder:
        version += f" (Production is {f'v{holder}' if holder else 'empty'})"
    ready = "ready" if server["ready"] else "NOT ready"
    detail = f" ({server['detail']})" if server["detail"] else ""
    return f"  {server['url']}  {version}, {ready}{detail}"


def format_status(report: dict) -> str:
    production = report["production"]
    name = report["registered_model"]
    if production is None:
        lines = [f"{name} in Production: none ({report['tracking_uri']})"]
    else:
        record = production["promotion"]
        lines = [
            f"{name} in Production: v{production['version']} ({report['tracking_uri']})",
            f"  model URI        {production['model_uri']}",
            f"  alias            {report['alias']['name']} → "
            + (f"v{report['alias']['version']}" if report["alias"]["version"] else "not set"),
            f"  dataset hash     {production['dataset_hash'] or 'not recorded'}",
            f"  integrity        {_integrity_line(production['integrity_record'])}",
            f"  held-out scores  {_scores_line(production['held_out'])}",
            f"  run in the UI    {production['held_out'].get('run_url') or 'no link'}",
            f"  promoted         {_promotion_line(record) if record else 'no record of it (see Attention)'}",
        ]
    target = report["rollback_target"]
    lines.append(f"  rollback         {f'would go to v{target}' if target else 'nothing earlier to go to'}")
    problems = report["divergences"] + report["outside_changes"]
    if report["divergences"]:
        problems.append(
            "divergences are reported, never repaired here: credit-risk promote --version N "
            "--reason TEXT moves stage and alias together"
        )
    if problems:
        lines += ["Attention:", *(f"  ! {problem}" for problem in problems)]
    lines += _waiting_lines(report)
    lines.append("History (newest first):" if report["history"] else "History: no promotion recorded")
    for record in report["history"]:
        undone = f", rolled back at {record['rolled_back_at']}" if record["rolled_back"] else ""
        lines.append(
            f"  #{record['seq']:<3} v{record['version']:<4} {record['stage']:<10} {record['at']}  "
            f"{record['source']:<8} {record['by']}  {_quoted_reason(record)}{undone}"
        )
    if report["servers"]:
        lines.append("Servers:")
        holder = production["version"] if production else None
        lines += [_server_line(server, holder) for server in report["servers"]]
    return "\n".join(lines)


def run_status(args) -> int:
    from training import registry

    settings = OperatorSettings()
    server, client = _registry()
    state = registry.read_state(client)
    report = status_report(client, state, args.servers or default_servers(settings, server))
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0
