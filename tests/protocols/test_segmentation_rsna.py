"""rsna_seg (box masks, every negative kept) and U-Nets over encoders that declare fewer stages."""

import json

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from vlpbench import api
from vlpbench.cli import main
from vlpbench.data.rsna import RsnaSource
from vlpbench.protocols.segmentation import UNet
from vlpbench.tasks import load_task


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    api.synth("rsna", root, n=96, size=64, progress=False)
    return root


def test_rsna_seg_task_keeps_negatives_and_uses_batch_16():
    config = load_task("rsna_seg").config
    assert config["balance_negatives"] is False and config["batch_size"] == 16


def test_unet_over_a_four_stage_encoder_predicts_at_input_resolution():
    encoder = smp.encoders.get_encoder("resnet50", depth=4, weights=None)
    unet = UNet(encoder, "resnet50")
    assert len(unet.unet.decoder.blocks) == 4
    assert unet(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 64, 64)


def test_rsna_seg_runs_from_the_cli_and_scores_box_masks(rsna_root, tmp_path, capsys):
    code = main(["run", "--model", "random", "--task", "rsna_seg", "--frac", "1.0", "--data-root", str(rsna_root),
                 "--results", str(tmp_path), "--device", "cpu", "--set", "image_size=32", "--set", "max_epochs=2",
                 "--set", "bootstrap_resamples=50"])
    assert code == 0
    (path,) = tmp_path.rglob("rsna_seg.v1/*.json")
    record = json.loads(path.read_text())
    source = RsnaSource(rsna_root)
    test_ids = list(record["per_image"])
    assert record["n"]["test"] == len(test_ids) > 0
    # Both sides are written rounded to 6 decimals: the mean of rounded values may differ by a few 1e-7.
    assert np.mean(list(record["per_image"].values())) == pytest.approx(record["metrics"]["dice"], abs=2e-6)
    positives = [i for i in test_ids if source.label(i)]
    assert np.isclose(record["metrics"]["all_empty_baseline"], 1 - len(positives) / len(test_ids))
    # A positive's mask is its boxes filled at the DICOM's own size.
    mask = source.mask(positives[0])
    expected = np.zeros(source.image_size(positives[0]), dtype=np.uint8)
    for x1, y1, x2, y2 in source.boxes(positives[0]).astype(int):
        expected[y1:y2, x1:x2] = 1
    assert expected.sum() > 0 and np.array_equal(mask, expected)
