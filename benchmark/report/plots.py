"""Figures from result records and saved predictions: metric versus data fraction, and qualitative panels.

:func:`fraction_curves` turns records into one :class:`Curve` per (task column, model) with the same
aggregation as the tables (:func:`vlpbench.report.table.table_rows`: mean over seeds, and the CI band
as the mean over seeds of each run's bootstrap bounds). :func:`fraction_figure` draws one task's curves
at paper column width (3.3 in, 8-pt fonts) on a log x-axis; :func:`panel_figure` draws image, ground
truth and prediction (or heat map) for a few test images. Figures are built without pyplot on the Agg
canvas, and SVG output is byte-identical across runs (fixed hash salt, no date).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlpbench.errors import ConfigError
from vlpbench.metrics.specs import metric_spec
from vlpbench.report.layout import metric_name, percent_label, version_label
from vlpbench.report.table import select_records, table_rows

FORMATS = ("png", "svg")
COLUMN_WIDTH_IN = 3.3
CURVE_HEIGHT_IN = 2.4
PANEL_ROW_HEIGHT_IN = 1.15
PANEL_HEADER_IN = 0.25
DPI = 300
FONT_PT = 8
# Panels show images at most this many pixels on a side: enough at column width, small files.
PANEL_PIXELS = 256

_STYLE = {
    "font.size": FONT_PT, "axes.titlesize": FONT_PT, "axes.labelsize": FONT_PT, "xtick.labelsize": FONT_PT - 1,
    "ytick.labelsize": FONT_PT - 1, "legend.fontsize": FONT_PT - 1, "axes.linewidth": 0.6,
    "lines.linewidth": 1.2, "lines.markersize": 3.5, "svg.hashsalt": "vlpbench", "svg.fonttype": "path",
    "figure.dpi": DPI, "savefig.dpi": DPI,
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Curve:
    """One model's metric at each fraction of one task column; values in metric units (not ×100).

    ``ci_low`` / ``ci_high`` hold None where a fraction's records carry no bootstrap CI.
    """

    task: str
    version: Any
    split_sha256: str
    task_label: str
    metric: str
    model: str
    fracs: tuple[float, ...]
    means: tuple[float, ...]
    ci_low: tuple[float | None, ...]
    ci_high: tuple[float | None, ...]
    n_seeds: tuple[int, ...]
    profile: str = "canonical"

    @property
    def higher_is_better(self) -> bool:
        """The metric's direction, from its spec."""
        return metric_spec(self.metric).higher_is_better

    @property
    def column(self) -> tuple:
        return (self.task, self.version, self.split_sha256, self.metric, self.profile)


def fraction_curves(records: list[dict], tasks: Sequence[str] | None = None) -> list[Curve]:
    """One curve per (task, task version, split, primary metric) and model row, fractions ascending.

    Model rows are labelled as in the tables (name, overrides, ``[synthetic]``, checkpoint tag where
    one name covers several checkpoints). A task whose records span several versions or splits gets
    one curve set per version and split, labelled ``<task> v<version> (<sha256[:8]>)``.

    Raises:
        ConfigError: ``tasks`` names a task no record has.
        DataError: no record passes the filter, or :func:`table_rows` rejects the records.
    """
    rows = table_rows(select_records(records, tasks=tasks))
    variants: dict[str, set[tuple]] = defaultdict(set)
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        variants[row["task"]].add((row["version"], row["split_sha256"]))
        grouped[row["task"], row["version"], row["split_sha256"], row["metric"], row["model"],
                row["profile"]].append(row)
    curves = []
    for (task, version, sha, metric, model, profile), points in grouped.items():
        points.sort(key=lambda r: r["frac"])
        label = task if len(variants[task]) == 1 else f"{task} {version_label(version)} ({sha[:8]})"
        # Records of two profiles never share a plot, as they never share a table cell.
        label += "" if profile == "canonical" else f" [{profile} profile]"
        curves.append(Curve(task, version, sha, label, metric, model,
                            tuple(r["frac"] for r in points), tuple(r["mean"] for r in points),
                            tuple(r["ci_low"] for r in points), tuple(r["ci_high"] for r in points),
                            tuple(r["n_seeds"] for r in points), profile))
    order = {task: i for i, task in enumerate(tasks or ())}
    curves.sort(key=lambda c: (order.get(c.task, len(order)), c.task, str(c.version), c.split_sha256, c.model))
    return curves


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_style():
    import matplotlib

    return matplotlib.rc_context(_STYLE)


