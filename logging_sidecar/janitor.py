"""The spool's housekeeping: deleting finished segments, removing stale writer locks, trimming
the oldest unshipped segments when the spool is over its size limit, and the disk reserve
that lets the state commit on a full disk.

Invariants:

- A segment is deleted only when it is finished: shipped up to its last complete line and
  never to be written again (sealed, or its writer is dead as the writer's own ``flock``
  says; never a clock). A torn last line of a dead writer was never answered: no record. The
  listing may be older than the writer's last appends, its seal (a rename) and its exit, so
  once the writer is known to be gone the file is looked up again and judged by its size and
  name now: a stale size would delete lines never shipped, a stale name would leave the
  sealed file behind with its offset forgotten, to be shipped again from its start.
- A segment that a planned flush covers (``protected``) is never deleted or trimmed before
  the flush is shipped, or a replay would read bytes that are gone.
- Trimming drops whole sealed segments, oldest first across every writer, down to 90 % of
  the limit; their unshipped records are counted as dropped in the state in the same
  transaction that marks them done, so a crash neither ships them after all nor counts them
  twice.
- A writer lock is removed only when its writer is dead and has no segment left (a writer
  taking the file at that moment re-checks its inode after locking).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from logging_sidecar.spool import Segment, list_segments, read_chunk
from logging_sidecar.state import State
from serving.spool_format import OPEN_SUFFIX, SEALED_SUFFIX, WRITER_LOCK_SUFFIX, spool_bytes, writer_is_alive

logger = logging.getLogger("credit_risk.sidecar")

_TRIM_TO = 0.9  # of the spool limit, so writers don't hit the limit again at once


class DiskReserve:
    """A few MiB held on the state's disk, given up when that disk is full so the commit
    that lets shipped segments be deleted can still be written; otherwise a spool that
    filled its disk would stall shipping for good. Taken back once there is room again."""

    SIZE = 2 << 20

    def __init__(self, directory: Path):
        self.path = directory / ".sidecar-reserve"

    def ensure(self) -> None:
        """Take it (back) only while the disk would keep as much again free."""
        if self.path.exists() and self.path.stat().st_size == self.SIZE:
            return
        disk = os.statvfs(self.path.parent)
        if disk.f_bavail * disk.f_frsize < 2 * self.SIZE:
            return
        try:
            with open(self.path, "wb") as stream:
                stream.write(bytes(self.SIZE))  # written, not sparse: tmpfs and ext4 alike
        except OSError:
            self.path.unlink(missing_ok=True)  # no room yet: try again next time

    def release(self) -> bool:
        if not self.path.exists():
            return False
        self.path.unlink()
        logger.warning(f"disk full: released the {self.SIZE >> 20} MiB reserve {self.path} to commit")
        return True


@dataclass(frozen=True)
class Sweep:
    """What one pass found: the segments left (oldest first), the names of those it deleted
    (finished or trimmed: the reader forgets them), and the spool's size afterwards."""

    segments: list[Segment]
    removed: list[str]
    spool_bytes: int
    over_limit: bool  # the spool was at or over its limit when measured


class Janitor:
    def __init__(
        self, spool: Path, state: State, *, max_bytes: int, max_line_bytes: int, reserve: DiskReserve
    ):
        self._spool, self._state = spool, state
        self._max_bytes, self._max_line_bytes = max_bytes, max_line_bytes
        self.reserve = reserve
        self.records_dropped = state.trimmed_records()  # over the state's whole life

    def sweep(self, protected: set[str], pending_rows: Mapping[str, int]) -> Sweep:
        """Delete finished segments and stale locks, then trim if the spool is over its limit.
        ``pending_rows``: rows read but not yet planned, by segment (what a trim loses)."""
        segments = list_segments(self._spool)
        shipped = self._state.shipped_offsets()
        done = []
        for segment in segments:
            if segment.name not in protected and (
                path := self._finished(segment, shipped.get(segment.name, 0))
            ):
                path.unlink(missing_ok=True)
                done.append(segment)
        removed = [segment.name for segment in done]
        if removed:
            self._state.forget(removed)
        segments = [s for s in segments if s not in done]
        self._remove_stale_writer_locks({s.writer for s in segments})
        total = spool_bytes(self._spool)
        over_limit = total >= self._max_bytes
        if over_limit:
            trimmed, total = self._trim(segments, total, protected, shipped, pending_rows)
            removed += trimmed
            segments = [s for s in segments if s.name not in trimmed]
        return Sweep(segments, removed, total, over_limit)

    def _finished(self, segment: Segment, offset: int) -> Path | None:
        """The segment's file if it is shipped up to its last complete line and will never be
        written again; None otherwise."""
        if not segment.sealed and writer_is_alive(self._spool, segment.writer):
            return None
        # Gone or sealed: the file no longer grows or moves (a writer renames before it lets
        # go of its lock). Judge it as it is now, not as listed.
        for path in (segment.path.with_suffix(SEALED_SUFFIX), segment.path.with_suffix(OPEN_SUFFIX)):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if offset >= size:
                return path
            chunk = read_chunk(self._spool, segment.name, offset, 1, max_line_bytes=self._max_line_bytes)
            return path if chunk.end == offset else None
        return None  # deleted meanwhile: nothing to do

    def _remove_stale_writer_locks(self, writers_with_segments: set[str]) -> None:
        for entry in os.scandir(self._spool):
            if not entry.name.endswith(WRITER_LOCK_SUFFIX):
                continue
            writer = entry.name[: -len(WRITER_LOCK_SUFFIX)]
            if writer not in writers_with_segments and not writer_is_alive(self._spool, writer):
                Path(entry.path).unlink(missing_ok=True)

    def _trim(
        self,
        segments: list[Segment],
        total: int,
        protected: set[str],
        shipped: Mapping[str, int],
        pending_rows: Mapping[str, int],
    ) -> tuple[list[str], int]:
        """Oldest first: drop whole sealed segments until the spool is back under 90 %."""
        target = _TRIM_TO * self._max_bytes
        trimmed = []
        for segment in segments:
            if total <= target:
                break
            if not segment.sealed or segment.name in protected:
                continue
            with open(segment.path, "rb") as stream:
                stream.seek(shipped.get(segment.name, 0))
                lost_requests = stream.read().count(b"\n")
            # Rows already read are known exactly; otherwise a request counts as one row.
            lost_rows = pending_rows.get(segment.name, 0) or lost_requests
            if self._state.trim(segment.name, segment.size, lost_rows):
                self.records_dropped += lost_rows
            segment.path.unlink(missing_ok=True)
            self._state.forget([segment.name])
            trimmed.append(segment.name)
            total -= segment.size
            logger.warning(
                f"spool full ({self._max_bytes} bytes): dropped the oldest unshipped "
                f"segment {segment.name} (~{lost_rows} records) to make room"
            )
        return trimmed, total
