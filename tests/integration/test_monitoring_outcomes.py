"""Outcomes stored in a real MLflow tracking server: idempotent, conflicts refused with their
keys and nothing written, bad files leave no trace, and two ingests at once never both store
conflicting outcomes, in every order of their steps."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from monitoring.outcomes import (
    ANNOUNCED,
    COMMITTED,
    STATE_TAG,
    ConflictingOutcomes,
    Ingest,
    OutcomeError,
    OutcomeFileError,
    add_outcomes,
    parse_outcome_bytes,
    read_outcomes,
)
from monitoring.store import DeletedExperiment

pytestmark = pytest.mark.integration


@pytest.fixture
def client(tracking_uri):
    return MlflowClient(tracking_uri)


@pytest.fixture
def experiment():
    return f"outcomes-{uuid.uuid4().hex[:8]}"


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def all_runs(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], run_view_type=ViewType.ALL)


def stored(client, experiment) -> set[tuple]:
    frame = read_outcomes(client=client, experiment=experiment)
    return set(zip(frame["request_id"], frame["row_index"], frame["outcome"], strict=True))


def test_the_same_file_twice_counts_once_and_overlaps_store_only_new_keys(client, experiment, tmp_path):
    first = write(tmp_path, "march.csv", "request_id,row,outcome\nr1,0,1\nr1,1,0\nr2,0,0\nr2,0,0\n")
    result = add_outcomes(first, client=client, experiment=experiment)
    assert (result.file_rows, result.new_rows, result.already_stored) == (3, 3, 0)
    assert result.batch is not None and result.run_id is not None
    again = add_outcomes(first, client=client, experiment=experiment)
    assert (again.new_rows, again.already_stored, again.batch, again.run_id) == (0, 3, None, None)
    overlap = write(tmp_path, "april.csv", "request_id,row,outcome,observed_at\nr2,0,0,2026-04-01\nr3,0,1,\n")
    more = add_outcomes(overlap, client=client, experiment=experiment)
    assert (more.new_rows, more.already_stored) == (1, 1)
    assert stored(client, experiment) == {("r1", 0, 1), ("r1", 1, 0), ("r2", 0, 0), ("r3", 0, 1)}
    assert len(all_runs(client, experiment)) == 2  # the repeated file wrote nothing
    frame = read_outcomes(client=client, experiment=experiment)
    batches = frame.attrs["batches"]
    assert [(b["source_name"], b["rows"]) for b in batches] == [("march.csv", 3), ("april.csv", 1)]
    assert (
        batches[0]["source_sha256"]
        == result.source_sha256
        == parse_outcome_bytes(first.read_bytes(), "x").sha256
    )
    assert set(frame.loc[frame["request_id"] == "r3", "batch"]) == {more.batch}
    started = datetime.fromtimestamp(client.get_run(result.run_id).info.start_time / 1000, UTC)
    assert batches[0]["ingested_at"] == started.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    assert frame.attrs["conflicts"] == []
    # r2's observed_at stays as first stored (unknown): the later file's date is not a new outcome.
    assert frame.loc[frame["request_id"] == "r2", "observed_at"].isna().all()


def test_a_conflict_with_stored_outcomes_is_refused_with_its_keys_and_nothing_written(
    client, experiment, tmp_path
):
    add_outcomes(
        write(tmp_path, "a.csv", "request_id,outcome\nr1,1\nr2,0\nr3,0\n"),
        client=client,
        experiment=experiment,
    )
    before = stored(client, experiment)
    runs_before = len(all_runs(client, experiment))
    clash = write(tmp_path, "b.csv", "request_id,outcome\nr9,1\nr2,1\nr3,1\nr1,1\n")
    with pytest.raises(ConflictingOutcomes) as raised:
        add_outcomes(clash, client=client, experiment=experiment)
    assert sorted(str(c) for c in raised.value.conflicts) == [
        "('r2', row 0): 1 here, 0 stored",
        "('r3', row 0): 1 here, 0 stored",
    ]
    assert not raised.value.within_file
    assert stored(client, experiment) == before  # r9, which was new, was not stored either
    assert len(all_runs(client, experiment)) == runs_before


def test_a_bad_file_touches_nothing(client, experiment, tmp_path):
    bad = write(tmp_path, "bad.csv", "request_id,outcome\nr1,1\nr2,maybe\n")
    with pytest.raises(OutcomeFileError, match="line 3, column outcome: expected 0 or 1, got 'maybe'"):
        add_outcomes(bad, client=client, experiment=experiment)
    conflicting = write(tmp_path, "twice.csv", "request_id,outcome\nr1,1\nr1,0\n")
    with pytest.raises(ConflictingOutcomes, match="0 here, 1 on line 2"):
        add_outcomes(conflicting, client=client, experiment=experiment)
    assert client.get_experiment_by_name(experiment) is None  # not even the experiment
    assert len(read_outcomes(client=client, experiment=experiment)) == 0


def test_a_deleted_outcomes_experiment_is_not_silently_recreated(client, experiment, tmp_path):
    add_outcomes(write(tmp_path, "a.csv", "request_id,outcome\nr1,1\n"), client=client, experiment=experiment)
    client.delete_experiment(client.get_experiment_by_name(experiment).experiment_id)
    with pytest.raises(DeletedExperiment, match="is deleted; restore it"):
        add_outcomes(
            write(tmp_path, "b.csv", "request_id,outcome\nr2,1\n"), client=client, experiment=experiment
        )
    assert len(read_outcomes(client=client, experiment=experiment)) == 0


STEPS = ("plan", "announce", "commit")


def interleavings():
    """Every order of two ingests' three steps, each ingest's own steps in order (20)."""
    for slots in itertools.combinations(range(6), 3):
        yield ["A" if i in slots else "B" for i in range(6)]


def test_two_conflicting_ingests_never_both_commit_whatever_the_order(client, tmp_path):
    a = parse_outcome_bytes(b"request_id,outcome\nshared,1\nonly-a,0\n", "a.csv")
    b = parse_outcome_bytes(b"request_id,outcome\nshared,0\nonly-b,0\n", "b.csv")
    orders = list(interleavings())
    assert len(orders) == 20
    for order in orders:
        experiment = f"race-{uuid.uuid4().hex[:8]}"
        ingests = {"A": Ingest(client, a, experiment), "B": Ingest(client, b, experiment)}
        done = {"A": 0, "B": 0}
        outcome = {}
        for who in order:
            if who in outcome:
                continue  # refused already
            step = STEPS[done[who]]
            done[who] += 1
            try:
                getattr(ingests[who], step)()
                if step == "commit":
                    outcome[who] = "committed"
            except ConflictingOutcomes:
                outcome[who] = "refused"
        assert sorted(outcome.values()) == ["committed", "refused"], (order, outcome)
        keys = stored(client, experiment)
        winner = a if outcome["A"] == "committed" else b
        expected = set(
            zip(winner.frame["request_id"], winner.frame["row_index"], winner.frame["outcome"], strict=True)
        )
        assert keys == expected, order
        states = [
            run.data.tags.get(STATE_TAG)
            for run in all_runs(client, experiment)
            if run.info.lifecycle_stage == "active"
        ]
        assert states == [COMMITTED], (order, states)


def test_two_conflicting_ingests_at_the_same_moment(client, tmp_path):
    """Threads, not steps: the outcome of the race varies; a conflict is never stored."""
    for attempt in range(3):
        experiment = f"threads-{uuid.uuid4().hex[:8]}"
        files = [
            write(tmp_path, f"{attempt}-{i}.csv", f"request_id,outcome\nshared,{i}\nown-{i},1\n")
            for i in (0, 1)
        ]
        results: dict[int, object] = {}
        start = threading.Barrier(2)

        def ingest(i: int, files=files, experiment=experiment, results=results, start=start):
            start.wait()
            try:
                results[i] = add_outcomes(
                    files[i], client=MlflowClient(client.tracking_uri), experiment=experiment
                )
            except ConflictingOutcomes as error:
                results[i] = error

        threads = [threading.Thread(target=ingest, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        committed = [i for i, r in results.items() if not isinstance(r, Exception)]
        assert len(results) == 2 and len(committed) <= 1, results
        frame = read_outcomes(client=client, experiment=experiment)
        assert frame.attrs["conflicts"] == [] and frame["request_id"].is_unique
        if committed:
            assert set(frame["request_id"]) == {"shared", f"own-{committed[0]}"}


def announce_and_die(client, experiment: str, text: bytes, minutes_ago: float, monkeypatch) -> None:
    """An ingest that announced its batch ``minutes_ago`` and died before committing."""
    dead = Ingest(client, parse_outcome_bytes(text, "dead.csv"), experiment)
    dead.plan()
    create_run = client.create_run
    started = int(time.time() * 1000 - minutes_ago * 60_000)
    with monkeypatch.context() as patch:  # the real server, with the start time it would have had
        patch.setattr(
            client, "create_run", lambda *args, **kwargs: create_run(*args, start_time=started, **kwargs)
        )
        dead.announce()
    assert [r.data.tags[STATE_TAG] for r in all_runs(client, experiment)] == [ANNOUNCED]


def test_an_abandoned_announcement_blocks_conflicts_only_until_it_expires(client, monkeypatch):
    late = parse_outcome_bytes(b"request_id,outcome\nk,0\n", "late.csv")
    fresh = f"fresh-{uuid.uuid4().hex[:8]}"
    announce_and_die(client, fresh, b"request_id,outcome\nk,1\n", minutes_ago=1, monkeypatch=monkeypatch)
    refused = Ingest(client, late, fresh)
    refused.plan()
    refused.announce()
    with pytest.raises(ConflictingOutcomes, match=r"0 here, 1 in a concurrent ingest"):
        refused.commit()
    assert len(read_outcomes(client=client, experiment=fresh)) == 0
    expired = f"expired-{uuid.uuid4().hex[:8]}"
    announce_and_die(client, expired, b"request_id,outcome\nk,1\n", minutes_ago=11, monkeypatch=monkeypatch)
    assert add_outcomes_bytes(client, late, expired).new_rows == 1
    assert stored(client, expired) == {("k", 0, 0)}


def add_outcomes_bytes(client, parsed, experiment):
    ingest = Ingest(client, parsed, experiment)
    ingest.plan()
    ingest.announce()
    return ingest.commit()


def test_an_ingest_slower_than_half_the_ttl_withdraws(client, experiment, monkeypatch):
    """Others stop heeding an announcement after the TTL, so a late commit could store a
    conflict nobody checked: it withdraws instead."""
    import monitoring.outcomes as outcomes_module

    slow = Ingest(client, parse_outcome_bytes(b"request_id,outcome\nk,1\n", "slow.csv"), experiment)
    slow.plan()
    slow.announce()
    monkeypatch.setattr(outcomes_module, "ANNOUNCED_TTL_S", 0)
    with pytest.raises(OutcomeError, match="took too long; nothing stored"):
        slow.commit()
    assert len(read_outcomes(client=client, experiment=experiment)) == 0
    assert [run.info.lifecycle_stage for run in all_runs(client, experiment)] == ["deleted"]
