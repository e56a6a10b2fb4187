"""Paired significance between models on one task (``vlpbench significance``) and the table's lead marks.

Two records are paired only when they scored the same test items the same way: the same task name and
version, protocol profile, training fraction, split sha256 (and ``test_sha256`` of a test set derived
from the user's files), the same test ids and identical labels (ground-truth boxes for detection);
anything else is refused with what differs. Each metric is then tested on the items both models scored
(:mod:`vlpbench.metrics.significance`):

* a single-curve AUC (a one-class task's ``auc``, and every per-class ``auc_<class>``): DeLong's test;
  the paired bootstrap is computed too (JSON ``bootstrap``);
* every other metric: the paired bootstrap of the difference (per-item means vectorised; AUC macro
  over classes, F1, MCC, ECE, Brier, mAP and retrieval's median rank recomputed on every resample), 2,000
  resamples, seed 0. Retrieval pairs the query images: its text→image metrics are untested.

What each metric is recomputed from is the record's evidence sidecar (:mod:`vlpbench.evidence`); a
record without one (written before sidecars existed) offers only its primary metric, from its
``per_image`` scores, where that metric is a per-image mean; every other metric is listed as
untested, with the reason, never given a number. A recomputed metric must reproduce the record's value.

**Seeds.** A paired test compares one run per model: it measures how much the difference could move
with the test images (test-set sampling), not with training seeds. Where a model has records of several
seeds, ``--seed`` picks the one to pair (every model at that seed); without it the command refuses
and lists the seeds, rather than pool seeds in a way no test here accounts for.

**Multiplicity.** For each metric, Holm's correction runs over the pairs tested for it (``k`` models
give ``k (k − 1) / 2``); ``*`` marks an adjusted p-value at most α.

**Tables.** :func:`mark_significant_leads` marks a best cell whose lead over the second best is
significant: the records of the lowest seed both cells hold are paired, the same tests run, and Holm's
correction goes over the columns tested in that table; a footnote names the test, α and correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlpbench.errors import ConfigError, DataError, VlpbenchError
from vlpbench.evidence import REPRODUCE_TOL, Evidence, per_image_evidence, read_evidence
from vlpbench.metrics.significance import DELONG, PAIRED_BOOTSTRAP, delong, holm, paired_bootstrap, \
    paired_bootstrap_means
from vlpbench.metrics.specs import metric_spec
from vlpbench.report.layout import percent_label, version_label
from vlpbench.results import record_path, record_profile

DEFAULT_ALPHA = 0.05
DEFAULT_RESAMPLES = 2000
TABLE_RESAMPLES = 1000  # per best-vs-second test of a table: a table tests one pair per column
BOOTSTRAP_SEED = 0


@dataclass
class Entrant:
    """One model's record in a comparison and the evidence its metrics are recomputed from."""

    label: str
    record: dict
    evidence: Evidence | None
    note: str = ""  # where the evidence comes from, or why there is none

    @property
    def metrics(self) -> dict[str, float | None]:
        """The record's metrics under their current names."""
        return {metric_spec(name).name: value for name, value in self.record["metrics"].items()}


def entrant(record: dict, results_dir: str | Path | None, label: str | None = None) -> Entrant:
    """The record with its evidence: the sidecar where the record names one and ``results_dir`` locates it,
    else the record's ``per_image`` scores (its primary metric only), else none.

    Raises:
        DataError: the record names a sidecar that is missing, changed or not its own.
    """
    label = label or record["model"]["name"]
    if record.get("evidence") and results_dir is not None:
        evidence = read_evidence(record, record_path(results_dir, record))
        return Entrant(label, record, evidence, f"evidence sidecar {evidence.source}")
    evidence = per_image_evidence(record)
    if evidence is not None:
        return Entrant(label, record, evidence, f"per_image scores ({record['primary_metric']} only)")
    why = ("its evidence sidecar is not located (no results folder given)" if record.get("evidence") else
           "it has no evidence sidecar (written before sidecars, or by another tool) and no per_image scores "
           "of a per-image-mean primary metric")
    return Entrant(label, record, None, why)


def pair_problems(a: dict, b: dict) -> list[str]:
    """Why records ``a`` and ``b`` did not score the same test items the same way (empty: pairable)."""
    def describe(record: dict) -> dict[str, Any]:
        task, split = record["task"], record["split"]
        return {"task": task["name"], "task version": version_label(task["version"]),
                "protocol profile": record_profile(record), "fraction": round(float(record["frac"]), 6),
                "split sha256": split["sha256"], "test set sha256": split.get("test_sha256")}

    left, right = describe(a), describe(b)
    return [f"{key} {left[key]} ({a['model']['name']}) vs {right[key]} ({b['model']['name']})"
            for key in left if left[key] != right[key]]


