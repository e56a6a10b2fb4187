"""Calibration of predicted probabilities: expected calibration error, Brier score, reliability bins.

A problem is a vector of confidences ``p`` in [0, 1] and of outcomes ``y`` in {0, 1}: for a binary or
multi-label task, one class's predicted probability of presence and its label; for a multi-class task,
the top-label confidence (the highest class probability) and whether that class is right
(:func:`top_label`). Every quantity takes optional sample weights ``w`` (default 1); integer weights
equal repeating items, so a bootstrap resample is scored without copying (see
:func:`vlpbench.metrics.classification.resample_weights`). ``W = sum(w)``.

* Equal-width ECE (Guo et al., 2017, "On calibration of modern neural networks", eq. 3): ``M`` bins
  ``B_m = (m/M, (m+1)/M]`` for ``m = 0 .. M-1`` (edges ``numpy.linspace(0, 1, M + 1)``; a bin holds its
  upper edge, and the first bin holds 0 too), and
  ``ECE = sum_m (W_m / W) |freq_m - conf_m| = (1/W) sum_m |sum_{i in B_m} w_i (y_i - p_i)|`` with
  ``W_m`` the weight in bin ``m``, ``conf_m`` its weighted mean confidence and ``freq_m`` its weighted
  outcome frequency. An empty bin has weight 0 and adds nothing.
* Equal-mass (adaptive) ECE (the bins of Nixon et al., 2019, "Measuring calibration in deep learning",
  ACE: each bin holds the same share of the predictions): sort the items by confidence and lay them on
  ``[0, W)`` end to end, each as long as its weight; bin ``m`` is ``[m W/M, (m+1) W/M)``, so every bin
  holds exactly ``W/M``. An item (or a run of tied confidences, which is spread evenly so that the order
  among ties does not matter) that straddles a bin edge counts in both bins in proportion to its overlap.
  ``ECE = (1/W) sum_m |sum of w (y - p) in bin m|``. Where ``M`` divides ``N`` and no tie straddles an
  edge, the bins are the usual ``N/M`` consecutive sorted items.
* Brier score (Brier, 1950): binary ``sum_i w_i (p_i - y_i)^2 / W`` (scikit-learn's
  ``brier_score_loss``); multi-class ``sum_i w_i sum_k (p_ik - [y_i = k])^2 / W``, in [0, 2] (Brier's
  original form, ``brier_score_loss`` with ``scale_by_half=False``).

:data:`N_BINS` = 15 bins for both binnings, the number Guo et al. (2017) report ECE with.
:class:`CalibrationProblem` does the sorting and binning once and scores any weights in O(N).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlpbench.errors import DataError

N_BINS = 15
BINNINGS = ("width", "mass")


def _vector(values, name: str, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise DataError(f"{name}: {what} must be 1-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{name}: {what} must be finite numbers (found NaN or infinity)")
    return array


def _problem(confidence, outcome, name: str) -> tuple[np.ndarray, np.ndarray]:
    p = _vector(confidence, name, "confidences")
    y = _vector(outcome, name, "outcomes")
    if p.shape != y.shape:
        raise DataError(f"{name}: {p.size} confidences for {y.size} outcomes")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise DataError(f"{name}: confidences must lie in [0, 1], found {p.min():g}..{p.max():g}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise DataError(f"{name}: outcomes must be 0 or 1, found {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    return p, y


def _weights(sample_weight, n: int, name: str) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n)
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
        raise DataError(f"{name}: sample_weight must be {n} finite non-negative numbers, got shape {w.shape}")
    return w


def width_bin_index(confidence: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """The equal-width bin of each confidence: ``m`` for ``p`` in ``(m/M, (m+1)/M]``, and 0 for ``p = 0``."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)


