"""REFERS: jeonsworld ViT-pytorch key names, q/k/v stacked into timm's qkv, checked against a hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlpbench.adapters import build_adapter
from vlpbench.adapters.refers import HEAD_REASON, RefersAdapter
from vlpbench.errors import CheckpointError


def refers_shapes(width=768, depth=12, mlp=3072, image=224, patch=16) -> dict[str, tuple[int, ...]]:
    """refers_checkpoint.pth's names and shapes, written from funnyzhou/REFERS Fine-tune/NIH_ChestX-ray/models/
    modeling.py (ViT-B_16: configs.py:34-47, hidden 768, mlp 3072, 12 layers)."""
    shapes = {
        "transformer.embeddings.patch_embeddings.weight": (width, 3, patch, patch),  # :147-150
        "transformer.embeddings.patch_embeddings.bias": (width,),
        "transformer.embeddings.position_embeddings": (1, (image // patch) ** 2 + 1, width),  # :151
        "transformer.embeddings.cls_token": (1, 1, width),  # :152
        "transformer.encoder.encoder_norm.weight": (width,),  # :235
        "transformer.encoder.encoder_norm.bias": (width,),
    }
    for n in range(depth):  # Encoder.layer (:234-238) of Blocks (:171-178)
        block = f"transformer.encoder.layer.{n}."
        for norm in ("attention_norm", "ffn_norm"):
            shapes |= {f"{block}{norm}.weight": (width,), f"{block}{norm}.bias": (width,)}
        shapes |= {f"{block}ffn.fc1.weight": (mlp, width), f"{block}ffn.fc1.bias": (mlp,),  # Mlp :103-104
                   f"{block}ffn.fc2.weight": (width, mlp), f"{block}ffn.fc2.bias": (width,)}
        for linear in ("query", "key", "value", "out"):  # Attention :60-64
            shapes |= {f"{block}attn.{linear}.weight": (width, width), f"{block}attn.{linear}.bias": (width,)}
    return shapes


TINY = {"width": 128, "depth": 12, "mlp": 256, "image": 32}  # 128 wide: two 64-wide heads


def _tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in refers_shapes(**TINY).items():
        scale = 1.0 if key.endswith("norm.weight") else 0.1
        state[key] = torch.randn(shape, generator=generator) * scale + (1.0 if key.endswith("norm.weight") else 0.0)
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("refers") / "refers_checkpoint.pth"
    torch.save(_tiny_state(), path)
    return path


def test_published_layout_maps_every_key():
    state = {k: torch.empty(s, device="meta") for k, s in refers_shapes().items()}
    state |= {"head.weight": torch.empty(14, 768, device="meta"), "head.bias": torch.empty(14, device="meta")}
    report = RefersAdapter.map_weights(state, {"pool": "cls"}).report
    assert report.ok and report.layout == "refers-vit-b16"
    assert len(report.mapped) == len(refers_shapes()) == 198  # 150 timm keys, q/k/v apart: + 12 x 2 x 2
    assert report.ignored == {HEAD_REASON: ["head.weight", "head.bias"]}
    assert ("transformer.encoder.layer.3.attn.key.weight", "encoder.backbone.blocks.3.attn.qkv.weight") in report.mapped


def test_a_renamed_key_is_named():
    state = {k: torch.empty(s, device="meta") for k, s in refers_shapes().items()}
    state["transformer.encoder.layer.5.attn.value.weights"] = state.pop("transformer.encoder.layer.5.attn.value.weight")
    report = RefersAdapter.map_weights({"state_dict": {f"module.{k}": v for k, v in state.items()}}, {}).report
    assert report.missing == ["module.transformer.encoder.layer.5.attn.value.weight"]
    assert report.unexpected == ["module.transformer.encoder.layer.5.attn.value.weights"]


def test_a_wrong_shape_is_named(tmp_path):
    state = _tiny_state()
    state["transformer.encoder.layer.2.ffn.fc2.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"layer\.2\.ffn\.fc2\.bias: expected shape \(128,\), found \(3,\)"):
        build_adapter("refers", tmp_path / "bad.pth")


def _attention(state: dict, n: int, x: torch.Tensor, heads: int) -> torch.Tensor:
    """modeling.py Attention.forward (:76-97) written out: per-head softmax(q k^T / sqrt(d)) v, then ``out``."""
    block = f"transformer.encoder.layer.{n}.attn."
    q, k, v = (F.linear(x, state[f"{block}{p}.weight"], state[f"{block}{p}.bias"]) for p in ("query", "key", "value"))
    split = lambda t: t.view(*t.shape[:-1], heads, -1).permute(0, 2, 1, 3)  # transpose_for_scores, :70-74
    q, k, v = split(q), split(k), split(v)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    context = (probs @ v).permute(0, 2, 1, 3).reshape(x.shape)
    return F.linear(context, state[f"{block}out.weight"], state[f"{block}out.bias"])


def _reference_cls(state: dict, images: torch.Tensor, heads: int) -> torch.Tensor:
    """VisionTransformer.forward up to x[:, 0] (modeling.py:156-168, 180-190, 240-247, 274), by hand."""
    e = "transformer.embeddings."
    x = F.conv2d(images, state[f"{e}patch_embeddings.weight"], state[f"{e}patch_embeddings.bias"], stride=16)
    x = x.flatten(2).transpose(-1, -2)
    x = torch.cat([state[f"{e}cls_token"].expand(len(x), -1, -1), x], 1) + state[f"{e}position_embeddings"]
    norm = lambda t, name: F.layer_norm(t, t.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)
    for n in range(TINY["depth"]):
        block = f"transformer.encoder.layer.{n}."
        x = x + _attention(state, n, norm(x, f"{block}attention_norm"), heads)
        h = F.gelu(F.linear(norm(x, f"{block}ffn_norm"), state[f"{block}ffn.fc1.weight"], state[f"{block}ffn.fc1.bias"]))
        x = x + F.linear(h, state[f"{block}ffn.fc2.weight"], state[f"{block}ffn.fc2.bias"])
    return norm(x, "transformer.encoder.encoder_norm")[:, 0]


def test_joined_qkv_attention_equals_the_hand_computation(checkpoint):
    adapter = build_adapter("refers", checkpoint)
    assert adapter.report.ok and adapter.report.layout == "refers-vit-w128-d12-p16-32"
    assert adapter.vit_config.num_heads == 2
    encoder = adapter.encoder().eval()
    state = _tiny_state()
    tokens = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for n in (0, 11):
            torch.testing.assert_close(encoder.backbone.blocks[n].attn(tokens), _attention(state, n, tokens, 2),
                                       rtol=0, atol=1e-5)


def test_class_token_pooling_equals_refers_forward(checkpoint):
    encoder = build_adapter("refers", checkpoint).encoder().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pooled = encoder(images, output="pooled")
        maps = encoder(images)
    torch.testing.assert_close(pooled, _reference_cls(_tiny_state(), images, 2), rtol=0, atol=1e-4)
    assert encoder.out_channels == (3, 0, 128, 128, 128, 128)
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
