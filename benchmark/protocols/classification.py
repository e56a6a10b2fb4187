"""The evaluation of every classification protocol (linear probe, fine-tuning, zero-shot), for ``run`` and ``score``.

One function, :func:`evaluate_classification`, turns test probabilities (and, for the metrics at a
threshold, the thresholds chosen on validation probabilities) into the metrics, their bootstrap CIs and the
per-image scores of a record. ``run`` calls it on the probabilities it computed; ``score`` on those read from
a predictions CSV (:func:`vlpbench.predictions.read_probabilities`); so both give the same numbers.

Metrics (``config["metrics"]``, else the protocol's default), macro over classes and, for several
classes, per class (``<metric>_<class slug>``):

* binary / multi-label tasks: ``auc`` per class; ``f1``, ``acc`` and ``mcc`` of ``score >= threshold``
  (``acc_rule: gt``: ``acc`` of ``score > threshold``, MedKLIP's rule), one threshold per class chosen by
  ``best_threshold`` (``threshold_criterion``) on validation images.
* multi-class tasks: the decision is the highest-scoring class; ``acc`` top-1
  accuracy, ``f1`` the macro F1 and ``mcc`` the multi-class MCC of those decisions, ``auc`` the mean
  one-vs-rest AUC. No threshold is involved.

Every metric gets a percentile bootstrap CI over test images (thresholds held fixed).

Calibration (``ece``, ``adaptive_ece``, ``brier`` and the reliability bins, :mod:`vlpbench.protocols.calibration`)
is added to every evaluation, whatever ``metrics`` lists, unless the caller says why its scores are no
probabilities (``calibration_left_out``); the record's ``calibration`` entry then holds that reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vlpbench.errors import ConfigError, DataError
from vlpbench.evidence import classification_evidence
from vlpbench.metrics.bootstrap import bootstrap_ci
from vlpbench.metrics.classification import (
    ACC_RULES,
    CRITERIA,
    TIE_RULES,
    argmax_metrics,
    auc_by_weights,
    best_threshold,
    resample_weights,
    threshold_metrics_by_weights,
)
from vlpbench.protocols.calibration import calibration_parts
from vlpbench.protocols.labels import class_names, class_slug, label_kind, task_labels

log = logging.getLogger("vlpbench")

THRESHOLD_METRICS = ("f1", "acc", "mcc")
PREDICTIONS_FILE = "predictions.csv"

Statistic = Callable[[np.ndarray], float]  # sample weights of the test items -> metric value (NaN: undefined)


def metric_names(config: dict[str, Any], default: Sequence[str]) -> list[str]:
    """``config["metrics"]`` (else ``default``) as a list of distinct names."""
    names = config.get("metrics", list(default))
    if not isinstance(names, list) or not names or not all(isinstance(m, str) for m in names):
        raise ConfigError(f"config key metrics must be a non-empty list of metric names, got {names!r}")
    return list(dict.fromkeys(names))


def needs_thresholds(kind: str, wanted: Sequence[str]) -> bool:
    """Whether ``wanted`` holds a metric at a threshold (binary and multi-label tasks only)."""
    return kind != "multiclass" and any(m in THRESHOLD_METRICS for m in wanted)


def threshold_criterion(config: dict[str, Any]) -> str:
    """``config["threshold_criterion"]`` (default ``f1``), checked."""
    criterion = config.get("threshold_criterion", "f1")
    if criterion not in CRITERIA:
        raise ConfigError(f"config key threshold_criterion is {criterion!r}; expected one of {', '.join(CRITERIA)}")
    return criterion


def class_thresholds(labels: np.ndarray, scores: np.ndarray, classes: list[str],
                     criterion: str, ties: str = "highest") -> list[float | None]:
    """Per class the ``best_threshold`` of ``labels`` (N, C) and ``scores`` (N, C) (``ties``: which of
    equally good cuts); None where the data cannot define one (no positive image), which leaves that class
    out of F1, accuracy and MCC.

    Raises:
        ConfigError: an unknown ``ties`` rule.
    """
    if ties not in TIE_RULES:
        raise ConfigError(f"threshold_ties {ties!r}: expected one of {', '.join(TIE_RULES)}")
    chosen = []
    for k, name in enumerate(classes):
        try:
            chosen.append(best_threshold(labels[:, k], scores[:, k], criterion, ties))
        except DataError as e:
            log.warning("no %s threshold for class %s (%s): it is left out of F1, accuracy and MCC", criterion,
                        name, e)
            chosen.append(None)
    return chosen


def _auc_statistic(labels: np.ndarray, scores: np.ndarray) -> Statistic:
    auc = auc_by_weights(labels, scores)
    return lambda w: np.nan if (value := auc(w)) is None else value


def _macro(statistics: list[Statistic]) -> Statistic:
    """The mean of ``statistics``; undefined when any of them is: the bootstrap then skips the resample
    rather than average a different set of classes."""
    return lambda w: float(np.mean([f(w) for f in statistics])) if statistics else np.nan


def metric_statistics(kind: str, labels: np.ndarray, scores: np.ndarray, classes: list[str], wanted: list[str],
                      thresholds: list[float | None] | None = None, acc_rule: str = "ge", *,
                      auc_classes: np.ndarray | None = None) -> dict[str, Statistic]:
    """Metric name → ``weights -> value`` over the test items, macro and (for several classes) per class
    (``<metric>_<class slug>``).

    Multi-class (``labels`` (N,) indices): ``acc`` top-1 accuracy, ``f1`` / ``mcc`` of
    the top-1 decisions, ``auc`` one-vs-rest. Binary / multi-label (``labels`` (N, C) 0/1): ``auc``, and
    ``f1`` / ``acc`` / ``mcc`` of ``score >= threshold`` for the classes whose threshold is not None
    (none without ``thresholds``; ``acc_rule="gt"``: ``acc`` of ``score > threshold``). A macro AUC averages
    the classes defined on the full test set (``auc_classes``: per class whether it is, where these items are
    a subset of that test set).

    Raises:
        ConfigError: a metric name the task kind has no definition for.
    """
    n_classes = len(classes)
    overall: dict[str, Statistic] = {}
    if kind == "multiclass":
        per_class = {"auc": {k: _auc_statistic((labels == k).astype(int), scores[:, k]) for k in range(n_classes)}}
        for metric in ("acc", "f1", "mcc"):
            overall[metric] = lambda w, metric=metric: argmax_metrics(labels, scores, w)[metric]
    else:
        per_class = {"auc": {k: _auc_statistic(labels[:, k], scores[:, k]) for k in range(n_classes)}}
        at_threshold = {k: threshold_metrics_by_weights(labels[:, k], scores[:, k], t, acc_rule)
                        for k, t in enumerate(thresholds or ()) if t is not None}
        for metric in THRESHOLD_METRICS:
            per_class[metric] = {k: (lambda w, f=f, metric=metric: f(w)[metric]) for k, f in at_threshold.items()}
            overall[metric] = _macro(list(per_class[metric].values()))
    if auc_classes is None:
        full = np.ones(len(labels))
        auc_classes = [bool(np.isfinite(f(full))) for f in per_class["auc"].values()]
    overall["auc"] = _macro([f for f, counted in zip(per_class["auc"].values(), auc_classes) if counted])

    statistics: dict[str, Statistic] = {}
    for metric in wanted:
        if metric not in overall:
            raise ConfigError(f"metric {metric!r} is not defined for a {kind} task; expected one of "
                              f"{', '.join(overall)}")
        statistics[metric] = overall[metric]
        if n_classes > 1:
            statistics.update({f"{metric}_{class_slug(classes[k])}": f for k, f in per_class.get(metric, {}).items()})
    return statistics


def evaluate_statistics(statistics: dict[str, Statistic], n: int, *, n_resamples: int,
                        seed: int) -> tuple[dict[str, float | None], dict[str, dict]]:
    """Each statistic on all ``n`` test items (None where undefined) and its bootstrap CI over items
    (:func:`~vlpbench.metrics.bootstrap.bootstrap_ci`, every statistic on the same resamples)."""
    full = np.ones(n)
    metrics: dict[str, float | None] = {}
    ci: dict[str, dict] = {}
    for name, statistic in statistics.items():
        value = statistic(full)
        metrics[name] = float(value) if np.isfinite(value) else None
        if metrics[name] is not None:
            ci[name] = bootstrap_ci(lambda idx, f=statistic: f(resample_weights(idx, n)), n,
                                    n_resamples=n_resamples, seed=seed)
    return metrics, ci


def class_counts(kind: str, labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    """Test images per class (multi-class) or positives per class."""
    if kind == "multiclass":
        return {name: int((labels == k).sum()) for k, name in enumerate(classes)}
    return {name: int(labels[:, k].sum()) for k, name in enumerate(classes[:labels.shape[1]])}


def evaluate_classification(kind: str, classes: list[str], ids: Sequence[str], labels: np.ndarray,
                            probabilities: np.ndarray, wanted: list[str], *,
                            thresholds: list[float | None] | None, n_resamples: int,
                            seed: int, acc_rule: str = "ge", calibration_left_out: str | None = None) -> dict[str, Any]:
    """The metrics, CIs and per-image scores of test ``probabilities`` (N, C) against ``labels``.

    Returns ``metrics``, ``ci``, ``per_image`` (top-1 correctness per image for a multi-class task;
    {} otherwise, since an AUC is not a mean over images), ``calibration`` (the reliability bins, or
    why calibration is left out: ``calibration_left_out``, or scores that are no probabilities) and ``evidence``
    (:mod:`vlpbench.evidence`: paired tests and subgroup metrics recompute every metric from it).
    ``thresholds``: one per class (None: the class has none), or None when no metric at a threshold is wanted.
    ``acc_rule``: ``ge`` (accuracy of ``score >= threshold``, like F1 and MCC) or ``gt`` (of ``score > threshold``,
    MedKLIP's zero-shot rule).
    """
    statistics = metric_statistics(kind, labels, probabilities, classes, wanted, thresholds, acc_rule)
    calibration, reliability = calibration_parts(kind, classes, labels, probabilities, left_out=calibration_left_out)
    statistics.update(calibration)
    metrics, ci = evaluate_statistics(statistics, len(ids), n_resamples=n_resamples, seed=seed)
    per_image: dict[str, float] = {}
    if kind == "multiclass":
        correct = probabilities.argmax(axis=1) == labels
        per_image = {image_id: float(c) for image_id, c in zip(ids, correct)}
    evidence = classification_evidence(kind, classes, ids, labels, probabilities, wanted, thresholds, acc_rule,
                                       calibration=bool(calibration))
    return {"metrics": metrics, "ci": ci, "per_image": per_image, "calibration": reliability, "evidence": evidence}


def score_predictions_csv(predictions: Path, source, test_ids: Sequence[str], config: dict[str, Any], *,
                          default_metrics: Sequence[str], seed: int,
                          threshold_images: tuple[Any, list[str], str] | None,
                          calibration_left_out: str | None = None) -> dict[str, Any]:
    """The ``score`` side of every classification protocol: read the CSV, choose thresholds on its
    validation rows as ``run`` does, and evaluate the test rows with :func:`evaluate_classification`.

    ``threshold_images``: ``(reader, ids, description)`` of the images thresholds come from (the split's
    val part, or CheXpert's valid.csv), or None where the task takes none. A CSV without validation rows
    leaves the metrics at a threshold out, with a note; thresholds are never tuned on the rows scored,
    unless the task says so (``threshold_source: test_oracle``, flagged optimistic). ``calibration_left_out``:
    as for :func:`evaluate_classification`.

    Raises:
        DataError: a malformed CSV, a test image without a row, a row for an image that is neither a test
            nor a threshold image, rows for only some of the threshold images, or no test image.
    """
    from vlpbench.predictions import read_probabilities

    predictions = Path(predictions)
    kind = label_kind(config)
    classes = class_names(config)
    wanted = metric_names(config, default_metrics)
    acc_rule = config.get("acc_rule", "ge")
    if acc_rule not in ACC_RULES:
        raise ConfigError(f"config key acc_rule is {acc_rule!r}; expected one of {', '.join(ACC_RULES)}")
    ties = config.get("threshold_ties", "highest")
    if ties not in TIE_RULES:
        raise ConfigError(f"config key threshold_ties is {ties!r}; expected one of {', '.join(TIE_RULES)}")
    rows = read_probabilities(predictions, classes, single_column=kind == "binary")
    if not test_ids:
        raise DataError(f"{predictions}: the split part holds no images to score")
    val_reader, val_ids, where = threshold_images if threshold_images is not None else (None, [], "")
    known = set(test_ids) | set(val_ids)
    if unknown := [i for i in rows if i not in known]:
        raise DataError(f"{predictions}: {len(unknown)} row(s) for images that are neither test images of the "
                        f"split nor threshold images ({where or 'the task takes none'}), e.g. "
                        f"{', '.join(unknown[:3])}")
    if missing := [i for i in test_ids if i not in rows]:
        raise DataError(f"{predictions}: {len(missing)} of {len(test_ids)} test images have no row, "
                        f"e.g. {', '.join(missing[:3])}")
    labels = task_labels(source, test_ids, config)
    scores = np.stack([rows[i] for i in test_ids])
    notes: list[str] = []
    thresholds = None
    used: dict[str, Any] = {"thresholds": None}
    if needs_thresholds(kind, wanted):
        criterion = threshold_criterion(config)
        given = [i for i in val_ids if i in rows]
        if config.get("threshold_source", "val") == "test_oracle":
            thresholds = class_thresholds(labels, scores, classes, criterion, ties)
            used = {"threshold_source": "test_oracle", "threshold_images": "the test set itself (optimistic)",
                    "optimistic": True}
        elif val_ids and len(given) == len(val_ids):
            val_labels = task_labels(val_reader, val_ids, config)
            thresholds = class_thresholds(val_labels, np.stack([rows[i] for i in val_ids]), classes, criterion, ties)
            used = {"threshold_source": "val", "threshold_images": where, "optimistic": False}
        elif given:
            raise DataError(f"{predictions}: rows for {len(given)} of the {len(val_ids)} threshold images "
                            f"({where}); give all of them (thresholds come from them) or none")
        else:
            left_out = [m for m in wanted if m in THRESHOLD_METRICS]
            wanted = [m for m in wanted if m not in THRESHOLD_METRICS]
            notes.append(f"{', '.join(left_out)} left out: they need thresholds chosen on validation images "
                         f"({where or 'the split has no val part'}), and the CSV holds none of their rows; "
                         "thresholds are never tuned on the images scored")
        if thresholds is not None:
            used.update(thresholds=dict(zip(classes, thresholds)), threshold_criterion=criterion)
            if acc_rule != "ge":
                used["acc_rule"] = acc_rule
            if ties != "highest":
                used["threshold_ties"] = ties
    result = evaluate_classification(kind, classes, test_ids, labels, scores, wanted, thresholds=thresholds,
                                     n_resamples=int(config["bootstrap_resamples"]), seed=seed, acc_rule=acc_rule,
                                     calibration_left_out=calibration_left_out)
    n_val = len(val_ids) if thresholds is not None and not used.get("optimistic") else 0
    return {**result, "n": {"train": 0, "val": n_val, "test": len(test_ids),
                            "test_per_class": class_counts(kind, labels, classes)},
            "scoring": {**used, "notes": notes}}
