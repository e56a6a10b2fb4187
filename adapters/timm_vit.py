"""The embedding side of a timm-named ViT tower: the frozen backbone, its tokens at the pre-training size.

Two published families keep their image tower in exactly timm's names (``transformer.ViTConfig.shapes``,
accounted by ``transformer.match_vit``, the shape read by ``ViTConfig.from_timm_state``):

- MGCA's ``vit_base`` (``mgca/models/backbones/vits.py``: ``VisionTransformer`` :111-198, ``Block`` :84-108,
  ``Attention`` :36-81, ``Mlp`` :14-33, built as ViT-B/16 by ``create_vit`` :325-333), BLIP's copy of the DeiT
  ViT with timm's ``PatchEmbed`` (:6, :144);
- BiomedCLIP's ``visual.trunk`` (open_clip ``timm_model.py`` ``TimmModel``: ``timm.create_model(
  "vit_base_patch16_224")`` with its classifier reset to none).

The keys, for depth ``L``: ``patch_embed.proj.{weight,bias}``, ``cls_token``, ``pos_embed``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}`` and ``norm.{weight,bias}``:
4 + 12·L + 2 keys, 150 for ViT-B. Both use LayerNorm with eps 1e-6 (vits.py:142; timm's default), exact GELU,
q/k/v biases (vits.py:118) and the class token after the final norm as the global feature; their projection
heads read that token (and BiomedCLIP's dense embedding the patch tokens) from :func:`vit_tokens`.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from vlpbench.adapters.transformer import ViTConfig
from vlpbench.errors import ConfigError


def frozen_backbone(config: ViTConfig, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The timm ViT of ``config`` holding ``state`` (built without random init, loaded strictly), in eval
    mode with gradients off: what the embedding methods run."""
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    model.load_state_dict(dict(state))
    return model.eval().requires_grad_(False)


def vit_tokens(backbone: nn.Module, config: ViTConfig, images: torch.Tensor) -> torch.Tensor:
    """All tokens after the final norm, ``(B, 1 + grid², width)``: the class token first, then the patches.

    Raises:
        ConfigError: ``images`` is not ``(B, 3, image_size, image_size)``: the embeddings are those of the
            pre-training size (the dense protocols' ``encoder()`` takes other sizes).
    """
    size = config.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ConfigError(f"this ViT's embeddings take images (B, 3, {size}, {size}), its pre-training size; "
                          f"got {tuple(images.shape)}")
    return backbone.to(images.device).forward_features(images.float())


def patch_grid(tokens: torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """Patch tokens ``(B, N, D)`` (class token removed) as a map ``(B, D, grid, grid)``, row-major as timm's
    ``PatchEmbed`` flattens them."""
    return tokens.transpose(1, 2).reshape(len(tokens), -1, config.grid, config.grid)
