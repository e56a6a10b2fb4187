"""MGCA: the published Lightning resnet_50.ckpt layout, read without Lightning."""

from __future__ import annotations

import pytest
import torch

from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import WRAPPER_REASON, load_state_dict_file
from vlpbench.adapters.mgca import (
    IMAGE_HEADS_REASON,
    PROTOTYPE_REASON,
    TEXT_SIDE_REASON,
    TOKEN_ATTENTION_REASON,
    MgcaAdapter,
    write_mgca_checkpoint,
)
from vlpbench.errors import CheckpointError

LIGHTNING_ENTRIES = ["epoch", "global_step", "pytorch-lightning_version", "callbacks", "optimizer_states",
                     "lr_schedulers", "hparams_name", "hyper_parameters"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random-init resnet_50.ckpt; the text encoder shrunk to 2 layers of width 24 to keep the file small."""
    return write_mgca_checkpoint(tmp_path_factory.mktemp("mgca") / "resnet_50.ckpt", seed=3,
                                 text_layers=2, text_hidden=24)


@pytest.fixture(scope="module")
def raw(ckpt):
    """The checkpoint as ``load_state_dict_file`` reads it."""
    return load_state_dict_file(ckpt)[0]


@pytest.fixture(scope="module")
def adapter(ckpt):
    return build_adapter("mgca", ckpt)


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_published_layout_loads_with_everything_accounted(adapter, raw):
    report = adapter.report
    assert report.ok and report.layout == "mgca-resnet50 (unwrapped 'state_dict')"
    assert len(report.mapped) == 318
    assert report.mapped[0] == ("img_encoder_q.model.conv1.weight", "encoder.conv1.weight")
    assert report.ignored[WRAPPER_REASON] == LIGHTNING_ENTRIES
    assert len(report.ignored[IMAGE_HEADS_REASON]) == 22  # 13 global-head keys + 9 local-head keys
    assert report.ignored[PROTOTYPE_REASON] == ["prototype_layer.weight"]
    assert len(report.ignored[TOKEN_ATTENTION_REASON]) == 8
    assert all(k.startswith("text_encoder_q.") for k in report.ignored[TEXT_SIDE_REASON])
    assert sum(map(len, report.ignored.values())) - len(LIGHTNING_ENTRIES) + 318 == len(raw["state_dict"])
    assert adapter.decoder_state_dict() is None and "decoder" not in adapter.capabilities
    assert adapter.mean == adapter.std == (0.5, 0.5, 0.5) and adapter.encoder_name == "resnet50"


def test_file_has_the_published_structure(raw):
    # Lightning's AttributeDict comes back as a plain dict, without Lightning installed.
    assert type(raw["hyper_parameters"]) is dict and raw["hyper_parameters"]["img_encoder"] == "resnet_50"
    state = raw["state_dict"]
    shapes = {
        "img_encoder_q.model.conv1.weight": (64, 3, 7, 7),
        "img_encoder_q.global_embed.head.0.weight": (2048, 2048),
        "img_encoder_q.global_embed.head.4.running_var": (128,),
        "img_encoder_q.local_embed.head.0.weight": (2048, 1024, 1),
        "img_encoder_q.local_embed.head.3.weight": (128, 2048, 1),
        "text_encoder_q.model.embeddings.word_embeddings.weight": (28996, 24),
        "text_encoder_q.model.encoder.layer.1.crossattention.self.key.weight": (24, 24),
        "text_encoder_q.global_embed.head.0.weight": (2048, 24),
        "text_encoder_q.local_embed.head.0.weight": (2048, 24, 1),
        "patch_local_atten_layer.in_proj_weight": (384, 128),
        "word_local_atten_layer.in_proj_weight": (384, 128),
        "prototype_layer.weight": (500, 128),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert "img_encoder_q.global_embed.head.4.weight" not in state  # BN(128, affine=False)
    assert not any(k.startswith("img_encoder_q.model.fc.") for k in state)


def test_encoder_holds_the_checkpoint_weights(adapter, raw):
    state = adapter.encoder().state_dict()
    assert len(state) == 318
    for key in state:
        assert torch.equal(state[key], raw["state_dict"][f"img_encoder_q.model.{key}"]), key


def test_renamed_key_fails_naming_it(tmp_path, raw):
    state = dict(raw["state_dict"])
    state["img_encoder_q.model.layer4.2.bn3.gamma"] = state.pop("img_encoder_q.model.layer4.2.bn3.weight")
    path = _save({**raw, "state_dict": state}, tmp_path / "renamed.ckpt")
    with pytest.raises(CheckpointError) as info:
        MgcaAdapter(path)
    assert "img_encoder_q.model.layer4.2.bn3.weight" in str(info.value)
    assert "img_encoder_q.model.layer4.2.bn3.gamma" in str(info.value)
    report = MgcaAdapter.inspect(path)
    assert report.missing == ["img_encoder_q.model.layer4.2.bn3.weight"]
    assert report.unexpected == ["img_encoder_q.model.layer4.2.bn3.gamma"] and len(report.mapped) == 317


def test_ddp_prefix_inside_state_dict_is_stripped(tmp_path, raw):
    state = {f"module.{k}": v for k, v in raw["state_dict"].items()}
    path = _save({**raw, "state_dict": state}, tmp_path / "ddp.ckpt")
    report = MgcaAdapter.inspect(path)
    assert report.ok and report.layout == "mgca-resnet50 (unwrapped 'state_dict', stripped 'module.')"
    assert len(report.mapped) == 318 and report.ignored[PROTOTYPE_REASON] == ["module.prototype_layer.weight"]


@pytest.mark.parametrize("marked_by", ["hyper_parameters", "keys"])
def test_vit_variant_is_refused(tmp_path, marked_by):
    state = {"img_encoder_q.model.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
             "img_encoder_q.model.blocks.0.norm1.weight": torch.zeros(768)}
    hparams = {"img_encoder": "vit_base" if marked_by == "hyper_parameters" else "unknown"}
    path = _save({"state_dict": state, "hyper_parameters": hparams, "epoch": 49}, tmp_path / "vit_base.ckpt")
    for call in (lambda: MgcaAdapter(path), lambda: MgcaAdapter.inspect(path)):
        with pytest.raises(CheckpointError, match="ViT-B/16 variant.*only the ResNet-50 variant"):
            call()
