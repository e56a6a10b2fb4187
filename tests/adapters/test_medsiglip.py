"""MedSigLIP: a SiglipModel folder key by key; embeddings, sigmoid and (zero_shot_rule=softmax) CLIP softmax
zero-shot scores against transformers' own SiglipModel; patch grounding as the pooling head's value path; the
input contract; the dense path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlpbench import api
from vlpbench.adapters.base import CapabilityError
from vlpbench.adapters.medsiglip import MedSiglipAdapter
from vlpbench.cli import main
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing.hf_vit import write_siglip_folder

HIDDEN, LAYERS, PATCH, SIZE, CONTEXT = 32, 2, 14, 56, 8
MEAN, STD = (0.45, 0.5, 0.55), (0.3, 0.35, 0.4)
CLASSES = ["pneumonia", "effusion", "lung opacity"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_siglip_folder(tmp_path_factory.mktemp("medsiglip"), seed=4, mean=MEAN, std=STD, context=CONTEXT)


@pytest.fixture(scope="module")
def adapter(folder):
    return MedSiglipAdapter(folder)


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import SiglipModel

    return SiglipModel.from_pretrained(folder, local_files_only=True).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _tokens(folder: Path, texts: list[str]) -> torch.Tensor:
    """Token ids as MedSigLIP's processor makes them: the folder's tokenizer, padding="max_length"."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return tokenizer(texts, padding="max_length", max_length=CONTEXT, return_tensors="pt")["input_ids"]


def test_every_key_of_the_folder_is_mapped(adapter, folder):
    saved = load_file(folder / "model.safetensors")
    assert adapter.report.ok and not adapter.report.ignored
    assert sorted(source for source, _ in adapter.report.mapped) == sorted(saved)
    assert {"logit_scale", "logit_bias", "vision_model.head.probe", "text_model.head.weight"} <= set(saved)
    assert adapter.report.layout == "siglip-hf (model.safetensors)"
    assert {"embed_image", "embed_text", "dense_embed", "zero_shot", "grounding"} <= adapter.capabilities


