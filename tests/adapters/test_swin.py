"""Swin backbones: HF SwinModel weights as smp's timm Swin encoder (exact at 224 px, any input size), real timm
state dicts through ``generic``, and Swin encoders under the segmentation, detection and linear protocols."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from transformers import SwinConfig

from vlpbench import api
from vlpbench.adapters import swin
from vlpbench.adapters.base import LoadReport
from vlpbench.adapters.generic import GenericAdapter
from vlpbench.cli import main
from vlpbench.testing import write_tiny_bert_folder
from vlpbench.testing.hf import cxrclip_checkpoint, hf_swin_model, swin_v4_state, tiny_bert, tiny_swin_config

# transformers 4.x SwinModel of microsoft/swin-tiny-patch4-window7-224 (SwinConfig() defaults): 4 embedding
# keys, 17 weights in each of 12 blocks, 3 per patch merging (3 of them), the final layernorm: 219 weights,
# plus one persistent relative_position_index buffer per block.
SWIN_TINY_WEIGHTS, SWIN_TINY_BLOCKS = 4 + 17 * 12 + 3 * 3 + 2, 12
# smp's tu-swin_tiny_patch4_window7_224 encoder: timm's feature extractor without the final norm and head.
SMP_SWIN_TINY_KEYS = 169
SWIN_TINY_CHANNELS = (3, 0, 96, 192, 384, 768)


@pytest.fixture(scope="module")
def tiny():
    """A tiny SwinModel (random init, seed 0), its 4.x-named state dict, and the converted smp encoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = hf_swin_model(tiny_swin_config()).eval()
    report = LoadReport("swin")
    arch, encoder_state, norm_state = swin.match_hf_swin(swin_v4_state(model), report, source_prefix="")
    assert report.ok, report.format()
    encoder = swin.build_swin_encoder(swin.SWIN_ENCODER_NAME, encoder_state, arch.timm_kwargs()).eval()
    return model, arch, encoder, swin.final_norm(arch, norm_state)


def test_published_swin_tiny_layout_is_the_4x_swinmodel():
    with torch.device("meta"):
        state = swin_v4_state(hf_swin_model(SwinConfig()))
    weights = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("relative_position_index")}
    assert weights == swin.hf_swin_shapes(swin.SwinArch.swin_tiny())
    assert len(weights) == SWIN_TINY_WEIGHTS and len(state) == SWIN_TINY_WEIGHTS + SWIN_TINY_BLOCKS
    arch, absent = swin.read_hf_swin_arch(state)
    assert arch == swin.SwinArch.swin_tiny() and absent == []
    shapes = swin.swin_encoder_shapes(arch)
    assert len(shapes) == SMP_SWIN_TINY_KEYS
    encoder_state, _ = swin.hf_to_smp_swin({k: torch.empty(v, device="meta") for k, v in weights.items()})
    assert {k: tuple(v.shape) for k, v in encoder_state.items()} == dict(shapes)


def test_converted_encoder_reproduces_swinmodel_at_224(tiny):
    model, _, encoder, norm = tiny
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(pixel_values=images)
        tokens = swin.swin_tokens(encoder, norm, images)
    assert tokens.shape == (2, 7, 7, 64)
    torch.testing.assert_close(tokens.flatten(1, 2), reference.last_hidden_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens.mean(dim=(1, 2)), reference.pooler_output, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [256, 416])
def test_encoder_runs_each_size_as_a_swin_built_for_it(tiny, size):
    _, arch, encoder, _ = tiny
    built = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, features_only=True, img_size=size,
                              **arch.timm_kwargs()).eval()
    built.load_state_dict({k.removeprefix("model."): v for k, v in encoder.state_dict().items()})
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = encoder(images)
        expected = [f.permute(0, 3, 1, 2) for f in built(images)]
    assert [tuple(f.shape[1:]) for f in features[2:]] == [tuple(f.shape[1:]) for f in expected]
    for got, want in zip(features[2:], expected):
        torch.testing.assert_close(got, want)
    stage4 = [m for m in encoder.modules() if isinstance(m, timm.models.swin_transformer.SwinTransformerStage)][-1]
    assert stage4.blocks[1].shift_size == (3, 3)  # 8 or 13 > 7: shifted windows in the last stage too


def test_encoder_below_224_keeps_the_trained_windows(tiny):
    _, _, encoder, _ = tiny
    tables = {k: v.clone() for k, v in encoder.state_dict().items() if k.endswith("relative_position_bias_table")}
    with torch.no_grad():
        features = encoder(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [(3, 64, 64), (0, 32, 32), (8, 16, 16), (16, 8, 8),
                                                      (32, 4, 4), (64, 2, 2)]
    after = encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in tables.items())


