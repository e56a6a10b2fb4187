"""The leaderboard page: one self-contained ``index.html`` built from result records only.

Per paper task group (seg, det, cls, zs, ground, ret, then any other tasks) the page holds a sortable table
(the paper layout of :func:`vlpbench.report.table.build_tables`, one table per protocol profile; click a column header to sort, best
first, click again to reverse), a calibration table (ECE, Brier) where classification records hold them,
the metric-versus-fraction plots of the group's tasks (inline base64
PNG), and the provenance of every cell: a tooltip and a list of the runs behind it (checkpoint sha256,
seed, date, vlpbench version and commit). Where the records measure cells of the reproduction ledger, a
"Reproduction ledger" section holds its "reported / measured" table (:mod:`vlpbench.report.ledger_table`).
Styles and the sorting script are inline, so the page needs no network when viewed. Every string taken from a
record is HTML-escaped.
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from html import escape
from pathlib import Path
from typing import Any, Sequence

import vlpbench
from vlpbench.errors import DataError
from vlpbench.report.html_table import cell_markup
from vlpbench.ledger import LedgerCell
from vlpbench.report.layout import Cell, Column, Grid, Row, metric_name, percent_label
from vlpbench.report.reference import ReferenceRow
from vlpbench.report.reliability import calibration_tables
from vlpbench.protocols.base import TABLE_GROUPS
from vlpbench.report.table import build_tables, split_identity, table_rows, task_group
from vlpbench.tasks import DEFAULT_PROFILE

GROUP_TITLES = {"seg": "Segmentation", "det": "Detection", "cls": "Classification (linear probe, fine-tuning)",
                "zs": "Zero-shot classification", "ground": "Zero-shot grounding",
                "ret": "Image-text retrieval", "other": "Other tasks"}
_PAGE_DPI = 150  # inline plots: sharp on screen, a fraction of the 300-dpi files' size

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 80rem;
       padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2.5rem; }
.meta, .notes { color: #555; font-size: .85rem; }
nav a { margin-right: 1rem; }
table.leaderboard { border-collapse: collapse; margin: .8rem 0; font-variant-numeric: tabular-nums; }
table.leaderboard th, table.leaderboard td { border-bottom: 1px solid #ddd; padding: .3rem .6rem; text-align: right; }
table.leaderboard th[scope=row], table.leaderboard thead tr:first-child th:first-child { text-align: left; }
table.leaderboard thead th { background: #f4f4f6; }
th[data-sort] { cursor: pointer; user-select: none; }
th[data-sort]:hover { background: #e6e6ea; }
th[aria-sort=descending]::after { content: " ▼"; } th[aria-sort=ascending]::after { content: " ▲"; }
tr.reported { color: #666; font-style: italic; }
table.ledger { border-collapse: collapse; margin: .8rem 0; font-variant-numeric: tabular-nums; }
table.ledger th, table.ledger td { border-bottom: 1px solid #ddd; padding: .3rem .6rem; text-align: right; }
table.ledger th[scope=row], table.ledger tfoot td { text-align: left; }
table.ledger thead th { background: #f4f4f6; } table.ledger tfoot td { color: #555; font-size: .85rem; }
.verdict.reproduced { color: #1a7f37; } .verdict.below, .verdict.above { color: #b35900; }
td[title] { cursor: help; }
figure { display: inline-block; margin: .5rem 1rem .5rem 0; } figure img { width: 330px; height: auto; }
details { margin: .5rem 0; } details table td, details table th { text-align: left; font-size: .8rem; }
code { font-size: .8rem; }
"""

# Sorting: a header's data-column is the index of its cells in every body row. Numbers sort by the
# leading number of the cell text (the mean of "mean ± std"); empty cells ("–") always sort last; ties
# keep the original order. The first click puts the best first (data-higher says which way that is).
_SCRIPT = """
(function () {
  function key(row, column, numeric) {
    var text = row.cells[column].textContent.trim();
    if (!numeric) { return text.toLowerCase(); }
    var value = parseFloat(text);
    return isNaN(value) ? null : value;
  }
  function sortBy(table, header) {
    var column = Number(header.getAttribute("data-column"));
    var numeric = header.getAttribute("data-sort") === "number";
    var previous = header.getAttribute("aria-sort");
    var descending = previous ? previous === "ascending"
                              : numeric && header.getAttribute("data-higher") === "1";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, column, numeric), y = key(b, column, numeric);
      if (x === null || y === null) {
        if (x === y) { return Number(a.getAttribute("data-order")) - Number(b.getAttribute("data-order")); }
        return x === null ? 1 : -1;
      }
      if (x !== y) { return (x < y ? -1 : 1) * (descending ? -1 : 1); }
      return Number(a.getAttribute("data-order")) - Number(b.getAttribute("data-order"));
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.querySelectorAll("th[data-sort]"), function (other) {
      other.removeAttribute("aria-sort");
    });
    header.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.leaderboard"), function (table) {
    Array.prototype.forEach.call(table.querySelectorAll("th[data-sort]"), function (header) {
      header.addEventListener("click", function () { sortBy(table, header); });
      header.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortBy(table, header); }
      });
    });
  });
})();
"""


