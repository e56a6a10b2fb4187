"""Reliability diagrams and calibration tables from the ``calibration`` entries of classification records.

A record's entry holds equal-width reliability bins per class (binary / multi-label tasks) or of the
top-label confidence (multi-class; :mod:`vlpbench.protocols.calibration`). :func:`reliability_curves` pools
the seeds of one (model, task column, fraction): per bin, the counts add up and the confidence and observed
frequency are count-weighted means, which is exactly the bin of the pooled predictions. Records without
bins (older ones, other protocols, scores left out as no probabilities) are skipped.
:func:`reliability_figure` draws one task column and fraction: a panel per class (or the top label),
observed frequency against mean confidence per non-empty bin, one line per model, the diagonal of perfect
calibration, and each model's ECE (mean over seeds) in the legend.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from vlpbench.protocols.calibration import CALIBRATION_METRICS, TOP_LABEL
from vlpbench.protocols.labels import class_slug
from vlpbench.report.layout import percent_label, version_label
from vlpbench.report.plots import COLUMN_WIDTH_IN, FORMATS, file_stem, new_figure, plot_style, save_figure
from vlpbench.report.table import build_tables, select_records, split_identity, table_rows
from vlpbench.results import record_profile

PANEL_IN = 1.65  # side of one square panel
PANELS_PER_ROW = 2


@dataclass(frozen=True)
class ReliabilityCurve:
    """One model's pooled reliability bins of one curve (a class or ``top_label``) of one task column and
    fraction; ``confidence`` / ``frequency`` are None in empty bins."""

    task: str
    version: object
    split_sha256: str
    profile: str
    frac: float
    curve: str
    model: str
    confidence: tuple[float | None, ...]
    frequency: tuple[float | None, ...]
    count: tuple[float, ...]
    ece: float | None
    n_seeds: int

    @property
    def figure_key(self) -> tuple:
        return (self.task, self.version, self.split_sha256, self.profile, self.frac)


def _labels(records: list[dict]) -> list[str]:
    """Each record's table row label; ``@<sha256[:8]>`` added where one label covers several checkpoints."""
    plain = [table_rows([r])[0]["model"] for r in records]
    shas = [(r["model"].get("checkpoint") or {}).get("sha256") for r in records]
    checkpoints: dict[str, set] = defaultdict(set)
    for label, sha in zip(plain, shas):
        checkpoints[label].add(sha)
    return [label if len(checkpoints[label]) == 1 else f"{label} @{sha[:8] if sha else 'nockpt'}"
            for label, sha in zip(plain, shas)]


def _curve_ece(record: dict, curve: str, n_curves: int) -> float | None:
    """The record's equal-width ECE of ``curve``: the top-label or single class's ``ece``, else ``ece_<slug>``."""
    name = "ece" if curve == TOP_LABEL or n_curves == 1 else f"ece_{class_slug(curve)}"
    return record["metrics"].get(name)


def _pooled(entries: list[dict]) -> tuple[list[float | None], list[float | None], list[float]]:
    count = np.sum([e["count"] for e in entries], axis=0)
    sums = {key: np.sum([[0.0 if v is None else v * n for v, n in zip(e[key], e["count"])] for e in entries], axis=0)
            for key in ("confidence", "frequency")}
    mean = {key: [float(s / n) if n > 0 else None for s, n in zip(sums[key], count)] for key in sums}
    return mean["confidence"], mean["frequency"], count.tolist()


def reliability_curves(records: list[dict], tasks: Sequence[str] | None = None) -> list[ReliabilityCurve]:
    """One curve per (task column, fraction, class or top label, model row), seeds pooled; records without
    reliability bins are skipped.

    Raises:
        ConfigError: ``tasks`` names a task no record has.
    """
    chosen = select_records(records, tasks=tasks) if tasks else records
    binned = [r for r in chosen if "curves" in (r.get("calibration") or {})]
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for label, record in zip(_labels(binned), binned):
        task = record["task"]
        key = (task["name"], task["version"], split_identity(record["split"]), record_profile(record),
               round(float(record["frac"]), 6), label)
        grouped[key].append(record)
    curves = []
    for (task, version, sha, profile, frac, label), group in grouped.items():
        names = list(group[0]["calibration"]["curves"])
        for name in names:
            entries = [r["calibration"]["curves"][name] for r in group if name in r["calibration"]["curves"]]
            confidence, frequency, count = _pooled(entries)
            eces = [_curve_ece(r, name, len(names)) for r in group]
            ece = float(np.mean(eces)) if all(e is not None and math.isfinite(e) for e in eces) else None
            curves.append(ReliabilityCurve(task, version, sha, profile, frac, name, label, tuple(confidence),
                                           tuple(frequency), tuple(count), ece, len(group)))
    curves.sort(key=lambda c: (c.task, str(c.version), c.split_sha256, c.profile, c.frac, c.model))
    return curves


