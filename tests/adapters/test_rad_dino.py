"""RAD-DINO: the Hugging Face folder and the DINOv2-repository layout, key by key, against transformers' own
Dinov2Model (and timm's DINOv2-layout ViT for the repository keys); its input contract; the dense path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlpbench import api
from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import CapabilityError
from vlpbench.adapters.rad_dino import RadDinoAdapter
from vlpbench.cli import main
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing.hf_vit import write_rad_dino_folder

HIDDEN, LAYERS, PATCH, SIZE = 32, 2, 14, 56
MEAN, STD = (0.52, 0.53, 0.54), (0.25, 0.26, 0.27)  # distinct per channel, so a swap or a default shows


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_rad_dino_folder(tmp_path_factory.mktemp("rad_dino"), seed=3, mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def adapter(folder):
    return RadDinoAdapter(folder)


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(folder, local_files_only=True).eval()


def _copy(folder: Path, target: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """``folder``'s config and image processor in ``target``, with ``state`` (default: the same weights)."""
    target.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (target / name).write_text((folder / name).read_text())
    save_file(load_file(folder / "model.safetensors") if state is None else state, target / "model.safetensors")
    return target


def test_every_key_of_the_folder_is_mapped(adapter, folder):
    saved = load_file(folder / "model.safetensors")
    report = adapter.report
    assert report.ok and not report.ignored
    assert sorted(source for source, _ in report.mapped) == sorted(saved)
    # 5 embedding keys; per block 18: two norms, q, k, v, the output projection and two MLP layers (weight and
    # bias each), two LayerScales; the final norm.
    assert len(saved) == 5 + 18 * LAYERS + 2
    assert report.layout == "dinov2-hf (model.safetensors)"
    assert adapter.capabilities == {"features"}


