"""What a metric is, once: its name, how tables print it, which way is better and how its CI is drawn.

Every metric a protocol reports is a :class:`MetricSpec` registered in :data:`vlpbench.registry.METRICS`
(the built-in ones in :mod:`vlpbench.metrics`). Protocols, task files, result records, tables,
``compare``, plots and the leaderboard all name metrics as the specs do, and read display names and
directions from them; :func:`metric_spec` resolves any name a record can hold:

* a registered name (``dice``, ``map``, ``acc``, ...);
* a former name of one (its ``aliases``): records written before a rename still read, as the current
  name (``accuracy`` is read as ``acc``);
* ``<metric>_<class slug>``: one class of a metric reported per class (``auc_pleural_effusion``);
* ``ap<IoU × 100>``: detection AP at one IoU threshold (``ap40`` ... ``ap75``).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, replace
from typing import Callable

from vlpbench.errors import ConfigError
from vlpbench.metrics.detection import detection_map
from vlpbench.registry import METRICS

# How a metric's bootstrap CI over test images is drawn (vlpbench.metrics.bootstrap.bootstrap_ci).
PER_IMAGE_MEAN = "per-image mean"  # the metric is a mean of per-image scores: resample the scores
RECOMPUTED = "recomputed"  # not a mean of per-image scores (AUC, F1, MCC, mAP): recompute it on every resample
CI_METHODS = (PER_IMAGE_MEAN, RECOMPUTED)

_CLASS_SLUG = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")
_AP_AT_IOU = re.compile(r"ap(\d{2})")


@dataclass(frozen=True)
class MetricSpec:
    """One metric as every part of vlpbench names, prints, ranks and bootstraps it.

    Attributes:
        name: the key in a protocol's ``metrics``, a record and a task file (``acc``).
        display: the name tables, plots and the leaderboard print (``ACC``).
        higher_is_better: the metric's direction; a task's direction is its primary metric's.
        ci: :data:`PER_IMAGE_MEAN` or :data:`RECOMPUTED`.
        description: one line: what the metric measures.
        function: the function that computes it, or that returns a dict holding it under ``name``;
            None where a protocol computes it inline.
        per_class: the metric is also reported per class as ``<name>_<class slug>``.
        aliases: names that earlier versions wrote in records for this metric.
        percent: the metric is a share in [0, 1] that tables print ×100; False for one printed in its own
            units (a rank).
        value_range: the closed interval ``(low, high)`` every value of the metric lies in (``math.inf`` for no
            bound); a record holding a value outside it is refused when read (vlpbench.results).
    """

    name: str
    display: str
    higher_is_better: bool
    ci: str
    description: str
    function: Callable | None = None
    per_class: bool = False
    aliases: tuple[str, ...] = ()
    percent: bool = True
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.ci not in CI_METHODS:
            raise ConfigError(f"metric {self.name!r}: ci {self.ci!r}; expected one of {', '.join(CI_METHODS)}")
        low, high = self.value_range
        if math.isnan(low) or math.isnan(high) or low > high:
            raise ConfigError(f"metric {self.name!r}: value_range {self.value_range!r}; expected (low, high) "
                              "with low <= high")

    def range_text(self) -> str:
        """The value range as a message names it: ``[0, 1]``, ``[1, inf)``."""
        low, high = self.value_range
        return f"{'(' if low == -math.inf else '['}{low:g}, {high:g}{')' if high == math.inf else ']'}"


def register_metric(spec: MetricSpec) -> None:
    """Register ``spec`` in :data:`~vlpbench.registry.METRICS` (a plug-in protocol registers its own metrics).

    Raises:
        ConfigError: its name or one of its aliases is already a metric's name or alias.
        RegistryError: another spec is registered under its name.
    """
    taken = {alias: other.name for other in map(METRICS.get, METRICS) if other.name != spec.name
             for alias in (other.name, *other.aliases)}
    for name in (spec.name, *spec.aliases):
        if name in taken:
            raise ConfigError(f"metric {spec.name!r}: {name!r} already names metric {taken[name]!r}")
    METRICS.register(spec.name, spec)


def former_names() -> dict[str, str]:
    """Each former metric name (an alias) → the metric's current name: ``{"accuracy": "acc"}``."""
    return {alias: spec.name for spec in map(METRICS.get, METRICS) for alias in spec.aliases}


def _registered(name: str) -> MetricSpec | None:
    current = former_names().get(name, name)
    return METRICS.get(current) if current in METRICS else None


def _per_class(name: str) -> MetricSpec | None:
    """``<metric>_<class slug>`` of a metric reported per class."""
    for cut in (m.start() for m in re.finditer("_", name)):
        base, slug = _registered(name[:cut]), name[cut + 1:]
        if base is not None and base.per_class and _CLASS_SLUG.fullmatch(slug):
            return replace(base, name=f"{base.name}_{slug}", display=f"{base.display} ({slug})",
                           description=f"{base.description}; class {slug} alone", per_class=False, aliases=())
    return None


def _ap_at_iou(name: str) -> MetricSpec | None:
    """``ap<IoU × 100>``: the AP at one IoU threshold of the detection mAP."""
    match = _AP_AT_IOU.fullmatch(name)
    if match is None:
        return None
    iou = int(match.group(1)) / 100
    return MetricSpec(name, f"AP{match.group(1)}", True, RECOMPUTED,
                      f"COCO-style average precision at IoU {iou:.2f}, every test image counted", detection_map)


def metric_spec(name: str) -> MetricSpec:
    """The spec of a metric name as protocols, task files, records or ``--metrics`` give it.

    A former name (an alias) resolves to the current metric's spec, whose ``name`` is the one to use.

    Raises:
        ConfigError: ``name`` is no registered metric, alias, per-class metric or AP at an IoU threshold;
            the message lists the known names.

    Example:
        >>> metric_spec("accuracy").name, metric_spec("auc_pleural_effusion").display
        ('acc', 'AUC (pleural_effusion)')
    """
    if isinstance(name, str):
        spec = _registered(name) or _per_class(name) or _ap_at_iou(name)
        if spec is not None:
            return spec
    known = METRICS.names()
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    per_class = ", ".join(n for n in known if METRICS.get(n).per_class)
    raise ConfigError(f"unknown metric {name!r}.{hint} Known: {', '.join(known)}; per class: <metric>_<class slug> "
                      f"of {per_class}; per IoU threshold: ap<IoU x 100> (ap40 ... ap75)")
