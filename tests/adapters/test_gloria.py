"""GLoRIA adapter: its published Lightning 1.1 checkpoints rebuilt from GLoRIA's module structure at random init."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from sklearn.metrics import roc_auc_score
from torch import nn
from transformers import BertConfig, BertModel

from vlpbench import api
from vlpbench.adapters import build_adapter
from vlpbench.adapters import gloria as gloria_module
from vlpbench.adapters.base import WRAPPER_REASON, CapabilityError, save_checkpoint
from vlpbench.adapters.gloria import (
    LOCAL_EMBEDDER_REASON,
    TEXT_SIDE_REASON,
    GloriaAdapter,
    clean_text,
    local_similarity,
)
from vlpbench.adapters.text import POSITION_IDS_REASON
from vlpbench.cli import main
from vlpbench.errors import CheckpointError
from vlpbench.testing import lightning_1_1_checkpoint, write_tiny_bert_folder

# GLoRIA's configs/chexpert_pretrain_config.yaml as run.py:124-156 and main():81-93 leave it when the Lightning
# module saves it (save_hyperparameters(cfg), lightning/pretrain_model.py:17): the checkpoint's hyper_parameters.
GLORIA_CONFIG = {
    "experiment_name": "gloria_pretrain", "phase": "pretrain",
    "lightning": {
        "trainer": {"gpus": "1", "max_epochs": 50, "distributed_backend": "dp", "gradient_clip_val": 0.25,
                    "lr": 5e-05, "precision": 16, "val_check_interval": None, "auto_lr_find": False},
        "checkpoint_callback": {"monitor": "val_loss", "dirpath": "./data/ckpt/gloria_pretrain/1", "save_last": True,
                                "mode": "min", "save_top_k": 10},
        "early_stopping_callback": {"monitor": "val_loss", "min_delta": 0.0, "patience": 10, "verbose": False,
                                    "mode": "min"},
        "logger": {"save_dir": "./data/", "project": "gloria_v2", "name": "gloria_pretrain_1",
                   "logger_type": "WandbLogger"},
    },
    "model": {
        "norm": False,
        "gloria": {"local_loss_weight": 1.0, "global_loss_weight": 1.0, "temp1": 4.0, "temp2": 5.0, "temp3": 10.0},
        "vision": {"model_name": "resnet_50", "freeze_cnn": False, "pretrained": True},
        "text": {"bert_type": "emilyalsentzer/Bio_ClinicalBERT", "last_n_layers": 4, "aggregate_method": "sum",
                 "norm": False, "embedding_dim": 768, "freeze_bert": False, "agg_tokens": True},
    },
    "data": {"dataset": "chexpert", "text": {"word_num": 97, "captions_per_image": 5, "full_report": False},
             "image": {"imsize": 256}, "frac": 1.0},
    "transforms": {"norm": "half", "random_crop": {"crop_size": 224}},
    "train": {"update_interval": 1000, "batch_size": 48, "num_workers": 18, "nvis": 8, "rand_vis": False,
              "optimizer": {"name": "Adam", "weight_decay": 1e-06},
              "scheduler": {"name": "plateau", "monitor": "val_loss", "inerval": "epoch", "frequency": 1}},
    "extension": "1", "output_dir": "./data/output/gloria_pretrain/1",
}
# Published key counts. Image (models/vision_model.py:14-29 with cnn_backbones.py:17-35): torchvision ResNet with
# fc = Identity (ResNet-50 318 keys, ResNet-18 120), global_embedder weight + bias, local_embedder weight (no bias).
# Text (text_model.py:18-20, AutoModel of Bio_ClinicalBERT = BertModel with pooler, 12 layers, transformers 4.2.1
# persisting embeddings.position_ids): 5 embedding keys + position_ids + 12 × 16 + 2 pooler.
PUBLISHED_IMAGE_KEYS = {"resnet50": 321, "resnet18": 123}
PUBLISHED_TEXT_KEYS = 200
EMBEDDING_DIM = 768  # configs/chexpert_pretrain_config.yaml model.text.embedding_dim
TINY_HIDDEN, TINY_LAYERS = 32, 2
TINY_TEXT_KEYS = 5 + 1 + TINY_LAYERS * 16 + 2
SMALL_INPUT = 64


class ImageEncoder(nn.Module):
    """GLoRIA's ``ImageEncoder`` parameters (vision_model.py:10-31): ResNet with fc = Identity and two embedders.

    ``cnn_backbones.resnet_18/50`` return an intermediate width of 1024 for every ResNet (cnn_backbones.py:21, 35).
    """

    def __init__(self, arch: str, embedding_dim: int) -> None:
        super().__init__()
        self.model = getattr(torchvision.models, arch)(weights=None)
        feature_dim = self.model.fc.in_features
        self.model.fc = nn.Identity()
        self.global_embedder = nn.Linear(feature_dim, embedding_dim)
        self.local_embedder = nn.Conv2d(1024, embedding_dim, kernel_size=1, stride=1, padding=0, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(output_size=(1, 1))


class TextEncoder(nn.Module):
    """GLoRIA's ``BertEncoder`` parameters (text_model.py:6-30): the BERT as ``model``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.model = BertModel(config)  # AutoModel of a BERT checkpoint: with pooler
        # transformers 4.2.1 (GLoRIA's requirements.txt) saved this buffer; current versions do not.
        self.model.embeddings.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None],
                                              persistent=True)


