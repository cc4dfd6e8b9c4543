"""Scoring a model on held-out rows: the metrics, the decision threshold and the plots."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import (
    PrecisionRecallDisplay,
    RocCurveDisplay,
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)


def ks_statistic(y_true: np.ndarray, probability: np.ndarray) -> float:
    """Kolmogorov-Smirnov separation between the score distributions of the two classes."""
    false_positive_rate, true_positive_rate, _ = roc_curve(y_true, probability)
    return float(np.max(true_positive_rate - false_positive_rate))


def f1_optimal_threshold(y_true: np.ndarray, probability: np.ndarray) -> float:
    """The probability cut-off with the best F1 on the given (out-of-fold) predictions."""
    precision, recall, thresholds = precision_recall_curve(y_true, probability)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    # The last precision/recall pair has no threshold.
    return float(thresholds[int(np.argmax(f1[:-1]))])


def classification_metrics(y_true: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = (probability >= threshold).astype(int)
    return {
        "roc_auc": float(roc_auc_score(y_true, probability)),
        "pr_auc": float(average_precision_score(y_true, probability)),
        "brier": float(brier_score_loss(y_true, probability)),
        "log_loss": float(log_loss(y_true, probability, labels=[0, 1])),
        "ks": ks_statistic(y_true, probability),
        "precision": float(precision_score(y_true, predicted, zero_division=0)),
        "recall": float(recall_score(y_true, predicted, zero_division=0)),
        "f1": float(f1_score(y_true, predicted, zero_division=0)),
        "positive_rate": float(predicted.mean()),
    }


def evaluation_figures(y_true: np.ndarray, probability: np.ndarray) -> dict[str, plt.Figure]:
    """ROC, precision-recall and calibration curves, keyed by artifact file name."""
    figures = {}
    for file_name, draw in (
        ("roc_curve.png", RocCurveDisplay.from_predictions),
        ("precision_recall_curve.png", PrecisionRecallDisplay.from_predictions),
    ):
        figure, axes = plt.subplots(figsize=(6, 5))
        draw(y_true, probability, ax=axes, name="held-out")
        figures[file_name] = figure
    figure, axes = plt.subplots(figsize=(6, 5))
    CalibrationDisplay.from_predictions(
        y_true, probability, n_bins=15, strategy="quantile", ax=axes, name="held-out"
    )
    figures["calibration_curve.png"] = figure
    return figures


def importance_figure(importance: pd.DataFrame) -> plt.Figure:
    """Horizontal bars of permutation importance (mean drop in ROC AUC, with std)."""
    ordered = importance.sort_values("importance_mean")
    figure, axes = plt.subplots(figsize=(8, 5))
    axes.barh(ordered["feature"], ordered["importance_mean"], xerr=ordered["importance_std"])
    axes.set_xlabel("mean decrease in ROC AUC when shuffled (held-out rows)")
    axes.set_title("Permutation feature importance")
    figure.tight_layout()
    return figure