def _text(value: Any) -> str:
    """A record value as escaped HTML text (attribute-safe: quotes are escaped too)."""
    return escape(str(value), quote=True)


def _record_labels(record: dict) -> tuple[str, str]:
    """The two row labels a record can have in a table: as alone, and tagged with its checkpoint (used
    when one label covers several checkpoints, see :func:`vlpbench.report.table.table_rows`)."""
    plain = table_rows([record])[0]["model"]
    name = record["model"]["name"]
    sha = (record["model"].get("checkpoint") or {}).get("sha256")
    return plain, f"{name} @{sha[:8] if sha else 'nockpt'}{plain[len(name):]}"


class Provenance:
    """The records behind each measured cell of a table, found by row label, task column and seed."""

    def __init__(self, records: list[dict]):
        self._index: dict[tuple, list[dict]] = defaultdict(list)
        for record in records:
            task = record["task"]
            column = (task["name"], task["version"], split_identity(record["split"]), round(float(record["frac"]), 6))
            for label in set(_record_labels(record)):
                self._index[(label, *column)].append(record)

    def records(self, source: dict) -> list[dict]:
        """The records of a ``table_rows`` entry, by seed."""
        key = (source["model"], source["task"], source["version"], source["split_sha256"], round(source["frac"], 6))
        found = [r for r in self._index.get(key, []) if r["seed"] in source["seeds"]]
        return sorted(found, key=lambda r: r["seed"])


def run_summary(record: dict) -> str:
    """One line of provenance: seed, checkpoint sha256, date, vlpbench version and commit."""
    checkpoint = record["model"].get("checkpoint") or {}
    env = record.get("env") or {}
    return (f"seed {record['seed']}: checkpoint sha256 {checkpoint.get('sha256') or 'none'}; "
            f"{record['created']}; vlpbench {env.get('vlpbench', '?')}"
            + (f" ({env['git']})" if env.get("git") else ""))


def _cell_title(cell: Cell, row: Row, column: Column, provenance: Provenance) -> str:
    if row.citation is not None:
        return f"{row.label}: reported in {row.citation.citation}, {cell.source['table']}; not reproduced"
    source = cell.source
    lines = [f"{row.label} · {column.task_label} {percent_label(column.frac)} · {metric_name(column.metric)}",
             f"{source['n_seeds']} seed(s): {', '.join(map(str, source['seeds']))}"]
    if source["ci_low"] is not None:
        lines.append(f"95% bootstrap CI (mean over seeds): {source['ci_low']:.4f}–{source['ci_high']:.4f}")
    lines += [run_summary(record) for record in provenance.records(source)]
    return "\n".join(lines)


def _cell_html(cell: Cell | None, row: Row, column: Column, grid: Grid, provenance: Provenance) -> str:
    if cell is None:
        return "<td>–</td>"
    title = _cell_title(cell, row, column, provenance)
    return f'<td title="{_text(title)}">{cell_markup(cell, grid)}</td>'


def _row_header(row: Row) -> str:
    if row.citation is None:
        return f'<th scope="row">{_text(row.label)}</th>'
    return (f'<th scope="row" title="{_text(row.citation.text)}">{_text(row.label)}'
            f"<sup>{_text(row.citation.mark)}</sup></th>")


