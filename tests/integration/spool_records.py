"""Spool lines with chosen timestamps, written as the server writes them, and the test's own
list of what was written: the oracle of the drain-once and retention tests.

Lines are made by ``serving.spool_format.encode`` and appended by the real ``SpoolWriter``, or
by a separate writer process (``WriterProcess``) whose lock the kernel really releases when it
is SIGKILLed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from model.schema import FEATURES
from serving.capture import SpoolWriter
from serving.spool_format import encode
from tests.helpers import REPO

IDENTITY = {
    "model_name": "credit-risk",
    "registered_model": "credit-risk-model",
    "model_version": "1",
    "dataset_hash": "d1",
}
REPLICA = "replica-0"


def ns(moment: datetime) -> int:
    """Nanoseconds since the epoch, in integers."""
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


def noon_days_ago(days: int, today=None) -> datetime:
    """Noon UTC ``days`` days before today (UTC): far from any day boundary."""
    today = today or datetime.now(UTC).date()
    return datetime.combine(today - timedelta(days=days), datetime.min.time(), tzinfo=UTC) + timedelta(
        hours=12
    )


class Written:
    """Every row written to a spool: request id, row index, timestamp (ns), probability."""

    def __init__(self):
        self.rows: list[dict] = []
        self._rng = np.random.default_rng(17)

    def line(self, moment: datetime, rows: int = 1, request_id: str | None = None) -> tuple[bytes, int]:
        """A request line at ``moment``; remembered as written only by ``keep``."""
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        features = self._rng.random((rows, len(FEATURES))) * 100
        outputs = {"prediction": np.ones(rows, dtype="int64"), "probability": self._rng.random(rows)}
        stamp = ns(moment) + int(self._rng.integers(0, 1000))  # distinct moments within the second
        line = encode(request_id, stamp, IDENTITY, list(FEATURES), features, outputs, 1.5, REPLICA)
        self._pending = [
            {
                "request_id": request_id,
                "row_index": row,
                "timestamp_ns": stamp,
                "probability": outputs["probability"][row],
            }
            for row in range(rows)
        ]
        return line, rows

    def keep(self) -> None:
        self.rows += self._pending

    def append(self, writer: SpoolWriter, moment: datetime, rows: int = 1) -> None:
        line, count = self.line(moment, rows)
        assert writer.append(line, count)
        self.keep()

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["request_id", "row_index", "timestamp_ns", "probability"])


def assert_exactly(records: pd.DataFrame, want: pd.DataFrame) -> None:
    """``records`` (from ``read_records(deduplicate=False)``) hold exactly the rows of ``want``,
    once each, with their timestamps and probabilities."""
    keys = ["request_id", "row_index"]
    got = pd.DataFrame(
        {
            "request_id": records["request_id"].astype(str),
            "row_index": records["row_index"].astype("int64"),
            "timestamp_ns": pd.to_datetime(records["timestamp"], utc=True).dt.as_unit("ns").astype("int64"),
            "probability": records["probability"].astype("float64"),
        }
    )
    twice = got[got.duplicated(keys, keep=False)]
    assert twice.empty, f"{len(twice)} rows read back more than once, e.g. {twice.head(3).to_dict('records')}"
    joined = want.merge(got, on=keys, how="outer", suffixes=("", "_got"), indicator=True)
    missing = joined[joined["_merge"] == "left_only"]
    strangers = joined[joined["_merge"] == "right_only"]
    assert missing.empty, (
        f"{len(missing)} of {len(want)} rows missing, e.g. {missing[keys].head(3).to_dict('records')}"
    )
    assert strangers.empty, (
        f"{len(strangers)} rows that should not be there, e.g. {strangers[keys].head(3).to_dict('records')}"
    )
    assert (joined["timestamp_ns"] == joined["timestamp_ns_got"]).all()
    assert (joined["probability"] == joined["probability_got"]).all()


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from serving.capture import SpoolWriter
    from serving.spool_format import SpoolSettings

    spool, lines, torn = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    writer = SpoolWriter(SpoolSettings(directory=spool, replica="{replica}", segment_max_bytes=1 << 30))
    for line in lines.read_bytes().splitlines(keepends=True):
        assert writer.append(line, 1)
    if torn.stat().st_size:  # half a line: a write the crash cut short, never answered
        with open(writer._path, "ab") as segment:
            segment.write(torn.read_bytes())
    print("ready", flush=True)
    time.sleep(3600)
    """
).format(replica=REPLICA)


class WriterProcess:
    """A server stand-in: its own process appends one-row lines to one open segment and holds
    its writer lock until it is killed."""

    def __init__(self, spool: Path, lines: list[bytes], torn: bytes = b""):
        folder = spool.parent / f"writer-{uuid.uuid4().hex[:6]}"
        folder.mkdir()
        (folder / "lines").write_bytes(b"".join(lines))
        (folder / "torn").write_bytes(torn)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(spool), str(folder / "lines"), str(folder / "torn")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout.readline().strip() == "ready", "the writer process did not start"

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: the kernel drops its flock, nothing is sealed
        self.process.wait(timeout=30)
