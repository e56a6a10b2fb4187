"""MRM: MRM.pth's key layout from the authors' module structure, strict accounting, and MRM's own pooling."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import Block, PatchEmbed, VisionTransformer
from torch import nn

from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import WRAPPER_REASON
from vlpbench.adapters.mrm import DECODER_REASON, MrmAdapter, REPORT_REASON
from vlpbench.adapters.transformer import ViTEncoder
from vlpbench.errors import CheckpointError

LN = functools.partial(nn.LayerNorm, eps=1e-6)  # model_mrm.py:248
# MRM-pytorch util/misc.py:301-307: what save_model writes around the model's state dict.
CONTAINER = ["optimizer", "epoch", "scaler", "args"]


class MRMStructure(nn.Module):
    """MRM's module tree as model_mrm.py:33-64 builds it (``mrm()``, :244-249: ViT-B/16 encoder, 4-block decoder
    of width 768 with 6 heads, decoder_pred to (16 * 2)² * 3), the BERT of bert/bert_encoder.py:1-90 (6 layers,
    width 384, vocabulary 30000, 100 positions; MyBertModel keeps BertModel's pooler, bert/bert.py:7-9)."""

    def __init__(self, width=768, depth=12, heads=12, image=224, decoder_width=768, decoder_depth=4, decoder_heads=6,
                 bert_width=384, bert_layers=6, bert_heads=6, vocab=30000):
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM, BertModel

        self.patch_embed = PatchEmbed(image, 16, 3, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // 16) ** 2 + 1, width), requires_grad=False)
        self.blocks = nn.ModuleList(Block(width, heads, 4, qkv_bias=True, norm_layer=LN) for _ in range(depth))
        self.norm = LN(width)
        self.decoder_embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, (image // 16) ** 2 + 1, decoder_width))
        self.decoder_blocks = nn.ModuleList(Block(decoder_width, decoder_heads, 4, qkv_bias=True, norm_layer=LN)
                                            for _ in range(decoder_depth))
        self.decoder_norm = LN(decoder_width)
        self.decoder_pred = nn.Linear(decoder_width, 32 ** 2 * 3)
        config = BertConfig(vocab_size=vocab, hidden_size=bert_width, num_hidden_layers=bert_layers,
                            num_attention_heads=bert_heads, intermediate_size=4 * bert_width,
                            max_position_embeddings=100)
        self.bert_encoder = nn.Module()
        self.bert_encoder.model = BertForMaskedLM(config)
        self.bert_encoder.model.bert = BertModel(config)  # with the pooler, as MyBertModel
        self.bert_mlp = nn.Linear(width, bert_width)


@pytest.fixture(scope="module")
def published_state() -> dict[str, torch.Tensor]:
    """The real ViT-B/16 MRM state dict's names and shapes (meta tensors: no memory, no init)."""
    with torch.device("meta"):
        return MRMStructure().state_dict()


def _tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MRMStructure(width=64, heads=1, image=64, decoder_width=32, decoder_heads=1, bert_width=32,
                             bert_layers=1, bert_heads=1, vocab=50)
        for name, parameter in model.named_parameters():  # MAE zero-inits the tokens; make every tensor count
            if name in ("cls_token", "pos_embed"):
                nn.init.normal_(parameter, std=0.5)
        return model.state_dict()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny MRM.pth in the published container, args as an argparse.Namespace."""
    path = tmp_path_factory.mktemp("mrm") / "MRM.pth"
    torch.save({"model": _tiny_state(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 199,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mrm", input_size=224)}, path)
    return path


def test_published_layout_maps_every_encoder_key(published_state):
    report = MrmAdapter.map_weights({"model": published_state, **{k: 0 for k in CONTAINER}}, {"pool": "mean"}).report
    assert report.ok and report.layout == "mrm-vit-b16 (unwrapped 'model')"
    assert len(report.mapped) == 150  # cls_token, pos_embed, patch_embed.proj (2), 12 blocks x 12, norm (2)
    assert sorted(report.ignored[WRAPPER_REASON]) == sorted(CONTAINER)
    assert len(report.ignored[DECODER_REASON]) == 1 + 2 + 1 + 4 * 12 + 2 + 2
    assert report.ignored[REPORT_REASON] and all(k.startswith(("bert_encoder.", "bert_mlp.")) for k in
                                                 report.ignored[REPORT_REASON])
    assert ("blocks.11.attn.qkv.weight", "encoder.backbone.blocks.11.attn.qkv.weight") in report.mapped


def test_a_renamed_key_is_named(published_state):
    state = dict(published_state)
    state["blocks.7.attn.qkv_weight"] = state.pop("blocks.7.attn.qkv.weight")
    report = MrmAdapter.map_weights({"model": state}, {"pool": "mean"}).report
    assert report.missing == ["blocks.7.attn.qkv.weight"] and report.unexpected == ["blocks.7.attn.qkv_weight"]


def test_a_foreign_checkpoint_fails_naming_the_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(CheckpointError, match="missing: 4 keys(.|\n)*cls_token(.|\n)*unexpected: 1 keys"):
        build_adapter("mrm", path)


def test_the_file_loads_through_the_safe_loader_and_pools_as_mrm_finetunes(checkpoint):
    adapter = build_adapter("mrm", checkpoint)
    assert adapter.report.ok and adapter.options == {"pool": "mean"} and adapter.mean == (0.4978,) * 3
    encoder = adapter.encoder().eval()
    assert isinstance(encoder, ViTEncoder) and encoder.out_channels == (3, 0, 64, 64, 64, 64)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = encoder(images)
        pooled = encoder(images, output="pooled")
        # MRM's README loads MRM.pth into timm's ViT with global_pool="avg" (strict=False: fc_norm new).
        reference = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=12, num_heads=1,
                                      norm_layer=LN, global_pool="avg", num_classes=0)
        missing, _ = reference.load_state_dict(_tiny_state(), strict=False)
        expected = reference.eval()(images)
    assert missing == ["fc_norm.weight", "fc_norm.bias"]
    assert [tuple(m.shape[-2:]) for m in maps] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)


def test_cls_pooling_is_the_normed_class_token(checkpoint):
    encoder = build_adapter("mrm", checkpoint, pool="cls").encoder().eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(encoder(images, output="pooled"),
                                   encoder.backbone.forward_features(images)[:, 0], rtol=0, atol=1e-6)
