"""The numbers of a result record, checked when it is read: what :func:`vlpbench.results.load_record` adds to
the record's structure check, so that no table, plot or comparison shows a number the record cannot hold.

* provenance beyond the structure check: ``env.vlpbench``, the version that wrote the record;
* ``metrics``: each value a finite number (not a string, not a bool, not NaN) or null, within the metric's
  declared ``value_range`` (:class:`vlpbench.metrics.specs.MetricSpec`);
* ``ci``: null or ``{metric: {low, high, ...}}`` with each bound a finite number in that range or null (the
  writer stores a NaN bound as null), and ``low <= high``;
* ``per_image``: null or ``{id: finite number}``;
* consistency: the aggregate a record's ``per_image`` scores summarise equals their mean (segmentation and
  grounding ``dice``, multi-class ``acc``, retrieval's ``config.per_image_metric``) within the rounding of
  the written values; MGCA's batch-averaged Dice (``config.dice_average: batch``) equals the mean of the
  means of consecutive ``config.batch_size`` scores in record order; and segmentation's mean Dice splits
  into its positive and empty halves (``all_empty_baseline`` weighs them).

A record whose aggregate was edited while its per-image scores were left as they were contradicts itself,
and is refused rather than half-believed.
"""

from __future__ import annotations

import math
from typing import Any

from vlpbench.errors import ConfigError
from vlpbench.metrics.specs import MetricSpec, metric_spec

