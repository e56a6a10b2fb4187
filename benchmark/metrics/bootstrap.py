"""Percentile bootstrap confidence intervals over test images.

The unit of resampling is the image (never the pixel or the box): a resample draws ``n`` image
indices with replacement and recomputes the statistic on them. Mean-type metrics pass their per-image
scores and are resampled in vectorised chunks; non-decomposable metrics (AUROC, mAP) pass a callable
that recomputes the metric from a vector of indices.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterator

import numpy as np

from vlpbench.errors import ConfigError, DataError

# Index-matrix entries per chunk: 2**21 int64 indices plus the gathered float64 values are ~32 MB.
_CHUNK_ENTRIES = 1 << 21


def _index_chunks(n: int, n_resamples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Resample index matrices of shape (rows, n), ``n_resamples`` rows in all.

    Both forms of :func:`bootstrap_ci` draw through this, with a chunk size that depends on ``n``
    only, so the same seed gives the same resamples whichever form is used.
    """
    rows = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, n, size=(min(rows, n_resamples - start), n))


def bootstrap_ci(values_or_statistic: np.ndarray | Callable[[np.ndarray], float], n: int | None = None, *,
                 n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Percentile bootstrap CI of a test metric, resampling images with replacement.

    Two forms:

    * ``bootstrap_ci(scores)``: ``scores`` is a 1-D array with one value per image and the statistic
      is their mean (Dice, accuracy).
    * ``bootstrap_ci(statistic, n)``: ``statistic(indices)`` returns the metric computed on the images
      at ``indices`` (an int array of length ``n``, with repeats), for metrics that are not a mean of
      per-image values (AUROC, mAP). A resample on which the statistic is undefined, signalled by a
      non-finite return value or a ``ValueError`` (e.g. AUROC of a resample holding a single class),
      is skipped and counted in ``"skipped"``; the interval then comes from the remaining resamples,
      i.e. it is conditional on the metric being defined. Warnings raised inside resamples are
      silenced (a degenerate resample would otherwise warn hundreds of times); the statistic is
      first evaluated once on the original sample, where errors and warnings are not caught.

    Args:
        values_or_statistic: per-image values, or the statistic callable.
        n: number of images; required with a callable, must be omitted (or equal ``len(values)``)
            with values.
        n_resamples: number of bootstrap resamples.
        level: confidence level of the two-sided interval.
        seed: seed of the ``numpy.random.Generator`` that draws the resamples; the result is a
            deterministic function of the inputs and the seed.

    Returns:
        ``{"method": "percentile_bootstrap", "unit": "image", "n_resamples", "level", "low", "high",
        "seed", "skipped"}``; ``low`` and ``high`` are the ``(1 - level) / 2`` and ``(1 + level) / 2``
        quantiles (linear interpolation) of the resampled statistics.

    Raises:
        ConfigError: ``n_resamples < 1``, ``level`` outside (0, 1), or ``n`` missing / inconsistent.
        DataError: no images, a non-finite per-image value, or the statistic undefined on every
            resample.

    Example:
        >>> ci = bootstrap_ci(np.array([0.2, 0.4, 0.9, 0.7, 0.5]), n_resamples=200, seed=1)
        >>> ci["low"] < 0.54 < ci["high"], ci["skipped"]
        (True, 0)
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ConfigError(f"bootstrap: n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"bootstrap: level must lie strictly between 0 and 1, got {level!r}")
    rng = np.random.default_rng(seed)

    if callable(values_or_statistic):
        if n is None:
            raise ConfigError("bootstrap: a statistic callable needs n, the number of images")
        if n < 1:
            raise DataError("bootstrap: no images to resample (n = 0)")
        statistics, skipped = _resample_statistic(values_or_statistic, int(n), n_resamples, rng)
    else:
        values = np.asarray(values_or_statistic, dtype=np.float64)
        if values.ndim != 1:
            raise DataError(f"bootstrap: per-image values must be 1-D, got shape {values.shape}")
        if n is not None and n != values.size:
            raise ConfigError(f"bootstrap: n={n} but {values.size} per-image values were given")
        if values.size == 0:
            raise DataError("bootstrap: no images to resample (empty value array)")
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise DataError(f"bootstrap: per-image value {bad} is {values[bad]}; every value must be finite")
        statistics = np.concatenate([values[idx].mean(axis=1)
                                     for idx in _index_chunks(values.size, n_resamples, rng)])
        skipped = 0

    tail = (1.0 - level) / 2.0
    low, high = np.percentile(statistics, [100.0 * tail, 100.0 * (1.0 - tail)])
    return {"method": "percentile_bootstrap", "unit": "image", "n_resamples": int(n_resamples),
            "level": float(level), "low": float(low), "high": float(high), "seed": int(seed),
            "skipped": skipped}


def _resample_statistic(statistic: Callable[[np.ndarray], float], n: int, n_resamples: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The statistic on every resample where it is defined, and the number of skipped resamples."""
    # On the full sample a failure is a bug or an undefined metric, not bad luck: let it surface.
    if not math.isfinite(float(statistic(np.arange(n)))):
        raise DataError("bootstrap: the statistic is not finite on the original sample, so it has no CI")
    statistics: list[float] = []
    last_error: ValueError | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for chunk in _index_chunks(n, n_resamples, rng):
            for idx in chunk:
                try:
                    value = float(statistic(idx))
                except ValueError as error:
                    last_error = error
                    continue
                if math.isfinite(value):
                    statistics.append(value)
    if not statistics:
        reason = f"; last error: {last_error}" if last_error is not None else ""
        raise DataError(f"bootstrap: the statistic was undefined on all {n_resamples} resamples{reason}")
    return np.asarray(statistics), n_resamples - len(statistics)


def weighted_mean(values: np.ndarray) -> Callable[[np.ndarray], float]:
    """``weights -> `` the weighted mean of ``values`` over the items where it is finite (NaN where their
    weights sum to 0): a per-item mean metric on any weighting of the items (a resample's counts, an
    indicator of a subset). NaN marks an item the metric does not count (a CNR that is undefined)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    clean = np.where(finite, values, 0.0)

    def statistic(weights: np.ndarray) -> float:
        weights = np.asarray(weights, dtype=np.float64)
        total = float(weights @ finite)
        return float(weights @ clean) / total if total > 0 else math.nan

    return statistic
