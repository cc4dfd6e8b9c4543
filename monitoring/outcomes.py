"""Delayed outcomes: what became of the applicants the model scored, ingested from CSV files
and kept in MLflow.

**The file.** A CSV (UTF-8, optional BOM, any line endings) with a header naming the columns,
in any order: ``request_id`` (the V2 request's id, as recorded), ``outcome`` (``0`` or ``1``;
1 = default, the model's target), and optionally ``row`` (the row within the request, a
whole number, default 0 when the column is absent) and ``observed_at`` (when the outcome was
known: ISO 8601, a time without an offset is UTC; an empty cell means unknown). Parsing is
strict: every problem is reported by line and column (``line 7, column outcome: expected 0
or 1, got '2'``), and a file with any problem is refused whole. Empty lines are ignored.

**Storage.** Experiment ``credit-risk-outcomes``, one run per stored batch: the batch is one
Parquet file ``outcomes/<digest>.parquet`` (``request_id``, ``row_index``, ``outcome``,
``observed_at``), where the digest is the SHA-256 of the batch's canonical content (its rows
sorted by key); the run's tags name the source file (``outcomes.source_name``,
``outcomes.source_sha256``), the batch (``outcomes.batch``), its rows, and its state.

**Idempotent.** A key ``(request_id, row)`` is stored once. A key already stored with the
same outcome is not stored again (so the same file twice stores nothing the second time, and
a file that overlaps earlier ones stores only its new keys); a key given twice in one file with
the same outcome counts once. A key whose outcome conflicts with a stored one, or with another
line of the same file, refuses the whole file with the keys listed, and nothing is written.

**Two ingests at once** (two operators, two cron jobs) cannot store conflicting outcomes. An
ingest first checks the stored batches (a conflict here refuses it before it writes anything),
then *announces* its batch (run created, file uploaded, then the tag ``outcomes.state =
announced``), then checks again, against every batch committed or announced by then, and only
if nothing conflicts *commits* (``outcomes.state = committed``); otherwise it deletes its run
and refuses. Of two conflicting ingests, the one that checks second sees the other's
announcement (the other announced before checking), so they never both commit; if each sees
the other, both refuse and one retry settles it. Only committed batches are read back. An
ingest that dies after announcing leaves an announced run that is ignored (and counts as no
conflict) once it is ``ANNOUNCED_TTL_S`` (10 minutes) old by its start time, so the
clocks of the machines that ingest are assumed to agree within minutes. Two ingests of
overlapping files may both store the shared keys; they have the same outcome, and reading
keeps the earliest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from model.identity import utc_timestamp
from monitoring.settings import OUTCOMES_EXPERIMENT
from monitoring.store import experiment_id

logger = logging.getLogger(__name__)

BATCH_DIR = "outcomes"
BATCH_TAG = "outcomes.batch"
STATE_TAG = "outcomes.state"
SOURCE_NAME_TAG = "outcomes.source_name"
SOURCE_SHA256_TAG = "outcomes.source_sha256"
ROWS_TAG = "outcomes.rows"
FILE_ROWS_TAG = "outcomes.file_rows"
ANNOUNCED, COMMITTED = "announced", "committed"
ANNOUNCED_TTL_S = 600

REQUIRED_COLUMNS = ("request_id", "outcome")
OPTIONAL_COLUMNS = ("row", "observed_at")
COLUMNS = ("request_id", "row_index", "outcome", "observed_at")  # as stored and read back
_MAX_ROW = 2**31 - 1  # records keep row_index as int32
_WHOLE_NUMBER = re.compile(r"[0-9]+")
_SHOWN = 20  # problems or keys spelled out in one message


class OutcomeError(ValueError):
    """Outcomes that cannot be stored; nothing was written."""


@dataclass(frozen=True)
class Problem:
    line: int
    column: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", column {self.column}" if self.column else "")
        return f"{where}: {self.message}"


class OutcomeFileError(OutcomeError):
    """The file breaks the format; ``problems`` lists every problem found."""

    def __init__(self, name: str, problems: list[Problem]):
        self.problems = problems
        shown = "; ".join(map(str, problems[:_SHOWN]))
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        super().__init__(f"{name}: {len(problems)} problem(s): {shown}{more}")


@dataclass(frozen=True)
class Conflict:
    request_id: str
    row: int
    outcome: int  # in the file being ingested
    other: int  # stored, announced by a concurrent ingest, or earlier in the same file
    where: str

    def __str__(self) -> str:
        return f"({self.request_id!r}, row {self.row}): {self.outcome} here, {self.other} {self.where}"


class ConflictingOutcomes(OutcomeError):
    """Keys whose outcome differs from one already known; ``conflicts`` lists them all.
    ``within_file``: the file contradicts itself (an unusable file), rather than what is stored."""

    def __init__(self, name: str, conflicts: list[Conflict], within_file: bool = False):
        self.conflicts = conflicts
        self.within_file = within_file
        shown = "; ".join(map(str, conflicts[:_SHOWN]))
        more = f"; and {len(conflicts) - _SHOWN} more" if len(conflicts) > _SHOWN else ""
        super().__init__(
            f"{name}: {len(conflicts)} key(s) with a conflicting outcome, nothing stored: {shown}{more}"
        )


# -- parsing ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class OutcomeFile:
    """A parsed, valid outcome file: one row per key (``COLUMNS``), and where it came from."""

    name: str
    sha256: str
    frame: pd.DataFrame


# Times are kept as pandas' nanosecond timestamps (the batch digest, the joins).
_EARLIEST, _LATEST = pd.Timestamp.min.tz_localize(UTC), pd.Timestamp.max.tz_localize(UTC)


def _parse_time(text: str) -> datetime:
    """The UTC time ``text`` says; ``ValueError`` when it is not ISO 8601 or outside the span
    of pandas' timestamps (years 1677 to 2262)."""
    moment = datetime.fromisoformat(text)
    try:
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is past datetime's own range in UTC
        raise ValueError(text) from None
    if not _EARLIEST <= moment <= _LATEST:
        raise ValueError(text)
    return moment


