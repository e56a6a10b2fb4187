"""The reproduction ledger as a paper table: ``vlpbench table --ledger`` and the leaderboard's ledger section.

A row per released checkpoint (ledger model and file) whose cells the records measure, a column per task ×
fraction × metric of its published cells, and in each cell "reported / measured" and the verdict's mark
(:data:`vlpbench.report.verdicts.MARKS`), with a footnote number for the source (citation and table) and a
letter for the reason of a not-comparable cell. :func:`ledger_grid` lays the table out; the Markdown, LaTeX and
HTML writers only format it, escaping every string as the leaderboard tables do.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Sequence

from vlpbench.errors import ConfigError
from vlpbench.report.latex import latex_escape
from vlpbench.report.layout import metric_name, percent_label
from vlpbench.report.table import md_escape
from vlpbench.report.verdicts import (LEGEND, MARKS, CheckpointRow, Judged, display_scale, printed_decimals,
                                      rounded, value_text, verdict_text)

FORMATS = ("md", "latex", "html")
# LaTeX: one command per mark, defined with \providecommand in symbols every LaTeX has (a document may
# \renewcommand them, e.g. \vlpReproduced as amssymb's \checkmark).
_LATEX_MARKS = {"reproduced": ("vlpReproduced", r"\ensuremath{\surd}"),
                "below": ("vlpBelow", r"\ensuremath{\downarrow}"), "above": ("vlpAbove", r"\ensuremath{\uparrow}"),
                "not comparable": ("vlpNotComparable", r"\ensuremath{\not\sim}"), "not run": ("vlpNotRun", "--")}
EMPTY = "·"  # a column in which the checkpoint has no published cell
_LATEX_EMPTY = r"\ensuremath{\cdot}"


@dataclass(frozen=True)
class LedgerColumn:
    """A column: a task at one fraction, one metric, computed under one protocol profile."""

    task: str
    frac: float
    metric: str
    profile: str


@dataclass(frozen=True)
class GridEntry:
    """One judged cell as the writers print it: texts, its verdict, its source's footnote number and its
    reason's letter (not comparable only)."""

    reported: str
    measured: str | None
    verdict: str
    title: str
    source: int
    reason: str | None


@dataclass(frozen=True)
class LedgerGrid:
    """Everything a writer prints; notes are plain text for the writer to escape."""

    columns: tuple[LedgerColumn, ...]
    rows: tuple[tuple[str, dict[LedgerColumn, tuple[GridEntry, ...]]], ...]
    sources: tuple[str, ...]
    reasons: tuple[str, ...]
    notes: tuple[str, ...]
    show_profile: bool

    def header(self, column: LedgerColumn) -> tuple[str, str]:
        """(``siim_seg 1%``, ``Dice ↑``), the profile after the metric where the table holds two."""
        from vlpbench.metrics.specs import metric_spec

        arrow = "↑" if metric_spec(column.metric).higher_is_better else "↓"
        metric = f"{metric_name(column.metric)} {arrow}" + (f" ({column.profile})" if self.show_profile else "")
        return f"{column.task} {percent_label(column.frac)}", metric


def _letters(index: int) -> str:
    """0 → a, 25 → z, 26 → aa."""
    text = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        text = chr(ord("a") + rest) + text
    return text


def _title(judged: Judged) -> str:
    measured, cell = judged.measured, judged.cell
    parts = [f"{verdict_text(judged.verdict)}; {cell.citation}, {cell.table}, row {cell.row}"]
    if measured is not None:
        decimals = printed_decimals(cell) + 1
        spread = "" if measured.std is None else f" ± {value_text(measured.std, cell.metric, decimals)}"
        parts.append(f"measured {value_text(measured.mean, cell.metric, decimals)}{spread} over "
                     f"{measured.n_seeds} seed(s), 95% CI {value_text(measured.ci_low, cell.metric, decimals)}–"
                     f"{value_text(measured.ci_high, cell.metric, decimals)}")
    return "; ".join(parts)


