"""MGCA-ViT: the published Lightning vit_base.ckpt layout, its class-token embedding, zero-shot on an aligned model."""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertTokenizer

from vlpbench import api
from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import WRAPPER_REASON, CapabilityError, load_state_dict_file
from vlpbench.adapters.mgca import (
    CROSS_ATTENTION_REASON,
    POSITION_IDS_REASON,
    PROTOTYPE_REASON,
    TEXT_SIDE_REASON,
    TOKEN_ATTENTION_REASON,
    MgcaAdapter,
)
from vlpbench.adapters.mgca_vit import IMAGE_LOCAL_HEAD_REASON, MgcaVitAdapter
from vlpbench.adapters.transformer import ViTEncoder, default_out_indices
from vlpbench.cli import main
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import write_mgca_checkpoint, write_tiny_bert_folder
from vlpbench.testing.vit import mgca_vit_state, write_mgca_vit_checkpoint

# A ViT of MGCA's structure shrunk to one 64-wide head, 2 blocks, a 4×4 grid of 16-pixel patches (64² input).
WIDTH, DEPTH, GRID, SIZE = 64, 2, 4, 64
TEXT_LAYERS, TEXT_HIDDEN = 2, 24
# vits.py:144-164: patch_embed.proj (2) + cls_token + pos_embed + 12 per Block (:89-98: norm1, attn.qkv,
# attn.proj, norm2, mlp.fc1, mlp.fc2, weight and bias each) + norm (2).
N_VIT = 4 + 12 * DEPTH + 2
N_GLOBAL_HEAD = 12  # GlobalEmbedding (encoder.py:24-30): Linear 2 + BN 5 + Linear 2 + BN without affine 3
N_BERT = 4 + 16 * TEXT_LAYERS  # BertModel without pooler and token types
# The published ViT-B/16 (vits.py:329-333: width 768, depth 12, patch 16, 224² → 197 positions).
VIT_B_KEYS = 150
VIT_B_SHAPES = {
    "img_encoder_q.model.patch_embed.proj.weight": (768, 3, 16, 16),
    "img_encoder_q.model.cls_token": (1, 1, 768),
    "img_encoder_q.model.pos_embed": (1, 197, 768),
    "img_encoder_q.model.blocks.11.attn.qkv.weight": (2304, 768),
    "img_encoder_q.model.blocks.11.mlp.fc1.weight": (3072, 768),
    "img_encoder_q.model.norm.bias": (768,),
    "img_encoder_q.global_embed.head.0.weight": (2048, 768),  # encoder.py:88-90
    "img_encoder_q.global_embed.head.4.running_var": (128,),
    "img_encoder_q.local_embed.head.0.weight": (2048, 768, 1),  # encoder.py:92-94, LocalEmbedding :40-48
    "img_encoder_q.local_embed.head.3.weight": (128, 2048, 1),
}
LIGHTNING_ENTRIES = ["epoch", "global_step", "pytorch-lightning_version", "callbacks", "optimizer_states",
                     "lr_schedulers", "hparams_name", "hyper_parameters"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A tiny BERT folder at the checkpoint's text width, with Bio_ClinicalBERT's vocabulary size (28996)."""
    folder = write_tiny_bert_folder(tmp_path_factory.mktemp("bert"), hidden=TEXT_HIDDEN, layers=12)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 28996}))
    return folder


@pytest.fixture(scope="module")
def no_token(text_dir):
    return BertTokenizer.from_pretrained(text_dir).convert_tokens_to_ids("no")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_mgca_vit_checkpoint(tmp_path_factory.mktemp("mgca_vit") / "vit_base.ckpt", seed=5, width=WIDTH,
                                     depth=DEPTH, grid=GRID, text_layers=TEXT_LAYERS, text_hidden=TEXT_HIDDEN)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, no_token):
    return write_mgca_vit_checkpoint(tmp_path_factory.mktemp("aligned") / "vit_base.ckpt", width=WIDTH, depth=DEPTH,
                                     grid=GRID, text_layers=TEXT_LAYERS, text_hidden=TEXT_HIDDEN,
                                     aligned_no_token=no_token)


@pytest.fixture(scope="module")
def raw(ckpt):
    return load_state_dict_file(ckpt)[0]


@pytest.fixture(scope="module")
def adapter(ckpt):
    return build_adapter("mgca_vit", ckpt)


@pytest.fixture(scope="module")
def text_adapter(ckpt, text_dir):
    return MgcaVitAdapter(ckpt, text_encoder=str(text_dir))


def _images(brightness: list[float]) -> torch.Tensor:
    """Grey images of the given values in [0, 1], preprocessed as MGCA does (mean = std = 0.5)."""
    pixels = torch.tensor(brightness).view(-1, 1, 1, 1).expand(-1, 3, SIZE, SIZE)
    return (pixels - 0.5) / 0.5


def test_published_vit_base_layout_is_accounted_key_by_key(text_dir):
    """The real ViT-B/16 shapes (built on the meta device: names and shapes only) with the real text width."""
    with torch.device("meta"):
        state = mgca_vit_state()
    assert {k: tuple(state[k].shape) for k in VIT_B_SHAPES} == VIT_B_SHAPES
    assert sum(k.startswith("img_encoder_q.model.") for k in state) == VIT_B_KEYS
    folder = text_dir.parent / "bert768"
    folder.mkdir(exist_ok=True)
    BertConfig(vocab_size=28996, hidden_size=768, num_hidden_layers=12).save_pretrained(folder)
    checkpoint = {"state_dict": state, "hyper_parameters": {"img_encoder": "vit_base"}, "epoch": 49}
    report = MgcaVitAdapter.map_weights(checkpoint, {"text_encoder": str(folder)})
    assert report.report.ok and report.report.layout == "mgca-vit-b16 (unwrapped 'state_dict')"
    mapped = Counter(target.split(".", 1)[0] for _, target in report.report.mapped)
    assert mapped == {"encoder": VIT_B_KEYS, "image_global_embed": N_GLOBAL_HEAD, "text_model": 4 + 16 * 6,
                      "text_global_embed": N_GLOBAL_HEAD}


def test_tiny_checkpoint_loads_with_everything_accounted(adapter, raw):
    report = adapter.report
    assert report.ok and report.layout == f"mgca-vit-w{WIDTH}-d{DEPTH}-p16-{SIZE} (unwrapped 'state_dict')"
    assert len(report.mapped) == N_VIT + N_GLOBAL_HEAD
    assert report.mapped[0] == ("img_encoder_q.model.cls_token", "encoder.backbone.cls_token")
    assert ("img_encoder_q.model.blocks.1.attn.qkv.bias", "encoder.backbone.blocks.1.attn.qkv.bias") in report.mapped
    assert report.ignored[WRAPPER_REASON] == LIGHTNING_ENTRIES
    assert len(report.ignored[IMAGE_LOCAL_HEAD_REASON]) == 12
    assert report.ignored[PROTOTYPE_REASON] == ["prototype_layer.weight"]
    assert len(report.ignored[TOKEN_ATTENTION_REASON]) == 8
    assert all(k.startswith("text_encoder_q.") for k in report.ignored[TEXT_SIDE_REASON])
    accounted = sum(map(len, report.ignored.values())) - len(LIGHTNING_ENTRIES) + len(report.mapped)
    assert accounted == len(raw["state_dict"])
    assert adapter.capabilities == {"features", "embed_image"} and adapter.image_size == SIZE
    assert adapter.mean == adapter.std == (0.5, 0.5, 0.5)
    described = adapter.describe()
    assert described["vit"] == {"patch_size": 16, "embed_dim": WIDTH, "depth": DEPTH, "num_heads": 1, "mlp_ratio": 4.0,
                                "image_size": SIZE, "norm_eps": 1e-6, "pre_norm": False, "act": "gelu"}
    assert described["pool"] == "cls: class token after the final LayerNorm"


def _mgca_vit_forward(state: dict, images: torch.Tensor) -> torch.Tensor:
    """MGCA's ViT forward written out from vits.py (:183-198, Block :104-108, Attention :62-81, Mlp :27-33)
    with one 64-wide head, and the class token through global_embed (encoder.py:141-143, mgca_module.py:90)."""
    def p(name):
        return state[f"img_encoder_q.model.{name}"]

    def layer_norm(x, name):
        return nn.functional.layer_norm(x, (WIDTH,), p(f"{name}.weight"), p(f"{name}.bias"), eps=1e-6)

    x = nn.functional.conv2d(images, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=16)
    x = torch.cat([p("cls_token").expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + p("pos_embed")
    for i in range(DEPTH):
        q, k, v = nn.functional.linear(layer_norm(x, f"blocks.{i}.norm1"), p(f"blocks.{i}.attn.qkv.weight"),
                                       p(f"blocks.{i}.attn.qkv.bias")).chunk(3, dim=-1)
        attention = (q @ k.transpose(-2, -1) * WIDTH ** -0.5).softmax(dim=-1)
        x = x + nn.functional.linear(attention @ v, p(f"blocks.{i}.attn.proj.weight"), p(f"blocks.{i}.attn.proj.bias"))
        hidden = nn.functional.linear(layer_norm(x, f"blocks.{i}.norm2"), p(f"blocks.{i}.mlp.fc1.weight"),
                                      p(f"blocks.{i}.mlp.fc1.bias"))
        hidden = nn.functional.gelu(hidden)
        x = x + nn.functional.linear(hidden, p(f"blocks.{i}.mlp.fc2.weight"), p(f"blocks.{i}.mlp.fc2.bias"))
    head = nn.Sequential(nn.Linear(WIDTH, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 128),
                         nn.BatchNorm1d(128, affine=False))
    head.load_state_dict({k.removeprefix("img_encoder_q.global_embed.head."): v for k, v in state.items()
                          if k.startswith("img_encoder_q.global_embed.head.")})
    return nn.functional.normalize(head.eval()(layer_norm(x, "norm")[:, 0]), dim=-1)


def test_embed_image_is_mgcas_class_token_through_global_embed(adapter, raw):
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _mgca_vit_forward(raw["state_dict"], images)
    embedding = adapter.embed_image(images)
    assert embedding.shape == (2, 128)
    torch.testing.assert_close(embedding, expected, rtol=1e-4, atol=1e-5)


def test_text_side_maps_with_a_text_encoder_folder(text_adapter, raw):
    report = text_adapter.report
    assert report.ok
    assert Counter(target.split(".", 1)[0] for _, target in report.mapped) == {
        "encoder": N_VIT, "image_global_embed": N_GLOBAL_HEAD, "text_model": N_BERT, "text_global_embed": N_GLOBAL_HEAD}
    assert len(report.ignored[CROSS_ATTENTION_REASON]) == 10 * TEXT_LAYERS
    assert report.ignored[POSITION_IDS_REASON] == ["text_encoder_q.model.embeddings.position_ids"]
    assert text_adapter.capabilities == {"features", "embed_image", "embed_text", "zero_shot"}
    assert text_adapter.embed_text(["no pleural effusion", "small pneumothorax"]).shape == (2, 128)


def test_zero_shot_on_an_aligned_model_reads_the_image(aligned, text_dir):
    model = MgcaVitAdapter(aligned, text_encoder=str(text_dir))
    scores = model.zero_shot_scores(_images([0.9, 0.7, 0.3, 0.1]), ["effusion", "pneumothorax"])
    # Image and text embeddings are ±(e0 - e1)/√2: cosines ±1, CheXzero's pair softmax of bare cosines.
    bright, dark = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))
    expected = torch.tensor([[bright] * 2, [bright] * 2, [dark] * 2, [dark] * 2])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_renamed_key_fails_naming_it(tmp_path, raw):
    state = dict(raw["state_dict"])
    state["img_encoder_q.model.blocks.1.attn.qkv.weights"] = state.pop("img_encoder_q.model.blocks.1.attn.qkv.weight")
    path = tmp_path / "renamed.ckpt"
    torch.save({**raw, "state_dict": state}, path)
    with pytest.raises(CheckpointError) as info:
        MgcaVitAdapter(path)
    message = str(info.value)
    assert "missing: 1 keys\n  - img_encoder_q.model.blocks.1.attn.qkv.weight" in message
    assert "unexpected: 1 keys\n  - img_encoder_q.model.blocks.1.attn.qkv.weights" in message


def test_each_variant_points_to_the_other_adapter(tmp_path, ckpt):
    resnet = write_mgca_checkpoint(tmp_path / "resnet_50.ckpt", text_layers=0, text_hidden=12)
    with pytest.raises(CheckpointError, match=r"ResNet-50 variant \(resnet_50.ckpt; hyper_parameters.img_encoder "
                                              r"== 'resnet_50'\).*--model mgca"):
        MgcaVitAdapter(resnet)
    state = load_state_dict_file(resnet)[0]["state_dict"]
    torch.save({"state_dict": state}, tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match=r"keys img_encoder_q.model.conv1.\* / layer1.\*.*--model mgca"):
        MgcaVitAdapter(tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match="ViT-B/16 variant.*--model mgca_vit"):
        MgcaAdapter(ckpt)


def test_encoder_is_the_checkpoint_vit_behind_a_feature_pyramid(adapter, raw):
    encoder = adapter.encoder()
    assert isinstance(encoder, ViTEncoder) and encoder.out_channels == (3, 0, WIDTH, WIDTH, WIDTH, WIDTH)
    for key, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, raw["state_dict"][f"img_encoder_q.model.{key}"]), key
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        maps = encoder.eval()(images)
        pooled = encoder.pooled(images)
        head = adapter._image_head
        # The linear probe's feature is what MGCA's global head reads: the class token after the final norm.
        torch.testing.assert_close(nn.functional.normalize(head(pooled), dim=-1), adapter.embed_image(images))
    assert [tuple(m.shape[1:]) for m in maps] == [(3, 64, 64), (0, 32, 32), (WIDTH, 16, 16), (WIDTH, 8, 8),
                                                  (WIDTH, 4, 4), (WIDTH, 2, 2)]


def test_what_is_not_offered_says_why(adapter):
    with pytest.raises(CapabilityError, match="word embeddings"):
        adapter.dense_embed(_images([0.5]))
    with pytest.raises(ConfigError, match=r"\(B, 3, 64, 64\), its pre-training size"):
        adapter.embed_image(torch.zeros(1, 3, 32, 32))


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "rsna"
    api.synth("rsna", root, n=30, size=SIZE, progress=False)
    return root


def _run(*args: str) -> dict:
    """``vlpbench run`` on the CPU with ``args``; the record it wrote."""
    results = Path(tempfile.mkdtemp(prefix="mgca_vit_run"))
    assert main(["-q", "run", "--model", "mgca_vit", "--frac", "1.0", "--results", str(results), "--device", "cpu",
                 "--set", "bootstrap_resamples=20", *args]) == 0
    (path,) = results.rglob("*.json")
    return json.loads(path.read_text())


def test_rsna_zero_shot_runs_from_the_cli(rsna_root, aligned, text_dir):
    record = _run("--checkpoint", str(aligned), "--model-option", f"text_encoder={text_dir}", "--task", "rsna_zs",
                  "--data-root", str(rsna_root))
    model = record["model"]
    assert model["adapter"] == "mgca_vit"
    assert model["layout"] == f"mgca-vit-w{WIDTH}-d{DEPTH}-p16-{SIZE} (unwrapped 'state_dict')"
    assert model["procedures"] == MgcaVitAdapter.procedures and model["text_encoder"]["path"] == str(text_dir)
    assert 0.0 <= record["metrics"]["auc"] <= 1.0 and record["n"]["test"] > 0


@pytest.mark.parametrize("task, settings", [
    ("rsna_cls", ["image_size=64", "resize_size=64", "max_epochs=2", "batch_size=8"]),
    ("rsna_det", ["image_size=64", "max_epochs=1", "batch_size=8", "neck_width=32", "feature_cache_gb=0"]),
    ("rsna_seg", ["image_size=64", "max_epochs=1", "batch_size=8", "augment=false", "dice_resolution=input"]),
])
def test_dense_and_linear_tasks_run_on_the_vit_encoder(rsna_root, ckpt, task, settings):
    record = _run("--checkpoint", str(ckpt), "--task", task, "--data-root", str(rsna_root),
                  *[arg for setting in settings for arg in ("--set", setting)])
    assert record["task"]["name"] == task and record["n"]["test"] > 0
    assert record["metrics"][record["primary_metric"]] is not None
    assert record["model"]["pyramid"] == "feature2pyramid({})".format(",".join(map(str, default_out_indices(DEPTH))))
