"""Leaderboard tables built from result records only.

:func:`table_rows` does the aggregation (one row per model label × task column, mean and sample std
over seeds) and the writers only format it, so a LaTeX or CSV writer can share the same numbers.
Records of one task with a different task version or split hash never share a cell.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import numpy as np

from vlpbench.errors import DataError

_METRIC_NAMES = {"dice": "Dice", "auc": "AUC", "auroc": "AUROC", "map": "mAP", "f1": "F1",
                 "acc": "ACC", "accuracy": "Accuracy", "mcc": "MCC", "iou": "IoU", "miou": "mIoU"}
_MISSING = "–"


def _version(value: Any) -> str:
    text = str(value)
    return text if text.startswith("v") else f"v{text}"


def _percent(frac: float) -> str:
    # 6 significant digits hide float noise such as 0.07 * 100 = 7.000000000000001.
    return f"{frac * 100:g}%"


def _override_text(value: Any) -> str:
    return str(value) if isinstance(value, (str, int, float)) else json.dumps(value, sort_keys=True)


def _base_label(record: dict) -> str:
    """Model name, then the user's config overrides, then a mark for synthetic data."""
    label = record["model"]["name"]
    overrides = record["config"].get("overrides") or {}
    if overrides:
        label += " (" + ", ".join(f"{k}={_override_text(v)}" for k, v in sorted(overrides.items())) + ")"
    if (record.get("data") or {}).get("synthetic"):
        label += " [synthetic]"
    return label


def _checkpoint_tag(record: dict) -> str:
    sha = (record["model"].get("checkpoint") or {}).get("sha256")
    return sha[:8] if sha else "nockpt"


def _sort_version(value: Any) -> tuple[int, Any]:
    # Integer versions sort numerically (v2 before v10); string versions after them.
    return (0, value) if isinstance(value, int) else (1, str(value))


def table_rows(records: list[dict]) -> list[dict]:
    """Aggregate records into one entry per (model row, task column).

    The model row label is the model name with its config overrides and a ``[synthetic]`` mark
    (see :func:`markdown_table`); when one label covers several checkpoints, each gets an
    ``@<sha256[:8]>`` tag so different checkpoints are never averaged. A task column is
    (task, task version, split sha256, fraction, primary metric).

    Returns:
        Dicts with ``model``, ``task``, ``version``, ``split_dataset``, ``split_version``,
        ``split_sha256``, ``frac``, ``metric``, ``higher_is_better``, ``mean``, ``std`` (sample std,
        ddof=1; None for a single seed), ``n_seeds`` and ``seeds``, sorted by model then column.
        A null metric value counts as NaN, so it shows up instead of silently dropping a seed.

    Raises:
        DataError: two records fill the same cell with the same seed, or records of one column
            disagree on ``higher_is_better``.
    """
    base = [_base_label(r) for r in records]
    checkpoints: dict[str, set[str]] = defaultdict(set)
    for label, record in zip(base, records):
        checkpoints[label].add(_checkpoint_tag(record))

    cells: dict[tuple, dict[str, Any]] = {}
    directions: dict[tuple, bool] = {}
    for label, record in zip(base, records):
        if len(checkpoints[label]) > 1:
            name = record["model"]["name"]
            label = name + f" @{_checkpoint_tag(record)}" + label[len(name):]
        task, split, metric = record["task"], record["split"], record["primary_metric"]
        column = (task["name"], task["version"], split["sha256"], float(record["frac"]), metric)
        higher_is_better = bool(task.get("higher_is_better", True))
        if directions.setdefault(column, higher_is_better) != higher_is_better:
            raise DataError(f"records of {task['name']} {_version(task['version'])} disagree on "
                            f"higher_is_better for {metric}")
        cell = cells.setdefault((label, *column), {
            "model": label, "task": task["name"], "version": task["version"],
            "split_dataset": split["dataset"], "split_version": split["version"],
            "split_sha256": split["sha256"], "frac": float(record["frac"]), "metric": metric,
            "higher_is_better": higher_is_better, "values": {}})
        if record["seed"] in cell["values"]:
            raise DataError(f"two records for {label}, {task['name']} {_version(task['version'])}, "
                            f"frac {record['frac']}, seed {record['seed']}; remove one")
        value = record["metrics"][metric]
        cell["values"][record["seed"]] = math.nan if value is None else float(value)

    rows = []
    for cell in cells.values():
        seeds = sorted(cell.pop("values").items())
        values = np.array([v for _, v in seeds], dtype=np.float64)
        cell.update(mean=float(values.mean()),
                    std=float(values.std(ddof=1)) if len(values) > 1 else None,
                    n_seeds=len(values), seeds=[s for s, _ in seeds])
        rows.append(cell)
    rows.sort(key=lambda r: (r["model"], *_column_sort_key(r)))
    return rows


def _column_key(row: dict) -> tuple:
    return (row["task"], row["version"], row["split_sha256"], row["frac"], row["metric"])


