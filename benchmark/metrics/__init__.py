"""Metrics with pinned definitions, each tested against an independent reference.

* :mod:`~vlpbench.metrics.dice`: per-image Dice at a threshold, empty/empty = 1, mean over images.
* :mod:`~vlpbench.metrics.detection`: COCO-style mAP (pycocotools semantics) over IoU 0.40:0.05:0.75,
  every test image counted, and MGCA's image skipping as an option.
* :mod:`~vlpbench.metrics.classification`: AUC (scikit-learn's tie handling), top-1 accuracy, and
  F1 / accuracy / MCC at a threshold chosen on validation data.
* :mod:`~vlpbench.metrics.calibration`: expected calibration error (equal-width and equal-mass bins) and
  Brier score of predicted probabilities, and reliability bins.
* :mod:`~vlpbench.metrics.grounding`: pointing game, pixel recall, IoU, Dice and BioViL's CNR of
  heat maps against ground-truth regions.
* :mod:`~vlpbench.metrics.retrieval`: image→text and text→image Recall@K, Precision@K, median and mean rank
  from a similarity matrix and relevance keys, ties pessimistic.
* :mod:`~vlpbench.metrics.bootstrap`: percentile bootstrap CIs over images, for per-image scores or
  for a statistic recomputed on each resample.
* :mod:`~vlpbench.metrics.specs`: :class:`MetricSpec`, what each metric is called, printed as, which
  way is better and how its CI is drawn.

Every metric a protocol reports is registered below, once, in :data:`vlpbench.registry.METRICS`;
:func:`metric_spec` resolves any metric name a record holds.
"""

from __future__ import annotations

import math

from vlpbench.metrics import calibration, classification, grounding, retrieval
from vlpbench.metrics.bootstrap import bootstrap_ci
from vlpbench.metrics.detection import detection_map
from vlpbench.metrics.dice import dice, dice_per_image
from vlpbench.metrics.specs import PER_IMAGE_MEAN, RECOMPUTED, MetricSpec, metric_spec, register_metric

