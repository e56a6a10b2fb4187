"""chexlocalize_ground from the CLI on a tiny synthetic CheXlocalize, checked against CheXlocalize's definitions
computed here from scratch (eval.py: IoU on the true-positive slice, hit at np.argmax; tune_heatmap_threshold.py:
per pathology the lowest of the best grid values)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlpbench import api
from vlpbench.adapters.base import Adapter
from vlpbench.cli import main
from vlpbench.data.chexlocalize import ChexlocalizeSource
from vlpbench.metrics.grounding import hit, true_positive_iou
from vlpbench.protocols.labels import class_slug
from vlpbench.registry import ADAPTERS
from vlpbench.testing.weightless import BrightnessGrounding

SIZE = 64
GRID = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


class LesionModel(BrightnessGrounding):
    """Maps from local brightness (darkness for pneumothorax, drawn dark) inside a fixed lung band, 4x4 cells."""

    name = "grounding-test-chexlocalize"


ADAPTERS.register(LesionModel.name, LesionModel)


def _heat(model: Adapter, source, image_id: str, prompt: str) -> np.ndarray:
    """The map as CheXlocalize makes a mask of it: bilinear to the image size, then min-max."""
    raw = model.grounding_maps(model.preprocess(torch.from_numpy(source.image(image_id))[None, None]), [prompt])
    heat = F.interpolate(raw, size=source.image_size(image_id), mode="bilinear", align_corners=False)[0, 0].numpy()
    return (heat - heat.min()) / (heat.max() - heat.min())


def _iou(heat: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    predicted = heat > threshold
    if not predicted.any() or not truth.any():
        return np.nan
    return np.logical_and(predicted, truth).sum() / np.logical_or(predicted, truth).sum()


def test_hit_and_true_positive_iou_follow_chexlocalize():
    heat = np.array([[0.9, 0.1], [0.9, 0.2]])
    assert hit(heat, [[0, 0], [1, 0]]) == 0.0  # the first maximum (row-major) only, unlike the pointing game
    assert hit(heat, [[1, 0], [0, 0]]) == 1.0
    assert np.isnan(true_positive_iou(heat, [[1, 0], [0, 0]], 0.95))  # empty prediction: outside the slice
    assert true_positive_iou(heat, [[1, 1], [0, 0]], 0.5) == pytest.approx(1 / 3)


def test_cli_run_matches_chexlocalize_computed_directly(tmp_path, capsys):
    root = tmp_path / "data"
    api.synth("chexlocalize", root, n=24, size=SIZE, progress=False)
    code = main(["-q", "run", "--model", LesionModel.name, "--task", "chexlocalize_ground", "--frac", "1.0",
                 "--data-root", str(root), "--results", str(tmp_path / "results"), "--set", "bootstrap_resamples=50"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(next((tmp_path / "results" / "runs").rglob("*.json")).read_text())
    source = ChexlocalizeSource(root)
    model = LesionModel()
    prompts = {name: name.lower() for name in source.classes}

    def queries(part):
        return [(i, name) for i in source.image_ids if source.part(i) == part for name in source.pathologies(i)]

    # Thresholds: per pathology, the lowest grid value of highest validation mIoU.
    expected_thresholds = {}
    for name in {n for _, n in queries("val")}:
        pairs = [(_heat(model, source, i, prompts[name]), source.mask(i, name) > 0) for i, n in queries("val") if n == name]
        mious = [np.nanmean([_iou(h, t, cut) for h, t in pairs]) for cut in GRID]
        expected_thresholds[name] = GRID[mious.index(max(mious))]
    training = record["config"]["training"]
    assert training["threshold"] == pytest.approx(expected_thresholds)

    # Scores: mIoU and hit rate per pathology on test, then their mean.
    test = queries("test")
    assert record["n"]["test"] == len(test) and list(record["per_image"]) == [f"{i}#{n}" for i, n in test]
    metrics = record["metrics"]
    for name in {n for _, n in test}:
        cut = training["threshold"].get(name, 0.5)
        ious, hits = [], []
        for image_id, n in test:
            if n == name:
                heat, truth = _heat(model, source, image_id, prompts[name]), source.mask(image_id, name)
                ious.append(_iou(heat, truth, cut))
                row, col = np.unravel_index(np.argmax(heat, axis=None), heat.shape)
                hits.append(float(truth[row][col] == 1))
        assert metrics[f"miou_{class_slug(name)}"] == pytest.approx(np.nanmean(ious), abs=1e-5)
        assert metrics[f"hit_rate_{class_slug(name)}"] == pytest.approx(np.mean(hits), abs=1e-5)
    per_pathology = [v for k, v in metrics.items() if k.startswith("miou_")]
    assert record["primary_metric"] == "miou" and metrics["miou"] == pytest.approx(np.mean(per_pathology), abs=1e-5)
    chance = np.mean([source.mask(i, n).mean() for i, n in test])  # a random point's hit rate
    assert metrics["hit_rate"] > 2 * chance  # the maps point at the drawn lesions
    assert record["ci"]["miou"]["low"] <= metrics["miou"] <= record["ci"]["miou"]["high"]
