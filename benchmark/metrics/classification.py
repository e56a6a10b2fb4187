"""Classification metrics with pinned definitions: ROC AUC, top-1 accuracy, F1 / accuracy / MCC at a
threshold, and the threshold that maximises F1 (or MCC).

Definitions (each equals scikit-learn's on the same input; the tests check it):

* AUC is the Mann-Whitney probability that a positive scores above a negative, ties counting one
  half (``roc_auc_score``); None where only one class is present.
* At a threshold ``t`` an item is predicted positive when ``score >= t`` (``precision_recall_curve``'s
  convention). F1 is ``2 tp / (2 tp + fp + fn)`` and MCC is Matthews' correlation; both are 0 where
  their denominator is 0 (scikit-learn's ``zero_division`` default and ``matthews_corrcoef``).
  ``acc_rule="gt"`` computes the accuracy alone of ``score > t`` instead, as MedKLIP's zero-shot test does
  (``accuracy_score(gt, pred > max_f1_thresh)``, MediaBrain-SJTU/MedKLIP
  Sample_zero-shot_Classification_CXR14/test.py:136-138), while its F1 is that of ``score >= t``.
* ``best_threshold`` searches every distinct score as a cut and returns the one with the highest F1
  (or MCC); among equal values, the highest cut (``ties="lowest"``: the lowest, as MedKLIP's
  ``np.argmax`` over ``precision_recall_curve``'s ascending thresholds picks it, MediaBrain-SJTU/MedKLIP
  Sample_zero-shot_Classification_CXR14/test.py:131-136). It is meant for validation data: a threshold tuned
  on the test set (MedKLIP's max-F1) is optimistic.
* Multi-class decisions are the top-scoring class: ``accuracy`` (top-1) and ``argmax_metrics``
  (accuracy, macro F1, multi-class MCC).

Every metric takes an optional ``sample_weight``; integer weights equal repeating items, which is how
a bootstrap resample is scored without copying the data (:func:`resample_weights`). ``auc_by_weights``
and ``threshold_metrics_by_weights`` do the sorting / thresholding once and return a function of the
weights, for the thousand resamples of a bootstrap.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from vlpbench.errors import DataError

CRITERIA = ("f1", "mcc")
ACC_RULES = ("ge", "gt")
TIE_RULES = ("highest", "lowest")


def _scores(scores, n: int | None, name: str, ndim: int = 1) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != ndim:
        raise DataError(f"{name}: scores must be {ndim}-D, got shape {values.shape}")
    if n is not None and values.shape[0] != n:
        raise DataError(f"{name}: {values.shape[0]} scores for {n} labels")
    if not np.isfinite(values).all():
        raise DataError(f"{name}: scores must be finite numbers (found NaN or infinity)")
    return values


def _binary_labels(y_true, name: str, ndim: int = 1) -> np.ndarray:
    labels = np.asarray(y_true)
    if labels.ndim != ndim:
        raise DataError(f"{name}: labels must be {ndim}-D, got shape {labels.shape}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        other = sorted(set(np.unique(labels).tolist()) - {0, 1})
        raise DataError(f"{name}: labels must be 0 or 1, found {other[:5]}")
    return labels.astype(np.int8)


def _weights(sample_weight, n: int, name: str) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n)
    weights = np.asarray(sample_weight, dtype=np.float64)
    if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any():
        raise DataError(f"{name}: sample_weight must be {n} finite non-negative numbers, got shape {weights.shape}")
    return weights


class _RankedScores:
    """One binary problem with its scores sorted once, so that the AUC of any reweighting (a bootstrap
    resample) costs O(n) instead of a new sort."""

    def __init__(self, y_true: np.ndarray, scores: np.ndarray) -> None:
        self.order = np.argsort(scores, kind="stable")
        ranked = scores[self.order]
        self.positive = y_true[self.order].astype(np.float64)
        # Start of each run of tied scores: ties share a rank group and count one half.
        self.starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])

    def auc(self, weights: np.ndarray) -> float | None:
        w = weights[self.order]
        pos = np.add.reduceat(w * self.positive, self.starts)
        neg = np.add.reduceat(w * (1.0 - self.positive), self.starts)
        total_pos, total_neg = pos.sum(), neg.sum()
        if total_pos <= 0 or total_neg <= 0:
            return None
        below = np.cumsum(neg) - neg  # negatives scoring strictly lower than each tie group
        return float((pos * (below + 0.5 * neg)).sum() / (total_pos * total_neg))


def roc_auc(y_true, scores, sample_weight=None) -> float | None:
    """Area under the ROC curve of a binary problem; None when ``y_true`` holds a single class.

    Args:
        y_true: (N,) 0/1 labels.
        scores: (N,) scores, higher = more likely positive (any monotone scale).
        sample_weight: optional (N,) non-negative weights.

    Raises:
        DataError: shapes differ, labels other than 0/1, or a non-finite score.

    Example:
        >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    labels = _binary_labels(y_true, "roc_auc")
    values = _scores(scores, len(labels), "roc_auc")
    return _RankedScores(labels, values).auc(_weights(sample_weight, len(labels), "roc_auc"))


