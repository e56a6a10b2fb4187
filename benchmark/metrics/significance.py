"""Paired tests of the difference between two models scored on the same test items.

Three tools, each a function of plain arrays or of metric statistics:

* :func:`paired_bootstrap` / :func:`paired_bootstrap_means`: the paired bootstrap of the metric difference
  ``δ = metric(A) − metric(B)``. Every resample draws ``n`` test items with replacement (the resamples of
  :func:`vlpbench.metrics.bootstrap.bootstrap_ci`, same seed → same resamples) and recomputes *both*
  models' metric on it, so the item-to-item variation common to both cancels. The CI of ``δ`` is the
  percentile interval of the resampled differences ``δ*``. The two-sided p-value reads the bootstrap
  distribution centred on the null: ``p = (1 + #{|δ* − δ̂| ≥ |δ̂|}) / (B + 1)`` over the
  ``B`` resamples where both metrics are defined (a difference within 1e-10 of the bound counts, so
  float rounding cannot split exact ties). Centring ``δ*`` at ``δ̂`` turns it into the
  distribution of ``δ`` under H0 (no difference) — the "translated" bootstrap test of Efron & Tibshirani,
  *An Introduction to the Bootstrap* (1993), ch. 16 — and the ``+1`` in numerator and denominator is the
  Monte-Carlo p-value of Davison & Hinkley, *Bootstrap Methods and their Application* (1997), §4.2, which
  never reports 0. Identical predictions give ``δ* = 0`` on every resample, so ``p = 1`` and the CI is
  [0, 0]; the smallest p-value is ``1 / (B + 1)``. The CI and the p-value are two readings of the same
  resamples (the percentile interval is not the inversion of the centred test): near the boundary a CI
  can just exclude 0 while p is just above α. Decisions (``*`` marks) follow the p-value.
* :func:`delong`: DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more
  correlated receiver operating characteristic curves: a nonparametric approach", Biometrics 44:837-845,
  for two AUCs of one set of labels, computed by the O(n log n) midrank algorithm of Sun & Xu (2014),
  "Fast implementation of DeLong's algorithm for comparing the areas under correlated receiver
  operating characteristic curves", IEEE Signal Processing Letters 21(11):1389-1393. Its z-statistic is
  referred to the standard normal; the CI is ``δ ± z_{1−α/2} · se`` (a normal approximation: with few
  test items near AUC 0 or 1 it can reach past ±1). Ties count ½, as scikit-learn's AUC.
* :func:`holm`: Holm's (1979) step-down adjustment of a family of p-values ("A simple sequentially
  rejective multiple test procedure", Scand. J. Statist. 6:65-70), which controls the family-wise error
  rate without assuming independence.

These tests measure test-set sampling variation only (which images happen to be in the test set); a
model's variation over training seeds is not in them.
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from vlpbench.errors import ConfigError, DataError
# The resample draws of bootstrap_ci, so a paired bootstrap and a CI with one seed see the same resamples.
from vlpbench.metrics.bootstrap import _index_chunks

PAIRED_BOOTSTRAP = "paired bootstrap"
_TIE = 1e-10
DELONG = "DeLong"

Statistic = Callable[[np.ndarray], float]  # weights (resample counts) of the test items -> metric (NaN: undefined)


def _check(n_resamples: int, level: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ConfigError(f"paired bootstrap: n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"paired bootstrap: level must lie strictly between 0 and 1, got {level!r}")


def resample_counts(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Count matrices (rows, n), ``n_resamples`` rows in all: how often each item is drawn per resample.

    The resamples are those of :func:`~vlpbench.metrics.bootstrap.bootstrap_ci` with the same seed.
    """
    for idx in _index_chunks(n, n_resamples, np.random.default_rng(seed)):
        rows = idx.shape[0]
        flat = (np.arange(rows)[:, None] * n + idx).ravel()
        yield np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _summary(observed: float, differences: np.ndarray, n_resamples: int, level: float, seed: int,
             n: int) -> dict[str, Any]:
    """CI, p-value and bookkeeping of the resampled differences (see the module docstring)."""
    if differences.size == 0:
        raise DataError(f"paired bootstrap: the difference was undefined on all {n_resamples} resamples")
    tail = (1.0 - level) / 2.0
    low, high = np.percentile(differences, [100.0 * tail, 100.0 * (1.0 - tail)])
    # A resample exactly as far out counts as extreme; _TIE absorbs the rounding of differences that are
    # equal in exact arithmetic (AUCs and accuracies are ratios of small integers, so such ties are common).
    extreme = int(np.count_nonzero(np.abs(differences - observed) >= abs(observed) - _TIE * max(1.0, abs(observed))))
    return {"method": PAIRED_BOOTSTRAP, "diff": float(observed), "low": float(low), "high": float(high),
            "p_value": (1 + extreme) / (differences.size + 1), "level": float(level), "n": int(n),
            "n_resamples": int(n_resamples), "skipped": int(n_resamples - differences.size), "seed": int(seed)}


