"""ConVIRT (BenchX's re-training, HF youngzhou12/ConVIRT ConVIRT.pth): strict loading, embeddings, zero-shot.

The checkpoints are built from BenchX's module structure, not from the adapter's modules: torchvision's ResNet-50
children up to layer4 plus avgpool in an ``nn.Sequential`` (named, unifier/blocks/vision/visual_encoder.py:103-124;
or numbered, ViLMedic's ``nn.Sequential(*children)``), ``vis_proj``/``lin_proj`` as
unifier/models/vilmedic/ConVIRT.py:62-71 defines them (widths of configs/_base_/models/convirt.yml:16-21) and a
transformers ``BertModel`` with pooler as ``linguistic.encoder`` (encoder_model.py:23-32), shrunk to a tiny config.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel

from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import WRAPPER_REASON
from vlpbench.adapters.convirt import TEXT_SIDE_REASON
from vlpbench.errors import CheckpointError
from vlpbench.testing import write_tiny_bert_folder
from vlpbench.testing.aligned import separating, set_sign_head

# ConVIRT.py:62-71 with convirt.yml:16-21: 2048 → 768 → 768.
PROJECTION = 768
# BenchX's trainer saves these entries around the model (unifier/executors/trainer.py:210-217; "config", an
# OmegaConf object, is left out here).
TRAINER_ENTRIES = ["training_scheduler", "optimizer", "scaler"]
# visual.model.*: torchvision ResNet-50 without fc (318 tensors; avgpool, relu and maxpool hold none).
N_IMAGE = 318
PINNED_SHAPES = {
    "visual.model.conv1.weight": (64, 3, 7, 7),
    "visual.model.layer4.2.bn3.running_var": (2048,),
    "vis_proj.0.weight": (PROJECTION, 2048),
    "vis_proj.2.weight": (PROJECTION, PROJECTION),
    "lin_proj.0.weight": (PROJECTION, 32),
    "linguistic.encoder.pooler.dense.weight": (32, 32),
}
BRIGHTNESS = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.2, 1.4, 1.6, 1.8])


def _children(numbered: bool) -> nn.Sequential:
    """visual_encoder.py:109-124: the children up to layer4, then avgpool, named or numbered."""
    resnet = torchvision.models.resnet50(weights=None)
    children = []
    for name, child in resnet.named_children():
        children.append((name, child))
        if name == "layer4":
            children.append(("avgpool", resnet.avgpool))
            break
    return nn.Sequential(*[c for _, c in children]) if numbered else nn.Sequential(OrderedDict(children))


def _projection(in_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, PROJECTION), nn.ReLU(), nn.Linear(PROJECTION, PROJECTION))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return write_tiny_bert_folder(tmp_path_factory.mktemp("bert"), hidden=32, layers=2)


@pytest.fixture(scope="module")
def base_image():
    image = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1)).expand(-1, 3, -1, -1)
    return image.contiguous()


@pytest.fixture(scope="module")
def parts(text_dir, base_image):
    """BenchX's ConVIRT modules with heads set so that bright images match 'effusion' and dark 'no effusion'."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        visual = _children(numbered=False).eval()
        bert = BertModel(BertConfig.from_pretrained(text_dir), add_pooling_layer=True).eval()
        vis_proj, lin_proj = _projection(2048), _projection(32)
    d = torch.zeros(PROJECTION)
    d[5] = 1.0
    with torch.no_grad():
        feature = visual(base_image).flatten(1)[0]
        tokens = AutoTokenizer.from_pretrained(text_dir)(["effusion", "no effusion"], padding=True,
                                                         return_tensors="pt")
        pooled = bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    # Bright images: pooled feature = brightness × feature (the ResNet is bias-free); threshold at brightness 1.
    set_sign_head(vis_proj, feature, float(feature @ feature), d)
    set_sign_head(lin_proj, *separating(pooled[0], pooled[1]), d)
    return visual, vis_proj, lin_proj, bert


def _state(parts, numbered: bool = False) -> dict[str, torch.Tensor]:
    visual, vis_proj, lin_proj, bert = parts
    if numbered:
        numbered_visual = _children(numbered=True)
        # Same children in the same order: the i-th tensor of one is the i-th of the other.
        numbered_visual.load_state_dict(dict(zip(numbered_visual.state_dict(), visual.state_dict().values())))
        visual = numbered_visual
    state = {f"linguistic.encoder.{k}": v for k, v in bert.state_dict().items()}
    state.update({f"visual.model.{k}": v for k, v in visual.state_dict().items()})
    state.update({f"vis_proj.{k}": v for k, v in vis_proj.state_dict().items()})
    state.update({f"lin_proj.{k}": v for k, v in lin_proj.state_dict().items()})
    return state