def test_embeddings_and_sigmoid_scores_equal_transformers_forward(adapter, reference, folder, images):
    texts = [f"{c}" for c in CLASSES]
    with torch.no_grad():
        out = reference(pixel_values=images, input_ids=_tokens(folder, texts))
    torch.testing.assert_close(adapter.embed_image(images), F.normalize(out.image_embeds, dim=-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(adapter.embed_text(texts), F.normalize(out.text_embeds, dim=-1), rtol=0, atol=1e-5)
    # by hand from the model's outputs: logit_scale.exp() * cosine + logit_bias, then the sigmoid
    cosine = F.normalize(out.image_embeds, dim=-1) @ F.normalize(out.text_embeds, dim=-1).T
    expected = torch.sigmoid(reference.logit_scale.exp() * cosine + reference.logit_bias)
    scores = adapter.zero_shot_scores(images, CLASSES, ("{}", "no {}"))
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, torch.sigmoid(out.logits_per_image), rtol=0, atol=1e-5)
    # the negative template does not enter a sigmoid score; a bad pair is still refused
    torch.testing.assert_close(adapter.zero_shot_scores(images, CLASSES, ("{}", "normal {}")), scores)
    with pytest.raises(ConfigError, match="templates"):
        adapter.zero_shot_scores(images, CLASSES, ("{}",))
    assert adapter.options == {"zero_shot_rule": "sigmoid"}
    assert adapter.describe()["procedures"]["zero_shot"].startswith("per class, sigmoid(")


def test_softmax_rule_is_clips_pair_softmax_of_transformers_embeddings(folder, reference, images):
    """zero_shot_rule=softmax (CheXagent's XrayCLIP webli towers): CLIP's rule over the positive / negative prompt,
    by hand from SiglipModel's own embeddings; logit_bias does not enter; the option is recorded."""
    adapter = MedSiglipAdapter(folder, zero_shot_rule="softmax")
    positive, negative = CLASSES, [f"no {c}" for c in CLASSES]
    with torch.no_grad():
        out = {name: reference(pixel_values=images, input_ids=_tokens(folder, prompts))
               for name, prompts in (("positive", positive), ("negative", negative))}
    image = F.normalize(out["positive"].image_embeds, dim=-1)
    text = {name: F.normalize(o.text_embeds, dim=-1) for name, o in out.items()}
    scale = reference.logit_scale.exp()
    pos, neg = (scale * image @ text["positive"].T).exp(), (scale * image @ text["negative"].T).exp()
    expected = pos / (pos + neg)
    scores = adapter.zero_shot_scores(images, CLASSES, ("{}", "no {}"))
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(scores, MedSiglipAdapter(folder).zero_shot_scores(images, CLASSES), atol=1e-3)
    # the negative template now enters the score
    assert not torch.allclose(adapter.zero_shot_scores(images, CLASSES, ("{}", "normal {}")), scores, atol=1e-4)
    record = adapter.describe()
    assert record["options"] == {"zero_shot_rule": "softmax"}
    assert record["procedures"]["zero_shot"].startswith("per class, the positive entry of the softmax")
    assert MedSiglipAdapter.procedures["zero_shot"].startswith("per class, sigmoid(")


def test_an_unknown_zero_shot_rule_is_refused_before_the_weights_are_read(tmp_path):
    # no folder at all: the option is checked first, so the error names it, not the checkpoint
    with pytest.raises(ConfigError, match="zero_shot_rule='logistic' is not one of sigmoid, softmax"):
        MedSiglipAdapter(tmp_path / "absent", zero_shot_rule="logistic")
    with pytest.raises(ConfigError, match="zero_shot_rule='logistic'"):
        MedSiglipAdapter.inspect(tmp_path / "absent", zero_shot_rule="logistic")


def test_a_16_pixel_patch_siglip_folder_loads_as_the_xraysiglip_webli_folders_are(tmp_path, images):
    """CheXagent's XraySigLIP__vit-b-16-siglip-512__webli / __vit-l-16-siglip-384__webli are SiglipModel folders with
    16-pixel patches and mean/std 0.5: scaled down, the adapter matches transformers' forward."""
    from transformers import SiglipModel

    folder = write_siglip_folder(tmp_path / "xraysiglip", seed=6, patch=16, image_size=48, context=CONTEXT)
    adapter = MedSiglipAdapter(folder)
    reference = SiglipModel.from_pretrained(folder, local_files_only=True).eval()
    pixels = F.interpolate(images, size=48)
    with torch.no_grad():
        out = reference(pixel_values=pixels, input_ids=_tokens(folder, CLASSES))
    assert adapter.report.ok and (adapter.image_size, adapter.mean) == (48, (0.5,) * 3)
    torch.testing.assert_close(adapter.embed_image(pixels), F.normalize(out.image_embeds, dim=-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(adapter.zero_shot_scores(pixels, CLASSES), torch.sigmoid(out.logits_per_image),
                               rtol=0, atol=1e-5)
    assert tuple(adapter.dense_embed(pixels).shape) == (3, HIDDEN, 3, 3)

def test_patch_embeddings_are_each_token_through_the_pooling_heads_value_path(adapter, reference, images):
    with torch.no_grad():
        tokens = reference.vision_model(pixel_values=images).last_hidden_state  # after post_layernorm
    head = reference.vision_model.head
    width = HIDDEN
    # one key: softmax weight 1, so attention returns out_proj(v_proj(token)); then the head's MLP residual
    w_v, b_v = head.attention.in_proj_weight[2 * width:], head.attention.in_proj_bias[2 * width:]
    value = F.linear(F.linear(tokens, w_v, b_v), head.attention.out_proj.weight, head.attention.out_proj.bias)
    with torch.no_grad():
        expected = value + head.mlp(head.layernorm(value))
    grid = SIZE // PATCH
    expected = F.normalize(expected, dim=-1).transpose(1, 2).reshape(len(images), width, grid, grid)
    torch.testing.assert_close(adapter.dense_embed(images), expected, rtol=0, atol=1e-5)
    maps = adapter.grounding_maps(images, ["pneumonia"])
    torch.testing.assert_close(maps[:, 0], torch.einsum("bdhw,d->bhw", expected, adapter.embed_text(["pneumonia"])[0]),
                               rtol=0, atol=1e-5)


def test_the_folders_image_processor_is_the_input_contract(adapter, folder):
    from transformers import AutoImageProcessor

    assert (adapter.image_size, adapter.mean, adapter.std) == (SIZE, MEAN, STD)
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    expected = AutoImageProcessor.from_pretrained(folder, local_files_only=True)(
        images=[np.repeat(image[..., None], 3, axis=2)], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(adapter.preprocess(torch.from_numpy(image)[None, None]), expected, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match=f"images \\(B, 3, {SIZE}, {SIZE}\\)"):
        adapter.embed_image(torch.zeros(1, 3, 2 * SIZE, 2 * SIZE))


def test_encoder_is_the_vision_tower_behind_the_pyramid(adapter, reference, images):
    encoder = adapter.encoder().eval()
    with torch.no_grad():
        pooled = encoder(images, output="pooled")
        expected = reference.vision_model(pixel_values=images).pooler_output
        maps = encoder(torch.zeros(1, 3, 224, 224))
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)
    assert [tuple(m.shape[1:]) for m in maps][2:] == [(HIDDEN, 56, 56), (HIDDEN, 28, 28), (HIDDEN, 14, 14),
                                                      (HIDDEN, 7, 7)]
    assert encoder.pooled_channels == HIDDEN and encoder.prefix_tokens == 0
    # training the encoder leaves the adapter's own (frozen, shared) weights untouched
    before = adapter.model.vision_model.post_layernorm.weight.clone()
    with torch.no_grad():
        encoder.model.post_layernorm.weight.add_(1.0)
    torch.testing.assert_close(adapter.model.vision_model.post_layernorm.weight, before, rtol=0, atol=0)


def test_a_missing_or_an_extra_key_is_named(folder, tmp_path):
    state = load_file(folder / "model.safetensors")
    for name, broken, message in [
        ("missing", {k: v for k, v in state.items() if k != "logit_bias"}, r"missing: 1 keys\n  - logit_bias"),
        ("extra", {**state, "text_projection.weight": torch.zeros(HIDDEN, HIDDEN)},
         r"unexpected: 1 keys\n  - text_projection.weight"),
    ]:
        target = _copy(folder, tmp_path / name)
        save_file(broken, target / "model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            MedSiglipAdapter(target)


def _copy(folder: Path, target: Path) -> Path:
    """``folder`` without its weights (config, image processor, tokenizer files)."""
    target.mkdir()
    for path in folder.iterdir():
        if path.name != "model.safetensors":
            (target / path.name).write_bytes(path.read_bytes())
    return target


def test_without_a_tokenizer_the_image_side_loads_and_zero_shot_names_why(folder, tmp_path):
    target = tmp_path / "no_tokenizer"
    target.mkdir()
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        (target / name).write_bytes((folder / name).read_bytes())
    adapter = MedSiglipAdapter(target)
    assert "embed_text" not in adapter.capabilities and "zero_shot" not in adapter.capabilities
    assert "embed_image" in adapter.capabilities and "text_encoder" not in adapter.describe()
    with pytest.raises(CapabilityError, match="embed_text .*holds none of the tokenizer files"):
        adapter.require("embed_image", "embed_text")
    (target / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizer"}))
    unreadable = MedSiglipAdapter(target)
    assert "embed_text" not in unreadable.capabilities
    with pytest.raises(CapabilityError, match="embed_text .*no tokenizer can be loaded from the checkpoint folder"):
        unreadable.zero_shot_scores(torch.zeros(1, 3, SIZE, SIZE), CLASSES)


def test_other_folders_are_refused_naming_the_field(folder, tmp_path):
    target = _copy(folder, tmp_path / "clip")
    (target / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(CheckpointError, match="model_type is 'clip'; adapter 'medsiglip' reads 'siglip'"):
        MedSiglipAdapter(target)
    (target / "config.json").write_text(json.dumps(config))
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    (target / "preprocessor_config.json").write_text(json.dumps({**processor, "size": {"height": 112, "width": 112}}))
    with pytest.raises(CheckpointError, match="resizes to 112².*vision_config.image_size 56"):
        MedSiglipAdapter(target)


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "rsna"
    api.synth("rsna", root, n=30, size=64, progress=False)
    return root


def test_rsna_zero_shot_runs_from_the_cli(folder, rsna_root, tmp_path):
    assert main(["-q", "run", "--model", "medsiglip", "--checkpoint", str(folder), "--task", "rsna_zs", "--frac",
                 "1.0", "--data-root", str(rsna_root), "--results", str(tmp_path), "--device", "cpu",
                 "--set", "bootstrap_resamples=20"]) == 0
    (path,) = tmp_path.glob("runs/**/rsna_zs.v*/*.json")
    record = json.loads(path.read_text())
    assert 0.0 <= record["metrics"]["auc"] <= 1.0 and record["n"]["test"] > 0
    model = record["model"]
    assert model["procedures"] == MedSiglipAdapter.procedures
    assert model["text_encoder"]["path"] == str(folder) and "tokenizer.json" in model["text_encoder"]["files"]
    assert model["input_contract"]["image_size"] == SIZE and model["context_length"] == CONTEXT


def test_the_zero_shot_rule_option_reaches_the_record(folder, rsna_root, tmp_path):
    assert main(["-q", "run", "--model", "medsiglip", "--checkpoint", str(folder), "--model-option",
                 "zero_shot_rule=softmax", "--task", "rsna_zs", "--frac", "1.0", "--data-root", str(rsna_root),
                 "--results", str(tmp_path), "--device", "cpu", "--set", "bootstrap_resamples=20"]) == 0
    (path,) = tmp_path.glob("runs/**/rsna_zs.v*/*.json")
    model = json.loads(path.read_text())["model"]
    assert model["options"] == {"zero_shot_rule": "softmax"}
    assert model["procedures"]["zero_shot"] == MedSiglipAdapter(folder, zero_shot_rule="softmax").procedures[
        "zero_shot"] != MedSiglipAdapter.procedures["zero_shot"]
