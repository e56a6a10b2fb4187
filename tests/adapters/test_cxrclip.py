"""CXR-CLIP: the published r50_*.tar / swint_*.tar layouts, container accounting, variant, embeddings, zero-shot."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, SwinConfig

from vlpbench import api
from vlpbench.adapters.base import IMAGENET_MEAN, IMAGENET_STD
from vlpbench.adapters.cxrclip import (
    CONFIG_REASON,
    COPY_REASON,
    TEXT_SIDE_REASON,
    TRAINING_STATE_REASON,
    CXRClipAdapter,
)
from vlpbench.errors import CheckpointError
from vlpbench.testing import write_tiny_bert_folder
from vlpbench.testing.hf import cxrclip_checkpoint, cxrclip_resnet, hf_swin_model, renamed, tiny_bert, \
    tiny_swin_config

# kakaobrain/cxr-clip cxrclip/model/modules/image_encoder.py:52-58: torchvision ResNet-50 without fc (318 keys).
R50_KEYS = 318
# text_encoder.py:18 Bio_ClinicalBERT AutoModel: 5 embedding + 16 per layer × 12 + 2 pooler, + position_ids (4.x).
BIO_CLINICAL_BERT_KEYS = 5 + 16 * 12 + 2 + 1
# SwinModel swin-tiny in 4.x names: 219 weights + 12 relative_position_index buffers (see test_swin.py).
SWIN_TINY_KEYS = 219 + 12
# projection.py:23-29 LinearProjectionHead ×2 (weight, bias) and clip.py:41 logit_scale.
HEAD_KEYS = 2 + 2 + 1
TRAINING = ["optimizer", "scheduler", "epoch", "train_loss"]
U, V = torch.eye(512, dtype=torch.float64)[:2]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return str(write_tiny_bert_folder(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def towers(text_dir):
    """The authors' modules, random init under seed 0: ResNet-50 without fc, tiny SwinModel, tiny BERT."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cxrclip_resnet().eval(), hf_swin_model(tiny_swin_config()).eval(), tiny_bert(text_dir).eval()


@pytest.fixture(scope="module")
def images():
    """Inputs per variant: 64 px for the ResNet (any size runs), 224 px for the SwinModel reference."""
    generator = torch.Generator().manual_seed(4)
    return {"r50": torch.randn(4, 3, 64, 64, generator=generator),
            "swin": torch.randn(4, 3, 224, 224, generator=generator)}


def _eos(bert: nn.Module, tokenizer, text: str) -> torch.Tensor:
    """CXRClip.encode_text with pooling 'eos' (clip.py:56-62): the last hidden state at the [SEP] token."""
    batch = tokenizer([text], return_tensors="pt")
    return bert(**batch).last_hidden_state[0, int(batch["attention_mask"].sum()) - 1]


