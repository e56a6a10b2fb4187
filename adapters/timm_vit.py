"""Plain ViT image towers under timm's key names: the shape read from the weights, strict accounting, the model.

Two published families keep their image tower in exactly these names:

- MGCA's ``vit_base`` (``mgca/models/backbones/vits.py``: ``VisionTransformer`` :111-198, ``Block`` :84-108,
  ``Attention`` :36-81, ``Mlp`` :14-33, built as ViT-B/16 by ``create_vit`` :325-333), a copy of BLIP's/DeiT's
  ViT with timm's ``PatchEmbed`` (:6, :144);
- BiomedCLIP's ``visual.trunk`` (open_clip ``timm_model.py`` ``TimmModel``: ``timm.create_model(
  "vit_base_patch16_224")`` with its classifier reset to none).

The keys, for depth ``L``: ``patch_embed.proj.{weight,bias}``, ``cls_token``, ``pos_embed``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}`` and ``norm.{weight,bias}``:
4 + 12·L + 2 keys, 150 for ViT-B. Both use LayerNorm with eps 1e-6 (vits.py:142; timm's default), exact GELU,
q/k/v biases (vits.py:118) and the class token after the final norm as the pooled feature.

Attention heads are not visible in the weights; as in ViT-B/16 (768 wide, 12 heads), DeiT and OpenAI's
CLIP they are taken to be 64 wide, and a width that is no multiple of 64 is refused.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import LoadReport, loaded_eval, match_keys
from vlpbench.errors import CheckpointError, ConfigError

HEAD_WIDTH = 64
# The keys the shape is read from; without them nothing can be built.
SHAPE_KEYS = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


@dataclass(frozen=True)
class VitShape:
    """The shape of a plain ViT with a class token, as read from its weights."""

    width: int
    depth: int
    patch_size: int
    grid: int
    mlp_width: int

    @property
    def image_size(self) -> int:
        """The input side in pixels that the positional embedding fixes (patch size × grid)."""
        return self.patch_size * self.grid

    @property
    def heads(self) -> int:
        """Attention heads, each ``HEAD_WIDTH`` wide (module docstring)."""
        return self.width // HEAD_WIDTH

    @classmethod
    def read(cls, state: Mapping[str, Any]) -> "VitShape":
        """Read the shape from ``state`` (timm key names; ``SHAPE_KEYS`` must be tensors, the caller checks).

        Raises:
            CheckpointError: the positional embedding is not one class token plus a square grid, or the width
                is not a multiple of ``HEAD_WIDTH``.
        """
        width, _, patch_size, _ = state["patch_embed.proj.weight"].shape
        positions = state["pos_embed"].shape[-2] - 1
        grid = round(positions ** 0.5)
        if grid * grid != positions:
            raise CheckpointError(f"pos_embed holds {positions + 1} positions, not a class token plus a square grid")
        if width % HEAD_WIDTH:
            raise CheckpointError(f"ViT width {width} (patch_embed.proj.weight) is not a multiple of the "
                                  f"{HEAD_WIDTH}-wide attention heads of ViT-B/16")
        depth = len({m.group(1) for k in state if isinstance(k, str) and (m := _BLOCK.match(k))})
        return cls(width=width, depth=depth, patch_size=patch_size, grid=grid,
                   mlp_width=state["blocks.0.mlp.fc1.weight"].shape[0])

    def build(self) -> nn.Module:
        """A timm ``VisionTransformer`` of this shape, no classifier, class-token pooling (random init)."""
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=self.image_size, patch_size=self.patch_size, embed_dim=self.width,
                                 depth=self.depth, num_heads=self.heads, mlp_ratio=self.mlp_width / self.width,
                                 qkv_bias=True, num_classes=0, global_pool="token")


@functools.lru_cache(maxsize=None)
def vit_shapes(shape: VitShape) -> Mapping[str, tuple[int, ...]]:
    """Key → shape of the timm ViT of ``shape``, built on the meta device (no init time spent)."""
    with torch.device("meta"):
        model = shape.build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_vit(part: Mapping[str, Any], report: LoadReport, *, source_prefix: str,
              target_prefix: str = "vit.") -> tuple[dict[str, torch.Tensor], VitShape | None]:
    """Account ``part`` (a ViT's keys, ``source_prefix`` removed) against the timm ViT of the shape it holds.

    Returns the matched tensors and the shape; when a key the shape is read from is missing, nothing is
    matched, the report lists that key as missing and every other key as unexpected, and the shape is None.
    """
    absent = [k for k in SHAPE_KEYS if not isinstance(part.get(k), torch.Tensor)]
    if absent:
        report.missing += [source_prefix + k for k in absent]
        report.unexpected += [f"{source_prefix}{k}" for k in part if k not in SHAPE_KEYS]
        return {}, None
    shape = VitShape.read(part)
    return match_keys(part, vit_shapes(shape), report, source_prefix=source_prefix,
                      target_prefix=target_prefix), shape


def build_vit(shape: VitShape, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The timm ViT of ``shape`` holding ``state`` (loaded strictly), in eval mode, gradients off."""
    return loaded_eval(shape.build(), state).requires_grad_(False)


def vit_tokens(vit: nn.Module, shape: VitShape, images: torch.Tensor) -> torch.Tensor:
    """All tokens after the final norm, ``(B, 1 + grid², width)``: the class token first, then the patches.

    Raises:
        ConfigError: ``images`` is not ``(B, 3, image_size, image_size)`` (the positional embedding fixes it).
    """
    size = shape.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ConfigError(f"this ViT takes images (B, 3, {size}, {size}) (its positional embedding fixes the "
                          f"size), got {tuple(images.shape)}")
    return vit.to(images.device).forward_features(images.float())


def patch_grid(tokens: torch.Tensor, shape: VitShape) -> torch.Tensor:
    """Patch tokens ``(B, N, D)`` (class token removed) as a map ``(B, D, grid, grid)``, row-major as timm's
    ``PatchEmbed`` flattens them."""
    return tokens.transpose(1, 2).reshape(len(tokens), -1, shape.grid, shape.grid)

