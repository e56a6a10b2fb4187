"""CLIP (CheXzero, open_clip): OpenAI-layout ViT checkpoints, embeddings and CheXzero's zero-shot rule."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch

from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import WRAPPER_REASON, load_state_dict_file, sha256_file
from vlpbench.adapters.clip import (
    CHEXZERO_MEAN,
    HF_POSITION_IDS_REASON,
    OPENAI_MEAN,
    OPENAI_SCALARS_REASON,
    ClipAdapter,
    ClipConfig,
)
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import write_clip_checkpoint

# write_clip_checkpoint's defaults: 32-px images in 8-px patches (a 4×4 grid), 32-d embeddings.
SIZE, GRID, DIM = 32, 4, 32
OPEN_CLIP_ENTRIES = ["epoch", "name", "optimizer"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_clip_checkpoint(tmp_path_factory.mktemp("clip") / "best_64_5e-05_original.pt", seed=1)


@pytest.fixture(scope="module")
def state(ckpt) -> dict[str, torch.Tensor]:
    return load_state_dict_file(ckpt)[0]


@pytest.fixture(scope="module")
def adapter(ckpt) -> ClipAdapter:
    return build_adapter("clip", ckpt)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_openai_layout_loads_with_every_key_mapped(adapter, state):
    report = adapter.report
    assert report.ok and report.layout == "clip-openai-vit-w64-l2-p8-32" and not report.ignored
    assert sorted(k for k, _ in report.mapped) == sorted(state) and all(k == m for k, m in report.mapped)
    assert adapter.config == ClipConfig(embed_dim=DIM, image_size=SIZE, patch_size=8, vision_width=64,
                                        vision_layers=2, context_length=77, vocab_size=49408, text_width=64,
                                        text_layers=2)
    assert adapter.capabilities == {"features", "embed_image", "embed_text", "dense_embed", "zero_shot", "grounding"}
    assert adapter.image_size == SIZE and adapter.mean == OPENAI_MEAN and adapter.decoder_state_dict() is None
    assert adapter.describe()["architecture"]["vision_layers"] == 2


def test_open_clip_trainer_checkpoint_loads_identically(adapter, state, images, tmp_path):
    wrapped = {"epoch": 10, "name": "chexzero-ft", "optimizer": {},
               "state_dict": {f"module.{k}": v for k, v in state.items()}}
    other = ClipAdapter(_save(wrapped, tmp_path / "epoch_10.pt"))
    assert other.report.ok
    assert other.report.layout == "clip-openai-vit-w64-l2-p8-32 (unwrapped 'state_dict', stripped 'module.')"
    assert other.report.ignored == {WRAPPER_REASON: OPEN_CLIP_ENTRIES}
    assert other.report.mapped == [(f"module.{k}", m) for k, m in adapter.report.mapped]
    assert torch.equal(other.embed_image(images), adapter.embed_image(images))
    assert torch.equal(other.embed_text(["edema"]), adapter.embed_text(["edema"]))


def test_openai_scalars_are_ignored_with_a_reason(tmp_path):
    path = write_clip_checkpoint(tmp_path / "jit.pt", seed=1, openai_scalars=True)
    report = ClipAdapter.inspect(path)
    assert report.ok and report.ignored == {OPENAI_SCALARS_REASON: ["input_resolution", "context_length",
                                                                    "vocab_size"]}


def test_renamed_key_fails_naming_it(state, tmp_path):
    renamed = dict(state)
    renamed["visual.ln_post.gamma"] = renamed.pop("visual.ln_post.weight")
    path = _save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match=r"(?s)missing: 1 keys\n  - visual.ln_post.weight\n"
                                              r"unexpected: 1 keys\n  - visual.ln_post.gamma"):
        ClipAdapter(path)
    # A key the architecture is read from: nothing can be built, and the report says which.
    renamed["text_proj"] = renamed.pop("text_projection")
    report = ClipAdapter.inspect(_save(renamed, tmp_path / "renamed2.pt"))
    assert report.missing == ["text_projection"] and "text_proj" in report.unexpected and not report.mapped


def test_shape_mismatch_is_reported(state, tmp_path):
    bad = dict(state, logit_scale=torch.ones(2))
    report = ClipAdapter.inspect(_save(bad, tmp_path / "bad.pt"))
    assert report.mismatched == [("logit_scale", (), (2,))]


def test_embeddings_have_documented_shapes_and_unit_norm(adapter, images):
    image, dense = adapter.embed_image(images), adapter.dense_embed(images)
    text = adapter.embed_text(["pleural effusion", "no pleural effusion"])
    assert image.shape == (3, DIM) and text.shape == (2, DIM) and dense.shape == (3, DIM, GRID, GRID)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(3, GRID, GRID))
    assert not image.requires_grad and not dense.requires_grad


def test_dense_embed_is_the_projected_patch_tokens(adapter, images):
    """Patch k of the grid (row-major) is token k+1 of the last block, after ln_post and visual.proj."""
    visual, captured = adapter.model.visual, {}
    hook = visual.ln_post.register_forward_hook(lambda m, i, out: captured.setdefault("x", out))
    try:
        dense = adapter.dense_embed(images)
    finally:
        hook.remove()
    expected = torch.nn.functional.normalize(captured["x"][:, 1:] @ visual.proj, dim=-1)
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), expected)


def test_zero_shot_scores_follow_chexzero_rule(adapter, images):
    classes = ["atelectasis", "cardiomegaly", "edema"]
    image = adapter.embed_image(images)
    pos, neg = adapter.embed_text(classes), adapter.embed_text([f"no {c}" for c in classes])
    scale = adapter.model.logit_scale.exp()
    expected = torch.exp(scale * image @ pos.T) / (torch.exp(scale * image @ pos.T) + torch.exp(scale * image @ neg.T))
    torch.testing.assert_close(adapter.zero_shot_scores(images, classes), expected)
    unscaled = torch.exp(image @ pos.T) / (torch.exp(image @ pos.T) + torch.exp(image @ neg.T))
    torch.testing.assert_close(adapter.zero_shot_scores(images, classes, apply_logit_scale=False), unscaled)
    with pytest.raises(ConfigError, match="pair"):
        adapter.zero_shot_scores(images, classes, templates=("{}",))


def test_two_loads_and_two_writes_are_identical(ckpt, adapter, images, tmp_path):
    again = build_adapter("clip", write_clip_checkpoint(tmp_path / "again.pt", seed=1))
    assert torch.equal(again.embed_image(images), adapter.embed_image(images))
    assert torch.equal(again.dense_embed(images), adapter.dense_embed(images))
    assert torch.equal(again.zero_shot_scores(images, ["edema"]), adapter.zero_shot_scores(images, ["edema"]))


def test_half_precision_checkpoint_loads(state, adapter, images, tmp_path):
    """OpenAI's published state dicts are partly fp16; the model is fp32 either way."""
    half = ClipAdapter(_save({k: v.half() for k, v in state.items()}, tmp_path / "half.pt"))
    torch.testing.assert_close(half.embed_image(images), adapter.embed_image(images), atol=2e-3, rtol=0)


