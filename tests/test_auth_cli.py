"""``credit-risk auth`` without a server (credentials for Kubernetes Secrets, the table, a
server that does not answer) and the invariants the policy must keep whoever edits it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from stack import auth_policy as policy
from stack.auth_cli import main
from stack.auth_files import read_credentials
from tests.helpers import NOBODY_URL


def test_credentials_writes_every_identity_once(tmp_path, capsys):
    directory = tmp_path / "secrets"
    assert main(["auth", "credentials", "--credentials-dir", str(directory)]) == 0
    written = sorted(p.name for p in directory.iterdir())
    assert written == sorted([f"{i}.env" for i in policy.IDENTITIES] + ["flask_secret_key"])
    assert all(stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600 for name in written)
    first = {i: read_credentials(directory / f"{i}.env") for i in policy.IDENTITIES}
    assert len({c.password for c in first.values()}) == len(policy.IDENTITIES)
    assert main(["auth", "credentials", "--credentials-dir", str(directory)]) == 0
    assert {i: read_credentials(directory / f"{i}.env") for i in policy.IDENTITIES} == first
    assert str(directory / "trainer.env") in capsys.readouterr().out


def test_table_prints_one_row_per_grant(capsys):
    assert main(["auth", "table"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(rows) == len(policy.POLICY) + 1  # and admin's


def test_provision_against_nothing_is_one_error_line(tmp_path, capsys):
    uri = NOBODY_URL
    code = main(["auth", "provision", "--tracking-uri", uri, "--credentials-dir", str(tmp_path / "auth")])
    err = capsys.readouterr().err
    assert (
        code == 1
        and err.startswith(f"error: tracking server at {uri} did not answer")
        and err.count("\n") == 1
    )


def test_policy_invariants():
    """What the table promises in prose, kept true by construction."""
    assert {g.identity for g in policy.POLICY} == set(policy.SERVICE_IDENTITIES)
    # Only admin manages experiments and models. MANAGE on the run tier (deleting runs and their
    # files) reaches every experiment its holder reads: the sidecar's, which reads only the records.
    managers = {
        (g.identity, g.resource_type, g.resource) for g in policy.POLICY if g.permission == policy.MANAGE
    }
    assert managers == {(policy.SIDECAR, policy.RUN, policy.EVERY)}
    sidecar_reads = {
        g.resource for g in policy.grants_of(policy.SIDECAR) if g.resource_type == policy.EXPERIMENT
    }
    assert sidecar_reads == {policy.INFERENCE}
    assert {(g.identity, g.resource) for g in policy.POLICY if g.permission == policy.DENY} == {
        (policy.SIDECAR, policy.EVERY)
    }
    # The inference records are personal data: these, and nobody else, read them.
    assert set(policy.readers_of(policy.INFERENCE)) == {"admin", "sidecar", "monitor", "trainer"}
    writers = {
        g.identity for g in policy.POLICY if g.resource == policy.INFERENCE and g.permission == policy.EDIT
    }
    assert writers == {policy.SIDECAR}
    registry_writers = {
        g.identity
        for g in policy.POLICY
        if g.resource_type == policy.REGISTERED_MODEL and g.permission == policy.EDIT
    }
    assert registry_writers == {policy.TRAINER, policy.OPERATOR}
    # Whoever loads a version needs the training experiment, where its files are.
    model_readers = {g.identity for g in policy.POLICY if g.resource == policy.MODEL}
    training_readers = {g.identity for g in policy.POLICY if g.resource == policy.TRAINING}
    assert model_readers == training_readers


def test_credentials_in_per_identity_folders(tmp_path, capsys):
    directory = tmp_path / "secrets"
    assert main(["auth", "credentials", "--credentials-dir", str(directory), "--per-identity-folders"]) == 0
    for identity in policy.SERVICE_IDENTITIES:
        assert read_credentials(directory / identity / f"{identity}.env").username == identity
    assert read_credentials(directory / "admin.env").username == "admin"


def test_the_docs_table_is_the_generated_one():
    """docs/security.md shows exactly what ``credit-risk auth table`` prints for the default names."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    assert policy.markdown_table().rstrip("\n") in docs
