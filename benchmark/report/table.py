"""Leaderboard tables built from result records only.

:func:`table_rows` does the aggregation (one row per model label × task column, mean and sample std
over seeds), :func:`select_records` applies the ``--models/--tasks/--fracs/--group`` filters,
:mod:`vlpbench.report.layout` turns rows into a paper-style grid (best / second marks, reported rows,
footnotes), and the writers only format it: :func:`markdown_table` here, LaTeX, HTML and CSV in their
own modules. Records of one task with a different task version or split hash never share a cell.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics.specs import former_names, metric_spec
from vlpbench.report.layout import (Grid, build_grid, format_cell, metric_name, percent_label, version_label,
                                    version_sort_key)
from vlpbench.protocols.base import TABLE_GROUPS
from vlpbench.report.comparisons import COMPARISONS, comparison_notes
from vlpbench.report.reference import ReferenceRow
from vlpbench.results import record_profile
from vlpbench.tasks import DEFAULT_PROFILE, PROFILE_HELP, PROFILES

FORMATS = ("md", "latex", "csv", "html")



def _override_text(value: Any) -> str:
    return str(value) if isinstance(value, (str, int, float)) else json.dumps(value, sort_keys=True)


def _base_label(record: dict) -> str:
    """Model name, then the user's config overrides, a non-fp32 precision and a profile other than
    ``canonical``, then a mark for synthetic data."""
    label = record["model"]["name"]
    overrides = record["config"].get("overrides") or {}
    if overrides:
        label += " (" + ", ".join(f"{k}={_override_text(v)}" for k, v in sorted(overrides.items())) + ")"
    if record["config"].get("precision", "fp32") != "fp32":
        label += f" [{record['config']['precision']}]"
    if record_profile(record) != DEFAULT_PROFILE:
        label += f" [{record_profile(record)}]"
    if (record.get("data") or {}).get("synthetic"):
        label += " [synthetic]"
    return label


def _checkpoint_tag(record: dict) -> str:
    sha = (record["model"].get("checkpoint") or {}).get("sha256")
    return sha[:8] if sha else "nockpt"


@lru_cache(maxsize=None)
def _shipped_protocol(task: str) -> str | None:
    from vlpbench.tasks import load_task

    try:
        return load_task(task).protocol
    except ConfigError:
        return None


def task_group(record: dict) -> str | None:
    """The paper table group (``seg``, ``det``, ``cls``, ``zs``, ``ground``) of a record's task.

    The ``table_group`` the record's protocol declares (``task.protocol`` in the record, or the shipped task
    YAML's for records that do not carry it); None for an unregistered protocol or an unknown task.
    """
    from vlpbench.registry import PROTOCOLS

    protocol = record["task"].get("protocol") or _shipped_protocol(record["task"]["name"])
    return PROTOCOLS.get(protocol).table_group if protocol in PROTOCOLS else None


def _record_name(record: dict) -> str:
    return (f"the record of {record['model']['name']}, {record['task']['name']} "
            f"{version_label(record['task']['version'])}, frac {record['frac']}, seed {record['seed']}")


def current_names(record: dict) -> dict:
    """``record`` with former metric names (``accuracy``) replaced by the current ones (``acc``) in
    ``metrics``, ``ci`` and ``primary_metric``: a record written before a rename fills the same cells
    and compares with new records. A shallow copy; the record file is never rewritten.

    Raises:
        DataError: the record holds one metric under two names, with different values.
    """
    renames = former_names()
    if not any(name in renames for name in (record["primary_metric"], *record["metrics"])):
        return record

    def renamed(mapping: dict, what: str) -> dict:
        out: dict = {}
        for name, value in mapping.items():
            current = renames.get(name, name)
            if current in out and out[current] != value:
                raise DataError(f"{_record_name(record)}: {what} holds {current} under its current and its former "
                                f"name with different values")
            out[current] = value
        return out

    return {**record, "metrics": renamed(record["metrics"], "metrics"),
            "ci": renamed(record["ci"], "ci") if isinstance(record.get("ci"), dict) else record.get("ci"),
            "primary_metric": renames.get(record["primary_metric"], record["primary_metric"])}


def _current_metric_names(metrics: Sequence[str] | None) -> list[str] | None:
    """``metrics`` (as ``--metrics`` gives them) under their current names: ``accuracy`` → ``acc``.

    Raises:
        ConfigError: a name that is no metric (see :func:`vlpbench.metrics.metric_spec`).
    """
    if not metrics:
        return None
    names = []
    for name in metrics:
        try:
            names.append(metric_spec(name).name)
        except ConfigError as error:
            raise ConfigError(f"--metrics {name}: {error}") from None
    return list(dict.fromkeys(names))


def _shown_metrics(record: dict, metrics: Sequence[str] | None) -> list[str]:
    if not metrics:
        return [record["primary_metric"]]
    present = [m for m in metrics if m in record["metrics"]]
    return present or [record["primary_metric"]]


def ci_bounds(record: dict, metric: str) -> tuple[float, float] | None:
    """The (low, high) bootstrap interval of ``metric`` in ``record``, or None where it has none."""
    ci = (record.get("ci") or {}).get(metric)
    if not isinstance(ci, dict) or ci.get("low") is None or ci.get("high") is None:
        return None
    return float(ci["low"]), float(ci["high"])


def split_identity(split: dict) -> str:
    """The split's sha256, or, where the test set was derived from the user's files (CheXpert's
    valid.csv), a sha256 over both, so that runs on different test sets never share a cell."""
    if not split.get("test_sha256"):
        return split["sha256"]
    return hashlib.sha256(f"{split['sha256']}+{split['test_sha256']}".encode()).hexdigest()


def table_rows(records: list[dict], metrics: Sequence[str] | None = None) -> list[dict]:
    """Aggregate records into one entry per (model row, task column).

    The model row label is the model name with its config overrides and a ``[synthetic]`` mark
    (see :func:`markdown_table`); when one label covers several checkpoints, each gets an
    ``@<sha256[:8]>`` tag so different checkpoints are never averaged. A task column is
    (task, task version, split sha256, fraction, metric, profile).

    Metrics are named as their specs name them today (:mod:`vlpbench.metrics.specs`): a record
    written under a former name (``accuracy``) fills the cells of the current one (``acc``).

    Args:
        records: result records.
        metrics: metric names to tabulate; each record contributes those of them it holds, or its
            primary metric when it holds none of them. None: the primary metric only.

    Returns:
        Dicts with ``model``, ``model_name``, ``task``, ``profile``, ``group``, ``version``, ``split_dataset``,
        ``split_version``, ``split_sha256``, ``frac``, ``metric``, ``mean``, ``std`` (sample std,
        ddof=1; None for a single seed), ``n_seeds``, ``seeds``, ``ci_low`` and ``ci_high`` (the
        mean over seeds of each seed's bootstrap bounds, i.e. the typical single-run interval; None
        unless every seed has one), sorted by model then column. A null metric value counts as
        NaN, so it shows up instead of silently dropping a seed.

    Raises:
        DataError: two records fill the same cell with the same seed, or a metric to tabulate has
            no spec.
        ConfigError: ``metrics`` names something that is no metric.
    """
    metrics = _current_metric_names(metrics)
    records = [current_names(r) for r in records]
    base = [_base_label(r) for r in records]
    checkpoints: dict[str, set[str]] = defaultdict(set)
    for label, record in zip(base, records):
        checkpoints[label].add(_checkpoint_tag(record))

    cells: dict[tuple, dict[str, Any]] = {}
    for label, record in zip(base, records):
        if len(checkpoints[label]) > 1:
            name = record["model"]["name"]
            label = name + f" @{_checkpoint_tag(record)}" + label[len(name):]
        task, split = record["task"], record["split"]
        for metric in _shown_metrics(record, metrics):
            try:
                metric_spec(metric)
            except ConfigError as error:
                raise DataError(f"{_record_name(record)}: {error}") from None
            column = (task["name"], task["version"], split_identity(split), float(record["frac"]), metric,
                      record_profile(record))
            cell = cells.setdefault((label, *column), {
                "model": label, "model_name": record["model"]["name"], "task": task["name"],
                "profile": record_profile(record),
                "group": task_group(record), "version": task["version"],
                "split_dataset": split["dataset"], "split_version": split["version"],
                "split_sha256": split_identity(split), "frac": float(record["frac"]), "metric": metric,
                "values": {}, "cis": {}})
            if record["seed"] in cell["values"]:
                raise DataError(f"two records for {label}, {task['name']} {version_label(task['version'])}, "
                                f"frac {record['frac']}, seed {record['seed']}; remove one")
            value = record["metrics"][metric]
            cell["values"][record["seed"]] = math.nan if value is None else float(value)
            cell["cis"][record["seed"]] = ci_bounds(record, metric)

    rows = []
    for cell in cells.values():
        seeds = sorted(cell.pop("values").items())
        cis = cell.pop("cis")
        values = np.array([v for _, v in seeds], dtype=np.float64)
        bounds = [cis[s] for s, _ in seeds]
        complete = all(b is not None for b in bounds)
        cell.update(mean=float(values.mean()),
                    std=float(values.std(ddof=1)) if len(values) > 1 else None,
                    n_seeds=len(values), seeds=[s for s, _ in seeds],
                    ci_low=float(np.mean([b[0] for b in bounds])) if complete else None,
                    ci_high=float(np.mean([b[1] for b in bounds])) if complete else None)
        rows.append(cell)
    rows.sort(key=lambda r: (r["model"], r["task"], version_sort_key(r["version"]), r["split_sha256"], r["frac"],
                             r["metric"]))
    return rows


def parse_fraction(text: str) -> float:
    """``"0.01"`` or ``"1%"`` as a fraction in (0, 1].

    Raises:
        ConfigError: not a number, or outside (0, 1].
    """
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"--fracs {text!r}: expected a fraction such as 0.01 or a percentage such as 1%") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"--fracs {text!r}: a training fraction lies in (0, 1] (or 0%-100%)")
    return value


def _known(option: str, wanted: Iterable[Any], present: set[Any], show=str) -> None:
    absent = [w for w in wanted if w not in present]
    if absent:
        raise ConfigError(f"{option} {', '.join(map(show, absent))}: no such result record; the records hold "
                          f"{', '.join(sorted(map(show, present)))}")


def select_records(records: list[dict], *, models: Sequence[str] | None = None,
                   tasks: Sequence[str] | None = None, fracs: Sequence[float] | None = None,
                   group: str | None = None, profile: str | None = None) -> list[dict]:
    """The records that pass every given filter (None: no filter).

    ``models`` match ``model.name``, ``tasks`` match ``task.name``, ``fracs`` match the training
    fraction (to 6 decimals), ``group`` is one of :data:`TABLE_GROUPS` and matches
    :func:`task_group`, or names a comparison (:data:`vlpbench.report.comparisons.COMPARISONS`) and
    matches its tasks and fractions; ``profile`` matches the record's protocol profile.

    Raises:
        ConfigError: a filter names a model, task, fraction or group that no record has, or
            ``group`` is not a known group.
        DataError: the filters together leave no record, or no record is of a task of the comparison.
    """
    if group is not None and group not in TABLE_GROUPS and group not in COMPARISONS:
        raise ConfigError(f"--group {group!r}: expected one of {', '.join((*TABLE_GROUPS, *COMPARISONS))}")
    if group in COMPARISONS:
        chosen = COMPARISONS[group]
        fractions = {round(f, 6) for f in chosen.fracs}
        records = [r for r in records
                   if r["task"]["name"] in chosen.tasks and round(float(r["frac"]), 6) in fractions]
        if not records:
            raise DataError(f"--group {group}: no record of the comparison's tasks ({', '.join(chosen.tasks)}) "
                            f"at its fractions ({', '.join(map(percent_label, chosen.fracs))})")
        group = None
    if models:
        _known("--models", models, {r["model"]["name"] for r in records})
    if tasks:
        _known("--tasks", tasks, {r["task"]["name"] for r in records})
    if fracs:
        _known("--fracs", [round(f, 6) for f in fracs], {round(float(r["frac"]), 6) for r in records}, percent_label)
    if group is not None:
        _known("--group", [group], {g for g in map(task_group, records) if g is not None})
    if profile is not None:
        if profile not in PROFILES:
            raise ConfigError(f"--profile {profile!r}: expected one of {', '.join(PROFILES)}")
        _known("--profile", [profile], {record_profile(r) for r in records})

    kept = [r for r in records
            if (not models or r["model"]["name"] in models)
            and (not tasks or r["task"]["name"] in tasks)
            and (not fracs or round(float(r["frac"]), 6) in {round(f, 6) for f in fracs})
            and (group is None or task_group(r) == group)
            and (profile is None or record_profile(r) == profile)]
    if not kept:
        raise DataError("no result record passes all of the filters together")
    return kept


def build_tables(records: list[dict], *, models: Sequence[str] | None = None,
                 tasks: Sequence[str] | None = None, fracs: Sequence[float] | None = None,
                 group: str | None = None, metrics: Sequence[str] | None = None, profile: str | None = None,
                 references: Sequence[ReferenceRow] = (), percent: bool = True,
                 decimals: int = 1, evidence_root: str | Path | None = None) -> list[tuple[str, Grid]]:
    """One ``(profile, grid)`` per protocol profile among the chosen records, in :data:`PROFILES` order.

    Records of two profiles never share a table: their numbers were computed by different rules, so
    neither a cell nor a best mark may set them side by side. Published rows (``references``) go only
    into the table of the profile they were computed with, and only into columns of their metric; a
    note under each table says which published rows were left out and why. A best cell whose lead over
    the second is significant is marked ``*`` (:func:`vlpbench.report.significance.mark_significant_leads`;
    ``evidence_root``: the results folder of the records, where their evidence sidecars are found).
    """
    from vlpbench.report.significance import mark_significant_leads

    if not records:
        raise DataError("no result records to tabulate")
    metrics = _current_metric_names(metrics)
    chosen = select_records(records, models=models, tasks=tasks, fracs=fracs, group=group, profile=profile)
    present = [p for p in PROFILES if any(record_profile(r) == p for r in chosen)]
    comparison = COMPARISONS.get(group) if group is not None else None
    task_order = tasks or (comparison.tasks if comparison else None)
    tables = []
    for name in present:
        mine = [r for r in chosen if record_profile(r) == name]
        grid = build_grid(table_rows(mine, metrics), references=[r for r in references if r.profile == name],
                          model_order=models, task_order=task_order, metric_order=metrics, percent=percent,
                          decimals=decimals)
        grid = mark_significant_leads(grid, mine, evidence_root=evidence_root)
        notes = (*(comparison_notes(comparison, chosen) if comparison else ()),
                 *_profile_notes(name, references), *_head_notes(mine))
        tables.append((name, replace(grid, provenance=grid.provenance + notes)))
    return tables


def _head_notes(records: list[dict]) -> list[str]:
    """Which records trained their head over a neck (a ViT's feature pyramid), by model and head.

    A ResNet's head reads the encoder's own stages; a transformer's reads a trained neck over its tokens, so
    such a cell differs from a ResNet cell by more than the encoder, and the table says so.
    """
    heads: dict[str, set[str]] = defaultdict(set)
    for record in records:
        head = ((record.get("config") or {}).get("training") or {}).get("head")
        if isinstance(head, str) and " over " in head:
            heads[record["model"]["name"]].add(head)
    return [f"{model}: {', '.join(sorted(names))} (the neck trains with the head; the transformer stays frozen)"
            for model, names in sorted(heads.items())]


def _profile_notes(profile: str, references: Sequence[ReferenceRow]) -> list[str]:
    notes = [] if profile == DEFAULT_PROFILE else [
        f"Profile {profile}: {PROFILE_HELP[profile]} (`vlpbench tasks --verbose --profile {profile}`)."]
    elsewhere = sorted({r.profile for r in references if r.profile != profile})
    if elsewhere:
        notes.append(f"Published rows computed with the {', '.join(elsewhere)} profile are shown only beside "
                     f"records of that profile (run with --profile {elsewhere[0]}), never beside {profile} records.")
    return notes


def build_table(records: list[dict], *, models: Sequence[str] | None = None,
                tasks: Sequence[str] | None = None, fracs: Sequence[float] | None = None,
                group: str | None = None, metrics: Sequence[str] | None = None, profile: str | None = None,
                references: Sequence[ReferenceRow] = (), percent: bool = True, decimals: int = 1) -> Grid:
    """Filter, aggregate and lay out ``records`` of one profile (see :func:`build_tables`).

    Rows follow ``models`` when given (else alphabetical), columns follow ``tasks`` when given
    (else paper group order: seg, det, cls, zs, ground, then other tasks, each alphabetical).

    Raises:
        DataError: there are no records, or the filters leave none.
        ConfigError: a filter names something no record has, or the records span several profiles
            and ``profile`` does not pick one.
    """
    tables = build_tables(records, models=models, tasks=tasks, fracs=fracs, group=group, metrics=metrics,
                          profile=profile, references=references, percent=percent, decimals=decimals)
    if len(tables) > 1:
        raise ConfigError(f"the records span the profiles {', '.join(p for p, _ in tables)}, which never share a "
                          "table; pick one with --profile")
    return tables[0][1]


def md_escape(text: str) -> str:
    """``text`` with Markdown's special characters escaped, for a table cell or a note."""
    # Backslash escapes keep a hostile name literal on GitHub (``<script>`` is not HTML, ``*`` no
    # emphasis); "_" is left alone because intraword underscores never emphasise (siim_seg).
    for char in "\\|*`<>":
        text = text.replace(char, "\\" + char)
    return text


def _md_metric_label(column) -> str:
    return f"{metric_name(column.metric)} {'↑' if column.higher_is_better else '↓'}"


def markdown_grid(grid: Grid) -> str:
    """Render a :class:`~vlpbench.report.layout.Grid` as a Markdown table with its notes."""
    def cell_text(row, column) -> str:
        cell = row.cells.get(column.key)
        if cell is None:
            return "–"
        return format_cell(cell, grid, pm="±", best="**{}**", second="<u>{}</u>", significant="\\*")

    def row_label(row) -> str:
        if row.citation is None:
            return md_escape(row.label)
        return f"*{md_escape(row.label)}*{row.citation.mark}"

    table = [["Model", *(md_escape(f"{c.task_label} {percent_label(c.frac)}") for c in grid.columns)],
             ["", *(_md_metric_label(c) for c in grid.columns)]]
    table += [[row_label(row), *(cell_text(row, c) for c in grid.columns)] for row in grid.rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]

    def format_line(line: list[str]) -> str:
        padded = [line[0].ljust(widths[0])] + [t.rjust(w) for t, w in zip(line[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    # Model names left-aligned, numbers right-aligned.
    alignment = [":" + "-" * (widths[0] - 1)] + ["-" * (w - 1) + ":" for w in widths[1:]]
    lines = [format_line(table[0]), "| " + " | ".join(alignment) + " |",
             *(format_line(line) for line in table[1:])]
    lines += ["", *(md_escape(note) for note in grid.legend)]
    lines += ["", *(f"- {md_escape(note)}" for note in grid.provenance)]
    lines += [f"- {md_escape(note)}" for note in grid.missing]
    lines += [f"{c.mark} {md_escape(c.text)}" for c in grid.citations]
    return "\n".join(lines) + "\n"


def markdown_table(records: list[dict], *, percent: bool = True, decimals: int = 1, **options: Any) -> str:
    """A paper-style Markdown leaderboard.

    Rows are models: ``record["model"]["name"]``, followed by the run's config overrides
    (``g2d (epochs=2, image_size=64)``) and `` [synthetic]`` for runs on synthetic data; reported
    rows (``references``) come first, in italics with a citation mark (†). Columns are task ×
    fraction (``siim_seg 1%``), with the metric and its direction (``Dice ↑``) in the first row. A
    cell is the mean ± sample std (ddof=1) over seeds, ×100 when ``percent``; a single seed shows
    the mean alone; ``(n=K)`` follows every cell when the seed count differs between cells; "–"
    marks a missing cell. The best value of a column (at the printed precision, following the
    metric's direction) is bold when the column has two or more measured entries, and the second
    best distinct value is underlined (``<u>…</u>``) when it is not also the worst; reported rows are
    never marked. A task whose records span several task versions or split files at one fraction
    gets one column per version and split, labelled ``v<version> (<sha256[:8]>)``. Lines under the
    table give each column's task version, split and split sha256[:12], why a model's cell is
    missing where another version holds its record, and the citations.

    ``options`` are the filters and settings of :func:`build_table` (``models``, ``tasks``,
    ``fracs``, ``group``, ``metrics``, ``references``).

    Raises:
        DataError: there are no records, or :func:`table_rows` rejects them.
    """
    return markdown_grid(build_table(records, percent=percent, decimals=decimals, **options))


def render_table(records: list[dict], fmt: str = "md", **options: Any) -> str:
    """The table of ``records`` in ``fmt`` (``md``, ``latex``, ``csv`` or ``html``).

    ``options`` are those of :func:`build_tables`. Records of several profiles give one table per
    profile, each under a heading. CSV holds one row per model × task × fraction × metric with
    unscaled values and the profile (see :func:`vlpbench.report.csv_table.csv_table`).

    Raises:
        ConfigError: an unknown format or filter value.
        DataError: no records, or none left by the filters.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    tables = build_tables(records, **options)
    if fmt == "csv":
        from vlpbench.report.csv_table import csv_table

        return "".join(csv_table(grid, profile, header=i == 0) for i, (profile, grid) in enumerate(tables))
    if fmt == "md":
        writer, heading = markdown_grid, "**Profile: {}**\n\n"
    elif fmt == "latex":
        from vlpbench.report.latex import latex_table

        writer, heading = latex_table, "% Profile: {}\n"
    else:
        from vlpbench.report.html_table import html_table

        writer, heading = html_table, "<h3>Profile: {}</h3>\n"
    if len(tables) == 1:
        return writer(tables[0][1])
    return "\n".join(heading.format(profile) + writer(grid) for profile, grid in tables)
