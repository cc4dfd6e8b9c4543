"""``credit-risk sidecar`` (ship the spool to MLflow, or ``--drain-once``), ``credit-risk
records`` (read back) and ``credit-risk records prune`` (delete past a retention window).

The only place that builds the fault-point hook (tests only) from the settings.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path


def _moment(text: str) -> datetime:
    """An ISO 8601 time for ``--since``/``--until``, UTC when it names no zone."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port (0-65535): {text!r}")
    return port


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = 0
    if days < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of days >= 1: {text!r}")
    return days


def _fault_hook(settings):
    """The test-only fault points as the hook the loop and the pruner call."""
    from logging_sidecar.faults import FaultPoints, no_faults

    return FaultPoints(settings.fault_points, settings.fault_pause_s) if settings.fault_points else no_faults


def _log_to(stream) -> None:
    stream.reconfigure(line_buffering=True)  # a log file shows each line as it happens
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=stream
    )


def add_parser(subparsers) -> None:
    sidecar = subparsers.add_parser(
        "sidecar",
        help="ship captured inference records from the spool to MLflow",
        description="Run the logging sidecar in the foreground. Configured by environment "
        "variables (see logging_sidecar/settings.py): CREDIT_RISK_SPOOL_DIR, "
        "CREDIT_RISK_FLUSH_RECORDS, CREDIT_RISK_FLUSH_INTERVAL_S, CREDIT_RISK_SIDECAR_PORT, "
        "MLFLOW_TRACKING_URI, ...; flags override them.",
    )
    sidecar.add_argument("--spool-dir", type=Path, help="the spool folder (CREDIT_RISK_SPOOL_DIR)")
    sidecar.add_argument(
        "--port", type=_port, help="health and metrics port (CREDIT_RISK_SIDECAR_PORT, default 8083)"
    )
    sidecar.add_argument(
        "--drain-once",
        action="store_true",
        help="ship everything in the spool and exit: 0 once it is empty; 1 with one error line "
        "when another sidecar or a live server uses it, or nothing could be shipped for "
        "CREDIT_RISK_STALL_AFTER_S (for a volume a removed replica left behind; no HTTP)",
    )
    sidecar.set_defaults(handler=run_sidecar)

    records = subparsers.add_parser(
        "records",
        help="read shipped inference records back from MLflow",
        description="Print (or save) the inference records shipped to MLflow, one row per "
        "scored row, with the training feature names.",
    )
    records.add_argument("--model-version", help="only this registry version")
    records.add_argument(
        "--since", type=_moment, help="only records at or after this ISO 8601 time (UTC if it names no zone)"
    )
    records.add_argument(
        "--until", type=_moment, help="only records before this ISO 8601 time (UTC if it names no zone)"
    )
    records.add_argument("--output", type=Path, help="write to this .parquet or .csv file")
    records.set_defaults(handler=show_records)
    actions = records.add_subparsers(dest="records_action", metavar="ACTION", required=False)
    prune = actions.add_parser(
        "prune",
        help="delete shipped records (and dead letters) past a retention window",
        description="Delete, for good, the inference records of every UTC day that ended more "
        "than DAYS days ago (their files first, then their runs), and finish any prune that was "
        "interrupted. The current day is never touched. With --spool-dir, also remove that "
        "spool's dead letters parked more than DAYS days ago. Exit 0 when done, 1 with one "
        "error line when MLflow failed (run it again: it goes on where it stopped).",
    )
    prune.add_argument(
        "--older-than", type=_days, required=True, metavar="DAYS", help="the retention window, in days"
    )
    prune.add_argument(
        "--spool-dir", type=Path, help="also prune this spool's dead-letter file (dead-letters.ndjson)"
    )
    prune.set_defaults(handler=prune_records)


def run_sidecar(args) -> int:
    """0 after a SIGTERM drain; 1 when another sidecar holds the spool or an unexpected error
    stopped the loop (logged with its traceback), so that a supervisor restarts it. Bad
    settings raise ``pydantic.ValidationError`` (exit 2, naming the variables).
    ``--drain-once``: see ``drain_once``."""
    from logging_sidecar.service import SpoolBusy
    from logging_sidecar.service import run_sidecar as run
    from logging_sidecar.settings import SidecarSettings
    from serving.spool_format import SpoolSettings

    flags = {}
    if args.spool_dir:
        flags["spool"] = SpoolSettings(directory=args.spool_dir)  # the spool's other variables still apply
    if args.port is not None:
        flags["port"] = args.port
    settings = SidecarSettings(**flags)
    if args.drain_once:
        return drain_once(settings)
    _log_to(sys.stdout)
    try:
        run(settings, _fault_hook(settings))
    except SpoolBusy as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception:
        logging.getLogger("credit_risk.sidecar").exception("sidecar stopped by an unexpected error; exit 1")
        return 1
    return 0


