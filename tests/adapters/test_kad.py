"""KAD: best_valid.pt in both image-encoder variants, the duplicated trunk, query-network zero-shot and grounding.

The checkpoints are built here from KAD's module structure (xiaoman-zhang/KAD A3_CLIP/models/clip_tqn.py) with
torchvision's ResNet-50, torch's pre-norm Transformer decoder and a one-layer BERT of Med-KEBERT's width, never
from the adapter's own modules, and saved as A3_CLIP/main.py:206-216 saves them.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer

from vlpbench import api
from vlpbench.adapters import adapter_names, build_adapter, get_adapter
from vlpbench.adapters.base import CapabilityError, load_state_dict_file
from vlpbench.adapters.kad import (
    DUPLICATE_NORM_REASON,
    DUPLICATE_TRUNK_REASON,
    LOGIT_SCALE_REASON,
    STAGE_NOTE_224,
    TEXT_SIDE_REASON,
    TRAINING_STATE_REASON,
    UNUSED_RESNET_REASON,
    KADAdapter,
)
from vlpbench.cli import main
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.testing import write_tiny_bert_folder

CONTAINER_ENTRIES = ["optimizer", "lr_scheduler", "config", "epoch"]  # A3_CLIP/main.py:206-214
# ModelRes512 = img_res != 224 (res_features = children[:-2], clip_tqn.py:236-245); ModelRes = img_res 224
# (children[:-3], clip_tqn.py:119-128). test_chexpert.py:62-66 picks the class by config['img_res'].
VARIANTS = {"ModelRes512": (-2, 2048, 512), "ModelRes": (-3, 1024, 224)}
# Pinned key counts. resnet.*: torchvision ResNet-50 with fc (clip_tqn.py:89-91): 320. res_features.*: its
# children [:-2] (318) or [:-3] (258: no layer4). res_l1/res_l2 weight and bias: 4 (clip_tqn.py:94-95, 127-128).
IMAGE_KEYS = {"ModelRes512": 320 + 318 + 4, "ModelRes": 320 + 258 + 4}
LAYER4_KEYS = 318 - 258
# TQN_Model (clip_tqn.py:184-201): 4 decoder layers × 18 (self_attn 4, multihead_attn 4, linear1/2 4, norm1-3 6;
# transformer_decoder.py:51-60), decoder.norm 2 and decoder_norm 2 (one module, :194-196), mlp_head.0 2,
# logit_scale 1.
MODEL_KEYS = 4 * 18 + 2 + 2 + 2 + 1
# CLP_clinical (clip_tqn.py:34-47): bert_model (BertModel with pooler: embeddings 5, per layer 16, pooler 2),
# mlp_embed.0/.2 weight and bias 4, logit_scale 1; one BERT layer here.
TEXT_KEYS = 5 + 16 + 2 + 4 + 1
WIDTH = 768


class ImageEncoder(nn.Module):
    """KAD's ModelRes512 / ModelRes (clip_tqn.py:86-95, 119-128): resnet and res_features share modules."""

    def __init__(self, variant):
        super().__init__()
        cut, features, _ = VARIANTS[variant]
        self.resnet = torchvision.models.resnet50()
        self.res_features = nn.Sequential(*list(self.resnet.children())[:cut])
        self.res_l1 = nn.Linear(features, features)
        self.res_l2 = nn.Linear(features, WIDTH)

    def forward(self, img):  # clip_tqn.py:105-117
        res_fea = self.res_features(img)
        tokens = res_fea.flatten(2).transpose(1, 2)  # rearrange 'b d n1 n2 -> b (n1 n2) d'
        return self.res_l2(torch.relu(self.res_l1(tokens)))


