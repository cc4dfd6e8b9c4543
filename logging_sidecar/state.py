"""The sidecar's memory, in SQLite through SQLAlchemy: what is shipped, what is planned.

A flush is planned (its exact byte ranges stored) before anything is sent to MLflow and
committed after everything was sent, in one transaction that also advances the segments'
shipped offsets. After a crash the planned flush is replayed from the same bytes, under the
same artifact names, metric steps and timestamps, so a retry overwrites instead of adding.

Dead lines (lines that can never ship) are recorded here, keyed by segment and offset so
that reading them again after a crash counts them once: this table is the dead-letter
counter that survives restarts, and it still works when the spool's disk is too full for
the dead-letter file itself (with the default state path both share a disk, but SQLite
needs a few kilobytes where a dead line may need megabytes). Segments trimmed by the spool's
size limit are counted here the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Boolean, Integer, String, Text, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class _Base(DeclarativeBase):
    pass


class _Segment(_Base):
    __tablename__ = "segments"
    name: Mapped[str] = mapped_column(String, primary_key=True)
    shipped_offset: Mapped[int] = mapped_column(Integer, default=0)


class _Flush(_Base):
    __tablename__ = "flushes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_ms: Mapped[int] = mapped_column(Integer)
    ranges: Mapped[str] = mapped_column(Text)  # JSON {segment: [start, end]}
    records: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String, default="planned")


class _DeadLine(_Base):
    __tablename__ = "dead_lines"
    segment: Mapped[str] = mapped_column(String, primary_key=True)
    offset: Mapped[int] = mapped_column(Integer, primary_key=True)
    length: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    filed: Mapped[bool] = mapped_column(Boolean, default=False)  # written to the dead-letter file


class _Trimmed(_Base):
    """A segment dropped unshipped to keep the spool under its size limit."""

    __tablename__ = "trimmed_segments"
    segment: Mapped[str] = mapped_column(String, primary_key=True)
    records: Mapped[int] = mapped_column(Integer)


class _Run(_Base):
    __tablename__ = "runs"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    run_id: Mapped[str] = mapped_column(String)


@dataclass(frozen=True)
class Flush:
    id: int
    created_ms: int
    ranges: dict[str, tuple[int, int]]
    records: int

    @property
    def digest(self) -> str:
        """Names the flush's content, so a fresh state file can never reuse an old name."""
        canonical = json.dumps(sorted((k, list(v)) for k, v in self.ranges.items()))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _flush(row: _Flush) -> Flush:
    ranges = {name: (start, end) for name, (start, end) in json.loads(row.ranges).items()}
    return Flush(row.id, row.created_ms, ranges, row.records)


class State:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._engine = create_engine(f"sqlite:///{path}")
        event.listen(self._engine, "connect", self._pragmas)
        _Base.metadata.create_all(self._engine)

    @staticmethod
    def _pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed offset survives a power cut
        cursor.close()

    def shipped_offsets(self) -> dict[str, int]:
        with Session(self._engine) as session:
            return {s.name: s.shipped_offset for s in session.scalars(select(_Segment))}

    def shipped_records(self) -> int:
        with Session(self._engine) as session:
            total = session.scalar(select(func.sum(_Flush.records)).where(_Flush.status == "shipped"))
            return int(total or 0)

    def planned(self) -> Flush | None:
        with Session(self._engine) as session:
            row = session.scalars(
                select(_Flush).where(_Flush.status == "planned").order_by(_Flush.id)
            ).first()
            return _flush(row) if row else None

    def plan(self, ranges: dict[str, tuple[int, int]], records: int, created_ms: int) -> Flush:
        with Session(self._engine) as session, session.begin():
            row = _Flush(created_ms=created_ms, ranges=json.dumps(ranges), records=records)
            session.add(row)
            session.flush()
            return _flush(row)

    def commit(self, flush: Flush) -> None:
        """Mark the flush shipped and advance every segment it covered, atomically."""
        with Session(self._engine) as session, session.begin():
            for name, (_, end) in flush.ranges.items():
                segment = session.get(_Segment, name) or _Segment(name=name)
                segment.shipped_offset = end
                session.add(segment)
            session.get(_Flush, flush.id).status = "shipped"

    def trim(self, name: str, end: int, records: int) -> bool:
        """Count a segment's unshipped records as dropped, once, and mark it shipped up to
        ``end`` in the same transaction, so that a crash before its file is deleted neither
        ships it after all nor counts it twice. True the first time."""
        with Session(self._engine) as session, session.begin():
            if session.get(_Trimmed, name) is not None:
                return False
            session.add(_Trimmed(segment=name, records=records))
            segment = session.get(_Segment, name) or _Segment(name=name)
            segment.shipped_offset = end
            session.add(segment)
            return True

    def trimmed_records(self) -> int:
        """Records dropped by the size limit, over the state's whole life."""
        with Session(self._engine) as session:
            return int(session.scalar(select(func.sum(_Trimmed.records))) or 0)

    def forget(self, names: list[str]) -> None:
        """Drop the rows of segment files that are gone for good."""
        with Session(self._engine) as session, session.begin():
            for name in names:
                if segment := session.get(_Segment, name):
                    session.delete(segment)

    def run_id(self, key: str) -> str | None:
        with Session(self._engine) as session:
            row = session.get(_Run, key)
            return row.run_id if row else None

    def remember_run(self, key: str, run_id: str) -> None:
        with Session(self._engine) as session, session.begin():
            session.merge(_Run(key=key, run_id=run_id))

    def forget_run(self, key: str) -> None:
        """The run was deleted or the store reset: the next flush finds or creates another."""
        with Session(self._engine) as session, session.begin():
            if row := session.get(_Run, key):
                session.delete(row)

    def record_dead(self, segment: str, offset: int, length: int, reason: str) -> bool:
        """Count a dead line once; True the first time it is seen."""
        with Session(self._engine) as session, session.begin():
            if session.get(_DeadLine, (segment, offset)) is not None:
                return False
            session.add(_DeadLine(segment=segment, offset=offset, length=length, reason=reason))
            return True

    def mark_filed(self, segment: str, offset: int) -> None:
        with Session(self._engine) as session, session.begin():
            session.get(_DeadLine, (segment, offset)).filed = True

    def dead_lines(self) -> tuple[int, int]:
        """``(counted, not in the dead-letter file)``, over the state's whole life."""
        with Session(self._engine) as session:
            total = session.scalar(select(func.count()).select_from(_DeadLine))
            unfiled = session.scalar(
                select(func.count()).select_from(_DeadLine).where(_DeadLine.filed.is_(False))
            )
            return int(total or 0), int(unfiled or 0)
