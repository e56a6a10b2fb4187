"""The paper layout of a leaderboard, shared by the Markdown, LaTeX, HTML and CSV writers.

:func:`build_grid` turns aggregated cells (:func:`vlpbench.report.table.table_rows`) and reported
rows (:mod:`vlpbench.report.reference`) into a :class:`Grid`: ordered columns grouped by task, rows
(reported rows first), best / second marks, and the notes under the table. Writers only format it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

from vlpbench.metrics.specs import metric_spec
from vlpbench.report.reference import ReferenceRow

# Paper order of the table groups; tasks outside them come last.
_GROUP_ORDER = ("seg", "det", "cls", "zs", "ground")
# Citation marks of reported rows, in order of appearance.
CITATION_MARKS = ("†", "‡", "§", "¶")


def metric_name(metric: str) -> str:
    """Display name of a metric key, from its spec: ``dice`` → ``Dice``, ``map`` → ``mAP``.

    Raises:
        ConfigError: no metric of that name (see :func:`vlpbench.metrics.metric_spec`).
    """
    return metric_spec(metric).display


def percent_label(frac: float) -> str:
    """``0.01`` → ``1%``; 6 significant digits hide float noise such as 0.07 * 100 = 7.000000000000001."""
    return f"{frac * 100:g}%"


def version_label(value: Any) -> str:
    """``1`` → ``v1``; a string version already starting with ``v`` is kept."""
    text = str(value)
    return text if text.startswith("v") else f"v{text}"


def version_sort_key(value: Any) -> tuple[int, Any]:
    # Integer versions sort numerically (v2 before v10); string versions after them.
    return (0, value) if isinstance(value, int) else (1, str(value))


@dataclass(frozen=True)
class Column:
    """One sub-column: a task (at one version and split) at one fraction, showing one metric."""

    task: str
    version: Any
    split_dataset: str
    split_version: Any
    split_sha256: str
    frac: float
    metric: str
    task_label: str  # the task, plus ``v<version> (<sha8>)`` when its records span several

    @property
    def higher_is_better(self) -> bool:
        """The metric's direction, from its spec; it decides best and second."""
        return metric_spec(self.metric).higher_is_better

    @property
    def key(self) -> tuple:
        return (self.task, self.version, self.split_sha256, self.frac, self.metric)


@dataclass(frozen=True)
class Cell:
    """A filled cell: values in metric units (not scaled); ``mark`` is "best", "second" or None."""

    mean: float
    std: float | None = None
    n_seeds: int | None = None
    mark: str | None = None
    source: dict | None = None  # the table_rows entry of a measured cell
    significant: bool = False  # a best cell whose lead is significant (vlpbench.report.significance)

    def scale(self, scale: float) -> float:
        """The factor this cell is printed at: the grid's ``scale``, or 1 for a measured metric printed in its
        own units (a rank; ``MetricSpec.percent`` False)."""
        metric = (self.source or {}).get("metric")
        return scale if metric is None or metric_spec(metric).percent else 1.0


@dataclass(frozen=True)
class Citation:
    """The footnote of reported rows from one publication."""

    mark: str
    citation: str
    tables: tuple[str, ...]

    @property
    def text(self) -> str:
        return (f"Reported in {self.citation} ({', '.join(self.tables)}); published numbers, not "
                f"reproduced by vlpbench, never marked best.")


@dataclass(frozen=True)
class Row:
    """A model row; ``citation`` is set for a reported (reference) row."""

    label: str
    cells: dict[tuple, Cell]
    citation: Citation | None = None


@dataclass(frozen=True)
class ColumnGroup:
    """Consecutive columns of one task label, as the header of a paper table groups them."""

    task_label: str
    columns: tuple[Column, ...]

    @property
    def shared_metric(self) -> Column | None:
        """A column standing for the metric every column of the group shows, else None."""
        return self.columns[0] if len({c.metric for c in self.columns}) == 1 else None

    def sub_label(self, column: Column) -> tuple[str | None, bool]:
        """(fraction text or None, whether the metric goes in the sub-column header)."""
        one_frac = len({c.frac for c in self.columns}) == 1
        show_metric = self.shared_metric is None
        return (None if one_frac and show_metric else percent_label(column.frac)), show_metric


@dataclass(frozen=True)
class Grid:
    """Everything a writer prints; notes are plain text for the writer to escape."""

    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    scale: float
    decimals: int
    show_n: bool
    legend: tuple[str, ...] = ()
    provenance: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    citations: tuple[Citation, ...] = field(default=())

    def groups(self) -> list[ColumnGroup]:
        groups: list[ColumnGroup] = []
        for column in self.columns:
            if groups and groups[-1].task_label == column.task_label:
                groups[-1] = ColumnGroup(column.task_label, (*groups[-1].columns, column))
            else:
                groups.append(ColumnGroup(column.task_label, (column,)))
        return groups