def drain_once(settings) -> int:
    """0 when the spool is empty; 1 (one ``error:`` line) when it is in use by another
    process or could not be emptied; 2 when the spool folder does not exist."""
    from logging_sidecar.dead_letters import DEAD_LETTER_FILE
    from logging_sidecar.drain_once import SpoolInUse
    from logging_sidecar.drain_once import drain_once as drain
    from logging_sidecar.service import SpoolBusy
    from logging_sidecar.stop_flag import StopFlag

    spool = settings.spool.directory
    if not spool.is_dir():
        print(
            f"error: spool folder {spool} does not exist (--spool-dir / CREDIT_RISK_SPOOL_DIR)",
            file=sys.stderr,
        )
        return 2
    _log_to(sys.stdout)
    stop = StopFlag()  # set by the handler below: no lock (see logging_sidecar.stop_flag)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        drained = drain(settings, _fault_hook(settings), stop)
    except (SpoolBusy, SpoolInUse) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception:
        logging.getLogger("credit_risk.sidecar").exception("drain stopped by an unexpected error; exit 1")
        return 1
    if drained.reason is not None:
        print(
            f"error: {drained.left} records left in {spool} after shipping {drained.shipped}: "
            f"{drained.reason}; run it again to go on",
            file=sys.stderr,
        )
        return 1
    summary = f"drained {spool}: shipped {drained.shipped} records, no segment left"
    dead_letters = spool / DEAD_LETTER_FILE
    if dead_letters.exists() and (lines := dead_letters.read_bytes().count(b"\n")):
        summary += f"; {lines} dead letters (lines that can never ship) stay in {dead_letters} for inspection"
    print(summary)
    return 0


def prune_records(args) -> int:
    """0 done; 1 (one ``error:`` line) when MLflow failed or a run's files would not go;
    2 when ``--spool-dir`` is not a folder."""
    from mlflow.exceptions import MlflowException

    from logging_sidecar.dead_letters import prune_dead_letters
    from logging_sidecar.retention import PruneIncomplete, RecordPruner
    from logging_sidecar.settings import RecordsSettings

    settings = RecordsSettings()
    if args.spool_dir is not None and not args.spool_dir.is_dir():
        print(f"error: --spool-dir {args.spool_dir} is not a folder", file=sys.stderr)
        return 2
    _log_to(sys.stderr)
    now = datetime.now(UTC)
    try:
        letters = (
            prune_dead_letters(args.spool_dir, now - timedelta(days=args.older_than)) if args.spool_dir else 0
        )
        result = RecordPruner(settings.experiment, faults=_fault_hook(settings)).prune(
            args.older_than, now=now
        )
    except (MlflowException, PruneIncomplete, OSError) as error:
        print(
            f"error: {_refused_prune(error) or f'prune stopped, run it again to finish: {error}'}",
            file=sys.stderr,
        )
        return 1
    summary = f"pruned experiment '{settings.experiment}': {result}"
    if args.spool_dir:
        summary += f"; {letters} dead letters removed from {args.spool_dir}"
    print(summary)
    return 0


_AS_SIDECAR = "the sidecar's credentials (CREDIT_RISK_CREDENTIALS_FILE=.credit-risk/auth/sidecar.env)"


def _refused_prune(error: Exception) -> str | None:
    """A 401 or 403 of the tracking server, said as what it means for a prune; else None."""
    import os

    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
    else:  # the artifact proxy's errors are requests.HTTPError
        status = getattr(getattr(error, "response", None), "status_code", None)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        who = f"the credentials of {user!r}" if user else "a request without credentials"
        return f"the tracking server refused {who} (401): run the prune with {_AS_SIDECAR}"
    if status == 403:
        return (
            f"the tracking server refused the prune to {user!r} (403): deleting records needs the right "
            f"to delete runs of the inference experiment, which only the sidecar holds; run it again with "
            f"{_AS_SIDECAR} to finish"
        )
    return None


def show_records(args) -> int:
    from logging_sidecar.reader import read_records
    from logging_sidecar.settings import RecordsSettings
    from model.identity import utc_timestamp

    # Bad arguments: one line and exit 2, before anything is read.
    if args.output is not None and args.output.suffix not in (".parquet", ".csv"):
        print(f"error: --output must end in .parquet or .csv, got {args.output}", file=sys.stderr)
        return 2
    if args.since is not None and args.until is not None and args.until <= args.since:
        print(
            f"error: --until {utc_timestamp(args.until)} must be after --since {utc_timestamp(args.since)}",
            file=sys.stderr,
        )
        return 2
    experiment = RecordsSettings().experiment
    records = read_records(
        model_version=args.model_version, since=args.since, until=args.until, experiment=experiment
    )
    if args.output is None:
        print(records.to_string(max_rows=20))
    elif args.output.suffix == ".parquet":
        records.to_parquet(args.output, index=False)
    else:
        records.to_csv(args.output, index=False)
    print(f"{len(records)} records", file=sys.stderr)
    for name, reason in records.attrs["skipped"]:
        print(f"skipped unreadable batch {name}: {reason}", file=sys.stderr)
    return 0