class Gloria(nn.Module):
    """``models/gloria_model.py:16-22``: text_encoder, then img_encoder."""

    def __init__(self, arch: str, config: BertConfig) -> None:
        super().__init__()
        self.text_encoder = TextEncoder(config)
        self.img_encoder = ImageEncoder(arch, config.hidden_size)


def gloria_state(arch: str, config: BertConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """``PretrainModel.state_dict()`` (lightning/pretrain_model.py:18 holds the model as ``self.gloria``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gloria(arch, config)
    return {f"gloria.{k}": v for k, v in model.state_dict().items()}


def write(state: dict[str, torch.Tensor], path) -> str:
    return str(save_checkpoint(lightning_1_1_checkpoint(state, GLORIA_CONFIG), path))


@pytest.fixture
def small_input(monkeypatch):
    """GLoRIA's encoder resizes every image to 299² (vision_model.py:60); tests that check scores, not that size, run
    it at 64² (layer3: 4×4 regions), which keeps ResNet-50 on a shared CPU to a fraction of the time."""
    monkeypatch.setattr(gloria_module, "_GLORIA_INPUT", SMALL_INPUT)
    return SMALL_INPUT


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return str(write_tiny_bert_folder(tmp_path_factory.mktemp("bert"), hidden=TINY_HIDDEN, layers=TINY_LAYERS))


@pytest.fixture(scope="module")
def tiny_config(bert_folder):
    return BertConfig.from_pretrained(bert_folder)


@pytest.fixture(scope="module")
def state50(tiny_config):
    return gloria_state("resnet50", tiny_config)


@pytest.fixture(scope="module")
def file50(state50, tmp_path_factory):
    return write(state50, tmp_path_factory.mktemp("gloria") / "chexpert_resnet50.ckpt")


@pytest.fixture(scope="module")
def adapter50(file50, bert_folder):
    return GloriaAdapter(file50, text_encoder=bert_folder)


def test_published_key_layout_is_pinned():
    with torch.device("meta"):
        models = {arch: Gloria(arch, BertConfig()) for arch in ("resnet50", "resnet18")}  # BertConfig(): BERT-base
    for arch, model in models.items():
        keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        image = [k for k in keys if k.startswith("img_encoder.")]
        assert len(image) == PUBLISHED_IMAGE_KEYS[arch]
        assert len(keys) - len(image) == PUBLISHED_TEXT_KEYS
        assert keys["img_encoder.local_embedder.weight"] == (EMBEDDING_DIM, 1024, 1, 1)
        assert keys["img_encoder.global_embedder.weight"] == (EMBEDDING_DIM, 2048 if arch == "resnet50" else 512)
        assert "text_encoder.model.embeddings.position_ids" in keys and "text_encoder.model.pooler.dense.bias" in keys


def test_checkpoint_loads_with_every_key_accounted(adapter50, state50, file50):
    report = adapter50.report
    assert report.ok and report.layout == "gloria-resnet50 (unwrapped 'state_dict')"
    assert len(state50) == PUBLISHED_IMAGE_KEYS["resnet50"] + TINY_TEXT_KEYS
    assert len(report.mapped) == len(state50) - 1
    assert report.ignored[POSITION_IDS_REASON] == ["gloria.text_encoder.model.embeddings.position_ids"]
    assert set(report.ignored[WRAPPER_REASON]) == {
        "epoch", "global_step", "pytorch-lightning_version", "callbacks", "optimizer_states", "lr_schedulers",
        "native_amp_scaling_state", "hparams_name", "hyper_parameters", "hparams_type"}
    assert ("gloria.img_encoder.model.layer4.2.conv3.weight", "encoder.layer4.2.conv3.weight") in report.mapped
    assert ("gloria.img_encoder.local_embedder.weight", "local_embedder.weight") in report.mapped
    assert adapter50.encoder_name == "resnet50"
    assert {"features", "embed_image", "embed_text", "dense_embed", "zero_shot", "grounding"} <= adapter50.capabilities
    record = adapter50.describe()
    assert record["pretraining_data"] == ["chexpert"] and set(record["procedures"]) == {"zero_shot", "grounding"}
    assert record["text_encoder"]["files"]
    encoder = adapter50.encoder().state_dict()
    assert torch.equal(encoder["layer4.2.conv3.weight"], state50["gloria.img_encoder.model.layer4.2.conv3.weight"])


def test_without_text_encoder_the_text_side_is_ignored(file50):
    adapter = build_adapter("gloria", file50)
    assert adapter.report.ok
    assert len(adapter.report.ignored[TEXT_SIDE_REASON]) == TINY_TEXT_KEYS
    assert {"embed_image", "dense_embed"} <= adapter.capabilities
    assert not {"embed_text", "zero_shot", "grounding"} & adapter.capabilities
    with pytest.raises(CapabilityError, match="text_encoder=DIR"):
        adapter.require("zero_shot")


@pytest.mark.parametrize("key", ["gloria.img_encoder.global_embedder.weight",
                                 "gloria.img_encoder.model.layer3.5.bn2.running_var",
                                 "gloria.text_encoder.model.encoder.layer.1.output.dense.weight"])
def test_a_renamed_key_fails_naming_it(state50, tmp_path, bert_folder, key):
    state = dict(state50)
    state[key.replace("er.", "er_renamed.", 1)] = state.pop(key)
    path = write(state, tmp_path / "renamed.ckpt")
    with pytest.raises(CheckpointError) as info:
        GloriaAdapter(path, text_encoder=bert_folder)
    message = str(info.value)
    assert f"missing: 1 keys\n  - {key}" in message and "unexpected: 1 keys" in message
    assert key.replace("er.", "er_renamed.", 1) in message


def test_resnet18_variant(tiny_config, bert_folder, tmp_path, small_input):
    state = gloria_state("resnet18", tiny_config, seed=1)
    assert len(state) == PUBLISHED_IMAGE_KEYS["resnet18"] + TINY_TEXT_KEYS
    path = write(state, tmp_path / "chexpert_resnet18.ckpt")
    adapter = GloriaAdapter(path, text_encoder=bert_folder)
    assert adapter.report.ok and adapter.report.layout.startswith("gloria-resnet18")
    assert adapter.encoder_name == "resnet18" and list(adapter.encoder().out_channels) == [3, 64, 64, 128, 256, 512]
    assert adapter.report.ignored[LOCAL_EMBEDDER_REASON] == ["gloria.img_encoder.local_embedder.weight"]
    assert not {"dense_embed", "grounding"} & adapter.capabilities and "zero_shot" in adapter.capabilities
    images = torch.randn(2, 3, 64, 64)
    assert adapter.embed_image(images).shape == (2, TINY_HIDDEN)
    with pytest.raises(CapabilityError, match="similarity=global"):
        adapter.zero_shot_scores(images, ["pneumonia"])
    scores = GloriaAdapter(path, text_encoder=bert_folder, similarity="global").zero_shot_scores(images, ["edema"])
    assert scores.shape == (2, 1) and ((scores > 0) & (scores < 1)).all()


def test_output_shapes(adapter50, monkeypatch):
    images = adapter50.preprocess(torch.rand(2, 1, 64, 64))
    assert [tuple(f.shape) for f in adapter50.encoder().eval()(torch.randn(1, 3, 64, 64))] == [
        (1, 3, 64, 64), (1, 64, 32, 32), (1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4), (1, 2048, 2, 2)]
    dense = adapter50.dense_embed(images[:1])  # at GLoRIA's 299²: 19×19 regions
    assert dense.shape == (1, TINY_HIDDEN, 19, 19)
    assert torch.allclose(dense.norm(dim=1), torch.ones(1, 19, 19), atol=1e-5)
    monkeypatch.setattr(gloria_module, "_GLORIA_INPUT", SMALL_INPUT)
    image = adapter50.embed_image(images)
    text = adapter50.embed_text(["small left pleural effusion", "no pneumothorax"])
    assert image.shape == (2, TINY_HIDDEN) and text.shape == (2, TINY_HIDDEN)
    assert torch.allclose(image.norm(dim=1), torch.ones(2)) and torch.allclose(text.norm(dim=1), torch.ones(2))
    maps = adapter50.grounding_maps(images, ["left effusion", "cardiomegaly", "opacity"])
    assert maps.shape == (2, 3, 4, 4) and (maps >= 0).all() and (maps <= 1).all()
    scores = adapter50.zero_shot_scores(images, ["edema", "pneumonia"])
    assert scores.shape == (2, 2) and ((scores > 0) & (scores < 1)).all()


def test_text_features_follow_gloria(adapter50, state50, tiny_config):
    """The sentence embedding is the sum of the last 4 layers over [CLS] .. [SEP] (word pieces merged into words,
    then averaged over all 97 positions: the same direction), computed here from the BERT directly."""
    bert = BertModel(tiny_config).eval()
    bert.load_state_dict({k[len("gloria.text_encoder.model."):]: v for k, v in state50.items()
                          if k.startswith("gloria.text_encoder.model.")}, strict=False)
    text = "Small   LEFT pleural effusion.\n2. No pneumothorax"
    assert clean_text(text) == "small left pleural effusion no pneumothorax"
    ids = adapter50._tokenizer(clean_text(text), return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**ids, output_hidden_states=True).hidden_states
    expected = torch.stack(hidden[-4:]).sum(dim=0)[0].sum(dim=0)
    words, sentence, counts = adapter50._encode_text([text])
    assert counts == [6]
    assert torch.allclose(adapter50.embed_text([text])[0], nn.functional.normalize(expected, dim=0), atol=1e-5)
    n_tokens = ids["input_ids"].shape[1]
    assert torch.count_nonzero(words[0].abs().sum(dim=0)) == counts[0] + 2 < n_tokens + 1


def test_zero_shot_on_an_aligned_model_beats_chance(state50, adapter50, bert_folder, tmp_path, small_input):
    """Global embedder fitted so that bright images point to "pneumonia" and dark ones to "no pneumonia"; the
    local embedder is zero, so the local similarity adds 0 to both prompts."""
    text = adapter50.embed_text(["pneumonia", "no pneumonia"])
    direction = text[0] - text[1]
    resnet = torchvision.models.resnet50(weights=None)
    resnet.fc = nn.Identity()
    resnet.load_state_dict({k[len("gloria.img_encoder.model."):]: v for k, v in state50.items()
                            if k.startswith("gloria.img_encoder.model.")})
    resnet.eval()
    generator = torch.Generator().manual_seed(0)

    def images(brightness, n):
        return adapter50.preprocess((brightness + 0.05 * torch.randn(n, 1, 64, 64, generator=generator)).clamp(0, 1))

    def pooled(x):  # vision_model.py:57-76 (resnet_forward): upsample, ResNet, average pool
        with torch.no_grad():
            x = nn.functional.interpolate(x, size=(small_input, small_input), mode="bilinear", align_corners=True)
            return resnet(x)

    means = torch.stack([pooled(images(0.75, 2)).mean(0), pooled(images(0.25, 2)).mean(0)], dim=1)  # (2048, 2)
    state = dict(state50)
    targets = torch.stack([direction, -direction], dim=1)
    state["gloria.img_encoder.global_embedder.weight"] = targets @ torch.linalg.pinv(means)
    state["gloria.img_encoder.global_embedder.bias"] = torch.zeros(TINY_HIDDEN)
    state["gloria.img_encoder.local_embedder.weight"] = torch.zeros(TINY_HIDDEN, 1024, 1, 1)
    adapter = GloriaAdapter(write(state, tmp_path / "aligned.ckpt"), text_encoder=bert_folder)
    labels = np.array([1] * 4 + [0] * 4)
    scores = adapter.zero_shot_scores(torch.cat([images(0.75, 4), images(0.25, 4)]), ["pneumonia"])[:, 0].numpy()
    assert roc_auc_score(labels, scores) == 1.0  # chance: 0.5
    assert (scores[:4] > 0.5).all() and (scores[4:] < 0.5).all()


def test_grounding_puts_a_planted_region_first(adapter50, monkeypatch):
    words, _, counts = adapter50._encode_text(["effusion"])
    word = words[0, :, 1]  # the word after [CLS]
    regions = 0.01 * torch.randn(2, TINY_HIDDEN, 19, 19, generator=torch.Generator().manual_seed(0))
    regions[0, :, 4, 13] = 3 * word
    regions[1, :, 15, 2] = 3 * word
    monkeypatch.setattr(adapter50, "_local_embeddings", lambda images: regions)
    maps = adapter50.grounding_maps(torch.zeros(2, 3, 64, 64), ["effusion"])
    assert counts == [1] and maps.shape == (2, 1, 19, 19)
    assert divmod(int(maps[0, 0].argmax()), 19) == (4, 13) and divmod(int(maps[1, 0].argmax()), 19) == (15, 2)
    # The local similarity of the planted word: its context is (almost) the planted region itself: 5 × cos ≈ 5.
    assert local_similarity(regions, words[0, :, 1:2]).tolist() == pytest.approx([5.0, 5.0], abs=0.05)
    # A zero (padding) word scores 0, so a window never scores below it.
    assert local_similarity(regions, torch.zeros(TINY_HIDDEN, 1)).tolist() == [0.0, 0.0]


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna") / "rsna"
    api.synth("rsna", root, n=40, size=32, progress=False)
    return root


@pytest.mark.parametrize("task, overrides", [
    ("rsna_cls", ["image_size=32", "resize_size=32", "max_epochs=1", "patience=1", "bootstrap_resamples=20"]),
    ("rsna_zs", ["bootstrap_resamples=20"]),
])
def test_cli_runs_a_task_with_the_gloria_checkpoint(file50, bert_folder, rsna_root, tmp_path, small_input, task,
                                                    overrides):
    settings = [arg for value in overrides for arg in ("--set", value)]
    code = main(["-q", "run", "--model", "gloria", "--checkpoint", file50, "--task", task, "--frac", "1.0",
                 "--data-root", str(rsna_root), "--results", str(tmp_path), "--device", "cpu",
                 "--model-option", f"text_encoder={bert_folder}", *settings])
    assert code == 0
    (path,) = tmp_path.rglob(f"{task}.v1/*.json")
    record = json.loads(path.read_text())
    model = record["model"]
    assert model["adapter"] == "gloria" and model["layout"] == "gloria-resnet50 (unwrapped 'state_dict')"
    assert model["procedures"] == GloriaAdapter.procedures and model["pretraining_data"] == ["chexpert"]
    assert 0.0 <= record["metrics"]["auc"] <= 1.0
