"""``model.integrity`` on folders made here: every way a copy can differ from its manifest is
named, digests are the SHA-256 an independent reader computes, and nothing is unpickled.

The same checks on a real model version downloaded from a real MLflow server are in
``tests/integration/test_auth.py`` (``test_downloaded_version_*``)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from model.integrity import (
    FORMAT,
    MODEL_DIR,
    RUN_DIR,
    FileDigest,
    IntegrityError,
    Manifest,
    ManifestError,
    build_manifest,
    recorded_manifest,
    verify,
)

HELD_OUT = f"{RUN_DIR}/evaluation/held_out.parquet"


class _Tripwire:
    """Unpickling this touches a file: proof, if the file appears, that something unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def version(tmp_path) -> Path:
    """A folder laid out like a downloaded version: model files, nested code, held-out rows."""
    root = tmp_path / "version"
    files = {
        f"{MODEL_DIR}/MLmodel": b"flavors:\n  python_function: {}\n",
        f"{MODEL_DIR}/python_model.pkl": pickle.dumps(_Tripwire(tmp_path / "unpickled")),
        f"{MODEL_DIR}/artifacts/pipeline.joblib": os.urandom(300_000),
        f"{MODEL_DIR}/code/model/pyfunc.py": b"print('model code')\n",
        f"{MODEL_DIR}/requirements.txt": b"mlflow==3.17.2\n",
        f"{MODEL_DIR}/empty.txt": b"",
        HELD_OUT: os.urandom(5_000),
    }
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def _expected_by_hand(root: Path) -> dict[str, dict]:
    """SHA-256 and size of every file, computed without the module under test."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        out[path.relative_to(root).as_posix()] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
    return out


def test_manifest_lists_every_file_with_sha256_and_size(version):
    manifest = build_manifest(version)
    expected = _expected_by_hand(version)
    assert {path: d._asdict() for path, d in manifest.files.items()} == expected
    assert manifest.total_bytes == sum(e["size"] for e in expected.values())
    # The digest is SHA-256 of the canonical JSON, written out by hand here.
    canonical = json.dumps(
        {"algorithm": "sha256", "files": expected, "format": FORMAT}, sort_keys=True, separators=(",", ":")
    )
    assert manifest.to_json() == canonical
    assert manifest.digest == hashlib.sha256(canonical.encode()).hexdigest()
    assert manifest.short_digest == manifest.digest[:12]


def test_an_untouched_copy_verifies(version, tmp_path):
    manifest = build_manifest(version)
    copy = tmp_path / "copy"
    shutil.copytree(version, copy)
    (copy / "model" / "some-empty-folder").mkdir()  # holds no bytes: not a difference
    verify(copy, manifest)


def test_a_tampered_file_is_named(version):
    manifest = build_manifest(version)
    target = version / MODEL_DIR / "artifacts" / "pipeline.joblib"
    data = bytearray(target.read_bytes())
    data[123_456] ^= 0x01  # one bit, same size
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as raised:
        verify(version, manifest)
    assert (raised.value.path, raised.value.problem) == ("model/artifacts/pipeline.joblib", "content differs")
    assert str(raised.value).startswith("model/artifacts/pipeline.joblib: content differs (sha256 ")


def test_a_file_of_another_size_is_named_without_hashing(version, monkeypatch):
    manifest = build_manifest(version)
    with open(version / HELD_OUT, "ab") as file:
        file.write(b"x")
    monkeypatch.setattr("model.integrity.hash_file", lambda path: pytest.fail(f"hashed {path}"))
    with pytest.raises(IntegrityError) as raised:
        verify(version, manifest)
    assert (raised.value.path, raised.value.problem) == (HELD_OUT, "size differs")
    assert "5001 bytes, manifest says 5000" in str(raised.value)


def test_a_missing_file_is_named(version):
    manifest = build_manifest(version)
    (version / HELD_OUT).unlink()
    with pytest.raises(IntegrityError) as raised:
        verify(version, manifest)
    assert (raised.value.path, raised.value.problem) == (HELD_OUT, "missing")


def test_an_extra_file_is_named(version):
    """Code added beside the model's (``code/`` goes first on ``sys.path``) is refused."""
    manifest = build_manifest(version)
    extra = version / MODEL_DIR / "code" / "model" / "sitecustomize.py"
    extra.write_text("import os\n")
    with pytest.raises(IntegrityError) as raised:
        verify(version, manifest)
    assert (raised.value.path, raised.value.problem) == ("model/code/model/sitecustomize.py", "extra")


def test_the_first_problem_in_path_order_is_named(version):
    manifest = build_manifest(version)
    (version / MODEL_DIR / "requirements.txt").unlink()  # model/r... sorts after model/M...
    (version / MODEL_DIR / "MLmodel").write_bytes(b"changed size")
    with pytest.raises(IntegrityError) as raised:
        verify(version, manifest)
    assert raised.value.path == "model/MLmodel"