def cell_texts(cell: Cell, grid: Grid) -> tuple[str, str | None, str | None]:
    """(mean, std or None, ``n=K`` or None) of ``cell`` at the grid's scale and precision."""
    scale = cell.scale(grid.scale)
    mean = f"{cell.mean * scale:.{grid.decimals}f}"
    std = None if cell.std is None else f"{cell.std * scale:.{grid.decimals}f}"
    n = f"n={cell.n_seeds}" if grid.show_n and cell.n_seeds is not None else None
    return mean, std, n


def format_cell(cell: Cell, grid: Grid, *, pm: str, best: str, second: str, significant: str = "*") -> str:
    """``mean <pm> std`` of ``cell``, wrapped in ``best`` / ``second`` (``"{}"`` templates) by its mark,
    ``significant`` after a best cell whose lead is significant, then ``(n=K)`` where the grid shows seed
    counts; each writer passes its own markup."""
    mean, std, n = cell_texts(cell, grid)
    text = mean if std is None else f"{mean} {pm} {std}"
    if cell.mark == "best":
        text = best.format(text)
    elif cell.mark == "second":
        text = second.format(text)
    if cell.significant:
        text += significant
    return f"{text} ({n})" if n else text


def _columns(rows: list[dict], task_order: Sequence[str] | None,
             metric_order: Sequence[str] | None) -> list[Column]:
    by_frac: dict[tuple, set[tuple]] = defaultdict(set)
    for r in rows:
        by_frac[r["task"], r["frac"]].add((r["version"], r["split_sha256"]))
    # A task with several versions or splits at any fraction labels all its columns with them.
    variant_tasks = {task for (task, _), found in by_frac.items() if len(found) > 1}

    def label(r: dict) -> str:
        if r["task"] in variant_tasks:
            return f"{r['task']} {version_label(r['version'])} ({r['split_sha256'][:8]})"
        return r["task"]

    groups = {r["task"]: r["group"] for r in rows}

    def task_rank(task: str) -> int:
        if task_order:
            return list(task_order).index(task) if task in task_order else len(task_order)
        group = groups[task]
        return _GROUP_ORDER.index(group) if group in _GROUP_ORDER else len(_GROUP_ORDER)

    def metric_rank(metric: str) -> int:
        return list(metric_order).index(metric) if metric_order and metric in metric_order else -1

    unique = {}
    for r in rows:
        column = Column(r["task"], r["version"], r["split_dataset"], r["split_version"], r["split_sha256"],
                        r["frac"], r["metric"], label(r))
        unique.setdefault(column.key, column)
    return sorted(unique.values(), key=lambda c: (task_rank(c.task), c.task, version_sort_key(c.version),
                                                  c.split_sha256, c.frac, metric_rank(c.metric), c.metric))


def _marks(columns: list[Column], rows: list[Row], scale: float, decimals: int) -> list[Row]:
    """Rows with best (bold) and second (underline) marks set, compared at the printed precision.

    Best needs two or more entries in the column (ties all bold); the second best distinct value is
    marked only when a worse value exists, so two entries never get "second" for being last.
    """
    marks: dict[tuple, dict[float, str]] = {}
    for c in columns:
        shown = [round(r.cells[c.key].mean * r.cells[c.key].scale(scale), decimals) for r in rows
                 if c.key in r.cells and math.isfinite(r.cells[c.key].mean)]
        if len(shown) < 2:
            continue
        distinct = sorted(set(shown), reverse=c.higher_is_better)
        marks[c.key] = {distinct[0]: "best"}
        if len(distinct) >= 3:
            marks[c.key][distinct[1]] = "second"
    marked = []
    for r in rows:
        cells = {}
        for key, cell in r.cells.items():
            shown = round(cell.mean * cell.scale(scale), decimals)
            mark = marks.get(key, {}).get(shown) if math.isfinite(cell.mean) else None
            cells[key] = Cell(cell.mean, cell.std, cell.n_seeds, mark, cell.source)
        marked.append(Row(r.label, cells))
    return marked


def _reference_rows(references: Sequence[ReferenceRow], columns: list[Column]) -> list[Row]:
    """Reported rows that fill at least one column, with one citation mark per publication."""
    filled = []
    for ref in references:
        cells = {c.key: Cell(ref.values[c.task, c.frac, c.metric],
                             source={"table": ref.tables[c.task, c.frac, c.metric]})
                 for c in columns if (c.task, c.frac, c.metric) in ref.values}
        if cells:
            tables = [ref.tables[c.task, c.frac, c.metric] for c in columns if (c.task, c.frac, c.metric) in ref.values]
            filled.append((ref, cells, tables))
    tables_of: dict[str, list[str]] = {}
    for ref, _, tables in filled:
        seen = tables_of.setdefault(ref.citation, [])
        seen += [t for t in dict.fromkeys(tables) if t not in seen]
    citations = {}
    for i, (name, tables) in enumerate(tables_of.items()):
        mark = CITATION_MARKS[i] if i < len(CITATION_MARKS) else f"{CITATION_MARKS[0]}{i + 1}"
        citations[name] = Citation(mark, name, tuple(tables))
    return [Row(ref.method, cells, citations[ref.citation]) for ref, cells, _ in filled]