def sortable_table(grid: Grid, provenance: Provenance, table_id: str) -> str:
    """``grid`` as ``<table class="leaderboard">``: task groups in the first header row, sortable
    sub-columns (fraction and metric) in the second, one body row per model (``data-order`` keeps the
    paper order for ties), the notes in the footer. Cells carry their provenance in ``title``."""
    top = ['<th rowspan="2" scope="col" data-sort="text" data-column="0" tabindex="0">Model</th>']
    sub = []
    position = 1
    for group in grid.groups():
        title = _text(group.task_label)
        shared = group.shared_metric
        if shared is not None:
            title += f": {_text(metric_name(shared.metric))} {'↑' if shared.higher_is_better else '↓'}"
        top.append(f'<th colspan="{len(group.columns)}" scope="colgroup">{title}</th>')
        for column in group.columns:
            frac, show_metric = group.sub_label(column)
            arrow = "↑" if column.higher_is_better else "↓"
            parts = ([_text(frac)] if frac else []) + ([f"{_text(metric_name(column.metric))} {arrow}"]
                                                        if show_metric else [])
            sub.append(f'<th scope="col" data-sort="number" data-column="{position}" '
                       f'data-higher="{int(column.higher_is_better)}" tabindex="0">{" ".join(parts)}</th>')
            position += 1
    lines = [f'<table class="leaderboard" id="{_text(table_id)}">', "<thead>", f"<tr>{''.join(top)}</tr>",
             f"<tr>{''.join(sub)}</tr>", "</thead>", "<tbody>"]
    for order, row in enumerate(grid.rows):
        css = ' class="reported"' if row.citation is not None else ""
        cells = "".join(_cell_html(row.cells.get(c.key), row, c, grid, provenance) for c in grid.columns)
        lines.append(f'<tr data-order="{order}"{css}>{_row_header(row)}{cells}</tr>')
    lines += ["</tbody>", "<tfoot>"]
    notes = [_text(note) for note in (*grid.legend, *grid.provenance, *grid.missing)]
    notes += [f"<sup>{_text(c.mark)}</sup> {_text(c.text)}" for c in grid.citations]
    lines += [f'<tr><td class="notes" colspan="{len(grid.columns) + 1}" style="text-align:left">{note}</td></tr>'
              for note in notes]
    lines += ["</tfoot>", "</table>"]
    return "\n".join(lines)


def runs_table(records: list[dict]) -> str:
    """A collapsible list of the runs of a group: model, task, fraction, seed, primary metric and provenance."""
    head = ["Model", "Task", "Fraction", "Seed", "Metric", "Checkpoint sha256", "Date", "vlpbench", "Commit"]
    lines = ["<details><summary>Runs behind these cells</summary>", "<table>",
             "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    ordered = sorted(records, key=lambda r: (r["model"]["name"], r["task"]["name"], str(r["task"]["version"]),
                                             float(r["frac"]), r["seed"]))
    for record in ordered:
        value = record["metrics"][record["primary_metric"]]
        metric = metric_name(record["primary_metric"])
        env = record.get("env") or {}
        cells = [record["model"]["name"], f"{record['task']['name']} v{record['task']['version']}",
                 percent_label(float(record["frac"])), record["seed"],
                 f"{metric} = {value:.4f}" if value is not None else f"{metric} = –",
                 (record["model"].get("checkpoint") or {}).get("sha256") or "none", record["created"],
                 env.get("vlpbench", "?"), env.get("git") or "–"]
        lines.append("<tr>" + "".join(f"<td><code>{_text(c)}</code></td>" if i == 5 else f"<td>{_text(c)}</td>"
                                      for i, c in enumerate(cells)) + "</tr>")
    lines += ["</table>", "</details>"]
    return "\n".join(lines)


def _inline_plots(records: list[dict]) -> list[str]:
    from vlpbench.report.plots import curves_by_column, fraction_curves, fraction_figure

    figures = []
    for _, curves in curves_by_column(fraction_curves(records)):
        buffer = io.BytesIO()
        fraction_figure(curves).savefig(buffer, format="png", dpi=_PAGE_DPI, metadata={"Software": None})
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        alt = f"{curves[0].task_label}: {metric_name(curves[0].metric)} versus training fraction"
        figures.append(f'<figure><img alt="{_text(alt)}" src="data:image/png;base64,{data}"></figure>')
    return figures


def _groups(records: list[dict]) -> list[tuple[str, list[dict]]]:
    by_group: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_group[task_group(record) or "other"].append(record)
    return [(g, by_group[g]) for g in (*TABLE_GROUPS, "other") if by_group.get(g)]