class CalibrationProblem:
    """Confidences and outcomes binned / sorted once; ECE, Brier and reliability bins of any weights."""

    def __init__(self, confidence, outcome, n_bins: int = N_BINS) -> None:
        """Raises DataError: shapes differ, a confidence outside [0, 1], an outcome not 0/1, ``n_bins < 1``."""
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise DataError(f"calibration: n_bins must be a positive integer, got {n_bins!r}")
        self.p, self.y = _problem(confidence, outcome, "calibration")
        self.n_bins = int(n_bins)
        self.residual = self.y - self.p
        self.bin = width_bin_index(self.p, self.n_bins)
        self.order = np.argsort(self.p, kind="stable")
        ranked = self.p[self.order]
        # Start of each run of tied confidences: a run is spread evenly over the mass it covers.
        self.starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]]) if ranked.size else np.array([], int)

    def _total(self, w: np.ndarray) -> float | None:
        total = float(w.sum())
        return total if total > 0 else None

    def ece(self, w: np.ndarray) -> float:
        """Equal-width ECE; NaN when the weights are all 0."""
        total = self._total(w)
        if total is None:
            return np.nan
        return float(np.abs(np.bincount(self.bin, weights=w * self.residual, minlength=self.n_bins)).sum() / total)

    def _mass_cumulative(self, w: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, float]:
        """At the M + 1 equal-mass edges, the weighted sum of ``values`` of the mass below each edge."""
        ws = w[self.order]
        mass = np.add.reduceat(ws, self.starts)
        sums = np.add.reduceat(ws * values[self.order], self.starts)
        keep = mass > 0  # a run of zero weight covers no mass
        ends = np.r_[0.0, np.cumsum(mass[keep])]
        total = float(ends[-1])
        edges = np.linspace(0.0, total, self.n_bins + 1)
        # Within a run the sum grows linearly with the mass covered: interpolation splits straddling runs.
        return np.interp(edges, ends, np.r_[0.0, np.cumsum(sums[keep])]), total

    def adaptive_ece(self, w: np.ndarray) -> float:
        """Equal-mass ECE; NaN when the weights are all 0."""
        if self._total(w) is None:
            return np.nan
        cumulative, total = self._mass_cumulative(w, self.residual)
        return float(np.abs(np.diff(cumulative)).sum() / total)

    def brier(self, w: np.ndarray) -> float:
        """Mean squared difference of confidence and outcome; NaN when the weights are all 0."""
        total = self._total(w)
        return np.nan if total is None else float(w @ self.residual**2 / total)

    def reliability(self, w: np.ndarray) -> dict[str, list]:
        """Equal-width reliability bins: ``lower`` / ``upper`` edges, ``confidence`` (weighted mean
        confidence), ``frequency`` (weighted outcome frequency) and ``count`` (weight) per bin; an empty bin
        has confidence and frequency None and count 0."""
        count = np.bincount(self.bin, weights=w, minlength=self.n_bins)
        confidence = np.bincount(self.bin, weights=w * self.p, minlength=self.n_bins)
        frequency = np.bincount(self.bin, weights=w * self.y, minlength=self.n_bins)
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        filled = count > 0
        return {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(),
                "confidence": [float(c / n) if f else None for c, n, f in zip(confidence, count, filled)],
                "frequency": [float(v / n) if f else None for v, n, f in zip(frequency, count, filled)],
                "count": count.tolist()}


def expected_calibration_error(confidence, outcome, *, binning: str = "width", n_bins: int = N_BINS,
                               sample_weight=None) -> float:
    """ECE of ``confidence`` against 0/1 ``outcome`` with equal-width (``binning="width"``, Guo et al.) or
    equal-mass (``"mass"``, Nixon et al.'s bins) bins; definitions in the module docstring.

    Raises:
        DataError: bad shapes or values, an unknown binning, or all weights 0.

    Example:
        >>> round(expected_calibration_error([0.9, 0.9, 0.2, 0.2], [1, 0, 0, 0]), 4)
        0.3
    """
    if binning not in BINNINGS:
        raise DataError(f"expected_calibration_error: binning {binning!r}; expected one of {', '.join(BINNINGS)}")
    problem = CalibrationProblem(confidence, outcome, n_bins)
    w = _weights(sample_weight, problem.p.size, "expected_calibration_error")
    value = problem.ece(w) if binning == "width" else problem.adaptive_ece(w)
    if not np.isfinite(value):
        raise DataError("expected_calibration_error: no items (the weights sum to 0)")
    return value


def brier_score(y_true, probability, sample_weight=None) -> float:
    """Binary Brier score: weighted mean of ``(probability - y_true)^2``.

    Raises:
        DataError: bad shapes or values, or all weights 0.
    """
    problem = CalibrationProblem(probability, y_true)
    value = problem.brier(_weights(sample_weight, problem.p.size, "brier_score"))
    if not np.isfinite(value):
        raise DataError("brier_score: no items (the weights sum to 0)")
    return value


