"""What a model version is, byte for byte, and the check that a downloaded copy is exactly that
before anything in it is unpickled.

A **manifest** lists every file of a version as it was stored at training: relative path →
SHA-256 and size. Its **digest** (SHA-256 of its canonical JSON) is what the registry keeps;
``short_digest`` is the first 12 hex digits, for messages. A folder checked against a manifest
is laid out as training laid it out when it made the manifest::

    model/...                        the logged model's artifacts: MLmodel, python_model.pkl,
                                     artifacts/pipeline.joblib, code/model/*.py, examples, envs
    run/evaluation/held_out.parquet  the training run's held-out rows and probabilities

Invariants:

- Paths are relative, ``/``-separated and normal (no empty, ``.`` or ``..`` part, no
  backslash, no leading ``/``), unique, and never a prefix directory of another.
- The canonical JSON (sorted keys, no whitespace, ASCII) is the only form that is hashed, so
  the same files always give the same digest, whatever wrote the JSON.
- ``verify`` looks at what costs nothing first: in sorted path order, the first file that is
  *missing*, *not a regular file* or whose *size differs*; then the first *extra* file; only
  then contents, in sorted path order, the first whose *content differs*. It refuses symbolic
  links (a link could point anywhere) and anything else that is not a regular file; empty
  directories hold no bytes and are ignored.
- Nothing here imports, unpickles or parses the files it checks: reading bytes is all it does.
  It imports nothing beyond the standard library (this package ships inside every model).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import NamedTuple

FORMAT = "credit-risk-manifest/1"
ALGORITHM = "sha256"
SHORT_DIGEST_LENGTH = 12

# The layout of a checked folder (see the module docstring).
MODEL_DIR = "model"
RUN_DIR = "run"

# Where a version's manifest is recorded (by training, in its run): the manifest as an artifact
# of the training run and its digest as a tag of that run, which only identities that may write
# to the training experiment (``trainer``, ``admin``) can change. The same tag on the registered
# version is a copy for people and ``status``; the run's is the one a check trusts.
MANIFEST_ARTIFACT = "integrity/manifest.json"
MANIFEST_DIGEST_TAG = "integrity.manifest_sha256"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class IntegrityError(Exception):
    """A folder does not match its manifest; ``path`` names the first file that does not
    (relative, as in the manifest) and ``problem`` says how."""

    def __init__(self, path: str, problem: str, detail: str = ""):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}" + (f" ({detail})" if detail else ""))


class ManifestError(ValueError):
    """A manifest that cannot be read or trusted as one; the message says what is wrong."""


class FileDigest(NamedTuple):
    sha256: str
    size: int


def _checked_path(path: str) -> str:
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise ManifestError(f"manifest path {path!r} is not a normal relative path")
    return path


@dataclass(frozen=True)
class Manifest:
    """Every file of a version: relative POSIX path → ``FileDigest``."""

    files: Mapping[str, FileDigest]

    def __post_init__(self):
        files = {_checked_path(path): FileDigest(*entry) for path, entry in sorted(self.files.items())}
        for path, (sha256, size) in files.items():
            if not _HEX64.match(sha256):
                raise ManifestError(
                    f"manifest entry {path}: sha256 {sha256!r} is not 64 lowercase hex digits"
                )
            if type(size) is not int or size < 0:
                raise ManifestError(f"manifest entry {path}: size {size!r} is not a byte count")
        directories = {str(parent) for path in files for parent in PurePosixPath(path).parents}
        if clash := sorted(directories & files.keys()):
            raise ManifestError(f"manifest lists {clash[0]!r} both as a file and as a folder")
        object.__setattr__(self, "files", MappingProxyType(files))

    def to_json(self) -> str:
        """The canonical form: what is stored, and what ``digest`` hashes."""
        document = {
            "format": FORMAT,
            "algorithm": ALGORITHM,
            "files": {path: {"sha256": d.sha256, "size": d.size} for path, d in self.files.items()},
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode("ascii")).hexdigest()

    @property
    def short_digest(self) -> str:
        return self.digest[:SHORT_DIGEST_LENGTH]

    @property
    def total_bytes(self) -> int:
        return sum(d.size for d in self.files.values())

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse a stored manifest, refusing anything that is not exactly one."""
        try:
            document = json.loads(text)
        except (ValueError, UnicodeDecodeError) as error:
            raise ManifestError(f"manifest is not JSON: {error}") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            found = document.get("format") if isinstance(document, dict) else type(document).__name__
            raise ManifestError(f"manifest format is {found!r}, expected {FORMAT!r}")
        if document.get("algorithm") != ALGORITHM:
            raise ManifestError(
                f"manifest algorithm is {document.get('algorithm')!r}, expected {ALGORITHM!r}"
            )
        if set(document) != {"format", "algorithm", "files"}:
            raise ManifestError(
                f"manifest has unexpected keys {sorted(set(document) - {'format', 'algorithm', 'files'})}"
            )
        entries = document["files"]
        if not isinstance(entries, dict) or not entries:
            raise ManifestError("manifest lists no files")
        files = {}
        for path, entry in entries.items():
            if not isinstance(entry, dict) or set(entry) != {"sha256", "size"}:
                raise ManifestError(f"manifest entry {path!r} is not {{sha256, size}}")
            files[path] = FileDigest(entry["sha256"], entry["size"])
        return cls(files)

    def require(self, paths: Iterable[str]) -> None:
        """Refuse a manifest that does not cover ``paths`` (e.g. the held-out rows)."""
        if missing := sorted(set(paths) - self.files.keys()):
            raise ManifestError(f"manifest does not cover {missing[0]}")


