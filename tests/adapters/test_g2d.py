"""G2D adapter: the three published checkpoint layouts, written at random init, and wrong layouts."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch

from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import unet_decoder_shapes
from vlpbench.adapters.g2d import (
    PSEUDO_CONV_REASON,
    TEXT_SIDE_PREFIXES,
    TEXT_SIDE_REASON,
    TRAINING_STATE_REASON,
    G2DAdapter,
)
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import write_g2d_checkpoint

LAYOUTS = ("encoder", "encoder_decoder", "pretrain")
# Where the image encoder sits inside each layout's (model) state dict.
ENCODER_PREFIX = {"encoder": "", "encoder_decoder": "encoder.", "pretrain": "img_model.encoder."}
FEATURE_SHAPES = [(1, 3, 64, 64), (1, 64, 32, 32), (1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4), (1, 2048, 2, 2)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One random-init file per layout, all seed 0 (the pretrain file with one BERT layer)."""
    folder = tmp_path_factory.mktemp("g2d")
    return {
        "encoder": write_g2d_checkpoint(folder / "g2d_encoder.pth", "encoder"),
        "encoder_decoder": write_g2d_checkpoint(folder / "g2d_encoder_decoder.pth", "encoder_decoder"),
        "pretrain": write_g2d_checkpoint(folder / "g2d_50_checkpoint.pth", "pretrain", text_layers=1),
    }


@pytest.fixture(scope="module")
def adapters(files):
    """A G2D adapter per layout."""
    return {layout: G2DAdapter(path) for layout, path in files.items()}


def _model_state(obj):
    return obj["model_state_dict"] if "model_state_dict" in obj else obj


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("layout,n_mapped", [("encoder", 318), ("encoder_decoder", 380), ("pretrain", 392)])
def test_each_published_layout_loads(adapters, files, layout, n_mapped):
    adapter = adapters[layout]
    assert adapter.report.ok
    assert adapter.report.layout == layout
    assert len(adapter.report.mapped) == n_mapped
    assert adapter.checkpoint_path == str(files[layout])
    assert ("decoder" in adapter.capabilities) == (layout != "encoder")
    assert adapter.describe()["load_report"]["mapped"] == n_mapped


def test_pretrain_ignores_text_side_and_training_state(adapters):
    report = adapters["pretrain"].report
    assert set(report.ignored) == {TEXT_SIDE_REASON, TRAINING_STATE_REASON, PSEUDO_CONV_REASON}
    assert report.ignored[TRAINING_STATE_REASON] == ["epoch", "optimizer_state_dict"]
    assert report.ignored[PSEUDO_CONV_REASON] == ["pseudo_conv.weight", "pseudo_conv.bias"]
    text = report.ignored[TEXT_SIDE_REASON]
    # Without option text_encoder: 1 BERT layer (5 embedding + 16 layer + 2 pooler keys) and proj_t 5.
    assert len(text) == 23 + 5
    assert all(k.startswith(TEXT_SIDE_PREFIXES) for k in text)
    assert "lm_model.embeddings.word_embeddings.weight" in text
    # The image heads (proj_v 5, attnpool 7) are mapped for embed_image / dense_embed.
    assert ("attnpool.positional_embedding", "attnpool.positional_embedding") in report.mapped
    assert ("img_model.decoder.blocks.0.conv1.0.weight", "decoder.blocks.0.conv1.0.weight") in report.mapped
    assert ("img_model.encoder.conv1.weight", "encoder.conv1.weight") in report.mapped


@pytest.mark.parametrize("layout", LAYOUTS)
def test_encoder_holds_the_checkpoint_weights(adapters, files, layout):
    state = _model_state(_load(files[layout]))
    prefix = ENCODER_PREFIX[layout]
    encoder = adapters[layout].encoder()
    loaded = encoder.state_dict()
    assert len(loaded) == 318
    for key in ("conv1.weight", "bn1.running_var", "layer3.5.conv2.weight", "layer4.2.conv3.weight"):
        assert torch.equal(loaded[key], state[prefix + key]), key
    assert all(torch.equal(loaded[k], state[prefix + k]) for k in loaded)

    with torch.no_grad():
        features = encoder.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == FEATURE_SHAPES


