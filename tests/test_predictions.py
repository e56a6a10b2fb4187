"""`run --save-predictions`: what a run saves is exactly what `score` reads, and scores the same.

Segmentation: a tiny U-Net run (ResNet-18, 32 px, 1 epoch) on the synthetic SIIM; its saved masks are
re-scored by `vlpbench score` and by a direct numpy Dice, both equal to the record's per-image Dice.
Grounding: a weight-free brightness model on siim_ground; `score` on the saved .npz chooses the same
threshold on the validation maps and reproduces every metric of the record.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlpbench import api
from vlpbench.adapters.base import Adapter, LoadReport, Weights
from vlpbench.cli import main
from vlpbench.data.siim import SiimSource
from vlpbench.errors import ConfigError
from vlpbench.predictions import HEATMAPS_FILE, prepare_folder, saves_predictions, write_heatmaps, write_mask
from vlpbench.registry import ADAPTERS, PROTOCOLS

SEG_FAST = ["--set", "image_size=32", "--set", "max_epochs=1", "--set", "patience=1", "--set", "lr=1e-3",
            "--set", "batch_size=4", "--set", "bootstrap_resamples=100"]


class DarkSpotModel(Adapter):
    """Heat maps from local darkness (pneumothorax is drawn dark in the synthetic SIIM); no weights."""

    name = "predictions-test-dark-spot"
    description = "test model: heat maps from local darkness"
    capabilities = frozenset({"dense_embed", "embed_text"})
    takes_checkpoint = False
    image_size = 64
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    @classmethod
    def map_weights(cls, checkpoint, options):
        return Weights(LoadReport("none"), {})

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
    assert scored["n"] == record["n"]["test"]
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
    assert scored["threshold"]["source"] == "val" and scored["n"] == record["n"]["test"]
    assert scored["threshold"]["threshold"] == pytest.approx(record["config"]["training"]["threshold"], abs=1e-6)
    assert set(scored["metrics"]) == set(record["metrics"])
    for name, value in record["metrics"].items():
        assert scored["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert 0.0 < record["metrics"]["dice"] < 1.0


def test_only_segmentation_and_grounding_protocols_save_predictions():
    assert sorted(name for name in PROTOCOLS.names() if saves_predictions(PROTOCOLS.get(name))) == \
        ["grounding", "segmentation"]


def test_prepare_folder_refuses_before_any_work(tmp_path):
    linear = PROTOCOLS.get("linear")
    with pytest.raises(ConfigError, match="protocol 'linear' saves no predictions"):
        prepare_folder(tmp_path / "new", linear, "linear")
    assert not (tmp_path / "new").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="expected a new or empty folder"):
        prepare_folder(tmp_path / "used", PROTOCOLS.get("segmentation"), "segmentation")
    made = prepare_folder(tmp_path / "a" / "b", PROTOCOLS.get("segmentation"), "segmentation")
    assert made.is_dir() and made.is_absolute()


def test_cli_refuses_a_protocol_without_predictions_before_training(siim_root, tmp_path, capsys):
    code = main(["-q", "run", "--model", DarkSpotModel.name, "--task", "siim_zs", "--frac", "1.0", "--data-root",
                 str(siim_root), "--results", str(tmp_path), "--save-predictions", str(tmp_path / "p")])
    assert code == 2 and "saves no predictions" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.json")) and not (tmp_path / "p").exists()


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