def paired_bootstrap(statistic_a: Statistic, statistic_b: Statistic, n: int, *, n_resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of ``statistic_a − statistic_b`` over ``n`` test items (module docstring).

    Each statistic maps a weight vector (how often each item is in the resample) to the metric; a NaN
    return or a ``ValueError`` means undefined on that resample (e.g. an AUC without a positive), and the
    resample is skipped for both and counted in ``skipped``.

    Returns:
        ``{"method", "diff", "low", "high", "p_value", "level", "n", "n_resamples", "skipped", "seed"}``.

    Raises:
        ConfigError: bad ``n_resamples`` or ``level``.
        DataError: no items, a statistic undefined on the full sample, or the difference undefined on
            every resample.
    """
    _check(n_resamples, level)
    if n < 1:
        raise DataError("paired bootstrap: no test items")
    full = np.ones(n)
    observed = float(statistic_a(full)) - float(statistic_b(full))
    if not math.isfinite(observed):
        raise DataError("paired bootstrap: a metric is undefined on the full test set, so it has no difference")
    differences = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples would warn hundreds of times
        for counts in resample_counts(n, n_resamples, seed):
            for weights in counts:
                try:
                    value = float(statistic_a(weights)) - float(statistic_b(weights))
                except ValueError:
                    continue
                if math.isfinite(value):
                    differences.append(value)
    return _summary(observed, np.asarray(differences), n_resamples, level, seed, n)


def _weighted_means(counts: np.ndarray, values: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """Per resample (row of ``counts``), the weighted mean of ``values`` over the counted items (NaN: none)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ np.where(counted, values, 0.0)) / (counts @ counted.astype(np.float64))


def paired_bootstrap_means(values_a: np.ndarray, values_b: np.ndarray, *, n_resamples: int = 2000,
                           level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of the difference of two per-item means (Dice, accuracy, ...), vectorised.

    ``values_a`` / ``values_b``: one value per test item, NaN where the item does not count for that
    model's mean (e.g. a CNR that is undefined); each mean is over the counted items of the resample.
    Where every value is finite the differences are those of the per-item differences' means, computed
    as :func:`~vlpbench.metrics.bootstrap.bootstrap_ci` computes a mean (the same resamples, the same sums).

    Returns and raises as :func:`paired_bootstrap` (a ValueError-free, NaN-skipping version of it).
    """
    _check(n_resamples, level)
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise DataError(f"paired bootstrap: per-item values must be two 1-D arrays of one length, got shapes "
                        f"{a.shape} and {b.shape}")
    if a.size == 0:
        raise DataError("paired bootstrap: no test items")
    counted_a, counted_b = np.isfinite(a), np.isfinite(b)
    if not counted_a.any() or not counted_b.any():
        raise DataError("paired bootstrap: a model has no item where its per-item value is defined")
    observed = float(a[counted_a].mean() - b[counted_b].mean())
    rng = np.random.default_rng(seed)
    if counted_a.all() and counted_b.all():
        gains = a - b
        differences = np.concatenate([gains[idx].mean(axis=1) for idx in _index_chunks(a.size, n_resamples, rng)])
    else:
        differences = np.concatenate([_weighted_means(c, a, counted_a) - _weighted_means(c, b, counted_b)
                                      for c in resample_counts(a.size, n_resamples, seed)])
        differences = differences[np.isfinite(differences)]
    return _summary(observed, differences, n_resamples, level, seed, a.size)


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the mean of their ranks, in O(n log n)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def _structural_components(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's V10 (per positive) and V01 (per negative) by midranks (Sun & Xu 2014)."""
    m, n = positives.size, negatives.size
    combined = midranks(np.concatenate([positives, negatives]))
    within_pos, within_neg = midranks(positives), midranks(negatives)
    v10 = (combined[:m] - within_pos) / n
    v01 = 1.0 - (combined[m:] - within_neg) / m
    return float(v10.mean()), v10, v01


def delong(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, *, level: float = 0.95) -> dict[str, Any]:
    """DeLong's test of two correlated AUCs of binary ``labels`` (module docstring).

    Returns:
        ``{"method": "DeLong", "auc_a", "auc_b", "diff", "se", "z", "p_value", "low", "high", "level", "n",
        "n_positive"}``: ``diff = auc_a − auc_b``, ``se`` its standard error from the structural
        components' covariances ``S10 / m + S01 / n``; a zero ``se`` gives ``p = 1`` when the AUCs are equal
        and ``p = 0`` otherwise.

    Raises:
        DataError: shapes differ, a value is not finite, or a class is missing (no AUC).
        ConfigError: ``level`` outside (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"DeLong: level must lie strictly between 0 and 1, got {level!r}")
    y = np.asarray(labels)
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if y.ndim != 1 or a.shape != y.shape or b.shape != y.shape:
        raise DataError(f"DeLong: labels {y.shape} and scores {a.shape}, {b.shape} must be 1-D of one length")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("DeLong: scores must be finite")
    positive = y.astype(bool)
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise DataError(f"DeLong: needs at least two positives and two negatives, got {m} and {n}")
    auc_a, v10_a, v01_a = _structural_components(a[positive], a[~positive])
    auc_b, v10_b, v01_b = _structural_components(b[positive], b[~positive])
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    covariance = s10 / m + s01 / n
    variance = max(float(covariance[0, 0] + covariance[1, 1] - 2.0 * covariance[0, 1]), 0.0)
    diff = auc_a - auc_b
    se = math.sqrt(variance)
    if se > 0.0:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2.0))
    else:
        z = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
        p = 1.0 if diff == 0.0 else 0.0
    half = NormalDist().inv_cdf(0.5 + level / 2.0) * se
    return {"method": DELONG, "auc_a": auc_a, "auc_b": auc_b, "diff": diff, "se": se, "z": z, "p_value": p,
            "low": diff - half, "high": diff + half, "level": float(level), "n": int(y.size), "n_positive": m}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the ``i``-th smallest of ``m`` is multiplied by
    ``m − i + 1`` (``i`` from 1), made non-decreasing in that order and capped at 1. Reject where the
    adjusted value is at most α.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise DataError(f"holm: expected p-values in [0, 1], got {list(p_values)!r}")
    order = np.argsort(p, kind="mergesort")
    m = p.size
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return adjusted.tolist()
