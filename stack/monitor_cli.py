"""``credit-risk monitor`` (one window, or the service with ``--every``) and ``credit-risk
outcomes add``: the command-line face of ``monitoring``.

Exit codes (``stack.errors``): 0 done, **whatever the drift status** (a window in ``alert``
is a finding, not a failure: read ``status``); 1 when the window could not be computed or the
outcomes were refused (a conflict with stored outcomes, keys listed); 2 for bad flags, bad
``CREDIT_RISK_MONITOR_*`` settings, or an outcome file that is unusable (malformed, or
contradicting itself: keys listed). Flags, settings and the file are checked before anything
talks to MLflow. MLflow and the monitoring library are imported inside the commands, so that
``credit-risk --help`` stays fast.

The service's plug for what runs after each window (the healing policy, issue 20) is
``after_window_callables``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from model.identity import utc_timestamp
from stack.errors import FAILED, UsageError
from stack.local import use_tracking_server

_FROM_SETTINGS = "from the settings"  # --every without a value: CREDIT_RISK_MONITOR_EVERY


def _moment(text: str) -> datetime:
    """An ISO 8601 time for ``--since``/``--until``, UTC when it names no zone."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def add_parsers(subparsers) -> None:
    monitor = subparsers.add_parser(
        "monitor",
        help="drift and outcome monitoring of a model version over its inference records",
        description="Compute one window (default: the last CREDIT_RISK_MONITOR_WINDOW, 24h, of the "
        "Production version): drift per feature and of the score against the version's training "
        "profile, and outcome metrics where outcomes are known; print it, and log it as a run of "
        "the experiment credit-risk-monitoring. The exit code is 0 whatever the drift status: the "
        "status is data. With --every, run as a service: a window every interval, with /health "
        "and Prometheus /metrics on CREDIT_RISK_MONITOR_PORT (8084).",
    )
    monitor.add_argument(
        "--since", type=_moment, help="window start, inclusive (ISO 8601, UTC unless it names a zone)"
    )
    monitor.add_argument("--until", type=_moment, help="window end, exclusive (default: now)")
    monitor.add_argument("--model-version", metavar="N", help="registry version (default: Production)")
    monitor.add_argument("--json", action="store_true", help="print one JSON object")
    monitor.add_argument(
        "--every",
        nargs="?",
        const=_FROM_SETTINGS,
        metavar="DURATION",
        help="run as a service, a window every DURATION (15m, 1h, ...; without a value "
        "CREDIT_RISK_MONITOR_EVERY, default 15m)",
    )
    monitor.add_argument(
        "--heal",
        action="store_true",
        help="with --every: run the healing policy (credit-risk heal --once) after each window, "
        "with the credentials in CREDIT_RISK_HEAL_CREDENTIALS_FILE under auth",
    )
    monitor.set_defaults(handler=run_monitor)

    outcomes = subparsers.add_parser(
        "outcomes",
        help="delayed outcomes (what became of scored applicants), stored in MLflow",
        description="Store outcomes for monitoring: a CSV with request_id, outcome (0/1), and "
        "optionally row (default 0) and observed_at.",
    )
    actions = outcomes.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add",
        help="store the outcomes of a CSV file (idempotent)",
        description="Parse FILE strictly and store its outcomes in the experiment "
        "credit-risk-outcomes ($CREDIT_RISK_OUTCOMES_EXPERIMENT). Keys (request_id, row) already "
        "stored with the same outcome are counted, not stored again; a key whose outcome differs "
        "from a stored one, or from another line of the file, refuses the whole file, keys listed, "
        "and nothing is stored.",
    )
    add.add_argument("file", type=Path, metavar="FILE.csv")
    add.set_defaults(handler=run_outcomes_add)


def _version_number(text: str | None) -> str | None:
    if text is None:
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise UsageError(f"--model-version must be a registry version number such as 3, got {text!r}")
    return str(int(text))


def _client():
    """The tracking server in use (said on stderr) and a client for it, once it answers."""
    from mlflow.tracking import MlflowClient

    from training.train import check_tracking_server

    server = use_tracking_server()
    check_tracking_server(uri=server.uri)
    return server, MlflowClient(server.uri)


