"""ViT backbones on every protocol: U-Net / YOLOv3 over a Feature2Pyramid neck, the backbone frozen and the neck
trained; the ViT's own pooling for the linear probe (in the feature-cache key); fine-tuning; ResNets unchanged."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn

from vlpbench import api
from vlpbench.adapters.transformer import ViTConfig, ViTEncoder
from vlpbench.cli import main
from vlpbench.protocols.detection import Detector, YoloHead, _feature_shapes, deepest_stages
from vlpbench.protocols.runtime import eval_backbone, freeze_backbone, head_name
from vlpbench.protocols.segmentation import UNet

PYRAMID = "feature2pyramid(3,5,7,11)"
TINY_VIT = ViTConfig(patch_size=16, embed_dim=64, depth=12, num_heads=1, image_size=64)


def _tiny_mrm(path: Path) -> Path:
    """MRM.pth's container around a 64-wide, 12-block MRM encoder built as model_mrm.py:35-44 (timm PatchEmbed
    and Block), with one decoder and one report-side key (ignored by the adapter)."""
    norm = functools.partial(nn.LayerNorm, eps=1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = nn.Module()
        encoder.patch_embed = PatchEmbed(64, 16, 3, 64)
        encoder.cls_token = nn.Parameter(torch.randn(1, 1, 64) * 0.02)
        encoder.pos_embed = nn.Parameter(torch.randn(1, 17, 64) * 0.02)
        encoder.blocks = nn.ModuleList(Block(64, 1, 4, qkv_bias=True, norm_layer=norm) for _ in range(12))
        encoder.norm = norm(64)
        state = {**encoder.state_dict(), "mask_token": torch.zeros(1, 1, 32), "bert_mlp.weight": torch.zeros(32, 64)}
    torch.save({"model": state, "epoch": 1, "args": None}, path)
    return path


@pytest.fixture(scope="module")
def mrm_checkpoint(tmp_path_factory) -> Path:
    return _tiny_mrm(tmp_path_factory.mktemp("mrm") / "MRM.pth")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    api.synth("rsna", root / "rsna", n=120, size=64, progress=False)
    api.synth("cxr14", root / "cxr14", n=80, size=64, progress=False)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation on shared cores
    yield
    torch.set_num_threads(threads)


def _run(task: str, checkpoint: Path, data_root: Path, results: Path, *settings: str, model: str = "mrm",
         options: tuple[str, ...] = ()) -> dict:
    argv = ["-q", "run", "--model", model, "--checkpoint", str(checkpoint), "--task", task, "--frac", "1.0",
            "--data-root", str(data_root), "--results", str(results), "--device", "cpu", "--overwrite",
            "--threads", "1"]
    for option in options:
        argv += ["--model-option", option]
    for setting in ("image_size=64", "max_epochs=2", "patience=2", "bootstrap_resamples=20", *settings):
        argv += ["--set", setting]
    assert main(argv) == 0
    (path,) = results.glob(f"runs/**/{task}.v1/*.json")
    return json.loads(path.read_text())


def test_siim_segmentation_runs_unet_over_the_pyramid(mrm_checkpoint, siim_root, tmp_path):
    record = _run("siim_seg", mrm_checkpoint, siim_root, tmp_path, "batch_size=8")
    training = record["config"]["training"]
    assert training["head"] == f"unet over {PYRAMID}" and training["epochs"] == 2
    assert record["model"]["adapter"] == "mrm" and record["model"]["layout"].startswith("mrm-vit-w64-d12-p16-64")
    assert 0.0 <= record["metrics"]["dice"] <= 1.0 and record["n"]["test"] > 0


def test_rsna_detection_caches_taps_and_trains_the_neck_with_the_head(mrm_checkpoint, data, tmp_path):
    record = _run("rsna_det", mrm_checkpoint, data / "rsna", tmp_path, "neck_width=32")
    training = record["config"]["training"]
    assert training["head"] == f"yolov3 over {PYRAMID}"
    assert [(s["stride"], s["channels"]) for s in training["stages_used"]] == [(8.0, 64), (16.0, 64), (32.0, 64)]
    memory, batch = {"storage": "memory", "dtype": "float32"}, {"storage": "batch", "dtype": "float32"}
    assert training["features"] == {"train": memory, "val": memory, "test": batch}
    assert record["metrics"]["map"] is not None


def test_rsna_linear_probe_pools_as_the_paper_and_keys_the_cache_by_it(mrm_checkpoint, data, tmp_path):
    first = _run("rsna_cls", mrm_checkpoint, data / "rsna", tmp_path / "a", "resize_size=64")
    assert first["config"]["training"]["pool"].startswith("mean: ")
    assert first["config"]["training"]["feature_cache"]["test"] == "miss"
    again = _run("rsna_cls", mrm_checkpoint, data / "rsna", tmp_path / "b", "resize_size=64")
    assert again["config"]["training"]["feature_cache"]["test"] == "hit"
    cls = _run("rsna_cls", mrm_checkpoint, data / "rsna", tmp_path / "c", "resize_size=64", options=("pool=cls",))
    assert cls["config"]["training"]["pool"].startswith("cls: ")
    assert cls["config"]["training"]["feature_cache"]["test"] == "miss"  # another pooling, another cache entry
    assert cls["metrics"]["auc"] != first["metrics"]["auc"]


def test_cxr14_finetune_trains_the_whole_vit(mrm_checkpoint, data, tmp_path):
    record = _run("cxr14_ft", mrm_checkpoint, data / "cxr14", tmp_path, "batch_size=16", "lr=1e-3", "max_epochs=3",
                  "patience=3")
    history = record["config"]["training"]["history"]
    assert record["config"]["training"]["pool"].startswith("mean: ")
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_the_backbone_stays_frozen_and_the_neck_trains():
    torch.manual_seed(0)
    model = UNet(ViTEncoder(TINY_VIT), "vit")
    encoder = model.unet.encoder
    freeze_backbone(encoder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    eval_backbone(encoder)
    assert not encoder.backbone.training and encoder.neck.training
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and not any(k.startswith("unet.encoder.backbone.") for k in changed)
    assert any(k.startswith("unet.encoder.neck.") for k in changed)
    assert any(k.startswith("unet.decoder.") for k in changed)


def test_detection_head_runs_the_neck_levels_on_the_cached_taps():
    torch.manual_seed(0)
    encoder = ViTEncoder(TINY_VIT).eval()
    detector = Detector(encoder, deepest_stages(encoder, 64), 32)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        taps = detector.features(x)
        full = encoder(x)
        assert [tuple(t.shape) for t in taps] == [(2, 64, 4, 4)] * 3  # blocks 5, 7, 11: cheaper than the maps
        assert [tuple(t.shape[1:]) for t in full[3:]] == [(64, 8, 8), (64, 4, 4), (64, 2, 2)]
        for ours, reference in zip(detector.head(taps), detector.head.yolo(full[3:])):
            torch.testing.assert_close(ours, reference)
    trained = {id(p) for p in detector.head.parameters()}
    assert trained >= {id(p) for p in encoder.neck.levels[1:].parameters()}
    assert not any(p.requires_grad for p in encoder.backbone.parameters())


def test_resnet_encoders_take_the_unchanged_path():
    """For an smp encoder the convention is a no-op: everything frozen, the whole encoder in eval, the head named
    plainly, smp's own U-Net, the YOLO head on the maps themselves (kept features of the stage shapes). The
    records of a ResNet siim_seg / rsna_det / rsna_cls run were also compared with the code before the ViT
    changes (commit 23eb43e): metrics, histories and per-image values identical."""
    import segmentation_models_pytorch as smp
    from segmentation_models_pytorch.encoders import get_encoder

    encoder = get_encoder("resnet18", weights=None)
    freeze_backbone(encoder)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    eval_backbone(encoder)
    assert not any(m.training for m in encoder.modules())
    assert head_name(encoder, "unet") == "unet"
    assert isinstance(UNet(get_encoder("resnet18", weights=None), "resnet18").unet, smp.Unet)
    stages = deepest_stages(encoder, 64)
    detector = Detector(encoder, stages, 32)
    assert type(detector.head) is YoloHead and detector.tap_indices is None
    assert _feature_shapes(detector, 64, torch.device("cpu")) == [stage.shape for stage in stages]
