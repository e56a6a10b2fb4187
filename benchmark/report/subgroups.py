"""Subgroup results as text, as a table across records, as a figure and as a leaderboard section.

Everything here reads the ``subgroups`` entry that ``run`` writes into a record (or ``score`` returns), as
:func:`vlpbench.metrics.subgroups.subgroup_metrics` computed it; nothing is recomputed. Across seeds, a
cell is the mean of the seeds' values and its interval the mean of their CI bounds (as the main table does).
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlpbench.data.attributes import ATTRIBUTES
from vlpbench.errors import ConfigError, DataError
from vlpbench.report.layout import metric_name, percent_label, version_label
from vlpbench.report.table import select_records


def _number(value: float) -> str:
    return f"{value:.4f}"


def subgroup_lines(subgroups: dict[str, Any], names: Sequence[str]) -> str:
    """The subgroup results of ``names`` (attributes) as plain text, one block per attribute::

        auc by sex (95% CI, 200 resamples within each subgroup; at least 10 test items and, ...)
          F        n=54  pos=12  0.8123 (0.7012–0.9011)
          M        n=66  pos=15  0.7450 (0.6311–0.8420)
          gap F − M = 0.0673 (95% CI -0.0712–0.2011)
    """
    blocks = []
    for name in names:
        result = subgroups.get(name)
        if result is None:
            blocks.append(f"{name}: no subgroup results")
            continue
        if "groups" not in result:
            blocks.append(f"{result['metric']} by {name}: {result['reason']}")
            continue
        bins = (f", age bins {','.join(f'{e:g}' for e in result['age_bins'])}" if "age_bins" in result else "")
        lines = [f"{result['metric']} by {name} ({result['level']:.0%} CI, {result['n_resamples']} resamples within "
                 f"each subgroup; at least {result['min_items']} test items and, where the metric needs them, "
                 f"{result['min_positives']} positives and negatives per class{bins})"]
        width = max(len(row["group"]) for row in result["groups"])
        for row in result["groups"]:
            positives = f"  pos={min(row['positives'].values())}" if row.get("positives") else ""
            head = f"  {row['group']:<{width}}  n={row['n']}{positives}  "
            if row["value"] is None:
                lines.append(head + f"no value: {row['reason']}")
                continue
            ci = row.get("ci")
            interval = f" ({_number(ci['low'])}–{_number(ci['high'])})" if ci else ""
            lines.append(head + _number(row["value"]) + interval)
        gap = result.get("gap")
        if gap is None:
            lines.append(f"  gap: none ({result.get('gap_reason', '')})")
        else:
            ci = gap.get("ci")
            interval = f" ({result['level']:.0%} CI {_number(ci['low'])}–{_number(ci['high'])})" if ci else ""
            lines.append(f"  gap {gap['high']} − {gap['low']} = {_number(gap['value'])}{interval}")
        if "note" in result:
            lines.append(f"  note: {result['note']}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def check_attribute(name: str) -> None:
    """ConfigError unless ``name`` is an attribute (``--by``)."""
    if name not in ATTRIBUTES:
        raise ConfigError(f"--by {name}: expected one of {', '.join(ATTRIBUTES)}")


def _mean(values: list[float | None]) -> float | None:
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def subgroup_rows(records: list[dict], name: str) -> list[dict[str, Any]]:
    """One row per (model, task, version, profile, fraction) whose records hold subgroup results for ``name``:
    ``model``, ``task``, ``version``, ``profile``, ``frac``, ``metric``, ``n_seeds``, ``groups`` (group ->
    ``{value, low, high, n}`` averaged over seeds, or ``{reason}``), ``gap`` (``{high, low, value, ci_low,
    ci_high}`` when every seed names the same pair, else None) and ``reasons``.

    Raises:
        DataError: no record holds subgroup results for ``name``.
    """
    check_attribute(name)
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        result = (record.get("subgroups") or {}).get(name)
        if result is None or "groups" not in result:
            continue
        key = (record["model"]["name"], record["task"]["name"], record["task"]["version"],
               record["task"].get("profile", "canonical"), float(record["frac"]), result["metric"])
        cells[key].append(result)
    if not cells:
        raise DataError(f"no record holds subgroup results for {name}: its dataset's files carry no {name}, or "
                        "the records were written before subgroups existed (rerun, or `vlpbench score` the "
                        "saved predictions)")
    rows = []
    for (model, task, version, profile, frac, metric), results in sorted(cells.items(), key=lambda c: str(c[0])):
        groups: dict[str, dict[str, Any]] = {}
        labels = list(dict.fromkeys(row["group"] for result in results for row in result["groups"]))
        for label in labels:
            found = [row for result in results for row in result["groups"] if row["group"] == label]
            values = [row["value"] for row in found]
            if len(found) == len(results) and all(v is not None for v in values):
                cis = [row.get("ci") or {} for row in found]
                groups[label] = {"value": _mean(values), "low": _mean([c.get("low") for c in cis]),
                                 "high": _mean([c.get("high") for c in cis]), "n": found[0]["n"]}
            else:
                groups[label] = {"reason": next((row["reason"] for row in found if row["value"] is None),
                                                "not every seed has this subgroup"), "n": found[0]["n"]}
        gaps = [result.get("gap") for result in results]
        gap = None
        if all(g is not None for g in gaps) and len({(g["high"], g["low"]) for g in gaps}) == 1:
            cis = [g.get("ci") or {} for g in gaps]
            gap = {"high": gaps[0]["high"], "low": gaps[0]["low"], "value": _mean([g["value"] for g in gaps]),
                   "ci_low": _mean([c.get("low") for c in cis]), "ci_high": _mean([c.get("high") for c in cis])}
        rows.append({"model": model, "task": task, "version": version, "profile": profile, "frac": frac,
                     "metric": metric, "n_seeds": len(results), "groups": groups, "gap": gap})
    return rows


def _scaled(value: float | None, percent: bool, decimals: int) -> str:
    if value is None:
        return "?"
    return f"{value * 100 if percent else value:.{decimals}f}"


def subgroup_table(records: list[dict], name: str, *, percent: bool = True, decimals: int = 1,
                   **filters: Any) -> str:
    """A Markdown table of the primary metric per subgroup of ``name``: one row per model × task × fraction,
    a column per subgroup (``value [CI low, high]``, n) and a gap column (best minus worst subgroup, with the
    CI of the difference). Values ×100 when ``percent``. ``filters`` are those of
    :func:`vlpbench.report.table.select_records` (``models``, ``tasks``, ``fracs``, ``group``, ``profile``).

    Raises:
        DataError: no records, none left by the filters, or none with subgroup results for ``name``.
    """
    if not records:
        raise DataError("no result records to tabulate")
    rows = subgroup_rows(select_records(records, **filters), name)
    labels = list(dict.fromkeys(label for row in rows for label in row["groups"]))
    head = ["Model", "Task", "Metric", *labels, "Gap (best − worst)"]
    table = [head]
    notes: list[str] = []
    for row in rows:
        cells = []
        for label in labels:
            cell = row["groups"].get(label)
            if cell is None:
                cells.append("–")
            elif "reason" in cell:
                notes.append(f"{row['model']}, {row['task']}, {label}: {cell['reason']}")
                cells.append(f"n/a [{len(notes)}] (n={cell['n']})")
            else:
                interval = (f" [{_scaled(cell['low'], percent, decimals)}, {_scaled(cell['high'], percent, decimals)}]"
                            if cell["low"] is not None else "")
                cells.append(f"{_scaled(cell['value'], percent, decimals)}{interval} (n={cell['n']})")
        gap = row["gap"]
        if gap is None:
            cells.append("–")
        else:
            interval = (f" [{_scaled(gap['ci_low'], percent, decimals)}, {_scaled(gap['ci_high'], percent, decimals)}]"
                        if gap["ci_low"] is not None else "")
            cells.append(f"{_scaled(gap['value'], percent, decimals)}{interval} {gap['high']} − {gap['low']}")
        task = f"{row['task']} {version_label(row['version'])} {percent_label(row['frac'])}"
        if row["profile"] != "canonical":
            task += f" [{row['profile']}]"
        seeds = f" ({row['n_seeds']} seeds)" if row["n_seeds"] > 1 else ""
        table.append([row["model"] + seeds, task, metric_name(row["metric"]), *cells])
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    lines = ["| " + " | ".join(text.ljust(w) for text, w in zip(line, widths)) + " |" for line in table]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    scale = "×100, " if percent else ""
    lines += ["", f"Cells: {metric_name(rows[0]['metric'])} per {name} subgroup ({scale}value [95% bootstrap CI, "
                  "resampled within the subgroup], n test items); the gap is the best minus the worst subgroup "
                  "(unknown left out) with the CI of that difference on the same resamples. Over several seeds: "
                  "mean values and mean CI bounds."]
    lines += [f"[{k}] {note}" for k, note in enumerate(notes, start=1)]
    return "\n".join(lines) + "\n"


def subgroup_figure(row: dict[str, Any], name: str):
    """The metric (×100) per subgroup of one table row as points with CI bars; subgroups without a value are
    named on the axis with "n/a". A matplotlib Figure."""
    from vlpbench.report.plots import COLUMN_WIDTH_IN, CURVE_HEIGHT_IN, new_figure, plot_style

    labels = list(row["groups"])
    with plot_style():
        figure = new_figure(COLUMN_WIDTH_IN, CURVE_HEIGHT_IN)
        axes = figure.add_subplot()
        for x, label in enumerate(labels):
            cell = row["groups"][label]
            if "reason" in cell:
                axes.annotate("n/a", (x, 0.5), xycoords=("data", "axes fraction"), ha="center", fontsize=7)
                continue
            value = cell["value"] * 100
            if cell["low"] is not None:
                errors = [[value - cell["low"] * 100], [cell["high"] * 100 - value]]
                axes.errorbar([x], [value], yerr=errors, fmt="o", color="C0", capsize=3)
            else:
                axes.plot([x], [value], "o", color="C0")
        axes.set_xticks(range(len(labels)), [f"{label}\nn={row['groups'][label]['n']}" for label in labels])
        axes.set_xlim(-0.5, len(labels) - 0.5)
        if all("reason" in row["groups"][label] for label in labels):
            axes.set_ylim(0, 100)  # nothing drawn: keep the axis in the units its label names
        axes.set_ylabel(f"{metric_name(row['metric'])} (×100)")
        axes.set_xlabel(name)
        axes.set_title(f"{row['model']} · {row['task']} {percent_label(row['frac'])}")
        axes.grid(True, axis="y", linewidth=0.3, alpha=0.5)
    return figure


def plot_subgroups(records: list[dict], out: str | Path, name: str, *, tasks: Sequence[str] | None = None,
                   formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write ``<out>/<task>.<model>.<frac>.by_<name>.<format>``: one subgroup figure per table row
    (:func:`subgroup_rows`); the files written."""
    from vlpbench.report.plots import file_stem, save_figure

    chosen = select_records(records, tasks=tasks) if tasks else records
    paths = []
    for row in subgroup_rows(chosen, name):
        stem = file_stem(f"{row['task']}.{row['model']}.frac{row['frac']:g}.by_{name}")
        paths += save_figure(subgroup_figure(row, name), Path(out) / stem, formats)
    return paths


def leaderboard_section(records: list[dict]) -> str:
    """An HTML section with the subgroup table of every attribute some record holds ("" when none does)."""
    present = [name for name in ATTRIBUTES
               if any("groups" in ((r.get("subgroups") or {}).get(name) or {}) for r in records)]
    if not present:
        return ""
    parts = ["<section id=\"subgroups\"><h2>Subgroups</h2>",
             "<p>The primary metric per subgroup of the test images, with 95% bootstrap CIs resampled within each "
             "subgroup, and the gap between the best and the worst subgroup with the CI of the difference.</p>"]
    for name in present:
        parts.append(f"<h3>By {html.escape(name)}</h3><pre>{html.escape(subgroup_table(records, name))}</pre>")
    parts.append("</section>")
    return "\n".join(parts)