def _multiclass(y_true, probabilities, name: str) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(probabilities, dtype=np.float64)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise DataError(f"{name}: probabilities must be a finite (N, K) array, got shape {values.shape}")
    labels = np.asarray(y_true)
    if labels.shape != (values.shape[0],) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{name}: labels must be {values.shape[0]} class indices, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= values.shape[1]):
        raise DataError(f"{name}: class indices must lie in 0..{values.shape[1] - 1}")
    return labels, values


def multiclass_squared_errors(y_true, probabilities) -> np.ndarray:
    """Per item ``sum_k (p_ik - [y_i = k])^2``: its multi-class Brier score, in [0, 2]."""
    labels, values = _multiclass(y_true, probabilities, "multiclass_brier_score")
    onehot = np.eye(values.shape[1])[labels]
    return ((values - onehot) ** 2).sum(axis=1)


def multiclass_brier_score(y_true, probabilities, sample_weight=None) -> float:
    """Multi-class Brier score (sum over classes, weighted mean over items; module docstring).

    Raises:
        DataError: bad shapes, class indices or weights, or all weights 0.
    """
    errors = multiclass_squared_errors(y_true, probabilities)
    w = _weights(sample_weight, errors.size, "multiclass_brier_score")
    if w.sum() <= 0:
        raise DataError("multiclass_brier_score: no items (the weights sum to 0)")
    return float(w @ errors / w.sum())


def top_label(y_true, probabilities) -> tuple[np.ndarray, np.ndarray]:
    """``(confidence, correct)`` of a multi-class prediction: the highest class probability of each item
    and whether that class (ties: the lowest index, as ``argmax``) is its label (1.0) or not (0.0)."""
    labels, values = _multiclass(y_true, probabilities, "top_label")
    return values.max(axis=1), (values.argmax(axis=1) == labels).astype(np.float64)


def not_probabilities(kind: str, probabilities) -> str | None:
    """Why ``probabilities`` (N, C) cannot be scored for calibration, or None: a value outside [0, 1], or
    for a multi-class task rows that do not sum to 1 (then the top-label confidence is no probability of
    being right; zero-shot scores are one presence probability per class)."""
    values = np.asarray(probabilities, dtype=np.float64)
    if values.size and (values.min() < 0 or values.max() > 1):
        return f"scores range over {values.min():g}..{values.max():g}, outside [0, 1]: they are not probabilities"
    if kind == "multiclass" and values.size:
        worst = float(np.abs(values.sum(axis=1) - 1.0).max())
        if worst > 1e-3:
            return (f"the class probabilities of an image do not sum to 1 (off by up to {worst:.3g}): the "
                    "top-label confidence is then no probability that the predicted class is right")
    return None


def reliability_summary(curves: dict[str, dict[str, list]], *, n_bins: int, what: str) -> dict[str, Any]:
    """The ``calibration`` entry of a record: the bin scheme and the equal-width reliability bins of each
    curve (a class, or ``top_label``)."""
    return {"n_bins": n_bins, "binning": f"equal width: (m/{n_bins}, (m+1)/{n_bins}], 0 in the first bin",
            "confidence": what, "curves": curves}


def check_calibration_entry(value: Any) -> bool:
    """Whether ``value`` has the shape of a record's ``calibration`` entry: ``{"left_out": str}``, or
    ``n_bins``, ``binning``, ``confidence`` and ``curves`` (name → equal-length bin lists)."""
    if not isinstance(value, dict):
        return False
    if "left_out" in value:
        return set(value) == {"left_out"} and isinstance(value["left_out"], str) and bool(value["left_out"])
    n_bins, curves = value.get("n_bins"), value.get("curves")
    if not (isinstance(n_bins, int) and n_bins > 0 and isinstance(curves, dict) and curves
            and isinstance(value.get("binning"), str) and isinstance(value.get("confidence"), str)):
        return False
    keys = {"lower", "upper", "confidence", "frequency", "count"}
    return all(isinstance(bins, dict) and set(bins) == keys
               and all(isinstance(bins[k], list) and len(bins[k]) == n_bins for k in keys)
               for bins in curves.values())
