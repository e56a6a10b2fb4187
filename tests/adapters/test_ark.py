"""Ark-6 / Ark+: the published containers load strictly, the teacher is read, the encoder reproduces timm's Swin
(loaded through timm's own converter for original-layout files) and Ark's projector embedding."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

from vlpbench.adapters import adapter_names
from vlpbench.adapters.ark import HEADS_REASON, MASK_REASON, SMP_NAMES, ArkAdapter
from vlpbench.cli import main
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing.ark import ark_state, tiny_swin, training_checkpoint

# Ark+ in small: window 3 at 96 px (stages 24, 12, 6, 3: the last no larger than its window, so unshifted), linear
# projector. Ark-6 in small: window 7 at 224 px, MLP projector.
PLUS = {"img_size": 96, "window_size": 3}
SIX = {"img_size": 224, "window_size": 7}
# Per tiny Swin (4 stages of 2 blocks): 4 patch-embedding keys, 13 weights per block, 3 per patch merging, 2 final norm.
BACKBONE_KEYS = 4 + 13 * 8 + 3 * 3 + 2


@pytest.fixture(scope="module")
def plus(tmp_path_factory):
    """An Ark+-layout training checkpoint (module.-prefixed teacher and student), its teacher state and model."""
    model = tiny_swin(**PLUS)
    teacher = ark_state(model)
    student = ark_state(tiny_swin(**PLUS, seed=1), seed=1)
    path = tmp_path_factory.mktemp("ark") / "Ark6_swinLarge768_ep50.pth.tar"
    torch.save(training_checkpoint(teacher, student), path)
    return path, teacher, student


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """An Ark-6-layout file: the teacher's state dict alone, MLP projector."""
    teacher = ark_state(tiny_swin(**SIX), projector="mlp")
    path = tmp_path_factory.mktemp("ark") / "ark6_teacher_ep200_swinb_projector1376_mlp.pth.tar"
    torch.save(teacher, path)
    return path, teacher


def reference(teacher: dict[str, torch.Tensor], config: dict) -> SwinTransformer:
    """A fresh timm Swin holding the file's backbone, converted by timm's own checkpoint_filter_fn."""
    model = tiny_swin(**config, seed=7)
    backbone = {k: v for k, v in teacher.items() if not k.startswith(("projector.", "omni_heads."))}
    model.load_state_dict(checkpoint_filter_fn(backbone, model))
    return model.eval()


def test_training_checkpoint_loads_the_teacher_strictly(plus):
    path, teacher, _ = plus
    adapter = ArkAdapter(path)
    report = adapter.report
    assert report.ok and report.layout.startswith("ark (unwrapped 'teacher') (stripped 'module.')")
    assert len(report.mapped) == BACKBONE_KEYS + 2  # + projector weight and bias
    assert report.ignored[MASK_REASON] == [f"module.layers.{i}.blocks.1.attn_mask" for i in range(3)]
    assert len(report.ignored[HEADS_REASON]) == 12
    assert dict(report.mapped)["module.layers.0.downsample.reduction.weight"] == \
        "encoder.model.layers_1.downsample.reduction.weight"
    assert (adapter.image_size, adapter.mean, adapter.arch.window_size) == (96, (0.485, 0.456, 0.406), 3)
    state = adapter.encoder().state_dict()
    assert torch.equal(state["swin.model.layers_2.downsample.reduction.weight"],
                       teacher["layers.1.downsample.reduction.weight"])
    assert torch.equal(state["projector.weight"], teacher["projector.weight"])


def test_student_is_read_only_on_request(plus):
    path, _, student = plus
    adapter = ArkAdapter(path, weights="student")
    assert "state_dict" in adapter.report.layout
    assert torch.equal(adapter.encoder().state_dict()["norm.weight"], student["norm.weight"])
    with pytest.raises(ConfigError, match="option weights='ema'; expected one of teacher, student"):
        ArkAdapter(path, weights="ema")


def test_encoder_reproduces_timm_swin_and_arks_embedding(plus):
    path, teacher, _ = plus
    encoder = ArkAdapter(path).encoder().eval()
    ref = reference(teacher, PLUS)
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = encoder(images)
        embedding = encoder(images, output="pooled")
        stages = ref.forward_intermediates(images, indices=4, norm=False, intermediates_only=True)
        pooled = ref.forward_head(ref.forward_features(images), pre_logits=True)
    assert encoder.out_channels == (3, 0, 16, 32, 64, 128)
    assert [tuple(m.shape[1:]) for m in maps[2:]] == [(16, 24, 24), (32, 12, 12), (64, 6, 6), (128, 3, 3)]
    for got, want in zip(maps[2:], stages):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    expected = pooled @ teacher["projector.weight"].T + teacher["projector.bias"]
    assert embedding.shape == (2, encoder.pooled_channels) == (2, 24)
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=1e-5)