def test_links_are_refused_not_followed(version, tmp_path):
    manifest = build_manifest(version)
    target = version / MODEL_DIR / "python_model.pkl"
    elsewhere = tmp_path / "elsewhere.pkl"
    shutil.copyfile(target, elsewhere)  # same bytes: only the link itself is wrong
    target.unlink()
    target.symlink_to(elsewhere)
    with pytest.raises(IntegrityError) as raised:
        verify(version, manifest)
    assert (raised.value.path, raised.value.problem) == ("model/python_model.pkl", "not a regular file")
    with pytest.raises(IntegrityError, match="not a regular file"):
        build_manifest(version)


def test_a_linked_folder_is_an_extra_entry(version, tmp_path):
    manifest = build_manifest(version)
    (tmp_path / "outside").mkdir()
    (version / MODEL_DIR / "code" / "linked").symlink_to(tmp_path / "outside")
    with pytest.raises(IntegrityError) as raised:
        verify(version, manifest)
    assert (raised.value.path, raised.value.problem) == ("model/code/linked", "extra")


def test_nothing_is_unpickled(version, tmp_path):
    manifest = build_manifest(version)
    verify(version, manifest)
    (version / MODEL_DIR / "MLmodel").write_bytes(b"x" * 40)
    with pytest.raises(IntegrityError):
        verify(version, manifest)
    assert not (tmp_path / "unpickled").exists()
    pickle.loads((version / MODEL_DIR / "python_model.pkl").read_bytes())  # the tripwire works
    assert (tmp_path / "unpickled").exists()


def test_manifest_round_trips_and_checks_its_recorded_digest(version):
    manifest = build_manifest(version)
    again = recorded_manifest(manifest.to_json(), manifest.digest)
    assert again == manifest and again.digest == manifest.digest
    # Equivalent JSON in another form still has the same (canonical) digest.
    assert Manifest.from_json(json.dumps(json.loads(manifest.to_json()), indent=2)).digest == manifest.digest
    forged = json.loads(manifest.to_json())
    forged["files"][f"{MODEL_DIR}/MLmodel"]["sha256"] = "0" * 64
    with pytest.raises(ManifestError, match="is not the recorded"):
        recorded_manifest(json.dumps(forged), manifest.digest)


def test_require_names_an_uncovered_file(version):
    manifest = build_manifest(version)
    manifest.require([HELD_OUT, f"{MODEL_DIR}/MLmodel"])
    (version / HELD_OUT).unlink()
    with pytest.raises(ManifestError, match=r"does not cover run/evaluation/held_out\.parquet"):
        build_manifest(version).require([HELD_OUT])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="other/1"), "format is 'other/1'"),
        (lambda d: d.update(algorithm="md5"), "algorithm is 'md5'"),
        (lambda d: d.update(extra=1), "unexpected keys"),
        (lambda d: d.update(files={}), "lists no files"),
        (lambda d: d["files"].update({"../etc/passwd": {"sha256": "a" * 64, "size": 1}}), "not a normal"),
        (lambda d: d["files"].update({"/abs": {"sha256": "a" * 64, "size": 1}}), "not a normal"),
        (lambda d: d["files"].update({"a//b": {"sha256": "a" * 64, "size": 1}}), "not a normal"),
        (lambda d: d["files"].update({"x": {"sha256": "A" * 64, "size": 1}}), "64 lowercase hex"),
        (lambda d: d["files"].update({"x": {"sha256": "a" * 64, "size": 1.0}}), "not a byte count"),
        (lambda d: d["files"].update({"x": {"sha256": "a" * 64, "size": -1}}), "not a byte count"),
        (lambda d: d["files"].update({"x": {"sha256": "a" * 64}}), "is not {sha256, size}"),
        (lambda d: d["files"].update({"model": {"sha256": "a" * 64, "size": 1}}), "both as a file and"),
    ],
)
def test_bad_manifests_are_refused_with_the_reason(version, mutate, message):
    document = json.loads(build_manifest(version).to_json())
    mutate(document)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(json.dumps(document))


def test_not_json_is_refused():
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.from_json(b"\x80not json")
    with pytest.raises(ManifestError, match="format is 'list'"):
        Manifest.from_json("[]")


def test_an_empty_or_absent_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_manifest(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IntegrityError, match="no files"):
        build_manifest(tmp_path / "empty")
    manifest = Manifest({"model/MLmodel": FileDigest("a" * 64, 1)})
    with pytest.raises(IntegrityError, match="model/MLmodel: missing"):
        verify(tmp_path / "absent", manifest)
