"""A registered version loaded only if it is what training recorded, and only if it answers as
training logged it: the one way serving, ``credit-risk promote``/``rollback`` and the gate load
a version.

``load_version(name, version)``, in this order:

1. the version and its run (``model.identity``'s registry names);
2. the run must be in the **training experiment** (``MLFLOW_EXPERIMENT_NAME``, default
   ``credit-risk-training``), compared by id: only ``trainer`` and ``admin`` can write runs
   there, while the operator may register a version from any run it can read;
3. the run's ``integrity.manifest_sha256`` tag (``model.integrity``) is its **integrity
   record**; a run without one was trained before digests were recorded and is refused, unless
   ``CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS`` lists that version number;
4. the manifest stored with the run must hash to that tag and cover the model's ``MLmodel`` and
   the held-out rows;
5. the version's files are downloaded from its storage location
   (``get_model_version_download_uri``, never ``models:/``, whose client adds a file of its
   own) with the run's held-out rows, into a fresh private folder laid out as
   ``model.integrity`` says (``download``, which training's record uses too);
6. ``model.integrity.verify``: the folder holds exactly the recorded files, byte for byte;
7. ``model.scoring.load`` of that same folder;
8. the **answers check**: the held-out rows are scored as serving scores them
   (``model.scoring.served_probabilities``: in flat-forest slices and in one batch) and every
   probability must be the one training logged, bit for bit.

Invariants:

- Nothing of the version is unpickled or imported before step 6 has passed; the folder that
  is loaded is the folder that was verified (created with ``mkdtemp``, readable by this user
  only).
- A check that fails raises ``VersionRefused`` with ``reason`` ``integrity`` (steps 2 to 6: the
  message names the file that is changed, missing or extra) or ``answers`` (step 8: how many
  rows differ and the largest difference). Anything else (MLflow unreachable, a file that
  cannot be unpickled) propagates as it is: a failure to load, not a refusal.
- The current code scores every version. A version trained with code that answers otherwise
  is refused by step 8, never served silently with other answers: retrain it, or run the image
  it was trained with. A version whose logged code differs from the running ``model/`` but
  answers the same is loaded, and says so: ``VerifiedVersion.code_differs`` names the files,
  and ``description`` (logs, readiness, ``credit-risk status``, promote) carries them.
- ``VerifiedVersion.close`` removes the folder and the ``sys.path`` entry MLflow's loader added
  for the version's logged code; serving keeps the folder while it serves the version.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model import scoring
from model.forest import MAX_ROWS as FLAT_FOREST_MAX_ROWS
from model.identity import ENV_PREFIX, HELD_OUT_ARTIFACT, TRAINING_EXPERIMENT, TRAINING_EXPERIMENT_VARIABLE
from model.integrity import (
    MANIFEST_ARTIFACT,
    MANIFEST_DIGEST_TAG,
    MODEL_DIR,
    RUN_DIR,
    IntegrityError,
    Manifest,
    ManifestError,
    recorded_manifest,
    verify,
)
from model.schema import FEATURES

logger = logging.getLogger(__name__)

UNVERIFIED_VARIABLE = "CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS"

# Why a version was refused: its files or record (``integrity``), or its answers (``answers``).
INTEGRITY, ANSWERS = "integrity", "answers"
PROBABILITY_COLUMN = "probability"  # the held-out rows' logged answers (training's _log_held_out)
# What every manifest must cover: the model, and the rows its answers are checked on.
REQUIRED_FILES = (f"{MODEL_DIR}/MLmodel", f"{RUN_DIR}/{HELD_OUT_ARTIFACT}")


class VerificationSettings(BaseSettings):
    """Where trusted runs live, and which versions without an integrity record may load anyway.
    Serving, the operator's commands and the gate read the same variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, populate_by_name=True, frozen=True)

    training_experiment: str = Field(
        TRAINING_EXPERIMENT,
        min_length=1,
        validation_alias=TRAINING_EXPERIMENT_VARIABLE,
        description="the training experiment: a version loads only if its run is there",
    )
    allow_unverified_versions: str = Field(
        "",
        validation_alias=UNVERIFIED_VARIABLE,
        description="registry versions (comma-separated) trained before integrity records, to "
        "load without checking their files; empty by default. Their answers are still checked",
    )

    @field_validator("allow_unverified_versions")
    @classmethod
    def _version_numbers(cls, value: str) -> str:
        numbers = [part.strip() for part in value.split(",") if part.strip()]
        if not all(number.isdigit() and int(number) > 0 for number in numbers):
            raise ValueError("must be registry version numbers separated by commas, such as 3,5")
        return ",".join(str(int(number)) for number in numbers)

    def allows_unverified(self, version: str) -> bool:
        return str(version) in self.allow_unverified_versions.split(",")


