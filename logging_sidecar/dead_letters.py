"""Dead letters: spool lines that can never ship (not JSON, a field missing or malformed, a
newer format version, longer than the limit).

Invariants: a dead line is counted once, in the state database, before anything else
(keyed by segment and offset, so reading it again after a crash does not count it again; the
count survives restarts and needs only a few bytes of disk). Then, where the disk allows, it
is appended with its reason to ``<spool>/dead-letters.ndjson`` for an operator to inspect and
move away; a line that could not be filed stays counted as unfiled. Either way the log says so.
A dead line never holds back the lines after it: its offsets are committed with the next flush.

Retention (``prune_dead_letters``) removes entries parked before a cutoff by writing the
entries it keeps to a new file, fsyncing it and renaming it over the old one, so a crash
leaves either file whole. Appending and pruning both hold an exclusive ``flock`` on
``<spool>/.dead-letters.lock``, so an entry appended while a prune runs (by the sidecar's
loop, or by ``credit-risk records prune --spool-dir`` beside a running sidecar) is never lost.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from logging_sidecar.spool import DeadLine
from logging_sidecar.state import State
from model.identity import utc_timestamp
from serving.spool_format import FILE_MODE, fsync_directory

logger = logging.getLogger("credit_risk.sidecar")

DEAD_LETTER_FILE = "dead-letters.ndjson"
_LOCK_FILE = ".dead-letters.lock"
_REWRITE_SUFFIX = ".pruning"  # the new file while a prune writes it


@contextmanager
def _locked(spool: Path):
    """Held while the dead-letter file is appended to or rewritten."""
    fd = os.open(spool / _LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class DeadLetters:
    def __init__(self, spool: Path, state: State):
        self.path = spool / DEAD_LETTER_FILE
        self._spool = spool
        self._state = state
        self.total, self.unfiled = state.dead_lines()  # over the state's whole life

    def park(self, dead: DeadLine) -> None:
        """Count it once, then file it if the disk takes it."""
        if not self._state.record_dead(dead.segment, dead.offset, dead.length, dead.reason):
            return  # counted before a restart: a replay reads it again
        self.total += 1
        self.unfiled += 1
        where = f"segment {dead.segment} at byte {dead.offset} ({dead.length} bytes)"
        entry = {
            "segment": dead.segment,
            "offset": dead.offset,
            "length": dead.length,
            "reason": dead.reason,
            "parked_at": utc_timestamp(),
            "line": None if dead.content is None else dead.content.decode(errors="replace").rstrip("\n"),
        }
        try:
            with _locked(self._spool):
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
                try:
                    os.write(fd, json.dumps(entry).encode() + b"\n")
                finally:
                    os.close(fd)
        except OSError as error:
            logger.error(f"dead line in {where}: {dead.reason}; NOT filed in {DEAD_LETTER_FILE}: {error}")
            return
        self._state.mark_filed(dead.segment, dead.offset)
        self.unfiled -= 1
        logger.error(f"dead line in {where}: {dead.reason}; parked in {self.path}")

    def waiting_since(self) -> float | None:
        """When the dead-letter file was last written (epoch seconds), while it holds lines;
        None once an operator has moved it away (or emptied it)."""
        try:
            found = self.path.stat()
        except FileNotFoundError:
            return None
        return found.st_mtime if found.st_size > 0 else None


def _parked_at(line: bytes) -> datetime | None:
    try:
        return datetime.fromisoformat(json.loads(line)["parked_at"])
    except (ValueError, KeyError, TypeError):
        return None


def prune_dead_letters(spool: Path, cutoff: datetime) -> int:
    """Remove the entries parked before ``cutoff`` (aware); returns how many. An entry that
    cannot be dated (damaged) is kept and logged: deleting what cannot be read is no decision."""
    path = spool / DEAD_LETTER_FILE
    rewrite = path.with_name(path.name + _REWRITE_SUFFIX)
    with _locked(spool):
        rewrite.unlink(missing_ok=True)  # a prune killed while writing it
        if not path.exists():
            return 0
        removed = kept = undated = 0
        fd = os.open(rewrite, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            with open(path, "rb") as old, os.fdopen(os.dup(fd), "wb") as new:
                for line in old:
                    parked = _parked_at(line)
                    if parked is not None and parked < cutoff:
                        removed += 1
                        continue
                    undated += parked is None
                    kept += 1
                    new.write(line if line.endswith(b"\n") else line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if removed:
            if kept:
                os.replace(rewrite, path)
            else:
                path.unlink()
            fsync_directory(spool)
        rewrite.unlink(missing_ok=True)
    if undated:
        logger.warning(f"{undated} entries of {path} have no readable parked_at: kept")
    if removed:
        logger.info(f"retention: removed {removed} dead letters parked before {utc_timestamp(cutoff)}")
    return removed
