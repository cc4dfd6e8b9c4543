"""Reading the spool that ``serving.capture`` writes: segment files and the complete lines
in them from a byte offset on. A line without its newline is a write still in progress (or
cut by a crash before the request was answered) and is left for later."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from serving.capture import OPEN_SUFFIX, SEALED_SUFFIX

logger = logging.getLogger(__name__)

_READ_BYTES = 4 << 20


@dataclass(frozen=True)
class Segment:
    name: str  # the file name without suffix: stable when the writer seals it
    path: Path
    sealed: bool
    size: int
    mtime: float

    @property
    def order(self) -> tuple[int, int]:
        """Creation order: ``<host>-<pid>-<created_ns>-<sequence>``."""
        _, created_ns, sequence = self.name.rsplit("-", 2)
        return int(created_ns), int(sequence)


@dataclass
class Chunk:
    """Complete lines of one segment between two byte offsets."""

    segment: str
    start: int
    end: int
    requests: list[dict] = field(default_factory=list)
    rows: int = 0


def list_segments(directory: Path) -> list[Segment]:
    segments = []
    for entry in os.scandir(directory):
        for suffix, sealed in ((SEALED_SUFFIX, True), (OPEN_SUFFIX, False)):
            if entry.name.endswith(suffix):
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # sealed (renamed) or deleted meanwhile
                    continue
                name = entry.name[: -len(suffix)]
                segments.append(Segment(name, Path(entry.path), sealed, stat.st_size, stat.st_mtime))
    return sorted(segments, key=lambda s: s.order)


def _open(directory: Path, name: str):
    for suffix in (OPEN_SUFFIX, SEALED_SUFFIX):  # it may be sealed between listing and opening
        try:
            return open(directory / f"{name}{suffix}", "rb")
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"segment {name} is gone from {directory}")


def rows_of(request: dict) -> int:
    return len(request["outputs"]["probability"])


def read_chunk(directory: Path, name: str, start: int, max_rows: int, end: int | None = None) -> Chunk:
    """Complete lines from ``start`` until ``max_rows`` rows (or exactly up to ``end``)."""
    chunk = Chunk(name, start, start)
    with _open(directory, name) as stream:
        stream.seek(start)
        limit = _READ_BYTES if end is None else end - start
        data = stream.read(limit)
    position = 0
    while chunk.rows < max_rows or end is not None:
        newline = data.find(b"\n", position)
        if newline < 0:
            break
        line, line_start = data[position:newline], start + position
        position = newline + 1
        try:
            request = json.loads(line)
            rows = rows_of(request)
        except (ValueError, KeyError, TypeError) as error:
            logger.error(f"skipping a corrupt line in segment {name} at byte {line_start}: {error}")
            continue
        chunk.requests.append(request)
        chunk.rows += rows
    chunk.end = start + position
    return chunk
