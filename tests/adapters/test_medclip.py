"""MedCLIP: the published pytorch_model.bin layouts (ResNet-50 and Swin-T variants), embeddings and zero-shot."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, SwinConfig

from vlpbench.adapters.base import IMAGENET_MEAN, CapabilityError
from vlpbench.adapters.medclip import TEXT_SIDE_REASON, MedCLIPAdapter
from vlpbench.adapters.swin import POSITION_INDEX_REASON
from vlpbench.errors import CheckpointError
from vlpbench.testing import write_tiny_bert_folder
from vlpbench.testing.hf import hf_swin_model, medclip_resnet, medclip_state, renamed, tiny_bert, \
    tiny_swin_config

# RyanWangZf/MedCLIP medclip/modeling_medclip.py:51-53: torchvision ResNet-50 (318 keys without fc) + fc.weight.
R50_VISION_KEYS = 319
# :23 Bio_ClinicalBERT AutoModel: 5 embedding + 16 per layer × 12 + 2 pooler keys, + position_ids (4.x).
BIO_CLINICAL_BERT_KEYS = 5 + 16 * 12 + 2 + 1
# SwinModel swin-tiny in 4.x names: 219 weights + 12 relative_position_index buffers (see test_swin.py).
SWIN_TINY_KEYS = 219 + 12
U, V = torch.eye(512, dtype=torch.float64)[:2]  # the directions the aligned model sends positives/negatives to


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return str(write_tiny_bert_folder(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def towers(text_dir):
    """The authors' modules, random init under seed 0: ResNet-50 (fc 2048→512), tiny SwinModel, tiny BERT."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return medclip_resnet().eval(), hf_swin_model(tiny_swin_config()).eval(), tiny_bert(text_dir).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _medclip_text(bert: nn.Module, tokenizer, text: str) -> torch.Tensor:
    """MedCLIPTextModel.forward before the head (modeling_medclip.py:29-37), one text tokenised alone."""
    batch = tokenizer([text], return_tensors="pt")
    hidden = bert(**batch, output_hidden_states=True).hidden_states
    return torch.stack([hidden[1], hidden[2], hidden[-1]]).permute(1, 0, 2, 3).mean(2).mean(1)[0]