def _alignment(a: Evidence, b: Evidence) -> tuple[np.ndarray | None, str | None]:
    """``perm`` with ``b.ids[k] == a.ids[perm[k]]``, or why the items differ."""
    if len(set(a.ids)) != a.n or len(set(b.ids)) != b.n:
        return None, "an evidence holds an item id twice"
    if set(a.ids) != set(b.ids):
        only_a, only_b = sorted(set(a.ids) - set(b.ids)), sorted(set(b.ids) - set(a.ids))
        return None, (f"the test items differ: {len(only_a)} only in the first, {len(only_b)} only in the second "
                      f"(e.g. {', '.join((only_a or only_b)[:3])})")
    position = {item: k for k, item in enumerate(a.ids)}
    return np.array([position[item] for item in b.ids], dtype=np.int64), None


def evidence_alignment(a: Evidence, b: Evidence) -> tuple[np.ndarray | None, str | None]:
    """``perm`` with ``b.ids[k] == a.ids[perm[k]]`` where both evidences hold the same test items with the
    same labels; else why they cannot be paired."""
    perm, problem = _alignment(a, b)
    if problem is None and _truth_differs(a, b, perm):
        return None, "the labels of the test items differ"
    return perm, problem


def _truth_differs(a: Evidence, b: Evidence, perm: np.ndarray) -> bool:
    """Whether the labels (detection: ground-truth boxes) of the aligned items differ."""
    if a.kind != b.kind or not a.truth() or not b.truth():
        return False  # per_image fallback evidence carries no labels: compared where both have them
    if a.kind == "detection":
        (boxes_a, image_a), (boxes_b, image_b) = a.truth(), b.truth()
        return any(not np.array_equal(boxes_a[image_a == perm[k]], boxes_b[image_b == k]) for k in range(b.n))
    labels_a, labels_b = a.truth()[0], b.truth()[0]
    return labels_a.shape != labels_b.shape or not np.array_equal(labels_a[perm], labels_b)


@dataclass
class PairTest:
    """One metric of one pair: ``diff`` = metric(a) − metric(b) with its CI and p-values, or why untested."""

    a: str
    b: str
    metric: str
    test: str | None = None  # PAIRED_BOOTSTRAP or DELONG
    result: dict | None = None
    bootstrap: dict | None = None  # the paired bootstrap beside a DeLong result
    p_holm: float | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "metric": self.metric, "test": self.test, "result": self.result,
                "bootstrap": self.bootstrap, "p_holm": self.p_holm, "untested": self.reason}


def _reproduces(entrant_: Entrant, metric: str, value: float) -> str | None:
    recorded = entrant_.metrics.get(metric)
    if recorded is None or not math.isfinite(value) or abs(value - recorded) > REPRODUCE_TOL:
        return (f"{entrant_.label}'s evidence gives {metric} = {value:.6f}, its record {recorded}: the evidence "
                "does not reproduce the record")
    return None


