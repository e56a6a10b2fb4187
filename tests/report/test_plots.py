"""Plots: curve data from records (means over seeds, CI bounds), what the figure draws, files and their
sizes, byte-identical SVG, and qualitative panels from saved masks and heat maps."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from PIL import Image

from vlpbench import api, results
from vlpbench.cli import main
from vlpbench.data.siim import SiimSource
from vlpbench.data.splits import load_split
from vlpbench.errors import ConfigError
from vlpbench.report.plots import (
    COLUMN_WIDTH_IN,
    CURVE_HEIGHT_IN,
    DPI,
    PANEL_HEADER_IN,
    PANEL_ROW_HEIGHT_IN,
    fraction_curves,
    fraction_figure,
    grounding_panels,
    plot_fraction_curves,
    segmentation_panels,
)
from vlpbench.tasks import load_task

FRACS = (0.01, 0.1, 1.0)
# Model → (seed → Dice at 1 %, 10 %, 100 %); CI half-width 0.04 around each run's value.
VALUES = {"g2d": {0: (0.50, 0.60, 0.70), 1: (0.54, 0.62, 0.74)}, "mgca": {0: (0.40, 0.55, 0.65)}}


@pytest.fixture
def records(make):
    built = [make(model, value, frac=frac, seed=seed, ci=0.04)
             for model, seeds in VALUES.items() for seed, values in seeds.items()
             for frac, value in zip(FRACS, values)]
    return built + [make("g2d", 0.8, task="rsna_cls", frac=1.0)]  # one point, no CI


def test_curves_hold_the_mean_over_seeds_and_the_mean_ci_bounds(records):
    curves = {(c.task, c.model): c for c in fraction_curves(records)}
    assert set(curves) == {("siim_seg", "g2d"), ("siim_seg", "mgca"), ("rsna_cls", "g2d")}
    g2d = curves["siim_seg", "g2d"]
    assert g2d.fracs == FRACS and g2d.n_seeds == (2, 2, 2)
    assert g2d.means == pytest.approx([0.52, 0.61, 0.72])
    assert g2d.ci_low == pytest.approx([0.48, 0.57, 0.68]) and g2d.ci_high == pytest.approx([0.56, 0.65, 0.76])
    assert curves["siim_seg", "mgca"].means == pytest.approx([0.40, 0.55, 0.65])
    single = curves["rsna_cls", "g2d"]
    assert single.metric == "auc" and single.means == (0.8,) and single.ci_low == (None,)
    assert [c.task for c in fraction_curves(records, tasks=["rsna_cls"])] == ["rsna_cls"]


def test_figure_draws_the_curve_values_on_a_log_axis_with_ci_bands(records):
    curves = [c for c in fraction_curves(records) if c.task == "siim_seg"]
    figure = fraction_figure(curves)
    axes = figure.axes[0]
    assert axes.get_xscale() == "log" and axes.get_title() == "siim_seg"
    assert axes.get_ylabel() == "Dice (×100) ↑"
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1%", "10%", "100%"]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert list(lines) == ["g2d", "mgca"]
    assert np.allclose(lines["g2d"].get_xdata(), [1, 10, 100])
    assert np.allclose(lines["g2d"].get_ydata(), [52, 61, 72])
    assert np.allclose(lines["mgca"].get_ydata(), [40, 55, 65])
    bands = [c for c in axes.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    band = bands[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(48) and band[:, 1].max() == pytest.approx(76)
    assert figure.get_size_inches() == pytest.approx([COLUMN_WIDTH_IN, CURVE_HEIGHT_IN])
    assert axes.title.get_fontsize() == 8


def test_files_are_written_at_column_width_and_svg_is_deterministic(records, tmp_path):
    first = plot_fraction_curves(records, tmp_path / "a")
    second = plot_fraction_curves(records, tmp_path / "b", formats=("svg",))
    assert sorted(p.name for p in first) == ["rsna_cls.png", "rsna_cls.svg", "siim_seg.png", "siim_seg.svg"]
    with Image.open(tmp_path / "a" / "siim_seg.png") as image:
        assert image.size == (round(COLUMN_WIDTH_IN * DPI), round(CURVE_HEIGHT_IN * DPI))
    for path in second:
        assert path.read_bytes() == (tmp_path / "a" / path.name).read_bytes()
    assert b"<dc:date>" not in second[0].read_bytes()


def test_tasks_with_two_versions_get_one_plot_each(make, tmp_path):
    built = [make("g2d", 0.5, version=1), make("g2d", 0.6, version=2, split="d" * 64)]
    names = sorted(p.name for p in plot_fraction_curves(built, tmp_path, formats=("png",)))
    assert names == ["siim_seg.v1-aaaaaaaa.png", "siim_seg.v2-dddddddd.png"]


def test_cli_plot_and_its_errors(records, tmp_path, capsys):
    for record in records:
        results.write_record(record, tmp_path / "results")
    assert main(["plot", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "plots"),
                 "--tasks", "siim_seg", "--format", "svg"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "plots" / "siim_seg.svg")]
    assert main(["plot", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "x"), "--format", "pdf"]) == 2
    assert "--format pdf: expected png and/or svg" in capsys.readouterr().err
    assert main(["plot", "--panels", "--out", str(tmp_path / "x")]) == 2
    assert "needs --task and --predictions" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="protocol linear"):
        api.plot_panels("rsna_cls", tmp_path, tmp_path / "x")


def _test_ids(source):
    return api.split_ids(load_split("siim"), "test", source)[0]


def test_segmentation_panels_show_the_saved_masks(siim_root, tmp_path):
    source = SiimSource(siim_root)
    ids = _test_ids(source)
    (tmp_path / "masks").mkdir()
    for image_id in ids:  # the truth, shifted 40 px right: Dice below 1 on positives
        shifted = np.roll(source.mask(image_id), 40, axis=1)
        Image.fromarray((shifted * 255).astype(np.uint8)).save(tmp_path / "masks" / f"{image_id}.png")
    panels = segmentation_panels(source, ids, tmp_path / "masks", load_task("siim_seg").config, 3)
    positives = [i for i in ids if source.label(i)]
    assert [p.key for p in panels] == positives[:3]
    for panel in panels:
        truth = source.mask(panel.key)
        shifted = np.roll(truth, 40, axis=1)
        dice = 2 * (truth & shifted).sum() / (truth.sum() + shifted.sum())
        assert panel.caption.endswith(f"Dice {dice:.2f}") and not panel.heatmap
        assert panel.image.shape == panel.truth.shape == panel.prediction.shape == (256, 256)
        # Masks are shown at display size with nearest neighbour: the centre pixel of each 4×4 block.
        assert np.array_equal(panel.truth, truth[2::4, 2::4] > 0)
        assert np.array_equal(panel.prediction > 0.5, shifted[2::4, 2::4] > 0)

    paths = api.plot_panels("siim_seg", tmp_path / "masks", tmp_path / "out", data_root=siim_root, n=2)
    assert sorted(p.name for p in paths) == ["siim_seg_panels.png", "siim_seg_panels.svg"]
    with Image.open(tmp_path / "out" / "siim_seg_panels.png") as image:
        assert image.size == (round(COLUMN_WIDTH_IN * DPI), round((PANEL_HEADER_IN + 2 * PANEL_ROW_HEIGHT_IN) * DPI))


def test_grounding_panels_upsample_and_scale_the_heat_maps(siim_root, tmp_path):
    source = SiimSource(siim_root)
    ids = _test_ids(source)
    positives = [i for i in ids if source.label(i)]
    # A 4×4 map whose single hot cell is the top-left quarter's top-left sixteenth.
    maps = {image_id: np.pad(np.full((1, 1), 5.0), ((0, 3), (0, 3))) + 1.0 for image_id in positives}
    np.savez(tmp_path / "maps.npz", **maps)
    config = {**load_task("siim_ground").config, "upsample": "nearest"}
    panels = grounding_panels(source, ids, tmp_path / "maps.npz", config, 2)
    assert [p.key for p in panels] == positives[:2]
    for panel in panels:
        assert panel.heatmap and "pneumothorax" in panel.caption
        # Min-max scaled to [0, 1]; nearest upsampling makes the hot cell the top-left 64² display pixels.
        assert panel.prediction.min() == 0.0 and panel.prediction.max() == 1.0
        assert np.array_equal(panel.prediction > 0.5, np.pad(np.ones((64, 64), bool), ((0, 192), (0, 192))))
        assert np.array_equal(panel.truth, source.mask(panel.key)[2::4, 2::4] > 0)
