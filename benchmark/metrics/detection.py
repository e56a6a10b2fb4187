"""COCO-style mean average precision for single-class box detection, the canonical vlpbench variant.

The definition is pycocotools' ``COCOeval`` for ``iouType="bbox"`` with area range "all", no crowd
boxes and ``maxDets=100``, for one category, over the IoU thresholds 0.40:0.05:0.75 that MGCA's
detection protocol uses (G2D follows it):

* per image, detections are sorted by score (stable) and cut to the best ``max_detections``; at each
  IoU threshold each detection in turn takes the unmatched ground-truth box of highest IoU (at least
  the threshold; among equal IoUs the later box, as pycocotools) and is a true positive, or else a
  false positive; IoU is ``intersection / union`` of the plain areas (no ``+1`` pixel convention);
* over the images, all detections are sorted by score (stable, image order first), precision is made
  monotone from the right and read at the 101 recalls 0:0.01:1 (the first point reaching each
  recall, 0 beyond the last one), and AP is the mean of those 101 values; mAP is the mean over the
  thresholds.

Every image counts: false positives on images without ground truth lower precision, and boxes that no
detection finds lower recall; an image with neither boxes nor detections changes nothing.

With several classes (:class:`ClassMatches`), a detection matches only boxes of its own class and the
``max_detections`` cut is per image and class, as COCOeval does with ``useCats``; AP is computed per class
and averaged over the classes (macro), leaving out a class without a ground-truth box in the images
counted (pycocotools' ``-1`` entries, which its summary skips). One class gives the single-class numbers. MGCA's
code instead skips every image without a detection or without a ground-truth box, which hides both
errors; ``protocol="mgca"`` reproduces that for comparison.

:class:`DetectionMatches` matches once and then recomputes AP for any multiset of images (a bootstrap
resample) with one cumulative sum over the pre-sorted detections, so 1,000 resamples of a test set of
thousands of images take seconds.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from vlpbench.errors import DataError
from vlpbench.metrics.bootstrap import bootstrap_ci

# pycocotools writes its grids with this linspace form; the same form gives the same floats.
IOU_THRESHOLDS = np.linspace(0.40, 0.75, int(np.round((0.75 - 0.40) / 0.05)) + 1)
RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)
MAX_DETECTIONS = 100
PROTOCOLS = ("coco", "mgca")
# pycocotools caps the threshold just below 1 so that a perfect overlap still matches at IoU 1.0.
_IOU_CAP = 1 - 1e-10


def box_iou(boxes: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """IoU matrix (M, N) of xyxy boxes (M, 4) against xyxy boxes (N, 4), plain areas, 0 where disjoint."""
    width = np.minimum(boxes[:, None, 2], truths[None, :, 2]) - np.maximum(boxes[:, None, 0], truths[None, :, 0])
    height = np.minimum(boxes[:, None, 3], truths[None, :, 3]) - np.maximum(boxes[:, None, 1], truths[None, :, 1])
    overlap = (width > 0) & (height > 0)
    inter = np.where(overlap, width * height, 0.0)
    area_boxes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_truths = (truths[:, 2] - truths[:, 0]) * (truths[:, 3] - truths[:, 1])
    union = area_boxes[:, None] + area_truths[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap)


def match_image(boxes: np.ndarray, scores: np.ndarray, truths: np.ndarray,
                iou_thresholds: np.ndarray = IOU_THRESHOLDS,
                max_detections: int = MAX_DETECTIONS) -> tuple[np.ndarray, np.ndarray]:
    """Greedy COCO matching of one image's detections at every IoU threshold.

    Args:
        boxes: detections, float (M, 4) xyxy.
        scores: their scores, (M,).
        truths: ground-truth boxes, float (N, 4) xyxy.
        iou_thresholds: (T,) thresholds.
        max_detections: detections kept per image, best scores first.

    Returns:
        ``(scores, true_positive)``: the kept scores in match order (descending, stable), shape (K,),
        and a bool (T, K) table, True where the detection matched a ground-truth box at that threshold.
    """
    order = np.argsort(-scores, kind="mergesort")[:max_detections]
    boxes, scores = boxes[order], scores[order]
    thresholds = np.minimum(np.asarray(iou_thresholds, dtype=np.float64), _IOU_CAP)
    true_positive = np.zeros((len(thresholds), len(boxes)), dtype=bool)
    if len(truths) == 0 or len(boxes) == 0:
        return scores, true_positive
    iou = box_iou(boxes, truths)
    taken = np.zeros((len(thresholds), len(truths)), dtype=bool)
    rows = np.arange(len(thresholds))
    last = len(truths) - 1
    for d in range(len(boxes)):
        candidates = np.where(~taken & (iou[d][None, :] >= thresholds[:, None]), iou[d][None, :], -1.0)
        best = last - np.argmax(candidates[:, ::-1], axis=1)  # the last box among equal IoUs
        hit = candidates[rows, best] >= 0
        true_positive[hit, d] = True
        taken[rows[hit], best[hit]] = True
    return scores, true_positive


class DetectionMatches:
    """The matches of a set of images, computed once; AP of the whole set or of any resample of it.

    Args:
        truths: per image, ground-truth boxes (N_i, 4) xyxy.
        boxes: per image, detections (M_i, 4) xyxy, in the same pixel frame as ``truths``.
        scores: per image, detection scores (M_i,).
        iou_thresholds: IoU thresholds, (T,).
        max_detections: detections kept per image (best scores first).

    Raises:
        DataError: the three lists differ in length, or an array has the wrong shape or a non-finite value.
    """

    def __init__(self, truths: Sequence[np.ndarray], boxes: Sequence[np.ndarray], scores: Sequence[np.ndarray],
                 *, iou_thresholds: np.ndarray = IOU_THRESHOLDS, max_detections: int = MAX_DETECTIONS) -> None:
        if not len(truths) == len(boxes) == len(scores):
            raise DataError(f"detection mAP: {len(truths)} ground-truth lists, {len(boxes)} box lists and "
                            f"{len(scores)} score lists; expected one of each per image")
        self.iou_thresholds = np.asarray(iou_thresholds, dtype=np.float64)
        self.n_images = len(truths)
        self.n_truths = np.zeros(self.n_images, dtype=np.int64)
        self.n_detections = np.zeros(self.n_images, dtype=np.int64)
        all_scores, all_hits, all_images = [], [], []
        for index, (truth, box, score) in enumerate(zip(truths, boxes, scores)):
            truth = _boxes(truth, f"image {index} ground truth")
            box = _boxes(box, f"image {index} detections")
            score = np.asarray(score, dtype=np.float64).reshape(-1)
            if len(score) != len(box):
                raise DataError(f"detection mAP: image {index} has {len(box)} boxes but {len(score)} scores")
            if not np.isfinite(score).all():
                raise DataError(f"detection mAP: image {index} has a non-finite score")
            kept, hits = match_image(box, score, truth, self.iou_thresholds, max_detections)
            self.n_truths[index] = len(truth)
            self.n_detections[index] = len(kept)
            all_scores.append(kept)
            all_hits.append(hits)
            all_images.append(np.full(len(kept), index, dtype=np.int64))
        scores_flat = np.concatenate(all_scores) if all_scores else np.zeros(0)
        # One stable sort over the detections in image order serves every resample: copies of an
        # image only repeat its detections, so they are weighted rather than re-sorted.
        order = np.argsort(-scores_flat, kind="mergesort")
        hits = (np.concatenate(all_hits, axis=1) if all_hits else
                np.zeros((len(self.iou_thresholds), 0), dtype=bool))[:, order]
        self._set_sorted(hits, (np.concatenate(all_images) if all_images else np.zeros(0, dtype=np.int64))[order])

    def _set_sorted(self, hits: np.ndarray, images: np.ndarray) -> None:
        """Keep the score-sorted hit table (T, D), the image of each detection, and per threshold the
        positions of the true positives."""
        self._hits = hits
        self._images = images
        self._tp_positions = [np.flatnonzero(row) for row in hits]

    def precision(self, counts: np.ndarray | None = None) -> np.ndarray | None:
        """Interpolated precision (T, 101) at :data:`RECALL_POINTS`; None when there is no ground truth.

        Only the true positives are evaluated: recall rises only there, and a false positive's precision
        never exceeds that of the true positive before it, so neither the monotone envelope nor the
        points read from it change (the result equals the full curve's, float for float).

        Args:
            counts: how many times each image is taken (a bootstrap resample's ``bincount``); None takes
                each image once.
        """
        counts = np.ones(self.n_images, dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64)
        n_truths = int(counts @ self.n_truths)
        if n_truths == 0:
            return None
        weight = counts[self._images]
        # Detections so far (true and false positives), as pycocotools' tp + fp.
        seen = np.cumsum(weight).astype(np.float64)
        table = np.zeros((len(self.iou_thresholds), len(RECALL_POINTS)))
        for t, positions in enumerate(self._tp_positions):
            if len(positions) == 0:
                continue
            tp = np.cumsum(weight[positions]).astype(np.float64)
            recall = tp / n_truths
            precision = tp / (seen[positions] + np.spacing(1))
            # Precision made monotone from the right, then read at the first point reaching each recall.
            envelope = np.maximum.accumulate(precision[::-1])[::-1]
            at = np.searchsorted(recall, RECALL_POINTS, side="left")
            inside = at < len(recall)
            table[t, inside] = envelope[at[inside]]
        return table

    def average_precision(self, counts: np.ndarray | None = None) -> np.ndarray:
        """AP at each IoU threshold, (T,); NaN everywhere when there is no ground truth."""
        return self.summary(counts)[1]

    def mean_average_precision(self, counts: np.ndarray | None = None) -> float:
        """mAP over the thresholds (mean of the whole precision table, as pycocotools); NaN without truth."""
        return self.summary(counts)[0]

    def summary(self, counts: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """``(mAP, AP per threshold (T,))`` from one precision table; NaN without ground truth."""
        table = self.precision(counts)
        if table is None:
            return float("nan"), np.full(len(self.iou_thresholds), np.nan)
        return float(table.mean()), table.mean(axis=1)

    def subset(self, keep: np.ndarray) -> DetectionMatches:
        """The same matches restricted to the images where ``keep`` (bool, per image) is True."""
        keep = np.asarray(keep, dtype=bool)
        new = object.__new__(DetectionMatches)
        new.iou_thresholds = self.iou_thresholds
        new.n_images = int(keep.sum())
        new.n_truths = self.n_truths[keep]
        new.n_detections = self.n_detections[keep]
        on_kept = keep[self._images]
        new._set_sorted(self._hits[:, on_kept], (np.cumsum(keep) - 1)[self._images[on_kept]])
        return new


class ClassMatches:
    """The matches of a multi-class detection set: one :class:`DetectionMatches` per class, averaged over the
    classes with ground truth (macro; module docstring).

    Args:
        truths: per image, ground-truth boxes (N_i, 4) xyxy.
        truth_labels: per image, the class index of each ground-truth box (N_i,), in ``range(n_classes)``.
        boxes, scores, labels: per image, detections (M_i, 4), their scores and class indices (M_i,).
        n_classes: the number of classes.
        iou_thresholds, max_detections: as for :class:`DetectionMatches` (the cut applies per image and class).

    Raises:
        DataError: the lists differ in length, a label array's length differs from its boxes', or a label is
            not an integer class index below ``n_classes``.
    """

    def __init__(self, truths: Sequence[np.ndarray], truth_labels: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
                 scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], n_classes: int, *,
                 iou_thresholds: np.ndarray = IOU_THRESHOLDS, max_detections: int = MAX_DETECTIONS) -> None:
        if not len(truths) == len(truth_labels) == len(boxes) == len(scores) == len(labels):
            raise DataError(f"detection mAP: {len(truths)} ground-truth lists, {len(truth_labels)} label lists, "
                            f"{len(boxes)} box lists, {len(scores)} score lists and {len(labels)} detection label "
                            "lists; expected one of each per image")
        truths = [_boxes(t, f"image {i} ground truth") for i, t in enumerate(truths)]
        boxes = [_boxes(b, f"image {i} detections") for i, b in enumerate(boxes)]
        scores = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores]
        for index, (box, score) in enumerate(zip(boxes, scores)):
            if len(score) != len(box):
                raise DataError(f"detection mAP: image {index} has {len(box)} boxes but {len(score)} scores")
        truth_labels = [_labels(l, len(t), n_classes, f"image {i} ground truth")
                        for i, (l, t) in enumerate(zip(truth_labels, truths))]
        labels = [_labels(l, len(b), n_classes, f"image {i} detections") for i, (l, b) in enumerate(zip(labels, boxes))]
        self.iou_thresholds = np.asarray(iou_thresholds, dtype=np.float64)
        self.classes = [DetectionMatches([t[l == c] for t, l in zip(truths, truth_labels)],
                                         [b[l == c] for b, l in zip(boxes, labels)],
                                         [s[l == c] for s, l in zip(scores, labels)],
                                         iou_thresholds=iou_thresholds, max_detections=max_detections)
                        for c in range(n_classes)]
        self._set_totals()

    def _set_totals(self) -> None:
        self.n_images = self.classes[0].n_images
        self.n_truths = np.sum([m.n_truths for m in self.classes], axis=0)
        self.n_detections = np.sum([m.n_detections for m in self.classes], axis=0)

    def class_mean_average_precision(self, counts: np.ndarray | None = None) -> np.ndarray:
        """mAP over the thresholds per class, (C,); NaN for a class without ground truth."""
        return np.array([m.mean_average_precision(counts) for m in self.classes])

    def average_precision(self, counts: np.ndarray | None = None) -> np.ndarray:
        """AP at each IoU threshold (T,), the mean over the classes with ground truth; NaN where none has."""
        return self.summary(counts)[1]

    def mean_average_precision(self, counts: np.ndarray | None = None) -> float:
        """mAP: the mean over the classes with ground truth of each class's mAP; NaN where none has."""
        return self.summary(counts)[0]

    def summary(self, counts: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """``(mAP, AP per threshold (T,))``, each the mean over the classes with ground truth, from one precision
        table per class; NaN where no class has ground truth."""
        parts = [m.summary(counts) for m in self.classes]
        defined = [part for part in parts if not np.isnan(part[0])]
        if not defined:
            return float("nan"), np.full(len(self.iou_thresholds), np.nan)
        return float(np.mean([m for m, _ in defined])), np.mean([ap for _, ap in defined], axis=0)

    def subset(self, keep: np.ndarray) -> ClassMatches:
        """The same matches restricted to the images where ``keep`` (bool, per image) is True."""
        new = object.__new__(ClassMatches)
        new.iou_thresholds = self.iou_thresholds
        new.classes = [m.subset(keep) for m in self.classes]
        new._set_totals()
        return new


def _labels(array: Any, n: int, n_classes: int, what: str) -> np.ndarray:
    labels = np.asarray(array).reshape(-1)
    if len(labels) != n:
        raise DataError(f"detection mAP: {what} have {n} boxes but {len(labels)} class labels")
    if n and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"detection mAP: {what} hold a class label outside 0..{n_classes - 1}: {labels.tolist()}")
    return labels.astype(np.int64)


def _boxes(array: Any, what: str) -> np.ndarray:
    boxes = np.asarray(array, dtype=np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DataError(f"detection mAP: {what} must be an (N, 4) xyxy array, got shape {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise DataError(f"detection mAP: {what} hold a non-finite coordinate")
    return boxes


def mgca_kept(matches: DetectionMatches | ClassMatches) -> np.ndarray:
    """MGCA's image filter: True for images with at least one detection and one ground-truth box."""
    return (matches.n_detections > 0) & (matches.n_truths > 0)


def _threshold_name(threshold: float) -> str:
    return f"ap{int(round(threshold * 100))}"


def detection_map(truths: Sequence[np.ndarray], boxes: Sequence[np.ndarray], scores: Sequence[np.ndarray], *,
                  truth_labels: Sequence[np.ndarray] | None = None, labels: Sequence[np.ndarray] | None = None,
                  n_classes: int = 1, protocol: str = "coco", iou_thresholds: np.ndarray = IOU_THRESHOLDS,
                  max_detections: int = MAX_DETECTIONS) -> dict[str, Any]:
    """mAP and AP at each IoU threshold of per-image detections against per-image ground truth.

    Args:
        truths, boxes, scores: per image, as for :class:`DetectionMatches`.
        truth_labels, labels, n_classes: per image the class index of each ground-truth box and of each
            detection, for ``n_classes`` classes (:class:`ClassMatches`: AP per class, macro mean); None: one
            class.
        protocol: ``"coco"`` (every image, canonical) or ``"mgca"`` (only images with at least one
            detection and one ground-truth box, as MGCA's code).

    Returns:
        ``{"map", "ap40", "ap45", ..., "ap75", "n_images", "n_truths", "n_detections"}``: the APs are
        floats (NaN when no counted image has a ground-truth box), the counts are of the images
        counted.

    Example:
        >>> truth = [np.array([[0.0, 0.0, 10.0, 10.0]]), np.zeros((0, 4))]
        >>> boxes = [np.array([[0.0, 0.0, 10.0, 9.0]]), np.array([[5.0, 5.0, 8.0, 8.0]])]
        >>> scores = [np.array([0.9]), np.array([0.95])]
        >>> coco = detection_map(truth, boxes, scores)  # the false positive outranks the hit
        >>> mgca = detection_map(truth, boxes, scores, protocol="mgca")  # image 2 has no truth: skipped
        >>> round(coco["map"], 6), round(mgca["map"], 6), mgca["n_images"]
        (0.5, 1.0, 1)
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if (truth_labels is None) != (labels is None):
        raise ValueError("give both truth_labels and labels (several classes) or neither (one class)")
    if truth_labels is None:
        matches = DetectionMatches(truths, boxes, scores, iou_thresholds=iou_thresholds,
                                   max_detections=max_detections)
    else:
        matches = ClassMatches(truths, truth_labels, boxes, scores, labels, n_classes,
                               iou_thresholds=iou_thresholds, max_detections=max_detections)
    if protocol == "mgca":
        matches = matches.subset(mgca_kept(matches))
    return summarize(matches)


def summarize(matches: DetectionMatches | ClassMatches) -> dict[str, Any]:
    """The :func:`detection_map` dictionary of already matched images."""
    # The mean of the whole table, as pycocotools' summarize (the per-threshold mean can differ in the last bit).
    mean_ap, per_threshold = matches.summary()
    result: dict[str, Any] = {"map": mean_ap}
    for threshold, ap in zip(matches.iou_thresholds, per_threshold):
        result[_threshold_name(threshold)] = float(ap)
    result.update(n_images=int(matches.n_images), n_truths=int(matches.n_truths.sum()),
                  n_detections=int(matches.n_detections.sum()))
    return result


def map_ci(matches: DetectionMatches | ClassMatches, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Percentile bootstrap CI of the mAP, resampling images (see :func:`vlpbench.metrics.bootstrap.bootstrap_ci`).

    Resamples without any ground-truth box have no mAP and are skipped (counted in ``"skipped"``).
    """
    n = matches.n_images

    def statistic(indices: np.ndarray) -> float:
        return matches.mean_average_precision(np.bincount(indices, minlength=n))

    return bootstrap_ci(statistic, n, n_resamples=n_resamples, seed=seed)


def detection_cis(matches: DetectionMatches | ClassMatches, *, n_resamples: int = 1000,
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """Percentile bootstrap CIs of ``map`` and of the AP at each IoU threshold (``ap40`` ...), resampling images:
    :func:`map_ci` and its like for each AP, on the same resamples (the seed draws them), each resample's
    precision tables computed once for all of them."""
    n = matches.n_images
    summaries: dict[bytes, tuple[float, np.ndarray]] = {}

    def summary(indices: np.ndarray) -> tuple[float, np.ndarray]:
        key = hashlib.sha1(np.ascontiguousarray(indices).tobytes()).digest()
        if key not in summaries:
            summaries[key] = matches.summary(np.bincount(indices, minlength=n))
        return summaries[key]

    cis = {"map": bootstrap_ci(lambda idx: summary(idx)[0], n, n_resamples=n_resamples, seed=seed)}
    for t, threshold in enumerate(matches.iou_thresholds):
        cis[_threshold_name(threshold)] = bootstrap_ci(lambda idx, t=t: float(summary(idx)[1][t]), n,
                                                       n_resamples=n_resamples, seed=seed)
    return cis