# Values are written rounded to 6 decimals (vlpbench.results), so a mean of rounded scores and a rounded mean
# differ by up to 1e-6; anything beyond this is an edit, not rounding.
CONSISTENCY_TOL = 1e-5


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool (True would read as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def values_problem(record: dict) -> str | None:
    """The first number in ``record`` that it cannot hold (module docstring), as a message naming the key, or
    None. ``record`` has passed :func:`vlpbench.results._problem` (its structure is known)."""
    return (_provenance_problem(record) or _metrics_problem(record["metrics"]) or _ci_problem(record.get("ci"))
            or _per_image_problem(record.get("per_image")) or _consistency_problem(record))


def _spec(where: str, name: Any) -> tuple[MetricSpec | None, str | None]:
    try:
        return metric_spec(name), None
    except ConfigError as error:
        return None, f"invalid key '{where}.{name}': {error}"


def _value_problem(key: str, value: Any, spec: MetricSpec) -> str | None:
    if value is None:
        return None
    if not is_number(value):
        return f"invalid key {key!r}: expected a finite number or null, got {value!r}"
    low, high = spec.value_range
    if not low <= value <= high:
        return f"invalid key {key!r}: {value!r} is outside the range of {spec.name} {spec.range_text()}"
    return None


def _provenance_problem(record: dict) -> str | None:
    version = record["env"].get("vlpbench")
    if not isinstance(version, str) or not version:
        return f"invalid key 'env.vlpbench': expected the version of vlpbench that wrote the record, got {version!r}"
    return None


def _metrics_problem(metrics: dict) -> str | None:
    for name, value in metrics.items():
        spec, problem = _spec("metrics", name)
        problem = problem or _value_problem(f"metrics.{name}", value, spec)
        if problem:
            return problem
    return None


def _ci_problem(ci: Any) -> str | None:
    if ci is None:
        return None
    if not isinstance(ci, dict):
        return f"invalid key 'ci': expected null or an object, got {ci!r}"
    for name, entry in ci.items():
        spec, problem = _spec("ci", name)
        if problem:
            return problem
        if not isinstance(entry, dict) or "low" not in entry or "high" not in entry:
            return f"invalid key 'ci.{name}': expected an object with low and high, got {entry!r}"
        for bound in ("low", "high"):
            problem = _value_problem(f"ci.{name}.{bound}", entry[bound], spec)
            if problem:
                return problem
        if entry["low"] is not None and entry["high"] is not None and entry["low"] > entry["high"]:
            return f"invalid key 'ci.{name}': low {entry['low']!r} is above high {entry['high']!r}"
    return None


def _per_image_problem(per_image: Any) -> str | None:
    if per_image is None:
        return None
    if not isinstance(per_image, dict):
        return f"invalid key 'per_image': expected null or an object, got {per_image!r}"
    for image_id, value in per_image.items():
        if not is_number(value):
            return f"invalid key 'per_image.{image_id}': expected a finite number, got {value!r}"
    return None


def summarised_metric(record: dict) -> str | None:
    """The metric of ``record`` whose value is the plain mean of its ``per_image`` scores, or None: retrieval's
    ``config.per_image_metric``, else ``dice`` (segmentation, grounding) unless MGCA's batch average, else
    ``acc`` (a multi-class task: its ``per_image`` is top-1 correctness)."""
    config, metrics = record["config"], record["metrics"]
    if isinstance(config.get("per_image_metric"), str):
        return config["per_image_metric"]
    if "dice" in metrics:
        return None if config.get("dice_average") == "batch" else "dice"
    return next((name for name in ("acc", "accuracy") if name in metrics), None)


def _consistency_problem(record: dict) -> str | None:
    scores = list((record.get("per_image") or {}).values())
    if not scores:
        return None
    metrics, chosen = record["metrics"], record["config"].get("per_image_metric")
    if chosen is not None and not isinstance(chosen, str):
        return f"invalid key 'config.per_image_metric': expected a metric name, got {chosen!r}"
    mean = math.fsum(scores) / len(scores)
    name = summarised_metric(record)
    if name is not None and name in metrics and metrics[name] is None:
        return (f"invalid key 'metrics.{name}': null, but the record's {len(scores)} per_image scores average "
                f"{mean:.6f}; the record contradicts itself")
    if name is not None and metrics.get(name) is not None and abs(metrics[name] - mean) > CONSISTENCY_TOL:
        return (f"invalid key 'metrics.{name}': {metrics[name]!r} is not the mean of the record's {len(scores)} "
                f"per_image scores ({mean:.6f}); the record contradicts itself")
    return _batch_dice_problem(record, scores) or _dice_halves_problem(metrics, mean)


def _batch_dice_problem(record: dict, scores: list[float]) -> str | None:
    """MGCA's Dice: the mean of the means of consecutive test batches, in the record's (test) order."""
    config, dice = record["config"], record["metrics"].get("dice")
    batch = config.get("batch_size")
    if config.get("dice_average") != "batch" or dice is None:
        return None
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        return f"invalid key 'config.batch_size': dice_average is batch, so expected a positive integer, got {batch!r}"
    means = [math.fsum(scores[i:i + batch]) / len(scores[i:i + batch]) for i in range(0, len(scores), batch)]
    expected = math.fsum(means) / len(means)
    if abs(dice - expected) > CONSISTENCY_TOL:
        return (f"invalid key 'metrics.dice': {dice!r} is not the mean of the means of batches of {batch} of the "
                f"record's per_image scores ({expected:.6f}, dice_average: batch); the record contradicts itself")
    return None


def _dice_halves_problem(metrics: dict, mean: float) -> str | None:
    """Segmentation: mean Dice over images = (1 − b)·dice_positive + b·empty_correct, b the all-empty baseline."""
    if "all_empty_baseline" not in metrics or metrics["all_empty_baseline"] is None:
        return None
    empty = metrics["all_empty_baseline"]
    halves = ((1.0 - empty, "dice_positive"), (empty, "empty_correct"))
    if any(weight > 0 and metrics.get(name) is None for weight, name in halves):
        return None  # an older record or a half left out: nothing to weigh
    expected = math.fsum(weight * metrics[name] for weight, name in halves if weight > 0)
    if abs(expected - mean) > CONSISTENCY_TOL:
        return (f"invalid key 'metrics': dice_positive and empty_correct weighted by all_empty_baseline give "
                f"{expected:.6f}, but the record's per_image scores average {mean:.6f}; the record contradicts "
                "itself")
    return None
