"""What the loop has read from the spool and not yet planned into a flush: a read position per
segment and the chunks read since the last plan, oldest first.

Invariants: a segment's chunks are contiguous and in file order, and its read position is
the end of its last chunk (or of the last flush covering it), never inside a line. Reading
stops once a batch's worth of rows is held (a request is never split). Dead lines met while
reading are handed to ``park`` at once; their bytes stay in the chunk's range, so their
offsets are committed with the flush that covers them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from logging_sidecar.spool import Chunk, DeadLine, Segment, read_chunk
from logging_sidecar.state import Flush

logger = logging.getLogger("credit_risk.sidecar")


def byte_ranges(chunks: list[Chunk]) -> dict[str, tuple[int, int]]:
    """``{segment: (start, end)}`` covered by chunks (contiguous per segment, in order)."""
    ranges: dict[str, tuple[int, int]] = {}
    for chunk in chunks:
        start = ranges[chunk.segment][0] if chunk.segment in ranges else chunk.start
        ranges[chunk.segment] = (start, chunk.end)
    return ranges


class Backlog:
    def __init__(
        self,
        spool: Path,
        positions: dict[str, int],
        *,
        max_line_bytes: int,
        park: Callable[[DeadLine], None],
        on_read: Callable[[int], None],
    ):
        self._spool = spool
        self._positions = positions  # starts at the state's shipped offsets
        self._max_line_bytes = max_line_bytes
        self._park, self._on_read = park, on_read
        self._pending: list[Chunk] = []
        self.caught_up = False  # every segment read up to its last complete line

    @property
    def rows(self) -> int:
        return sum(chunk.rows for chunk in self._pending)

    @property
    def empty(self) -> bool:
        return not self._pending

    def rows_by_segment(self) -> dict[str, int]:
        rows: Counter[str] = Counter()
        for chunk in self._pending:
            rows[chunk.segment] += chunk.rows
        return rows

    def oldest_ns(self) -> int | None:
        stamps = [chunk.requests[0]["timestamp_ns"] for chunk in self._pending if chunk.requests]
        return min(stamps) if stamps else None

    def read_new(self, segments: list[Segment], room: int) -> None:
        """Read complete lines past each segment's position, oldest segment first, until
        ``room`` more rows are held; ``caught_up`` says whether everything was read."""
        self.caught_up = False
        for segment in segments:
            if room <= 0:
                return
            position = self._positions.get(segment.name, 0)
            if segment.size <= position:
                continue
            try:
                chunk = self._read(segment.name, position, room)
            except FileNotFoundError:
                continue
            if chunk.end > position:
                self._positions[segment.name] = chunk.end
                self._pending.append(chunk)
                self._on_read(chunk.rows)
                room -= chunk.rows
        self.caught_up = room > 0

    def _read(self, name: str, start: int, max_rows: int, end: int | None = None) -> Chunk:
        chunk = read_chunk(self._spool, name, start, max_rows, max_line_bytes=self._max_line_bytes, end=end)
        for dead in chunk.dead:
            self._park(dead)
        return chunk

    def replay(self, flush: Flush) -> list[dict]:
        """The requests of a flush planned before a crash, read again from the same bytes."""
        requests = []
        for name, (start, end) in flush.ranges.items():
            try:
                requests += self._read(name, start, 0, end=end).requests
            except FileNotFoundError:
                logger.error(f"segment {name} of planned flush {flush.id} is gone; its records are lost")
            self._positions[name] = max(self._positions.get(name, 0), end)
        return requests

    def next_batch(self, max_rows: int) -> list[Chunk]:
        """The oldest chunks, until they hold ``max_rows`` rows; they stay in the backlog
        until ``release``, so a plan that fails to be stored loses nothing."""
        taken, rows = [], 0
        for chunk in self._pending:
            if rows >= max_rows:
                break
            taken.append(chunk)
            rows += chunk.rows
        return taken

    def release(self, chunks: list[Chunk]) -> None:
        """Forget the chunks of ``next_batch`` once a flush holds them."""
        del self._pending[: len(chunks)]

    def forget(self, segments: Iterable[str]) -> None:
        """Segments deleted from the spool (finished, or trimmed unshipped)."""
        gone = set(segments)
        if gone:
            for name in gone:
                self._positions.pop(name, None)
            self._pending = [chunk for chunk in self._pending if chunk.segment not in gone]

    def unread_lines(self, segments: list[Segment]) -> int:
        """Request lines past the read positions (each one row or more)."""
        left = 0
        for segment in segments:
            position = self._positions.get(segment.name, 0)
            if segment.size > position:
                with open(segment.path, "rb") as stream:
                    stream.seek(position)
                    left += stream.read().count(b"\n")
        return left
