"""XraySigLIP (CheXagent's SigLIP-trained towers in CLIPModel folders): the clip loading, SigLIP's sigmoid rule."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlpbench.adapters import adapter_names, build_adapter
from vlpbench.adapters.xraysiglip import XraySiglipAdapter
from vlpbench.errors import CheckpointError, ConfigError

SIZE, DIM, BIAS = 32, 32, -1.75
CLASSES = ["pneumonia", "pleural effusion", "cardiomegaly"]
# A SigLIP image processor's settings, as the XraySigLIP folders ship them (mean and std 0.5).
PROCESSOR = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": SIZE, "width": SIZE},
             "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


@pytest.fixture(scope="module")
def model():
    """A tiny GELU ``transformers.CLIPModel``, as the XraySigLIP laion2b folders are (hidden_act gelu)."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1, hidden_act="gelu")
    config = CLIPConfig(text_config=dict(tower, max_position_embeddings=40),
                        vision_config=dict(tower, image_size=SIZE, patch_size=8), projection_dim=DIM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        clip = CLIPModel(config).eval()
        with torch.no_grad():
            clip.logit_scale.fill_(1.3)
    return clip


@pytest.fixture(scope="module")
def folders(model, tmp_path_factory):
    """The model saved twice: with a ``logit_bias`` beside the CLIP keys, and without one."""
    plain = tmp_path_factory.mktemp("xraysiglip") / "plain"
    model.save_pretrained(plain)
    (plain / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    biased = plain.parent / "biased"
    shutil.copytree(plain, biased)
    state = load_file(biased / "model.safetensors")
    save_file({**state, "logit_bias": torch.tensor([BIAS])}, biased / "model.safetensors")
    return biased, plain


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _reference(model, images, texts):
    """transformers' own forward: L2-normalised image and text embeddings."""
    from open_clip.tokenizer import SimpleTokenizer

    with torch.no_grad():
        out = model(pixel_values=images, input_ids=SimpleTokenizer()(texts, context_length=40))
    return F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)


def test_registered_and_every_key_mapped_with_the_bias(folders, model):
    biased, _ = folders
    assert "xraysiglip" in adapter_names()
    adapter = build_adapter("xraysiglip", biased)
    assert adapter.report.ok and adapter.report.layout == "clip-hf-vit-w64-l2-p8-32-gelu (model.safetensors)"
    assert len(adapter.report.mapped) == len(model.state_dict()) + 1
    assert ("logit_bias", "logit_bias") in adapter.report.mapped
    assert adapter.describe()["logit_bias"] == BIAS and adapter.config.act == "gelu"
    assert adapter.config.context_length == 40


def test_sigmoid_scores_equal_siglip_rule_on_transformers_embeddings(folders, model, images):
    adapter = XraySiglipAdapter(folders[0])
    image, text = _reference(model, images, CLASSES)
    torch.testing.assert_close(adapter.embed_image(images), image, rtol=0, atol=1e-5)
    torch.testing.assert_close(adapter.embed_text(CLASSES), text, rtol=0, atol=1e-5)
    expected = torch.sigmoid(torch.tensor(1.3).exp() * image @ text.T + BIAS)
    scores = adapter.zero_shot_scores(images, CLASSES, ("{}", "no {}"))
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    # the negative template does not enter; a bad pair is still refused
    torch.testing.assert_close(adapter.zero_shot_scores(images, CLASSES, ("{}", "normal {}")), scores)
    with pytest.raises(ConfigError, match="templates"):
        adapter.zero_shot_scores(images, CLASSES, ("{}", "no"))


def test_without_a_bias_the_scores_say_so_and_rank_alike(folders, model, images):
    biased, plain = (XraySiglipAdapter(f) for f in folders)
    assert plain.describe()["logit_bias"] is None
    image, text = _reference(model, images, CLASSES)
    unbiased = plain.zero_shot_scores(images, CLASSES)
    torch.testing.assert_close(unbiased, torch.sigmoid(torch.tensor(1.3).exp() * image @ text.T), rtol=0, atol=1e-5)
    with_bias = biased.zero_shot_scores(images, CLASSES)
    assert torch.equal(unbiased.argsort(dim=0), with_bias.argsort(dim=0))
    assert torch.equal(unbiased.argmax(dim=1), with_bias.argmax(dim=1))


def test_other_forms_and_a_bad_bias_are_refused(folders, tmp_path):
    with pytest.raises(ConfigError, match="needs a Hugging Face CLIPModel folder"):
        XraySiglipAdapter(tmp_path / "model.pt")
    bad = tmp_path / "bad"
    shutil.copytree(folders[1], bad)
    state = load_file(bad / "model.safetensors")
    save_file({**state, "logit_bias": torch.zeros(2)}, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors: logit_bias is (2,); expected one number")):
        XraySiglipAdapter(bad)
    # the clip adapter, whose rule is CheXzero's pair softmax, does not take a SigLIP bias it would not use
    with pytest.raises(CheckpointError, match=r"unexpected: 1 keys\n  - logit_bias"):
        build_adapter("clip", folders[0])


def test_the_folders_image_processor_gives_the_normalisation(folders, tmp_path):
    from vlpbench.adapters.clip import OPENAI_MEAN

    _, plain = folders
    assert build_adapter("xraysiglip", plain).mean == (0.5, 0.5, 0.5)  # default normalization=folder
    assert build_adapter("xraysiglip", plain, normalization="openai").mean == OPENAI_MEAN
    assert build_adapter("clip", plain).mean == OPENAI_MEAN  # clip keeps CLIP's unless asked
    assert build_adapter("clip", plain, normalization="folder").std == (0.5, 0.5, 0.5)
    bare = tmp_path / "bare"
    shutil.copytree(plain, bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match="normalization=folder reads the checkpoint folder's preprocessor_config.json"):
        build_adapter("xraysiglip", bare)
    (bare / "preprocessor_config.json").write_text(json.dumps({**PROCESSOR, "size": {"height": 64, "width": 64}}))
    with pytest.raises(CheckpointError, match=r"preprocessor_config.json: size 64 differs from the model's input side 32"):
        build_adapter("xraysiglip", bare)
