"""`credit-risk promote`, `rollback` and `status` against a real MLflow tracking server (and a
real MLServer for `status`): stage and alias move together, history is kept as tags in the
registry, bad input changes nothing.

One model is trained for the module; each test starts from a fresh registered model whose
versions are registrations of that trained model (so every version loads and scores like a
real one) and runs the command in-process through ``stack.cli.main``, the console script's
own function. The unreachable-server case goes through the installed ``credit-risk`` script.
"""

from __future__ import annotations

import getpass
import json
import socket
import warnings
from datetime import UTC, datetime, timedelta

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from model.identity import DATASET_HASH, PRODUCTION_ALIAS, REGISTERED_MODEL_NAME, TEST_ROC_AUC_TAG
from stack.cli import main
from tests.helpers import (
    NOBODY_URL,
    credit_risk,
    mlflow_tracking_server,
    one_error_line,
    running,
    serving_service,
)
from training import registry
from training.promotion_history import ACTOR_VARIABLE, PromotionError
from training.settings import DEFAULT_EXPERIMENT

pytestmark = pytest.mark.integration

NAME = REGISTERED_MODEL_NAME


@pytest.fixture(scope="module")
def trained_uri(tmp_path_factory, sample_path):
    """A tracking server of its own holding one quickly trained, gate-promoted model."""
    with mlflow_tracking_server(tmp_path_factory.mktemp("promotion")) as uri:
        result = credit_risk("train", "--data", str(sample_path), "--set", "max_iter=20", tracking_uri=uri)
        assert result.returncode == 0, result.stdout + result.stderr
        yield uri


@pytest.fixture(scope="module")
def trained_version(trained_uri):
    """What the trainer registered, kept before any test replaces the registered model."""
    return MlflowClient(trained_uri).get_model_version(NAME, "1")