def test_pair(a: Entrant, b: Entrant, metric: str, *, level: float = 1 - DEFAULT_ALPHA,
              n_resamples: int = DEFAULT_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> PairTest:
    """Test ``metric(a) − metric(b)`` on the items both records scored (module docstring).

    An untested pair comes back with ``reason`` set: records that are not pairable, evidence missing for the
    metric, or evidence that does not reproduce a record's value.
    """
    pair = PairTest(a.label, b.label, metric)
    problems = pair_problems(a.record, b.record)
    if problems:
        pair.reason = "not pairable: " + "; ".join(problems)
        return pair
    for side in (a, b):
        if side.metrics.get(metric) is None:
            pair.reason = f"{side.label}'s record has no value of {metric}"
            return pair
        if side.evidence is None:
            pair.reason = f"no evidence for {metric} in {side.label}'s record: {side.note}"
            return pair
        why = [u for u in side.evidence.untestable if u.split(":")[0] == metric]
        if why:
            pair.reason = f"{side.label}: {why[0]}"
            return pair
    perm, problem = evidence_alignment(a.evidence, b.evidence)
    if problem is not None:
        pair.reason = "not pairable: " + problem
        return pair

    values_a, values_b = a.evidence.item_values(metric), b.evidence.item_values(metric)
    if values_a is not None and values_b is not None:
        aligned = np.empty_like(values_b)
        aligned[perm] = values_b
        for side, values in ((a, values_a), (b, aligned)):
            if (why := _reproduces(side, metric, float(np.nanmean(values)))) is not None:
                pair.reason = why
                return pair
        result = paired_bootstrap_means(values_a, aligned, n_resamples=n_resamples, level=level, seed=seed)
    else:
        statistic_a = a.evidence.statistics().get(metric)
        statistic_b = b.evidence.statistics().get(metric)
        if statistic_a is None or statistic_b is None:
            side = a if statistic_a is None else b
            pair.reason = (f"no evidence for {metric} in {side.label}'s record: {side.note} holds no statistic "
                           "of it")
            return pair
        n = a.evidence.n
        for side, statistic in ((a, statistic_a), (b, lambda w: statistic_b(w[perm]))):
            if (why := _reproduces(side, metric, float(statistic(np.ones(n))))) is not None:
                pair.reason = why
                return pair
        result = paired_bootstrap(statistic_a, lambda w: statistic_b(np.asarray(w)[perm]), n,
                                  n_resamples=n_resamples, level=level, seed=seed)
    pair.test, pair.result = PAIRED_BOOTSTRAP, result
    curve_a, curve_b = a.evidence.auc_curves().get(metric), b.evidence.auc_curves().get(metric)
    if curve_a is not None and curve_b is not None:
        scores_b = np.empty_like(curve_b[1])
        scores_b[perm] = curve_b[1]
        pair.bootstrap, pair.test = result, DELONG
        pair.result = delong(curve_a[0], curve_a[1], scores_b, level=level)
    return pair


def holm_adjust(tests: Sequence[PairTest]) -> None:
    """Set ``p_holm`` of the tested pairs in ``tests``, one Holm family."""
    tested = [t for t in tests if t.result is not None]
    for t, adjusted in zip(tested, holm([t.result["p_value"] for t in tested])):
        t.p_holm = adjusted


# --- vlpbench significance ---------------------------------------------------------------------------------


@dataclass
class SignificanceReport:
    """The pairwise tests of several models on one task and fraction (``vlpbench significance``)."""

    task: str
    version: Any
    profile: str
    frac: float
    models: list[str]
    seeds: dict[str, int]
    evidence: dict[str, str]
    n_items: int | None
    alpha: float
    n_resamples: int
    values: dict[str, dict[str, float | None]] = field(default_factory=dict)  # model -> its record's metrics
    tests: dict[str, list[PairTest]] = field(default_factory=dict)  # metric -> pairs

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return {"task": self.task, "version": self.version, "profile": self.profile, "frac": self.frac,
                "models": self.models, "seeds": self.seeds, "evidence": self.evidence, "n_items": self.n_items,
                "values": {m: {metric: self.values[m].get(metric) for metric in self.tests} for m in self.models},
                "alpha": self.alpha, "correction": "holm (per metric, over the pairs tested)",
                "bootstrap": {"resamples": self.n_resamples, "seed": BOOTSTRAP_SEED,
                              "p_value": "(1 + #{|d* - d| >= |d|}) / (B + 1), d* centred on d under H0"},
                "tests": {metric: [t.as_dict() for t in pairs] for metric, pairs in self.tests.items()}}

    def text(self) -> str:
        """The readable matrices: per metric, row − column with CI and Holm-adjusted p."""
        level = f"{100 * (1 - self.alpha):g}%"
        lines = [f"Paired significance: {self.task} {version_label(self.version)} ({self.profile}), "
                 f"{percent_label(self.frac)}, {self.n_items if self.n_items is not None else '?'} test items",
                 *(f"  {m}: seed {self.seeds[m]}, {self.evidence[m]}" for m in self.models)]
        for metric, pairs in self.tests.items():
            spec = metric_spec(metric)
            methods = sorted({t.test for t in pairs if t.test})
            values = ", ".join(f"{m} {_value(self.values[m].get(metric))}" for m in self.models)
            lines += ["", f"{spec.display} ({metric}, {'higher' if spec.higher_is_better else 'lower'} is better): "
                      f"{' / '.join(methods) or 'no pair tested'}; Holm over {sum(t.result is not None for t in pairs)}"
                      f" pair(s), α = {self.alpha:g}", f"  values: {values}"]
            lines += _matrix(self.models, pairs, self.alpha)
            lines += [f"  untested {t.a} vs {t.b}: {t.reason}" for t in pairs if t.reason]
        lines += ["", f"Cells: row − column in metric units, [{level} CI], p Holm-adjusted (raw); * p_holm ≤ "
                      f"{self.alpha:g}. Paired bootstrap: {self.n_resamples} resamples of the test items, seed "
                      f"{BOOTSTRAP_SEED}, p = (1 + #{{|d* − d| ≥ |d|}}) / (B + 1). DeLong: normal z on the "
                      "structural-component variance. Test-set sampling only: training-seed variation is not in "
                      "these numbers."]
        return "\n".join(lines) + "\n"


def _value(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _matrix(models: list[str], pairs: list[PairTest], alpha: float) -> list[str]:
    by_pair = {(t.a, t.b): t for t in pairs}
    table = [["", *models[1:]]]
    for i, row in enumerate(models[:-1]):
        line = [row]
        for j, column in enumerate(models[1:], start=1):
            t = by_pair.get((row, column))
            if j <= i or t is None:
                line.append("")
            elif t.result is None:
                line.append("untested")
            else:
                r = t.result
                mark = "*" if t.p_holm <= alpha else ""
                line.append(f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}] p={_p(t.p_holm)}{mark} "
                            f"({_p(r['p_value'])})")
        table.append(line)
    widths = [max(len(line[k]) for line in table) for k in range(len(table[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]


def _choose(records: list[dict], models: Sequence[str], seed: int | None) -> dict[str, dict]:
    """Per model, the one record to pair (module docstring, Seeds)."""
    chosen = {}
    for model in models:
        mine = [r for r in records if r["model"]["name"] == model]
        if seed is not None:
            held = sorted({r["seed"] for r in mine})
            mine = [r for r in mine if r["seed"] == seed]
            if not mine:
                raise DataError(f"--seed {seed}: model {model} has no record of that seed here (seeds: "
                                f"{', '.join(map(str, held))})")
        if len(seeds := sorted({r["seed"] for r in mine})) > 1:
            raise ConfigError(f"model {model} has records of seeds {', '.join(map(str, seeds))}; a paired test "
                              "compares one run per model (test-set variation only, seeds are not pooled): pass "
                              "--seed S to pair the records of one seed")
        if len(mine) > 1:
            raise DataError(f"model {model} has {len(mine)} records of seed {mine[0]['seed']} here (different "
                            "checkpoints, overrides or precision); give them distinct names (run --name) to compare "
                            "them")
        chosen[model] = mine[0]
    return chosen


def significance_report(records: list[dict], *, task: str, frac: float, models: Sequence[str],
                        results_dir: str | Path | None = None, metrics: Sequence[str] | None = None,
                        seed: int | None = None, profile: str | None = None, alpha: float = DEFAULT_ALPHA,
                        n_resamples: int = DEFAULT_RESAMPLES) -> SignificanceReport:
    """Pairwise paired tests of ``models`` on ``task`` at ``frac`` (module docstring).

    ``metrics``: default the task's primary metric. ``seed``: the run seed whose records are paired (needed
    where a model has several). ``profile``: needed where the records span protocol profiles.

    Raises:
        ConfigError: fewer than two models, a bad α, several seeds without ``seed``, several profiles
            without ``profile``, or a metric that is unknown.
        DataError: a model without a record here, or records that are not pairable (what differs is named).
    """
    models = list(dict.fromkeys(models))
    if len(models) < 2:
        raise ConfigError(f"--models {','.join(models)}: name at least two models to compare")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"--alpha {alpha}: expected a level strictly between 0 and 1")
    here = [r for r in records if r["task"]["name"] == task and round(float(r["frac"]), 6) == round(frac, 6)]
    if profile is not None:
        here = [r for r in here if record_profile(r) == profile]
    present = sorted({r["model"]["name"] for r in here})
    if absent := [m for m in models if m not in present]:
        raise DataError(f"no record of {', '.join(absent)} for {task} at {percent_label(frac)}"
                        + (f" (profile {profile})" if profile else "")
                        + f"; models with records there: {', '.join(present) or 'none'}")
    here = [r for r in here if r["model"]["name"] in models]
    profiles = sorted({record_profile(r) for r in here})
    if len(profiles) > 1:
        raise ConfigError(f"the records span the protocol profiles {', '.join(profiles)}, which never pair; pick one "
                          "with --profile")
    chosen = _choose(here, models, seed)
    first = chosen[models[0]]
    for model in models[1:]:
        if problems := pair_problems(first, chosen[model]):
            raise DataError(f"{models[0]} and {model} cannot be paired: " + "; ".join(problems))
    wanted = [metric_spec(m).name for m in (metrics or [first["primary_metric"]])]
    entrants = {model: entrant(record, results_dir) for model, record in chosen.items()}
    for model in models[1:]:
        if entrants[models[0]].evidence is not None and entrants[model].evidence is not None:
            if (problem := evidence_alignment(entrants[models[0]].evidence, entrants[model].evidence)[1]) is not None:
                raise DataError(f"{models[0]} and {model} cannot be paired: {problem}")
    level = 1.0 - alpha
    report = SignificanceReport(task, first["task"]["version"], profiles[0], float(first["frac"]), models,
                                {m: r["seed"] for m, r in chosen.items()},
                                {m: e.note for m, e in entrants.items()},
                                entrants[models[0]].evidence.n if entrants[models[0]].evidence else None,
                                alpha, n_resamples, {m: e.metrics for m, e in entrants.items()})
    for metric in wanted:
        pairs = [test_pair(entrants[a], entrants[b], metric, level=level, n_resamples=n_resamples)
                 for i, a in enumerate(models) for b in models[i + 1:]]
        holm_adjust(pairs)
        report.tests[metric] = pairs
    return report


# --- table marks -------------------------------------------------------------------------------------------


def mark_significant_leads(grid, records: list[dict], *, evidence_root: str | Path | None = None,
                           alpha: float = DEFAULT_ALPHA, n_resamples: int = TABLE_RESAMPLES):
    """``grid`` with ``significant`` set on each best cell whose lead over the second best is significant
    (module docstring, Tables), and a footnote saying how; the grid unchanged where nothing was tested.

    A column is tested where one measured row is best and both it and the next best distinct value's
    row(s) hold evidence of the metric for a seed they share; a lead must be significant against every
    row tied at the second value.
    """
    from vlpbench.report.layout import Row
    from vlpbench.report.leaderboard import Provenance

    provenance = Provenance(records)
    scale, decimals = grid.scale, grid.decimals
    candidates: list[tuple[Any, Row, list[PairTest]]] = []
    problems: list[str] = []
    for column in grid.columns:
        measured = [r for r in grid.rows if r.citation is None and column.key in r.cells
                    and math.isfinite(r.cells[column.key].mean)]
        best = [r for r in measured if r.cells[column.key].mark == "best"]
        rest = [r for r in measured if r.cells[column.key].mark != "best"]
        if len(best) != 1 or not rest:
            continue
        shown = {r.label: round(r.cells[column.key].mean * scale, decimals) for r in rest}
        runner = sorted(set(shown.values()), reverse=column.higher_is_better)[0]
        try:
            tests = [_lead_test(best[0], r, column, provenance, evidence_root, alpha, n_resamples)
                     for r in rest if shown[r.label] == runner]
        except VlpbenchError as error:  # a broken sidecar: say so under the table rather than fail it
            problems.append(f"Significance of the lead in {column.task_label} {percent_label(column.frac)} "
                            f"{column.metric} not tested: {error}")
            continue
        if all(t is not None and t.result is not None for t in tests):
            candidates.append((column, best[0], tests))
    if not candidates:
        return replace(grid, legend=(*grid.legend, *problems)) if problems else grid
    tests = [t for _, _, pair in candidates for t in pair]
    holm_adjust(tests)
    significant = {(column.key, row.label) for column, row, pair in candidates
                   if all(t.p_holm <= alpha and _leads(t, column.higher_is_better) for t in pair)}
    rows = tuple(Row(r.label, {key: (replace(cell, significant=True) if (key, r.label) in significant else cell)
                               for key, cell in r.cells.items()}, r.citation) for r in grid.rows)
    how = (f"{' / '.join(sorted({t.test for t in tests}))} on the records of the lowest seed both hold, paired "
           f"over the same test images; α = {alpha:g}, Holm-corrected over the {len(candidates)} column(s) tested; "
           "other columns lack evidence, a clear best or a second")
    note = (f"*: the best cell's lead over the second best is significant ({how})." if significant else
            f"No best cell's lead over the second best is significant ({how}).")
    return replace(grid, rows=rows, legend=(*grid.legend, note, *problems))


def _leads(test: PairTest, higher_is_better: bool) -> bool:
    """Whether the tested difference (best − second) points the way the table's best does."""
    return test.result["diff"] > 0 if higher_is_better else test.result["diff"] < 0


def _lead_test(best, other, column, provenance, evidence_root, alpha: float, n_resamples: int) -> PairTest | None:
    """The paired test of ``best`` − ``other`` in ``column`` on their lowest shared seed; None where there is none."""
    runs_best = {r["seed"]: r for r in provenance.records(best.cells[column.key].source)}
    runs_other = {r["seed"]: r for r in provenance.records(other.cells[column.key].source)}
    shared = sorted(set(runs_best) & set(runs_other))
    if not shared:
        return None
    a = entrant(runs_best[shared[0]], evidence_root, best.label)
    b = entrant(runs_other[shared[0]], evidence_root, other.label)
    return test_pair(a, b, column.metric, level=1.0 - alpha, n_resamples=n_resamples)
