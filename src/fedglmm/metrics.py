"""Prediction metrics for binary outcomes: ROC curve, AUC, and classification rates with Wilson intervals.

``auc`` is the trapezoid area under the ROC curve built on distinct score thresholds; tied scores are one
step of the curve (a diagonal segment), so the area equals the Mann-Whitney U / (n1 * n0) with ties
counted as one half.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["roc_curve", "auc", "wilson", "classification_metrics"]


def _binary(y, score=None):
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError("y must be one-dimensional")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must contain only 0 and 1")
    y = y.astype(np.int64)
    if score is None:
        return y
    score = np.asarray(score, dtype=float)
    if score.shape != y.shape:
        raise ValueError(f"y and score differ in shape: {y.shape} vs {score.shape}")
    if np.isnan(score).any():
        raise ValueError("score contains NaN")
    return y, score


def roc_curve(y, score):
    """ROC curve: ``(fpr, tpr, thresholds)``, one point per distinct score plus the origin.

    Point k classifies ``score >= thresholds[k]`` as positive; thresholds decrease, starting at +inf
    (nothing positive, the point (0, 0)) and ending at the smallest score (everything positive, (1, 1)).
    Needs both classes present.
    """
    y, score = _binary(y, score)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        raise ValueError("roc_curve needs at least one positive and one negative")
    order = np.argsort(-score, kind="mergesort")
    s, yy = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each run of tied scores
    tp = np.cumsum(yy)[last]
    fp = (last + 1) - tp
    fpr = np.r_[0.0, fp / n0]
    tpr = np.r_[0.0, tp / n1]
    thresholds = np.r_[np.inf, s[last]]
    return fpr, tpr, thresholds


def auc(y, score) -> float:
    """Area under the ROC curve (trapezoid rule; ties count one half)."""
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def wilson(k, n, level: float = 0.95) -> tuple[float, float]:
    """Wilson (1927) score interval for a binomial proportion k / n; ``(nan, nan)`` when n = 0.

    centre = (p + z^2/2n) / (1 + z^2/n),  half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
    """
    if not 0 < level < 1:
        raise ValueError("level must lie in (0, 1)")
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    z = stats.norm.ppf(0.5 + level / 2.0)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def classification_metrics(y, prob, threshold: float = 0.5, level: float = 0.95) -> dict:
    """Confusion counts and rates of the rule ``prob >= threshold``.

    Returns counts ``tp, fp, tn, fn, n`` and, for ``accuracy``, ``precision``, ``recall`` (= sensitivity;
    ``sensitivity`` is also given) and ``specificity``, the estimate and a Wilson interval under
    ``"<name>_ci"`` as ``(lo, hi)``. A rate with an empty denominator is NaN with interval (NaN, NaN).
    """
    y, prob = _binary(y, prob)
    pred = prob >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    tn = int(np.sum(~pred & ~pos))
    fn = int(np.sum(~pred & pos))
    out: dict = {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": int(y.size), "threshold": threshold,
                 "level": level}
    for name, k, m in (("accuracy", tp + tn, y.size), ("precision", tp, tp + fp),
                       ("recall", tp, tp + fn), ("specificity", tn, tn + fp)):
        out[name] = k / m if m else float("nan")
        out[name + "_ci"] = wilson(k, m, level)
    out["sensitivity"], out["sensitivity_ci"] = out["recall"], out["recall_ci"]
    return out
