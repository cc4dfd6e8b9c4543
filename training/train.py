"""One training job, stage by stage: data → cross-validation → fit → evaluation → MLflow run →
integrity record → registry → gate → promotion. Each stage prints what it does and how long it
took."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import NamedTuple

import httpx
import joblib
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

import model
from model import verified
from model.identity import (
    DATASET_HASH,
    HELD_OUT_ARTIFACT,
    PRODUCTION_STAGE,
    REFERENCE_SAMPLE_ARTIFACT,
    REGISTERED_MODEL_NAME,
    TEST_ROC_AUC_TAG,
    THRESHOLD_METRIC,
    TRAINING_CONFIG_TAG,
)
from model.integrity import MANIFEST_ARTIFACT, MANIFEST_DIGEST_TAG, build_manifest
from model.pyfunc import (
    PIPELINE_ARTIFACT,
    THRESHOLD_CONFIG,
    CreditRiskModel,
    model_signature,
)
from model.schema import TARGET
from training import evaluation, gate, registry
from training import profile as reference_profile
from training.data import TrainingData, load_training_data
from training.gate import GateDecision
from training.importance import permutation_importances
from training.pipeline import build_pipeline
from training.settings import TrainingParameters, TrainingSettings
from training.split import RULE as SPLIT_RULE
from training.split import ContentSplit

# Exact versions of what the model needs at load time, read from this (locked) environment.
_MODEL_REQUIREMENTS = ("mlflow", "scikit-learn", "pandas", "numpy", "joblib", "cloudpickle")


@dataclass(frozen=True)
class TrainingResult:
    run_id: str | None
    run_url: str | None
    model_version: str
    stage: str
    promoted: bool
    reason: str
    skipped: bool = False


@contextmanager
def _environment(**values: str):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _quiet_mlflow():
    """Silence MLflow's advice about choices made here on purpose (a pickled PythonModel, a
    local file as dataset source, an int target column),
    so that the progress lines stay readable (the run URL is in our summary). Anything else shows."""
    mlflow_logger = logging.getLogger("mlflow.pyfunc")
    level = mlflow_logger.level
    with warnings.catch_warnings(), _environment(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true"):
        for message in ("The specified dataset source", "Hint: Inferred schema contains integer column"):
            warnings.filterwarnings("ignore", message=f".*{re.escape(message)}")
        mlflow_logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            mlflow_logger.setLevel(level)


@contextmanager
def stage(description: str):
    print(f"→ {description} ...", flush=True)
    started = time.perf_counter()
    yield
    print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)


def _run_url(run, ui_url: str | None) -> str | None:
    route = f"experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return registry.ui_url(ui_url or mlflow.get_tracking_uri(), route)


def _fit_and_score(pipeline, x_fit, y_fit, x_score):
    """A fresh fit of ``pipeline``: its probabilities on ``x_score``, or the fitted pipeline."""
    fitted = clone(pipeline).fit(x_fit, y_fit)
    return fitted if x_score is None else fitted.predict_proba(x_score)[:, 1]


def _fit_and_cross_validate(pipeline, features, target, folds: int, seed: int, jobs: int, final: bool):
    """Out-of-fold probabilities, each fold's ROC AUC and (``final``) the pipeline fitted on
    all rows: independent fits run side by side in ``jobs`` processes. Each fit is the same
    computation whichever process runs it, so the models do not depend on ``jobs``."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_rows = list(splitter.split(features, target))
    tasks = [delayed(_fit_and_score)(pipeline, features, target, None)] if final else []
    tasks += [
        delayed(_fit_and_score)(pipeline, features.iloc[fit], target.iloc[fit], features.iloc[valid])
        for fit, valid in fold_rows
    ]
    results = Parallel(n_jobs=min(jobs, len(tasks)))(tasks)
    fitted = results.pop(0) if final else None
    out_of_fold = np.empty(len(target))
    fold_scores = []
    for (_, valid), probability in zip(fold_rows, results, strict=True):
        out_of_fold[valid] = probability
        fold_scores.append(roc_auc_score(target.iloc[valid], probability))
    return fitted, out_of_fold, fold_scores