class QueryNetwork(nn.Module):
    """KAD's TQN_Model (clip_tqn.py:184-201): torch's pre-norm decoder layer has KAD's key names."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        layer = nn.TransformerDecoderLayer(WIDTH, 4, 1024, 0.1, "relu", norm_first=True)
        self.decoder_norm = nn.LayerNorm(WIDTH)
        self.decoder = nn.TransformerDecoder(layer, 4, norm=self.decoder_norm)
        self.mlp_head = nn.Sequential(nn.Linear(WIDTH, 2))

    def forward(self, image_features, text_features):  # clip_tqn.py:218-233, eval mode
        batch = image_features.shape[0]
        memory = self.decoder_norm(image_features.transpose(0, 1))
        queries = self.decoder_norm(text_features.unsqueeze(1).repeat(1, batch, 1))
        return self.mlp_head(self.decoder(queries, memory).transpose(0, 1))


class TextEncoder(nn.Module):
    """KAD's CLP_clinical (clip_tqn.py:34-47, 72-77)."""

    def __init__(self, config):
        super().__init__()
        self.bert_model = BertModel(config)
        self.mlp_embed = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def encode_text(self, tokens):
        pooled = self.bert_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])[1]
        return self.mlp_embed(pooled)


def _kad(variant, bert_dir, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (ImageEncoder(variant).eval(), QueryNetwork().eval(),
                TextEncoder(BertConfig.from_pretrained(bert_dir)).eval())


def _save(path, image_encoder, model, text_encoder, img_res):
    """best_valid.pt as A3_CLIP/main.py:206-216 writes it (the config as the YAML loader returns it)."""
    torch.save({"model": model.state_dict(), "image_encoder": image_encoder.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "weight_decay": 0.02, "params": [0, 1]}]},
                "lr_scheduler": {"t_initial": 100, "lr_min": 1e-6, "base_values": [5e-5], "metric": None},
                "config": {"img_res": img_res, "batch_size": 64, "optimizer": {"opt": "adamW", "lr": 5e-5}},
                "epoch": 7}, path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """Config and tokenizer of a one-layer BERT of Med-KEBERT's width (768); its weights live in the checkpoint."""
    folder = write_tiny_bert_folder(tmp_path_factory.mktemp("kebert"), hidden=WIDTH, layers=1, heads=12)
    config = BertConfig.from_pretrained(folder)
    config.intermediate_size = 32  # keeps the file small; not part of any key name
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(bert_dir):
    return {variant: _kad(variant, bert_dir, seed) for seed, variant in enumerate(VARIANTS)}


@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kad")
    return {variant: _save(folder / f"{variant}.pt", *parts, VARIANTS[variant][2]) for variant, parts in models.items()}


@pytest.fixture(scope="module")
def raw(checkpoints):
    return {variant: load_state_dict_file(path)[0] for variant, path in checkpoints.items()}


@pytest.fixture(scope="module")
def adapters(checkpoints, bert_dir):
    return {variant: build_adapter("kad", path, text_encoder=str(bert_dir)) for variant, path in checkpoints.items()}


@pytest.fixture(scope="module")
def images():
    """Two 64×64 preprocessed inputs: 2×2 image tokens at stride 32, 4×4 at stride 16."""
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _modified(raw, part, key, value=None, rename=None):
    """``raw`` with one tensor of ``part`` replaced by ``value`` or moved to the name ``rename``."""
    state = dict(raw[part])
    tensor = state.pop(key)
    state[rename or key] = tensor if value is None else value
    return {**raw, part: state}