@pytest.mark.parametrize("layout", ["encoder_decoder", "pretrain"])
def test_decoder_state_dict_is_the_checkpoint_decoder_and_loads_into_unet(adapters, files, layout):
    adapter = adapters[layout]
    state = _model_state(_load(files[layout]))
    prefix = "img_model." if layout == "pretrain" else ""
    decoder = adapter.decoder_state_dict()
    assert set(decoder) == set(unet_decoder_shapes())
    assert all(torch.equal(v, state[prefix + k]) for k, v in decoder.items())

    unet = smp.Unet("resnet50", encoder_weights=None, in_channels=3, classes=1)
    encoder = {f"encoder.{k}": v for k, v in adapter.encoder().state_dict().items()}
    result = unet.load_state_dict({**encoder, **decoder}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = unet.state_dict()
    assert len(loaded) == 380
    assert all(torch.equal(loaded[k], state[prefix + k]) for k in loaded)
    with torch.no_grad():
        assert unet.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_encoder_layout_has_no_decoder(adapters):
    assert adapters["encoder"].decoder_state_dict() is None
    assert adapters["encoder"].capabilities == frozenset({"features"})
    assert G2DAdapter.capabilities == frozenset({"features", "decoder", "embed_image", "embed_text", "dense_embed", "zero_shot", "grounding"})


def test_one_seed_gives_the_same_image_weights_in_every_layout(adapters):
    states = {layout: adapters[layout].encoder().state_dict() for layout in LAYOUTS}
    for layout in ("encoder_decoder", "pretrain"):
        assert all(torch.equal(states["encoder"][k], states[layout][k]) for k in states["encoder"])
    decoder_a = adapters["encoder_decoder"].decoder_state_dict()
    decoder_b = adapters["pretrain"].decoder_state_dict()
    assert all(torch.equal(decoder_a[k], decoder_b[k]) for k in decoder_a)


def test_writer_is_deterministic_per_seed_and_leaves_global_rng(tmp_path, files):
    reference = _load(files["encoder"])
    rng = torch.get_rng_state()
    again = _load(write_g2d_checkpoint(tmp_path / "again.pth", "encoder", seed=0))
    other = _load(write_g2d_checkpoint(tmp_path / "other.pth", "encoder", seed=1))
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(again) == list(reference)
    assert all(torch.equal(again[k], reference[k]) for k in reference)
    assert not torch.equal(other["conv1.weight"], reference["conv1.weight"])


def test_pretrain_file_has_the_published_structure(files):
    obj = _load(files["pretrain"])
    assert list(obj) == ["epoch", "model_state_dict", "optimizer_state_dict"]
    state = obj["model_state_dict"]
    groups = list(dict.fromkeys(k.split(".", 1)[0] for k in state))
    assert groups == ["img_model", "attnpool", "lm_model", "proj_v", "proj_t", "pseudo_conv"]
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {
        "img_model.encoder.conv1.weight": (64, 3, 7, 7),
        "img_model.decoder.blocks.0.conv1.0.weight": (256, 3072, 3, 3),
        "img_model.segmentation_head.0.weight": (1, 16, 3, 3),
        "lm_model.embeddings.word_embeddings.weight": (28996, 768),
        "lm_model.encoder.layer.0.intermediate.dense.weight": (3072, 768),
        "lm_model.pooler.dense.weight": (768, 768),
        "proj_v.0.weight": (128, 2048, 1, 1),
        "proj_v.1.running_mean": (128,),
        "proj_v.3.weight": (128, 128, 1, 1),
        "proj_t.0.weight": (128, 768, 1),
        "proj_t.3.weight": (128, 128, 1),
        "attnpool.positional_embedding": (65, 128),
        "attnpool.mhsa.in_proj_weight": (384, 128),
        "attnpool.c_proj.weight": (128, 128),
        "pseudo_conv.weight": (128, 1024, 1, 1),
    }
    assert {k: shapes[k] for k in expected} == expected
    assert "proj_v.1.weight" not in state  # BatchNorm with affine=False
    assert not any(k.startswith("lm_model.encoder.layer.1.") for k in state)  # text_layers=1

    buffers = (".running_mean", ".running_var", ".num_batches_tracked")
    n_params = sum(not k.endswith(buffers) for k in state)
    group = obj["optimizer_state_dict"]["param_groups"][0]
    assert obj["optimizer_state_dict"]["state"] == {}
    assert group["params"] == list(range(n_params))
    assert group["lr"] == 2e-5 and group["weight_decay"] == 1e-8 and group["betas"] == (0.9, 0.999)


def test_writer_rejects_unknown_layout_and_text_layers(tmp_path):
    with pytest.raises(ConfigError, match="layout"):
        write_g2d_checkpoint(tmp_path / "x.pth", "full")
    with pytest.raises(ConfigError, match="text_layers"):
        write_g2d_checkpoint(tmp_path / "x.pth", "pretrain", text_layers=13)
    assert not list(tmp_path.iterdir())


# --- wrong layouts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_raw(files):
    """The encoder-layout state dict as stored."""
    return _load(files["encoder"])


def _medklip_features(encoder_raw):
    """MedKLIP's ``res_features`` (conv1..layer3 of a ResNet-50 in an nn.Sequential) with its classifier."""
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
    state = {}
    for key, value in encoder_raw.items():
        head, rest = key.split(".", 1)
        if head in index:
            state[f"module.res_features.{index[head]}.{rest}"] = value
    state["module.classifier.weight"] = torch.zeros(2, 256)
    return state


def _expect_rejected(path, *names):
    with pytest.raises(CheckpointError) as info:
        build_adapter("g2d", path)
    message = str(info.value)
    assert str(path) in message and "nothing was loaded" in message
    for name in names:
        assert name in message, name
    return G2DAdapter.inspect(path)


def test_medklip_state_dict_is_rejected_with_its_keys(tmp_path, encoder_raw):
    state = _medklip_features(encoder_raw)
    path = tmp_path / "checkpoint_final.pth"
    torch.save(state, path)
    report = _expect_rejected(path, "module.res_features.0.weight", "module.classifier.weight",
                              "layer4.2.conv3.weight", "another model family")
    assert report.layout == "encoder" and not report.mapped
    assert report.unexpected == list(state)
    assert len(report.missing) == 318


def test_medklip_checkpoint_wrapper_is_rejected(tmp_path, encoder_raw):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"model": _medklip_features(encoder_raw), "optimizer": {}, "epoch": 60}, path)
    report = _expect_rejected(path, "model", "optimizer", "epoch")
    assert report.unexpected == ["model", "optimizer", "epoch"]
    assert len(report.missing) == 318


