"""Encoder fine-tuning in the segmentation protocol: MedKLIP's original setting (G2D Table 7).

The loss, the crop and MedKLIP's network are checked against MediaBrain-SJTU/MedKLIP
Sample_Finetuning_SIIMACR/I2_segmentation (cited ``I2/``), re-computed here, not imported from vlpbench.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlpbench.cli import main
from vlpbench.errors import ConfigError, VlpbenchError
from vlpbench.protocols.segmentation import UNet, check_options, run_segmentation
from vlpbench.protocols.segmentation_finetune import (
    MedKLIPResUNet,
    dice_bce_loss,
    parameter_groups,
    random_crop_flip,
)
from vlpbench.report.reference import load_reference_file, load_references
from vlpbench.tasks import load_task

REFERENCE = Path(__file__).resolve().parents[2] / "results" / "reference"

# MedKLIP's channel table (I2/models/resunet.py:88-99) and the layer shapes it gives on a ResNet-50 cut after
# layer3 (:87): bridge (:112, ConvBlock :15), up-blocks (:113-122: ConvTranspose2d k2 s2 :60, then ConvBlocks
# :66-67 on the concatenation), the 1x1 Conv1d classifier (:125). Keys are vlpbench's names for those layers.
MEDKLIP_D = {"input": 3, "conv1": 64, "conv2": 256, "conv3": 512, "conv4": 1024, "bridge": 1024,
             "up1": 512, "up2": 256, "up3": 128, "up4": 64}
MEDKLIP_SHAPES = {
    "bridge.0.0.weight": (1024, 1024, 3, 3),
    "bridge.1.0.weight": (1024, 1024, 3, 3),
    "up_blocks.0.upsample.weight": (1024, 512, 2, 2),
    "up_blocks.0.convs.0.0.weight": (512, 512 + 512, 3, 3),
    "up_blocks.1.upsample.weight": (512, 256, 2, 2),
    "up_blocks.1.convs.0.0.weight": (256, 256 + 256, 3, 3),
    "up_blocks.2.upsample.weight": (256, 128, 2, 2),
    "up_blocks.2.convs.0.0.weight": (128, 128 + 64, 3, 3),
    "up_blocks.3.upsample.weight": (128, 64, 2, 2),
    "up_blocks.3.convs.0.0.weight": (64, 64 + 3, 3, 3),
    "up_blocks.3.convs.1.0.weight": (64, 64, 3, 3),
    "seg_classifier.weight": (1, 64, 1),
}


def _medklip_decoder_parameters(d: dict) -> int:
    """MedKLIP's decoder parameter count from its channel table: ConvBlock = 3x3 conv with bias + BatchNorm
    (weight, bias); up-block = ConvTranspose2d k2 with bias + two ConvBlocks; Conv1d k1 with bias."""
    def conv_block(cin, cout):
        return 9 * cin * cout + cout + 2 * cout

    def up_block(cin, cout, skip):
        return 4 * cin * cout + cout + conv_block(cout + skip, cout) + conv_block(cout, cout)

    bridge = conv_block(d["conv4"], d["bridge"]) + conv_block(d["bridge"], d["bridge"])
    ups = (up_block(d["bridge"], d["up1"], d["conv3"]) + up_block(d["up1"], d["up2"], d["conv2"])
           + up_block(d["up2"], d["up3"], d["conv1"]) + up_block(d["up3"], d["up4"], d["input"]))
    return bridge + ups + d["up4"] + 1


def _encoder(name: str, depth: int, seed: int = 0):
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    return smp.encoders.get_encoder(name, in_channels=3, depth=depth, weights=None)


# --- the pieces --------------------------------------------------------------------------------------

def test_dice_bce_is_medklips_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=gen)
    target = (torch.rand(3, 1, 8, 8, generator=gen) > 0.6).float()
    # I2/utils.py:17-31, smooth 1, over the whole flattened batch
    p, t = torch.sigmoid(logits).view(-1), target.view(-1)
    expected = F.binary_cross_entropy(p, t) + 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert dice_bce_loss(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.isfinite(dice_bce_loss(torch.tensor([[[[90.0, -90.0]]]]), torch.tensor([[[[0.0, 1.0]]]])))


def _albumentations_mean_area(n: int = 100_000) -> float:
    """Mean crop area of albumentations' RandomResizedCrop rule on a square image, by simulation: up to 10
    tries of area ~ U(0.2, 1) and log-uniform aspect in [3/4, 4/3]; the first that fits, else the whole image
    (larger windows fit less often, so the mean is below 0.6)."""
    rng = np.random.default_rng(1)
    area = rng.uniform(0.2, 1.0, (n, 10))
    aspect = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), (n, 10)))
    fits = (np.sqrt(area * aspect) <= 1) & (np.sqrt(area / aspect) <= 1)
    first = fits.argmax(axis=1)
    return float(np.where(fits.any(axis=1), area[np.arange(n), first], 1.0).mean())


def test_random_crop_flip_draws_albumentations_windows():
    theta = random_crop_flip(4000, torch.Generator().manual_seed(0))
    width, height = theta[:, 0, 0].abs(), theta[:, 1, 1]
    area, aspect = width * height, width / height
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 1 + 1e-6
    assert area.mean().item() == pytest.approx(_albumentations_mean_area(), abs=0.01)
    assert aspect.min() >= 3 / 4 - 1e-6 and aspect.max() <= 4 / 3 + 1e-6
    # the window stays inside the image, and about half the crops are flipped
    assert (theta[:, 0, 2].abs() + width).max() <= 1 + 1e-6 and (theta[:, 1, 2].abs() + height).max() <= 1 + 1e-6
    assert (theta[:, 0, 0] < 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    seeded = [random_crop_flip(8, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*seeded)
    assert theta[:, 0, 1].eq(0).all() and theta[:, 1, 0].eq(0).all()  # no rotation


def test_a_crop_window_samples_that_part_of_the_image():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    theta = torch.tensor([[[-0.5, 0.0, -0.5], [0.0, 0.5, 0.5]]])  # the bottom-left quarter, flipped
    grid = F.affine_grid(theta, [1, 1, 2, 2], align_corners=False)
    crop = F.grid_sample(image, grid, mode="bilinear", align_corners=False)
    assert torch.equal(crop[0, 0], torch.tensor([[9.0, 8.0], [13.0, 12.0]]))


def test_medklip_network_has_medklips_layer_shapes():
    model = MedKLIPResUNet(_encoder("resnet50", depth=4))  # conv1 to layer3, as MedKLIP's res_features
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    assert {k: shapes[k] for k in MEDKLIP_SHAPES} == MEDKLIP_SHAPES
    decoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoder."))
    assert decoder == _medklip_decoder_parameters(MEDKLIP_D) == 30_964_033
    model.eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 64, 64)


def test_medklip_network_leaves_a_deeper_stage_without_gradient():
    model = UNet(_encoder("resnet18", depth=5), "resnet18", decoder="medklip")
    model.unet(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.unet.encoder.layer4.parameters())  # MedKLIP cuts after layer3
    assert all(p.grad is not None for p in model.unet.encoder.layer3.parameters())
    with pytest.raises(VlpbenchError, match="decoder=medklip needs an encoder with feature maps"):
        MedKLIPResUNet(_encoder("resnet18", depth=3))


def test_without_decay_on_biases_and_norms_the_optimizer_gets_two_groups():
    model = UNet(_encoder("resnet18", depth=5), "resnet18")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert parameter_groups(model, {}) == trainable == parameter_groups(model, {"decay_bias_and_norm": True})
    plain, decayed = parameter_groups(model, {"decay_bias_and_norm": False})
    assert plain["weight_decay"] == 0.0 and "weight_decay" not in decayed
    assert all(p.ndim == 1 for p in plain["params"]) and all(p.ndim > 1 for p in decayed["params"])
    assert len(plain["params"]) + len(decayed["params"]) == len(trainable)


@pytest.mark.parametrize("change, message", [
    ({"decoder": "medklip", "init_decoder": True}, "init_decoder=true loads G2D's smp U-Net decoder"),
    ({"pipeline": "mgca"}, "augmentation=crop_flip runs on the cached images"),
    ({"train_encoder": "yes"}, "train_encoder='yes': expected true or false"),
    ({"decoder": "unet"}, "decoder='unet': expected one of smp, medklip"),
    ({"loss": "dice"}, "loss='dice': expected one of mixed, dice_bce"),
])
def test_impossible_fine_tuning_options_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        check_options({**load_task("siim_seg_ft").config, **change})


# --- which weights train -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_split(siim_parts):
    return siim_parts("siim_seg_ft", 16, 8, 8)


def _train(tiny_split, config: dict, **changes):
    source, split = tiny_split
    encoder = _encoder("resnet18", depth=5)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    config = {**config, "image_size": 32, "batch_size": 8, "max_epochs": 1, "patience": 1,
              "bootstrap_resamples": 10, "dice_resolution": "input", **changes}
    torch.manual_seed(0)  # the decoder's initialisation
    result = run_segmentation(encoder, source, split, config, seed=0, device=torch.device("cpu"),
                              progress=False, encoder_name="resnet18")
    moved = {k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])}
    return result, moved, set(before)


def test_train_encoder_moves_the_encoder_and_off_leaves_it_bit_identical(tiny_split):
    config = load_task("siim_seg_ft").config
    _, moved, keys = _train(tiny_split, config)
    weights = {k for k in keys if k.endswith(".weight")}
    assert weights <= moved  # every encoder weight trained (BatchNorm weights too)
    assert {k for k in keys if k.endswith("running_mean")} <= moved  # BatchNorm in train mode
    _, moved, _ = _train(tiny_split, config, train_encoder=False, freeze_bn=True)
    assert moved == set()
    # Under decoder=medklip the stage MedKLIP cuts (layer4) keeps its weights; BatchNorm statistics still move.
    _, moved, _ = _train(tiny_split, config, decoder="medklip", decay_bias_and_norm=False)
    assert {k for k in moved if k.startswith("layer4") and not k.endswith(("running_mean", "running_var",
                                                                         "num_batches_tracked"))} == set()
    assert "layer3.0.conv1.weight" in moved


def test_the_frozen_encoder_protocol_is_unchanged_by_the_new_options(tiny_split):
    frozen = load_task("siim_seg").config  # a task file that names none of the new options
    assert not {"train_encoder", "decoder", "loss", "augmentation", "decay_bias_and_norm"} & set(frozen)
    implicit, moved, _ = _train(tiny_split, frozen)
    explicit, _, _ = _train(tiny_split, frozen, train_encoder=False, decoder="smp", loss="mixed",
                            augmentation="shift_scale_rotate", decay_bias_and_norm=True)
    assert moved == set()
    assert implicit["per_image"] == explicit["per_image"]
    assert implicit["training"]["history"] == explicit["training"]["history"]


# --- the task files, an end-to-end run, the published rows ---------------------------------------------

@pytest.mark.parametrize("name", ["siim_seg_ft", "rsna_seg_ft"])
def test_fine_tuning_tasks_hold_medklips_settings_with_sources(name):
    canonical = load_task(name)
    config = canonical.config
    assert (config["train_encoder"], config["freeze_bn"], config["loss"], config["augmentation"], config["lr"],
            config["weight_decay"], config["batch_size"], config["image_size"]) == (
        True, False, "dice_bce", "crop_flip", 1e-5, 0.02, 64, 224)
    assert config["mean"] == [0.485, 0.456, 0.406] and config["balance_negatives"] is False
    assert (config["decoder"], config["dice_resolution"], config["max_epochs"], canonical.split) == ("smp", "native",
                                                                                                    100, "v1")
    # every option is one the segmentation protocol reads: those of siim_seg and the fine-tuning ones
    assert set(config) - set(load_task("siim_seg").config) == {"train_encoder", "decoder", "loss", "augmentation",
                                                                "decay_bias_and_norm"}
    paper = load_task(name, profile="paper")
    changed = {key for key in paper.config if paper.config[key] != config[key]}
    settings = {s.key: s.source for s in paper.profile_settings()}
    assert changed == {"decoder", "decay_bias_and_norm", "augment_mask", "dice_resolution", "max_epochs"}
    assert set(settings) == changed | ({"split"} if name == "rsna_seg_ft" else set())
    assert all(source.startswith("MediaBrain-SJTU/MedKLIP ") for source in settings.values())
    assert paper.split == ("medklip" if name == "rsna_seg_ft" else "v1")
    assert (paper.config["decoder"], paper.config["max_epochs"]) == ("medklip", 1000)
    check_options(config)
    check_options(paper.config)


def test_rsnas_medklip_split_has_every_part_the_task_reads():
    manifest = Path(__file__).resolve().parents[2] / "splits" / "rsna" / "medklip" / "MANIFEST.json"
    files = json.loads(manifest.read_text())["files"]
    assert {f"{p}.csv" for p in ("train", "val", "test", "train_1pct", "train_10pct")} <= set(files)
    assert files["test.csv"]["rows"] == 5337 and files["train_1pct.csv"]["rows"] >= 64  # one batch at 1 %


def test_cli_runs_siim_seg_ft_on_synthetic_data(siim_root, resnet18_checkpoint, tmp_path, capsys):
    # The paper profile: MedKLIP's network and optimizer groups through the CLI (the canonical smp path
    # trains in the tests above).
    results = tmp_path / "results"
    args = ["run", "--model", "generic", "--model-option", "arch=resnet18", "--checkpoint", str(resnet18_checkpoint),
            "--task", "siim_seg_ft", "--frac", "0.1", "--profile", "paper", "--data-root", str(siim_root),
            "--results", str(results), "--device", "cpu", "--set", "image_size=32", "--set", "max_epochs=1",
            "--set", "batch_size=8", "--set", "bootstrap_resamples=10"]
    assert main(["-q", *args]) == 0
    assert "siim_seg_ft dice = " in capsys.readouterr().out
    record = json.loads(next(results.rglob("*.json")).read_text())
    assert record["task"]["profile"] == "paper" and record["config"]["train_encoder"] is True
    assert (record["config"]["decoder"], record["config"]["decay_bias_and_norm"]) == ("medklip", False)
    assert record["config"]["training"]["epochs"] == 1 and 0.0 <= record["metrics"]["dice"] <= 1.0


def test_table7_rows_load_beside_their_profile():
    seg = {row.method: row for row in load_reference_file(REFERENCE / "g2d_table7.json")}
    assert set(seg) == {"MedKLIP (Table 7, fine-tuned)", "G2D (Table 7, fine-tuned)"}
    g2d = seg["G2D (Table 7, fine-tuned)"]
    assert g2d.profile == "paper" and g2d.tables[("siim_seg_ft", 1.0, "dice")] == "Table 7"
    assert [g2d.values[("siim_seg_ft", f, "dice")] for f in (0.01, 0.1, 1.0)] == pytest.approx([0.706, 0.745, 0.823])
    assert [g2d.values[("rsna_seg_ft", f, "dice")] for f in (0.01, 0.1, 1.0)] == pytest.approx([0.738, 0.761, 0.765])
    medklip = seg["MedKLIP (Table 7, fine-tuned)"].values
    assert [medklip[("siim_seg_ft", f, "dice")] for f in (0.01, 0.1, 1.0)] == pytest.approx([0.666, 0.721, 0.794])
    assert [medklip[("rsna_seg_ft", f, "dice")] for f in (0.01, 0.1, 1.0)] == pytest.approx([0.706, 0.716, 0.758])
    cxr14 = {row.method: row for row in load_reference_file(REFERENCE / "g2d_table7_cxr14.json")}
    assert cxr14["G2D (Table 7, fine-tuned)"].profile == "canonical"
    assert [cxr14["G2D (Table 7, fine-tuned)"].values[("cxr14_ft", f, "auc")] for f in (0.01, 0.1, 1.0)] == \
        pytest.approx([0.804, 0.838, 0.861])
    assert [cxr14["MedKLIP (Table 7, fine-tuned)"].values[("cxr14_ft", f, "auc")] for f in (0.01, 0.1, 1.0)] == \
        pytest.approx([0.772, 0.789, 0.832])
    # named apart from Table 3's G2D row, so the two settings' CXR14 numbers do not collide in one row
    merged = {(row.method, row.profile): row for row in load_references(REFERENCE)}
    assert merged["G2D", "canonical"].values[("cxr14_ft", 0.01, "auc")] == pytest.approx(0.791)
    assert math.isclose(merged["G2D (Table 7, fine-tuned)", "canonical"].values[("cxr14_ft", 0.01, "auc")], 0.804)
    assert merged["G2D (Table 7, fine-tuned)", "paper"].tables[("rsna_seg_ft", 0.1, "dice")] == "Table 7"
