"""Inference capture: every answered request, appended to a spool the logging sidecar ships.

The spool is a folder of append-only JSON Lines segment files, one open segment per scoring
process (so it works with MLServer's parallel workers on or off), rotated by size and age.
One line holds one request: its identity, the features exactly as the model received them
(``null`` for missing), the outputs and the latency.

A request is appended with a single ``write`` before its response is returned: once a
client has an answer its record is in the kernel's page cache, so a crash of MLServer, of
the sidecar or of MLflow cannot lose it (a power cut can, unless ``fsync="always"``).
Capture never fails or blocks an inference: when the spool is over its size limit or the
write fails, the record is dropped, counted and logged, and the response goes out as usual.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
OPEN_SUFFIX = ".open"
SEALED_SUFFIX = ".jsonl"
_USAGE_REFRESH_S = 1.0
_FULL_LOG_EVERY_S = 60.0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class SpoolSettings:
    """Shared by the writer (MLServer) and the reader (sidecar); read from the environment.

    ``CREDIT_RISK_SPOOL_DIR``: the spool folder; capture is off when unset.
    ``CREDIT_RISK_SPOOL_MAX_BYTES``: the spool's size limit (default 1 GiB).
    ``CREDIT_RISK_SEGMENT_MAX_BYTES`` / ``CREDIT_RISK_SEGMENT_MAX_AGE_S``: rotation
    (default 16 MiB / 60 s). ``CREDIT_RISK_CAPTURE_FSYNC``: ``rotate`` (default) or ``always``.
    """

    directory: Path | None = field(
        default_factory=lambda: (
            Path(os.environ["CREDIT_RISK_SPOOL_DIR"]) if os.environ.get("CREDIT_RISK_SPOOL_DIR") else None
        )
    )
    max_bytes: int = field(default_factory=lambda: _env_int("CREDIT_RISK_SPOOL_MAX_BYTES", 1 << 30))
    segment_max_bytes: int = field(
        default_factory=lambda: _env_int("CREDIT_RISK_SEGMENT_MAX_BYTES", 16 << 20)
    )
    segment_max_age_s: float = field(
        default_factory=lambda: float(os.environ.get("CREDIT_RISK_SEGMENT_MAX_AGE_S", 60))
    )
    fsync: str = field(default_factory=lambda: os.environ.get("CREDIT_RISK_CAPTURE_FSYNC", "rotate"))

    def __post_init__(self):
        if self.fsync not in ("rotate", "always"):
            raise ValueError(f"CREDIT_RISK_CAPTURE_FSYNC must be 'rotate' or 'always', got {self.fsync!r}")


def spool_bytes(directory: Path) -> int:
    total = 0
    for entry in os.scandir(directory):
        if entry.name.endswith((OPEN_SUFFIX, SEALED_SUFFIX)):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:  # shipped and deleted meanwhile
                pass
    return total


def _nulls(values: list) -> list:
    return [None if value != value else value for value in values]  # NaN is not JSON: null


def encode(
    request_id: str,
    timestamp_ns: int,
    identity: dict[str, str],
    feature_names: list[str],
    features: np.ndarray,
    outputs: dict[str, np.ndarray],
    latency_ms: float,
) -> bytes:
    """One request as one JSON line, columnar (one list per feature), so that a 1,000-row
    request is one small write. Plain lists and ``json``: ~12 µs for a row, where going
    through pandas took ~160 µs, a noticeable share of a ~6 ms request."""
    record = {
        "v": FORMAT_VERSION,
        "request_id": request_id,
        "timestamp_ns": timestamp_ns,
        **identity,
        "latency_ms": latency_ms,
        "features": dict(zip(feature_names, map(_nulls, features.T.tolist()), strict=True)),
        "outputs": {name: values.tolist() for name, values in outputs.items()},
    }
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class SpoolWriter:
    """The open segment of one process. Not thread-safe: MLServer calls ``predict`` from one
    event loop per process, and nothing here awaits."""

    def __init__(self, settings: SpoolSettings):
        self.settings = settings
        self.directory = settings.directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._prefix = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self._sequence = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._opened_at = 0.0
        self._size = 0
        self._usage = 0
        self._usage_checked_at = 0.0
        self._last_full_log = 0.0
        self.dropped = 0

    def _open(self) -> None:
        self._sequence += 1
        name = f"{self._prefix}-{self._sequence:06d}{OPEN_SUFFIX}"
        self._path = self.directory / name
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._opened_at = time.monotonic()
        self._size = 0

    def _seal(self) -> None:
        """Close the open segment and rename it ``.jsonl``: complete, never written again."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(self._path, self._path.with_suffix(SEALED_SUFFIX))
        except FileNotFoundError:
            pass  # idle so long that the sidecar shipped and removed it as abandoned

    def _spool_full(self) -> bool:
        now = time.monotonic()
        if now - self._usage_checked_at > _USAGE_REFRESH_S:
            self._usage = spool_bytes(self.directory)
            self._usage_checked_at = now
        return self._usage >= self.settings.max_bytes

    def append(self, line: bytes, rows: int) -> bool:
        """Append one request; False (counted in ``dropped``) when it could not be kept."""
        try:
            if self._spool_full():
                self._drop(
                    rows, f"spool {self.directory} is full ({self._usage} >= {self.settings.max_bytes} bytes)"
                )
                return False
            if self._fd is not None and (
                self._size >= self.settings.segment_max_bytes
                or time.monotonic() - self._opened_at >= self.settings.segment_max_age_s
            ):
                self._seal()
            if self._fd is None:
                self._open()
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            if self.settings.fsync == "always":
                os.fsync(self._fd)
            self._size += len(line)
            self._usage += len(line)
            return True
        except OSError as error:
            self._drop(rows, f"cannot write to spool {self.directory}: {error}")
            if self._fd is not None:  # start a fresh segment next time
                os.close(self._fd)
                self._fd = None
            return False

    def _drop(self, rows: int, reason: str) -> None:
        self.dropped += rows
        now = time.monotonic()
        if now - self._last_full_log >= _FULL_LOG_EVERY_S:
            self._last_full_log = now
            logger.warning(f"capture: dropping inference records ({self.dropped} so far): {reason}")

    def close(self) -> None:
        self._seal()