def ledger_grid(rows: Sequence[CheckpointRow]) -> LedgerGrid:
    """Lay out judged checkpoint rows (:func:`vlpbench.report.verdicts.checkpoint_rows`) as a table.

    Columns follow the ledger's order (its files, rows and columns: the papers' order); a cell two sources
    print for one checkpoint shows both, one after the other.

    Raises:
        ConfigError: no row (no record measures a ledger cell; ``--models`` shows models without records).
    """
    if not rows:
        raise ConfigError("no result record measures a ledger cell: run `vlpbench reproduce`, or name models "
                          "with --models to see their published cells")
    columns = list(dict.fromkeys(LedgerColumn(j.cell.task, j.cell.frac, j.cell.metric, j.cell.profile)
                                 for row in rows for j in row.judged))
    sources: list[str] = []
    reasons: list[str] = []
    labels = [f"{row.entry.model} ({row.entry.file})" for row in rows]
    shas = {row.entry: {r.sha256 for r in rows if r.entry == row.entry} for row in rows}
    grid_rows = []
    notes = []
    for row, label in zip(rows, labels):
        if labels.count(label) > 1 and len(shas[row.entry]) == 1:
            label += f" [{row.entry.id}]"
        elif len(shas[row.entry]) > 1:
            label += f" @{row.sha256[:8]}"
        cells: dict[LedgerColumn, tuple[GridEntry, ...]] = {}
        for j in row.judged:
            cell = j.cell
            source = f"{cell.citation}, {cell.table}" + (f" ({cell.url})" if cell.url else "")
            if source not in sources:
                sources.append(source)
            reason = None
            if j.verdict.reason is not None:
                if j.verdict.reason not in reasons:
                    reasons.append(j.verdict.reason)
                reason = _letters(reasons.index(j.verdict.reason))
            decimals = printed_decimals(cell)
            entry = GridEntry(value_text(cell.value, cell.metric, decimals),
                              None if j.measured is None else value_text(j.measured.mean, cell.metric, decimals),
                              j.verdict.kind, _title(j), sources.index(source) + 1, reason)
            column = LedgerColumn(cell.task, cell.frac, cell.metric, cell.profile)
            cells[column] = (*cells.get(column, ()), entry)
        grid_rows.append((label, cells))
        if not row.entry.released:
            notes.append(f"{label}: the authors published no weights ({row.entry.published_by}); its measured "
                         "values are of the file the records name, not of the checkpoint behind the published "
                         "numbers.")
        if row.sha256 is not None:
            notes.append(f"{label}: measured by the records of checkpoint sha256 {row.sha256}.")
    judged = [j for row in rows for j in row.judged]
    scaled = any(display_scale(j.cell.metric) == 100.0 for j in judged)
    legend = ("Cells: reported / measured: the published value as the source prints it, and the mean over seeds "
              f"of the records{' (×100 where the metric is a share)' if scaled else ''}. {LEGEND}")
    if any(column not in cells for _, cells in grid_rows for column in columns):
        notes.append(f"{EMPTY} the checkpoint has no published cell in this column.")
    if any(rounded(j.cell) for j in judged):
        notes.append("Values a source prints with more digits are shown rounded.")
    return LedgerGrid(tuple(columns), tuple(grid_rows), tuple(sources), tuple(reasons), (legend, *notes),
                      len({c.profile for c in columns}) > 1)


def _entry_text(entry: GridEntry, marks: dict[str, str], source: str, reason: str) -> str:
    """``reported / measured mark source reason``; the not-run mark stands in the measured place."""
    text = f"{entry.reported} / {entry.measured if entry.measured is not None else marks['not run']}"
    if entry.verdict != "not run":
        text += f" {marks[entry.verdict]}"
    return text + source + (reason if entry.reason else "")


def markdown_ledger(grid: LedgerGrid) -> str:
    """``grid`` as a Markdown table with its legend, notes and footnotes ([1] sources, (a) reasons)."""
    def cell_text(cells: tuple[GridEntry, ...] | None) -> str:
        if not cells:
            return EMPTY
        return "; ".join(_entry_text(e, MARKS, f" [{e.source}]", f" ({e.reason})") for e in cells)

    heads = [grid.header(c) for c in grid.columns]
    table = [["Model (checkpoint)", *(md_escape(h[0]) for h in heads)], ["", *(md_escape(h[1]) for h in heads)]]
    table += [[md_escape(label), *(md_escape(cell_text(cells.get(c))) for c in grid.columns)]
              for label, cells in grid.rows]
    widths = [max(3, *(len(line[i]) for line in table)) for i in range(len(table[0]))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0]), *(text.rjust(w) for text, w in zip(cells[1:], widths[1:]))]
        return "| " + " | ".join(padded) + " |"

    # Model names left-aligned, cells right-aligned.
    rule = [":" + "-" * (widths[0] - 1), *("-" * (w - 1) + ":" for w in widths[1:])]
    lines = [line(table[0]), "| " + " | ".join(rule) + " |", *(line(cells) for cells in table[1:]), ""]
    lines += [md_escape(grid.notes[0]), "", *(f"- {md_escape(note)}" for note in grid.notes[1:]), ""]
    lines += [f"[{i}] {md_escape(text)}" for i, text in enumerate(grid.sources, 1)]
    lines += [f"({_letters(i)}) not comparable: {md_escape(text)}" for i, text in enumerate(grid.reasons)]
    return "\n".join(lines) + "\n"


def _latex_text(text: str) -> str:
    """``text`` escaped for LaTeX, each verdict mark as its command."""
    commands = {mark: f"\\{_LATEX_MARKS[kind][0]}{{}}" for kind, mark in MARKS.items()}
    commands[EMPTY] = _LATEX_EMPTY
    placeholders = {char: chr(0xE000 + i) for i, char in enumerate(commands)}
    escaped = latex_escape("".join(placeholders.get(char, char) for char in text))
    for char, command in commands.items():
        escaped = escaped.replace(placeholders[char], command)
    return escaped