def auc_by_weights(y_true, scores) -> Callable[[np.ndarray], float | None]:
    """``weights -> roc_auc(y_true, scores, sample_weight=weights)`` with the sort done once.

    For bootstrap statistics: each resample is scored in O(N) through :func:`resample_weights`.
    """
    labels = _binary_labels(y_true, "roc_auc")
    ranked = _RankedScores(labels, _scores(scores, len(labels), "roc_auc"))
    return ranked.auc


def macro_auc(y_true, scores, sample_weight=None) -> tuple[float | None, list[float | None]]:
    """Multi-label AUC: ``(mean over the classes where it is defined, per-class AUCs)``.

    ``y_true`` and ``scores`` are (N, C); a class whose labels are all equal has AUC None and is left
    out of the mean (the mean is None when no class is defined).
    """
    labels = _binary_labels(y_true, "macro_auc", ndim=2)
    values = _scores(scores, len(labels), "macro_auc", ndim=2)
    if values.shape != labels.shape:
        raise DataError(f"macro_auc: scores have shape {values.shape} but labels {labels.shape}")
    per_class = [roc_auc(labels[:, k], values[:, k], sample_weight) for k in range(labels.shape[1])]
    defined = [v for v in per_class if v is not None]
    return (float(np.mean(defined)) if defined else None), per_class


def _class_indices(y_true, k: int, name: str) -> np.ndarray:
    labels = np.asarray(y_true)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{name}: labels must be a 1-D array of class indices, got shape {labels.shape} "
                        f"({labels.dtype})")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise DataError(f"{name}: class indices must lie in 0..{k - 1}, found {labels.min()}..{labels.max()}")
    return labels


