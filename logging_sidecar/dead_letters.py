"""Dead letters: spool lines that can never ship (not JSON, a field missing or malformed, a
newer format version, longer than the limit).

Invariants: a dead line is counted once, in the state database, before anything else
(keyed by segment and offset, so reading it again after a crash does not count it again; the
count survives restarts and needs only a few bytes of disk). Then, where the disk allows, it
is appended with its reason to ``<spool>/dead-letters.ndjson`` for an operator to inspect and
move away; a line that could not be filed stays counted as unfiled. Either way the log says so.
A dead line never holds back the lines after it: its offsets are committed with the next flush.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from logging_sidecar.spool import DeadLine
from logging_sidecar.state import State
from model.identity import utc_timestamp
from serving.spool_format import FILE_MODE

logger = logging.getLogger("credit_risk.sidecar")

DEAD_LETTER_FILE = "dead-letters.ndjson"


class DeadLetters:
    def __init__(self, spool: Path, state: State):
        self.path = spool / DEAD_LETTER_FILE
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
