"""Per-image scores of a grounding heat map ``H`` against a binary ground-truth mask ``G`` of the same size.

Heat maps are "higher = more likely there" and need not be probabilities. The thresholded metrics compare
``P = H > threshold`` (strictly greater) with ``G``:

* :func:`pointing_game`: 1 when ``G`` contains an argmax pixel of ``H``, else 0. Where several pixels tie
  for the maximum, *any* of them inside ``G`` is a hit, as in MedKLIP's RSNA grounding code (its maps are
  14×14 attention repeated 16×16, so the maximum is always a tied block). Consequence: a constant map is
  a hit on every image; protocols report how many maps were constant.
* :func:`recall`: ``|P ∩ G| / |G|``, the share of ground-truth pixels inside the thresholded map. G2D's
  Table 2a reports a "Recall" that no released code defines; pixel recall is this package's
  interpretation of it, and the pointing game (MedKLIP's third score) is reported beside it.
* :func:`iou`: ``|P ∩ G| / |P ∪ G|``; 1 when both are empty.
* :func:`dice`: ``2 |P ∩ G| / (|P| + |G|)``; 1 when both are empty (as :mod:`vlpbench.metrics.dice`).
* :func:`cnr`: BioViL's contrast-to-noise ratio (no threshold), see its docstring.

CheXlocalize (Saporta et al., Nat. Mach. Intell. 2022) defines two scores differently, so they are separate:

* :func:`hit`: 1 when ``G`` holds the *first* argmax pixel of ``H`` in row-major order (``np.argmax``), no
  credit for other tied maxima (rajpurkarlab/cheXlocalize eval.py:202-207).
* :func:`true_positive_iou`: the IoU, NaN unless both ``P`` and ``G`` are non-empty (eval.py:29-33,
  ``true_pos_only``); means skip the NaNs (tune_heatmap_threshold.py:49, ``np.nanmean``).

The pointing game and recall are undefined for an empty ground truth and raise :class:`DataError`:
grounding is scored on positive images only, as MedKLIP and BioViL do.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from vlpbench.errors import DataError

METRIC_NAMES = ("pointing_game", "recall", "iou", "dice", "cnr")


def _pair(heatmap: Any, truth: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``heatmap`` as a finite 2-D float array and ``truth`` as a boolean array of the same shape."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    truth = np.asarray(truth) > 0
    if heatmap.ndim != 2:
        raise DataError(f"{name}: the heat map must be 2-D (H, W), got shape {heatmap.shape}")
    if heatmap.shape != truth.shape:
        raise DataError(f"{name}: heat map shape {heatmap.shape} differs from ground-truth shape {truth.shape}")
    if not np.isfinite(heatmap).all():
        raise DataError(f"{name}: the heat map holds NaN or infinite values")
    return heatmap, truth


def _require_positive(truth: np.ndarray, name: str) -> None:
    if not truth.any():
        raise DataError(f"{name} is undefined for an empty ground truth; score positive images only")


def pointing_game(heatmap: Any, truth: Any) -> float:
    """1.0 if ``truth`` contains a pixel where ``heatmap`` takes its maximum (any of tied maxima), else 0.0.

    Raises:
        DataError: shapes differ, the map is not finite, or ``truth`` is empty.

    Example:
        >>> pointing_game([[0.1, 0.9], [0.9, 0.2]], [[0, 0], [1, 0]])
        1.0
    """
    heatmap, truth = _pair(heatmap, truth, "pointing_game")
    _require_positive(truth, "pointing_game")
    return float(truth[heatmap == heatmap.max()].any())


def _counts(heatmap: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """``(|P ∩ G|, |P|, |G|)`` for ``P = heatmap > threshold``."""
    predicted = heatmap > threshold
    return (int(np.count_nonzero(predicted & truth)), int(np.count_nonzero(predicted)),
            int(np.count_nonzero(truth)))


def recall(heatmap: Any, truth: Any, threshold: float) -> float:
    """Pixel recall ``|P ∩ G| / |G|`` of ``P = heatmap > threshold``.

    Raises:
        DataError: shapes differ, the map is not finite, or ``truth`` is empty.
    """
    heatmap, truth = _pair(heatmap, truth, "recall")
    _require_positive(truth, "recall")
    hit, _, size = _counts(heatmap, truth, threshold)
    return hit / size


def iou(heatmap: Any, truth: Any, threshold: float) -> float:
    """``|P ∩ G| / |P ∪ G|`` of ``P = heatmap > threshold``; 1.0 when both are empty.

    Raises:
        DataError: shapes differ or the map is not finite.
    """
    hit, predicted, size = _counts(*_pair(heatmap, truth, "iou"), threshold)
    union = predicted + size - hit
    return hit / union if union else 1.0


def dice(heatmap: Any, truth: Any, threshold: float) -> float:
    """``2 |P ∩ G| / (|P| + |G|)`` of ``P = heatmap > threshold``; 1.0 when both are empty.

    Raises:
        DataError: shapes differ or the map is not finite.
    """
    hit, predicted, size = _counts(*_pair(heatmap, truth, "dice"), threshold)
    return 2.0 * hit / (predicted + size) if predicted + size else 1.0


def cnr(heatmap: Any, truth: Any) -> float:
    """BioViL's contrast-to-noise ratio ``|μ_in − μ_out| / sqrt(σ²_in + σ²_out)``; NaN where undefined.

    ``in`` and ``out`` are the heat-map pixels inside and outside ``truth`` (BioViL: the interior and
    exterior of the phrase's boxes; Boecking et al., ECCV 2022, MS-CXR phrase grounding). The variances are
    population variances (ddof 0), and the denominator is the root of their *sum*, not a pooled standard
    deviation over the image. Microsoft's ``hi-ml-multimodal`` (``health_multimodal``) ships BioViL's
    similarity maps but no CNR code, so the paper's formula is the reference. The ratio is unchanged by any
    positive affine rescaling of the map (``a·H + b``, ``a > 0``), so min-max scaling to [0, 1] or to
    [−1, 1] first gives the same value.

    Returns NaN where the ratio is undefined: ``truth`` empty or covering the whole map, or a map that is
    constant inside and constant outside (zero noise). Callers average the finite values.

    Raises:
        DataError: shapes differ or the map is not finite.
    """
    heatmap, truth = _pair(heatmap, truth, "cnr")
    inside, outside = heatmap[truth], heatmap[~truth]
    if inside.size == 0 or outside.size == 0:
        return math.nan
    noise = math.sqrt(inside.var() + outside.var())
    if noise == 0.0:
        return math.nan
    return abs(inside.mean() - outside.mean()) / noise


def hit(heatmap: Any, truth: Any) -> float:
    """1.0 if ``truth`` holds the first maximum of ``heatmap`` in row-major order, else 0.0 (CheXlocalize's hit).

    Raises:
        DataError: shapes differ, the map is not finite, or ``truth`` is empty.
    """
    heatmap, truth = _pair(heatmap, truth, "hit")
    _require_positive(truth, "hit")
    return float(truth.flat[int(np.argmax(heatmap))])


def true_positive_iou(heatmap: Any, truth: Any, threshold: float) -> float:
    """``|P ∩ G| / |P ∪ G|`` of ``P = heatmap > threshold``; NaN when ``P`` or ``G`` is empty (CheXlocalize).

    Raises:
        DataError: shapes differ or the map is not finite.
    """
    hit_count, predicted, size = _counts(*_pair(heatmap, truth, "true_positive_iou"), threshold)
    if predicted == 0 or size == 0:
        return math.nan
    return hit_count / (predicted + size - hit_count)


def grounding_scores(heatmap: Any, truth: Any, threshold: float) -> dict[str, float]:
    """All of :data:`METRIC_NAMES` for one heat map and one non-empty ground truth.

    Raises:
        DataError: shapes differ, the map is not finite, or ``truth`` is empty.
    """
    heatmap, truth = _pair(heatmap, truth, "grounding_scores")
    _require_positive(truth, "grounding")
    hit, predicted, size = _counts(heatmap, truth, threshold)
    return {
        "pointing_game": float(truth[heatmap == heatmap.max()].any()),
        "recall": hit / size,
        "iou": hit / (predicted + size - hit),
        "dice": 2.0 * hit / (predicted + size),
        "cnr": cnr(heatmap, truth),
    }


def dice_curve(heatmap: Any, truth: Any, thresholds: np.ndarray) -> np.ndarray:
    """Dice of ``heatmap > t`` against ``truth`` for every ``t`` in ``thresholds`` (1-D), in one sort.

    Equal to :func:`dice` at each threshold; used to search a threshold over many candidates at once.
    """
    heatmap, truth = _pair(heatmap, truth, "dice_curve")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    values = np.sort(heatmap, axis=None)
    inside = np.sort(heatmap[truth])
    # Pixels strictly above t: everything right of t's rightmost insertion point.
    predicted = values.size - np.searchsorted(values, thresholds, side="right")
    hit = inside.size - np.searchsorted(inside, thresholds, side="right")
    denominator = predicted + inside.size
    return np.divide(2.0 * hit, denominator, out=np.ones(thresholds.shape), where=denominator > 0)


def candidate_thresholds(values: np.ndarray, steps: int) -> np.ndarray:
    """The distinct quantiles ``k / steps`` (k = 0..steps) of ``values``, ascending."""
    if steps < 1:
        raise DataError(f"threshold search needs at least 1 quantile step, got {steps}")
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise DataError("threshold search: no heat-map values to take quantiles of")
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, steps + 1)))


def choose_threshold(pairs: Iterable[tuple[Any, Any]], thresholds: np.ndarray) -> tuple[float, float]:
    """The threshold maximising mean Dice over ``(heatmap, truth)`` pairs, and that mean Dice.

    Among thresholds with equal mean Dice the lowest wins.

    Raises:
        DataError: no pairs, or a pair as :func:`dice_curve` rejects.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    total = np.zeros(thresholds.shape)
    count = 0
    for heatmap, truth in pairs:
        total += dice_curve(heatmap, truth, thresholds)
        count += 1
    if count == 0:
        raise DataError("threshold search: no heat maps with a non-empty ground truth to choose a threshold on")
    best = int(np.argmax(total))
    return float(thresholds[best]), float(total[best] / count)
