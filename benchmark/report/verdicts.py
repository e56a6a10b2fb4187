"""Ledger cells judged on result records, and how a judged cell is printed.

Shared by ``vlpbench reproduce``, ``table --ledger``, the leaderboard's ledger section and ``compare
--against-ledger``: which released checkpoint (an entry of ``checkpoints.json``) a measured file is
(:func:`match_entries`), the measurement and verdict of each cell (:func:`judge`, :func:`checkpoint_rows`,
both through :func:`vlpbench.ledger.measured_cell` and :func:`vlpbench.ledger.verdict`), and the texts of
values, verdicts and sources. Values print as tables print them: ×100 where the metric is a share
(``MetricSpec.percent``), with the digits the source printed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from vlpbench.errors import ConfigError
from vlpbench.ledger import CheckpointEntry, LedgerCell, Measured, Verdict, measured_cell, verdict
from vlpbench.metrics.specs import metric_spec

# One mark per verdict, in every table format (LaTeX defines a command per mark: report.ledger_table).
MARKS = {"reproduced": "✓", "below": "↓", "above": "↑", "not comparable": "≁", "not run": "–"}
# A value a source prints with more digits (a notebook's full float) is shown rounded to this many.
MAX_DECIMALS = 3
LEGEND = ("✓ reproduced: the published value, widened by half its last printed digit, overlaps the 95 % CI of "
          "the measured seed mean; ↓ below / ↑ above: that CI lies entirely under / over it; ≁ not comparable: "
          "the source used a setting no profile reproduces (the reason is in the notes); – not run: no record "
          "measures the cell.")


@dataclass(frozen=True)
class Judged:
    """One ledger cell, its measurement in the records (None: none measures it) and its verdict."""

    cell: LedgerCell
    measured: Measured | None
    verdict: Verdict


@dataclass(frozen=True)
class CheckpointRow:
    """The cells of one released checkpoint judged on the records of one file (``sha256``; None where no
    record measures any of them)."""

    entry: CheckpointEntry
    sha256: str | None
    judged: tuple[Judged, ...]


def judge(cell: LedgerCell, records: list[dict], sha256: str | None = None) -> Judged:
    """``cell`` judged on ``records`` (those of the checkpoint with ``sha256`` only, when given).

    Raises:
        DataError: as :func:`vlpbench.ledger.measured_cell`.
    """
    measured = measured_cell(records, cell, checkpoint_sha256=sha256)
    return Judged(cell, measured, verdict(cell, measured))


def match_entries(entries: Sequence[CheckpointEntry], file_name: str | None,
                  sha256: str | None) -> tuple[list[CheckpointEntry], str | None]:
    """The entries of ``entries`` that a checkpoint file is, and what matched: the entries whose published sha256
    is the file's (``"sha256"``), else those whose ``file`` is its name (``"file name"``; ``{name}`` in an entry's
    file stands for any text, as G2D's trainer names its files), else every entry (None)."""
    by_hash = [e for e in entries if sha256 is not None and e.sha256 == sha256]
    if by_hash:
        return by_hash, "sha256"
    by_name = [e for e in entries if file_name and re.fullmatch(
        re.escape(e.file).replace(re.escape("{name}"), ".+"), file_name)]
    if by_name:
        return by_name, "file name"
    return list(entries), None


def model_entries(cells: Iterable[LedgerCell], model: str) -> list[CheckpointEntry]:
    """The checkpoint entries of ``model``'s cells, in ledger order."""
    return list(dict.fromkeys(cell.checkpoint for cell in cells if cell.model == model))


def _checkpoint_files(records: list[dict], model: str) -> dict[str, str | None]:
    """sha256 → file name of the checkpoints in the records of adapter ``model``, by sha256."""
    files: dict[str, str | None] = {}
    for record in records:
        checkpoint = record["model"].get("checkpoint") or {}
        if record["model"].get("adapter") == model and checkpoint.get("sha256"):
            files.setdefault(checkpoint["sha256"], Path(checkpoint["path"]).name if checkpoint.get("path") else None)
    return dict(sorted(files.items()))


