"""The janitor against a writer that appends, seals and exits between the janitor's listing of
the spool and its check of the writer's lock (a server stopping while the sidecar sweeps).

The listing is taken first and handed to the sweep, so the race happens every time: with a
real ``SpoolWriter``, a real ``State`` and real files."""

from __future__ import annotations

import numpy as np

import logging_sidecar.janitor as janitor_module
from logging_sidecar.janitor import DiskReserve, Janitor
from logging_sidecar.spool import list_segments
from logging_sidecar.state import State
from model.schema import FEATURES
from serving.capture import SpoolWriter
from serving.spool_format import SpoolSettings, encode

IDENTITY = {"model_name": "m", "registered_model": "r", "model_version": "1", "dataset_hash": "d"}


def line(n: int) -> bytes:
    features = np.full((1, len(FEATURES)), float(n))
    outputs = {"prediction": np.ones(1, dtype="int64"), "probability": np.full(1, 0.5)}
    return encode(f"req-{n}", 10**18 + n, IDENTITY, list(FEATURES), features, outputs, 1.0, "a")


def sweep_with(monkeypatch, spool, state, listing):
    janitor = Janitor(spool, state, max_bytes=1 << 30, max_line_bytes=1 << 20, reserve=DiskReserve(spool))
    monkeypatch.setattr(janitor_module, "list_segments", lambda _: listing)  # taken before the writer left
    return janitor.sweep(set(), {})


def test_a_segment_sealed_after_the_listing_keeps_its_offset_and_is_deleted(tmp_path, monkeypatch):
    """Shipped to its end, then sealed and released: deleted, never read again from 0."""
    state = State(tmp_path / "state.db")
    writer = SpoolWriter(SpoolSettings(directory=tmp_path, replica="a"))
    for n in range(3):
        assert writer.append(line(n), 1)
    [segment] = list_segments(tmp_path)
    state.commit(state.plan({segment.name: (0, segment.size)}, 3, created_ms=0))  # all shipped
    listing = list_segments(tmp_path)
    writer.close()  # renames it .jsonl, then releases its lock

    swept = sweep_with(monkeypatch, tmp_path, state, listing)
    assert swept.removed == [segment.name]
    assert list_segments(tmp_path) == []  # the sealed file itself is gone


def test_lines_appended_after_the_listing_are_never_deleted_unshipped(tmp_path, monkeypatch):
    """The writer's last lines land after the listing, then it exits: the segment is not
    finished, and its shipped offset stays."""
    state = State(tmp_path / "state.db")
    writer = SpoolWriter(SpoolSettings(directory=tmp_path, replica="a"))
    for n in range(3):
        assert writer.append(line(n), 1)
    [segment] = list_segments(tmp_path)
    state.commit(state.plan({segment.name: (0, segment.size)}, 3, created_ms=0))
    listing = list_segments(tmp_path)
    assert writer.append(line(3), 1)  # answered after the listing
    writer.close()

    swept = sweep_with(monkeypatch, tmp_path, state, listing)
    assert swept.removed == []
    [left] = list_segments(tmp_path)
    assert left.sealed and left.size > segment.size
    assert state.shipped_offsets() == {segment.name: segment.size}