def ledger_section(records: list[dict], ledger: Sequence[LedgerCell]) -> str | None:
    """The "Reproduction ledger" section: the published cells of ``ledger`` that ``records`` measure, as the
    HTML table of ``table --ledger`` (or why it cannot be built, e.g. a cell's records from two task versions);
    None where the records measure none."""
    from vlpbench.report.ledger_table import html_ledger, ledger_grid
    from vlpbench.report.verdicts import checkpoint_rows

    head = ['<section id="ledger">', "<h2>Reproduction ledger</h2>"]
    try:
        rows = checkpoint_rows(ledger, records)
    except DataError as error:  # e.g. a cell's records from two task versions: the rest of the page still shows
        return "\n".join([*head, f'<p class="notes">The ledger table cannot be built: {_text(error)}</p>',
                          "</section>"])
    if not rows:
        return None
    return "\n".join([*head,
                      '<p class="notes">Does the released checkpoint give the paper\'s number? Each cell: the '
                      "published value / the mean of these records, and the verdict (hover for the source and the "
                      "95% CI; <code>vlpbench reproduce</code> runs the missing cells).</p>",
                      html_ledger(ledger_grid(rows)).rstrip("\n"), "</section>"])


def leaderboard_html(records: list[dict], *, references: Sequence[ReferenceRow] = (), plots: bool = True,
                     title: str = "vlpbench leaderboard", evidence_root: str | Path | None = None,
                     ledger: Sequence[LedgerCell] = ()) -> str:
    """The self-contained page (see the module docstring) for ``records``.

    ``references`` add reported rows to the tables where they fill a column; ``plots`` adds the
    metric-versus-fraction figures; ``ledger`` (:func:`vlpbench.ledger.load_ledger`) adds the reproduction
    ledger's section where the records measure its cells. The page depends only on its inputs and the vlpbench
    version (no build time in it), so the same records give the same file. ``evidence_root``: the results folder,
    where the records' evidence sidecars are found for the significance marks of the tables.

    Raises:
        DataError: there are no records, or the table rejects them.
    """
    if not records:
        raise DataError("no result records for the leaderboard (run `vlpbench run` first)")
    provenance = Provenance(records)
    groups = _groups(records)
    newest = max(record["created"] for record in records)
    nav = " ".join(f'<a href="#group-{g}">{_text(GROUP_TITLES[g])}</a>' for g, _ in groups)
    reproduction = ledger_section(records, ledger) if ledger else None
    if reproduction is not None:
        nav += ' <a href="#ledger">Reproduction ledger</a>'
    body = [f"<h1>{_text(title)}</h1>",
            f'<p class="meta">{len(records)} result records (newest {_text(newest)}); page built by vlpbench '
            f"{_text(vlpbench.__version__)}. Hover a cell for its seeds, checkpoints and dates; click a column "
            "header to sort (best first), again to reverse.</p>",
            f"<nav>{nav}</nav>"]
    for group, chosen in groups:
        body += [f'<section id="group-{group}">', f"<h2>{_text(GROUP_TITLES[group])}</h2>"]
        tables = build_tables(chosen, group=None if group == "other" else group, references=references,
                              evidence_root=evidence_root)
        for profile, grid in tables:
            # Records of two profiles never share a table (see vlpbench.report.table.build_tables).
            if len(tables) > 1:
                body.append(f"<h3>Profile: {_text(profile)}</h3>")
            suffix = "" if profile == DEFAULT_PROFILE else f"-{profile}"
            body.append(sortable_table(grid, provenance, f"table-{group}{suffix}"))
        for profile, grid in calibration_tables(chosen):
            suffix = "" if profile == DEFAULT_PROFILE else f"-{profile}"
            shown = "" if profile == DEFAULT_PROFILE else f", {_text(profile)} profile"
            body += [f"<h3>Calibration: ECE and Brier score (×100, lower is better{shown})</h3>",
                     sortable_table(grid, provenance, f"table-{group}-calibration{suffix}")]
        if plots:
            body += _inline_plots(chosen)
        body += [runs_table(chosen), "</section>"]
    from vlpbench.report.subgroups import leaderboard_section

    body.append(leaderboard_section(records))
    if reproduction is not None:
        body.append(reproduction)
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      f"<title>{_text(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
                      *body, f"<script>{_SCRIPT}</script>", "</body>", "</html>"]) + "\n"


def write_leaderboard(records: list[dict], out: str | Path, **options: Any) -> Path:
    """Write :func:`leaderboard_html` to ``<out>/index.html``; its path. ``options`` as for the page."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(leaderboard_html(records, **options), encoding="utf-8")
    return path
