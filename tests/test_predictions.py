"""`run --save-predictions`: what a run saves is exactly what `score` reads, and scores the same.

For every task type a tiny run saves its predictions; `score` on that folder, over a copy of the data
folder that holds the label files and no image, gives the run's metrics and CI bounds exactly (the same
dict), because `run` and `score` share one evaluation per protocol.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlpbench import api
from vlpbench.cli import main
from vlpbench.data.siim import SiimSource
from vlpbench.errors import ConfigError
from vlpbench.predictions import (
    DETECTIONS_FILE,
    HEATMAPS_FILE,
    PROBABILITIES_FILE,
    prepare_folder,
    read_coco_results,
    read_probabilities,
    write_detections,
    write_heatmaps,
    write_mask,
    write_probabilities,
)
from vlpbench.registry import ADAPTERS
from vlpbench.testing.weightless import BrightnessClip, WeightlessAdapter

SEG_FAST = ["--set", "image_size=32", "--set", "max_epochs=1", "--set", "patience=1", "--set", "lr=1e-3",
            "--set", "batch_size=4", "--set", "bootstrap_resamples=100"]


class DarkSpotModel(WeightlessAdapter):
    """Heat maps from local darkness (pneumothorax is drawn dark in the synthetic SIIM); no weights."""

    name = "predictions-test-dark-spot"
    description = "test model: heat maps from local darkness"
    capabilities = frozenset({"dense_embed", "embed_text"})
    image_size = 64

    def dense_embed(self, images: torch.Tensor) -> torch.Tensor:
        level = F.avg_pool2d(images.mean(1, keepdim=True), 4)
        return F.normalize(torch.cat([1 - level, level], dim=1), dim=1)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0]] * len(texts))


ADAPTERS.register(DarkSpotModel.name, DarkSpotModel)


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory):
    import torchvision

    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _numpy_dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    p, t = prediction > 0, truth > 0
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else 2.0 * (p & t).sum() / total


def test_segmentation_masks_round_trip_through_score(siim_root, r18_checkpoint, tmp_path, capsys):
    folder = tmp_path / "masks"
    code = main(["-q", "run", "--model", "generic", "--model-option", "arch=resnet18", "--checkpoint",
                 str(r18_checkpoint), "--task", "siim_seg", "--frac", "0.1", "--data-root", str(siim_root),
                 "--results", str(tmp_path / "results"), "--device", "cpu", "--save-predictions", str(folder),
                 *SEG_FAST])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    record = json.loads(next((tmp_path / "results" / "runs").rglob("*.json")).read_text())
    assert record["data"]["predictions"] == str(folder.absolute())

    source = SiimSource(siim_root)
    saved = sorted(p.stem for p in folder.glob("*.png"))
    assert saved == sorted(record["per_image"])
    positive_share = []
    for image_id, dice in record["per_image"].items():
        pixels = np.asarray(Image.open(folder / f"{image_id}.png"))
        truth = source.mask(image_id)
        assert pixels.shape == truth.shape and set(np.unique(pixels)) <= {0, 255}
        assert _numpy_dice(pixels, truth) == pytest.approx(dice, abs=1e-6)
        positive_share.append((pixels > 0).mean())
    assert 0.0 < np.mean(positive_share) < 1.0  # the masks are neither all empty nor all full

    assert main(["score", "--task", "siim_seg", "--predictions", str(folder), "--data-root", str(siim_root),
                 "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["n"]["test"] == record["n"]["test"]
    assert scored["metrics"]["dice"] == pytest.approx(record["metrics"]["dice"], abs=1e-6)


def test_grounding_heatmaps_round_trip_through_score(siim_root, tmp_path):
    # Only the bootstrap size is overridden: `score` evaluates with the task's own settings.
    record, _ = api.run(DarkSpotModel.name, "siim_ground", 1.0, data_root=siim_root, results=tmp_path / "results",
                        overrides={"bootstrap_resamples": 100}, device="cpu", progress=False,
                        save_predictions=tmp_path / "maps")
    path = tmp_path / "maps" / HEATMAPS_FILE
    assert record["data"]["predictions"] == str((tmp_path / "maps").absolute())
    with np.load(path) as archive:
        keys = set(archive.files)
        assert all(archive[key].shape == (16, 16) and archive[key].dtype == np.float32 for key in keys)
    # The test maps, plus the validation maps the threshold was chosen on.
    assert set(record["per_image"]) < keys and len(keys) == record["n"]["test"] + record["n"]["val"]

    scored = api.score("siim_ground", path, data_root=siim_root)
    assert scored["scoring"]["threshold_source"] == "val" and scored["n"]["test"] == record["n"]["test"]
    assert scored["scoring"]["threshold"] == pytest.approx(record["config"]["training"]["threshold"], abs=1e-6)
    assert set(scored["metrics"]) == set(record["metrics"])
    for name, value in record["metrics"].items():
        assert scored["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert 0.0 < record["metrics"]["dice"] < 1.0


def test_prepare_folder_refuses_a_used_folder_before_any_work(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="expected a new or empty folder"):
        prepare_folder(tmp_path / "used")
    made = prepare_folder(tmp_path / "a" / "b")
    assert made.is_dir() and made.is_absolute()


def test_writers_threshold_strictly_and_resize_bilinearly(tmp_path):
    probabilities = torch.tensor([[0.2, 0.5], [0.51, 0.9]])
    path = write_mask(tmp_path, "sub/id1", probabilities, (2, 2), 0.5)
    assert path == tmp_path / "sub" / "id1.png"
    assert np.asarray(Image.open(path)).tolist() == [[0, 0], [255, 255]]
    upsampled = write_mask(tmp_path, "id2", probabilities, (4, 4), 0.5)
    expected = F.interpolate(probabilities[None, None], size=(4, 4), mode="bilinear", align_corners=False)[0, 0] > 0.5
    assert (np.asarray(Image.open(upsampled)) > 0).tolist() == expected.tolist()
    npz = write_heatmaps(tmp_path, {"a#0": torch.ones(3, 2, dtype=torch.float64), "b": np.zeros((2, 2))})
    with np.load(npz) as archive:
        assert sorted(archive.files) == ["a#0", "b"] and archive["a#0"].dtype == np.float32


def test_classification_and_detection_writers_round_trip_exactly(tmp_path):
    rows = {"a/1.jpg": [0.1 + 0.2, 1 / 3], "b": [0.0, 1.0]}
    path = write_probabilities(tmp_path, ["x", "y z"], rows)
    assert path.name == PROBABILITIES_FILE
    read = read_probabilities(path, ["x", "y z"], single_column=False)
    assert {k: v.tolist() for k, v in read.items()} == rows  # repr round-trips every float exactly
    boxes = np.array([[1.5, 2.0, 11.5, 22.25], [0.0, 0.0, 4.0, 4.0]])
    path = write_detections(tmp_path, ["p", "q"], [(boxes, np.array([0.9, 0.6])), (np.empty((0, 4)), np.empty(0))])
    assert path.name == DETECTIONS_FILE
    read = read_coco_results(path, ["p", "q"])
    assert np.array_equal(read["p"][0], boxes) and read["p"][1].tolist() == [0.9, 0.6]
    assert read["q"][0].shape == (0, 4)


# --- run, then score the saved predictions over a data folder holding label files only -------------------


class SavedBrightnessClip(BrightnessClip):
    """Image and text embeddings without weights: an image's mean brightness against two fixed text
    directions, so that zero-shot scores vary from image to image."""

    name = "predictions-test-brightness-clip"
    description = "test model: brightness embeddings"


ADAPTERS.register(SavedBrightnessClip.name, SavedBrightnessClip)


def labels_only(root, dest):
    """A copy of a dataset folder without its images (DICOM, JPEG, PNG)."""
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("*.dcm", "*.jpg", "*.jpeg", "*.png"))
    assert not [p for p in dest.rglob("*") if p.suffix in (".dcm", ".jpg", ".jpeg", ".png")]
    return dest


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "rsna"
    api.synth("rsna", root, n=120, size=64, progress=False)
    return root


def _run_then_score(task, model, data_root, tmp_path, *, checkpoint=None, options=None, overrides=None, frac=1.0):
    record, _ = api.run(model, task, frac, checkpoint=checkpoint, model_options=options, data_root=data_root,
                        results=tmp_path / "results", overrides=overrides, device="cpu", progress=False,
                        save_predictions=tmp_path / "predictions")
    scored = api.score(task, tmp_path / "predictions", data_root=labels_only(data_root, tmp_path / "labels"),
                       overrides=overrides)
    return record, scored


def _assert_same_evaluation(record, scored):
    assert scored["metrics"] == record["metrics"]
    assert scored["ci"] == record["ci"]
    assert scored["per_image"] == record.get("per_image", {})
    assert scored["n"]["test"] == record["n"]["test"]


@pytest.mark.slow
def test_segmentation_run_and_score_agree_exactly(siim_root, r18_checkpoint, tmp_path):
    overrides = {"image_size": 32, "max_epochs": 1, "patience": 1, "lr": 1e-3, "batch_size": 4,
                 "bootstrap_resamples": 100}
    record, scored = _run_then_score("siim_seg", "generic", siim_root, tmp_path, checkpoint=r18_checkpoint,
                                     options={"arch": "resnet18"}, overrides=overrides, frac=0.1)
    _assert_same_evaluation(record, scored)
    assert set(scored["metrics"]) == {"dice", "dice_positive", "empty_correct", "all_empty_baseline"}


@pytest.mark.slow
def test_linear_probe_run_and_score_agree_exactly(rsna_root, r18_checkpoint, tmp_path):
    overrides = {"image_size": 32, "resize_size": 36, "max_epochs": 2, "patience": 2, "bootstrap_resamples": 100}
    record, scored = _run_then_score("rsna_cls", "generic", rsna_root, tmp_path, checkpoint=r18_checkpoint,
                                     options={"arch": "resnet18"}, overrides=overrides)
    _assert_same_evaluation(record, scored)
    with open(tmp_path / "predictions" / PROBABILITIES_FILE) as f:
        assert sum(1 for _ in f) == record["n"]["test"] + 1  # header and one row per test image


@pytest.mark.slow
def test_detection_run_and_score_agree_exactly(rsna_root, r18_checkpoint, tmp_path):
    overrides = {"image_size": 64, "max_epochs": 1, "neck_width": 32, "batch_size": 8, "conf_threshold": 0.0,
                 "bootstrap_resamples": 50}
    record, scored = _run_then_score("rsna_det", "generic", rsna_root, tmp_path, checkpoint=r18_checkpoint,
                                     options={"arch": "resnet18"}, overrides=overrides)
    _assert_same_evaluation(record, scored)
    assert scored["n"]["test_detections"] == record["n"]["test_detections"] > 0


def test_zero_shot_run_and_score_agree_exactly_with_thresholds_from_validation(siim_root, tmp_path):
    record, scored = _run_then_score("siim_zs", SavedBrightnessClip.name, siim_root, tmp_path,
                                     overrides={"bootstrap_resamples": 100})
    _assert_same_evaluation(record, scored)
    assert {"auc", "f1", "acc", "mcc"} <= set(scored["metrics"])
    assert scored["scoring"]["thresholds"] == record["config"]["training"]["thresholds"]
    assert scored["n"]["val"] == record["n"]["val"] > 0


def test_grounding_run_and_score_agree_exactly(siim_root, tmp_path):
    record, scored = _run_then_score("siim_ground", DarkSpotModel.name, siim_root, tmp_path,
                                     overrides={"bootstrap_resamples": 100})
    _assert_same_evaluation(record, scored)
    assert scored["scoring"]["threshold"] == record["config"]["training"]["threshold"]


@pytest.mark.slow
def test_finetune_run_and_score_agree_exactly(tmp_path_factory, r18_checkpoint, tmp_path):
    root = tmp_path_factory.mktemp("data") / "cxr14"
    api.synth("cxr14", root, n=120, size=64, progress=False)
    overrides = {"image_size": 32, "max_epochs": 1, "patience": 1, "batch_size": 8, "select_on": "loss",
                 "bootstrap_resamples": 50}
    record, scored = _run_then_score("cxr14_ft", "generic", root, tmp_path, checkpoint=r18_checkpoint,
                                     options={"arch": "resnet18"}, overrides=overrides)
    _assert_same_evaluation(record, scored)
    assert any(name.startswith("auc_") for name in scored["metrics"])


def test_score_needs_only_the_real_label_file_not_one_image(tmp_path):
    """The real SIIM stage-2 label file (shipped by torchxrayvision), no DICOM at all, and an empty mask for
    every test image: every negative scores 1, every positive 0."""
    import gzip

    from vlpbench.data.splits import load_split
    from vlpbench.data.xrv_files import SIIM_RLE, xrv_data_file

    root = tmp_path / "siim"
    root.mkdir()
    (root / "stage_2_train.csv").write_bytes(gzip.decompress(xrv_data_file(SIIM_RLE).read_bytes()))
    split = load_split("siim")
    test = split.ids("test")
    masks = tmp_path / "empty"
    masks.mkdir()
    empty = Image.fromarray(np.zeros((8, 8), dtype=np.uint8))
    for image_id in test:
        empty.save(masks / f"{image_id}.png")
    scored = api.score("siim_seg", masks, data_root=root, overrides={"bootstrap_resamples": 20})
    negatives = sum(1 for label in split.labels("test").values() if not label)
    assert scored["n"]["test"] == len(test) == 1807
    assert scored["metrics"] == {"dice": pytest.approx(negatives / len(test)), "dice_positive": 0.0,
                                 "empty_correct": 1.0, "all_empty_baseline": pytest.approx(negatives / len(test))}