class _Parser:
    """Reads the rows of one file, collecting problems rather than stopping at the first."""

    def __init__(self, name: str):
        self.name = name
        self.problems: list[Problem] = []
        self.conflicts: list[Conflict] = []

    def problem(self, line: int, column: str | None, message: str) -> None:
        self.problems.append(Problem(line, column, message))

    def header(self, names: list[str]) -> dict[str, int] | None:
        known = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
        for name in names:
            if name not in known:
                self.problem(1, name, f"unknown column (expected {', '.join(known)})")
        for name in {n for n in names if names.count(n) > 1}:
            self.problem(1, name, "duplicated column")
        for name in REQUIRED_COLUMNS:
            if name not in names:
                self.problem(1, name, "missing column")
        return None if self.problems else {name: names.index(name) for name in names}

    def value(self, line: int, column: str, text: str):
        """The cell's value, or None after recording why it is not one."""
        if column == "request_id":
            if not text or text != text.strip():
                self.problem(line, column, f"expected a request id without surrounding blanks, got {text!r}")
                return None
            return text
        if column == "outcome":
            if text not in ("0", "1"):
                self.problem(line, column, f"expected 0 or 1, got {text!r}")
                return None
            return int(text)
        if column == "row":
            if not _WHOLE_NUMBER.fullmatch(text) or int(text) > _MAX_ROW:
                self.problem(line, column, f"expected a row number from 0 to {_MAX_ROW}, got {text!r}")
                return None
            return int(text)
        if not text:  # observed_at: empty is unknown
            return pd.NaT
        try:
            return _parse_time(text)
        except ValueError:
            self.problem(
                line,
                column,
                "expected an ISO 8601 time between the years 1678 and 2261 "
                f"(e.g. 2026-03-01T12:00:00Z), got {text!r}",
            )
            return None


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise OutcomeFileError(name, [Problem(line, None, "not UTF-8 text")]) from error


