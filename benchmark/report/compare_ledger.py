"""``vlpbench compare --against-ledger``: does a cell that reproduced the paper on the baseline still do so?

For every ledger cell (:mod:`vlpbench.ledger`, published and third-party) that either side's records measure,
its verdict on the baseline's records and on the candidate's (:func:`vlpbench.report.verdicts.checkpoint_rows`:
per checkpoint file, by sha256). A cell reproduced on the baseline and measured but no longer reproduced on
the candidate (below or above) is a **regression**; a cell reproduced on the candidate (on both sides, or newly)
**passes**; every other cell is **reported** (not reproduced on either side, not run on one side, measured from
several checkpoint files on one side) and judges nothing. Each cell is its own JUnit testcase,
``ledger: <model> <task> <fraction> <metric>`` (with the source where two cells would share the name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence
from xml.etree import ElementTree

from vlpbench.ledger import LedgerCell
from vlpbench.report.layout import percent_label
from vlpbench.report.reference import KINDS
from vlpbench.report.verdicts import Judged, checkpoint_rows, printed_decimals, value_text, verdict_text

REGRESSION = "regression"
PASS = "pass"
REPORTED = "reported"


@dataclass(frozen=True)
class LedgerChange:
    """One ledger cell on both sides: the verdict on each (None: no record, or records of several checkpoint
    files, which ``note`` says), the status (:data:`REGRESSION`, :data:`PASS` or :data:`REPORTED`), what happened
    in words, and its JUnit testcase name."""

    cell: LedgerCell
    baseline: Judged | None
    candidate: Judged | None
    status: str
    note: str
    name: str


def _by_cell(cells: Sequence[LedgerCell], records: list[dict]) -> dict[LedgerCell, list[Judged]]:
    found: dict[LedgerCell, list[Judged]] = {}
    for row in checkpoint_rows(cells, records, kinds=KINDS):
        for judged in row.judged:
            if judged.measured is not None:
                found.setdefault(judged.cell, []).append(judged)
    return found


def _side_text(judged: Judged | None, several: int) -> str:
    if several > 1:
        return f"records of {several} checkpoint files"
    if judged is None:
        return "not run"
    return verdict_text(judged.verdict) if judged.verdict.kind != "not comparable" else "not comparable"


def ledger_changes(cells: Sequence[LedgerCell], baseline: list[dict], candidate: list[dict], *,
                   tasks: Sequence[str] | None = None, fracs: Sequence[float] | None = None,
                   profile: str | None = None) -> list[LedgerChange]:
    """The ledger cells either side measures, in ledger order, each with its status (module docstring);
    ``tasks`` / ``fracs`` / ``profile`` keep those cells only, as ``compare`` filters its own.

    Raises:
        DataError: as :func:`vlpbench.ledger.measured_cell` (a side's records of a cell from two task versions).
    """
    wanted = {round(f, 6) for f in fracs} if fracs else None
    chosen = [c for c in cells if (not tasks or c.task in tasks) and (wanted is None or round(c.frac, 6) in wanted)
              and (profile is None or c.profile == profile)]
    base, cand = _by_cell(chosen, baseline), _by_cell(chosen, candidate)
    names = [f"ledger: {c.model} {c.task} {percent_label(c.frac)} {c.metric}" for c in chosen]
    changes = []
    for cell, name in zip(chosen, names):
        if cell not in base and cell not in cand:
            continue
        if names.count(name) > 1:
            name += f" [{cell.citation}, {cell.table}, row {cell.row}]"
        b_all, c_all = base.get(cell, []), cand.get(cell, [])
        b = b_all[0] if len(b_all) == 1 else None
        c = c_all[0] if len(c_all) == 1 else None
        b_kind = b.verdict.kind if b else None
        c_kind = c.verdict.kind if c else None
        if b_kind == "reproduced" and c_kind in ("below", "above"):
            status = REGRESSION
        elif c_kind == "reproduced":
            status = PASS
        else:
            status = REPORTED
        note = f"baseline {_side_text(b, len(b_all))}; candidate {_side_text(c, len(c_all))}"
        changes.append(LedgerChange(cell, b, c, status, note, name))
    return changes


def _measured(judged: Judged | None) -> str:
    if judged is None or judged.measured is None:
        return "–"
    cell = judged.cell
    return value_text(judged.measured.mean, cell.metric, printed_decimals(cell) + 1)


def summary_lines(changes: Sequence[LedgerChange]) -> list[str]:
    """The Markdown section of the ``compare`` summary: one table line per cell, then the counts."""
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["", "### Reproduction ledger", ""]
    if not changes:
        return lines + ["No ledger cell is measured by either side's records."]
    lines += ["| Cell | Published | Source | Baseline | Candidate | Status |", "| :-- | --: | :-- | --: | --: | :-- |"]
    for change in changes:
        cell = change.cell
        status = f"**{change.status}**" if change.status == REGRESSION else change.status
        published = value_text(cell.value, cell.metric, printed_decimals(cell))
        lines.append(f"| {escape(change.name.removeprefix('ledger: '))} | {published} | "
                     f"{escape(f'{cell.table}, row {cell.row}')} | {_measured(change.baseline)} | "
                     f"{_measured(change.candidate)} | {status}: {escape(change.note)} |")
    counts = {status: sum(c.status == status for c in changes) for status in (REGRESSION, PASS, REPORTED)}
    lines += ["", ", ".join(f"{n} {status}" for status, n in counts.items()) + " (ledger cells)"]
    return lines


def add_junit_cases(suite: ElementTree.Element, changes: Sequence[LedgerChange]) -> None:
    """One testcase per cell in ``suite`` (class ``vlpbench.compare.ledger``): a regression is a ``failure``,
    a pass has its verdicts in ``system-out``, a reported cell is ``skipped`` with the reason."""
    for change in changes:
        case = ElementTree.SubElement(suite, "testcase", classname="vlpbench.compare.ledger", name=change.name,
                                      time="0")
        detail = f"{change.cell.citation}, {change.cell.table}, row {change.cell.row}: {change.note}"
        if change.status == REGRESSION:
            ElementTree.SubElement(case, "failure", message=f"no longer reproduces the published value: {change.note}",
                                   type=REGRESSION).text = detail
        elif change.status == PASS:
            ElementTree.SubElement(case, "system-out").text = detail
        else:
            ElementTree.SubElement(case, "skipped", message=change.note)
