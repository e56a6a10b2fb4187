"""Random-init Ark checkpoints in the published layouts (``vlpbench.adapters.ark``), from a tiny timm Swin.

The backbone is timm's ``SwinTransformer`` built at the trained size (``strict_img_size``: its shifted-window masks
are those of that size), its state dict written under timm 0.5.4's names as Ark saved them: patch merging at the end
of stage i (``layers.<i>.downsample``, timm 1.x holds it at the start of stage i + 1), the classifier as ``head``
(1.x: ``head.fc``), and the two buffers 0.5.4 kept persistent, ``attn.relative_position_index`` and the shifted
blocks' ``attn_mask``. Beside it ``ArkSwinTransformer``'s ``projector`` (linear or MLP) and ``omni_heads``
(jlianglab/Ark ``Ark_MICCAI2023/models.py:13-31``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from vlpbench.adapters.ark import build_projector

# ArkSwinTransformer leaves SwinTransformer's default classifier in place (models.py:14-15): 1000 classes.
IMAGENET_CLASSES = 1000
# --data_set order of Ark's six datasets, outputs of each head (Ark+ notebook cell 2: [14, 14, 14, 3, 6, 1]).
HEAD_SIZES = (14, 14, 14, 3, 6, 1)


def tiny_swin(*, img_size: int, window_size: int, embed_dim: int = 16, depths: tuple[int, ...] = (2, 2, 2, 2),
              num_heads: tuple[int, ...] = (1, 1, 2, 2), seed: int = 0) -> nn.Module:
    """A small timm ``SwinTransformer`` (random init under ``seed``, caller's RNG untouched) in eval mode."""
    from timm.models.swin_transformer import SwinTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SwinTransformer(img_size=img_size, patch_size=4, window_size=window_size, embed_dim=embed_dim,
                               depths=depths, num_heads=num_heads, num_classes=IMAGENET_CLASSES).eval()


def timm054_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s (a timm 1.x ``SwinTransformer``) state dict under timm 0.5.4's names, with its persistent buffers."""
    state = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        state[key.replace("head.fc.", "head.")] = value.clone()
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            state[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = block.attn.relative_position_index.clone()
            if block.attn_mask is not None:
                state[f"layers.{i}.blocks.{j}.attn_mask"] = block.attn_mask.clone()
    return state


def ark_state(model: nn.Module, *, projector: str = "linear", projector_features: int = 24,
              head_sizes: tuple[int, ...] = HEAD_SIZES, seed: int = 0) -> dict[str, torch.Tensor]:
    """An ``ArkSwinTransformer`` state dict: ``model``'s backbone (:func:`timm054_state`), a random ``projector``
    (``linear`` or ``mlp``) of ``projector_features`` and one random ``omni_heads`` classifier per head size."""
    state = timm054_state(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = build_projector(projector, model.num_features, projector_features)
        heads = nn.ModuleList(nn.Linear(projector_features, n) for n in head_sizes)
    state.update({f"projector.{k}": v for k, v in proj.state_dict().items()})
    state.update({f"omni_heads.{k}": v for k, v in heads.state_dict().items()})
    return state


def training_checkpoint(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], *,
                        data_parallel: bool = True, epoch: int = 50) -> dict[str, Any]:
    """Ark's ``save_checkpoint`` container (``Ark_Plus/Pretraining/engine.py:181-188``): ``epoch``, ``lossMIN``,
    ``state_dict`` (the student), ``teacher``, and an SGD optimizer's and a scheduler's state; keys prefixed
    ``module.`` when trained under ``DataParallel``."""
    prefix = "module." if data_parallel else ""
    return {
        "epoch": epoch,
        "lossMIN": [0.25, 0.5],
        "state_dict": {prefix + k: v for k, v in student.items()},
        "teacher": {prefix + k: v for k, v in teacher.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.3, "momentum": 0.9, "params": [0, 1]}]},
        "scheduler": {"base_values": [0.3], "t_initial": 200},
    }