@pytest.fixture(scope="module")
def ckpt(parts, tmp_path_factory):
    path = tmp_path_factory.mktemp("convirt") / "ConVIRT.pth"
    torch.save({"model": _state(parts), "training_scheduler": {"epoch": 3}, "optimizer": {"state": {}},
                "scaler": {"scale": 1.0}}, path)
    return path


@pytest.fixture(scope="module")
def adapter(ckpt):
    return build_adapter("convirt", ckpt)


@pytest.fixture(scope="module")
def text_adapter(ckpt, text_dir):
    return build_adapter("convirt", ckpt, text_encoder=str(text_dir))


def test_published_layout_has_the_pinned_keys(parts):
    state = _state(parts)
    assert sum(k.startswith("visual.model.") for k in state) == N_IMAGE
    assert {k: tuple(state[k].shape) for k in PINNED_SHAPES} == PINNED_SHAPES
    assert [k for k in state if k.startswith(("vis_proj.", "lin_proj."))] == [
        "vis_proj.0.weight", "vis_proj.0.bias", "vis_proj.2.weight", "vis_proj.2.bias",
        "lin_proj.0.weight", "lin_proj.0.bias", "lin_proj.2.weight", "lin_proj.2.bias"]


def test_loads_with_every_key_accounted(adapter, parts):
    report = adapter.report
    assert report.ok and report.layout == "convirt-benchx (unwrapped 'model')"
    assert len(report.mapped) == N_IMAGE + 4
    assert ("visual.model.layer4.2.bn3.running_var", "encoder.layer4.2.bn3.running_var") in report.mapped
    assert report.ignored[WRAPPER_REASON] == TRAINER_ENTRIES
    text_keys = [k for k in _state(parts) if k.startswith(("linguistic.", "lin_proj."))]
    assert sorted(report.ignored[TEXT_SIDE_REASON]) == sorted(text_keys)
    assert adapter.capabilities == {"features", "embed_image"}
    assert adapter.image_size == 224 and adapter.in_channels == 3


def test_text_side_maps_with_a_text_encoder(text_adapter, parts):
    report = text_adapter.report
    n_bert = sum(k.startswith("linguistic.encoder.") for k in _state(parts))
    assert report.ok and len(report.mapped) == N_IMAGE + 8 + n_bert
    assert set(report.ignored) == {WRAPPER_REASON}
    assert {"embed_text", "zero_shot"} <= text_adapter.capabilities
    assert "text_encoder" in text_adapter.describe() and "zero_shot" in text_adapter.describe()["procedures"]


def test_a_renamed_key_is_named_in_the_error(parts, tmp_path):
    state = _state(parts)
    state["visual.model.layer1.0.conv_1.weight"] = state.pop("visual.model.layer1.0.conv1.weight")
    torch.save({"model": state}, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError) as error:
        build_adapter("convirt", tmp_path / "renamed.pth")
    message = str(error.value)
    assert "missing: 1 keys\n  - visual.model.layer1.0.conv1.weight" in message
    assert "unexpected: 1 keys\n  - visual.model.layer1.0.conv_1.weight" in message


def test_vilmedic_numbered_children_load_to_the_same_encoder(parts, adapter, tmp_path):
    torch.save({"model": _state(parts, numbered=True)}, tmp_path / "numbered.pth")
    numbered = build_adapter("convirt", tmp_path / "numbered.pth")
    assert numbered.report.layout.endswith("(numbered children: 0 = conv1, 1 = bn1, 4-7 = layer1-4)")
    assert ("visual.model.0.weight", "encoder.conv1.weight") in numbered.report.mapped
    assert ("visual.model.7.2.bn3.running_var", "encoder.layer4.2.bn3.running_var") in numbered.report.mapped
    ours, theirs = numbered.encoder().state_dict(), adapter.encoder().state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_encoder_and_embeddings_have_the_declared_shapes(adapter, text_adapter, base_image):
    features = adapter.encoder().eval()(base_image)
    assert [f.shape[1] for f in features] == [3, 64, 256, 512, 1024, 2048]
    image = adapter.embed_image(base_image.expand(2, -1, -1, -1))
    text = text_adapter.embed_text(["effusion", "no effusion", "small left effusion"])
    assert image.shape == (2, PROJECTION) and text.shape == (3, PROJECTION)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3))


def test_zero_shot_beats_chance_on_the_aligned_model(text_adapter, base_image):
    images = BRIGHTNESS.view(-1, 1, 1, 1) * base_image
    scores = text_adapter.zero_shot_scores(images, ["effusion"])[:, 0]
    bright = BRIGHTNESS > 1
    # cos = +1 / -1 with the prompts: softmax(1, -1) = 0.881 at the positive prompt.
    assert torch.allclose(scores[bright], torch.full((4,), 0.8808), atol=1e-3)
    assert torch.allclose(scores[~bright], torch.full((4,), 0.1192), atol=1e-3)