@pytest.fixture
def client(trained_uri, trained_version, monkeypatch):
    """This module's registry as the in-process commands see it (another test module may have
    pinned mlflow's tracking URI, which would win over the environment)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_uri)
    monkeypatch.delenv(ACTOR_VARIABLE, raising=False)
    mlflow.set_tracking_uri(trained_uri)
    yield MlflowClient(trained_uri)
    mlflow.set_tracking_uri(None)


@pytest.fixture
def fresh(client, trained_version):
    """``fresh(n)``: a new registered model with versions 1..n of the trained model, none promoted."""

    def make(count: int) -> MlflowClient:
        try:
            client.delete_registered_model(NAME)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        client.create_registered_model(NAME)
        for _ in range(count):
            register(client, trained_version)
        return client

    return make


def register(client: MlflowClient, trained) -> str:
    """Another version of the trained model, with the tags status reads."""
    kept = (DATASET_HASH, TEST_ROC_AUC_TAG)
    version = client.create_model_version(
        NAME,
        trained.source,
        run_id=trained.run_id,
        model_id=trained.source.removeprefix("models:/"),
        tags={key: value for key, value in trained.tags.items() if key in kept},
        await_creation_for=60,
    )
    return version.version


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def stages(client) -> dict[str, str]:
    return {v.version: v.current_stage for v in client.search_model_versions(f"name='{NAME}'")}


def alias(client) -> str | None:
    return client.get_registered_model(NAME).aliases.get(PRODUCTION_ALIAS)


def snapshot(client):
    """Everything a command could change: aliases, stages, tags and update times."""
    model = client.get_registered_model(NAME)
    versions = sorted(
        (v.version, v.current_stage, v.last_updated_timestamp, tuple(sorted(v.tags.items())))
        for v in client.search_model_versions(f"name='{NAME}'")
    )
    return dict(model.aliases), model.last_updated_timestamp, versions


def promote_all(client, *versions) -> None:
    for version in versions:
        registry.promote(client, version, actor="set-up", reason=f"set-up {version}", source="cli")


def test_training_records_its_promotion_and_marks_the_experiment_as_model_training(client, trained_version):
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    assert (
        experiment.tags[registry.EXPERIMENT_KIND_TAG]
        == registry.MODEL_TRAINING_KIND
        == "custom_model_development"
    )
    # The gate promotes through registry.promote, so its promotions are in the same history.
    assert trained_version.tags["promotion.seq"] == "1"
    assert trained_version.tags["promotion.previous"] == "none"


def test_promote_moves_stage_and_alias_and_records_who_when_and_why(fresh, capsys, monkeypatch):
    client = fresh(2)
    code, out, err = cli(capsys, "promote", "--version", "1", "--reason", "first by hand")
    assert code == 0, err
    assert (
        client.get_model_version(NAME, "1").tags["promotion.by"]
        == f"{getpass.getuser()}@{socket.gethostname()}"
    )

    monkeypatch.setenv(ACTOR_VARIABLE, "alice (on call)")
    code, out, err = cli(capsys, "promote", "--version", "2", "--reason", "better recall")
    assert code == 0, err
    assert stages(client) == {"1": "Archived", "2": "Production"}
    assert alias(client) == "2"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion.seq"] == "2"
    assert tags["promotion.by"] == "alice (on call)"
    assert tags["promotion.reason"] == "better recall"
    assert tags["promotion.source"] == "cli"
    assert tags["promotion.previous"] == "1"
    at = datetime.strptime(tags["promotion.at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - at) < timedelta(minutes=5)
    assert "Checked v2: it loads as serving loads it and scored 5 rows of its input example" in out
    assert (
        "Promoted credit-risk-model v2 to Production (promotion #2); v1 archived; alias production → v2"
        in out
    )
    assert "A rollback now would go to v1" in out

    before = snapshot(client)
    code, out, _ = cli(capsys, "promote", "--version", "2", "--reason", "again")
    assert code == 0 and "already in Production" in out
    assert snapshot(client) == before


def test_two_rollbacks_step_back_twice_and_a_third_is_refused(fresh, capsys):
    client = fresh(3)
    promote_all(client, 1, 2, 3)

    code, out, err = cli(capsys, "rollback")
    assert code == 0, err
    assert "Rolled back credit-risk-model: Production v3 → v2 (promotion #4); v3 archived" in out
    assert "v3's promotion #3 is marked rolled back" in out and "A rollback now would go to v1" in out
    assert stages(client) == {"1": "Archived", "2": "Production", "3": "Archived"} and alias(client) == "2"

    code, out, err = cli(capsys, "rollback", "--reason", "v2 is wrong too")
    assert code == 0, err
    assert "Production v2 → v1" in out and "reason 'v2 is wrong too'" in out
    assert stages(client) == {"1": "Production", "2": "Archived", "3": "Archived"} and alias(client) == "1"
    tags = client.get_model_version(NAME, "1").tags
    assert (tags["promotion.source"], tags["promotion.previous"]) == ("rollback", "2")

    before = snapshot(client)
    code, _, err = cli(capsys, "rollback")
    assert code == 1
    assert "nothing to roll back to" in one_error_line(err)
    assert snapshot(client) == before


def test_rollback_goes_to_the_holder_before_the_current_one_skipping_rolled_back_ones(fresh):
    client = fresh(3)
    promote_all(client, 1, 2, 3)
    registry.rollback(client, actor="test")  # 3 → 2
    registry.rollback(client, actor="test")  # 2 → 1
    promote_all(client, 3)
    # v3 took over from v1; v2 held Production before that but was rolled back.
    undone, new = registry.rollback(client, actor="test")
    assert (undone.version, new.version) == ("3", "1")

    promote_all(client, 2, 3, 2)  # the stack is now 1, 3, 2: each version once, latest stint
    assert [registry.rollback(client, actor="test")[1].version for _ in range(2)] == ["3", "1"]
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        registry.rollback(client, actor="test")


def test_a_change_made_in_the_mlflow_ui_is_reported_and_becomes_history(fresh, capsys):
    client = fresh(3)
    promote_all(client, 1, 2)
    # What the UI's stage transition does: the stage moves, no tag is written, the alias stays.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated; serving uses them
        client.transition_model_version_stage(NAME, "3", "Production", archive_existing_versions=True)
    before = snapshot(client)

    code, out, err = cli(capsys, "status", "--json", "--server", NOBODY_URL)
    assert code == 0, err
    report = json.loads(out)
    assert report["production"]["version"] == "3" and report["production"]["promotion"] is None
    assert report["outside_changes"] == [
        "v3 in Production without a promotion record: changed outside credit-risk (MLflow UI?)"
    ]
    assert report["divergences"] == ["stage Production is v3 but alias production points at v2"]
    assert report["rollback_target"] == "2"
    code, text, _ = cli(capsys, "status", "--server", NOBODY_URL)
    assert "! v3 in Production without a promotion record: changed outside credit-risk (MLflow UI?)" in text
    assert "! stage Production is v3 but alias production points at v2" in text
    assert snapshot(client) == before, "status must not repair anything"

    code, out, err = cli(capsys, "rollback", "--reason", "undo the UI change")
    assert code == 0, err
    assert "warning: v3 in Production without a promotion record" in err
    assert "warning: stage Production is v3 but alias production points at v2; rolling back from stage" in err
    assert "Production v3 → v2" in out
    assert stages(client) == {"1": "Archived", "2": "Production", "3": "Archived"} and alias(client) == "2"
    history = {record["version"]: record for record in status_json(capsys)["history"]}
    assert history["3"]["source"] == "outside" and history["3"]["rolled_back"]
    assert history["2"]["source"] == "rollback" and history["2"]["reason"] == "undo the UI change"
    assert status_json(capsys)["rollback_target"] == "1"


def status_json(capsys, *servers: str) -> dict:
    code, out, err = cli(capsys, "status", "--json", *(arg for url in servers for arg in ("--server", url)))
    assert code == 0, err
    return json.loads(out)


def test_an_alias_moved_by_hand_is_reported_never_repaired(fresh, capsys):
    client = fresh(2)
    promote_all(client, 1, 2)
    client.set_registered_model_alias(NAME, PRODUCTION_ALIAS, "1")
    before = snapshot(client)
    report = status_json(capsys, NOBODY_URL)
    assert report["divergences"] == ["stage Production is v2 but alias production points at v1"]
    assert report["outside_changes"] == []
    assert snapshot(client) == before


class NotACreditRiskModel(mlflow.pyfunc.PythonModel):
    def predict(self, model_input: list[str], params=None) -> list[str]:
        return model_input


def register_unservable(client) -> str:
    """A version that MLflow loads but serving cannot: a trivial pyfunc under our name, logged
    outside the training experiment (so serving refuses it on that alone).

    The run goes to an explicit experiment: ``mlflow.set_experiment`` would pin the
    process-wide active experiment (and MLFLOW_EXPERIMENT_ID) for every later test module."""
    experiment = client.get_experiment_by_name("not-credit-risk")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("not-credit-risk")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=NotACreditRiskModel(), pip_requirements=[])
    version = client.create_model_version(
        NAME, info.model_uri, run_id=run.info.run_id, model_id=info.model_id, await_creation_for=60
    )
    return version.version


def test_a_version_that_cannot_be_served_is_refused_and_nothing_changes(fresh, capsys, trained_version):
    client = fresh(1)
    broken = register_unservable(client)
    good = register(client, trained_version)
    promote_all(client, "1")
    before = snapshot(client)
    code, out, err = cli(capsys, "promote", "--version", broken, "--reason", "try it")
    assert code == 1
    line = one_error_line(err)
    assert f"v{broken} cannot be served, so Production is left as it is" in line
    # Its run is outside the training experiment, so the integrity check refuses it before
    # anything of it is unpickled (tests/integration/test_integrity.py covers the other refusals).
    assert "refused (integrity): its run" in line and "not in the training experiment" in line
    assert "Promoted" not in out
    assert snapshot(client) == before

    # Put there by other means (the API, the UI); a rollback to it is refused the same way.
    promote_all(client, broken, good)
    before = snapshot(client)
    code, _, err = cli(capsys, "rollback")
    assert code == 1
    assert f"v{broken} cannot be served" in one_error_line(err)
    assert snapshot(client) == before


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("promote", "--version", "abc", "--reason", "x"), 2, "--version must be a registry version number"),
        (("promote", "--version", "-1", "--reason", "x"), 2, "--version must be a registry version number"),
        (
            ("promote", "--version", "99", "--reason", "x"),
            1,
            "credit-risk-model has no version 99 (versions: 1)",
        ),
        (("promote", "--version", "1", "--reason", "  "), 2, "--reason must say why"),
        (("rollback",), 1, "nothing to roll back to: no version is recorded in Production before v1"),
    ],
)
def test_bad_input_is_one_clear_error_and_changes_nothing(fresh, capsys, args, code, message):
    client = fresh(1)
    promote_all(client, "1")
    before = snapshot(client)
    returned, out, err = cli(capsys, *args)
    assert returned == code
    assert message in one_error_line(err)
    assert out == ""
    assert snapshot(client) == before


def test_no_registered_model_is_a_clear_error(client, capsys, trained_uri):
    client.delete_registered_model(NAME)
    for args in (("promote", "--version", "1", "--reason", "x"), ("rollback",), ("status",)):
        code, out, err = cli(capsys, *args)
        assert code == 1, args
        assert f"no registered model 'credit-risk-model' in the registry at {trained_uri}" in one_error_line(
            err
        )
        assert out == ""
    assert client.search_registered_models() == []


def test_unreachable_mlflow_is_a_clear_error(client, capsys, monkeypatch):
    uri = NOBODY_URL
    result = credit_risk("status", tracking_uri=uri, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(f"tracking server: {uri} (MLFLOW_TRACKING_URI)\n"), result.stderr
    assert f"MLflow tracking server at {uri} is not reachable" in one_error_line(result.stderr)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for args in (("promote", "--version", "1", "--reason", "x"), ("rollback",)):
        code, _, err = cli(capsys, *args)
        assert code == 1 and f"MLflow tracking server at {uri} is not reachable" in one_error_line(err)


def test_status_shows_what_a_live_server_serves(fresh, capsys, monkeypatch, trained_uri, tmp_path):
    client = fresh(2)
    promote_all(client, 1, 2)
    service, ports = serving_service(trained_uri, workers=0)
    dead = NOBODY_URL
    with running(service, tmp_path):
        monkeypatch.setenv("MLSERVER_HTTP_PORT", str(ports["http"]))  # the default server
        code, text, err = cli(capsys, "status")
        assert code == 0, err
        report = status_json(capsys, f"http://127.0.0.1:{ports['http']}/", dead)
    assert f"http://127.0.0.1:{ports['http']}  serving v2, ready" in text
    assert "credit-risk-model in Production: v2" in text
    assert "alias            production → v2" in text
    assert "promoted         #2 at" in text and "via cli: 'set-up 2' (previous holder v1)" in text
    assert "History (newest first):" in text and "rollback         would go to v1" in text

    live, unreachable = report["servers"]
    assert live == {
        "url": f"http://127.0.0.1:{ports['http']}",
        "reachable": True,
        "version": "2",
        "ready": True,
        "detail": "",
    }
    assert not unreachable["reachable"] and unreachable["detail"].startswith("unreachable: ")
    production = report["production"]
    assert production["dataset_hash"] == client.get_model_version(NAME, "2").tags["dataset_hash"]
    assert production["held_out"]["version_tag"] == client.get_model_version(NAME, "2").tags["test_roc_auc"]
    assert production["held_out"]["run_metrics"]["test_roc_auc"] == pytest.approx(
        float(production["held_out"]["version_tag"]), abs=1e-6
    )
    assert [(r["version"], r["stage"]) for r in report["history"]] == [("2", "Production"), ("1", "Archived")]
    run = client.get_run(client.get_model_version(NAME, "2").run_id)
    assert production["held_out"]["run_url"] == (
        f"{trained_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        "?workflowType=machine_learning"
    )