class VersionRefused(Exception):
    """A version that must not be served; ``reason`` is ``integrity`` or ``answers``."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"refused ({reason}): {message}")


@dataclass(frozen=True)
class Answers:
    """What the answers check scored: the version's logged held-out rows and its answers to
    them (equal, bit for bit, to the logged probabilities)."""

    rows: int
    probability: np.ndarray


@dataclass
class VerifiedVersion:
    """A version loaded from a verified folder (``manifest`` None: loaded unverified, as
    ``CREDIT_RISK_ALLOW_UNVERIFIED_VERSIONS`` allowed)."""

    name: str
    version: str
    run_id: str
    model: scoring.LoadedModel
    manifest: Manifest | None
    answers: Answers
    root: Path  # the private folder: ``checked/`` (the verified layout) and ``record/``
    seconds: dict[str, float] = field(default_factory=dict)
    # The files of ``model/`` where the version's logged code and the running code differ.
    code_differs: tuple[str, ...] = ()

    @property
    def folder(self) -> Path:
        return self.root / _CHECKED

    @property
    def description(self) -> str:
        """One line for logs, readiness and the operator's output."""
        if self.manifest is None:
            return (
                f"files NOT verified: version {self.version} has no integrity record and "
                f"{UNVERIFIED_VARIABLE} lists it; retrain it"
            )
        return (
            f"{len(self.manifest.files)} files match integrity record {self.manifest.short_digest}, "
            f"{self.answers.rows} held-out rows answered as logged at training{self.code_note}"
        )

    @property
    def code_note(self) -> str:
        """'' when the version's logged code is the running code, else a clause naming the files."""
        if not self.code_differs:
            return ""
        shown = ", ".join(self.code_differs[:5]) + (" ..." if len(self.code_differs) > 5 else "")
        return (
            f"; scored by this image's model/ code, which differs from the version's logged code in "
            f"{len(self.code_differs)} file(s): {shown}"
        )

    def close(self) -> None:
        """Forget the folder: remove it and the ``sys.path`` entry of its logged code."""
        _forget(self.root)


_CHECKED, _RECORD = "checked", "record"


def download(client: MlflowClient, model_location: str, run_id: str, destination: Path) -> Path:
    """The files of the logged model stored at ``model_location`` and the held-out rows of run
    ``run_id``, in ``model.integrity``'s layout under ``destination`` (created; must not
    exist). Training's record and the check read the same layout from here."""
    destination.mkdir(parents=True)
    staging = destination / ".download"
    staging.mkdir()
    # download_artifacts returns the local copy of the folder, named as in the store.
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=model_location, dst_path=str(staging), tracking_uri=client.tracking_uri
    )
    Path(local).rename(destination / MODEL_DIR)
    shutil.rmtree(staging)
    # Listed first, so that rows the run does not have are a file missing from the folder (which
    # the check names), not an error of the download.
    parent = str(Path(HELD_OUT_ARTIFACT).parent)
    if HELD_OUT_ARTIFACT in {entry.path for entry in client.list_artifacts(run_id, parent)}:
        mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=HELD_OUT_ARTIFACT,
            dst_path=str(destination / RUN_DIR / parent),
            tracking_uri=client.tracking_uri,
        )
    return destination