def _report(checkpoint, **options):
    """The key accounting of an in-memory checkpoint (``inspect`` without the file)."""
    return KADAdapter.map_weights(checkpoint, {**KADAdapter.default_options, **options}).report


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_published_layout_loads_with_every_key_accounted(variant, raw, adapters):
    file = raw[variant]
    assert sorted(file) == sorted(["model", "image_encoder", "text_encoder", *CONTAINER_ENTRIES])
    image, model, text = file["image_encoder"], file["model"], file["text_encoder"]
    assert (len(image), len(model), len(text)) == (IMAGE_KEYS[variant], MODEL_KEYS, TEXT_KEYS)
    features = VARIANTS[variant][1]
    assert tuple(image["res_l1.weight"].shape) == (features, features)
    assert tuple(image["res_l2.weight"].shape) == (WIDTH, features)
    assert ("res_features.7.2.conv3.weight" in image) is (variant == "ModelRes512")
    assert tuple(model["decoder.layers.3.multihead_attn.in_proj_weight"].shape) == (3 * WIDTH, WIDTH)
    assert tuple(model["decoder.layers.0.linear1.weight"].shape) == (1024, WIDTH)
    assert tuple(model["mlp_head.0.weight"].shape) == (2, WIDTH)
    assert tuple(text["mlp_embed.2.weight"].shape) == (WIDTH, WIDTH) and "bert_model.pooler.dense.bias" in text

    report = adapters[variant].report
    trunk = 318 if variant == "ModelRes512" else 258
    unused = ["image_encoder.resnet.fc.weight", "image_encoder.resnet.fc.bias"]
    if variant == "ModelRes":
        unused = [f"image_encoder.{k}" for k in image if k.startswith("resnet.layer4.")] + unused
        assert len(unused) == LAYER4_KEYS + 2
    assert report.ok and report.layout == f"kad-{variant}"
    assert {reason: sorted(keys) for reason, keys in report.ignored.items()} == {
        TRAINING_STATE_REASON: sorted(CONTAINER_ENTRIES),
        DUPLICATE_TRUNK_REASON: sorted(_duplicates(image)),
        UNUSED_RESNET_REASON: sorted(unused),
        DUPLICATE_NORM_REASON: ["model.decoder.norm.bias", "model.decoder.norm.weight"],
        LOGIT_SCALE_REASON: ["model.logit_scale", "text_encoder.logit_scale"],
    }
    assert len(report.ignored[DUPLICATE_TRUNK_REASON]) == trunk
    assert len(report.mapped) == trunk + 4 + (MODEL_KEYS - 3) + (TEXT_KEYS - 1)
    mapped = dict(report.mapped)
    assert mapped["image_encoder.res_features.6.5.conv3.weight"] == "encoder.layer3.5.conv3.weight"
    assert mapped["image_encoder.res_features.0.weight"] == "encoder.conv1.weight"
    assert mapped["image_encoder.res_l2.bias"] == "image_head.res_l2.bias"
    assert mapped["model.decoder_norm.weight"] == "query_network.decoder_norm.weight"
    assert mapped["text_encoder.bert_model.pooler.dense.weight"] == "text_encoder.bert_model.pooler.dense.weight"


def _duplicates(image):
    """The resnet.* keys of the trunk tensors that res_features also holds."""
    stages = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
    keys = []
    for key in image:
        if key.startswith("res_features."):
            index, rest = key[len("res_features."):].split(".", 1)
            keys.append(f"image_encoder.resnet.{stages[index]}.{rest}")
    return keys


def test_without_a_text_encoder_only_features_are_offered(checkpoints, raw, images):
    adapter = KADAdapter(checkpoints["ModelRes512"], image_size="96")
    assert adapter.report.ok and adapter.capabilities == {"features"}
    assert sorted(adapter.report.ignored[TEXT_SIDE_REASON]) == sorted(f"text_encoder.{k}"
                                                                      for k in raw["ModelRes512"]["text_encoder"])
    assert (adapter.image_size, adapter.describe()["image_size_source"]) == (96, "option image_size")
    with pytest.raises(CapabilityError, match="text_encoder=DIR .a local Med-KEBERT folder"):
        adapter.zero_shot_scores(images, ["pneumonia"])
    with pytest.raises(CapabilityError, match="grounding"):
        adapter.grounding_maps(images, ["pneumonia"])
    with pytest.raises(ConfigError, match="image_size=100 must be a positive multiple of 32"):
        KADAdapter.inspect(checkpoints["ModelRes512"], image_size=100)


def test_renamed_key_fails_naming_it(tmp_path, raw, bert_dir):
    renamed = _modified(raw["ModelRes512"], "model", "decoder.layers.2.norm3.weight",
                        rename="decoder.layers.2.norm3.gamma")
    report = _report(renamed)
    assert report.missing == ["model.decoder.layers.2.norm3.weight"]
    assert report.unexpected == ["model.decoder.layers.2.norm3.gamma"]
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError) as info:
        KADAdapter(tmp_path / "renamed.pt")
    assert "model.decoder.layers.2.norm3.weight" in str(info.value)
    assert "model.decoder.layers.2.norm3.gamma" in str(info.value)
    text = _modified(raw["ModelRes512"], "text_encoder", "mlp_embed.0.bias", rename="mlp_embed.1.bias")
    report = _report(text, text_encoder=str(bert_dir))
    assert (report.missing, report.unexpected) == (["text_encoder.mlp_embed.0.bias"], ["text_encoder.mlp_embed.1.bias"])
    image = _modified(raw["ModelRes"], "image_encoder", "resnet.layer4.0.conv1.weight", rename="resnet.layer5.weight")
    report = _report(image)
    assert (report.missing, report.unexpected) == (["image_encoder.resnet.layer4.0.conv1.weight"],
                                                   ["image_encoder.resnet.layer5.weight"])


