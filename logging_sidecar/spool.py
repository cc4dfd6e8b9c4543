"""Reading the spool that ``serving.capture`` writes: segment files and the complete lines
in them from a byte offset on, each validated into a record or set aside as a dead line.

A line without its newline is a write still in progress (or cut by a crash before the
request was answered) and is left for later. A line longer than the limit is skipped in
small reads, never held in memory, and reported as a dead line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from serving.spool_format import OPEN_SUFFIX, SEALED_SUFFIX, PoisonLine, decode, parse_segment_name, rows_of

logger = logging.getLogger(__name__)

_SKIP_BYTES = 1 << 20
_warned_names: set[str] = set()


@dataclass(frozen=True)
class Segment:
    name: str  # the file name without suffix: stable when the writer seals it
    path: Path
    sealed: bool
    size: int
    writer: str  # ``<host>-<pid>-<start_ns>``: whose lock says whether it is still written
    order: tuple[int, int]  # opening time (ns), then sequence: oldest first across writers


@dataclass(frozen=True)
class DeadLine:
    """A line that cannot be shipped: parked in the dead-letter file, counted in the state."""

    segment: str
    offset: int
    length: int
    reason: str
    content: bytes | None  # None when the line was too long to keep


@dataclass
class Chunk:
    """Complete lines of one segment between two byte offsets."""

    segment: str
    start: int
    end: int
    requests: list[dict] = field(default_factory=list)
    rows: int = 0
    dead: list[DeadLine] = field(default_factory=list)


def list_segments(directory: Path) -> list[Segment]:
    """Every segment, oldest first; a file with a segment suffix but a name this format never
    writes is skipped and logged once (it is not ours to ship or delete)."""
    segments = []
    for entry in os.scandir(directory):
        for suffix, sealed in ((SEALED_SUFFIX, True), (OPEN_SUFFIX, False)):
            if not entry.name.endswith(suffix):
                continue
            name = entry.name[: -len(suffix)]
            parsed = parse_segment_name(name)
            if parsed is None:
                if entry.name not in _warned_names:
                    _warned_names.add(entry.name)
                    logger.error(
                        f"ignoring {entry.path}: not a spool segment name, so not shipped or deleted"
                    )
                continue
            try:
                size = entry.stat().st_size
            except FileNotFoundError:  # sealed (renamed) or deleted meanwhile
                continue
            segments.append(Segment(name, Path(entry.path), sealed, size, *parsed))
    return sorted(segments, key=lambda s: s.order)


def _open(directory: Path, name: str):
    for suffix in (OPEN_SUFFIX, SEALED_SUFFIX):  # it may be sealed between listing and opening
        try:
            return open(directory / f"{name}{suffix}", "rb")
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"segment {name} is gone from {directory}")


def _skip_long_line(stream, length: int) -> int | None:
    """Read past the rest of an over-long line; its total length, or None if unfinished."""
    while True:
        piece = stream.readline(_SKIP_BYTES)
        length += len(piece)
        if piece.endswith(b"\n"):
            return length
        if len(piece) < _SKIP_BYTES:  # end of file before the newline
            return None


def read_chunk(
    directory: Path,
    name: str,
    start: int,
    max_rows: int,
    *,
    max_line_bytes: int,
    end: int | None = None,
) -> Chunk:
    """Complete lines from ``start`` until ``max_rows`` rows (or exactly up to ``end``)."""
    chunk = Chunk(name, start, start)
    replica = name.rsplit("-", 3)[0]  # the writer's host names a version 1 line's scorer
    with _open(directory, name) as stream:
        stream.seek(start)
        position = start
        while (end is None and chunk.rows < max_rows) or (end is not None and position < end):
            line = stream.readline(max_line_bytes + 1)
            if not line.endswith(b"\n"):
                if len(line) <= max_line_bytes:
                    break  # a write in progress, or a torn tail: not a record yet
                length = _skip_long_line(stream, len(line))
                if length is None:
                    break
                chunk.dead.append(
                    DeadLine(name, position, length, f"line of {length} bytes is over {max_line_bytes}", None)
                )
                position += length
                continue
            try:
                request = decode(line, default_replica=replica)
            except PoisonLine as error:
                chunk.dead.append(DeadLine(name, position, len(line), str(error), line))
            else:
                chunk.requests.append(request)
                chunk.rows += rows_of(request)
            position += len(line)
    chunk.end = position
    return chunk
