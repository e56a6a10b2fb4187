"""Golden outputs: each adapter's outputs on a fixed input, from a seeded random-init checkpoint in its
published layout, are pinned to numbers recorded here, so that any change of a key mapping, a head or a
preprocessing step fails. Two loads of one checkpoint must also agree exactly.

Each output is summarised by its sum and three entries (first, middle, last of the flattened tensor). The
numbers come from the writers' seeded init; re-pin them only for a deliberate change, saying why. The second
load is compared on every output except the image embeddings that need a large input (G2D's 256², MGCA's
299²): those run the same encoder weights, and the first load pins them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from transformers import BertConfig, BertTokenizer

from vlpbench.adapters import build_adapter
from vlpbench.adapters.base import Adapter
from vlpbench.testing import (
    write_clip_checkpoint,
    write_g2d_checkpoint,
    write_medklip_checkpoint,
    write_medklip_entity_embeddings,
    write_mgca_checkpoint,
)

WORDS = ["no", "pleural", "effusion", "pneumothorax", "left", "small"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [chr(c) for c in range(97, 123)] + [
    f"##{chr(c)}" for c in range(97, 123)]
TEXTS = ["no pleural effusion", "small left pneumothorax"]
_GENERATOR = torch.Generator().manual_seed(2024)
IMAGE_32 = torch.randn(1, 3, 32, 32, generator=_GENERATOR)
IMAGE_64 = torch.randn(1, 3, 64, 64, generator=_GENERATOR)
IMAGE_256 = torch.randn(1, 3, 256, 256, generator=_GENERATOR)

Files = tuple[Path, dict[str, Any]]


def digest(tensor: torch.Tensor) -> tuple[float, ...]:
    """Sum and the first, middle and last entries of ``tensor``."""
    flat = tensor.detach().flatten().double()
    return (float(flat.sum()), float(flat[0]), float(flat[len(flat) // 2]), float(flat[-1]))


def _bert_folder(folder: Path, **config: Any) -> str:
    """A local BERT folder: word-piece tokenizer over ``VOCAB`` and a config (no weights)."""
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    BertConfig(**config).save_pretrained(folder)
    return str(folder)


def _features(adapter: Adapter, image: torch.Tensor) -> torch.Tensor:
    """The deepest feature map of the adapter's encoder, in eval mode."""
    with torch.no_grad():
        return adapter.encoder().eval()(image)[-1]


def _g2d_files(folder: Path) -> Files:
    text = _bert_folder(folder / "bert", vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128)
    checkpoint = write_g2d_checkpoint(folder / "g2d_checkpoint.pth", "pretrain", seed=0, text_layers=2,
                                      text_hidden=32, text_vocab=len(VOCAB))
    return checkpoint, {"text_encoder": text}


def _g2d_outputs(adapter: Adapter, large: bool = True) -> dict[str, torch.Tensor]:
    outputs = {"features": _features(adapter, IMAGE_64), "dense_embed": adapter.dense_embed(IMAGE_64),
               "embed_text": adapter.embed_text(TEXTS)}
    return {**outputs, "embed_image": adapter.embed_image(IMAGE_256)} if large else outputs


def _mgca_files(folder: Path) -> Files:
    text = _bert_folder(folder / "bert", vocab_size=28996, hidden_size=24, num_hidden_layers=12,
                        num_attention_heads=12, intermediate_size=96)
    checkpoint = write_mgca_checkpoint(folder / "resnet_50.ckpt", seed=0, text_layers=2, text_hidden=24)
    return checkpoint, {"text_encoder": text}


def _mgca_outputs(adapter: Adapter, large: bool = True) -> dict[str, torch.Tensor]:
    outputs = {"features": _features(adapter, IMAGE_64), "embed_text": adapter.embed_text(TEXTS)}
    return {**outputs, "embed_image": adapter.embed_image(IMAGE_32)} if large else outputs


def _medklip_files(folder: Path) -> Files:
    entities = write_medklip_entity_embeddings(folder / "entities.safetensors", seed=0)
    return write_medklip_checkpoint(folder / "checkpoint_final.pth", seed=0), {"entity_embeddings": str(entities)}


def _medklip_outputs(adapter: Adapter, large: bool = True) -> dict[str, torch.Tensor]:
    classes = ["pneumonia", "Pleural Effusion"]
    return {"features": _features(adapter, IMAGE_64), "zero_shot": adapter.zero_shot_scores(IMAGE_64, classes),
            "grounding": adapter.grounding_maps(IMAGE_64, classes)}


def _clip_files(folder: Path) -> Files:
    return write_clip_checkpoint(folder / "clip.pt", seed=0), {}


def _clip_outputs(adapter: Adapter, large: bool = True) -> dict[str, torch.Tensor]:
    return {"embed_image": adapter.embed_image(IMAGE_32), "dense_embed": adapter.dense_embed(IMAGE_32),
            "embed_text": adapter.embed_text(TEXTS)}


# Per adapter: write the files, and compute the outputs (``large=False``: without large-input embeddings).
ADAPTERS: dict[str, tuple[Callable[[Path], Files], Callable[[Adapter, bool], dict[str, torch.Tensor]]]] = {
    "g2d": (_g2d_files, _g2d_outputs),
    "mgca": (_mgca_files, _mgca_outputs),
    "medklip": (_medklip_files, _medklip_outputs),
    "clip": (_clip_files, _clip_outputs),
}

# Recorded with torch 2.14 (CPU) from the writers above. G2D's and MGCA's encoders are both torchvision's
# ResNet-50 init under seed 0, so their feature digests agree.
GOLDEN: dict[str, dict[str, tuple[float, ...]]] = {
    "g2d": {
        "features": (120512.2622, 9.235729218, 1.959127426, 0.0),
        "embed_image": (-0.4383363161, 0.04474093020, 0.03911735117, -0.01953330636),
        "dense_embed": (-0.1092609080, 0.06921178848, 0.03500180691, -0.004107960034),
        "embed_text": (0.5581830754, 0.05876234919, 0.05907746032, 0.02174702846),
    },
    "mgca": {
        "features": (120512.2622, 9.235729218, 1.959127426, 0.0),
        "embed_image": (-0.04804610438, -0.1033147126, -0.03596014157, 0.003294863738),
        "embed_text": (1.534855922, -0.07777963579, -0.07476467639, 0.01150122937),
    },
    "medklip": {
        "features": (176293.1649, 2.127751112, 6.555924892, 0.0),
        "zero_shot": (0.8074107766, 0.3431991339, 0.4642116427, 0.4642116427),
        "grounding": (2.0, 0.06285252422, 0.05884063989, 0.06318874657),
    },
    "clip": {
        "embed_image": (0.7058724570, 0.003341229632, -0.1660970598, -0.1777853817),
        "dense_embed": (2.213698754, 0.1597167253, 0.1227359846, -0.1949155629),
        "embed_text": (1.715011247, 0.2382103801, 0.3035301268, 0.05666819587),
    },
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_outputs_match_pinned_numbers_and_two_loads_agree(name, tmp_path):
    write_files, outputs_of = ADAPTERS[name]
    checkpoint, options = write_files(tmp_path)
    outputs = outputs_of(build_adapter(name, checkpoint, **options), True)
    again = outputs_of(build_adapter(name, checkpoint, **options), False)
    assert set(outputs) == set(GOLDEN[name])
    for key, value in outputs.items():
        assert digest(value) == pytest.approx(GOLDEN[name][key], rel=1e-4, abs=1e-4), f"{name} {key}"
    for key, value in again.items():
        assert torch.equal(value, outputs[key]), f"{name} {key}: two loads differ"