@pytest.mark.parametrize("part, key", [("image_encoder", "resnet.layer1.0.conv1.weight"),
                                       ("model", "decoder.norm.weight")])
def test_a_duplicate_that_differs_from_its_twin_fails(raw, part, key):
    raw512 = raw["ModelRes512"]
    report = _report(_modified(raw512, part, key, value=raw512[part][key].clone() + 1))
    assert not report.ok and not report.missing and not report.mismatched
    assert len(report.unexpected) == 1 and report.unexpected[0].startswith(f"{part}.{key} (differs from")
    assert f"{part}.{key}" not in dict(report.mapped) and all(f"{part}.{key}" not in keys
                                                              for keys in report.ignored.values())
    assert f"{part}.{key} (differs from" in report.format()


def test_encoders_hold_res_features_and_the_224_variant_stops_at_layer3(adapters, raw):
    for variant, adapter in adapters.items():
        encoder = adapter.encoder()
        state = encoder.state_dict()
        for key, value in state.items():
            assert torch.equal(value, raw[variant]["image_encoder"][f"resnet.{key}"]), key
        with torch.no_grad():
            shapes = [tuple(f.shape) for f in encoder.eval()(torch.zeros(1, 3, 64, 64))]
        if variant == "ModelRes512":
            assert tuple(encoder.out_channels) == (3, 64, 256, 512, 1024, 2048) and len(state) == 318
            assert shapes[-1] == (1, 2048, 2, 2)
            assert adapter.encoder_depth == 5 and adapter.describe()["stage_note"] is None
        else:
            assert tuple(encoder.out_channels) == (3, 64, 256, 512, 1024) and len(state) == 258
            assert not hasattr(encoder, "layer4") and shapes[-1] == (1, 1024, 4, 4)
            record = adapter.describe()
            assert adapter.encoder_depth == 4 and record["stage_note"] == STAGE_NOTE_224
            assert "never trained" in STAGE_NOTE_224
    assert {v: a.image_size for v, a in adapters.items()} == {"ModelRes512": 512, "ModelRes": 224}


def _tokens(bert_dir, texts):
    """test_chexpert.py:70, 96: lower case, padded to max_length 256."""
    tokenizer = BertTokenizer.from_pretrained(bert_dir, do_lower_case=True)
    return tokenizer(texts, add_special_tokens=True, max_length=256, padding="max_length", return_tensors="pt")


def _last_attention(model, queries, memory):
    """Head-averaged cross-attention of the last decoder layer, computed by hand (torch's layer returns none)."""
    x = queries
    for layer in model.decoder.layers:
        h = layer.norm1(x)
        x = x + layer.self_attn(h, h, h, need_weights=False)[0]
        q = layer.norm2(x)
        w_q, w_k, _ = layer.multihead_attn.in_proj_weight.chunk(3)
        b_q, b_k, _ = layer.multihead_attn.in_proj_bias.chunk(3)
        heads_q = (q @ w_q.T + b_q).reshape(len(q), q.shape[1], 4, 192).permute(1, 2, 0, 3)
        heads_k = (memory @ w_k.T + b_k).reshape(len(memory), q.shape[1], 4, 192).permute(1, 2, 0, 3)
        attention = (heads_q @ heads_k.transpose(-1, -2) / 192 ** 0.5).softmax(dim=-1).mean(dim=1)
        x = x + layer.multihead_attn(q, memory, memory, need_weights=False)[0]
        x = x + layer.linear2(torch.relu(layer.linear1(layer.norm3(x))))
    return attention


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_shot_and_grounding_equal_kads_forward(variant, models, adapters, bert_dir, images):
    image_encoder, model, text_encoder = models[variant]
    texts = ["Atelectasis", "pleural effusion", "lung nodule"]
    with torch.no_grad():
        text_features = text_encoder.encode_text(_tokens(bert_dir, texts))
        image_features = image_encoder(images)
        expected = model(image_features, text_features).softmax(dim=-1)[:, :, 1]  # test_chexpert.py:129-133
        memory = model.decoder_norm(image_features.transpose(0, 1))
        queries = model.decoder_norm(text_features.unsqueeze(1).repeat(1, len(images), 1))
        attention = _last_attention(model, queries, memory)
    adapter = adapters[variant]
    scores = adapter.zero_shot_scores(images, texts, templates=("ignored {}", "also ignored {}"))
    assert scores.shape == (2, 3) and bool(((scores > 0) & (scores < 1)).all())
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter.embed_queries(texts), text_features, rtol=1e-4, atol=1e-5)

    side = 2 if variant == "ModelRes512" else 4
    maps = adapter.grounding_maps(images, texts)
    assert maps.shape == (2, 3, side, side) and bool((maps >= 0).all())
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 3))
    torch.testing.assert_close(maps.flatten(2), attention, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="non-empty list"):
        adapter.grounding_maps(images, "pneumonia")
    with pytest.raises(ConfigError, match="classes must be a non-empty list"):
        adapter.zero_shot_scores(images, [])


