"""A base for test models that need no checkpoint.

A subclass names itself and its capabilities and computes its embeddings from the inputs themselves
(image brightness, a lookup table), so that a test decides what a zero-shot, grounding or retrieval score
must come out as, without training or weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlpbench.adapters.base import Adapter, LoadReport, Weights


class WeightlessAdapter(Adapter):
    """An adapter with no weights to load: identity normalisation at 32² unless a subclass says otherwise."""

    takes_checkpoint = False
    image_size = 32
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    @classmethod
    def map_weights(cls, checkpoint, options) -> Weights:
        """Nothing to map: an empty accounting."""
        return Weights(LoadReport("none"), {})


class BrightnessPair(WeightlessAdapter):
    """A two-dimensional aligned image-text model: a bright image (opacity, effusion) points towards "<finding>",
    a dark one towards "no <finding>", so a finding's zero-shot score rises with brightness."""

    capabilities = frozenset({"embed_image", "embed_text"})
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        angle = math.pi / 2 * torch.sigmoid(4 * images.mean(dim=(1, 2, 3)))
        return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0] if t.startswith("no ") else [0.0, 1.0] for t in texts])


class BrightnessClip(WeightlessAdapter):
    """Image embeddings from mean brightness (and contrast) against two fixed text directions, so that
    zero-shot scores vary from image to image."""

    capabilities = frozenset({"embed_image", "embed_text"})

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        level = images.mean(dim=(1, 2, 3))
        return F.normalize(torch.stack([1 - level, level, 0.1 * images.std(dim=(1, 2, 3))], dim=1), dim=1)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(torch.tensor([[1.0, 0.2, 0.0] if t.startswith("no ") else [0.2, 1.0, 0.5]
                                         for t in texts]), dim=1)


class BrightnessGrounding(WeightlessAdapter):
    """Grounding heat maps from local brightness (darkness for pneumothorax, which synthetic data draws dark) inside a
    fixed lung band, in 4×4 cells; 64² input, no weights."""

    name = "grounding-test-brightness"
    description = "test model: heat maps from local brightness inside the lung band"
    capabilities = frozenset({"dense_embed", "embed_text"})
    image_size = 64

    def dense_embed(self, images: torch.Tensor) -> torch.Tensor:
        level = F.avg_pool2d(images.mean(1, keepdim=True), 4)
        h, w = level.shape[-2:]
        rows, cols = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
        side = torch.minimum(cols, 1 - cols)
        band = (((side > 0.08) & (side < 0.42))[None, :] & ((rows > 0.1) & (rows < 0.9))[:, None]).float()
        features = torch.cat([level * band, (1 - level) * band, (1 - band).expand_as(level)], dim=1)
        return F.normalize(features, dim=1)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[0.0, 1.0, 0.0] if "pneumothorax" in t.lower() else [1.0, 0.0, 0.0] for t in texts])
