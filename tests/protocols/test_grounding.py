"""Zero-shot grounding on synthetic RSNA, SIIM and MS-CXR with a hand-built model whose maps see the lesions.

The test model is BioViL-shaped (``dense_embed`` + ``embed_text``, the base class's cosine ``grounding_maps``):
each 4×4 cell of a 64-pixel image gets the features (brightness, darkness, 0) inside a fixed band where the
lungs lie and (0, 0, 1) outside it; a text naming pneumothorax (drawn dark) asks for darkness, any other for
brightness (opacities are drawn bright). So its maps peak on lesions, far more often than chance.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlpbench import api
from vlpbench.adapters.base import Adapter, CapabilityError
from vlpbench.cli import main
from vlpbench.data.cache import resize_image
from vlpbench.data.splits import dataset_split
from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics.grounding import dice, grounding_scores, iou, pointing_game, recall
from vlpbench.protocols import SplitIds
from vlpbench.protocols.grounding import (
    PROTOCOL,
    compute_maps,
    grounding_queries,
    run_grounding_task,
    score_queries,
    truth_mask,
)
from vlpbench.registry import ADAPTERS
from vlpbench.tasks import load_task
from vlpbench.testing.weightless import BrightnessGrounding

SIZE = 64
DATASET = {"rsna_ground": "rsna", "siim_ground": "siim", "ms_cxr_ground": "ms_cxr"}
FAST = ["--set", "eval_size=64", "--set", "bootstrap_resamples=200", "--set", "threshold_grid=200"]


BrightnessModel = BrightnessGrounding


class CategoryModel(BrightnessModel):
    """The same maps, but a fixed vocabulary (like MedKLIP): it records the texts it is asked for."""

    name = "grounding-test-category"
    free_text = False
    asked: list[str] = []

    def grounding_maps(self, images, texts):
        type(self).asked.extend(texts)
        return super().grounding_maps(images, texts)


class ImageOnlyModel(BrightnessModel):
    """Dense image features without a text side: no grounding."""

    name = "grounding-test-image-only"
    capabilities = frozenset({"dense_embed"})


ADAPTERS.register(BrightnessModel.name, BrightnessModel)


@pytest.fixture(scope="module")
def roots(tmp_path_factory, siim_root):
    """Synthetic RSNA (150 patients) and MS-CXR (40 images) at 64 px, and the shared synthetic SIIM."""
    folder = tmp_path_factory.mktemp("grounding")
    api.synth("rsna", folder / "rsna", n=150, size=SIZE, progress=False)
    api.synth("ms_cxr", folder / "ms_cxr", n=40, size=SIZE, progress=False)
    return {"rsna": folder / "rsna", "siim": siim_root, "ms_cxr": folder / "ms_cxr"}


def _source_and_split(task: str, root):
    spec = load_task(task)
    source = api.open_dataset(spec, root)
    split = dataset_split(spec.dataset, source, spec.split)
    return spec, source, {part: api.split_ids(split, part, source)[0] for part in ("val", "test")}


@pytest.mark.parametrize("task, at_least", [("rsna_ground", 0.3), ("siim_ground", 0.3)])
def test_maps_point_at_lesions_far_above_chance(roots, task, at_least):
    spec, source, _ = _source_and_split(task, roots[DATASET[task]])
    config = {**spec.config, "eval_size": SIZE}
    ids = [i for i in source.image_ids if not source.missing([i])]
    queries, negatives = grounding_queries(source, ids, config)
    assert len(queries) >= 25 and negatives == len(ids) - len(queries)
    maps = compute_maps(BrightnessModel(), source, queries, batch_size=64, device=torch.device("cpu"), progress=False)
    scores = score_queries(maps, queries, source, config, 0.5)
    # A random argmax pixel lands in the truth with probability equal to the truth's share of the image.
    chance = np.mean([truth_mask(source, q, config).mean() for q in queries])
    assert chance < 0.2
    assert scores["pointing_game"].mean() >= max(at_least, 3 * chance)
    assert np.nanmean(scores["cnr"]) > 0.5


def _direct_dice(model: Adapter, source, key: str, threshold: float) -> float:
    """Dice of one RSNA query computed without the protocol: images are already 64 px, eval_size is 64."""
    image = torch.from_numpy(source.image(key))[None, None]
    raw = model.grounding_maps(model.preprocess(image), ["pneumonia"])
    heat = F.interpolate(raw, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    return dice(heat.numpy(), source.mask(key), threshold)


@pytest.mark.parametrize("task", ["rsna_ground", "siim_ground", "ms_cxr_ground"])
def test_cli_run_writes_a_grounding_record(roots, tmp_path, task, capsys):
    root = roots[DATASET[task]]
    code = main(["-q", "run", "--model", BrightnessModel.name, "--task", task, "--frac", "1.0",
                 "--data-root", str(root), "--results", str(tmp_path), *FAST])
    assert code == 0, capsys.readouterr().err
    record = json.loads(next((tmp_path / "runs").rglob("*.json")).read_text())
    spec, source, parts = _source_and_split(task, root)
    expected_test, test_negatives = grounding_queries(source, parts["test"], spec.config)
    expected_val, val_negatives = grounding_queries(source, parts["val"], spec.config)

    n, metrics, training = record["n"], record["metrics"], record["config"]["training"]
    assert (n["test"], n["val"], n["train"]) == (len(expected_test), len(expected_val), 0)
    assert (n["test_negatives_skipped"], n["val_negatives_skipped"]) == (test_negatives, val_negatives)
    assert n["flat_maps"] == 0 and n["test"] >= 3
    assert list(record["per_image"]) == [q.key for q in expected_test]
    assert metrics["dice"] == pytest.approx(np.mean(list(record["per_image"].values())), abs=1e-5)
    assert record["primary_metric"] == "dice" and set(record["ci"]) == {"pointing_game", "recall", "iou", "dice", "cnr"}
    assert record["ci"]["dice"]["low"] <= metrics["dice"] <= record["ci"]["dice"]["high"]
    assert training["threshold_source"] == "val" and 0.0 <= training["threshold"] <= 1.0
    assert training["map_size"] == [16, 16] and training["input_size"] == SIZE
    assert training["text_source"] == ("phrase" if task == "ms_cxr_ground" else "prompt")
    if task == "ms_cxr_ground":
        assert all("#" in key for key in record["per_image"]) and test_negatives == 0
    if task == "rsna_ground":
        model = BrightnessModel()
        for key, value in record["per_image"].items():
            assert value == pytest.approx(_direct_dice(model, source, key, training["threshold"]), abs=1e-5)


def test_native_resolution_nearest_raw_maps_match_a_direct_computation(roots):
    """MedKLIP-style options on SIIM: raw maps, nearest upsampling, a fixed cut, truth at the mask's 1024²."""
    spec, source, parts = _source_and_split("siim_ground", roots["siim"])
    config = spec.resolve({"eval_resolution": "native", "upsample": "nearest", "normalize": "none",
                           "threshold_source": "fixed", "threshold": 0.7, "bootstrap_resamples": 50})
    model = BrightnessModel()
    outcome = run_grounding_task(model, source, SplitIds([], parts["val"], parts["test"]), config, seed=0,
                                 device=torch.device("cpu"), progress=False)
    assert outcome["per_image"] and outcome["n"]["val"] == 0
    for key, value in outcome["per_image"].items():
        image = torch.from_numpy(resize_image(source.image(key), SIZE))[None, None]  # as the image cache does
        raw = model.grounding_maps(model.preprocess(image), ["pneumothorax"])
        heat = raw[0, 0].repeat_interleave(64, 0).repeat_interleave(64, 1)  # 16² cells to 1024², MedKLIP's repeat
        assert value == pytest.approx(dice(heat.numpy(), source.mask(key), 0.7))