def latex_ledger(grid: LedgerGrid) -> str:
    """``grid`` as a booktabs ``table`` float; the marks are commands defined with ``\\providecommand`` above it
    (``\\vlpReproduced`` …), the footnotes superscript numbers (sources) and letters (reasons)."""
    def cell_text(cells: tuple[GridEntry, ...] | None) -> str:
        if not cells:
            return _LATEX_EMPTY
        return "; ".join(_entry_text(e, commands, f"\\textsuperscript{{{e.source}}}",
                                     f"\\textsuperscript{{{e.reason}}}") for e in cells)

    commands = {kind: f"\\{name}{{}}" for kind, (name, _) in _LATEX_MARKS.items()}

    heads = [grid.header(c) for c in grid.columns]
    lines = ["% Generated by `vlpbench table --ledger --format latex`; needs \\usepackage{booktabs}.",
             *(f"\\providecommand{{\\{name}}}{{{symbol}}}" for name, symbol in _LATEX_MARKS.values()),
             "\\begin{table}[t]", "\\centering", f"\\begin{{tabular}}{{l{'r' * len(grid.columns)}}}", "\\toprule",
             " & ".join(["Model (checkpoint)", *(latex_escape(h[0]) for h in heads)]) + " \\\\",
             " & ".join(["", *(latex_escape(h[1]) for h in heads)]) + " \\\\", "\\midrule"]
    # Cell texts hold numbers and commands only: escape the labels, never the markup.
    lines += [" & ".join([latex_escape(label), *(cell_text(cells.get(c)) for c in grid.columns)]) + " \\\\"
              for label, cells in grid.rows]
    lines += ["\\bottomrule", "\\end{tabular}", "\\par\\smallskip", "{\\footnotesize\\raggedright"]
    lines += [_latex_text(note) + "\\\\" for note in grid.notes]
    lines += [f"\\textsuperscript{{{i}}} {latex_escape(text)}\\\\" for i, text in enumerate(grid.sources, 1)]
    lines += [f"\\textsuperscript{{{_letters(i)}}} not comparable: {latex_escape(text)}\\\\"
              for i, text in enumerate(grid.reasons)]
    lines[-1] = lines[-1].removesuffix("\\\\") + "\\par}"
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def html_ledger(grid: LedgerGrid) -> str:
    """``grid`` as ``<table class="vlpbench-table ledger">``: each mark a ``<span class="verdict ...">``, each
    cell's verdict, source and measurement (seeds, 95 % CI) in its ``title``; every string escaped."""
    def cell_html(cells: tuple[GridEntry, ...] | None) -> str:
        if not cells:
            return f"<td>{EMPTY}</td>"
        title = escape("\n".join(e.title for e in cells), quote=True)
        texts = [_entry_text(e, spans, f"<sup>{e.source}</sup>", f"<sup>{e.reason}</sup>") for e in cells]
        return f'<td title="{title}">{"; ".join(texts)}</td>'

    spans = {kind: f'<span class="verdict {kind.replace(" ", "-")}">{mark}</span>' for kind, mark in MARKS.items()}
    heads = [grid.header(c) for c in grid.columns]
    lines = ['<table class="vlpbench-table ledger">', "<thead>",
             '<tr><th rowspan="2" scope="col">Model (checkpoint)</th>'
             + "".join(f'<th scope="col">{escape(h[0])}</th>' for h in heads) + "</tr>",
             "<tr>" + "".join(f'<th scope="col">{escape(h[1])}</th>' for h in heads) + "</tr>", "</thead>", "<tbody>"]
    lines += [f'<tr><th scope="row">{escape(label)}</th>{"".join(cell_html(cells.get(c)) for c in grid.columns)}</tr>'
              for label, cells in grid.rows]
    span = len(grid.columns) + 1
    notes = [escape(note) for note in grid.notes]
    notes += [f"<sup>{i}</sup> {escape(text)}" for i, text in enumerate(grid.sources, 1)]
    notes += [f"<sup>{_letters(i)}</sup> not comparable: {escape(text)}" for i, text in enumerate(grid.reasons)]
    lines += ["</tbody>", "<tfoot>", *(f'<tr><td colspan="{span}">{note}</td></tr>' for note in notes), "</tfoot>",
              "</table>"]
    return "\n".join(lines) + "\n"


def render_ledger(rows: Sequence[CheckpointRow], fmt: str = "md") -> str:
    """The ledger table of ``rows`` in ``fmt`` (``md``, ``latex`` or ``html``).

    Raises:
        ConfigError: another format, or no row (:func:`ledger_grid`).
    """
    writers = {"md": markdown_ledger, "latex": latex_ledger, "html": html_ledger}
    if fmt not in writers:
        raise ConfigError(f"--format {fmt!r}: table --ledger writes {', '.join(FORMATS)}")
    return writers[fmt](ledger_grid(rows))