for _spec in (
    # Segmentation (and grounding: Dice of the thresholded heat map, per query).
    MetricSpec("dice", "Dice", True, PER_IMAGE_MEAN,
               "Dice per image at the threshold (empty truth and empty prediction score 1), mean over images",
               dice),
    MetricSpec("dice_positive", "Dice (positives)", True, PER_IMAGE_MEAN,
               "mean Dice of the test images whose ground truth is not empty"),
    MetricSpec("empty_correct", "Empty correct", True, PER_IMAGE_MEAN,
               "share of the test images with an empty ground truth that are predicted empty (their mean Dice)"),
    MetricSpec("all_empty_baseline", "All-empty Dice", True, PER_IMAGE_MEAN,
               "the Dice an all-empty prediction would score: the share of test images with an empty ground truth"),
    # Detection.
    MetricSpec("map", "mAP", True, RECOMPUTED,
               "COCO-style mAP over IoU 0.40:0.05:0.75, every test image counted", detection_map),
    MetricSpec("map_mgca", "mAP (MGCA)", True, RECOMPUTED,
               "mAP over the test images with a detection and a ground-truth box only, as MGCA's code"),
    # Classification: linear probe, fine-tuning, zero-shot.
    MetricSpec("auc", "AUC", True, RECOMPUTED,
               "area under the ROC curve, macro over classes (one-vs-rest for a multi-class task)",
               classification.roc_auc, per_class=True),
    MetricSpec("acc", "ACC", True, PER_IMAGE_MEAN,
               "accuracy: top-1 for a multi-class task, else of score >= the validation threshold, macro over "
               "classes", classification.accuracy, per_class=True, aliases=("accuracy",)),
    MetricSpec("f1", "F1", True, RECOMPUTED,
               "F1 of score >= the validation threshold (of the top-1 class for a multi-class task), macro over "
               "classes", classification.threshold_metrics, per_class=True),
    MetricSpec("mcc", "MCC", True, RECOMPUTED,
               "Matthews correlation of score >= the validation threshold, macro over classes (multi-class MCC of "
               "the top-1 class for a multi-class task)", classification.threshold_metrics, per_class=True,
               value_range=(-1.0, 1.0)),
    # Calibration of classification probabilities (vlpbench.protocols.calibration says where they are left out).
    MetricSpec("ece", "ECE", False, RECOMPUTED,
               "expected calibration error, 15 equal-width bins (Guo et al. 2017): of each class's probability "
               "of presence, macro over classes; of the top-label confidence for a multi-class task",
               calibration.expected_calibration_error, per_class=True),
    MetricSpec("adaptive_ece", "ECE (equal mass)", False, RECOMPUTED,
               "expected calibration error with 15 equal-mass bins (Nixon et al. 2019's adaptive bins), per "
               "class and macro, or of the top-label confidence for a multi-class task",
               calibration.expected_calibration_error, per_class=True),
    MetricSpec("brier", "Brier", False, RECOMPUTED,
               "Brier score: mean squared error of each class's probability of presence, macro over classes; "
               "for a multi-class task summed over classes (range 0-2)", calibration.brier_score, per_class=True,
               value_range=(0.0, 2.0)),
    # Grounding, per query; Dice is the segmentation one above.
    MetricSpec("pointing_game", "Pointing game", True, PER_IMAGE_MEAN,
               "share of queries whose heat-map maximum lies in the ground-truth region", grounding.pointing_game),
    MetricSpec("recall", "Recall", True, PER_IMAGE_MEAN,
               "pixel recall: share of ground-truth pixels inside the thresholded heat map, mean over queries",
               grounding.recall),
    MetricSpec("iou", "IoU", True, PER_IMAGE_MEAN,
               "IoU of the thresholded heat map and the ground truth, mean over queries", grounding.iou),
    MetricSpec("cnr", "CNR", True, PER_IMAGE_MEAN,
               "BioViL's contrast-to-noise ratio of the heat map inside vs outside the ground truth, mean over "
               "queries where it is defined", grounding.cnr, value_range=(0.0, math.inf)),
    # CheXlocalize grounding (vlpbench.protocols.grounding_pathologies): per pathology, then macro over pathologies.
    MetricSpec("miou", "mIoU", True, RECOMPUTED,
               "CheXlocalize mIoU: IoU of the heat map thresholded per pathology, over queries with a non-empty "
               "prediction, mean per pathology, then macro over pathologies", grounding.true_positive_iou,
               per_class=True),
    MetricSpec("hit_rate", "Hit rate", True, RECOMPUTED,
               "CheXlocalize hit rate: share of queries whose first heat-map maximum lies in the mask, per "
               "pathology, then macro over pathologies", grounding.hit, per_class=True),
):
    register_metric(_spec)

# Retrieval, per direction (vlpbench.metrics.retrieval): the query images (i2t) or texts (t2i) are the sample.
for _direction, _words in retrieval.DIRECTION_WORDS.items():
    _short = _direction.upper()
    for _k in retrieval.RECALL_AT:
        register_metric(MetricSpec(
            retrieval.metric_name(_direction, "r", _k), f"{_short} R@{_k}", True, PER_IMAGE_MEAN,
            f"{_words} Recall@{_k}: share of queries with a relevant candidate in the top {_k} (ties pessimistic)"))
    for _k in retrieval.PRECISION_AT:
        register_metric(MetricSpec(
            retrieval.metric_name(_direction, "p", _k), f"{_short} P@{_k}", True, PER_IMAGE_MEAN,
            f"{_words} Precision@{_k}: share of relevant candidates in the top {_k}, mean over queries "
            "(ties pessimistic)"))
    register_metric(MetricSpec(
        retrieval.metric_name(_direction, "medr"), f"{_short} MedR", False, RECOMPUTED,
        f"{_words} median rank of the first relevant candidate (ties pessimistic)", percent=False,
        value_range=(1.0, math.inf)))
    register_metric(MetricSpec(
        retrieval.metric_name(_direction, "meanr"), f"{_short} MeanR", False, PER_IMAGE_MEAN,
        f"{_words} mean rank of the first relevant candidate (ties pessimistic)", percent=False,
        value_range=(1.0, math.inf)))

__all__ = ["MetricSpec", "bootstrap_ci", "dice", "dice_per_image", "metric_spec", "register_metric"]
