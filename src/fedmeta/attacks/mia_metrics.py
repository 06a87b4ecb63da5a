"""The numbers a privacy researcher compares membership-inference attacks by, with bootstrap CIs.

Every attack of fedmeta gives one score per candidate (higher means "member"); a trial pairs one
member with one non-member scored on the same observation. From the scores of ``n`` trials:

- ``auc``: area under the ROC curve (scikit-learn's ``roc_curve``; ties count 1/2);
- ``tpr_at_fpr``: the highest true-positive rate of a threshold whose false-positive rate is at
  most the target (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022,
  argue for TPR at 0.1% and 1% FPR). With fewer than 1 / FPR non-members only thresholds with no
  false positive qualify, so TPR at 0.1% FPR on 200 trials is the TPR at zero false positives;
- ``balanced_accuracy``: the threshold is chosen on *other* trials (two folds by trial parity,
  each scored with the threshold of highest balanced accuracy on the other fold), so it is an
  accuracy an attacker could get, not one fitted to the data it is scored on.

Confidence intervals are percentile bootstraps over trials (Efron and Tibshirani, 1993): trials
are resampled with replacement, member and non-member of a trial together, and every metric is
recomputed on each resample (counts enter ``roc_curve`` as sample weights). For the balanced
accuracy the two thresholds stay the ones fitted on the full folds: its interval covers the
sampling of the scored trials, not the choice of the thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import auc as trapezoid_auc
from sklearn.metrics import roc_curve

FPRS = (0.001, 0.01)
"""The false-positive rates at which the TPR is reported."""


@dataclass(frozen=True)
class Interval:
    value: float
    low: float  # 2.5% bootstrap percentile
    high: float  # 97.5% bootstrap percentile


def _curve(members: np.ndarray, nonmembers: np.ndarray, weights: np.ndarray | None = None):
    """``roc_curve`` of members (label 1) against non-members (label 0); ``weights`` per trial."""
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    w = None if weights is None else np.r_[weights, weights]
    return roc_curve(labels, np.r_[members, nonmembers], sample_weight=w, drop_intermediate=False)


def _curve_metrics(fpr: np.ndarray, tpr: np.ndarray, fprs: tuple[float, ...]) -> list[float]:
    """[AUC, TPR at each of ``fprs``] read off one ROC curve."""
    tolerance = 1e-12  # FPRs are ratios of counts: 1/1000 computed as 0.0010000000000000002
    return [float(trapezoid_auc(fpr, tpr))] + [float(tpr[fpr <= f + tolerance].max()) for f in fprs]


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(member score > non-member score) + P(tie) / 2."""
    return _curve_metrics(*_curve(members, nonmembers)[:2], ())[0]


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """The highest TPR of "member iff score >= t" over thresholds t with FPR <= ``fpr``."""
    return _curve_metrics(*_curve(members, nonmembers)[:2], (fpr,))[1]


def fit_threshold(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """The threshold of highest balanced accuracy of "member iff score >= t" (Youden's J; ties go to
    the highest score), moved half-way down to the next lower score so that it does not sit on a
    fitted example."""
    fpr, tpr, thresholds = _curve(members, nonmembers)
    # J is a multiple of 1 / (members x non-members): rounding merges ties that round-off split
    # (0.2 against 0.20000000000000007), so the first, highest threshold wins them as documented
    best = int(np.argmax(np.round(tpr - fpr, 12)))
    return float(thresholds[best] if best + 1 == len(thresholds) else (thresholds[best] + thresholds[best + 1]) / 2)


def _correct(members: np.ndarray, nonmembers: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per trial: the mean of "member called member" and "non-member called non-member"."""
    return 0.5 * ((members >= thresholds).astype(float) + (nonmembers < thresholds).astype(float))


def fold_thresholds(members: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
    """Per trial, the threshold fitted on the trials of the other parity (at least 2 trials)."""
    if len(members) < 2:
        raise ValueError("a threshold chosen on separate trials needs at least 2 trials")
    parity = np.arange(len(members)) % 2
    fitted = [fit_threshold(members[parity != p], nonmembers[parity != p]) for p in (0, 1)]
    return np.where(parity == 0, fitted[0], fitted[1])


def balanced_accuracy(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Balanced accuracy with each trial's threshold chosen on the other trials (two folds)."""
    return float(_correct(members, nonmembers, fold_thresholds(members, nonmembers)).mean())


def summarize(
    members: np.ndarray, nonmembers: np.ndarray, *, resamples: int, seed: int, fprs: tuple[float, ...] = FPRS
) -> dict[str, Interval]:
    """AUC, balanced accuracy and TPR at each of ``fprs``, each with a 95% bootstrap interval.

    ``members[i]`` and ``nonmembers[i]`` are the scores of trial i; ``resamples`` bootstrap
    resamples of the trials are drawn from ``numpy.random.default_rng(seed)``.
    """
    members, nonmembers = np.asarray(members, dtype=float), np.asarray(nonmembers, dtype=float)
    n = len(members)
    correct = _correct(members, nonmembers, fold_thresholds(members, nonmembers))
    point = _curve_metrics(*_curve(members, nonmembers)[:2], fprs) + [float(correct.mean())]
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)
    draws = np.array([_curve_metrics(*_curve(members, nonmembers, w)[:2], fprs) + [float(w @ correct) / n]
                      for w in counts])
    names = ["auc", *(f"tpr_at_{100 * f:g}pct_fpr" for f in fprs), "balanced_accuracy"]
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    return {name: Interval(v, float(lo), float(hi)) for name, v, lo, hi in zip(names, point, low, high)}