def _align(image_encoder, model, text_encoder):
    """Weights under which KAD's forward reads image brightness, whatever the class text.

    Trunk: conv1 is a local mean (shifted positive by bn1's bias); the first block of each layer averages its
    input over 3×3 windows at the layer's stride (channel means around a 3×3 mean); every other branch and
    every downsample path is zero. So each layer4 channel is the brightness of its image region + 3.
    res_l1/res_l2 put it in token channel 0 beside a constant 4 in channel 1. Query network: self-attention
    and FFNs add nothing; cross-attention is uniform (zero query/key projections) and adds 0.05 × channel 0 of
    the normalised memory to the queries' channel 0, which text embeddings do not use; mlp_head's
    present-minus-absent logit reads that channel minus 2.
    """
    with torch.no_grad():
        resnet = image_encoder.resnet
        for module in resnet.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
        resnet.conv1.weight.fill_(1 / (3 * 49))
        resnet.bn1.bias.fill_(3.0)
        for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
            block = layer[0]  # its 3×3 conv carries the layer's stride; its downsample path stays zero
            block.conv1.weight.fill_(1 / block.conv1.in_channels)
            block.conv2.weight.fill_(1 / (9 * block.conv2.in_channels))
            block.conv3.weight.fill_(1 / block.conv3.in_channels)
        for linear in (image_encoder.res_l1, image_encoder.res_l2):
            linear.weight.zero_()
            linear.bias.zero_()
        image_encoder.res_l1.weight[0].fill_(1 / image_encoder.res_l1.in_features)
        image_encoder.res_l2.weight[0, 0] = 1.0
        image_encoder.res_l2.bias[1] = 4.0
        for layer in model.decoder.layers:
            for attention in (layer.self_attn, layer.multihead_attn):
                attention.in_proj_weight.zero_()
                attention.in_proj_bias.zero_()
                attention.out_proj.weight.zero_()
                attention.out_proj.bias.zero_()
            layer.multihead_attn.in_proj_weight[2 * WIDTH, 0] = 0.05  # value channel 0 ← memory channel 0
            layer.multihead_attn.out_proj.weight[0, 0] = 1.0
            layer.linear2.weight.zero_()
            layer.linear2.bias.zero_()
        head = model.mlp_head[0]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, -2.0]))
        head.weight[1, 0] = 1.0
        text_encoder.mlp_embed[2].weight[0].zero_()
        text_encoder.mlp_embed[2].bias[0] = 0.0
    return image_encoder, model, text_encoder


@pytest.fixture(scope="module")
def aligned(models, tmp_path_factory):
    """A KAD-512-structured checkpoint whose zero-shot score rises with image brightness (config img_res 64)."""
    parts = _align(*copy.deepcopy(models["ModelRes512"]))
    return _save(tmp_path_factory.mktemp("aligned") / "best_valid.pt", *parts, img_res=64)