def _renamed(state):
    state["layer4.2.conv3.weights"] = state.pop("layer4.2.conv3.weight")
    return {"missing": ["layer4.2.conv3.weight"], "unexpected": ["layer4.2.conv3.weights"]}


def _dropped(state):
    del state["bn1.running_mean"]
    return {"missing": ["bn1.running_mean"]}


def _extra(state):
    state["fc.weight"] = torch.zeros(1000, 2048)
    return {"unexpected": ["fc.weight"]}


def _wrong_shape(state):
    state["conv1.weight"] = state["conv1.weight"][:, :1]
    return {"mismatched": [("conv1.weight", (64, 3, 7, 7), (64, 1, 7, 7))]}


@pytest.mark.parametrize("perturb", [_renamed, _dropped, _extra, _wrong_shape])
def test_perturbed_encoder_is_rejected_naming_the_keys(tmp_path, encoder_raw, perturb):
    state = dict(encoder_raw)
    problems = perturb(state)
    path = tmp_path / "g2d_encoder.pth"
    torch.save(state, path)
    names = [p if isinstance(p, str) else p[0] for found in problems.values() for p in found]
    report = _expect_rejected(path, *names)
    assert report.layout == "encoder"
    for field in ("missing", "unexpected", "mismatched"):
        assert getattr(report, field) == problems.get(field, []), field
    assert len(report.mapped) == 318 - len(problems.get("missing", [])) - len(problems.get("mismatched", []))


def test_wrong_shape_message_gives_both_shapes(tmp_path, encoder_raw):
    state = dict(encoder_raw)
    _wrong_shape(state)
    path = tmp_path / "g2d_encoder.pth"
    torch.save(state, path)
    _expect_rejected(path, "conv1.weight: expected shape (64, 3, 7, 7), found (64, 1, 7, 7)")


def test_two_class_segmentation_head_is_mismatched(tmp_path, files):
    state = _load(files["encoder_decoder"])
    state["segmentation_head.0.weight"] = torch.zeros(2, 16, 3, 3)
    state["segmentation_head.0.bias"] = torch.zeros(2)
    path = tmp_path / "g2d_encoder_decoder.pth"
    torch.save(state, path)
    report = _expect_rejected(path, "segmentation_head.0.weight", "segmentation_head.0.bias")
    assert report.layout == "encoder_decoder"
    assert report.mismatched == [
        ("segmentation_head.0.weight", (1, 16, 3, 3), (2, 16, 3, 3)),
        ("segmentation_head.0.bias", (1,), (2,)),
    ]
    assert not report.missing and not report.unexpected


def test_pretrain_with_unknown_keys_is_rejected(tmp_path, files):
    obj = _load(files["pretrain"])
    # Text-side keys are ignored by prefix whatever they hold, so dropping most keeps the test file small.
    obj["model_state_dict"] = {
        k: v for k, v in obj["model_state_dict"].items() if not k.startswith("lm_model.")
    } | {"lm_model.pooler.dense.bias": torch.zeros(768), "img_model.classification_head.1.weight": torch.zeros(1, 2048)}
    obj["scheduler_state_dict"] = {}
    path = tmp_path / "g2d_50_checkpoint.pth"
    torch.save(obj, path)
    report = _expect_rejected(path, "img_model.classification_head.1.weight", "scheduler_state_dict")
    assert report.layout == "pretrain"
    assert report.unexpected == ["scheduler_state_dict", "img_model.classification_head.1.weight"]
    assert not report.missing and not report.mismatched and len(report.mapped) == 392
    assert "lm_model.pooler.dense.bias" in report.ignored[TEXT_SIDE_REASON]


def test_non_dict_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="Tensor"):
        G2DAdapter.inspect(path)
    with pytest.raises(CheckpointError, match="Tensor"):
        G2DAdapter(path)


def test_g2d_needs_a_checkpoint():
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        G2DAdapter()
