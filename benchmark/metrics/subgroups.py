"""Subgroup performance: a metric per subgroup of the test items (sex, age bin, view, site), its bootstrap CI,
and the largest gap between subgroups with the CI of that difference.

A subgroup's metric is computed from the evaluation's :class:`~vlpbench.evidence.Evidence` (the same arrays
paired tests use): the evidence of the subgroup's items only (:meth:`Evidence.subset`) rebuilds every metric
with its protocol's code, so a subgroup's metric is exactly the protocol's metric computed on that subgroup's
items, and each resample costs the subgroup's size, not the test set's. Each item belongs to an image
(:attr:`Evidence.images`: a grounding query's image), whose attributes place it in a subgroup.

Resampling (:func:`subgroup_metrics`): within each subgroup, as a stratified bootstrap. Subgroups are
resampled in the order they are reported, all from one ``numpy.random.default_rng(seed)``: resample ``b``
of subgroup ``g`` is ``rng.integers(0, n_g, n_g)`` (its members' positions), drawn for ``b = 0, 1, ...``
before the next subgroup's. A subgroup's CI is the percentile interval of its resampled metric (resamples
where the metric is undefined skipped and counted); the gap between the best and the worst subgroup (by
their point values, ``unknown`` left out) is resampled as the difference of their metrics on the same
resample indices ``b``, resamples where either is undefined skipped.

A subgroup with fewer than ``min_items`` items, or (for a metric that needs them, :func:`requirement`) fewer
than ``min_positives`` positives or negatives of a class, reports why instead of a number: its CI would be
meaningless. A metric the evidence lists as untestable (its record value is no weighting of the items, as
MGCA's batch-averaged Dice) but still holds per item is reported per subgroup with that reason as a note.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from vlpbench.data.attributes import ATTRIBUTES, UNKNOWN
from vlpbench.errors import ConfigError
from vlpbench.evidence import Evidence

Statistic = Callable[[np.ndarray], float]  # item weights -> metric value (NaN: undefined)

# Age bin edges in years: <40, [40, 60), [60, 80), >=80.
DEFAULT_AGE_BINS = (40.0, 60.0, 80.0)
MIN_ITEMS = 10
MIN_POSITIVES = 5
# What a metric needs beyond MIN_ITEMS items: IMAGES nothing; POSITIVES enough positives of every class;
# BOTH enough positives and negatives of every class (AUC, MCC).
IMAGES, POSITIVES, BOTH = "images", "positives", "positives and negatives"


def requirement(evidence: Evidence, metric: str) -> str:
    """What ``metric`` of ``evidence`` needs in a subgroup beyond :data:`MIN_ITEMS` items: AUC and (of
    per-class decisions) MCC positives and negatives of every class, F1 and every detection AP positives, a
    segmentation's ``dice_positive`` positive images; top-1 metrics of a multi-class task and means over all
    images nothing (:data:`IMAGES`)."""
    if evidence.kind == "detection":
        return POSITIVES
    if evidence.kind == "per_item":
        return POSITIVES if metric == "dice_positive" else IMAGES
    if str(evidence.arrays["label_kind"]) == "multiclass":
        return {"auc": BOTH}.get(metric, IMAGES)
    return {"auc": BOTH, "mcc": BOTH, "f1": POSITIVES}.get(metric, IMAGES)


def _note(evidence: Evidence, metric: str) -> str | None:
    """How a subgroup's value of ``metric`` differs from the record's, where the evidence says it does."""
    for entry in evidence.untestable:
        name, _, why = entry.partition(":")
        if name == metric:
            return f"mean over {evidence.unit}s within each subgroup; the record's {metric} is not ({why.strip()})"
    return None


def age_bins(edges: Sequence[float] | None) -> tuple[float, ...]:
    """Age bin edges in years, checked: finite, strictly increasing, at least one. None gives
    :data:`DEFAULT_AGE_BINS`. Edges ``e0 < ... < ek`` make the bins ``<e0``, ``[e0,e1)``, ..., ``>=ek``.

    Raises:
        ConfigError: edges that are not finite increasing numbers.
    """
    if edges is None:
        return DEFAULT_AGE_BINS
    try:
        values = tuple(float(e) for e in edges)
    except (TypeError, ValueError):
        raise ConfigError(f"age bins {edges!r}: expected a list of numbers of years, e.g. [40, 60, 80]") from None
    if not values or not all(map(math.isfinite, values)) or any(b <= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"age bins {list(edges)!r}: expected finite, strictly increasing edges in years, "
                          "e.g. [40, 60, 80]")
    return values


def _edge(value: float) -> str:
    return f"{value:g}"


def age_labels(edges: Sequence[float]) -> list[str]:
    """The bin labels of ``edges`` in order: ``<40``, ``[40,60)``, ``[60,80)``, ``>=80``."""
    inner = [f"[{_edge(a)},{_edge(b)})" for a, b in zip(edges, edges[1:])]
    return [f"<{_edge(edges[0])}", *inner, f">={_edge(edges[-1])}"]


def group_of(attribute: str, value: Any, edges: Sequence[float]) -> str:
    """The subgroup label of one attribute value: the age bin of an age, else the value itself."""
    if value == UNKNOWN or attribute != "age":
        return str(value)
    return age_labels(edges)[int(np.searchsorted(np.asarray(edges), float(value), side="right"))]


def _ordered(attribute: str, labels: set[str], edges: Sequence[float]) -> list[str]:
    """Age bins in age order, other groups alphabetically; ``unknown`` last."""
    known = labels - {UNKNOWN}
    order = [g for g in age_labels(edges) if g in known] if attribute == "age" else sorted(known)
    return order + ([UNKNOWN] if UNKNOWN in labels else [])


def _too_few(evidence: Evidence, metric: str, members: np.ndarray, counted: np.ndarray, *, min_items: int,
             min_positives: int) -> str | None:
    """Why the subgroup ``members`` (item indices) gets no number, or None."""
    unit = evidence.unit
    if len(members) < min_items:
        return f"{len(members)} {unit}{'' if len(members) == 1 else 's'}, fewer than the {min_items} needed"
    need = requirement(evidence, metric)
    if need == IMAGES or (positives := evidence.positives()) is None:
        return None
    rows, classes = positives[0][members], positives[1]
    for k in np.flatnonzero(counted):
        found = int(rows[:, k].sum())
        negatives = len(members) - found
        name = classes[k] if len(classes) > 1 else "the class"
        if found < min_positives:
            return f"{found} positives of {name}, fewer than the {min_positives} needed"
        if need == BOTH and negatives < min_positives:
            return f"{negatives} negatives of {name}, fewer than the {min_positives} needed"
    return None


def _resampled(statistic: Statistic, n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The statistic of a subgroup's ``n`` items on ``n_resamples`` resamples of them (NaN where undefined or
    a ValueError)."""
    values = np.full(n_resamples, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate resample would warn on every draw
        for b in range(n_resamples):
            weights = np.bincount(rng.integers(0, n, n), minlength=n)
            try:
                values[b] = float(statistic(weights.astype(np.float64)))
            except ValueError:
                continue
    return values


def _interval(values: np.ndarray, level: float) -> dict[str, Any] | None:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    tail = (1.0 - level) / 2.0
    low, high = np.percentile(finite, [100.0 * tail, 100.0 * (1.0 - tail)])
    return {"low": float(low), "high": float(high), "skipped": int(values.size - finite.size)}


def _counts(evidence: Evidence, members: np.ndarray) -> dict[str, int] | None:
    if (positives := evidence.positives()) is None:
        return None
    return {name: int(total) for name, total in zip(positives[1], positives[0][members].sum(axis=0))}


def subgroup_metrics(evidence: Evidence, groups: Sequence[str], metric: str, *, n_resamples: int = 1000,
                     level: float = 0.95, seed: int = 0, min_items: int = MIN_ITEMS,
                     min_positives: int = MIN_POSITIVES, order: Sequence[str] | None = None) -> dict[str, Any]:
    """``metric`` per subgroup of the evidence's items (``groups[i]`` is item i's subgroup label), with
    bootstrap CIs, and the largest gap between subgroups with its CI (module docstring).

    Returns:
        ``{"metric", "groups": [{"group", "n", "positives"?, "value", "ci"} or {"group", "n", "positives"?,
        "value": None, "reason"}], "gap": {"high", "low", "value", "ci"} | None, "gap_reason"?, "n_resamples",
        "level", "seed", "min_items", "min_positives", "note"?}``. ``positives`` counts each class's positive
        items; ``gap.value`` is the best subgroup's value minus the worst's (>= 0), ``unknown`` left out.

    Raises:
        ConfigError: the evidence has no statistic of ``metric``, or ``groups`` has the wrong length.
    """
    if metric not in evidence.statistics():
        raise ConfigError(f"subgroups: no statistic for metric {metric!r}; the evaluation has "
                          f"{', '.join(evidence.statistics())}")
    n = evidence.n
    if len(groups) != n:
        raise ConfigError(f"subgroups: {len(groups)} subgroup labels for {n} test {evidence.unit}s")
    labels = np.asarray(groups, dtype=object)
    order = list(order) if order is not None else sorted(set(groups))
    counted = np.zeros(0, dtype=bool)
    if (positives := evidence.positives()) is not None:
        # The classes the metric counts on the whole test set (a macro AUC leaves out a class without positives).
        totals = positives[0].sum(axis=0)
        counted = (totals > 0) & ((totals < n) if requirement(evidence, metric) == BOTH else True)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    resamples: dict[str, np.ndarray] = {}
    for group in order:
        members = np.flatnonzero(labels == group)
        row: dict[str, Any] = {"group": group, "n": int(len(members))}
        if (found := _counts(evidence, members)) is not None:
            row["positives"] = found
        reason = _too_few(evidence, metric, members, counted, min_items=min_items, min_positives=min_positives)
        value = math.nan
        if reason is None:
            # The subgroup's own evidence: each resample costs its size, not the test set's (module docstring).
            statistic = evidence.subset(members).statistics()[metric]
            value = float(statistic(np.ones(len(members))))
            if not math.isfinite(value):
                reason = f"{metric} is undefined on this subgroup"
        if reason is not None:
            rows.append({**row, "value": None, "reason": reason})
            continue
        resamples[group] = _resampled(statistic, len(members), n_resamples, rng)
        rows.append({**row, "value": value, "ci": _interval(resamples[group], level)})

    result: dict[str, Any] = {"metric": metric, "groups": rows, "gap": None, "n_resamples": int(n_resamples),
                              "level": float(level), "seed": int(seed), "min_items": int(min_items),
                              "min_positives": int(min_positives)}
    if (note := _note(evidence, metric)) is not None:
        result["note"] = note
    scored = [r for r in rows if r["value"] is not None and r["group"] != UNKNOWN]
    if len(scored) < 2:
        result["gap_reason"] = (f"{len(scored)} subgroup(s) other than {UNKNOWN} have a value; a gap needs two")
        return result
    high = max(scored, key=lambda r: r["value"])
    low = min(scored, key=lambda r: r["value"])
    difference = resamples[high["group"]] - resamples[low["group"]]
    result["gap"] = {"high": high["group"], "low": low["group"], "value": high["value"] - low["value"],
                     "ci": _interval(difference, level)}
    return result


def attribute_groups(attribute: str, values: Sequence[Any], edges: Sequence[float]) -> tuple[list[str], list[str]]:
    """Each item's subgroup label for ``attribute`` (``values`` per item, ``unknown`` where absent), and the
    labels in report order."""
    labels = [group_of(attribute, value, edges) for value in values]
    return labels, _ordered(attribute, set(labels), edges)


def subgroup_report(evidence: Evidence, attributes: Mapping[str, Mapping[str, Any]], names: Sequence[str],
                    metric: str, *, edges: Sequence[float] = DEFAULT_AGE_BINS, n_resamples: int = 1000,
                    seed: int = 0, min_items: int = MIN_ITEMS, min_positives: int = MIN_POSITIVES) -> dict[str, Any]:
    """:func:`subgroup_metrics` of ``metric`` for every attribute of ``names``.

    ``attributes`` maps an image id to its attributes (:meth:`DatasetReader.attributes`); an image without an
    attribute is ``unknown`` for it. An attribute no test image carries gets ``{"reason": ...}``.

    Returns:
        ``{attribute: result}``; age results also hold ``age_bins`` (the edges).
    """
    report: dict[str, Any] = {}
    images = evidence.images
    for name in names:
        if name not in ATTRIBUTES:
            raise ConfigError(f"subgroups: unknown attribute {name!r}; expected one of {', '.join(ATTRIBUTES)}")
        values = [attributes.get(image_id, {}).get(name, UNKNOWN) for image_id in images]
        if all(v == UNKNOWN for v in values):
            report[name] = {"metric": metric, "reason": f"no test {evidence.unit}'s files give its {name}"}
            continue
        labels, order = attribute_groups(name, values, edges)
        report[name] = subgroup_metrics(evidence, labels, metric, n_resamples=n_resamples, seed=seed,
                                        min_items=min_items, min_positives=min_positives, order=order)
        if name == "age":
            report[name]["age_bins"] = list(edges)
    return report


def resolve_age_bins(given: Sequence[float] | None, config: Mapping[str, Any]) -> tuple[float, ...]:
    """The age bin edges of a run: ``given`` (``--age-bins``), else the task's ``subgroups: {age_bins: [...]}``,
    else :data:`DEFAULT_AGE_BINS`; checked by :func:`age_bins`."""
    if given is not None:
        return age_bins(given)
    stated = config.get("subgroups") or {}
    if not isinstance(stated, Mapping):
        raise ConfigError(f"task option subgroups must be a mapping such as {{age_bins: [40, 60, 80]}}, got {stated!r}")
    return age_bins(stated.get("age_bins"))


def check_attributes(wanted: Sequence[str] | None, available: Sequence[str], dataset: str) -> list[str]:
    """``wanted`` (``--by``), each one an attribute ``dataset`` has; None gives [].

    Raises:
        ConfigError: an unknown attribute, or one the dataset's files do not carry.
    """
    wanted = list(dict.fromkeys(wanted or ()))
    for name in wanted:
        if name not in ATTRIBUTES:
            raise ConfigError(f"--by {name}: expected one of {', '.join(ATTRIBUTES)}")
        if name not in available:
            raise ConfigError(f"--by {name}: dataset {dataset} has no {name} attribute; it has "
                              f"{', '.join(available) or 'none'}")
    return wanted


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _group_problem(row: Any) -> str | None:
    if not isinstance(row, dict) or not isinstance(row.get("group"), str) or not isinstance(row.get("n"), int):
        return f"a group must be an object with a string group and an integer n, got {row!r}"
    if row.get("value") is None:
        return None if isinstance(row.get("reason"), str) else f"group {row['group']!r} has no value and no reason"
    ci = row.get("ci")
    if not _is_number(row["value"]) or not (ci is None or (isinstance(ci, dict) and _is_number(ci.get("low"))
                                                             and _is_number(ci.get("high")))):
        return f"group {row['group']!r} needs a numeric value and a ci {{low, high}} or null"
    return None


def record_problem(value: Any) -> str | None:
    """Why ``value`` is not a valid record ``subgroups`` entry (``{attribute: result of subgroup_metrics, or
    {metric, reason}}``), or None."""
    if not isinstance(value, dict):
        return f"expected an object of attributes, got {value!r}"
    for name, result in value.items():
        if name not in ATTRIBUTES:
            return f"unknown attribute {name!r}; expected {', '.join(ATTRIBUTES)}"
        if not isinstance(result, dict) or not isinstance(result.get("metric"), str):
            return f"{name}: expected an object with a metric name"
        if "groups" not in result:
            if not isinstance(result.get("reason"), str):
                return f"{name}: expected groups or a reason"
            continue
        if not isinstance(result["groups"], list):
            return f"{name}: groups must be a list"
        for row in result["groups"]:
            if problem := _group_problem(row):
                return f"{name}: {problem}"
        gap = result.get("gap")
        if gap is not None and not (isinstance(gap, dict) and _is_number(gap.get("value"))):
            return f"{name}: gap must be null or an object with a numeric value"
    return None