def test_fixed_vocabulary_model_gets_categories_and_fixed_threshold(roots):
    spec, source, parts = _source_and_split("ms_cxr_ground", roots["ms_cxr"])
    config = spec.resolve({"threshold_source": "fixed", "threshold": 0.6, "eval_size": SIZE, "bootstrap_resamples": 50})
    CategoryModel.asked = []
    outcome = run_grounding_task(CategoryModel(), source, SplitIds([], parts["val"], parts["test"]), config,
                                 seed=0, device=torch.device("cpu"), progress=False)
    categories = {category for i in parts["test"] for category, _, _ in source.phrases(i)}
    assert set(CategoryModel.asked) == categories
    assert outcome["training"]["text_source"] == "category" and outcome["training"]["threshold"] == 0.6
    assert outcome["n"]["val"] == 0  # a fixed threshold needs no validation maps


def test_bad_options_and_models_fail_before_any_work(roots):
    spec, source, parts = _source_and_split("rsna_ground", roots["rsna"])
    split = SplitIds([], parts["val"], parts["test"])
    with pytest.raises(ConfigError, match="upsample='bicubic'"):
        run_grounding_task(BrightnessModel(), source, split, spec.resolve({"upsample": "bicubic"}), seed=0,
                           device=torch.device("cpu"), progress=False)
    with pytest.raises(CapabilityError, match="grounding"):
        run_grounding_task(ImageOnlyModel(), source, split, spec.config, seed=0, device=torch.device("cpu"),
                           progress=False)