def _aligned(state: dict, features: torch.Tensor, head_key: str, bert, text_dir) -> dict:
    """``state`` with its image head sending images 0-1 to U and 2-3 to V, the text head "effusion" to U and
    "no effusion" to V (least squares through the features, exact: fewer targets than dimensions)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    with torch.no_grad():
        text = torch.stack([_medclip_text(bert, tokenizer, t) for t in ("effusion", "no effusion")]).double()
    image_targets = torch.stack([U, U, V, V], dim=1)
    return {**state,
            head_key: (image_targets @ torch.linalg.pinv(features.double().T)).float(),
            "text_model.projection_head.weight": (torch.stack([U, V], dim=1) @ torch.linalg.pinv(text.T)).float()}


@pytest.fixture(scope="module")
def r50_file(towers, images, text_dir, tmp_path_factory):
    resnet, _, bert = towers
    trunk = nn.Sequential(*list(resnet.children())[:-1], nn.Flatten())  # up to avgpool, as model.fc's input
    with torch.no_grad():
        features = trunk(images)
    state = _aligned(medclip_state(resnet, bert, swin=False), features, "vision_model.model.fc.weight", bert,
                     text_dir)
    path = tmp_path_factory.mktemp("medclip") / "pytorch_model.bin"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def swin_file(towers, images, text_dir, tmp_path_factory):
    _, swin_model, bert = towers
    big = nn.functional.interpolate(images, size=224)
    with torch.no_grad():
        features = swin_model(pixel_values=big).pooler_output
    state = _aligned(medclip_state(swin_model, bert, swin=True), features, "vision_model.projection_head.weight",
                     bert, text_dir)
    path = tmp_path_factory.mktemp("medclip_vit") / "pytorch_model.bin"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def loaded(r50_file, swin_file, text_dir):
    """Each variant loaded once with the tiny text encoder."""
    return {"r50_file": MedCLIPAdapter(r50_file, text_encoder=text_dir),
            "swin_file": MedCLIPAdapter(swin_file, text_encoder=text_dir)}


@pytest.mark.parametrize("swin", [False, True])
def test_published_layout_accounts_every_key(swin):
    with torch.device("meta"):
        vision = hf_swin_model(SwinConfig()) if swin else medclip_resnet()
        bert = BertModel(BertConfig(vocab_size=28996))  # Bio_ClinicalBERT's shape
        state = medclip_state(vision, bert, swin=swin)
    vision_keys = SWIN_TINY_KEYS + 1 if swin else R50_VISION_KEYS
    assert len(state) == vision_keys + BIO_CLINICAL_BERT_KEYS + 2
    report = MedCLIPAdapter.map_weights(state, {"text_encoder": ""}).report
    assert report.ok, report.format()
    assert report.layout == ("medclip-swin" if swin else "medclip-resnet50")
    assert len(report.ignored[TEXT_SIDE_REASON]) == BIO_CLINICAL_BERT_KEYS + 1
    if swin:
        assert len(report.ignored[POSITION_INDEX_REASON]) == 12
        assert len(report.mapped) == 219 + 1 + 1  # Swin weights, projection_head, logit_scale
    else:
        assert len(report.mapped) == 318 + 1 + 1  # encoder, fc (the projection), logit_scale


@pytest.mark.parametrize("variant", ["r50_file", "swin_file"])
def test_loads_with_text_side_and_no_key_left(variant, loaded):
    adapter = loaded[variant]
    report = adapter.report
    assert report.ok and not report.unexpected and not report.missing
    assert {"embed_image", "embed_text", "zero_shot"} <= adapter.capabilities
    assert adapter.mean == (0.5862785803043838,) * 3 and adapter.std == (0.27950088968644304,) * 3
    assert adapter.describe()["variant"] == ("swin" if variant == "swin_file" else "resnet50")
    assert "modeling_medclip.py:242-280" in adapter.describe()["procedures"]["zero_shot"]


def test_renamed_key_fails_naming_it(r50_file, tmp_path):
    state = torch.load(r50_file, weights_only=True)
    path = tmp_path / "pytorch_model.bin"
    torch.save(renamed(state, "vision_model.model.layer4.2.bn3.weight", "vision_model.model.layer4.2.bn3.gamma"),
               path)
    with pytest.raises(CheckpointError) as error:
        MedCLIPAdapter(path)
    assert "vision_model.model.layer4.2.bn3.weight" in str(error.value)
    assert "vision_model.model.layer4.2.bn3.gamma" in str(error.value)


@pytest.mark.parametrize("variant", ["r50_file", "swin_file"])
def test_zero_shot_of_an_aligned_model_is_medclips_scaled_softmax(variant, loaded, images):
    adapter = loaded[variant]
    inputs = nn.functional.interpolate(images, size=224) if variant == "swin_file" else images
    embeddings = adapter.embed_image(inputs)
    assert embeddings.shape == (4, 512)
    torch.testing.assert_close(embeddings.double(), torch.stack([U, U, V, V]), atol=1e-4, rtol=0)
    scores = adapter.zero_shot_scores(inputs, ["effusion"], ("{}", "no {}"))
    scale = torch.tensor(2.6593).exp()  # MedCLIP's init log(1/0.07), inside the [0, 4.6052] clamp
    expected = torch.tensor([[1.0], [1.0], [0.0], [0.0]]) * 2 - 1
    torch.testing.assert_close(scores, torch.sigmoid(expected * scale), atol=1e-4, rtol=0)
    assert (scores[:2] > 0.99).all() and (scores[2:] < 0.01).all()


def test_text_embedding_is_medclips_and_batch_independent(r50_file, loaded, text_dir, towers):
    from transformers import AutoTokenizer

    adapter = loaded["r50_file"]
    together = adapter.embed_text(["effusion", "no large left pleural effusion"])
    alone = adapter.embed_text(["effusion"])
    assert together.shape == (2, 512)
    torch.testing.assert_close(together[:1], alone)
    bert = towers[2]
    head = torch.load(r50_file, weights_only=True)["text_model.projection_head.weight"]
    with torch.no_grad():
        raw = _medclip_text(bert, AutoTokenizer.from_pretrained(text_dir), "no large left pleural effusion")
    torch.testing.assert_close(together[1], nn.functional.normalize(head @ raw, dim=0), atol=1e-5, rtol=1e-4)


def test_without_text_encoder_the_text_side_is_ignored(r50_file):
    adapter = MedCLIPAdapter(r50_file)
    assert "embed_text" not in adapter.capabilities and "zero_shot" not in adapter.capabilities
    with pytest.raises(CapabilityError, match="text_encoder=DIR"):
        adapter.embed_text(["effusion"])
    assert list(adapter.encoder().out_channels) == [3, 64, 256, 512, 1024, 2048]
    assert adapter.mean != IMAGENET_MEAN
