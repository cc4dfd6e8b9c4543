"""The sidecar's health: verdicts over hand-made snapshots (times worked by hand), and a real
loop that publishes a new snapshot per step while the HTTP server answers from the latest."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest

from logging_sidecar.health import HealthRules, Snapshot
from logging_sidecar.http import serve_http
from logging_sidecar.service import Sidecar
from logging_sidecar.settings import SidecarSettings
from serving.capture import SpoolWriter
from serving.spool_format import SpoolSettings
from tests.helpers import NOBODY_URL, free_port

RULES = HealthRules(liveness_after_s=600, stall_after_s=120)
QUIET = Snapshot(
    turned_at=5000.0,
    progress_at=1_000_000.0,
    pending_since=None,
    pending_records=0,
    parked_batch=False,
    retry_every_s=1.0,
    dead_lines=0,
    dead_lines_unfiled=0,
    dead_letters="/spool/dead-letters.ndjson",
    dead_letters_since=None,
    records_dropped=3,
    capture_dropped_rows=4,
    shipped_records=5,
    last_error=None,
    spool_bytes=6,
)


def test_a_quiet_sidecar_is_ok_and_reports_its_totals():
    ok, body = RULES.shipping(QUIET, now=2_000_000.0)
    assert ok and body["status"] == "ok" and body["reason"] is None and body["since"] is None
    assert (body["records_dropped_total"], body["capture_dropped_rows_total"]) == (3, 4)
    assert (body["shipped_records_total"], body["spool_bytes"]) == (5, 6)
    assert body["last_shipped_at"] == "1970-01-12T13:46:40.000Z"  # 1,000,000 s after the epoch


def test_stalled_only_once_nothing_shipped_for_longer_than_the_limit():
    # Pending since 1,000,050, after the last commit at 1,000,000: the wait counts from 1,000,050.
    waiting = replace(QUIET, pending_since=1_000_050.0, pending_records=7, last_error="ConnectionError: down")
    ok, body = RULES.shipping(waiting, now=1_000_170.0)  # 120 s: not over the limit
    assert ok
    ok, body = RULES.shipping(waiting, now=1_000_171.0)
    assert not ok and body["status"] == "stalled"
    assert body["since"] == "1970-01-12T13:47:30.000Z"
    assert (
        body["reason"]
        == "nothing shipped for 121 s with 7 records pending; last error: ConnectionError: down"
    )
    # A commit after records became pending restarts the wait.
    assert RULES.shipping(replace(waiting, progress_at=1_000_100.0), now=1_000_171.0)[0]


def test_a_batch_held_by_a_permanent_error_is_parked_before_anything_else():
    held = replace(
        QUIET, parked_batch=True, pending_since=1_000_050.0, retry_every_s=16.0, dead_letters_since=1.0
    )
    ok, body = RULES.shipping(replace(held, last_error="MlflowException: 403"), now=1_000_060.0)
    assert not ok and body["status"] == "parked" and body["parked_batches"] == 1
    assert body["reason"] == (
        "a batch is held back by a permanent MLflow error, retried every 16 s; last error: MlflowException: 403"
    )


def test_dead_letters_park_until_moved_and_unfiled_ones_are_named():
    filed = replace(QUIET, dead_lines=2, dead_letters_since=1_000_010.0)
    ok, body = RULES.shipping(filed, now=1_000_020.0)
    assert not ok and body["status"] == "parked" and body["since"] == "1970-01-12T13:46:50.000Z"
    assert body["reason"] == (
        "2 dead lines (unshippable spool lines) parked; inspect and move away /spool/dead-letters.ndjson"
    )
    unfiled = replace(QUIET, dead_lines=2, dead_lines_unfiled=1)  # the file was moved, one never got there
    ok, body = RULES.shipping(unfiled, now=1_000_020.0)
    assert not ok and body["since"] is None and body["reason"].endswith("; 1 could not be filed there")


def test_liveness_fails_only_when_the_loop_stopped_turning():
    assert RULES.liveness(QUIET, monotonic_now=5600.0) == (True, {"status": "ok", "loop_age_s": 600.0})
    assert RULES.liveness(QUIET, monotonic_now=5600.5) == (False, {"status": "stuck", "loop_age_s": 600.5})
    stalled = replace(QUIET, pending_since=1.0, pending_records=1)
    alive, body = RULES.health(stalled, now=1_000_200.0, monotonic_now=5001.0)
    assert (
        alive and body["status"] == "ok" and body["shipping"] == "stalled" and body["live"]["status"] == "ok"
    )


@pytest.fixture
def loop(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", NOBODY_URL)  # nobody there
    settings = SidecarSettings(spool=SpoolSettings(directory=tmp_path / "spool"), port=free_port())
    sidecar = Sidecar(settings)
    rules = HealthRules(settings.liveness_after_s, settings.stall_after_s)
    server = serve_http(settings.host, settings.port, rules, lambda: sidecar.snapshot, sidecar.metrics)
    try:
        yield sidecar, f"http://{settings.host}:{settings.port}"
    finally:
        server.shutdown()


def test_each_step_publishes_a_new_snapshot_and_http_answers_from_it(loop, tmp_path):
    sidecar, url = loop
    writer = SpoolWriter(SpoolSettings(directory=sidecar.spool))
    assert writer.append(b"not json\n", 1)  # a poison line: parked, and no MLflow needed
    writer.close()
    before = sidecar.snapshot
    assert httpx.get(f"{url}/health/shipping").status_code == 200  # nothing read yet

    sidecar.step()
    after = sidecar.snapshot
    assert after is not before and before.dead_lines == 0 and before.dead_letters_since is None
    assert after.dead_lines == 1 and after.dead_letters_since is not None
    answer = httpx.get(f"{url}/health/shipping")
    assert answer.status_code == 503 and answer.json()["dead_lines_total"] == 1
    assert "credit_risk_sidecar_shipping_ok 0.0" in httpx.get(f"{url}/metrics").text

    # An operator moves the file away; the answer changes only with the next step's snapshot.
    sidecar.dead_letters.path.rename(tmp_path / "inspected.ndjson")
    assert httpx.get(f"{url}/health/shipping").status_code == 503
    sidecar.step()
    assert httpx.get(f"{url}/health/shipping").status_code == 200
    assert httpx.get(f"{url}/health").json()["dead_lines_total"] == 1  # counted for good
    assert httpx.get(f"{url}/health/live").status_code == 200
    assert "credit_risk_sidecar_shipping_ok 1.0" in httpx.get(f"{url}/metrics").text
