"""Inference capture: every answered request, appended to a spool the logging sidecar ships.

The spool is a folder of append-only JSON Lines segment files, rotated by size and age. Each
writing process has one open segment of its own: a serving replica is one process (MLServer's
parallel workers are refused, see ``serving.server``), and a restarted server is a new writer
beside the segments its predecessor left, which the sidecar still ships.
One line holds one request: its identity, the features exactly as the model received them
(``null`` for missing), the outputs and the latency.

A request is appended with a single ``write`` before its response is returned: once a
client has an answer its record is in the kernel's page cache, so a crash of MLServer, of
the sidecar or of MLflow cannot lose it (a power cut can, unless ``fsync="always"``, which
also fsyncs the folder after a segment is created or sealed). The file format, names and the
writer's liveness lock live in ``serving.spool_format``.
Capture never fails or blocks an inference: when the spool is over its size limit or the
write fails, the record is dropped, counted and logged, and the response goes out as usual.
The count is kept in the replica's drop ledger in the spool (``spool_format.DropLedger``),
made when the writer starts so that a full disk can still take it, and reported by the
sidecar across restarts of both.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from serving.spool_format import (
    FILE_MODE,
    OPEN_SUFFIX,
    SEALED_SUFFIX,
    DropLedger,
    SpoolSettings,
    drop_ledger_path,
    encode,
    fsync_directory,
    segment_name,
    spool_bytes,
    writer_id,
    writer_lock_path,
)

logger = logging.getLogger(__name__)

__all__ = ["SpoolWriter", "encode"]
_USAGE_REFRESH_S = 1.0
_RETRY_AFTER_FAILURE_S = 1.0  # a full disk: don't create an empty segment per request
_FULL_LOG_EVERY_S = 60.0


class SpoolWriter:
    """The open segment of this process. Not thread-safe: MLServer calls ``predict`` from its
    one event loop, and nothing here awaits."""

    def __init__(self, settings: SpoolSettings):
        self.settings = settings
        self.directory = settings.directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.replica = settings.replica
        self._writer = writer_id(socket.gethostname(), os.getpid(), time.time_ns())
        self._lock_fd: int | None = None
        self._sequence = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._opened_at = 0.0
        self._size = 0
        self._usage = 0
        self._usage_checked_at = 0.0
        self._last_full_log = 0.0
        self._failed_at: float | None = None
        self.dropped = 0  # by this process; the ledger holds the replica's total
        self._ledger_missing_logged = False
        self._ledger = self._open_ledger()

    def _open_ledger(self) -> DropLedger | None:
        try:
            return DropLedger(
                drop_ledger_path(self.directory, self.replica), fsync=self.settings.fsync == "always"
            )
        except OSError as error:
            if not self._ledger_missing_logged:
                self._ledger_missing_logged = True
                logger.error(
                    f"capture: no drop ledger in {self.directory} ({error}); until one can be made, "
                    "dropped rows are counted in this process's metrics only"
                )
            return None

    def _hold_lock(self) -> None:
        """Taken before the first segment exists and held until ``close`` (or death): while
        it is held, the sidecar never treats this writer's open segment as abandoned."""
        if self._lock_fd is not None:
            return
        path = writer_lock_path(self.directory, self._writer)
        while True:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the sidecar may have removed it as stale between our open and flock
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._lock_fd = fd

    def _open(self) -> None:
        self._hold_lock()
        self._sequence += 1
        name = segment_name(self._writer, self._sequence, time.time_ns())
        self._path = self.directory / f"{name}{OPEN_SUFFIX}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        if self.settings.fsync == "always":
            fsync_directory(self.directory)
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
        os.rename(self._path, self._path.with_suffix(SEALED_SUFFIX))
        if self.settings.fsync == "always":
            fsync_directory(self.directory)

    def _spool_full(self) -> bool:
        now = time.monotonic()
        if now - self._usage_checked_at > _USAGE_REFRESH_S:
            self._usage = spool_bytes(self.directory)
            self._usage_checked_at = now
        return self._usage >= self.settings.max_bytes

    def append(self, line: bytes, rows: int) -> bool:
        """Append one request; False (counted in ``dropped``) when it could not be kept."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < _RETRY_AFTER_FAILURE_S:
            self._drop(rows, f"a write to spool {self.directory} failed under a second ago")
            return False
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
            self._abandon_segment()
            self._failed_at = time.monotonic()
            return False

    def _abandon_segment(self) -> None:
        """After a failed write (a full disk): cut the partial line off and seal what was
        whole, so the reader finds only complete lines; the next request opens a new one."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.close(fd)
            os.truncate(self._path, self._size)
            os.rename(self._path, self._path.with_suffix(SEALED_SUFFIX))
        except OSError as error:
            logger.warning(f"capture: could not seal segment {self._path} after a failed write: {error}")

    def _drop(self, rows: int, reason: str) -> None:
        self.dropped += rows
        if self._ledger is None:
            self._ledger = self._open_ledger()
        if self._ledger is not None:
            try:
                self._ledger.add(rows)
            except OSError as error:
                logger.error(f"capture: could not count {rows} dropped rows in {self._ledger.path}: {error}")
        now = time.monotonic()
        if now - self._last_full_log >= _FULL_LOG_EVERY_S:
            self._last_full_log = now
            logger.warning(f"capture: dropping inference records ({self.dropped} so far): {reason}")

    def close(self) -> None:
        """Seal the open segment, then release the spool (the sidecar's drain waits for it)."""
        self._seal()
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            writer_lock_path(self.directory, self._writer).unlink(missing_ok=True)
            os.close(fd)