def accuracy(y_true, scores, sample_weight=None) -> float:
    """Top-1 accuracy: the share of items whose highest-scoring class is their class.

    Args:
        y_true: (N,) class indices.
        scores: (N, K) class scores (ties go to the lowest class index, as ``argmax``).

    Raises:
        DataError: bad shapes or indices, or no items.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 2:
        raise DataError(f"accuracy: scores must be (N, K), got shape {values.shape}")
    labels = _class_indices(y_true, values.shape[1], "accuracy")
    values = _scores(values, len(labels), "accuracy", ndim=2)
    weights = _weights(sample_weight, len(labels), "accuracy")
    if weights.sum() <= 0:
        raise DataError("accuracy: no items to score")
    return float((weights * (values.argmax(axis=1) == labels)).sum() / weights.sum())


def _f1(tp, fp, fn):
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(denominator, dtype=np.float64), where=denominator > 0)


def _mcc(tp, fp, fn, tn):
    product = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    numerator = tp * tn - fp * fn
    return np.divide(numerator, np.sqrt(product), out=np.zeros_like(numerator, dtype=np.float64),
                     where=product > 0)


def threshold_metrics_by_weights(y_true, scores, threshold: float,
                                 acc_rule: str = "ge") -> Callable[[np.ndarray], dict[str, float]]:
    """``weights -> threshold_metrics(y_true, scores, threshold, sample_weight=weights, acc_rule=acc_rule)``
    with the predictions made once (for bootstrap statistics; see :func:`resample_weights`)."""
    if acc_rule not in ACC_RULES:
        raise DataError(f"threshold_metrics: acc_rule {acc_rule!r}; expected one of {', '.join(ACC_RULES)}")
    labels = _binary_labels(y_true, "threshold_metrics")
    values = _scores(scores, len(labels), "threshold_metrics")
    predicted, positive = values >= threshold, labels == 1
    cells = np.stack([predicted & positive, predicted & ~positive, ~predicted & positive]).astype(np.float64)
    # Items the accuracy counts as correct: of ``score >= t`` (the cells above), or of ``score > t``.
    correct = None if acc_rule == "ge" else ((values > threshold) == positive).astype(np.float64)

    def metrics(weights: np.ndarray) -> dict[str, float]:
        total = float(weights.sum())
        if total <= 0:
            raise DataError("threshold_metrics: no items to score")
        tp, fp, fn = (float(v) for v in cells @ weights)
        tn = total - tp - fp - fn
        acc = (tp + tn) / total if correct is None else float(correct @ weights) / total
        return {"f1": float(_f1(np.float64(tp), fp, fn)), "acc": acc,
                "mcc": float(_mcc(np.float64(tp), fp, fn, tn))}

    return metrics


def threshold_metrics(y_true, scores, threshold: float, sample_weight=None, acc_rule: str = "ge") -> dict[str, float]:
    """``{"f1", "acc", "mcc"}`` of the predictions ``scores >= threshold`` (binary); with ``acc_rule="gt"``
    the accuracy of ``scores > threshold``.

    Raises:
        DataError: bad shapes or labels, no items, or an unknown ``acc_rule``.
    """
    metrics = threshold_metrics_by_weights(y_true, scores, threshold, acc_rule)
    return metrics(_weights(sample_weight, len(np.asarray(y_true)), "threshold_metrics"))


def best_threshold(y_true, scores, criterion: str = "f1", ties: str = "highest") -> float:
    """The cut (one of ``scores``) whose predictions ``scores >= cut`` maximise F1 or MCC.

    Use it on validation data and apply the result to test data. Among cuts with the same value of
    the criterion the highest is returned (``ties="lowest"``: the lowest, MedKLIP's choice).

    Raises:
        DataError: an unknown criterion, bad input, no positive item (F1 is then 0 at
            every cut), or, for MCC, a single class (MCC is then 0 at every cut).

    Example:
        >>> best_threshold([0, 1, 0, 1, 1], [0.1, 0.7, 0.6, 0.8, 0.3])
        0.3
    """
    if criterion not in CRITERIA:
        raise DataError(f"best_threshold: criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    if ties not in TIE_RULES:
        raise DataError(f"best_threshold: ties {ties!r}; expected one of {', '.join(TIE_RULES)}")
    labels = _binary_labels(y_true, "best_threshold")
    values = _scores(scores, len(labels), "best_threshold")
    n_pos = int(labels.sum())
    if n_pos == 0 or (criterion == "mcc" and n_pos == len(labels)):
        raise DataError(f"best_threshold: the {criterion} threshold needs "
                        f"{'positive items' if criterion == 'f1' else 'both classes'}; "
                        f"got {n_pos} positives of {len(labels)}")
    order = np.argsort(-values, kind="stable")
    ranked, positive = values[order], labels[order].astype(np.float64)
    # Last item of each run of tied scores: a cut at that score predicts everything up to it.
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])
    tp = np.cumsum(positive)[ends]
    fp = (ends + 1) - tp
    fn = n_pos - tp
    tn = (len(labels) - n_pos) - fp
    value = _f1(tp, fp, fn) if criterion == "f1" else _mcc(tp, fp, fn, tn)
    tied = np.flatnonzero(value == value.max())  # cuts run from high to low: the first is the highest
    best = tied[0] if ties == "highest" else tied[-1]
    return float(ranked[ends[best]])


def argmax_metrics(y_true, scores, sample_weight=None) -> dict[str, float]:
    """Multi-class metrics of the top-1 predictions: ``acc``, ``f1`` (macro over the classes present
    in the labels or the predictions, as scikit-learn's ``f1_score(average="macro")``) and ``mcc``
    (Gorodkin's multi-class MCC, scikit-learn's ``matthews_corrcoef``).

    Raises:
        DataError: bad shapes or indices, or no items.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 2:
        raise DataError(f"argmax_metrics: scores must be (N, K), got shape {values.shape}")
    k = values.shape[1]
    labels = _class_indices(y_true, k, "argmax_metrics")
    values = _scores(values, len(labels), "argmax_metrics", ndim=2)
    weights = _weights(sample_weight, len(labels), "argmax_metrics")
    total = weights.sum()
    if total <= 0:
        raise DataError("argmax_metrics: no items to score")
    confusion = np.zeros((k, k))
    np.add.at(confusion, (labels, values.argmax(axis=1)), weights)
    true_counts, predicted_counts, correct = confusion.sum(axis=1), confusion.sum(axis=0), np.trace(confusion)
    tp = np.diag(confusion)
    present = (true_counts > 0) | (predicted_counts > 0)
    f1 = _f1(tp, predicted_counts - tp, true_counts - tp)
    denominator = (total**2 - (predicted_counts**2).sum()) * (total**2 - (true_counts**2).sum())
    numerator = correct * total - (predicted_counts * true_counts).sum()
    mcc = numerator / np.sqrt(denominator) if denominator > 0 else 0.0
    return {"acc": float(correct / total), "f1": float(f1[present].mean()), "mcc": float(mcc)}


def resample_weights(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each of ``n`` items occurs in a bootstrap resample ``indices``: its sample weights."""
    return np.bincount(np.asarray(indices), minlength=n).astype(np.float64)
