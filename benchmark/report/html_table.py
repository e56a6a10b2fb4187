"""HTML rendering of a table grid: one standalone ``<table>`` fragment, every string escaped."""

from __future__ import annotations

from html import escape

from vlpbench.report.layout import Cell, Column, Grid, Row, format_cell, metric_name


def _metric(column: Column) -> str:
    return f"{escape(metric_name(column.metric))} {'↑' if column.higher_is_better else '↓'}"


def cell_markup(cell: Cell, grid: Grid) -> str:
    """A cell's ``mean ± std`` as HTML, bold when best and underlined when second, then ``(n=K)`` where shown."""
    return format_cell(cell, grid, pm="±", best="<b>{}</b>", second="<u>{}</u>")


def _cell(cell: Cell | None, grid: Grid) -> str:
    return "<td>–</td>" if cell is None else f"<td>{cell_markup(cell, grid)}</td>"


def _label(row: Row) -> str:
    if row.citation is None:
        return f'<th scope="row">{escape(row.label)}</th>'
    return f'<th scope="row"><i>{escape(row.label)}</i><sup>{escape(row.citation.mark)}</sup></th>'


def html_table(grid: Grid) -> str:
    """Render ``grid`` as ``<table class="vlpbench-table">``: a two-row header (task groups, then
    fractions or metrics), reported rows (class ``reported``) before measured ones, and the notes in
    ``<tfoot>``. Model names, task names and notes are escaped with :func:`html.escape`, so a model
    called ``<script>`` shows as text."""
    groups = grid.groups()
    top = ['<th rowspan="2" scope="col">Model</th>']
    sub = []
    for group in groups:
        title = escape(group.task_label)
        if group.shared_metric is not None:
            title += ": " + _metric(group.shared_metric)
        top.append(f'<th colspan="{len(group.columns)}" scope="colgroup">{title}</th>')
        for column in group.columns:
            frac, show_metric = group.sub_label(column)
            parts = ([escape(frac)] if frac else []) + ([_metric(column)] if show_metric else [])
            sub.append(f'<th scope="col">{" ".join(parts)}</th>')

    lines = ['<table class="vlpbench-table">', "<thead>", f"<tr>{''.join(top)}</tr>",
             f"<tr>{''.join(sub)}</tr>", "</thead>", "<tbody>"]
    for row in grid.rows:
        css = ' class="reported"' if row.citation is not None else ""
        cells = "".join(_cell(row.cells.get(c.key), grid) for c in grid.columns)
        lines.append(f"<tr{css}>{_label(row)}{cells}</tr>")
    lines += ["</tbody>", "<tfoot>"]
    span = len(grid.columns) + 1
    notes = [escape(note) for note in (*grid.legend, *grid.provenance, *grid.missing)]
    notes += [f"<sup>{escape(c.mark)}</sup> {escape(c.text)}" for c in grid.citations]
    lines += [f'<tr><td colspan="{span}">{note}</td></tr>' for note in notes]
    lines += ["</tfoot>", "</table>"]
    return "\n".join(lines) + "\n"