def _rows(text: str, parser: _Parser):
    """``(line, cells)`` of each non-empty row, the header first; csv errors become problems."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    line = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            parser.problem(reader.line_num, None, f"not valid CSV ({error})")
            return
        if cells:
            yield line, cells
        line = reader.line_num + 1  # a quoted field may span lines: a row starts after the last


def parse_outcome_bytes(data: bytes, name: str) -> OutcomeFile:
    """Parse an outcome file's bytes (``name`` is for messages and the record), or raise
    ``OutcomeFileError`` with every problem, or ``ConflictingOutcomes`` for keys given twice
    with different outcomes."""
    parser = _Parser(name)
    rows = _rows(_decode(data, name), parser)
    first = next(rows, None)
    if first is None:
        raise OutcomeFileError(name, parser.problems or [Problem(1, None, "empty file: expected a header")])
    columns = parser.header(first[1])
    if columns is None:
        raise OutcomeFileError(name, parser.problems)
    seen: dict[tuple[str, int], tuple[int, int]] = {}  # key -> (outcome, line)
    kept: list[tuple[str, int, int, object]] = []
    for line, cells in rows:
        if len(cells) != len(columns):
            parser.problem(line, None, f"expected {len(columns)} fields, got {len(cells)}")
            continue
        cell = {column: parser.value(line, column, cells[index]) for column, index in columns.items()}
        if any(value is None for value in cell.values()):
            continue
        key = (cell["request_id"], cell.get("row", 0))
        outcome = cell["outcome"]
        if key in seen:
            earlier, earlier_line = seen[key]
            if earlier != outcome:
                parser.conflicts.append(Conflict(*key, outcome, earlier, f"on line {earlier_line}"))
            continue  # the same outcome again counts once
        seen[key] = (outcome, line)
        kept.append((*key, outcome, cell.get("observed_at", pd.NaT)))
    if parser.problems:
        raise OutcomeFileError(name, parser.problems)
    if parser.conflicts:
        raise ConflictingOutcomes(name, parser.conflicts, within_file=True)
    if not kept:
        raise OutcomeFileError(name, [Problem(first[0] + 1, None, "no outcome rows after the header")])
    return OutcomeFile(name, hashlib.sha256(data).hexdigest(), _frame(kept))


def parse_outcomes(path: Path) -> OutcomeFile:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise OutcomeFileError(
            str(path), [Problem(0, None, f"cannot read the file ({error.strerror})")]
        ) from error
    return parse_outcome_bytes(data, path.name)


def _frame(rows: list[tuple]) -> pd.DataFrame:
    request_id, row, outcome, observed = zip(*rows, strict=True) if rows else ((), (), (), ())
    return pd.DataFrame(
        {
            "request_id": pd.array(request_id, dtype="str"),
            "row_index": pd.array(row, dtype="int32"),
            "outcome": pd.array(outcome, dtype="int8"),
            "observed_at": pd.to_datetime(list(observed), utc=True),
        }
    )


def batch_digest(frame: pd.DataFrame) -> str:
    """SHA-256 of a batch's content, whatever the order of its rows: the rows sorted by key,
    then column by column in fixed encodings (request ids as UTF-8 with their byte lengths,
    row and outcome as little-endian integers, observed_at as int64 nanoseconds with NaT as
    the smallest int64)."""
    ordered = frame.sort_values(["request_id", "row_index"], kind="stable")
    encoded = [text.encode() for text in ordered["request_id"]]
    observed = pd.to_datetime(ordered["observed_at"], utc=True).dt.as_unit("ns")
    digest = hashlib.sha256()
    for part in (
        np.array([len(text) for text in encoded], dtype="<i8").tobytes(),
        b"".join(encoded),
        ordered["row_index"].to_numpy(dtype="<i4").tobytes(),
        ordered["outcome"].to_numpy(dtype="<i1").tobytes(),
        observed.array.asi8.astype("<i8").tobytes(),  # NaT is the smallest int64
    ):
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()


# -- storage ------------------------------------------------------------------------------


def _batch_runs(client: MlflowClient, experiment: str) -> list:
    """Every live run of the outcomes experiment, oldest first."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment],
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))


def _read_batch(client: MlflowClient, run) -> pd.DataFrame:
    path = f"{BATCH_DIR}/{run.data.tags[BATCH_TAG]}.parquet"
    with tempfile.TemporaryDirectory() as directory:
        frame = pd.read_parquet(client.download_artifacts(run.info.run_id, path, directory))
    return frame.assign(batch=run.data.tags[BATCH_TAG])


def _read_batches(client: MlflowClient, runs: list) -> list[pd.DataFrame]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda run: _read_batch(client, run), runs))


def _keyed(frame: pd.DataFrame) -> pd.Series:
    """Outcomes indexed by (request_id, row_index)."""
    return pd.Series(
        frame["outcome"].to_numpy(),
        index=pd.MultiIndex.from_arrays([frame["request_id"].astype(str), frame["row_index"].astype(int)]),
    )


