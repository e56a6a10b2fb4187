"""The paper-vs-measured table ``vlpbench reproduce`` prints (Markdown).

One line per published cell: task, fraction, metric, the paper's value as printed and its source, the
measured seed mean ± sample std (n seeds), the 95 % CI of that mean (:func:`vlpbench.ledger.measured_cell`),
the difference and the verdict; under it a line per third-party measurement of the same number (a thread's
value of the same checkpoint, task, fraction and metric), judged against the same records. Third-party cells
with no published cell of their own follow. Values print as tables print them (×100 where the metric is a
share). Sources, not-comparable reasons and errors are footnotes.
"""

from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

from vlpbench.ledger import LedgerCell
from vlpbench.report.layout import metric_name, percent_label
from vlpbench.report.reference import DEFAULT_REFERENCE_PROFILE
from vlpbench.report.table import md_escape
from vlpbench.report.verdicts import (LEGEND, Judged, display_scale, printed_decimals, rounded, same_cell,
                                      source_text, value_text, verdict_text)

CI_DEFINITION = ("95 % CI of the seed mean: the test-set sampling half-width (each seed's bootstrap CI, averaged "
                 "over seeds, low and high sides apart; every seed tests on the same images) and the training "
                 "randomness half-width (1.96 × std / √n), combined as the root of the sum of their squares; one "
                 "seed: its bootstrap CI.")
_WIDTH = 116  # the legend's lines, for a terminal
_HEAD = ("Task", "Fraction", "Metric", "Paper", "Source", "Measured", "95% CI", "Δ", "Verdict")


def _line(judged: Judged, sources: list[str], reasons: list[str], why_not_run: Mapping[tuple, str],
          errors: Mapping[LedgerCell, str], *, third_party: bool) -> list[str]:
    cell, measured = judged.cell, judged.measured
    decimals = printed_decimals(cell)
    if cell.citation not in sources:
        sources.append(cell.citation)
    verdict = verdict_text(judged.verdict)
    if judged.verdict.kind == "not comparable":
        if judged.verdict.reason not in reasons:
            reasons.append(judged.verdict.reason)
        verdict = f"not comparable ({_reason_mark(reasons.index(judged.verdict.reason))})"
    elif judged.verdict.kind == "not run":
        why = "error below" if cell in errors else why_not_run.get((cell.task, cell.frac, cell.profile))
        verdict += f" ({why})" if why else ""
    shown = decimals + 1  # a measurement shows one digit more than the paper printed
    if measured is None:
        numbers = ["–", "–", "–"]
    else:
        spread = "" if measured.std is None else f" ± {value_text(measured.std, cell.metric, shown)}"
        low, high = (value_text(bound, cell.metric, shown) for bound in (measured.ci_low, measured.ci_high))
        numbers = [f"{value_text(measured.mean, cell.metric, shown)}{spread} (n={measured.n_seeds})", f"{low}–{high}",
                   value_text(measured.mean - cell.value, cell.metric, shown, signed=True)]
    if third_party:
        where = ["↳ third-party", "", ""]
    else:
        where = [cell.task, percent_label(cell.frac), metric_name(cell.metric)]
    profile = "" if cell.profile == DEFAULT_REFERENCE_PROFILE else f" ({cell.profile} profile)"
    return [*where, value_text(cell.value, cell.metric, decimals),
            f"[{sources.index(cell.citation) + 1}] {source_text(cell)}{profile}", *numbers, verdict]


def _reason_mark(index: int) -> str:
    return f"r{index + 1}"


def reproduction_table(judged: Sequence[Judged], *, why_not_run: Mapping[tuple, str] | None = None,
                       errors: Mapping[LedgerCell, str] | None = None) -> str:
    """The Markdown table of ``judged`` cells (module docstring), its legend and footnotes.

    ``why_not_run``: (task, fraction, profile) → why no record measures it ("no data", "adapter cannot", "run
    failed"), added to the verdict ``not run``; ``errors``: cell → why its records cannot be measured (listed under
    the table).
    """
    why_not_run, errors = why_not_run or {}, errors or {}
    # A number two tables print for one checkpoint (one of them under a setting no profile reproduces) is
    # listed together, in the order the ledger first gives it.
    first: dict[tuple, int] = {}
    for i, j in enumerate(judged):
        first.setdefault((j.cell.checkpoint, j.cell.task, j.cell.frac, j.cell.metric), i)
    published = sorted((j for j in judged if j.cell.kind == "published"),
                       key=lambda j: first[j.cell.checkpoint, j.cell.task, j.cell.frac, j.cell.metric])
    others = [j for j in judged if j.cell.kind != "published"]
    sources: list[str] = []
    reasons: list[str] = []
    table = [list(_HEAD)]
    attached: set[int] = set()
    for j in published:
        table.append(_line(j, sources, reasons, why_not_run, errors, third_party=False))
        for i, other in enumerate(others):
            if same_cell(j.cell, other.cell):
                table.append(_line(other, sources, reasons, why_not_run, errors, third_party=True))
                attached.add(i)
    for i, other in enumerate(others):
        if i not in attached:
            line = _line(other, sources, reasons, why_not_run, errors, third_party=False)
            line[4] = "third-party " + line[4]
            table.append(line)
    table = [[md_escape(text) for text in line] for line in table]
    # three characters at least: a delimiter cell needs a hyphen beside its colon
    widths = [max(3, *(len(line[i]) for line in table)) for i in range(len(_HEAD))]
    right = {3, 5, 6, 7}

    def format_line(line: list[str]) -> str:
        return "| " + " | ".join(t.rjust(w) if i in right else t.ljust(w)
                                 for i, (t, w) in enumerate(zip(line, widths))) + " |"

    rule = ["-" * (w - 1) + ":" if i in right else ":" + "-" * (w - 1) for i, w in enumerate(widths)]
    lines = [format_line(table[0]), "| " + " | ".join(rule) + " |", *(format_line(line) for line in table[1:]), ""]
    percent = any(display_scale(j.cell.metric) == 100.0 for j in judged)
    scaled = " (×100 where the metric is a share)" if percent else ""
    legend = (f"Paper: the value as its source prints it{scaled}; Measured: mean ± sample std over n seeds of the "
              f"records of this checkpoint file; Δ: measured − paper. {CI_DEFINITION} {LEGEND}")
    lines.append(textwrap.fill(md_escape(legend), width=_WIDTH))
    if any(rounded(j.cell) for j in judged):
        lines.append("Values a source prints with more digits are shown rounded.")
    urls = {j.cell.citation: j.cell.url for j in reversed(judged) if j.cell.url}
    lines += ["", *(f"[{i}] {md_escape(text + (f' ({urls[text]})' if text in urls else ''))}"
                    for i, text in enumerate(sources, 1))]
    lines += [f"({_reason_mark(i)}) not comparable: {md_escape(text)}" for i, text in enumerate(reasons)]
    lines += [f"error: {cell.task} {percent_label(cell.frac)} {cell.metric} ({source_text(cell)}): {md_escape(text)}"
              for cell, text in errors.items()]
    return "\n".join(lines) + "\n"