def _legend(rows: list[Row], measured: list[Row], columns: list[Column], scale: float,
            metric_order: Sequence[str] | None) -> list[str]:
    seed_counts = sorted({cell.n_seeds for r in measured for cell in r.cells.values()})
    unit = " (×100)" if scale == 100.0 else ""
    if unit and not all(metric_spec(c.metric).percent for c in columns):
        unit = " (×100; ranks as they are)"
    what = "the primary metric" if not metric_order else "each metric"
    if seed_counts == [1]:
        lines = [f"Cells: {what}{unit} of a single seed."]
    else:
        over = f"{seed_counts[0]} seeds" if len(seed_counts) == 1 else "n seeds"
        lines = [f"Cells: mean ± sample std (ddof=1) of {what}{unit} over {over}."]
    if any(cell.mark for r in measured for cell in r.cells.values()):
        lines.append("Bold: best in its column; underlined: second best (left unmarked when it is also the worst).")
    missing = []
    if any(c.key not in r.cells for r in measured for c in columns):
        missing.append("– no record")
    if any(c.key not in r.cells for r in rows if r.citation for c in columns):
        missing.append("– in a reported row: not reported")
    if missing:
        lines.append("; ".join(missing) + ".")
    return lines


def _provenance(columns: list[Column]) -> list[str]:
    lines: dict[tuple, list[float]] = defaultdict(list)
    for c in columns:
        fracs = lines[c.task_label, c.version, c.split_dataset, c.split_version, c.split_sha256]
        if c.frac not in fracs:
            fracs.append(c.frac)
    return [f"{label} {', '.join(percent_label(f) for f in sorted(fracs))}: task {version_label(version)}; "
            f"split {dataset} {version_label(split_version)}, sha256 {sha[:12]}"
            for (label, version, dataset, split_version, sha), fracs in lines.items()]


def _missing_reasons(measured: list[Row], columns: list[Column]) -> list[str]:
    """Why a model's cell is empty where its record sits in another version's or split's column."""
    notes = []
    for r in measured:
        for c in columns:
            if c.key in r.cells:
                continue
            elsewhere = [o for o in columns if o.key in r.cells and o.key != c.key
                         and (o.task, o.frac, o.metric) == (c.task, c.frac, c.metric)]
            for o in elsewhere:
                notes.append(f"{r.label} has no record in {c.task_label} {percent_label(c.frac)}: its "
                             f"record is task {version_label(o.version)} on split sha256 {o.split_sha256[:8]} "
                             f"(column {o.task_label}); different task versions or splits never share a cell")
    return notes


def build_grid(rows: list[dict], *, references: Sequence[ReferenceRow] = (),
               model_order: Sequence[str] | None = None, task_order: Sequence[str] | None = None,
               metric_order: Sequence[str] | None = None, percent: bool = True, decimals: int = 1) -> Grid:
    """Lay out aggregated cells as a paper table.

    Args:
        rows: :func:`vlpbench.report.table.table_rows` entries.
        references: reported rows; each fills the columns of its (task, fraction, metric) and is
            shown only if it fills at least one; reported rows are never marked best or second.
        model_order: model names in row order (rows of other models after them, alphabetical).
        task_order: task names in column order; else paper group order, then alphabetical.
        metric_order: metric names in sub-column order (the primary metric first when absent).
        percent: show values ×100.
        decimals: digits after the point; best / second are decided at this precision.
    """
    scale = 100.0 if percent else 1.0
    columns = _columns(rows, task_order, metric_order)
    by_label: dict[str, dict[tuple, Cell]] = defaultdict(dict)
    names: dict[str, str] = {}
    for r in rows:
        key = (r["task"], r["version"], r["split_sha256"], r["frac"], r["metric"])
        by_label[r["model"]][key] = Cell(r["mean"], r["std"], r["n_seeds"], None, r)
        names[r["model"]] = r["model_name"]

    def model_rank(label: str) -> tuple:
        order = list(model_order or ())
        return (order.index(names[label]) if names[label] in order else len(order), label)

    measured = _marks(columns, [Row(label, by_label[label]) for label in sorted(by_label, key=model_rank)],
                      scale, decimals)
    reported = _reference_rows(references, columns)
    all_rows = reported + measured
    return Grid(
        columns=tuple(columns), rows=tuple(all_rows), scale=scale, decimals=decimals,
        show_n=len({cell.n_seeds for r in measured for cell in r.cells.values()}) > 1,
        legend=tuple(_legend(all_rows, measured, columns, scale, metric_order)),
        provenance=tuple(_provenance(columns)),
        missing=tuple(_missing_reasons(measured, columns)),
        citations=tuple(dict.fromkeys(r.citation for r in reported)),
    )
