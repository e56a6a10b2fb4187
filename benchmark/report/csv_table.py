"""CSV rendering of a table grid: one line per model × task × fraction × metric, for spreadsheets.

Values are in metric units (not ×100), rounded to 6 decimals. Columns:

    model, reported, citation, task, task_version, split_dataset, split_version, split_sha256,
    frac, metric, higher_is_better, mean, std, n_seeds, seeds, ci_low, ci_high, profile

``std`` is the sample std (ddof=1) over seeds, empty for one seed; ``seeds`` is ``;``-separated;
``ci_low`` / ``ci_high`` are the single seed's 95 % bootstrap bounds, or with several seeds the mean
of the per-seed bounds (the typical interval of one run, not an interval of the mean over seeds),
empty where a seed has none. A reported row (``reported`` true) has its citation, the paper's value
as ``mean`` and the task, fraction and metric it maps to; its run fields are empty. ``profile`` is the
protocol profile of the table the line belongs to (a reported row's: the one it was computed with).
"""

from __future__ import annotations

import csv
import io

from vlpbench.report.layout import Grid

FIELDS = ("model", "reported", "citation", "task", "task_version", "split_dataset", "split_version",
          "split_sha256", "frac", "metric", "higher_is_better", "mean", "std", "n_seeds", "seeds",
          "ci_low", "ci_high", "profile")


def _number(value: float | None) -> str:
    return "" if value is None else repr(round(float(value), 6))


def csv_table(grid: Grid, profile: str = "canonical", *, header: bool = True) -> str:
    """Render ``grid`` (a table of ``profile``) as CSV text, with a header line when ``header`` (see the
    module docstring)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    if header:
        writer.writeheader()
    for row in grid.rows:
        for column in grid.columns:
            cell = row.cells.get(column.key)
            if cell is None:
                continue
            line = {"model": row.label, "task": column.task, "frac": _number(column.frac),
                    "metric": column.metric, "higher_is_better": str(column.higher_is_better).lower(),
                    "mean": _number(cell.mean), "profile": profile}
            if row.citation is not None:
                line.update(reported="true", citation=f"{row.citation.citation}, {cell.source['table']}")
            else:
                source = cell.source
                line.update(reported="false", task_version=source["version"], split_dataset=source["split_dataset"],
                            split_version=source["split_version"], split_sha256=source["split_sha256"],
                            std=_number(source["std"]), n_seeds=source["n_seeds"],
                            seeds=";".join(map(str, source["seeds"])), ci_low=_number(source["ci_low"]),
                            ci_high=_number(source["ci_high"]))
            writer.writerow(line)
    return out.getvalue()