def test_aligned_model_scores_brighter_images_higher_for_every_class(aligned, bert_dir):
    adapter = KADAdapter(aligned, text_encoder=str(bert_dir))
    assert adapter.image_size == 64 and adapter.describe()["image_size_source"] == "checkpoint config img_res"
    grey = torch.linspace(0.05, 0.95, 8).view(8, 1, 1, 1).expand(8, 1, 64, 64)
    scores = adapter.zero_shot_scores(adapter.preprocess(grey), ["pneumonia", "pneumothorax", "edema"])
    assert bool((scores.diff(dim=0) > 0).all())  # AUC 1 for bright-positive labels, whatever the class
    assert float(scores.min()) < 0.4 and float(scores.max()) > 0.6


def test_files_that_are_not_kad_checkpoints_are_refused(tmp_path, raw):
    torch.save(raw["ModelRes"]["image_encoder"], tmp_path / "image_encoder.pt")
    with pytest.raises(CheckpointError, match="has no image_encoder, model, text_encoder dict"):
        KADAdapter(tmp_path / "image_encoder.pt")

def test_a_text_encoder_folder_of_another_width_is_refused(tmp_path, checkpoints):
    narrow = write_tiny_bert_folder(tmp_path / "narrow", hidden=32)
    with pytest.raises(ConfigError, match="has width 32; KAD's mlp_embed and query network take 768-d"):
        KADAdapter.inspect(checkpoints["ModelRes"], text_encoder=str(narrow))


def test_registered_with_card_and_procedures():
    assert get_adapter("kad") is KADAdapter and "kad" in adapter_names()
    card = KADAdapter.card
    assert card.pretraining_data == ("mimic_cxr",) and any("best_valid.pt" in f for f in card.checkpoints)
    assert any("KAD#23" in note for note in card.notes)
    assert "test_chexpert.py:129-133" in KADAdapter.procedures["zero_shot"]


# --- end to end from the command line ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kad_data")
    api.synth("rsna", root / "rsna", n=60, size=32, progress=False)
    api.synth("siim", root / "siim", n=32, size=32, progress=False)
    return {"rsna": root / "rsna", "siim": root / "siim"}


def _run(task, checkpoint, root, results, options, overrides):
    argv = ["-q", "run", "--model", "kad", "--checkpoint", str(checkpoint), "--task", task, "--frac", "1.0",
            "--data-root", str(root), "--results", str(results), "--device", "cpu"]
    argv += [part for option in options for part in ("--model-option", option)]
    argv += [part for key, value in overrides.items() for part in ("--set", f"{key}={json.dumps(value)}")]
    assert main(argv) == 0
    (path,) = results.rglob(f"{task}.v1/*.json")
    return json.loads(path.read_text())


def test_rsna_zero_shot_and_linear_from_the_cli(aligned, bert_dir, data, tmp_path):
    record = _run("rsna_zs", aligned, data["rsna"], tmp_path / "zs", [f"text_encoder={bert_dir}"],
                  {"bootstrap_resamples": 50, "batch_size": 16})
    assert record["metrics"]["auc"] > 0.6  # chance is 0.5: the synthetic opacities are brighter
    assert record["model"]["procedures"]["zero_shot"] == KADAdapter.procedures["zero_shot"]
    assert record["model"]["image_size"] == 64 and record["model"]["variant"] == "ModelRes512"
    record = _run("rsna_cls", aligned, data["rsna"], tmp_path / "linear", [],
                  {"image_size": 32, "resize_size": 32, "max_epochs": 1, "batch_size": 8, "bootstrap_resamples": 20})
    assert record["metrics"]["auc"] is not None and record["n"]["train"] > 0


def test_siim_segmentation_with_the_224_variant_from_the_cli(checkpoints, data, tmp_path):
    record = _run("siim_seg", checkpoints["ModelRes"], data["siim"], tmp_path, [],
                  {"image_size": 32, "batch_size": 4, "max_epochs": 1, "patience": 1, "balance_negatives": False,
                   "dice_resolution": "input", "bootstrap_resamples": 20})
    assert record["model"]["encoder_depth"] == 4 and record["model"]["stage_note"] == STAGE_NOTE_224
    assert np.isfinite(record["metrics"]["dice"])