def fraction_figure(curves: Sequence[Curve]):
    """Metric (×100) against training fraction (log x, 1 / 10 / 100 %) for the curves of one task column:
    one line with markers per model and a shaded band between the CI bounds. A matplotlib Figure.

    Raises:
        ConfigError: ``curves`` is empty or spans several task columns.
    """
    if not curves or len({c.column for c in curves}) != 1:
        raise ConfigError("fraction_figure: expected the curves of exactly one task column")
    first = curves[0]
    with plot_style():
        figure = new_figure(COLUMN_WIDTH_IN, CURVE_HEIGHT_IN)
        axes = figure.add_subplot()
        for index, curve in enumerate(curves):
            color = f"C{index % 10}"
            x = np.array(curve.fracs) * 100
            axes.plot(x, np.array(curve.means) * 100, marker="o", color=color, label=curve.model)
            low = np.array([np.nan if v is None else v for v in curve.ci_low], dtype=float) * 100
            high = np.array([np.nan if v is None else v for v in curve.ci_high], dtype=float) * 100
            if np.isfinite(low).any():
                axes.fill_between(x, low, high, color=color, alpha=0.18, linewidth=0)
        fracs = sorted({f for c in curves for f in c.fracs})
        axes.set_xscale("log")
        axes.set_xticks([f * 100 for f in fracs], [percent_label(f) for f in fracs])
        axes.minorticks_off()
        if len(fracs) == 1:  # one point: give the log axis some room around it
            axes.set_xlim(fracs[0] * 100 / 2, fracs[0] * 100 * 2)
        axes.set_xlabel("training data")
        arrow = "↑" if first.higher_is_better else "↓"
        axes.set_ylabel(f"{metric_name(first.metric)} (×100) {arrow}")
        axes.set_title(first.task_label)
        axes.grid(True, linewidth=0.3, alpha=0.5)
        axes.legend(frameon=False)
    return figure


def save_figure(figure, stem: Path, formats: Sequence[str] = FORMATS, *, dpi: int = DPI) -> list[Path]:
    """Write ``figure`` as ``<stem>.<format>`` for each format; SVG without a date, so reruns are identical.

    Raises:
        ConfigError: an unknown format.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--format {','.join(unknown)}: expected png and/or svg")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with plot_style():
        # SVG first: constrained layout is re-run on every save and shifts by sub-pixels after a raster
        # save, so drawing SVG first keeps it identical whether or not a PNG is also written.
        for fmt in sorted(dict.fromkeys(formats), key=lambda f: f != "svg"):
            path = stem.with_name(f"{stem.name}.{fmt}")
            metadata = {"Date": None} if fmt == "svg" else {"Software": None}
            figure.savefig(path, format=fmt, dpi=dpi, metadata=metadata)
            paths.append(path)
    return paths


def figure_stem(curve: Curve, variants: int = 1) -> str:
    """File name (without extension) of a task column's plot: the task, plus version and split when the
    task has several."""
    name = curve.task if variants == 1 else f"{curve.task}.{version_label(curve.version)}-{curve.split_sha256[:8]}"
    if curve.profile != "canonical":
        name += f".{curve.profile}"
    return file_stem(name)


def file_stem(name: str) -> str:
    """``name`` with every run of characters other than letters, digits, ``.``, ``_`` and ``-`` made one ``_``."""
    return _UNSAFE.sub("_", name)


def curves_by_column(curves: Sequence[Curve]) -> list[tuple[str, list[Curve]]]:
    """The curves grouped per task column, in order, each with its file stem."""
    columns: dict[tuple, list[Curve]] = {}
    for curve in curves:
        columns.setdefault(curve.column, []).append(curve)
    variants: dict[str, int] = defaultdict(int)
    for task, *_ in columns:
        variants[task] += 1
    return [(figure_stem(group[0], variants[group[0].task]), group) for group in columns.values()]


def plot_fraction_curves(records: list[dict], out: str | Path, *, tasks: Sequence[str] | None = None,
                         formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write one metric-versus-fraction plot per task column into ``out``; the files written.

    Raises:
        ConfigError: an unknown format or task.
        DataError: no record passes the filter.
    """
    out = Path(out)
    paths = []
    for stem, group in curves_by_column(fraction_curves(records, tasks)):
        paths += save_figure(fraction_figure(group), out / stem, formats)
    return paths