def _conflicts(new: pd.DataFrame, known: pd.Series, where: str) -> list[Conflict]:
    if not len(known) or not len(new):
        return []
    mine = _keyed(new)
    known = known[~known.index.duplicated()]
    common = mine.index.intersection(known.index)
    differ = common[mine[common].to_numpy() != known[common].to_numpy()]
    return [
        Conflict(rid, int(row), int(mine[(rid, row)]), int(known[(rid, row)]), where) for rid, row in differ
    ]


@dataclass(frozen=True)
class IngestResult:
    source_name: str
    source_sha256: str
    file_rows: int  # distinct keys in the file
    new_rows: int  # stored by this ingest
    batch: str | None  # the stored batch's digest; None when everything was already stored
    run_id: str | None

    @property
    def already_stored(self) -> int:
        return self.file_rows - self.new_rows


@dataclass
class Ingest:
    """One ingest as its steps (``plan``, ``announce``, ``commit``), so that tests can
    interleave two of them; ``add_outcomes`` runs them in order."""

    client: MlflowClient
    file: OutcomeFile
    experiment: str = OUTCOMES_EXPERIMENT
    new: pd.DataFrame | None = None
    run_id: str | None = None
    _experiment_id: str | None = None
    _checked: set[str] = field(default_factory=set)
    _started_ms: int = 0

    def plan(self) -> None:
        """Compare with the committed batches: refuse conflicts, keep the new keys."""
        self._experiment_id = experiment_id(self.client, self.experiment, restore_deleted=False)
        committed = [r for r in _batch_runs(self.client, self._experiment_id) if _state(r) == COMMITTED]
        frames = _read_batches(self.client, committed)
        self._checked = {run.info.run_id for run in committed}
        known = pd.concat(frames) if frames else pd.DataFrame(columns=list(COLUMNS))
        conflicts = _conflicts(self.file.frame, _keyed(known), "stored")
        if conflicts:
            raise ConflictingOutcomes(self.file.name, conflicts)
        stored = _keyed(known).index
        fresh = ~_keyed(self.file.frame).index.isin(stored)
        self.new = self.file.frame[fresh].reset_index(drop=True)

    def announce(self) -> None:
        """Upload the new keys as a batch, then mark it announced."""
        if not len(self.new):
            return
        digest = batch_digest(self.new)
        run = self.client.create_run(
            self._experiment_id,
            run_name=f"outcomes-{digest[:12]}",
            tags={
                BATCH_TAG: digest,
                SOURCE_NAME_TAG: self.file.name,
                SOURCE_SHA256_TAG: self.file.sha256,
                ROWS_TAG: str(len(self.new)),
                FILE_ROWS_TAG: str(len(self.file.frame)),
            },
        )
        self.run_id, self._started_ms = run.info.run_id, run.info.start_time
        try:
            with tempfile.TemporaryDirectory() as directory:
                path = Path(directory) / f"{digest}.parquet"
                self.new.to_parquet(path, index=False)
                self.client.log_artifact(self.run_id, str(path), BATCH_DIR)
            self.client.set_tag(self.run_id, STATE_TAG, ANNOUNCED)
        except BaseException:
            self._withdraw()
            raise

    def commit(self) -> IngestResult:
        """Check against everything committed or announced meanwhile; commit or withdraw."""
        if self.run_id is None:
            return self._result(None)
        try:
            now_ms = time.time() * 1000
            others = [
                run
                for run in _batch_runs(self.client, self._experiment_id)
                if run.info.run_id != self.run_id
                and (
                    (_state(run) == COMMITTED and run.info.run_id not in self._checked)
                    or (_state(run) == ANNOUNCED and now_ms - run.info.start_time < ANNOUNCED_TTL_S * 1000)
                )
            ]
            conflicts = []
            for run, frame in zip(others, _read_batches(self.client, others), strict=True):
                where = (
                    "stored" if _state(run) == COMMITTED else f"in a concurrent ingest ({run.info.run_id})"
                )
                conflicts += _conflicts(self.new, _keyed(frame), where)
            if conflicts:
                self._withdraw()
                raise ConflictingOutcomes(self.file.name, conflicts)
            if time.time() * 1000 - self._started_ms > ANNOUNCED_TTL_S * 1000 / 2:
                # Others stop heeding an announcement after the TTL: committing this late could
                # store a conflict that a concurrent ingest no longer saw.
                raise OutcomeError(f"{self.file.name}: the ingest took too long; nothing stored, try again")
            self.client.set_tag(self.run_id, STATE_TAG, COMMITTED)
        except ConflictingOutcomes:
            raise
        except BaseException:
            self._withdraw()
            raise
        self.client.set_terminated(self.run_id, "FINISHED")
        return self._result(self.run_id)

    def _withdraw(self) -> None:
        try:
            self.client.delete_run(self.run_id)
        except Exception as error:  # it stays announced, and is ignored once its TTL is over
            logger.warning(f"could not delete the withdrawn outcome batch run {self.run_id}: {error}")

    def _result(self, run_id: str | None) -> IngestResult:
        return IngestResult(
            self.file.name,
            self.file.sha256,
            len(self.file.frame),
            len(self.new) if run_id else 0,
            batch_digest(self.new) if run_id else None,
            run_id,
        )


