"""Regression check of a candidate's result records against a baseline's (``vlpbench compare``).

Each side is a results folder or one record file. Cells are paired by (task, fraction) and compared
on the task's primary metric, named as its spec names it today (a record written under a former
name, ``accuracy``, compares as ``acc``; see :func:`vlpbench.report.table.table_rows`). ``gain`` is
the candidate's mean minus the baseline's, sign-flipped where the metric's spec says lower is
better, so a positive gain is always better. The allowed change is
``max(abs_tol, k × pooled std)``:

* **Seeds** (three or more runs over both sides): ``pooled std`` is the pooled sample std
  ``sqrt(((n_b - 1) s_b² + (n_c - 1) s_c²) / (n_b + n_c - 2))`` (a single-seed side contributes no
  degrees of freedom). Regression: ``gain < -allowed``; improvement: ``gain > allowed``.
* **Paired bootstrap** (one seed on each side, both records holding ``per_image`` scores of the same
  test images): ``d_i`` = per-image gain, resampled over images by the paired bootstrap of
  ``vlpbench significance`` (:func:`vlpbench.metrics.significance.paired_bootstrap_means`, 2,000
  resamples, seed 0) for the one-sided 95 % bounds of its mean (the 5th and 95th percentiles).
  Regression: ``mean(d) < -abs_tol`` **and** upper bound ``< 0``: the drop is larger than the
  tolerance and not explained by which images happen to be in the test set. Improvement mirrors
  it (``mean(d) > abs_tol`` and lower bound ``> 0``). Per-image scores are per-image values of the
  primary metric (Dice per image), so their mean is the metric; a metric whose spec is not a mean of
  per-image scores (AUC, mAP) is never paired.
* **abs_tol only** (one seed each, no usable per-image scores): regression ``gain < -abs_tol``.

Anything else is "within tolerance". Defaults: ``abs_tol`` = :data:`DEFAULT_ABS_TOL` (one point of
Dice / AUC / mAP in metric units), ``k`` = :data:`DEFAULT_K`. A task YAML may override them::

    compare:
      abs_tol: 0.02            # or per fraction: {0.01: 0.03, 0.1: 0.02, 1.0: 0.01}
      k: 2.0
      rationale: why these numbers

and ``--abs-tol`` / ``--k`` on the command line override both for every cell.

A cell is **not comparable** when the protocol profile, task version, split sha256 (and the sha256 of a test set
derived from the user's files, ``split.test_sha256``), primary metric,
the task overrides or the synthetic flag differ between the sides, when a side holds records of
several models (or checkpoints, versions, ...) for it, when its metric is null, or when the baseline
has it and the candidate does not. A candidate cell without a baseline is **new** (not a failure).
Exit code: 1 if any cell regressed, else 2 if any is not comparable, else 0.

With ``--against-ledger`` the reproduction ledger is checked too (:mod:`vlpbench.report.compare_ledger`): a
ledger cell that reproduced its published value on the baseline and no longer does on the candidate is a
regression (exit 1), in the summary and as its own JUnit testcase.

A record that fails validation on read (:func:`vlpbench.results.read_record`: a string or NaN metric, a value
outside its range, an aggregate that is not the mean of its per-image scores, a truncated or future-schema
file) is skipped with a warning and listed in the summary and the JUnit XML; under ``--strict`` (the default
where the environment variable ``CI`` is ``true``) it fails the comparison: exit 2 unless a cell regressed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence
from xml.etree import ElementTree

import numpy as np

from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics.specs import PER_IMAGE_MEAN, metric_spec
from vlpbench.report.layout import metric_name, percent_label, version_label
from vlpbench.report.table import table_rows
from vlpbench.results import InvalidRecord, read_record, record_profile, scan_records
from vlpbench.tasks import DEFAULT_PROFILE, PROFILES

if TYPE_CHECKING:
    from vlpbench.report.compare_ledger import LedgerChange

DEFAULT_ABS_TOL = 0.01
DEFAULT_K = 2.0
PAIRED_RESAMPLES = 2000
PAIRED_SEED = 0

REGRESSION = "regression"
IMPROVEMENT = "improvement"
WITHIN = "within tolerance"
NOT_COMPARABLE = "not comparable"
NEW = "new"


@dataclass(frozen=True)
class Tolerance:
    """The regression tolerance of one cell and where it came from."""

    abs_tol: float
    k: float
    source: str = "default"


def _tolerance_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: expected a number >= 0, got {value!r}")
    return float(value)


def _from_task_yaml(spec, frac: float) -> Tolerance:
    """The tolerance a task YAML's ``compare:`` mapping sets at ``frac`` (defaults where it is silent)."""
    where = f"{spec.path}: compare"
    mapping = spec.compare
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping with abs_tol, k, rationale; got {mapping!r}")
    unknown = sorted(set(mapping) - {"abs_tol", "k", "rationale"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: abs_tol, k, rationale)")
    if "rationale" in mapping and not isinstance(mapping["rationale"], str):
        raise ConfigError(f"{where}.rationale: expected a string, got {mapping['rationale']!r}")
    abs_tol = mapping.get("abs_tol", DEFAULT_ABS_TOL)
    if isinstance(abs_tol, dict):
        per_frac = {round(_tolerance_number(f, f"{where}.abs_tol key"), 6): _tolerance_number(v, f"{where}.abs_tol[{f}]")
                    for f, v in abs_tol.items()}
        abs_tol = per_frac.get(round(frac, 6), DEFAULT_ABS_TOL)
    return Tolerance(_tolerance_number(abs_tol, f"{where}.abs_tol"),
                     _tolerance_number(mapping.get("k", DEFAULT_K), f"{where}.k"), spec.path.name)


def task_tolerance(task: str, frac: float, *, abs_tol: float | None = None, k: float | None = None) -> Tolerance:
    """Tolerance of ``task`` at ``frac``: command line (``abs_tol``/``k``) over the task YAML's
    ``compare:`` mapping over the defaults. A task that is not shipped uses the defaults.

    Raises:
        ConfigError: the task's ``compare:`` mapping is malformed (names the YAML file and key).
    """
    from vlpbench.tasks import load_task, task_names

    spec = load_task(task) if task in task_names() else None
    if spec is not None and spec.compare is not None:
        tolerance = _from_task_yaml(spec, frac)
    else:
        tolerance = Tolerance(DEFAULT_ABS_TOL, DEFAULT_K)
    if abs_tol is not None or k is not None:
        tolerance = Tolerance(tolerance.abs_tol if abs_tol is None else _tolerance_number(abs_tol, "--abs-tol"),
                              tolerance.k if k is None else _tolerance_number(k, "--k"), "command line")
    return tolerance


@dataclass
class Side:
    """One side's cell: the aggregate over seeds plus what decides comparability."""

    label: str
    version: Any
    split_sha256: str
    metric: str
    mean: float
    std: float | None
    n_seeds: int
    overrides: str
    synthetic: bool
    per_image: dict | None
    test_sha256: str | None = None  # a test set derived from the user's files (e.g. CheXpert valid.csv)
    profile: str = DEFAULT_PROFILE

    @property
    def higher_is_better(self) -> bool:
        """The metric's direction, from its spec."""
        return metric_spec(self.metric).higher_is_better

    def text(self) -> str:
        if not math.isfinite(self.mean):
            return "null"
        return f"{self.mean:.4f}" + (f" ± {self.std:.4f}" if self.std is not None else "") + f" (n={self.n_seeds})"


@dataclass
class Comparison:
    """The verdict of one (task, fraction)."""

    task: str
    frac: float
    verdict: str
    baseline: Side | None = None
    candidate: Side | None = None
    delta: float | None = None  # candidate mean - baseline mean, metric units
    allowed: float | None = None  # the largest change that counts as within tolerance
    rule: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        side = self.candidate or self.baseline
        metric = f" {side.metric}" if side is not None else ""
        return f"{self.task} {percent_label(self.frac)}{metric}"


def read_side(path: str | os.PathLike) -> tuple[list[dict], list[InvalidRecord]]:
    """The valid records of a results folder (``runs/`` below it) or of one record file, and the invalid ones
    (:func:`vlpbench.results.scan_records`).

    Raises:
        DataError: the path does not exist, or it holds no record at all (a side whose records are all invalid
            has no cells: the other side's cells are then not comparable, or new).
    """
    path = Path(path)
    if path.is_file():
        read = read_record(path)
        records, invalid = ([], [read]) if isinstance(read, InvalidRecord) else ([read], [])
    else:
        records, invalid = scan_records(path)
    if not records and not invalid:
        raise DataError(f"no result records under {path / 'runs'}")
    return records, invalid


def load_side(path: str | os.PathLike) -> list[dict]:
    """The records of a results folder (``runs/`` below it) or of one record file, all of them valid.

    Raises:
        DataError: the path does not exist, a record is invalid (naming it), or there are no records.
    """
    records, invalid = read_side(path)
    if invalid:
        raise DataError(str(invalid[0]))
    return records


def _sides(records: list[dict]) -> dict[tuple[str, float], list[Side]]:
    """Per (task, fraction): the side's cells (one expected), from :func:`table_rows`."""
    grouped: dict[tuple[str, float], list[dict]] = {}
    for record in records:
        grouped.setdefault((record["task"]["name"], round(float(record["frac"]), 6)), []).append(record)
    sides = {}
    for key, group in grouped.items():
        first = group[0]
        cells = [Side(
            label=row["model"], version=row["version"], split_sha256=first["split"]["sha256"], metric=row["metric"],
            mean=row["mean"], std=row["std"], n_seeds=row["n_seeds"],
            overrides=json.dumps(first["config"].get("overrides") or {}, sort_keys=True, default=str),
            synthetic=bool((first.get("data") or {}).get("synthetic")),
            # Only a lone record can be paired image by image; several cells are not compared at all.
            per_image=first.get("per_image") if len(group) == 1 else None,
            test_sha256=first["split"].get("test_sha256"), profile=row["profile"])
            for row in table_rows(group)]
        sides[key] = cells
    return sides


def _incomparable(b: Side, c: Side) -> list[str]:
    reasons = []
    if b.profile != c.profile:
        reasons.append(f"protocol profile {b.profile} (baseline) vs {c.profile} (candidate): the numbers were "
                       "computed by different rules")
    if b.version != c.version:
        reasons.append(f"task version {version_label(b.version)} (baseline) vs {version_label(c.version)} (candidate)")
    if b.split_sha256 != c.split_sha256:
        reasons.append(f"split sha256 {b.split_sha256[:8]} (baseline) vs {c.split_sha256[:8]} (candidate)")
    if b.test_sha256 != c.test_sha256:
        reasons.append(f"test set sha256 {str(b.test_sha256)[:8]} (baseline) vs {str(c.test_sha256)[:8]} (candidate)")
    if b.metric != c.metric:
        reasons.append(f"primary metric {b.metric} (baseline) vs {c.metric} (candidate)")
    if b.overrides != c.overrides:
        reasons.append(f"task overrides {b.overrides} (baseline) vs {c.overrides} (candidate)")
    if b.synthetic != c.synthetic:
        reasons.append("synthetic data on one side only")
    for name, side in (("baseline", b), ("candidate", c)):
        if not math.isfinite(side.mean):
            reasons.append(f"{side.metric} is null in a {name} record")
    return reasons


def _paired_scores(b: Side, c: Side) -> tuple[tuple[np.ndarray, np.ndarray] | None, str | None]:
    """Per-image (candidate, baseline) scores, sign-flipped where lower is better, when both single-seed
    records hold scores of the same images; else a reason."""
    if metric_spec(b.metric).ci != PER_IMAGE_MEAN:
        return None, f"{b.metric} is not a mean of per-image scores: abs_tol rule"
    if not b.per_image or not c.per_image:
        return None, "no per-image scores on both sides: abs_tol rule"
    if set(b.per_image) != set(c.per_image):
        return None, "per-image scores cover different images: abs_tol rule"
    ids = sorted(b.per_image)
    try:
        base = np.array([b.per_image[i] for i in ids], dtype=np.float64)
        cand = np.array([c.per_image[i] for i in ids], dtype=np.float64)
    except (TypeError, ValueError):
        return None, "per-image scores are not numbers: abs_tol rule"
    if not (np.isfinite(base).all() and np.isfinite(cand).all()):
        return None, "per-image scores are not all finite: abs_tol rule"
    sign = 1.0 if b.higher_is_better else -1.0
    return (sign * cand, sign * base), None


def _judge(task: str, frac: float, b: Side, c: Side, tolerance: Tolerance, n_resamples: int) -> Comparison:
    from vlpbench.metrics.significance import paired_bootstrap_means

    result = Comparison(task, frac, WITHIN, b, c, delta=c.mean - b.mean)
    if tolerance.source != "default":
        result.notes.append(f"tolerance from {tolerance.source}: abs_tol {tolerance.abs_tol:g}, k {tolerance.k:g}")
    sign = 1.0 if b.higher_is_better else -1.0
    gain = sign * result.delta
    if b.n_seeds + c.n_seeds >= 3:
        pooled = math.sqrt(((b.n_seeds - 1) * (b.std or 0.0) ** 2 + (c.n_seeds - 1) * (c.std or 0.0) ** 2)
                           / (b.n_seeds + c.n_seeds - 2))
        result.allowed = max(tolerance.abs_tol, tolerance.k * pooled)
        result.rule = f"max(abs_tol {tolerance.abs_tol:g}, {tolerance.k:g} × pooled std {pooled:.4f})"
        worse, better = gain < -result.allowed, gain > result.allowed
    else:
        result.allowed = tolerance.abs_tol
        paired, fallback = _paired_scores(b, c)
        if paired is None:
            result.rule = f"abs_tol {tolerance.abs_tol:g}"
            result.notes.append(fallback)
            worse, better = gain < -result.allowed, gain > result.allowed
        else:
            # The paired bootstrap of `vlpbench significance`: a 90% two-sided interval of the gain is the
            # pair of one-sided 95% bounds.
            ci = paired_bootstrap_means(*paired, n_resamples=n_resamples, level=0.90, seed=PAIRED_SEED)
            mean_gain = ci["diff"]
            result.rule = (f"paired bootstrap over {ci['n']} images: mean gain {mean_gain:+.4f}, one-sided "
                           f"95% bounds [{ci['low']:+.4f}, {ci['high']:+.4f}], abs_tol {tolerance.abs_tol:g}")
            worse = mean_gain < -tolerance.abs_tol and ci["high"] < 0
            better = mean_gain > tolerance.abs_tol and ci["low"] > 0
    result.verdict = REGRESSION if worse else IMPROVEMENT if better else WITHIN
    return result


def compare_records(baseline: list[dict], candidate: list[dict], *, tasks: Sequence[str] | None = None,
                    fracs: Sequence[float] | None = None, abs_tol: float | None = None, k: float | None = None,
                    n_resamples: int = PAIRED_RESAMPLES, profile: str | None = None) -> list[Comparison]:
    """Compare ``candidate`` with ``baseline`` per (task, fraction); see the module docstring.

    ``tasks`` / ``fracs`` restrict the cells compared (on both sides), ``profile`` the records (on
    both sides) to one protocol profile; ``abs_tol`` / ``k`` override every cell's tolerance.

    Raises:
        DataError: no cell is left to compare, or a side has two records for one seed.
        ConfigError: a task's ``compare:`` mapping is malformed.
    """
    wanted_fracs = {round(f, 6) for f in fracs} if fracs else None

    def keep(key: tuple[str, float]) -> bool:
        return (not tasks or key[0] in tasks) and (wanted_fracs is None or key[1] in wanted_fracs)

    if profile is not None:
        if profile not in PROFILES:
            raise ConfigError(f"--profile {profile!r}: expected one of {', '.join(PROFILES)}")
        baseline = [r for r in baseline if record_profile(r) == profile]
        candidate = [r for r in candidate if record_profile(r) == profile]
    base = {key: v for key, v in _sides(baseline).items() if keep(key)}
    cand = {key: v for key, v in _sides(candidate).items() if keep(key)}
    if not base and not cand:
        raise DataError("no (task, fraction) cell to compare on either side after the filters")

    results = []
    for key in sorted(set(base) | set(cand)):
        task, frac = key
        b_cells, c_cells = base.get(key), cand.get(key)
        if c_cells is None:
            results.append(Comparison(task, frac, NOT_COMPARABLE, b_cells[0] if len(b_cells) == 1 else None,
                                      notes=["the baseline has this cell and the candidate does not"]))
            continue
        if b_cells is None:
            results.append(Comparison(task, frac, NEW, candidate=c_cells[0] if len(c_cells) == 1 else None,
                                      notes=["no baseline for this cell"]))
            continue
        ambiguous = [f"the {name} holds {len(cells)} cells for it ("
                     + "; ".join(f"{s.label}, task {version_label(s.version)}, split {s.split_sha256[:8]}, "
                                 f"profile {s.profile}" for s in cells)
                     + "); keep one model, checkpoint, version and profile per side (--profile picks one)"
                     for name, cells in (("baseline", b_cells), ("candidate", c_cells)) if len(cells) > 1]
        if ambiguous:
            results.append(Comparison(task, frac, NOT_COMPARABLE, notes=ambiguous))
            continue
        b, c = b_cells[0], c_cells[0]
        reasons = _incomparable(b, c)
        if reasons:
            results.append(Comparison(task, frac, NOT_COMPARABLE, b, c, notes=reasons))
            continue
        results.append(_judge(task, frac, b, c, task_tolerance(task, frac, abs_tol=abs_tol, k=k), n_resamples))
    return results


def exit_code(comparisons: Sequence[Comparison], invalid: Sequence[InvalidRecord] = (), *,
              strict: bool = False, ledger: Sequence[LedgerChange] = ()) -> int:
    """1 if any cell regressed (or, ``ledger``, any ledger cell no longer reproduces its published value:
    :mod:`vlpbench.report.compare_ledger`), else 2 if any is not comparable or (``strict``) any record was
    invalid, else 0."""
    verdicts = {c.verdict for c in comparisons}
    if REGRESSION in verdicts or any(change.status == REGRESSION for change in ledger):
        return 1
    return 2 if NOT_COMPARABLE in verdicts or (strict and invalid) else 0


def _signed(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:+.4f}".replace("-", "−")


def markdown_summary(comparisons: Sequence[Comparison], *, baseline: str = "baseline",
                     candidate: str = "candidate", invalid: Sequence[InvalidRecord] = (), strict: bool = False,
                     ledger: Sequence[LedgerChange] | None = None) -> str:
    """A Markdown report: one table line per (task, fraction), the verdict counts, the notes and the
    ``invalid`` records (skipped; under ``strict`` they fail the comparison); with ``ledger`` (``compare
    --against-ledger``), a section with each ledger cell's verdicts on both sides."""
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    def models(side: str) -> str:
        labels = sorted({getattr(c, side).label for c in comparisons if getattr(c, side) is not None})
        return ", ".join(labels) or "–"

    lines = ["## vlpbench compare", "", f"Baseline: `{baseline}` ({escape(models('baseline'))})  ",
             f"Candidate: `{candidate}` ({escape(models('candidate'))})", "",
             "| Task | Fraction | Metric | Baseline | Candidate | Δ | Allowed | Verdict |",
             "| :-- | --: | :-- | --: | --: | --: | --: | :-- |"]
    for c in comparisons:
        side = c.candidate or c.baseline
        metric = f"{metric_name(side.metric)} {'↑' if side.higher_is_better else '↓'}" if side else "–"
        verdict = f"**{c.verdict}**" if c.verdict in (REGRESSION, NOT_COMPARABLE) else c.verdict
        lines.append(f"| {escape(c.task)} | {percent_label(c.frac)} | {metric} | "
                     f"{c.baseline.text() if c.baseline else '–'} | {c.candidate.text() if c.candidate else '–'} | "
                     f"{_signed(c.delta) or '–'} | {'' if c.allowed is None else f'{c.allowed:.4f}'} | {verdict} |")
    counts = {v: sum(c.verdict == v for c in comparisons) for v in (REGRESSION, NOT_COMPARABLE, IMPROVEMENT, WITHIN, NEW)}
    counted = [f"{n} {v}" for v, n in counts.items()] + ([f"{len(invalid)} invalid record(s)"] if invalid else [])
    if ledger is not None:
        counted.append(f"{sum(change.status == REGRESSION for change in ledger)} ledger regression")
    code = exit_code(comparisons, invalid, strict=strict, ledger=ledger or ())
    lines += ["", f"{', '.join(counted)} → exit {code}"]
    details = [f"- {escape(c.name)}: {escape(text)}" for c in comparisons for text in ([c.rule] if c.rule else []) + c.notes]
    details += [f"- **invalid record** ({'fails --strict' if strict else 'skipped'}) {escape(str(bad))}"
                for bad in invalid]
    if details:
        lines += ["", *details]
    if ledger is not None:
        from vlpbench.report.compare_ledger import summary_lines

        lines += summary_lines(ledger)
    return "\n".join(lines) + "\n"


def junit_xml(comparisons: Sequence[Comparison], invalid: Sequence[InvalidRecord] = (), *,
              strict: bool = False, ledger: Sequence[LedgerChange] = ()) -> str:
    """JUnit XML for CI systems: one testcase per (task, fraction); a regression is a ``failure``,
    a cell that is not comparable an ``error``, a cell without baseline ``skipped``; one testcase per
    ``invalid`` record (class ``vlpbench.compare.invalid_record``, named by its path): an ``error`` under
    ``strict``, else ``skipped``; and one per ``ledger`` cell (:func:`vlpbench.report.compare_ledger.add_junit_cases`:
    a cell that no longer reproduces is a ``failure``)."""
    from vlpbench.report.compare_ledger import PASS, REGRESSION as LEDGER_REGRESSION, add_junit_cases

    failures = sum(c.verdict == REGRESSION for c in comparisons) + sum(c.status == LEDGER_REGRESSION for c in ledger)
    errors = sum(c.verdict == NOT_COMPARABLE for c in comparisons) + (len(invalid) if strict else 0)
    skipped = (sum(c.verdict == NEW for c in comparisons) + (0 if strict else len(invalid))
               + sum(c.status not in (LEDGER_REGRESSION, PASS) for c in ledger))
    counts = {"tests": str(len(comparisons) + len(invalid) + len(ledger)), "failures": str(failures),
              "errors": str(errors)}
    root = ElementTree.Element("testsuites", name="vlpbench compare", **counts)
    suite = ElementTree.SubElement(root, "testsuite", name="vlpbench compare", skipped=str(skipped), time="0", **counts)
    for c in comparisons:
        case = ElementTree.SubElement(suite, "testcase", classname=f"vlpbench.compare.{c.task}", name=c.name, time="0")
        summary = (f"baseline {c.baseline.text() if c.baseline else '–'}, candidate "
                   f"{c.candidate.text() if c.candidate else '–'}, delta {_signed(c.delta) or '–'}")
        detail = "\n".join([summary, *([c.rule] if c.rule else []), *c.notes])
        if c.verdict == REGRESSION:
            ElementTree.SubElement(case, "failure", message=f"regression: {summary}", type=REGRESSION).text = detail
        elif c.verdict == NOT_COMPARABLE:
            ElementTree.SubElement(case, "error", message="not comparable: " + "; ".join(c.notes),
                                   type="not comparable").text = detail
        elif c.verdict == NEW:
            ElementTree.SubElement(case, "skipped", message="no baseline for this cell")
        else:
            ElementTree.SubElement(case, "system-out").text = f"{c.verdict}: {detail}"
    for bad in invalid:
        case = ElementTree.SubElement(suite, "testcase", classname="vlpbench.compare.invalid_record",
                                      name=str(bad.path), time="0")
        if strict:
            ElementTree.SubElement(case, "error", message=f"invalid record: {bad.problem}",
                                   type="invalid record").text = str(bad)
        else:
            ElementTree.SubElement(case, "skipped", message=f"invalid record skipped: {bad.problem}")
    add_junit_cases(suite, ledger)
    ElementTree.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"