def _cross_validate(pipeline, features, target, folds: int, seed: int, jobs: int = 1):
    """Out-of-fold probabilities on the training split and the ROC AUC of each fold."""
    _, out_of_fold, fold_scores = _fit_and_cross_validate(
        pipeline, features, target, folds, seed, jobs, False
    )
    return out_of_fold, fold_scores


def _log_dataset(data: TrainingData) -> None:
    fingerprint = data.fingerprint
    mlflow.log_params(
        {
            DATASET_HASH: fingerprint.sha256,
            "dataset_rows": fingerprint.rows,
            "dataset_columns": fingerprint.columns,
            "dataset_path": str(data.path),
        }
    )
    mlflow.set_tag(DATASET_HASH, fingerprint.sha256)
    frame = data.features.assign(**{TARGET: data.target})
    # MLflow's dataset table keeps at most 36 characters of digest; the full hash is the tag.
    dataset = mlflow.data.from_pandas(
        frame,
        source=str(data.path.resolve()),
        targets=TARGET,
        name=data.path.name,
        digest=fingerprint.sha256[:32],
    )
    mlflow.log_input(dataset, context="training")


def _log_figures(y_test, probability, importance: pd.DataFrame) -> None:
    figures = evaluation.evaluation_figures(y_test, probability)
    figures["feature_importance.png"] = evaluation.importance_figure(importance)
    for file_name, figure in figures.items():
        mlflow.log_figure(figure, f"plots/{file_name}")
        plt.close(figure)
    mlflow.log_dict(importance.to_dict(orient="records"), "feature_importance.json")


def _log_reference_sample(features: pd.DataFrame, target: pd.Series, rows: int, seed: int):
    """A sample of training rows, kept with the run, that drift checks compare traffic to."""
    sample = features.assign(**{TARGET: target})
    if len(sample) > rows:
        sample = sample.sample(n=rows, random_state=seed)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / Path(REFERENCE_SAMPLE_ARTIFACT).name
        sample.to_parquet(path)
        mlflow.log_artifact(str(path), str(Path(REFERENCE_SAMPLE_ARTIFACT).parent))


def _log_model(pipeline, threshold: float, data: TrainingData, example: pd.DataFrame):
    with tempfile.TemporaryDirectory() as directory:
        pipeline_path = Path(directory) / "pipeline.joblib"
        joblib.dump(pipeline, pipeline_path)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=CreditRiskModel(),
            artifacts={PIPELINE_ARTIFACT: str(pipeline_path)},
            model_config={THRESHOLD_CONFIG: threshold},
            code_paths=[str(Path(model.__file__).parent)],
            signature=model_signature(),
            input_example=example,
            metadata={DATASET_HASH: data.fingerprint.sha256},
            pip_requirements=[f"{name}=={installed_version(name)}" for name in _MODEL_REQUIREMENTS],
        )


def record_integrity(client: MlflowClient, run_id: str, model_id: str) -> str:
    """Write run ``run_id``'s integrity record of its logged model ``model_id``: the manifest of
    the model's files as stored and of the run's held-out rows (``model.integrity``), laid out
    and downloaded exactly as ``model.verified`` will check them, logged as the run's
    ``integrity/manifest.json``, and its digest as the run's ``integrity.manifest_sha256`` tag.
    Returns the digest.

    The files are hashed as the store holds them, not as they were on this disk, so whatever
    MLflow wrote on upload is what the manifest says. The run is the record because only
    identities that may write to the training experiment (trainer, admin) can change its
    artifacts and tags; a version tag could be changed by the operator."""
    location = client.get_logged_model(model_id).artifact_location
    with tempfile.TemporaryDirectory() as directory:
        manifest = build_manifest(verified.download(client, location, run_id, Path(directory) / "version"))
    client.log_text(run_id, manifest.to_json(), MANIFEST_ARTIFACT)
    client.set_tag(run_id, MANIFEST_DIGEST_TAG, manifest.digest)
    print(
        f"  {len(manifest.files)} files, {manifest.total_bytes / 1e6:.1f} MB; manifest sha256 "
        f"{manifest.digest} (run tag {MANIFEST_DIGEST_TAG})"
    )
    return manifest.digest


