"""Sections of ``perf/RESULTS.md``: each run of ``perf/gpu_figures.py`` or ``perf/linear_probe_sweep.py`` appends
one; nothing is rewritten."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HEADER = ("# Speed figures\n\n"
          "Sections appended by `python perf/gpu_figures.py --out perf/RESULTS.md` and "
          "`python perf/linear_probe_sweep.py --out perf/RESULTS.md`, one per run, oldest first. "
          "*measured*: timed in that run; *extrapolated*: a measured time per batch (or per image) times the "
          "batch counts of the rsna/v1 split; *arithmetic*: counted from the split files.\n")


@dataclass(frozen=True)
class Figure:
    """One figure: what it is, its value and unit, and how it was obtained (measured, extrapolated,
    arithmetic or skipped, with a note saying why or from what)."""

    name: str
    value: float | None
    unit: str
    how: str
    note: str = ""

    def cell(self) -> str:
        """The value as the table shows it: 4 significant digits, thousands separated; ``-`` when skipped."""
        if self.value is None:
            return "-"
        if abs(self.value) >= 1000:
            return f"{self.value:,.0f}"
        return f"{self.value:.4g}"


def section(title: str, facts: list[tuple[str, str]], figures: list[Figure]) -> str:
    """A Markdown section: ``## title``, the facts as a list (date, device, threads, torch), and the figures
    as a table."""
    lines = [f"## {title}", ""] + [f"- {key}: {value}" for key, value in facts] + [""]
    lines += ["| figure | value | unit | how | note |", "|---|---:|---|---|---|"]
    lines += [f"| {f.name} | {f.cell()} | {f.unit} | {f.how} | {f.note} |" for f in figures]
    return "\n".join(lines) + "\n"


def append_section(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` after a blank line, creating the file with :data:`HEADER` first where it
    is missing; what the file holds is never rewritten."""
    path = Path(path)
    with open(path, "a", encoding="utf-8") as handle:
        if handle.tell() == 0:
            handle.write(HEADER)
        handle.write("\n" + text)
