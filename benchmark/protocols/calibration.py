"""Calibration metrics of every classification protocol: ``ece``, ``adaptive_ece`` and ``brier``, with CIs,
and the record's ``calibration`` entry (the reliability bins), from test probabilities.

* binary / multi-label tasks: each class's probability of presence against its label; ``ece``,
  ``adaptive_ece`` and ``brier`` per class (``<metric>_<class slug>``) and macro over classes.
* multi-class tasks: ``ece`` and ``adaptive_ece`` of the top-label confidence against top-1 correctness,
  ``brier`` the multi-class Brier score; no per-class values.

Definitions, bins (15 of each kind) and references: :mod:`vlpbench.metrics.calibration`. The numbers are
left out, with the reason in ``calibration["left_out"]``, where the scores are not probabilities the model
means as such: the caller says so (a zero-shot procedure that puts a softmax over two prompt similarities
to rank images), or the scores fall outside [0, 1], or a multi-class task's rows do not sum to 1.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from vlpbench.metrics.calibration import (
    N_BINS,
    CalibrationProblem,
    multiclass_squared_errors,
    not_probabilities,
    reliability_summary,
    top_label,
)
from vlpbench.protocols.labels import class_slug

CALIBRATION_METRICS = ("ece", "adaptive_ece", "brier")
TOP_LABEL = "top_label"

Statistic = Callable[[np.ndarray], float]


def _mean(statistics: list[Statistic]) -> Statistic:
    return lambda w: float(np.mean([f(w) for f in statistics]))


def calibration_parts(kind: str, classes: list[str], labels: np.ndarray, probabilities: np.ndarray, *,
                      left_out: str | None = None) -> tuple[dict[str, Statistic], dict[str, Any]]:
    """The calibration statistics (metric name → ``weights -> value``) and the record's ``calibration``
    entry for test ``probabilities`` (N, C) and ``labels`` ((N,) indices for a multi-class task, else (N, C)
    0/1).

    ``left_out``: why the caller's scores are no probabilities (then no statistic, and the entry is
    ``{"left_out": left_out}``); the scores' own check (:func:`~vlpbench.metrics.calibration.not_probabilities`)
    can leave them out too.
    """
    reason = left_out or not_probabilities(kind, probabilities)
    if reason is not None:
        return {}, {"left_out": reason}
    full = np.ones(len(labels))
    if kind == "multiclass":
        problem = CalibrationProblem(*top_label(labels, probabilities), N_BINS)
        errors = multiclass_squared_errors(labels, probabilities)
        statistics = {"ece": problem.ece, "adaptive_ece": problem.adaptive_ece,
                      "brier": lambda w: float(w @ errors / w.sum()) if w.sum() > 0 else np.nan}
        summary = reliability_summary({TOP_LABEL: problem.reliability(full)}, n_bins=N_BINS,
                                      what="top-label: the highest class probability against top-1 correctness")
        return statistics, summary
    problems = [CalibrationProblem(probabilities[:, k], labels[:, k], N_BINS) for k in range(len(classes))]
    per_class = {"ece": [p.ece for p in problems], "adaptive_ece": [p.adaptive_ece for p in problems],
                 "brier": [p.brier for p in problems]}
    statistics = {metric: _mean(functions) for metric, functions in per_class.items()}
    if len(classes) > 1:
        for metric, functions in per_class.items():
            statistics.update({f"{metric}_{class_slug(c)}": f for c, f in zip(classes, functions)})
    summary = reliability_summary({c: p.reliability(full) for c, p in zip(classes, problems)}, n_bins=N_BINS,
                                  what="each class's probability of presence against its label")
    return statistics, summary