def _check_training_run(client: MlflowClient, run: Run, settings: VerificationSettings) -> None:
    name = settings.training_experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise VersionRefused(
            INTEGRITY,
            f"the training experiment {name!r} ({TRAINING_EXPERIMENT_VARIABLE}) does not exist at "
            f"{client.tracking_uri}, so no run can be trusted",
        )
    if run.info.experiment_id != experiment.experiment_id:
        raise VersionRefused(
            INTEGRITY,
            f"its run {run.info.run_id} is in experiment {run.info.experiment_id}, not in the training "
            f"experiment {name!r} ({experiment.experiment_id}, {TRAINING_EXPERIMENT_VARIABLE}), where only "
            "training can write",
        )


def _recorded(client: MlflowClient, run: Run, root: Path) -> Manifest:
    digest = run.data.tags[MANIFEST_DIGEST_TAG]
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path=MANIFEST_ARTIFACT,
        dst_path=str(root / _RECORD),
        tracking_uri=client.tracking_uri,
    )
    try:
        manifest = recorded_manifest(Path(local).read_bytes(), digest)
        manifest.require(REQUIRED_FILES)
    except ManifestError as error:
        raise VersionRefused(
            INTEGRITY, f"the integrity record of run {run.info.run_id} ({MANIFEST_ARTIFACT}): {error}"
        ) from error
    return manifest


def _differing(served: np.ndarray, logged: np.ndarray) -> np.ndarray:
    """Rows whose probabilities differ in any bit."""
    return np.ascontiguousarray(served).view(np.uint64) != np.ascontiguousarray(logged).view(np.uint64)


def check_answers(loaded: scoring.LoadedModel, held_out: pd.DataFrame) -> Answers:
    """Score ``held_out``'s features as serving does and require its logged ``probability``,
    bit for bit, from both of serving's evaluators; ``VersionRefused`` (``answers``) with the
    number of rows that differ and the largest difference otherwise."""
    missing = [name for name in (*FEATURES, PROBABILITY_COLUMN) if name not in held_out.columns]
    if missing or held_out.empty:
        found = f"lack the columns {missing}" if missing else "are empty"
        raise VersionRefused(ANSWERS, f"its logged held-out rows {found}: its answers cannot be checked")
    logged = held_out[PROBABILITY_COLUMN].to_numpy(dtype=np.float64)
    sliced, whole = scoring.served_probabilities(loaded, held_out[list(FEATURES)])
    in_slices, in_batch = _differing(sliced, logged), _differing(whole, logged)
    differ = in_slices | in_batch
    if differ.any():
        gaps = np.abs(np.concatenate([sliced[differ], whole[differ]]) - np.tile(logged[differ], 2))
        worst = float(np.max(np.where(np.isnan(gaps), np.inf, gaps)))
        where = (
            ""
            if np.array_equal(in_slices, in_batch)
            else f"; {int(in_slices.sum())} in {FLAT_FOREST_MAX_ROWS}-row slices, {int(in_batch.sum())} in one batch"
        )
        raise VersionRefused(
            ANSWERS,
            f"scored by this code it answers {int(differ.sum())} of {len(logged)} logged held-out rows "
            f"otherwise than at training (largest difference {worst:.3g}{where}): it was trained with "
            "code that answers differently; retrain it with this code, or serve it with the image it "
            "was trained with",
        )
    return Answers(len(logged), whole)


def load_version(
    name: str,
    version: str,
    *,
    client: MlflowClient | None = None,
    settings: VerificationSettings | None = None,
) -> VerifiedVersion:
    """Version ``version`` of registered model ``name``, checked as the module docstring says
    and loaded from its verified folder. The caller owns the result: ``close`` it when done."""
    client = client or MlflowClient()
    settings = settings or VerificationSettings()
    version = str(version)
    started = time.perf_counter()
    registered = client.get_model_version(name, version)
    run = client.get_run(registered.run_id)
    _check_training_run(client, run, settings)
    unverified = MANIFEST_DIGEST_TAG not in run.data.tags
    if unverified and not settings.allows_unverified(version):
        raise VersionRefused(
            INTEGRITY,
            f"no integrity record: its run {run.info.run_id} has no {MANIFEST_DIGEST_TAG} tag, so it "
            f"was trained before digests were recorded; retrain it (or, knowingly, list version "
            f"{version} in {UNVERIFIED_VARIABLE})",
        )
    root = Path(tempfile.mkdtemp(prefix=f"credit-risk-v{version}-"))
    try:
        return _load_into(root, client, registered.name, version, run, not unverified, started)
    except BaseException:
        _forget(root)
        raise


