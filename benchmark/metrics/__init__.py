"""Metrics with pinned definitions, each tested against an independent reference.

* :mod:`~vlpbench.metrics.dice`: per-image Dice at a threshold, empty/empty = 1, mean over images.
* :mod:`~vlpbench.metrics.detection`: COCO-style mAP (pycocotools semantics) over IoU 0.40:0.05:0.75,
  every test image counted, and MGCA's image skipping as an option.
* :mod:`~vlpbench.metrics.classification`: AUC (scikit-learn's tie handling), top-1 accuracy, and
  F1 / accuracy / MCC at a threshold chosen on validation data.
* :mod:`~vlpbench.metrics.grounding`: pointing game, pixel recall, IoU, Dice and BioViL's CNR of
  heat maps against ground-truth regions.
* :mod:`~vlpbench.metrics.bootstrap`: percentile bootstrap CIs over images, for per-image scores or
  for a statistic recomputed on each resample.

Metrics are registered in :data:`vlpbench.registry.METRICS` under the names task files and records
use.
"""

from __future__ import annotations

from vlpbench.metrics.bootstrap import bootstrap_ci
from vlpbench.metrics.dice import dice, dice_per_image
from vlpbench.registry import METRICS

METRICS.register("dice", "vlpbench.metrics.dice:dice")
METRICS.register("map", "vlpbench.metrics.detection:detection_map")
METRICS.register("auc", "vlpbench.metrics.classification:macro_auc")
METRICS.register("accuracy", "vlpbench.metrics.classification:accuracy")
METRICS.register("pointing_game", "vlpbench.metrics.grounding:pointing_game")
METRICS.register("recall", "vlpbench.metrics.grounding:recall")
METRICS.register("iou", "vlpbench.metrics.grounding:iou")
METRICS.register("cnr", "vlpbench.metrics.grounding:cnr")

__all__ = ["bootstrap_ci", "dice", "dice_per_image"]