def _already_registered(
    client: MlflowClient, data: TrainingData, parameters: TrainingParameters
) -> TrainingResult | None:
    existing = registry.versions_trained_on(client, data.fingerprint.sha256, parameters.config_hash())
    if not existing:
        return None
    newest = max(existing, key=lambda v: int(v.version))
    reason = (
        f"version {newest.version} was already trained on these exact bytes with this "
        "configuration; nothing to do (pass --retrain to train again)"
    )
    return TrainingResult(None, None, newest.version, newest.current_stage, False, reason, skipped=True)


def check_tracking_server(wait_s: float = 0, uri: str | None = None) -> None:
    """Wait up to ``wait_s`` for the tracking server (``uri``, default MLflow's current one),
    then fail with a clear message (MLflow's client would retry for minutes before saying
    anything)."""
    uri = (uri or mlflow.get_tracking_uri()).rstrip("/")
    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            httpx.get(f"{uri}/health", timeout=10).raise_for_status()
            return
        except httpx.HTTPError as error:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"MLflow tracking server at {uri} is not reachable ({error}); start it or set "
                    "MLFLOW_TRACKING_URI"
                ) from error
            time.sleep(1)


def train(settings: TrainingSettings, parameters: TrainingParameters | None = None) -> TrainingResult:
    """One training job: ``settings`` from the environment (and flags), ``parameters`` from
    the flags (default: the defaults)."""
    # One OpenMP thread in this process: the fits run in worker processes of their own, and
    # what is left here (predicting held-out rows, the gate) is what serving does with one
    # thread. With two, every predict crawled whenever anything else held the other core
    # (the gate took 52 s instead of 11 s in a measured run).
    with _quiet_mlflow(), threadpool_limits(1, user_api="openmp"):
        return _train(settings, parameters or TrainingParameters())


class Split(NamedTuple):
    x_train: pd.DataFrame
    x_test: pd.DataFrame
    y_train: pd.Series
    y_test: pd.Series
    rule: ContentSplit


def _split(data: TrainingData, parameters: TrainingParameters) -> Split:
    share = parameters.test_size
    with stage(f"Splitting {1 - share:.0%}/{share:.0%} by row content ({SPLIT_RULE})"):
        rule = ContentSplit.of(data.features, data.target, share)
        held = rule.evaluation
        return Split(data.features[~held], data.features[held], data.target[~held], data.target[held], rule)


def _log_parameters(parameters: TrainingParameters, split: Split) -> None:
    mlflow.set_tag(TRAINING_CONFIG_TAG, parameters.config_hash())
    mlflow.set_tags(split.rule.tags())
    mlflow.log_params(
        {
            "seed": parameters.seed,
            "test_size": parameters.test_size,
            "cv_folds": parameters.cv_folds,
            "train_rows": len(split.y_train),
            "test_rows": len(split.y_test),
            **{f"classifier.{k}": v for k, v in parameters.classifier.items()},
        }
    )


def _fit_and_choose_threshold(pipeline, split: Split, parameters: TrainingParameters, jobs: int):
    """Cross-validate on the training split beside the final fit; the threshold is the
    out-of-fold best F1. Returns the fitted pipeline and the threshold."""
    with stage(
        f"Cross-validating on the training split ({parameters.cv_folds} folds) and fitting the final "
        f"model on {len(split.y_train)} rows, {jobs} parallel job(s)"
    ):
        fitted, out_of_fold, fold_scores = _fit_and_cross_validate(
            pipeline,
            split.x_train,
            split.y_train,
            parameters.cv_folds,
            parameters.seed,
            jobs,
            True,
        )
        threshold = evaluation.f1_optimal_threshold(split.y_train.to_numpy(), out_of_fold)
    mean, std = float(np.mean(fold_scores)), float(np.std(fold_scores))
    mlflow.log_metrics({"cv_roc_auc_mean": mean, "cv_roc_auc_std": std, THRESHOLD_METRIC: threshold})
    print(f"  CV ROC AUC {mean:.4f} ± {std:.4f}; threshold {threshold:.4f} (best F1 out of fold)")
    return fitted, threshold