def _forget(root: Path) -> None:
    """Remove ``root`` and the ``sys.path`` entries under it (MLflow's loader prepends the
    logged code's folder and never takes it off)."""
    sys.path[:] = [entry for entry in sys.path if not Path(entry).is_relative_to(root)]
    shutil.rmtree(root, ignore_errors=True)


def _load_into(
    root: Path, client: MlflowClient, name: str, version: str, run: Run, recorded: bool, started: float
) -> VerifiedVersion:
    """Steps 4 to 8 of the module docstring, in the private folder ``root``."""
    manifest = _recorded(client, run, root) if recorded else None
    source = client.get_model_version_download_uri(name, version)
    folder = download(client, source, run.info.run_id, root / _CHECKED)
    seconds = {"download": time.perf_counter() - started}
    held_out = folder / RUN_DIR / HELD_OUT_ARTIFACT
    if manifest is None and not held_out.is_file():  # verified, it would be a missing file
        raise VersionRefused(
            ANSWERS, f"its run logged no held-out rows ({HELD_OUT_ARTIFACT}): its answers cannot be checked"
        )
    if manifest is None:
        logger.warning(
            f"{name} version {version}: loading WITHOUT checking its files: it has no integrity "
            f"record and {UNVERIFIED_VARIABLE} lists it; retrain it and take it off that list"
        )
    else:
        mark = time.perf_counter()
        try:
            verify(folder, manifest)
        except IntegrityError as error:
            raise VersionRefused(
                INTEGRITY,
                f"{error}: not the file training recorded (integrity record "
                f"{manifest.short_digest} of run {run.info.run_id})",
            ) from error
        seconds["verify"] = time.perf_counter() - mark
    mark = time.perf_counter()
    loaded = scoring.load(str(folder / MODEL_DIR))
    seconds["load"] = time.perf_counter() - mark
    mark = time.perf_counter()
    answers = check_answers(loaded, pd.read_parquet(held_out))
    seconds["answers"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    differs = code_differences(folder / MODEL_DIR / LOGGED_CODE_DIR, RUNNING_CODE)
    checked = VerifiedVersion(
        name, version, run.info.run_id, loaded, manifest, answers, root, seconds, differs
    )
    if differs:
        logger.warning(f"{name} version {version}{checked.code_note}")
    timings = ", ".join(f"{step} {value:.2f} s" for step, value in seconds.items())
    logger.info(f"{name} version {version}: {checked.description} ({timings})")
    return checked


# Where MLflow keeps a model's ``code_paths`` (training logs the ``model`` package there), and
# the package this process scores every version with.
LOGGED_CODE_DIR = "code/model"
RUNNING_CODE = Path(__file__).resolve().parent


def code_differences(logged: Path, running: Path) -> tuple[str, ...]:
    """The ``.py`` files (relative paths) that differ between the logged code ``logged`` and the
    running code ``running``, or exist in one only; every file when nothing was logged."""

    def sources(root: Path) -> dict[str, bytes]:
        return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*.py")}

    theirs, ours = sources(logged) if logged.is_dir() else {}, sources(running)
    return tuple(sorted(name for name in theirs.keys() | ours.keys() if theirs.get(name) != ours.get(name)))


@contextmanager
def verified_version(name: str, version: str, **options) -> Iterator[VerifiedVersion]:
    """``load_version`` for a check: the folder is removed when the block ends (the loaded
    model stays usable: everything it needs is in memory)."""
    checked = load_version(name, version, **options)
    try:
        yield checked
    finally:
        checked.close()