def test_renamed_swin_key_is_named():
    with torch.device("meta"):
        state = swin_v4_state(hf_swin_model(tiny_swin_config()))
    key = "encoder.layers.2.blocks.1.attention.self.query.weight"
    state["encoder.layers.2.blocks.1.attention.self.q.weight"] = state.pop(key)
    report = LoadReport("swin")
    swin.match_hf_swin(state, report, source_prefix="vision_model.model.")
    assert report.missing == ["vision_model.model." + key]
    assert report.unexpected == ["vision_model.model.encoder.layers.2.blocks.1.attention.self.q.weight"]


@pytest.mark.parametrize("name, mapped, ignored", [
    ("swin_tiny_patch4_window7_224", SMP_SWIN_TINY_KEYS, 4),  # norm (tail) + head.fc
    ("convnext_tiny", 178, 4),  # head.norm + head.fc
])
def test_generic_loads_real_timm_state_dicts(tmp_path, name, mapped, ignored):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = timm.create_model(name, pretrained=False).state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    adapter = GenericAdapter(path, arch=f"tu-{name}")
    report = adapter.report
    assert report.ok and len(report.mapped) == mapped
    assert sum(len(keys) for keys in report.ignored.values()) == ignored
    source = "layers.1.downsample.reduction.weight" if name.startswith("swin") else "stages.1.downsample.1.weight"
    target = dict(report.mapped)[source]
    assert target == "encoder.model." + source.replace(".", "_", 1)
    encoder = adapter.encoder()
    assert torch.equal(encoder.state_dict()[target.removeprefix("encoder.")], state[source])


# --- the protocols on a Swin encoder (CXR-CLIP Swin-T layout, text side ignored) --------------------------

SEG = {"image_size": 32, "max_epochs": 1, "patience": 1, "batch_size": 8, "bootstrap_resamples": 50}
DET = {"image_size": 64, "max_epochs": 1, "patience": 1, "neck_width": 32, "bootstrap_resamples": 50}
LINEAR = {"resize_size": 64, "image_size": 64, "max_epochs": 2, "patience": 2, "bootstrap_resamples": 50}


@pytest.fixture(scope="module")
def swint_checkpoint(tmp_path_factory):
    """A CXR-CLIP swint_mc.tar-layout file with a full-size Swin-T (the U-Net is built for its channels)."""
    folder = tmp_path_factory.mktemp("bert")
    write_tiny_bert_folder(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        payload = cxrclip_checkpoint(hf_swin_model(SwinConfig()), tiny_bert(str(folder)), swin=True)
    path = tmp_path_factory.mktemp("ckpt") / "swint_mc.tar"
    torch.save(payload, path)
    return path


def _run(task: str, checkpoint, data_root, results, overrides: dict) -> dict:
    argv = ["-q", "run", "--model", "cxrclip", "--checkpoint", str(checkpoint), "--task", task, "--frac", "1.0",
            "--data-root", str(data_root), "--results", str(results), "--device", "cpu"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    # Tiny tensors on shared cores: a second thread only adds synchronisation.
    assert main([*argv, "--threads", "1"]) == 0
    (path,) = results.rglob(f"{task}.v*/*.json")
    return json.loads(path.read_text())


def test_swin_segmentation_end_to_end(swint_checkpoint, siim_root, tmp_path):
    record = _run("siim_seg", swint_checkpoint, siim_root, tmp_path, SEG)
    assert record["model"]["layout"].startswith("cxrclip-swin")
    assert record["model"]["variant"]["code"] == "mc"
    assert 0.0 <= record["metrics"]["dice"] <= 1.0 and record["n"]["test"] > 0


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "rsna"
    api.synth("rsna", root, n=120, size=64, progress=False)
    return root


def test_swin_detection_end_to_end(swint_checkpoint, rsna_root, tmp_path):
    record = _run("rsna_det", swint_checkpoint, rsna_root, tmp_path, DET)
    stages = [(s["stride"], s["channels"]) for s in record["config"]["training"]["stages_used"]]
    assert stages == [(8.0, 192), (16.0, 384), (32.0, 768)]  # Swin-T's last three stages
    assert 0.0 <= record["metrics"]["map"] <= 1.0


def test_swin_linear_probe_end_to_end(swint_checkpoint, rsna_root, tmp_path):
    record = _run("rsna_cls", swint_checkpoint, rsna_root, tmp_path, LINEAR)
    assert 0.0 <= record["metrics"]["auc"] <= 1.0 and record["n"]["test"] > 0