def _log_reference_profile(pipeline, split: Split, threshold: float, data: TrainingData) -> None:
    """The version's reference profile for monitoring (issue 19): the full training split's
    feature distributions and the fitted pipeline's probabilities on it (in-sample: what the
    model was fitted to reproduce, the population its scores will drift from), logged under
    ``monitoring/`` in ``training.profile``'s two files. Monitoring reads it back and needs
    no training data at run time."""
    with stage(f"Profiling the {len(split.y_train)} training rows for monitoring"):
        probability = pipeline.predict_proba(split.x_train)[:, 1]
        profile = reference_profile.build_profile(
            split.x_train,
            probability,
            threshold,
            provenance={DATASET_HASH: data.fingerprint.sha256, "split": split.rule.tags()},
        )
        with tempfile.TemporaryDirectory() as directory:
            for path in profile.save(Path(directory)):
                mlflow.log_artifact(str(path), reference_profile.ARTIFACT_DIR)


class Evaluated(NamedTuple):
    metrics: dict[str, float]
    probability: np.ndarray  # the fitted pipeline's predict_proba on the held-out rows


def _log_held_out(split: Split, probability: np.ndarray) -> None:
    """The held-out rows and the model's answers, kept with the run (what the gate checks)."""
    frame = split.x_test.assign(**{TARGET: split.y_test, "probability": probability})
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / Path(HELD_OUT_ARTIFACT).name
        frame.to_parquet(path)
        mlflow.log_artifact(str(path), str(Path(HELD_OUT_ARTIFACT).parent))


def _evaluate(
    pipeline, split: Split, threshold: float, parameters: TrainingParameters, jobs: int
) -> Evaluated:
    """Held-out metrics, plots, feature importance and the drift reference, all logged."""
    with stage(f"Evaluating on {len(split.y_test)} held-out rows"):
        probability = pipeline.predict_proba(split.x_test)[:, 1]
        metrics = evaluation.classification_metrics(split.y_test.to_numpy(), probability, threshold)
        mlflow.log_metrics({f"test_{name}": value for name, value in metrics.items()})
        result = permutation_importances(
            pipeline, split.x_test, split.y_test, repeats=5, seed=parameters.seed, jobs=jobs
        )
        importance = pd.DataFrame(
            {
                "feature": list(split.x_test.columns),
                "importance_mean": result.importances_mean,
                "importance_std": result.importances_std,
            }
        ).sort_values("importance_mean", ascending=False)
        _log_figures(split.y_test.to_numpy(), probability, importance)
        _log_reference_sample(split.x_train, split.y_train, parameters.reference_rows, parameters.seed)
        _log_held_out(split, probability)
    print(
        f"  test ROC AUC {metrics['roc_auc']:.4f}, PR AUC {metrics['pr_auc']:.4f}, "
        f"KS {metrics['ks']:.4f}, F1 {metrics['f1']:.4f}"
    )
    return Evaluated(metrics, probability)


def _register(
    client, model_info, run_id: str, data: TrainingData, parameters: TrainingParameters, split: Split, metrics
) -> ModelVersion:
    with stage(f"Registering as {REGISTERED_MODEL_NAME}"):
        return registry.register(
            client,
            model_info,
            run_id,
            tags={
                DATASET_HASH: data.fingerprint.sha256,
                TRAINING_CONFIG_TAG: parameters.config_hash(),
                TEST_ROC_AUC_TAG: f"{metrics['roc_auc']:.6f}",
                **split.rule.tags(),
            },
            description=f"Trained on {data.path.name} (sha256 {data.fingerprint.sha256}), "
            f"test ROC AUC {metrics['roc_auc']:.4f}",
        )


def _gate(
    client,
    version: ModelVersion,
    run_id: str,
    split: Split,
    evaluated: Evaluated,
    parameters: TrainingParameters,
    actor: str,
) -> GateDecision:
    with stage("Gate: the candidate as served, then Production, on held-out rows neither trained on"):
        held_out = gate.HeldOut(
            split.x_test, split.y_test, split.rule.evaluation_digests, evaluated.probability
        )
        decision = gate.run(
            client,
            version.version,
            run_id,
            held_out,
            actor=actor,
            tolerance=parameters.gate_tolerance,
            force=parameters.force_promote,
        )
    print(f"  {'promoted' if decision.promote else 'NOT promoted'}: {decision.reason}")
    if decision.comparable is False:
        print("  gate.comparable=false: Production's score on these rows would say nothing fair")
    return decision