@dataclass(frozen=True)
class Panel:
    """One row of a qualitative figure: display-size image (uint8), truth (bool) and prediction.

    ``prediction`` is a 0/1 mask (segmentation) or a heat map in [0, 1] (grounding); ``caption`` says
    what the row shows (image id, query text, per-image Dice).
    """

    key: str
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray
    heatmap: bool
    caption: str


def display_size(shape: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image shown in a panel: at most :data:`PANEL_PIXELS` on its longer side."""
    scale = min(1.0, PANEL_PIXELS / max(shape))
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def _resized(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    from PIL import Image

    if tuple(array.shape) == tuple(size):
        return array
    image = Image.fromarray(array.astype(np.float32))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(image.resize((size[1], size[0]), resample), dtype=np.float32)


def make_panel(key: str, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, *, heatmap: bool,
               caption: str) -> Panel:
    """A :class:`Panel` at display size: ``truth`` and a segmentation ``prediction`` resized nearest,
    the image and a heat map bilinearly (all three given at the image's native size)."""
    size = display_size(image.shape)
    shown = _resized(image, size, nearest=False).clip(0, 255).astype(np.uint8)
    return Panel(key, shown, _resized(truth.astype(np.float32), size, nearest=True) > 0,
                 _resized(prediction.astype(np.float32), size, nearest=not heatmap), heatmap, caption)


def panel_figure(panels: Sequence[Panel]):
    """Image | ground truth | prediction (or heat map) for each panel, at column width. A Figure.

    Truth is drawn in red, a predicted mask in cyan, a heat map in the ``inferno`` colour map (half
    transparent) with the truth's outline on top.

    Raises:
        ConfigError: ``panels`` is empty.
    """
    if not panels:
        raise ConfigError("panel_figure: no panel to draw")
    red, cyan = np.array([0.9, 0.1, 0.1]), np.array([0.0, 0.85, 0.9])
    with plot_style():
        figure = new_figure(COLUMN_WIDTH_IN, PANEL_HEADER_IN + PANEL_ROW_HEIGHT_IN * len(panels))
        grid = figure.subplots(len(panels), 3, squeeze=False)
        titles = ("image", "ground truth", "heat map" if panels[0].heatmap else "prediction")
        for row, panel in enumerate(panels):
            grey = np.repeat(panel.image[..., None] / 255.0, 3, axis=2)
            truth_overlay = np.where(panel.truth[..., None], 0.45 * grey + 0.55 * red, grey)
            cells = grid[row]
            cells[0].imshow(grey, interpolation="nearest")
            cells[1].imshow(truth_overlay, interpolation="nearest")
            if panel.heatmap:
                cells[2].imshow(grey, interpolation="nearest")
                cells[2].imshow(panel.prediction, cmap="inferno", alpha=0.5, vmin=0.0, vmax=1.0,
                                interpolation="nearest")
                if panel.truth.any():
                    cells[2].contour(panel.truth.astype(float), levels=[0.5], colors=["#33ff66"], linewidths=0.6)
            else:
                predicted = panel.prediction > 0.5
                cells[2].imshow(np.where(predicted[..., None], 0.45 * grey + 0.55 * cyan, grey),
                                interpolation="nearest")
            cells[0].set_ylabel(panel.caption, fontsize=FONT_PT - 2)
            for column, axes in enumerate(cells):
                axes.set_xticks([])
                axes.set_yticks([])
                if row == 0:
                    axes.set_title(titles[column])
    return figure


def panel_caption(image_id: str, text: str | None = None, score: float | None = None) -> str:
    """Row caption: a shortened id, the query text, the per-image score, one per line."""
    short = image_id if len(image_id) <= 18 else f"…{image_id[-17:]}"
    if text and len(text) > 24:
        text = text[:23] + "…"
    lines = [short] + ([text] if text else []) + ([f"Dice {score:.2f}"] if score is not None else [])
    return "\n".join(lines)


def choose_ids(ids: Sequence[str], is_positive: Mapping[str, bool], n: int) -> list[str]:
    """The first ``n`` ids, positives first (their overlays show most), in split order otherwise."""
    ranked = [i for i in ids if is_positive[i]] + [i for i in ids if not is_positive[i]]
    return ranked[:n]


def segmentation_panels(source, ids: Sequence[str], folder: Path, config: Mapping[str, Any], n: int) -> list[Panel]:
    """Panels of ``n`` test images (positives first) with the masks of a predictions folder
    (``<image_id>.png`` or ``.npy``, as ``vlpbench score`` reads them), captioned with each image's Dice.

    Raises:
        DataError: a chosen image has no prediction, or one is unreadable.
    """
    import torch

    from vlpbench.metrics.dice import dice_per_image
    from vlpbench.predictions import find_masks, read_prediction_mask

    chosen = choose_ids(ids, {i: bool(source.label(i)) for i in ids}, n)
    found = find_masks(Path(folder), chosen, complete=False)
    threshold = config["threshold"]
    panels = []
    for image_id in chosen:
        truth = source.mask(image_id)
        prediction = read_prediction_mask(found[image_id], truth.shape)
        score = dice_per_image(prediction[None], torch.from_numpy(truth)[None], threshold)[0]
        panels.append(make_panel(image_id, source.image(image_id), truth > 0, (prediction > threshold).numpy(),
                                 heatmap=False, caption=panel_caption(image_id, score=float(score))))
    return panels


def grounding_panels(source, ids: Sequence[str], predictions: Path, config: Mapping[str, Any], n: int) -> list[Panel]:
    """Panels of the first ``n`` grounding queries among ``ids`` (positive images only), from an ``.npz``
    of heat maps or a folder holding ``heatmaps.npz``; each map upsampled as the task does and min-max
    scaled for display, the truth at the image's native resolution.

    Raises:
        DataError: the file is unreadable or lacks the map of a chosen query.
    """
    from vlpbench.errors import DataError
    from vlpbench.predictions import HEATMAPS_FILE
    from vlpbench.protocols.grounding import grounding_queries, prepare_heatmap, read_heatmaps, truth_mask

    path = Path(predictions)
    maps = read_heatmaps(path / HEATMAPS_FILE if path.is_dir() else path)
    queries = grounding_queries(source, ids, config)[0][:n]
    missing = [q.key for q in queries if q.key not in maps]
    if missing:
        raise DataError(f"{path}: no heat map for {', '.join(map(repr, missing[:3]))}")
    native = {**config, "eval_resolution": "native", "normalize": "minmax"}
    panels = []
    for query in queries:
        truth = truth_mask(source, query, native)
        heat = prepare_heatmap(np.asarray(maps[query.key], dtype=np.float32), truth.shape, native)
        panels.append(make_panel(query.key, source.image(query.image_id), truth, heat, heatmap=True,
                                 caption=panel_caption(query.image_id, query.text)))
    return panels