def _upsampled(raw: np.ndarray, size: int) -> np.ndarray:
    heat = F.interpolate(torch.from_numpy(raw)[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return ((heat - heat.min()) / (heat.max() - heat.min())).numpy()


def _truth_224(mask: np.ndarray) -> np.ndarray:
    # torchvision's Resize(NEAREST) on a tensor, as MedKLIP resizes its mask: source pixel floor(i * in / out).
    rows = np.arange(224) * mask.shape[0] // 224
    cols = np.arange(224) * mask.shape[1] // 224
    return mask[np.ix_(rows, cols)] > 0


def test_score_on_a_hand_made_npz_equals_the_direct_computation(roots, tmp_path):
    spec, source, parts = _source_and_split("rsna_ground", roots["rsna"])
    rng = np.random.default_rng(1)
    maps = {i: rng.random((8, 8)).astype(np.float32) for i in parts["test"] + parts["val"]}
    np.savez(tmp_path / "maps.npz", **maps)
    result = api.score("rsna_ground", tmp_path / "maps.npz", data_root=roots["rsna"],
                       overrides={"bootstrap_resamples": 100})

    positives = [i for i in parts["test"] if source.label(i)]
    val_positives = [i for i in parts["val"] if source.label(i)]
    assert result["n"]["test"] == len(positives)
    assert result["n"]["test_negatives_skipped"] == len(parts["test"]) - len(positives)
    assert result["scoring"]["threshold_source"] == "val" and result["n"]["val"] == len(val_positives)
    # The threshold: the candidate quantile with the best mean validation Dice (maps at 224², truths NEAREST).
    pooled = np.concatenate([(maps[i] - maps[i].min()) / (maps[i].max() - maps[i].min()) for i in val_positives])
    candidates = np.unique(np.quantile(pooled.ravel(), np.linspace(0, 1, spec.config["threshold_grid"] + 1)))
    val_pairs = [(_upsampled(maps[i], 224), _truth_224(source.mask(i))) for i in val_positives]
    stacked_heat = np.stack([h for h, _ in val_pairs])
    stacked_truth = np.stack([t for _, t in val_pairs])
    mean_dice = []
    for threshold in candidates:
        predicted = stacked_heat > threshold
        hit = (predicted & stacked_truth).sum(axis=(1, 2))
        mean_dice.append(np.mean(2 * hit / (predicted.sum(axis=(1, 2)) + stacked_truth.sum(axis=(1, 2)))))
    threshold = candidates[int(np.argmax(mean_dice))]
    assert result["scoring"]["threshold"] == pytest.approx(threshold)
    assert result["scoring"]["val_dice"] == pytest.approx(max(mean_dice))

    test_pairs = [(_upsampled(maps[i], 224), _truth_224(source.mask(i))) for i in positives]
    expected = {"pointing_game": np.mean([pointing_game(h, t) for h, t in test_pairs]),
                "recall": np.mean([recall(h, t, threshold) for h, t in test_pairs]),
                "iou": np.mean([iou(h, t, threshold) for h, t in test_pairs]),
                "dice": np.mean([dice(h, t, threshold) for h, t in test_pairs])}
    inside_outside = [(h[t], h[~t]) for h, t in test_pairs]
    expected["cnr"] = np.mean([abs(a.mean() - b.mean()) / math.sqrt(a.var() + b.var()) for a, b in inside_outside])
    assert result["metrics"] == pytest.approx(expected)
    assert result["scoring"]["notes"] == []


def test_score_without_validation_maps_uses_the_task_threshold(roots, tmp_path):
    spec, source, parts = _source_and_split("ms_cxr_ground", roots["ms_cxr"])
    rng = np.random.default_rng(2)
    keys = [f"{i}#{k}" for i in parts["test"] for k in range(len(source.phrases(i)))]
    maps = {key: rng.random((5, 7)) for key in keys}
    np.savez(tmp_path / "phrases.npz", **maps)
    result = PROTOCOL.score(tmp_path / "phrases.npz", source, SplitIds([], parts["val"], parts["test"]),
                            {**spec.config, "bootstrap_resamples": 50})
    assert {key: result["scoring"][key] for key in ("threshold", "threshold_source", "val_dice")} == \
        {"threshold": 0.5, "threshold_source": "config", "val_dice": None} and result["n"]["val"] == 0
    assert "no map of a validation positive" in result["scoring"]["notes"][0]
    expected = []
    for key in keys:
        image_id, index = key.split("#")
        truth = _truth_224(source.mask(image_id, int(index)))
        expected.append(grounding_scores(_upsampled(maps[key].astype(np.float32), 224), truth, 0.5)["dice"])
    assert result["n"]["test"] == len(keys) and result["metrics"]["dice"] == pytest.approx(np.mean(expected))


def test_score_errors_name_the_key_and_the_problem(roots, tmp_path):
    spec, source, parts = _source_and_split("rsna_ground", roots["rsna"])
    positives = [i for i in parts["test"] if source.label(i)]
    np.savez(tmp_path / "partial.npz", **{positives[0]: np.ones((4, 4))})
    with pytest.raises(DataError, match=f"{len(positives) - 1} of {len(positives)} positive test maps are missing"):
        PROTOCOL.score(tmp_path / "partial.npz", source, SplitIds([], [], parts["test"]), spec.config)
    np.savez(tmp_path / "cube.npz", **{i: np.ones((2, 4, 4)) for i in positives})
    with pytest.raises(DataError, match=f"key '{positives[0]}': expected a 2-D numeric heat map"):
        PROTOCOL.score(tmp_path / "cube.npz", source, SplitIds([], [], parts["test"]),
                       {**spec.config, "threshold_source": "fixed"})
    with pytest.raises(DataError, match="not found"):
        PROTOCOL.score(tmp_path / "absent.npz", source, SplitIds([], [], parts["test"]), spec.config)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        PROTOCOL.score(tmp_path / "junk.npz", source, SplitIds([], [], parts["test"]), spec.config)


def test_the_inference_batch_changes_no_map_and_auto_on_a_cpu_is_32(roots):
    spec, source, parts = _source_and_split("rsna_ground", roots["rsna"])
    config = spec.resolve({"eval_size": SIZE, "bootstrap_resamples": 50})
    assert config["batch_size"] == "auto"
    split = SplitIds([], parts["val"], parts["test"])
    automatic, small = (run_grounding_task(BrightnessModel(), source, split, {**config, **change}, seed=0,
                                           device=torch.device("cpu"), progress=False)
                        for change in ({}, {"batch_size": 5}))
    assert automatic["training"]["inference_batch"] == {"size": 32, "requested": "auto", "lowered_from": [],
                                                        "how": "cpu: the protocol's fallback"}
    assert small["training"]["inference_batch"]["size"] == 5
    assert small["per_image"] == pytest.approx(automatic["per_image"], abs=1e-6)
    assert small["training"]["threshold"] == pytest.approx(automatic["training"]["threshold"], abs=1e-6)
