"""Metrics with pinned definitions, each tested against an independent reference.

* :mod:`~vlpbench.metrics.dice`: per-image Dice at a threshold, empty/empty = 1, mean over images.
* :mod:`~vlpbench.metrics.bootstrap`: percentile bootstrap CIs over images, for per-image scores or
  for a statistic recomputed on each resample.

Metrics are registered in :data:`vlpbench.registry.METRICS` under the name a task file's
``primary_metric`` uses.
"""

from __future__ import annotations

from vlpbench.metrics.bootstrap import bootstrap_ci
from vlpbench.metrics.dice import dice, dice_per_image
from vlpbench.registry import METRICS

METRICS.register("dice", "vlpbench.metrics.dice:dice")

__all__ = ["bootstrap_ci", "dice", "dice_per_image"]