def _aligned(payload: dict, features: torch.Tensor, bert, text_dir) -> dict:
    """``payload`` with image_projection sending images 0-1 to U and 2-3 to V, text_projection "effusion" to U and
    "No effusion" to V (exact least squares, zero biases)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    with torch.no_grad():
        text = torch.stack([_eos(bert, tokenizer, t) for t in ("effusion", "No effusion")]).double()
    model = dict(payload["model"])
    model["image_projection.projection.weight"] = (torch.stack([U, U, V, V], 1) @ torch.linalg.pinv(
        features.double().T)).float()
    model["text_projection.projection.weight"] = (torch.stack([U, V], 1) @ torch.linalg.pinv(text.T)).float()
    return {**payload, "model": model}


@pytest.fixture(scope="module")
def files(towers, images, text_dir, tmp_path_factory):
    """r50_mcc.tar and swint_m.tar layouts, aligned on ``images``."""
    resnet, swin_model, bert = towers
    folder = tmp_path_factory.mktemp("cxrclip")
    with torch.no_grad():
        r50_features = nn.Sequential(*resnet.children(), nn.Flatten())(images["r50"])  # fc deleted: ends at avgpool
        swin_features = swin_model(pixel_values=images["swin"]).last_hidden_state[:, 0]
    payloads = {
        "r50": _aligned(cxrclip_checkpoint(resnet, bert, swin=False, datasets=("mimic_cxr", "chexpert", "chest14")),
                        r50_features, bert, text_dir),
        "swin": _aligned(cxrclip_checkpoint(swin_model, bert, swin=True, datasets=("mimic_cxr",)),
                         swin_features, bert, text_dir),
    }
    paths = {}
    for name, payload in payloads.items():
        paths[name] = folder / f"{name}.tar"
        torch.save(payload, paths[name])
    return paths


@pytest.fixture(scope="module")
def loaded(files, text_dir):
    return {name: CXRClipAdapter(path, text_encoder=text_dir) for name, path in files.items()}


@pytest.mark.parametrize("swin", [False, True])
def test_published_layout_accounts_every_key(swin):
    with torch.device("meta"):
        vision = hf_swin_model(SwinConfig()) if swin else cxrclip_resnet()
        payload = cxrclip_checkpoint(vision, BertModel(BertConfig(vocab_size=28996)), swin=swin)
    assert len(payload["model"]) == (SWIN_TINY_KEYS if swin else R50_KEYS) + BIO_CLINICAL_BERT_KEYS + HEAD_KEYS
    report = CXRClipAdapter.map_weights(payload, {"text_encoder": ""}).report
    assert report.ok, report.format()
    assert report.layout == ("cxrclip-swin" if swin else "cxrclip-resnet50") + " (unwrapped 'model')"
    assert report.ignored[TRAINING_STATE_REASON] == TRAINING and report.ignored[CONFIG_REASON] == ["config"]
    assert len(report.ignored[TEXT_SIDE_REASON]) == BIO_CLINICAL_BERT_KEYS + 2
    assert len(report.mapped) == (219 if swin else R50_KEYS) + 3  # image encoder, image_projection, logit_scale


def test_sibling_tower_dicts_are_copies_or_unexpected():
    with torch.device("meta"):
        payload = cxrclip_checkpoint(cxrclip_resnet(), BertModel(BertConfig(vocab_size=100, hidden_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)), swin=False)
    model = payload["model"]
    copy = {k.removeprefix("image_encoder."): torch.zeros(1) for k in list(model)[:2]}
    model = {**model, **{f"image_encoder.{k}": torch.zeros(1) for k in copy}}
    report = CXRClipAdapter.map_weights({**payload, "model": model, "image_encoder": copy,
                                         "text_encoder": {"stray": torch.ones(1)}}, {"text_encoder": ""}).report
    assert report.ignored[COPY_REASON] == [f"image_encoder/{k}" for k in copy]
    assert report.unexpected == ["text_encoder/stray"]


@pytest.mark.parametrize("name", ["r50", "swin"])
def test_loads_with_text_side_and_records_the_variant(loaded, name):
    adapter = loaded[name]
    assert adapter.report.ok and not adapter.report.unexpected
    variant = adapter.describe()["variant"]
    if name == "r50":
        assert (adapter.mean, adapter.std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert variant["code"] == "mcc" and variant["image_encoder"] == "resnet50"
        assert adapter.card.pretraining_data == ("mimic_cxr", "chexpert", "cxr14")
    else:
        assert (adapter.mean, adapter.std) == ((0.5,) * 3, (0.5,) * 3)
        assert variant["code"] == "m" and variant["config_image_encoder"] == "microsoft/swin-tiny-patch4-window7-224"
        assert adapter.card.pretraining_data == ("mimic_cxr",)
        assert api.pretraining_overlap(adapter, "chexpert") is None  # swint_m saw no CheXpert
    assert CXRClipAdapter.card.pretraining_data == ("mimic_cxr", "chexpert", "cxr14")
    assert "evaluator.py:208-226" in adapter.describe()["procedures"]["zero_shot"]


def test_renamed_key_fails_naming_it(files, tmp_path):
    payload = torch.load(files["r50"], weights_only=True)
    old, new = "image_projection.projection.bias", "image_projection.projection.b"
    path = tmp_path / "r50_mc.tar"
    torch.save({**payload, "model": renamed(payload["model"], old, new)}, path)
    with pytest.raises(CheckpointError) as error:
        CXRClipAdapter(path)
    assert old in str(error.value) and new in str(error.value)


@pytest.mark.parametrize("name", ["r50", "swin"])
def test_zero_shot_of_an_aligned_model_is_cxrclips_bare_cosine_softmax(loaded, images, name):
    adapter, images = loaded[name], images[name]
    embeddings = adapter.embed_image(images)
    assert embeddings.shape == (4, 512)
    torch.testing.assert_close(embeddings.double(), torch.stack([U, U, V, V]), atol=1e-4, rtol=0)
    scores = adapter.zero_shot_scores(images, ["effusion"], ("{}", "No {}"))
    expected = torch.sigmoid(torch.tensor([[1.0], [1.0], [-1.0], [-1.0]]))  # softmax of cosines (1, 0) / (0, 1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


def test_text_embedding_is_the_eos_token_projected(loaded, files, towers, text_dir):
    from transformers import AutoTokenizer

    adapter = loaded["r50"]
    texts = ["effusion", "small left pleural effusion"]
    got = adapter.embed_text(texts)
    head = torch.load(files["r50"], weights_only=True)["model"]
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    with torch.no_grad():
        raw = torch.stack([_eos(towers[2], tokenizer, t) for t in texts])
    want = raw @ head["text_projection.projection.weight"].T + head["text_projection.projection.bias"]
    torch.testing.assert_close(got, nn.functional.normalize(want, dim=-1), atol=1e-5, rtol=1e-4)