def test_encoder_is_the_visual_tower_behind_a_pyramid(adapter, images):
    """encoder(): the visual ViT under timm names (+ Feature2Pyramid); its class token, projected, is embed_image."""
    assert "features" in adapter.capabilities
    encoder = adapter.encoder().eval()
    with torch.no_grad():
        maps = encoder(images)
        projected = torch.nn.functional.normalize(encoder(images, output="pooled") @ adapter.model.visual.proj, dim=-1)
    assert encoder.out_channels == (3, 0, 64, 64, 64, 64)
    # 8-px patches (a 4x4 grid) rescaled by 2, 1, 1/2, 1/4: strides 4, 8, 16, 32.
    assert [tuple(m.shape[-2:]) for m in maps] == [(SIZE, SIZE), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    torch.testing.assert_close(projected, adapter.embed_image(images), rtol=0, atol=1e-5)


def test_tokenizer_works_offline(adapter, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    tokens = tokenizer(["No  Pleural Effusion"], context_length=77)[0].tolist()
    end = tokens.index(49407)  # OpenAI's end-of-text token; start-of-text is 49406, padding 0
    assert tokens[0] == 49406 and 1 < end < 10 and tokens[end + 1:] == [0] * (76 - end)
    assert tokens == tokenizer(["no pleural effusion"], context_length=77)[0].tolist()  # lower-cased, cleaned
    assert adapter.embed_text(["a" * 500]).shape == (1, DIM)  # longer than the context: truncated


@pytest.mark.skipif(not hasattr(ClipAdapter, "preprocess"), reason="base.py has no preprocess yet")
def test_preprocess_meets_the_input_contract(adapter):
    grey = torch.randint(0, 256, (2, 1, 50, 70), dtype=torch.uint8)
    assert adapter.embed_image(adapter.preprocess(grey)).shape == (2, DIM)


def test_input_contract_and_options(ckpt, adapter):
    with pytest.raises(ConfigError, match=r"images \[B, 3, 32, 32\]"):
        adapter.embed_image(torch.zeros(1, 3, 64, 64))
    assert build_adapter("clip", ckpt, normalization="chexzero").mean == CHEXZERO_MEAN
    with pytest.raises(ConfigError, match="normalization='imagenet' is not one of openai, chexzero, folder"):
        ClipAdapter(ckpt, normalization="imagenet")


def test_other_forms_are_refused(state, tmp_path):
    with pytest.raises(CheckpointError, match="directory without config.json, not a Hugging Face CLIPModel"):
        ClipAdapter(tmp_path)
    resnet = dict(state, **{"visual.attnpool.positional_embedding": torch.zeros(50, 64)})
    with pytest.raises(CheckpointError, match="ResNet-based CLIP"):
        ClipAdapter(_save(resnet, tmp_path / "rn50.pt"))
    small_vocab = dict(state, **{"token_embedding.weight": state["token_embedding.weight"][:1000]})
    with pytest.raises(CheckpointError, match="OpenAI's BPE tokenizer has 49408 tokens"):
        ClipAdapter(_save(small_vocab, tmp_path / "vocab.pt"))


# --- Hugging Face CLIPModel directories ----------------------------------------------------------------


def _hf_config(act: str = "quick_gelu", **vision):
    from transformers import CLIPConfig

    tower = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1, hidden_act=act)
    return CLIPConfig(text_config=dict(tower, max_position_embeddings=77),
                      vision_config=dict(tower, image_size=SIZE, patch_size=8, **vision), projection_dim=DIM)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf_model(request, tmp_path_factory):
    """A tiny random-init ``transformers.CLIPModel`` (each activation) and the directory ``save_pretrained`` wrote."""
    from transformers import CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = CLIPModel(_hf_config(request.param)).eval()
    directory = tmp_path_factory.mktemp("hf") / "chexzero-hf"
    model.save_pretrained(directory)
    return model, directory


def test_hugging_face_directory_matches_transformers(hf_model, images):
    from open_clip.tokenizer import SimpleTokenizer

    model, directory = hf_model
    act = model.config.vision_config.hidden_act
    adapter = build_adapter("clip", directory)
    suffix = "" if act == "quick_gelu" else "-gelu"
    assert adapter.report.ok and adapter.report.layout == f"clip-hf-vit-w64-l2-p8-32{suffix} (model.safetensors)"
    assert adapter.config.act == act and adapter.describe()["architecture"]["act"] == act
    assert len(adapter.report.mapped) == len(model.state_dict())
    assert ("vision_model.encoder.layers.1.self_attn.k_proj.weight",
            "visual.transformer.resblocks.1.attn.in_proj_weight") in adapter.report.mapped
    assert adapter.checkpoint_sha256 == sha256_file(directory / "model.safetensors")
    texts = ["no pleural effusion", "cardiomegaly"]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=images).pooler_output
        text = model.get_text_features(input_ids=SimpleTokenizer()(texts)).pooler_output
    normalize = torch.nn.functional.normalize
    torch.testing.assert_close(adapter.embed_image(images), normalize(image, dim=-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(adapter.embed_text(texts), normalize(text, dim=-1), rtol=0, atol=1e-5)
    # the dense encoder (a timm ViT with the same activation): its normed class token is the tower's pooled output
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=images).pooler_output
        tokens = adapter.encoder().eval().backbone.forward_features(images)[:, 0]
    torch.testing.assert_close(tokens, pooled, rtol=0, atol=1e-5)


def test_hugging_face_bin_with_position_ids_and_a_renamed_key(hf_model, tmp_path):
    model, directory = hf_model
    state = dict(model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    torch.save(state, tmp_path / "pytorch_model.bin")
    report = ClipAdapter.inspect(tmp_path)
    assert report.ok and report.layout.endswith("(pytorch_model.bin)")
    assert report.ignored == {HF_POSITION_IDS_REASON: ["text_model.embeddings.position_ids"]}
    state["text_model.encoder.layers.0.self_attn.query.weight"] = state.pop(
        "text_model.encoder.layers.0.self_attn.q_proj.weight")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing: 1 keys\n  - text_model.encoder.layers.0.self_attn.q_proj."
                                              r"weight\nunexpected: 1 keys\n  - text_model.encoder.layers.0."
                                              r"self_attn.query.weight\n"):
        ClipAdapter(tmp_path)


@pytest.mark.parametrize("vision, text, message", [
    ("gelu_new", "gelu_new", "vision_config.hidden_act is 'gelu_new'; expected one of quick_gelu, gelu"),
    ("gelu", "quick_gelu", "vision_config.hidden_act is 'gelu' but text_config.hidden_act is 'quick_gelu'"),
])
def test_hugging_face_activation_not_expressible_is_a_config_error(tmp_path, vision, text, message):
    from transformers import CLIPConfig

    config = _hf_config(vision).to_dict()
    config["text_config"]["hidden_act"] = text
    CLIPConfig.from_dict(config).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(ConfigError, match="^" + re.escape(f"{tmp_path}/config.json: {message}")):
        ClipAdapter(tmp_path)


def test_hugging_face_config_openai_cannot_express_is_refused(tmp_path):
    _hf_config(layer_norm_eps=1e-6).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(CheckpointError, match="vision tower has {'layer_norm_eps': 1e-06}"):
        ClipAdapter(tmp_path)
