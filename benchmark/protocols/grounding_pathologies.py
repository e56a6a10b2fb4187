"""Grounding scored per pathology, as CheXlocalize scores it (``queries: pathologies``).

One query per (image, pathology) whose radiologists' mask is non-empty; negatives are skipped, which is what
CheXlocalize's ``true_pos_only`` evaluation keeps (rajpurkarlab/cheXlocalize eval.py:29-33, :208-209).

* Threshold (``threshold_search: per_pathology``): for each pathology, the value of ``threshold_values`` with the
  highest mIoU over its validation queries, the lowest on ties (tune_heatmap_threshold.py:53-66: the grid
  ``np.arange(0.2, .8, .1)``, ``mious.index(max(mious))``), applied to min-max normalised maps with a strict
  ``>`` (heatmap_to_segmentation.py:50-53, :86).
* ``miou_<pathology>`` / ``hit_rate_<pathology>``: the mean of :func:`~vlpbench.metrics.grounding.true_positive_iou`
  (finite values) / :func:`~vlpbench.metrics.grounding.hit` over that pathology's test queries; ``miou`` and
  ``hit_rate`` are their unweighted mean over the pathologies that have test queries (vlpbench's one-number
  summary; CheXlocalize reports per pathology). CIs resample images with replacement, all pathologies of an
  image together, as eval.py:112-130 does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics.bootstrap import bootstrap_ci
from vlpbench.metrics.grounding import true_positive_iou
from vlpbench.protocols.labels import class_slug

SCORES = ("tp_iou", "hit")
SUMMARIES = {"miou": "tp_iou", "hit_rate": "hit"}


def check_values(values: Any) -> list[float]:
    """``threshold_values`` as floats in [0, 1), ascending as given.

    Raises:
        ConfigError: not a non-empty list of numbers in [0, 1).
    """
    if not isinstance(values, list) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in values):
        raise ConfigError(f"grounding option threshold_values={values!r}: expected a non-empty list of numbers "
                          "in [0, 1) (min-max normalised maps)")
    return [float(v) for v in values]


def prompt(config: Mapping[str, Any], pathology: str) -> str:
    """The task's prompt for ``pathology`` (``prompts`` in the task file).

    Raises:
        ConfigError: the task names no prompt for it.
    """
    prompts = config.get("prompts")
    text = prompts.get(pathology) if isinstance(prompts, Mapping) else None
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"grounding option prompts: no prompt for pathology {pathology!r}; expected "
                          "prompts: {<pathology>: <text>} for every pathology of the dataset")
    return text


def select_thresholds(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], values: Sequence[float]) -> dict[str, Any]:
    """Per pathology, the value of ``values`` maximising mIoU over its ``(pathology, heat map, truth)`` pairs.

    Returns ``{"threshold": {pathology: value}, "val_miou": {pathology: mIoU}, "candidates": len(values)}``; a
    pathology whose IoU is undefined at every value (every map constant) gets the first value and a NaN-free
    ``val_miou`` of None.

    Raises:
        DataError: no pairs.
    """
    ious: dict[str, list[list[float]]] = {}
    for pathology, heat, truth in pairs:
        ious.setdefault(pathology, []).append([true_positive_iou(heat, truth, t) for t in values])
    if not ious:
        raise DataError("threshold_search=per_pathology: no validation query to choose thresholds on")
    chosen, best = {}, {}
    for pathology, rows in ious.items():
        table = np.array(rows)
        finite = np.isfinite(table)
        counts = finite.sum(axis=0)
        means = np.where(counts > 0, np.where(finite, table, 0.0).sum(axis=0) / np.maximum(counts, 1), -np.inf)
        index = int(np.argmax(means))  # the first of equal means: the lowest value, as list.index(max(...))
        chosen[pathology] = float(values[index])
        best[pathology] = float(means[index]) if np.isfinite(means[index]) else None
    return {"threshold": chosen, "val_miou": best, "candidates": len(values)}


def summarize(scores: Mapping[str, np.ndarray], pathologies: Sequence[str], images: Sequence[str], *,
              n_resamples: int, seed: int) -> tuple[dict[str, float | None], dict[str, dict]]:
    """``miou``, ``hit_rate`` and their ``_<pathology slug>`` values over test queries (module docstring), and
    their bootstrap CIs (images resampled, all pathologies of an image together).

    ``scores`` holds :data:`SCORES` per query; ``pathologies`` and ``images`` name each query's pathology and image.
    """
    names = list(dict.fromkeys(pathologies))
    rows = {image: k for k, image in enumerate(dict.fromkeys(images))}
    metrics: dict[str, float | None] = {}
    ci: dict[str, dict] = {}
    for summary, score in SUMMARIES.items():
        # image x pathology, NaN where the image has no query of that pathology (or the IoU is undefined).
        table = np.full((len(rows), len(names)), np.nan)
        for value, pathology, image in zip(scores[score], pathologies, images):
            table[rows[image], names.index(pathology)] = value

        def columns(indices: np.ndarray, table: np.ndarray = table) -> np.ndarray:
            picked = table[indices]
            finite = np.isfinite(picked)
            counts = finite.sum(axis=0)
            return np.where(counts > 0, np.where(finite, picked, 0.0).sum(axis=0) / np.maximum(counts, 1), np.nan)

        means = columns(np.arange(len(rows)))
        for k, pathology in enumerate(names):
            name = f"{summary}_{class_slug(pathology)}"
            metrics[name] = float(means[k]) if np.isfinite(means[k]) else None
            if metrics[name] is not None:
                ci[name] = bootstrap_ci(lambda idx, k=k: columns(idx)[k], len(rows), n_resamples=n_resamples,
                                        seed=seed)
        defined = np.isfinite(means)
        metrics[summary] = float(means[defined].mean()) if defined.any() else None
        if metrics[summary] is not None:
            ci[summary] = bootstrap_ci(lambda idx: float(np.nanmean(columns(idx))), len(rows),
                                       n_resamples=n_resamples, seed=seed)
    return metrics, ci