@dataclass(frozen=True)
class CandidateRun:
    """How a candidate's run is named and tagged when its caller gates it (healing)."""

    run_name: str
    tags: dict[str, str]


@dataclass(frozen=True)
class Candidate:
    """A version trained and registered like any other, not yet gated: its caller gates it."""

    run_id: str
    run_url: str | None
    version: ModelVersion
    held_out: gate.HeldOut  # its held-out rows and the probabilities training computed
    metrics: dict[str, float]  # held-out metrics (``roc_auc``, ...)
    dataset_hash: str


def train_candidate(
    settings: TrainingSettings, parameters: TrainingParameters, run: CandidateRun
) -> Candidate:
    """Train on ``settings.data`` and register the version exactly as ``train`` does (same
    stages, same records), in a run named and tagged as ``run`` says, but without the gate:
    nothing is promoted here. The healing flow gates the candidate out of time
    (``training.gate.challenge``) and promotes it by its policy. Always trains (a challenger
    file is new bytes; the caller's cooldown keeps attempts apart)."""
    with _quiet_mlflow(), threadpool_limits(1, user_api="openmp"):
        return _train(settings, parameters, run)


def _train(
    settings: TrainingSettings, parameters: TrainingParameters, candidate: CandidateRun | None = None
) -> TrainingResult | Candidate:
    # The file first: a bad one is refused before anything reaches MLflow, server or not.
    with stage(f"Reading and checking {settings.data}"):
        data = load_training_data(settings.data)
    fingerprint = data.fingerprint
    print(f"  {fingerprint.rows} rows, {fingerprint.columns} columns, sha256 {fingerprint.sha256}")
    check_tracking_server(settings.mlflow_wait_s)
    client = MlflowClient()
    if (
        candidate is None
        and not settings.retrain
        and (skipped := _already_registered(client, data, parameters))
    ):
        return skipped

    split = _split(data, parameters)
    pipeline = build_pipeline(parameters.classifier, parameters.seed)
    mlflow.set_experiment(experiment_id=registry.model_training_experiment(client, settings.experiment))
    run_name, run_tags = (
        (candidate.run_name, candidate.tags) if candidate else (f"train-{fingerprint.sha256[:8]}", None)
    )
    with mlflow.start_run(run_name=run_name, tags=run_tags) as run:
        _log_dataset(data)
        _log_parameters(parameters, split)
        pipeline, threshold = _fit_and_choose_threshold(pipeline, split, parameters, settings.train_jobs)
        _log_reference_profile(pipeline, split, threshold, data)
        evaluated = _evaluate(pipeline, split, threshold, parameters, settings.train_jobs)
        with stage("Logging the model"):
            model_info = _log_model(pipeline, threshold, data, split.x_train.head(5))
        with stage("Recording the digests of the model's stored files and held-out rows"):
            digest = record_integrity(client, run.info.run_id, model_info.model_id)

    run_id = run.info.run_id
    version = _register(client, model_info, run_id, data, parameters, split, evaluated.metrics)
    # A copy for people and `status`; checks trust the run's tag (see record_integrity).
    registry.tag_version(client, version.version, {MANIFEST_DIGEST_TAG: digest})
    if candidate is not None:  # gated by the caller
        held_out = gate.HeldOut(
            split.x_test, split.y_test, split.rule.evaluation_digests, evaluated.probability
        )
        url = _run_url(run, settings.mlflow_ui_url)
        return Candidate(run_id, url, version, held_out, evaluated.metrics, fingerprint.sha256)
    decision = _gate(client, version, run_id, split, evaluated, parameters, settings.actor)
    stage_name = PRODUCTION_STAGE if decision.promote else version.current_stage
    return TrainingResult(
        run_id,
        _run_url(run, settings.mlflow_ui_url),
        version.version,
        stage_name,
        decision.promote,
        decision.reason,
    )


def summary(result: TrainingResult) -> str:
    lines = [f"model:   {REGISTERED_MODEL_NAME} version {result.model_version} (stage {result.stage})"]
    if result.run_url:
        lines.insert(0, f"run:     {result.run_url}")
    lines.append(f"outcome: {result.reason}")
    return "\n".join(lines)