def _state(run) -> str | None:
    return run.data.tags.get(STATE_TAG)


def store_outcomes(
    file: OutcomeFile, *, client: MlflowClient | None = None, experiment: str = OUTCOMES_EXPERIMENT
) -> IngestResult:
    """Store the new outcomes of a parsed file, or raise ``ConflictingOutcomes`` having
    written nothing."""
    ingest = Ingest(client or MlflowClient(), file, experiment)
    ingest.plan()
    ingest.announce()
    return ingest.commit()


def add_outcomes(
    path: Path, *, client: MlflowClient | None = None, experiment: str = OUTCOMES_EXPERIMENT
) -> IngestResult:
    """Parse ``path`` strictly and store its new outcomes, or raise ``OutcomeFileError`` /
    ``ConflictingOutcomes`` having written nothing."""
    return store_outcomes(parse_outcomes(path), client=client, experiment=experiment)


def read_outcomes(
    *, client: MlflowClient | None = None, experiment: str = OUTCOMES_EXPERIMENT
) -> pd.DataFrame:
    """Every committed outcome, one row per key: ``request_id``, ``row_index``, ``outcome``,
    ``observed_at`` and the ``batch`` that stored it (the earliest, if two concurrent ingests
    stored a key twice). ``attrs["batches"]`` lists the batches with their source files (name,
    SHA-256), rows and run; ``attrs["conflicts"]`` keys stored with two outcomes, which the
    ingest protocol prevents (the earliest is kept, and a warning logged)."""
    client = client or MlflowClient()
    empty = pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in _EMPTY.items()})
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage != "active":
        empty.attrs.update(batches=[], conflicts=[])
        return empty
    runs = [run for run in _batch_runs(client, found.experiment_id) if _state(run) == COMMITTED]
    frames = _read_batches(client, runs)
    outcomes = pd.concat(frames, ignore_index=True) if frames else empty
    duplicated = outcomes.duplicated(["request_id", "row_index"], keep=False)
    conflicts = []
    if duplicated.any():
        twice = outcomes[duplicated].groupby(["request_id", "row_index"])["outcome"].nunique()
        conflicts = [tuple(key) for key in twice[twice > 1].index]
        for key in conflicts:
            logger.warning(f"outcome stored twice with different values for {key}: keeping the earliest")
        outcomes = outcomes.drop_duplicates(["request_id", "row_index"], keep="first").reset_index(drop=True)
    outcomes.attrs["batches"] = [
        {
            "batch": run.data.tags[BATCH_TAG],
            "source_name": run.data.tags.get(SOURCE_NAME_TAG),
            "source_sha256": run.data.tags.get(SOURCE_SHA256_TAG),
            "rows": int(run.data.tags.get(ROWS_TAG, 0)),
            "run_id": run.info.run_id,
            "ingested_at": utc_timestamp(run.info.start_time / 1000),
        }
        for run in runs
    ]
    outcomes.attrs["conflicts"] = conflicts
    return outcomes


_EMPTY = {
    "request_id": "str",
    "row_index": "int32",
    "outcome": "int8",
    "observed_at": "datetime64[us, UTC]",
    "batch": "str",
}