def _column_sort_key(row: dict) -> tuple:
    return (row["task"], _sort_version(row["version"]), row["split_sha256"], row["frac"], row["metric"])


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(records: list[dict], *, percent: bool = True, decimals: int = 1) -> str:
    """A paper-style Markdown leaderboard of the primary metric.

    Rows are models: ``record["model"]["name"]``, followed by the run's config overrides
    (``g2d (epochs=2, image_size=64)``) and `` [synthetic]`` for runs on synthetic data. Columns are
    task × fraction (``siim_seg 1%``), with the metric and its direction (``Dice ↑``) in the first
    row. A cell is the mean ± sample std (ddof=1) over seeds, ×100 when ``percent``; a single seed
    shows the mean alone; ``(n=K)`` follows every cell when the seed count differs between cells; "–"
    marks a missing cell. The best value of a column (at the printed precision, following the
    task's ``higher_is_better``) is bold when the column has two or more entries. A task whose
    records span several task versions or split files at one fraction gets one column per version
    and split, labelled ``v<version> (<sha256[:8]>)``. Lines under the table give each column's task
    version, split and split sha256[:12].

    Raises:
        DataError: there are no records, or :func:`table_rows` rejects them.
    """
    rows = table_rows(records)
    if not rows:
        raise DataError("no result records to tabulate")
    scale = 100.0 if percent else 1.0

    columns = sorted({_column_key(r): r for r in rows}.values(), key=_column_sort_key)
    variants: dict[tuple, set[tuple]] = defaultdict(set)
    for c in columns:
        variants[c["task"], c["frac"]].add((c["version"], c["split_sha256"]))
    split_tasks = {task for (task, _), v in variants.items() if len(v) > 1}

    def task_label(c: dict) -> str:
        if c["task"] in split_tasks:
            return f"{c['task']} {_version(c['version'])} ({c['split_sha256'][:8]})"
        return c["task"]

    by_cell = {(r["model"], _column_key(r)): r for r in rows}
    models = sorted({r["model"] for r in rows})
    show_n = len({r["n_seeds"] for r in rows}) > 1

    best: dict[tuple, float] = {}
    for c in columns:
        key = _column_key(c)
        shown = [round(r["mean"] * scale, decimals) for r in rows
                 if _column_key(r) == key and math.isfinite(r["mean"])]
        if len(shown) > 1:
            best[key] = max(shown) if c["higher_is_better"] else min(shown)

    def cell_text(row: dict | None, key: tuple) -> str:
        if row is None:
            return _MISSING
        text = f"{row['mean'] * scale:.{decimals}f}"
        if row["std"] is not None:
            text += f" ± {row['std'] * scale:.{decimals}f}"
        if key in best and round(row["mean"] * scale, decimals) == best[key]:
            text = f"**{text}**"
        return text + (f" (n={row['n_seeds']})" if show_n else "")

    def metric_label(c: dict) -> str:
        return f"{_METRIC_NAMES.get(c['metric'], c['metric'])} {'↑' if c['higher_is_better'] else '↓'}"

    table = [["Model", *(f"{task_label(c)} {_percent(c['frac'])}" for c in columns)],
             ["", *(metric_label(c) for c in columns)]]
    for model in models:
        table.append([model, *(cell_text(by_cell.get((model, _column_key(c))), _column_key(c))
                               for c in columns)])
    table = [[_escape(text) for text in line] for line in table]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]

    def format_line(line: list[str]) -> str:
        padded = [line[0].ljust(widths[0])] + [t.rjust(w) for t, w in zip(line[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    # Model names left-aligned, numbers right-aligned.
    alignment = [":" + "-" * (widths[0] - 1)] + ["-" * (w - 1) + ":" for w in widths[1:]]
    lines = [format_line(table[0]), "| " + " | ".join(alignment) + " |",
             *(format_line(line) for line in table[1:])]

    seed_counts = sorted({r["n_seeds"] for r in rows})
    unit = " (×100)" if percent else ""
    if seed_counts == [1]:
        lines += ["", f"Cells: primary metric{unit} of a single seed."]
    else:
        over = f"{seed_counts[0]} seeds" if len(seed_counts) == 1 else "n seeds"
        lines += ["", f"Cells: mean ± sample std (ddof=1) of the primary metric{unit} over {over}."]

    footnotes: dict[tuple, list[dict]] = defaultdict(list)
    for c in columns:
        key = (task_label(c), c["version"], c["split_dataset"], c["split_version"], c["split_sha256"])
        footnotes[key].append(c)
    lines.append("")
    for (label, version, dataset, split_version, sha), cols in footnotes.items():
        fracs = ", ".join(_percent(f) for f in sorted({c["frac"] for c in cols}))
        lines.append(f"- {_escape(label)} {fracs}: task {_version(version)}; split {dataset} "
                     f"{_version(split_version)}, sha256 {sha[:12]}")
    return "\n".join(lines) + "\n"