def test_inspect_reads_the_folder(folder, capsys):
    assert main(["inspect", "--model", "rad_dino", "--checkpoint", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "sha256: (a folder: see a run's record)" in out and "mapped: 43 keys" in out


def test_encoder_equals_transformers_forward_at_the_native_and_an_interpolated_size(adapter, reference):
    encoder = adapter.encoder().eval()
    for side in (SIZE, 2 * SIZE):  # 112: the position embedding resampled from 4x4 to 8x8 patches
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        with torch.no_grad():
            expected = reference(pixel_values=x, output_hidden_states=True)
            pooled = encoder(x, output="pooled")
        torch.testing.assert_close(pooled, expected.pooler_output, rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, expected.last_hidden_state[:, 0], rtol=0, atol=1e-5)


def test_taps_are_the_patch_tokens_resampled_to_stride_16(adapter, reference):
    encoder = adapter.encoder().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values=x, output_hidden_states=True)
        taps = encoder(x, output="taps")
        maps = encoder(x)
    # blocks (0, 0, 0, 1) of a 2-block ViT; the last after the final LayerNorm; 16x16 patches resampled to 14x14
    sources = [expected.hidden_states[1]] * 3 + [expected.last_hidden_state]
    for tap, tokens in zip(taps, sources):
        grid = tokens[:, 1:].transpose(1, 2).reshape(1, HIDDEN, 16, 16)
        torch.testing.assert_close(tap, F.interpolate(grid, size=(14, 14), mode="bilinear", align_corners=False),
                                   rtol=0, atol=1e-5)
    assert [tuple(m.shape[1:]) for m in maps] == [(3, 224, 224), (0, 112, 112), (HIDDEN, 56, 56), (HIDDEN, 28, 28),
                                                  (HIDDEN, 14, 14), (HIDDEN, 7, 7)]
    assert encoder.pyramid == "feature2pyramid(0,0,0,1; taps resampled from stride 14 to 16)"
    with pytest.raises(ConfigError, match="divisible by 112"):
        encoder(torch.zeros(1, 3, 64, 64))


def test_the_folders_image_processor_is_the_input_contract(adapter, folder):
    from transformers import AutoImageProcessor

    assert (adapter.image_size, adapter.mean, adapter.std) == (SIZE, MEAN, STD)
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    expected = AutoImageProcessor.from_pretrained(folder, local_files_only=True)(
        images=[np.repeat(image[..., None], 3, axis=2)], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(adapter.preprocess(torch.from_numpy(image)[None, None]), expected, rtol=0, atol=1e-5)
    assert adapter.describe()["input_contract"] == {"image_size": SIZE, "mean": MEAN, "std": STD,
                                                    "processor": "BitImageProcessor", "resample": 3}


@pytest.mark.parametrize("settings, message", [
    ({"rescale_factor": 1.0}, "rescale_factor is 1.0"),
    ({"crop_size": {"height": 48, "width": 48}}, "size .* then crop_size .* cuts the border off"),
    ({"crop_size": {"height": 56, "width": 48}}, "crop_size is .* expected a square size"),
    ({"image_std": [0.2, 0.0, 0.2]}, "image_std is .* positive"),
    ({"image_mean": [0.5, 0.5]}, "image_mean is .* a list of three"),
])
def test_image_processor_settings_vlpbench_cannot_reproduce_are_refused(folder, tmp_path, settings, message):
    target = _copy(folder, tmp_path / "folder")
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    (target / "preprocessor_config.json").write_text(json.dumps({**processor, **settings}))
    with pytest.raises(CheckpointError, match=f"preprocessor_config.json: {message}"):
        RadDinoAdapter(target)


def test_a_missing_or_an_extra_key_is_named(folder, tmp_path):
    state = load_file(folder / "model.safetensors")
    missing = {k: v for k, v in state.items() if k != "encoder.layer.1.layer_scale2.lambda1"}
    with pytest.raises(CheckpointError, match=r"missing: 1 keys\n  - encoder.layer.1.layer_scale2.lambda1"):
        RadDinoAdapter(_copy(folder, tmp_path / "missing", missing))
    extra = {**state, "embeddings.register_tokens": torch.zeros(1, 4, HIDDEN)}
    with pytest.raises(CheckpointError, match=r"unexpected: 1 keys\n  - embeddings.register_tokens"):
        RadDinoAdapter(_copy(folder, tmp_path / "extra", extra))


def _repo_state(seed: int) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """A DINOv2-repository state dict from timm's ViT in that layout (LayerScale ``ls1/ls2.gamma``, fused qkv),
    with the repository's ``mask_token``; and the timm model (the reference forward)."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=HIDDEN, depth=LAYERS, num_heads=2,
                                init_values=1.0, num_classes=0).eval()
        with torch.no_grad():
            for name, parameter in vit.named_parameters():
                if name.endswith("gamma"):
                    parameter.uniform_(0.5, 1.5)
        state = {**vit.state_dict(), "mask_token": torch.rand(1, HIDDEN)}
    return state, vit


def test_dinov2_repository_layout_runs_as_timm_runs_it(folder, tmp_path):
    state, vit = _repo_state(seed=5)
    target = _copy(folder, tmp_path / "repo")
    save_file(state, target / "backbone_compatible.safetensors")
    adapter = RadDinoAdapter(target / "backbone_compatible.safetensors")
    assert adapter.report.layout == "dinov2-repo (backbone_compatible.safetensors)"
    assert sorted(source for source, _ in adapter.report.mapped) == sorted(state)
    # the fused qkv feeds the query, key and value projections of the same block (named as the module names them)
    qkv = dict(adapter.report.mapped)["blocks.1.attn.qkv.weight"].split(", ")
    assert len(qkv) == 3 and all(k.startswith("encoder.layer.1.attention.") and k.endswith(".weight") for k in qkv)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled = adapter.encoder().eval()(x, output="pooled")
        expected = vit.forward_features(x)[:, 0]  # class token after the final norm
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)
    assert adapter.checkpoint_path == str(target / "backbone_compatible.safetensors")


def test_chunked_blocks_load_as_the_flat_ones_and_registers_are_refused(folder, tmp_path):
    state, _ = _repo_state(seed=5)
    flat = RadDinoAdapter(_write(folder, tmp_path / "flat", state))
    # block_chunks=2 over 2 blocks: chunk 0 holds block 0, chunk 1 an identity then block 1 (same index N).
    chunked = {k.replace("blocks.0.", "blocks.0.0.").replace("blocks.1.", "blocks.1.1."): v for k, v in state.items()}
    adapter = RadDinoAdapter(_write(folder, tmp_path / "chunked", chunked))
    assert adapter.report.layout == "dinov2-repo (block chunks flattened) (backbone.safetensors)"
    assert all(torch.equal(adapter._encoder_state[k], v) for k, v in flat._encoder_state.items())
    with pytest.raises(CheckpointError, match=r"unexpected: 1 keys\n  - register_tokens"):
        RadDinoAdapter(_write(folder, tmp_path / "registers", {**state, "register_tokens": torch.zeros(1, 4, HIDDEN)}))


def _write(folder: Path, target: Path, state: dict[str, torch.Tensor]) -> Path:
    target = _copy(folder, target)
    save_file(state, target / "backbone.safetensors")
    return target / "backbone.safetensors"


def test_other_folders_are_refused_naming_the_field(folder, tmp_path):
    target = _copy(folder, tmp_path / "swiglu")
    config = json.loads((folder / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "use_swiglu_ffn": True}))
    with pytest.raises(CheckpointError, match="use_swiglu_ffn is true"):
        RadDinoAdapter(target)
    (target / "config.json").write_text(json.dumps({**config, "model_type": "siglip"}))
    with pytest.raises(CheckpointError, match="model_type is 'siglip'; adapter 'rad_dino' reads 'dinov2'"):
        RadDinoAdapter(target)
    with pytest.raises(CheckpointError, match="has no config.json"):
        RadDinoAdapter(tmp_path)
    with pytest.raises(CapabilityError, match="embed_text \\(RAD-DINO has no text encoder"):
        build_adapter("rad_dino", folder).require("embed_image", "embed_text")  # as the zero-shot protocol asks


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "rsna"
    api.synth("rsna", root, n=30, size=64, progress=False)
    return root


def test_rsna_detection_runs_from_the_cli_at_224(folder, rsna_root, tmp_path):
    argv = ["-q", "run", "--model", "rad_dino", "--checkpoint", str(folder), "--task", "rsna_det", "--frac", "1.0",
            "--data-root", str(rsna_root), "--results", str(tmp_path), "--device", "cpu"]
    for setting in ("image_size=224", "max_epochs=1", "batch_size=8", "neck_width=32", "bootstrap_resamples=20"):
        argv += ["--set", setting]
    assert main(argv) == 0
    (path,) = tmp_path.glob("runs/**/rsna_det.v1/*.json")
    record = json.loads(path.read_text())
    assert 0.0 <= record["metrics"]["map"] <= 1.0 and record["n"]["test"] > 0
    model = record["model"]
    assert model["pyramid"] == "feature2pyramid(0,0,0,1; taps resampled from stride 14 to 16)"
    assert model["configuration"]["files"] == ["config.json", "preprocessor_config.json"]
    assert model["pretraining_data"] == ["mimic_cxr", "chexpert", "cxr14"]