def checkpoint_rows(cells: Sequence[LedgerCell], records: list[dict], *, models: Sequence[str] | None = None,
                    kinds: Sequence[str] = ("published",)) -> list[CheckpointRow]:
    """The ledger cells of ``kinds`` judged on ``records``: per adapter, per checkpoint file in its records
    (by sha256), per released checkpoint that file is (:func:`match_entries`), one row, kept where the records
    measure at least one of its cells. ``models`` keeps those adapters and shows every one of them: one row per
    checkpoint entry, every cell not run, where no record measures any.

    Raises:
        ConfigError: ``models`` names an adapter that has no ledger cell.
        DataError: as :func:`vlpbench.ledger.measured_cell` (records of a cell from two task versions, ...).
    """
    chosen = [cell for cell in cells if cell.kind in kinds]
    if models:
        known = list(dict.fromkeys(cell.model for cell in chosen))
        unknown = [m for m in models if m not in known]
        if unknown:
            raise ConfigError(f"--models {', '.join(unknown)}: no ledger cell; the ledger's models are "
                              f"{', '.join(known) or 'none'}")
        chosen = [cell for cell in chosen if cell.model in models]
    rows = []
    for model in dict.fromkeys(cell.model for cell in chosen):
        entries = model_entries(chosen, model)
        found = []
        for sha256, name in _checkpoint_files(records, model).items():
            for entry in match_entries(entries, name, sha256)[0]:
                judged = tuple(judge(cell, records, sha256) for cell in chosen if cell.checkpoint == entry)
                if any(j.measured is not None for j in judged):
                    found.append(CheckpointRow(entry, sha256, judged))
        if not found and models:
            found = [CheckpointRow(entry, None, tuple(Judged(cell, None, verdict(cell, None)) for cell in chosen
                                                      if cell.checkpoint == entry)) for entry in entries]
        rows += sorted(found, key=lambda row: entries.index(row.entry))
    return rows


def display_scale(metric: str) -> float:
    """100 for a metric tables print as a percentage, else 1."""
    return 100.0 if metric_spec(metric).percent else 1.0


def _source_decimals(cell: LedgerCell) -> int:
    return round(-math.log10(2 * cell.half_ulp * display_scale(cell.metric)))


def printed_decimals(cell: LedgerCell) -> int:
    """The digits after the point the source printed the cell's value with, at :func:`display_scale`
    (49.7 % → 1; 0.7233 as a fraction → 2), at most :data:`MAX_DECIMALS`."""
    return min(MAX_DECIMALS, max(0, _source_decimals(cell)))


def rounded(cell: LedgerCell) -> bool:
    """The source printed the cell's value with more than :data:`MAX_DECIMALS` digits (shown rounded)."""
    return _source_decimals(cell) > MAX_DECIMALS


def value_text(value: float, metric: str, decimals: int, *, signed: bool = False) -> str:
    """``value`` (metric units) at :func:`display_scale` with ``decimals`` digits; ``signed`` adds + or −."""
    text = f"{value * display_scale(metric):{'+' if signed else ''}.{decimals}f}"
    return text.replace("-", "−") if signed else text


def verdict_text(judged: Verdict) -> str:
    """``reproduced``, ``below by 1.3 CI widths``, ``above (zero-width CI)``, ``not comparable: <reason>``,
    ``not run``."""
    if judged.kind in ("below", "above"):
        if math.isinf(judged.widths):
            return f"{judged.kind} (zero-width CI)"
        return f"{judged.kind} by {judged.widths:.2g} CI widths"
    if judged.kind == "not comparable":
        return f"not comparable: {judged.reason}"
    return judged.kind


def source_text(cell: LedgerCell) -> str:
    """Where in its source the cell's number is: ``Table 1, row MGCA``."""
    return f"{cell.table}, row {cell.row}"


def same_cell(published: LedgerCell, other: LedgerCell) -> bool:
    """``other`` measures the number ``published`` is: same checkpoint, task, fraction and metric."""
    return (other.checkpoint == published.checkpoint and other.task == published.task
            and other.frac == published.frac and other.metric == published.metric)
