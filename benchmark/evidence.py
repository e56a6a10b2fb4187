"""Evidence sidecars: what a record's metrics are recomputed from, on any weighting of its test items.

A record keeps its metrics, CIs and (for some protocols) per-image scores; a paired test between two
models needs more: every metric as a function ``statistic(weights)`` of the test items' weights (a
bootstrap resample's counts; an indicator vector gives a subset). The protocols' evaluations return an
:class:`Evidence` (outcome key ``evidence``, in memory), and ``run`` writes it beside the record as
``<record stem>.evidence.npz`` (plain arrays, no pickles; written atomically) and records
``evidence: {file, sha256}``. Reading checks the hash and that the file names the record it belongs to.

Three kinds, each rebuilding its statistics with the metric code of its protocol (nothing is redefined here):

* ``classification`` (linear, fine-tuned, zero-shot): test ``ids``, ``labels`` ((N,) class indices for a
  multi-class task, else (N, C) 0/1), ``probabilities`` (N, C), ``classes``, ``label_kind``, the ``metrics``
  evaluated, the ``thresholds`` used (one per class, NaN for a class without one; absent when none was
  used) and ``acc_rule``; statistics from :func:`vlpbench.protocols.classification.metric_statistics`,
  and, where ``calibration`` is true (the evaluation computed them; absent in sidecars written before),
  ``ece``, ``adaptive_ece`` and ``brier`` from :func:`vlpbench.protocols.calibration.calibration_parts`.
* ``per_item`` (segmentation, grounding, retrieval): ``values`` (N, M), one column per metric in ``metrics``,
  NaN where an item does not count for that metric (``dice_positive`` of a negative image, an undefined
  CNR), so each metric is the weighted mean of its column over the counted items, or, where the optional
  ``aggregates`` (one per metric, ``mean`` or ``median``) says ``median``, its weighted median (retrieval's
  median rank); optional ``labels`` (segmentation: the image is positive) with their class name in
  ``classes``, and ``images`` (grounding: the image of each query, whose attributes place it in a subgroup).
* ``detection``: per image the ground-truth boxes and the detections (flattened, with the image index of
  each box: ``truth_boxes``/``truth_image``, ``det_boxes``/``det_scores``/``det_image``), the IoU
  thresholds and ``max_detections``; statistics from :class:`vlpbench.metrics.detection.DetectionMatches`
  (``map``, ``ap<IoU>``, ``map_mgca``). A task with several classes adds ``n_classes`` and the class index of
  every box (``truth_class``, ``det_class``), and its statistics are the macro means of
  :class:`vlpbench.metrics.detection.ClassMatches`.

``untestable`` (optional) lists ``"<metric>: why"`` for metrics of the record that no weighting of the items
reproduces (MGCA's batch-averaged Dice; retrieval's text→image metrics, whose queries are not the items); a
column may still hold such a metric's per-item part (the per-image Dice), which subgroup metrics use with
that reason as a note. A record without a sidecar still yields per-item evidence for its primary metric
from ``per_image`` when that metric is a per-image mean (:func:`per_image_evidence`).

:meth:`Evidence.subset` keeps some of the items, so that a subgroup's statistics run over its own items only
(:mod:`vlpbench.metrics.subgroups`); on any weighting of the kept items they equal the full evidence's on the
same weights with 0 elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vlpbench.errors import DataError
from vlpbench.files import atomic_write, backup_path
from vlpbench.metrics.bootstrap import weighted_mean

FORMAT = "vlpbench-evidence/1"
SUFFIX = ".evidence.npz"
KINDS = ("classification", "per_item", "detection")
# Records round metrics to 6 decimals: a recomputed metric within this of the record's is the record's.
REPRODUCE_TOL = 2e-6

Statistic = Callable[[np.ndarray], float]


@dataclass
class Evidence:
    """The test items of one evaluation and what its metrics are recomputed from (module docstring)."""

    kind: str
    ids: list[str]
    arrays: dict[str, np.ndarray]
    untestable: list[str] = field(default_factory=list)
    source: str = "memory"
    _statistics: dict[str, Statistic] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"evidence {self.source}: kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def images(self) -> list[str]:
        """Per item the image it belongs to (a grounding query's image; else the item itself)."""
        return [str(i) for i in self.arrays["images"]] if "images" in self.arrays else self.ids

    @property
    def unit(self) -> str:
        """What an item is, for messages: ``query`` where items are queries of images, else ``image``."""
        return "query" if "images" in self.arrays else "image"

    def positives(self) -> tuple[np.ndarray, tuple[str, ...]] | None:
        """(N, C) 0/1 per item and class, with the C class names, from the labels (detection: whether the
        image holds a ground-truth box); None where the items have no labels (grounding, retrieval)."""
        a = self.arrays
        if self.kind == "detection":
            holds = np.bincount(a["truth_image"], minlength=self.n)[:self.n] > 0
            return holds[:, None].astype(int), ("positive",)
        if "labels" not in a:
            return None
        classes = tuple(str(c) for c in a["classes"]) if "classes" in a else ("positive",)
        if self.kind == "classification" and str(a["label_kind"]) == "multiclass":
            return (a["labels"][:, None] == np.arange(len(classes))[None, :]).astype(int), classes
        labels = (np.asarray(a["labels"]).reshape(self.n, -1) == 1).astype(int)
        return labels, classes[:labels.shape[1]]

    def subset(self, keep: np.ndarray) -> Evidence:
        """The evidence of the items ``keep`` (indices, in order) only: on any weighting of them its statistics
        equal this evidence's on the same weights with 0 on every other item (module docstring). A macro AUC
        keeps averaging the classes defined on this evidence's items, as it does here."""
        keep = np.asarray(keep, dtype=np.int64)
        a = dict(self.arrays)
        if self.kind == "detection":
            position = np.full(self.n, -1, dtype=np.int64)
            position[keep] = np.arange(len(keep))
            for prefix in ("truth", "det"):
                kept = position[a[f"{prefix}_image"]] >= 0
                for key in [k for k in a if k.startswith(f"{prefix}_")]:
                    a[key] = a[key][kept]
                a[f"{prefix}_image"] = position[a[f"{prefix}_image"]]
        else:
            for key in ("labels", "probabilities", "values", "images"):
                if key in a:
                    a[key] = a[key][keep]
            if self.kind == "classification":
                a["auc_classes"] = self._auc_classes()
        return Evidence(self.kind, [self.ids[k] for k in keep], a, list(self.untestable),
                        source=f"{self.source} ({len(keep)} of {self.n} items)")

    def _auc_classes(self) -> np.ndarray:
        """Per class whether its AUC is defined on these items (both labels present): the classes a macro
        AUC averages."""
        if "auc_classes" in self.arrays:
            return self.arrays["auc_classes"]
        positives, _ = self.positives()
        counts = positives.sum(axis=0)
        return (counts > 0) & (counts < self.n)

    def truth(self) -> list[np.ndarray]:
        """What two models' evidence must share to be paired: labels (or ground-truth boxes)."""
        a = self.arrays
        if self.kind == "detection":
            return [a["truth_boxes"], a["truth_image"]]
        return [a["labels"]] if "labels" in a else []

    def statistics(self) -> dict[str, Statistic]:
        """Metric name → ``statistic(weights)`` over the :attr:`ids` (NaN where undefined); built once (detection
        matches every box on the first call)."""
        if self._statistics is None:
            if self.kind == "classification":
                self._statistics = self._classification()
            elif self.kind == "detection":
                self._statistics = self._detection()
            else:
                values = self.arrays["values"]
                self._statistics = {name: (_weighted_median(values[:, j]) if aggregate == "median"
                                           else weighted_mean(values[:, j]))
                                    for j, (name, aggregate) in enumerate(zip(self._columns(), self._aggregates()))}
        return self._statistics

    def _columns(self) -> list[str]:
        return [str(m) for m in self.arrays["metrics"]]

    def _aggregates(self) -> list[str]:
        """Per column of a per-item evidence how its metric aggregates the items: ``mean`` or ``median``."""
        if "aggregates" in self.arrays:
            return [str(g) for g in self.arrays["aggregates"]]
        return ["mean"] * len(self.arrays["metrics"])

    def item_values(self, metric: str) -> np.ndarray | None:
        """Per-item values whose (NaN-skipping) mean is ``metric``, for a vectorised paired bootstrap; None
        where the metric is not such a mean in this evidence."""
        if self.kind == "per_item":
            names = self._columns()
            if metric not in names or self._aggregates()[names.index(metric)] != "mean":
                return None
            return self.arrays["values"][:, names.index(metric)]
        if self.kind == "classification" and str(self.arrays["label_kind"]) == "multiclass" and metric == "acc":
            a = self.arrays
            return (a["probabilities"].argmax(axis=1) == a["labels"]).astype(np.float64)
        return None

    def auc_curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """AUC metric → (0/1 labels, scores) of its single ROC curve, for DeLong's test: ``auc_<class>`` per
        class, and ``auc`` itself for a one-class task (a macro AUC over classes is no single curve)."""
        if self.kind != "classification":
            return {}
        from vlpbench.protocols.labels import class_slug

        a = self.arrays
        classes = [str(c) for c in a["classes"]]
        multiclass = str(a["label_kind"]) == "multiclass"
        curves = {}
        for k, name in enumerate(classes):
            labels = (a["labels"] == k).astype(int) if multiclass else a["labels"][:, k].astype(int)
            if 0 < labels.sum() < labels.size:
                curves[f"auc_{class_slug(name)}" if len(classes) > 1 else "auc"] = (labels, a["probabilities"][:, k])
        return curves

    def _classification(self) -> dict[str, Statistic]:
        from vlpbench.protocols.classification import metric_statistics

        from vlpbench.protocols.calibration import calibration_parts

        a = self.arrays
        kind, classes = str(a["label_kind"]), [str(c) for c in a["classes"]]
        thresholds = None
        if "thresholds" in a:
            thresholds = [None if math.isnan(t) else float(t) for t in a["thresholds"]]
        statistics = metric_statistics(kind, a["labels"], a["probabilities"], classes, [str(m) for m in a["metrics"]],
                                       thresholds, str(a["acc_rule"]), auc_classes=a.get("auc_classes"))
        if "calibration" in a and bool(a["calibration"]):
            # The evaluation found probabilities: they are the evidence's, so no check can leave them out here.
            statistics.update(calibration_parts(kind, classes, a["labels"], a["probabilities"])[0])
        return statistics

    def _detection(self) -> dict[str, Statistic]:
        from vlpbench.metrics.detection import ClassMatches, DetectionMatches, mgca_kept, summarize

        a = self.arrays
        per_image = range(self.n)
        truths = [a["truth_boxes"][a["truth_image"] == i] for i in per_image]
        boxes = [a["det_boxes"][a["det_image"] == i] for i in per_image]
        scores = [a["det_scores"][a["det_image"] == i] for i in per_image]
        options = {"iou_thresholds": a["iou_thresholds"], "max_detections": int(a["max_detections"])}
        if "n_classes" in a:
            matches = ClassMatches(truths, [a["truth_class"][a["truth_image"] == i] for i in per_image], boxes,
                                   scores, [a["det_class"][a["det_image"] == i] for i in per_image],
                                   int(a["n_classes"]), **options)
        else:
            matches = DetectionMatches(truths, boxes, scores, **options)
        kept = mgca_kept(matches)
        mgca = matches.subset(kept)
        statistics: dict[str, Statistic] = {"map": matches.mean_average_precision}
        # summarize names the AP of each threshold in threshold order (ap40 ... ap75).
        names = [key for key in summarize(matches) if key.startswith("ap")]
        for t, name in enumerate(names):
            statistics[name] = lambda w, t=t: float(matches.average_precision(w)[t])
        statistics["map_mgca"] = lambda w: mgca.mean_average_precision(np.asarray(w)[kept])
        return statistics


def _weighted_median(values: np.ndarray) -> Statistic:
    from vlpbench.metrics.retrieval import weighted_median

    return lambda w: weighted_median(values, w)


# --- building, in the protocols' evaluations ---------------------------------------------------------------


def classification_evidence(kind: str, classes: Sequence[str], ids: Sequence[str], labels: np.ndarray,
                            probabilities: np.ndarray, metrics: Sequence[str],
                            thresholds: Sequence[float | None] | None, acc_rule: str, *,
                            calibration: bool = False) -> Evidence:
    """The evidence of :func:`vlpbench.protocols.classification.evaluate_classification`'s arguments;
    ``calibration``: the evaluation computed the calibration metrics."""
    arrays = {"label_kind": np.array(kind), "classes": np.array(list(classes), dtype=str),
              "labels": np.asarray(labels), "probabilities": np.asarray(probabilities, dtype=np.float64),
              "metrics": np.array(list(metrics), dtype=str), "acc_rule": np.array(acc_rule),
              "calibration": np.array(bool(calibration))}
    if thresholds is not None:
        arrays["thresholds"] = np.array([math.nan if t is None else float(t) for t in thresholds], dtype=np.float64)
    return Evidence("classification", list(ids), arrays)


def per_item_evidence(ids: Sequence[str], values: Mapping[str, np.ndarray], *, labels: np.ndarray | None = None,
                      label_name: str | None = None, images: Sequence[str] | None = None,
                      medians: Sequence[str] = (), untestable: Sequence[str] = ()) -> Evidence:
    """Per-item evidence: ``values`` maps each metric to one value per item (NaN: the item does not count);
    ``labels``: per item 0/1 (the item is positive), ``label_name`` naming that class; ``images``: per item
    its image, where items are queries of images; ``medians``: the metrics that are the median of their
    values rather than the mean."""
    arrays = {"metrics": np.array(list(values), dtype=str),
              "values": np.column_stack([np.asarray(v, dtype=np.float64) for v in values.values()])
              if values else np.zeros((len(ids), 0))}
    if medians:
        arrays["aggregates"] = np.array(["median" if name in medians else "mean" for name in values], dtype=str)
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
        if label_name is not None:
            arrays["classes"] = np.array([label_name], dtype=str)
    if images is not None:
        arrays["images"] = np.array(list(images), dtype=str)
    return Evidence("per_item", list(ids), arrays, list(untestable))


def detection_evidence(ids: Sequence[str], truths: Sequence[np.ndarray],
                       detections: Sequence[Sequence[np.ndarray]], *, iou_thresholds: np.ndarray,
                       max_detections: int, truth_labels: Sequence[np.ndarray] | None = None,
                       n_classes: int = 1) -> Evidence:
    """Detection evidence: per image its ground-truth boxes and its (boxes, scores), flattened; with
    ``n_classes`` > 1 also the class of every box (``truth_labels``, and the detections' third part)."""
    def flat(boxes: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        arrays = [np.asarray(b, dtype=np.float64).reshape(-1, 4) for b in boxes]
        image = np.concatenate([np.full(len(b), i, dtype=np.int64) for i, b in enumerate(arrays)] or [np.zeros(0)])
        return (np.concatenate(arrays) if arrays else np.zeros((0, 4))), image.astype(np.int64)

    truth_boxes, truth_image = flat(truths)
    det_boxes, det_image = flat([d[0] for d in detections])
    scores = [np.asarray(d[1], dtype=np.float64).reshape(-1) for d in detections]
    arrays = {
        "truth_boxes": truth_boxes, "truth_image": truth_image, "det_boxes": det_boxes, "det_image": det_image,
        "det_scores": np.concatenate(scores) if scores else np.zeros(0),
        "iou_thresholds": np.asarray(iou_thresholds, dtype=np.float64), "max_detections": np.array(max_detections)}
    if n_classes > 1:
        def classes(per_image: Sequence[np.ndarray]) -> np.ndarray:
            return np.concatenate([np.asarray(c, dtype=np.int64).reshape(-1) for c in per_image] or [np.zeros(0)]
                                  ).astype(np.int64)

        arrays.update(n_classes=np.array(n_classes), truth_class=classes(truth_labels),
                      det_class=classes([d[2] for d in detections]))
    return Evidence("detection", list(ids), arrays)


# --- the sidecar file ----------------------------------------------------------------------------------------


def _identity(record: Mapping[str, Any]) -> str:
    """What ties a sidecar to its record: model, checkpoint, task, profile, fraction, seed, split, creation time."""
    task, split = record["task"], record["split"]
    return json.dumps({"model": record["model"]["name"],
                       "checkpoint": (record["model"].get("checkpoint") or {}).get("sha256"),
                       "task": task["name"], "version": task["version"], "profile": task.get("profile"),
                       "frac": round(float(record["frac"]), 6), "seed": record["seed"],
                       "split": split["sha256"], "test_split": split.get("test_sha256"),
                       "created": record["created"]}, sort_keys=True)


def evidence_path(record_file: str | Path) -> Path:
    """The sidecar of the record at ``record_file``: ``<record stem>.evidence.npz`` beside it."""
    record_file = Path(record_file)
    return record_file.with_name(record_file.stem + SUFFIX)


def write_evidence(evidence: Evidence, record: Mapping[str, Any], record_file: str | Path) -> dict[str, str]:
    """Write ``evidence`` beside the record that will live at ``record_file`` (atomically; a file already
    there is kept as a ``.bak``); return the record's ``evidence`` entry ``{file, sha256}``."""
    arrays = {"format": np.array(FORMAT), "kind": np.array(evidence.kind), "record": np.array(_identity(record)),
              "ids": np.array(evidence.ids, dtype=str), "untestable": np.array(evidence.untestable, dtype=str),
              **evidence.arrays}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    data = buffer.getvalue()
    path = evidence_path(record_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, backup=backup_path)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest()}


def read_evidence(record: Mapping[str, Any], record_file: str | Path) -> Evidence:
    """The evidence of ``record`` (which lives at ``record_file``), checked against its ``evidence`` entry.

    Raises:
        DataError: the record has no ``evidence`` entry, or the file is missing, changed since the record
            was written (sha256), unreadable, of another format, or written for another record.
    """
    entry = record.get("evidence")
    if not entry:
        raise DataError(f"{record_file}: the record has no evidence entry")
    path = Path(record_file).with_name(entry["file"])
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the evidence of record {record_file} ({error.strerror}); "
                        "it was written beside the record and must stay there") from error
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"{path}: sha256 {hashlib.sha256(data).hexdigest()[:12]} differs from the record's "
                        f"evidence.sha256 {entry['sha256'][:12]} ({record_file}): the file changed after the run")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable evidence .npz ({type(error).__name__}: {error})") from error
    if str(arrays.pop("format", "")) != FORMAT:
        raise DataError(f"{path}: not a vlpbench evidence file of format {FORMAT}")
    if str(arrays.pop("record", "")) != _identity(record):
        raise DataError(f"{path}: written for another record than {record_file} (model, task, fraction, seed, "
                        "split or creation time differ)")
    kind, ids = str(arrays.pop("kind")), [str(i) for i in arrays.pop("ids")]
    untestable = [str(u) for u in arrays.pop("untestable")]
    return Evidence(kind, ids, arrays, untestable, source=str(path))


def per_image_evidence(record: Mapping[str, Any]) -> Evidence | None:
    """Per-item evidence of the record's primary metric from its ``per_image`` scores, where that metric is
    a per-image mean that their mean reproduces (segmentation and grounding Dice, multi-class accuracy);
    else None."""
    from vlpbench.metrics.specs import PER_IMAGE_MEAN, metric_spec

    per_image = record.get("per_image") or {}
    metric = record["primary_metric"]
    value = record["metrics"].get(metric)
    if not per_image or value is None or metric_spec(metric).ci != PER_IMAGE_MEAN:
        return None
    try:
        scores = np.array(list(per_image.values()), dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(scores).all() or abs(float(scores.mean()) - value) > REPRODUCE_TOL:
        return None
    evidence = per_item_evidence(list(per_image), {metric_spec(metric).name: scores})
    evidence.source = "the record's per_image scores"
    return evidence