def test_ark6_flat_file_with_mlp_projector(six):
    path, teacher = six
    adapter = ArkAdapter(path)
    assert adapter.report.ok and adapter.report.layout == "ark (swin 16-wide, window 7, 224 px, teacher)"
    assert adapter.image_size == 224 and adapter.describe()["projector"] == "mlp"
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    ref = reference(teacher, SIX)
    with torch.no_grad():
        pooled = ref.forward_head(ref.forward_features(images), pre_logits=True)
        hidden = torch.relu(pooled @ teacher["projector.0.weight"].T + teacher["projector.0.bias"])
        expected = hidden @ teacher["projector.2.weight"].T + teacher["projector.2.bias"]
        embedding = adapter.encoder().eval()(images, output="pooled")
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="state_dict"):
        ArkAdapter(path, weights="student")  # the flat file is the teacher alone


def test_norm_pool_is_the_swins_pooled_feature(plus):
    path, teacher, _ = plus
    adapter = ArkAdapter(path, pool="norm")
    assert adapter.report.ok and adapter.pool_description.startswith("norm:")
    assert any("pool=norm" in reason for reason in adapter.report.ignored)
    encoder = adapter.encoder().eval()
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    ref = reference(teacher, PLUS)
    with torch.no_grad():
        pooled = ref.forward_head(ref.forward_features(images), pre_logits=True)
        got = encoder(images, output="pooled")
    assert encoder.pooled_channels == 128 and encoder.projector is None
    torch.testing.assert_close(got, pooled, atol=1e-5, rtol=1e-5)


def test_renamed_key_is_named(tmp_path, six):
    _, teacher = six
    state = dict(teacher)
    state["layers.2.blocks.1.attn.qkv_weight"] = state.pop("layers.2.blocks.1.attn.qkv.weight")
    torch.save(state, tmp_path / "renamed.pth.tar")
    report = ArkAdapter.inspect(tmp_path / "renamed.pth.tar")
    assert report.missing == ["layers.2.blocks.1.attn.qkv.weight"]
    assert report.unexpected == ["layers.2.blocks.1.attn.qkv_weight"]
    with pytest.raises(CheckpointError, match=r"layers\.2\.blocks\.1\.attn\.qkv_weight"):
        ArkAdapter(tmp_path / "renamed.pth.tar")


def test_masks_of_another_size_are_mismatched(tmp_path, six):
    _, teacher = six
    state = dict(teacher)
    state["layers.1.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)  # 224 px has 16 windows in stage 1
    torch.save(state, tmp_path / "masks.pth.tar")
    report = ArkAdapter.inspect(tmp_path / "masks.pth.tar")
    assert report.mismatched == [("layers.1.blocks.1.attn_mask", (16, 49, 49), (4, 49, 49))]


def test_projector_pool_needs_a_projector(tmp_path, six):
    _, teacher = six
    torch.save({k: v for k, v in teacher.items() if not k.startswith("projector.")}, tmp_path / "bare.pth.tar")
    with pytest.raises(ConfigError, match="pool=norm"):
        ArkAdapter(tmp_path / "bare.pth.tar")
    assert ArkAdapter(tmp_path / "bare.pth.tar", pool="norm").report.ok


def test_models_lists_ark(capsys):
    assert "ark" in adapter_names()
    assert main(["models", "--verbose"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("ark "):].split("\n\n")[0]
    assert "input:        224² px, 3 channel(s), mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in block
    assert "pre-trained:  mimic_cxr" in block and "vindr" in block


def test_ark_plus_published_shape_reads_as_swin_l_at_768():
    # Ark+'s model (Ark_Plus/Pretraining/models.py:89-90) on the meta device: shapes only, no weights drawn.
    with torch.device("meta"):
        model = SwinTransformer(img_size=768, patch_size=4, window_size=12, embed_dim=192, depths=(2, 2, 18, 2),
                                num_heads=(6, 12, 24, 48))
    weights = ArkAdapter.map_weights(ark_state(model, projector_features=1376), {"weights": "teacher",
                                                                                "pool": "projector"})
    assert weights.report.ok, weights.report.format()
    assert weights.report.layout == "ark (swin 192-wide, window 12, 768 px, teacher)"
    # 4 + 13 per block (24) + 3 per merging (3) + final norm (2), and the projector's weight and bias.
    assert len(weights.report.mapped) == 4 + 13 * 24 + 3 * 3 + 2 + 2
    # Every odd block of every stage is shifted at 768 px (the last stage, 24 tokens wide, exceeds its window).
    assert len(weights.report.ignored[MASK_REASON]) == 1 + 1 + 9 + 1
    assert weights.extra["image_size"] == 768 and SMP_NAMES[weights.extra["arch"].embed_dim].endswith("window12_384")
