"""MGCA: the published Lightning resnet_50.ckpt layout, read without Lightning; its global embeddings."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer

from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import WRAPPER_REASON, CapabilityError, load_state_dict_file
from vlpbench.adapters.mgca import (
    CROSS_ATTENTION_REASON,
    IMAGE_LOCAL_HEAD_REASON,
    POSITION_IDS_REASON,
    PROTOTYPE_REASON,
    TEXT_LOCAL_HEAD_REASON,
    TEXT_SIDE_REASON,
    TOKEN_ATTENTION_REASON,
    MgcaAdapter,
)
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import write_mgca_checkpoint

LIGHTNING_ENTRIES = ["epoch", "global_step", "pytorch-lightning_version", "callbacks", "optimizer_states",
                     "lr_schedulers", "hparams_name", "hyper_parameters"]
# The checkpoint's text encoder is shrunk to 2 layers of width 24 to keep the file small.
TEXT_LAYERS, TEXT_HIDDEN = 2, 24
# GlobalEmbedding: Linear (2) + BatchNorm (5) + Linear (2) + BatchNorm without affine (3).
N_GLOBAL_HEAD = 12
# BERT keys of BertModel without pooler, minus token types: 4 embedding keys + 16 per layer.
N_BERT = 4 + 16 * TEXT_LAYERS
WORDS = ["no", "pleural", "effusion", "left", "small", "large", "pneumothorax"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [chr(c) for c in range(97, 123)] + [
    f"##{chr(c)}" for c in range(97, 123)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_mgca_checkpoint(tmp_path_factory.mktemp("mgca") / "resnet_50.ckpt", seed=3,
                                 text_layers=TEXT_LAYERS, text_hidden=TEXT_HIDDEN)


@pytest.fixture(scope="module")
def raw(ckpt):
    """The checkpoint as ``load_state_dict_file`` reads it."""
    return load_state_dict_file(ckpt)[0]


@pytest.fixture(scope="module")
def adapter(ckpt):
    return build_adapter("mgca", ckpt)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A Bio_ClinicalBERT-shaped folder (vocabulary size 28996) at the checkpoint's width, with 12 layers as
    Bio_ClinicalBERT's config says; a small word-piece vocabulary file."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    BertConfig(vocab_size=28996, hidden_size=TEXT_HIDDEN, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=4 * TEXT_HIDDEN).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_adapter(ckpt, text_dir):
    return MgcaAdapter(ckpt, text_encoder=str(text_dir))


@pytest.fixture(scope="module")
def image():
    """One 64×64 input; MGCA resizes it to 299² (each forward of that size is costly, so there is one)."""
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def image_embedding(adapter, image):
    return adapter.embed_image(image)


def _save(obj, path):
    torch.save(obj, path)
    return path


def _part(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _global_head(state, prefix, width):
    head = nn.Sequential(nn.Linear(width, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 128),
                         nn.BatchNorm1d(128, affine=False))
    head.load_state_dict(_part(state, prefix))
    return head.eval()


def test_published_layout_loads_with_everything_accounted(adapter, raw):
    report = adapter.report
    assert report.ok and report.layout == "mgca-resnet50 (unwrapped 'state_dict')"
    assert len(report.mapped) == 318 + N_GLOBAL_HEAD
    assert report.mapped[-1] == ("img_encoder_q.model.layer4.2.bn3.num_batches_tracked",
                                 "encoder.layer4.2.bn3.num_batches_tracked")
    assert ("img_encoder_q.global_embed.head.3.weight", "image_global_embed.3.weight") in report.mapped
    assert report.ignored[WRAPPER_REASON] == LIGHTNING_ENTRIES
    assert len(report.ignored[IMAGE_LOCAL_HEAD_REASON]) == 12  # Conv1d with bias (2) + BN (5) + Conv1d (2) + BN (3)
    assert report.ignored[PROTOTYPE_REASON] == ["prototype_layer.weight"]
    assert len(report.ignored[TOKEN_ATTENTION_REASON]) == 8
    assert all(k.startswith("text_encoder_q.") for k in report.ignored[TEXT_SIDE_REASON])
    assert sum(map(len, report.ignored.values())) - len(LIGHTNING_ENTRIES) + len(report.mapped) == len(raw["state_dict"])
    assert adapter.decoder_state_dict() is None and adapter.capabilities == {"features", "embed_image"}
    assert adapter.mean == adapter.std == (0.5, 0.5, 0.5) and adapter.encoder_name == "resnet50"
    assert adapter.encoder_depth == 5


def test_file_has_the_published_structure(raw):
    # Lightning's AttributeDict comes back as a plain dict, without Lightning installed.
    assert type(raw["hyper_parameters"]) is dict and raw["hyper_parameters"]["img_encoder"] == "resnet_50"
    state = raw["state_dict"]
    shapes = {
        "img_encoder_q.model.conv1.weight": (64, 3, 7, 7),
        "img_encoder_q.global_embed.head.0.weight": (2048, 2048),
        "img_encoder_q.global_embed.head.4.running_var": (128,),
        "img_encoder_q.local_embed.head.0.weight": (2048, 1024, 1),
        "img_encoder_q.local_embed.head.0.bias": (2048,),
        "img_encoder_q.local_embed.head.3.weight": (128, 2048, 1),
        "text_encoder_q.model.embeddings.word_embeddings.weight": (28996, TEXT_HIDDEN),
        "text_encoder_q.model.encoder.layer.1.crossattention.self.key.weight": (TEXT_HIDDEN, TEXT_HIDDEN),
        "text_encoder_q.global_embed.head.0.weight": (2048, TEXT_HIDDEN),
        "text_encoder_q.local_embed.head.0.weight": (2048, TEXT_HIDDEN, 1),
        "patch_local_atten_layer.in_proj_weight": (384, 128),
        "word_local_atten_layer.in_proj_weight": (384, 128),
        "prototype_layer.weight": (500, 128),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert "img_encoder_q.global_embed.head.4.weight" not in state  # BN(128, affine=False)
    assert "text_encoder_q.model.embeddings.token_type_embeddings.weight" not in state  # med.BertEmbeddings
    assert not any(k.startswith("img_encoder_q.model.fc.") for k in state)


def test_encoder_holds_the_checkpoint_weights(adapter, raw):
    state = adapter.encoder().state_dict()
    assert len(state) == 318
    for key in state:
        assert torch.equal(state[key], raw["state_dict"][f"img_encoder_q.model.{key}"]), key


def test_embed_image_equals_a_hand_built_mgca_image_encoder(image_embedding, raw, image):
    state = raw["state_dict"]
    with torch.device("meta"):  # no random init: every tensor is assigned from the checkpoint
        resnet = torchvision.models.resnet50()
    resnet.fc = nn.Identity()
    resnet.load_state_dict(_part(state, "img_encoder_q.model."), assign=True)
    head = _global_head(state, "img_encoder_q.global_embed.head.", 2048)
    with torch.no_grad():
        upsampled = nn.Upsample(size=(299, 299), mode="bilinear", align_corners=True)(image)
        expected = nn.functional.normalize(head(resnet.eval()(upsampled)), dim=-1)
    assert image_embedding.shape == (1, 128)
    torch.testing.assert_close(image_embedding, expected, rtol=1e-4, atol=1e-5)


def test_text_side_is_mapped_with_a_text_encoder_folder(text_adapter, raw):
    report = text_adapter.report
    assert report.ok
    assert Counter(target.split(".", 1)[0] for _, target in report.mapped) == {
        "encoder": 318, "image_global_embed": N_GLOBAL_HEAD, "text_model": N_BERT, "text_global_embed": N_GLOBAL_HEAD}
    assert len(report.ignored[CROSS_ATTENTION_REASON]) == 10 * TEXT_LAYERS
    assert report.ignored[POSITION_IDS_REASON] == ["text_encoder_q.model.embeddings.position_ids"]
    assert len(report.ignored[TEXT_LOCAL_HEAD_REASON]) == 12 and TEXT_SIDE_REASON not in report.ignored
    assert sum(map(len, report.ignored.values())) - len(LIGHTNING_ENTRIES) + len(report.mapped) == len(raw["state_dict"])
    assert text_adapter.capabilities == {"features", "embed_image", "embed_text", "zero_shot"}


def test_embed_text_is_the_report_head_over_cls_with_mgca_position_ids(text_adapter, raw, text_dir):
    state = raw["state_dict"]
    config = BertConfig.from_pretrained(text_dir)
    config.num_hidden_layers = TEXT_LAYERS
    bert = BertModel(config, add_pooling_layer=False)
    weights = {k: v for k, v in _part(state, "text_encoder_q.model.").items()
               if ".crossattention." not in k and k != "embeddings.position_ids"}
    weights["embeddings.token_type_embeddings.weight"] = torch.zeros(2, TEXT_HIDDEN)
    bert.load_state_dict(weights)
    head = _global_head(state, "text_encoder_q.global_embed.head.", TEXT_HIDDEN)
    tokens = BertTokenizer.from_pretrained(text_dir)(["no pleural effusion"], return_tensors="pt")
    with torch.no_grad():
        # MGCA hands the token-type ids (all 0) to med.BertModel where it takes position ids.
        hidden = bert.eval()(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                             position_ids=tokens["token_type_ids"]).last_hidden_state
        expected = nn.functional.normalize(head(hidden[:, 0]), dim=-1)
    torch.testing.assert_close(text_adapter.embed_text(["no pleural effusion"]), expected)
    # Every token sits at position 0, so the [CLS] output ignores word order; punctuation and case are dropped.
    same = text_adapter.embed_text(["effusion pleural no", "No, pleural EFFUSION!"])
    torch.testing.assert_close(same, expected.expand(2, -1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(text_adapter.embed_text(["small left pneumothorax"]), expected)


def test_zero_shot_is_chexzero_softmax_over_the_prompt_pair(text_adapter, image, image_embedding):
    scores = text_adapter.zero_shot_scores(image, ["effusion", "pneumothorax"])
    text = text_adapter.embed_text(["effusion", "no effusion", "pneumothorax", "no pneumothorax"])
    # The text adapter holds the same image weights as the image-only one.
    positive, negative = (image_embedding @ text[0::2].T).exp(), (image_embedding @ text[1::2].T).exp()
    expected = positive / (positive + negative)
    assert scores.shape == (1, 2) and bool(((scores > 0) & (scores < 1)).all())
    torch.testing.assert_close(scores, expected)


def test_describe_records_the_text_encoder_files(text_adapter, text_dir):
    record = text_adapter.describe()["text_encoder"]
    files = sorted(p.name for p in text_dir.iterdir())
    digest = hashlib.sha256()
    for name in files:
        digest.update(f"{name}\0{hashlib.sha256((text_dir / name).read_bytes()).hexdigest()}\n".encode())
    assert record == {"path": str(text_dir), "sha256": digest.hexdigest(), "files": files}
    assert {"config.json", "vocab.txt"} <= set(files)


def test_without_text_encoder_text_and_dense_embeddings_name_why(adapter):
    with pytest.raises(CapabilityError, match=r"'mgca'.*embed_text.*--model-option text_encoder=DIR"):
        adapter.embed_text(["no effusion"])
    with pytest.raises(CapabilityError, match="word embeddings"):
        adapter.dense_embed(torch.zeros(1, 3, 64, 64))
    with pytest.raises(CapabilityError, match="zero_shot"):
        adapter.require("zero_shot")
    assert "text_encoder" not in adapter.describe()


def test_encoder_only_state_dict_loads_without_embed_image(tmp_path, raw):
    state = {k: v for k, v in raw["state_dict"].items() if k.startswith("img_encoder_q.model.")}
    only = MgcaAdapter(_save({"state_dict": state}, tmp_path / "encoder_only.ckpt"))
    assert only.report.ok and len(only.report.mapped) == 318 and only.capabilities == {"features"}
    with pytest.raises(CapabilityError, match="img_encoder_q.global_embed"):
        only.embed_image(torch.zeros(1, 3, 64, 64))


def test_text_encoder_must_be_a_local_bert_folder(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="text_encoder"):
        MgcaAdapter.inspect(ckpt, text_encoder=str(tmp_path / "absent"))


def test_renamed_key_fails_naming_it(tmp_path, raw):
    state = dict(raw["state_dict"])
    state["img_encoder_q.model.layer4.2.bn3.gamma"] = state.pop("img_encoder_q.model.layer4.2.bn3.weight")
    state["img_encoder_q.global_embed.head.0.weights"] = state.pop("img_encoder_q.global_embed.head.0.weight")
    path = _save({**raw, "state_dict": state}, tmp_path / "renamed.ckpt")
    with pytest.raises(CheckpointError) as info:
        MgcaAdapter(path)
    for key in ("layer4.2.bn3.weight", "layer4.2.bn3.gamma", "global_embed.head.0.weight", "head.0.weights"):
        assert key in str(info.value)
    report = MgcaAdapter.inspect(path)
    assert sorted(report.missing) == ["img_encoder_q.global_embed.head.0.weight", "img_encoder_q.model.layer4.2.bn3.weight"]
    assert sorted(report.unexpected) == ["img_encoder_q.global_embed.head.0.weights",
                                         "img_encoder_q.model.layer4.2.bn3.gamma"]


def test_ddp_prefix_inside_state_dict_is_stripped(tmp_path, raw):
    state = {f"module.{k}": v for k, v in raw["state_dict"].items()}
    path = _save({**raw, "state_dict": state}, tmp_path / "ddp.ckpt")
    report = MgcaAdapter.inspect(path)
    assert report.ok and report.layout == "mgca-resnet50 (unwrapped 'state_dict', stripped 'module.')"
    assert len(report.mapped) == 318 + N_GLOBAL_HEAD
    assert report.ignored[PROTOTYPE_REASON] == ["module.prototype_layer.weight"]


@pytest.mark.parametrize("marked_by", ["hyper_parameters", "keys"])
def test_vit_variant_is_refused(tmp_path, marked_by):
    state = {"img_encoder_q.model.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
             "img_encoder_q.model.blocks.0.norm1.weight": torch.zeros(768)}
    hparams = {"img_encoder": "vit_base" if marked_by == "hyper_parameters" else "unknown"}
    path = _save({"state_dict": state, "hyper_parameters": hparams, "epoch": 49}, tmp_path / "vit_base.ckpt")
    for call in (lambda: MgcaAdapter(path), lambda: MgcaAdapter.inspect(path)):
        with pytest.raises(CheckpointError, match="ViT-B/16 variant.*--model mgca_vit"):
            call()