def recorded_manifest(text: str | bytes, digest: str) -> Manifest:
    """The manifest stored as ``text``, if its digest is the recorded ``digest``."""
    manifest = Manifest.from_json(text)
    if manifest.digest != digest:
        raise ManifestError(
            f"manifest digest {manifest.short_digest} is not the recorded {digest[:SHORT_DIGEST_LENGTH]}: "
            "the stored manifest was changed after training"
        )
    return manifest


def hash_file(path: Path) -> FileDigest:
    """SHA-256 and size of one regular file, read in chunks (never all at once). A symbolic
    link is refused at open (``O_NOFOLLOW``), even one swapped in after it was listed."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with open(descriptor, "rb") as file:
        digest = hashlib.file_digest(file, ALGORITHM)
        size = file.tell()
    return FileDigest(digest.hexdigest(), size)


def _walk(root: Path) -> dict[str, Path]:
    """Every entry under ``root`` that is not a directory, by relative POSIX path. Symbolic
    links are listed (not followed), so that the caller refuses them."""
    found = {}
    for directory, subdirectories, names in os.walk(root, followlinks=False):
        here = Path(directory)
        # A link to a directory is reported by os.walk as a directory: list it as an entry.
        names = [*names, *(name for name in subdirectories if (here / name).is_symlink())]
        for name in names:
            path = here / name
            found[path.relative_to(root).as_posix()] = path
    return dict(sorted(found.items()))


def _regular(path: Path) -> bool:
    return stat.S_ISREG(os.lstat(path).st_mode)


def build_manifest(root: Path) -> Manifest:
    """The manifest of every file under ``root``; refuses links and special files, since a
    manifest of them would not say what a later reader gets."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    files = {}
    for relative, path in _walk(root).items():
        if not _regular(path):
            raise IntegrityError(relative, "not a regular file", "symbolic link or special file")
        files[relative] = hash_file(path)
    if not files:
        raise IntegrityError(".", "missing", f"no files under {root}")
    return Manifest(files)


def verify(root: Path, manifest: Manifest) -> None:
    """Return only if ``root`` holds exactly the files of ``manifest``, byte for byte; raise
    ``IntegrityError`` naming the first file that is missing, differs or is extra.

    Names and sizes are checked before anything is hashed, so a missing, truncated, padded or
    extra file is named without reading a byte."""
    root = Path(root)
    present = _walk(root) if root.is_dir() else {}
    for relative, expected in manifest.files.items():
        path = present.get(relative)
        if path is None:
            raise IntegrityError(relative, "missing")
        if not _regular(path):
            raise IntegrityError(relative, "not a regular file", "symbolic link or special file")
        size = os.lstat(path).st_size
        if size != expected.size:
            raise IntegrityError(relative, "size differs", f"{size} bytes, manifest says {expected.size}")
    if extra := [relative for relative in present if relative not in manifest.files]:
        raise IntegrityError(extra[0], "extra", "not in the manifest")
    for relative, expected in manifest.files.items():
        actual = hash_file(present[relative])
        if actual != expected:
            raise IntegrityError(
                relative,
                "content differs",
                f"sha256 {actual.sha256[:SHORT_DIGEST_LENGTH]}…, manifest says {expected.sha256[:SHORT_DIGEST_LENGTH]}…",
            )