def _quiet_mlflow() -> None:
    """MLflow's client prints a link of its own to stdout when a run ends; these commands
    print theirs (stdout is the table, or the JSON object)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _error(message: object) -> None:
    print(f"error: {message}", file=sys.stderr)


def run_monitor(args) -> int:
    from monitoring.settings import MonitorSettings

    _quiet_mlflow()
    version = _version_number(args.model_version)
    if args.every is not None:
        given = [flag for flag, value in (("--since", args.since), ("--until", args.until),
                                          ("--model-version", version), ("--json", args.json)) if value]  # fmt: skip
        if given:
            raise UsageError(
                f"--every runs the service over the Production version; {', '.join(given)} "
                "apply to one window only"
            )
        every = {} if args.every == _FROM_SETTINGS else {"every": args.every}
        return _serve(MonitorSettings(**every, **({"heal": True} if args.heal else {})))
    if args.heal:
        raise UsageError("--heal runs the healing policy after each window of the service: pass --every too")
    settings = MonitorSettings()
    return _one_window(args, settings, version)


def _one_window(args, settings, version: str | None) -> int:
    from monitoring.job import MonitorError, Window, monitor_once
    from monitoring.text import window_table
    from training.registry import ui_url

    if args.since is not None and args.until is not None and args.until <= args.since:
        raise UsageError(
            f"--until {utc_timestamp(args.until)} must be after --since {utc_timestamp(args.since)}"
        )
    if args.since is not None and args.until is None and args.since >= datetime.now(UTC):
        raise UsageError(f"--since {utc_timestamp(args.since)} is in the future: the window would be empty")
    window = Window.ending(args.until, settings.window, args.since)
    server, client = _client()
    try:
        monitored = monitor_once(
            client,
            window,
            version=version,
            experiments=settings.experiments,
            thresholds=settings.thresholds,
        )
    except MonitorError as error:
        _error(error)
        return FAILED
    url = ui_url(server.uri, f"experiments/{monitored.experiment_id}/runs/{monitored.run_id}")
    if args.json:
        print(json.dumps({**monitored.to_dict(), "monitoring_run_url": url}, indent=2))
        print(f"monitoring run: {url or monitored.run_id}", file=sys.stderr)
    else:
        print(window_table(monitored))
        print(f"monitoring run: {url or monitored.run_id}")
    return 0


def after_window_callables(settings) -> list:
    """What the service runs after each window, in order, with the ``MonitoredWindow``
    (``monitoring.service.AfterWindow``): the healing policy when ``--heal`` (or
    ``CREDIT_RISK_MONITOR_HEAL``) asks for it (``stack.heal_hook``)."""
    from stack.heal_hook import HealAfterWindow

    return [HealAfterWindow(settings.heal_credentials_file)] if settings.heal else []


def _serve(settings) -> int:
    from mlflow.tracking import MlflowClient

    from monitoring.job import Profiles, Window, monitor_once
    from monitoring.service import MlflowProbe, MonitorService, ServiceStartError, run_service
    from serving.settings import MODEL_NAME

    server = use_tracking_server()  # a server named by MLFLOW_TRACKING_URI need not answer yet
    # MLflow's client retries a failed call for minutes; the loop retries windows itself and
    # says so on /health, so each call gives up sooner (a variable set by the caller wins).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    sys.stdout.reconfigure(line_buffering=True)  # a log file shows each line as it happens
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout
    )
    client, profiles = MlflowClient(server.uri), Profiles()

    def compute():
        return monitor_once(
            client,
            Window.ending(None, settings.window),
            experiments=settings.experiments,
            thresholds=settings.thresholds,
            profiles=profiles,
        )

    service = MonitorService(settings, compute, MlflowProbe(server.uri), after_window_callables(settings))
    try:
        run_service(service, MODEL_NAME)
    except ServiceStartError as error:
        _error(error)
        return FAILED
    return 0


def run_outcomes_add(args) -> int:
    from monitoring.outcomes import ConflictingOutcomes, OutcomeError, parse_outcomes, store_outcomes
    from monitoring.settings import Experiments
    from monitoring.store import DeletedExperiment

    _quiet_mlflow()
    experiments = Experiments()
    try:  # the file first: a bad one is refused before anything reaches MLflow
        parsed = parse_outcomes(args.file)
    except OutcomeError as error:  # malformed, or contradicting itself
        raise UsageError(error) from None
    _, client = _client()
    try:
        result = store_outcomes(parsed, client=client, experiment=experiments.outcomes)
    except (ConflictingOutcomes, OutcomeError, DeletedExperiment) as error:
        _error(error)
        return FAILED
    print(
        f"{result.source_name}: {result.file_rows} outcome(s) in the file: {result.new_rows} stored now, "
        f"{result.already_stored} already stored (experiment {experiments.outcomes})"
    )
    if result.run_id:
        print(f"batch {result.batch} in run {result.run_id}")
    return 0