def reliability_figure(curves: Sequence[ReliabilityCurve]):
    """The reliability diagram of one task column and fraction (module docstring). A matplotlib Figure:
    each panel's legend gives each model's ECE in its colour, the legend under the panels names the models.

    Raises:
        ValueError: ``curves`` is empty or spans several task columns or fractions.
    """
    from matplotlib.lines import Line2D

    if not curves or len({c.figure_key for c in curves}) != 1:
        raise ValueError("reliability_figure: expected the curves of exactly one task column and fraction")
    names = list(dict.fromkeys(c.curve for c in curves))
    models = list(dict.fromkeys(c.model for c in curves))
    columns = min(PANELS_PER_ROW, len(names))
    rows = math.ceil(len(names) / columns)
    first = curves[0]
    with plot_style():
        figure = new_figure(COLUMN_WIDTH_IN, PANEL_IN * rows + 0.45 + 0.16 * len(models))
        grid = figure.subplots(rows, columns, squeeze=False)
        for index, name in enumerate(names):
            axes = grid[index // columns][index % columns]
            axes.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=0.6)
            for curve in (c for c in curves if c.curve == name):
                filled = [(x, y) for x, y in zip(curve.confidence, curve.frequency) if x is not None]
                axes.plot(*zip(*filled), marker="o", color=f"C{models.index(curve.model) % 10}",
                          label="ECE –" if curve.ece is None else f"ECE {curve.ece:.3f}")
            axes.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
            axes.set_title("top label" if name == TOP_LABEL else name)
            axes.grid(True, linewidth=0.3, alpha=0.5)
            axes.legend(frameon=False, loc="upper left", fontsize=5, handlelength=1)
            if index % columns == 0:
                axes.set_ylabel("observed frequency")
            if index // columns == rows - 1:
                axes.set_xlabel("mean confidence")
        for index in range(len(names), rows * columns):
            grid[index // columns][index % columns].set_visible(False)
        handles = [Line2D([], [], marker="o", color=f"C{i % 10}") for i in range(len(models))]
        figure.legend(handles, [textwrap.shorten(m, 70, placeholder=" …") for m in models],
                      loc="outside lower center", frameon=False, fontsize=5)
        profile = "" if first.profile == "canonical" else f" [{first.profile} profile]"
        figure.suptitle(f"{first.task} {version_label(first.version)} ({first.split_sha256[:8]}){profile}, "
                        f"{percent_label(first.frac)} training data\nreliability, 15 equal-width bins", fontsize=7)
    return figure


def plot_reliability(records: list[dict], out: str | Path, *, tasks: Sequence[str] | None = None,
                     formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write a reliability diagram per task column and fraction whose records hold reliability bins, as
    ``<out>/<task>.v<version>-<sha256[:8]>[.<profile>].frac<f>.reliability.<format>``; the files written."""
    by_figure: dict[tuple, list[ReliabilityCurve]] = defaultdict(list)
    for curve in reliability_curves(records, tasks):
        by_figure[curve.figure_key].append(curve)
    paths = []
    for (task, version, sha, profile, frac), curves in by_figure.items():
        stem = f"{task}.{version_label(version)}-{sha[:8]}" + ("" if profile == "canonical" else f".{profile}")
        stem = file_stem(f"{stem}.frac{frac:g}.reliability")
        paths += save_figure(reliability_figure(curves), Path(out) / stem, formats)
    return paths


def calibration_tables(records: list[dict]):
    """``build_tables`` of the calibration metrics (×100, lower is better) of the records that hold them;
    [] where none does."""
    holding = [r for r in records if any(m in r["metrics"] for m in CALIBRATION_METRICS)]
    return build_tables(holding, metrics=list(CALIBRATION_METRICS)) if holding else []
