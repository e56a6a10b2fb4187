"""Baselines of the papers' tables: a randomly initialised and a torchvision (e.g. ImageNet) ResNet-50."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from vlpbench.adapters.base import (
    WRAPPER_REASON,
    Adapter,
    LoadReport,
    Weights,
    match_resnet50_encoder,
    split_prefix,
    unwrap_state_dict,
)

FC_REASON = "classification head of the pre-training task"
# Re-exported: the reason every adapter gives for the non-weight entries of a checkpoint container.
__all__ = ["FC_REASON", "WRAPPER_REASON", "RandomResNet50", "TorchvisionResNet50"]


class RandomResNet50(Adapter):
    """ResNet-50 with torchvision's default init: the "Random" row of the papers' tables.

    The weights equal ``torchvision.models.resnet50()`` built right after ``torch.manual_seed(seed)``
    (without ``fc``). They are drawn under a forked RNG, so the caller's global RNG state is untouched.
    There is no pre-training input contract; the ImageNet convention (224, ImageNet mean/std) is used.
    """

    name = "random"
    description = "randomly initialised ResNet-50 (torchvision default init), seeded; no checkpoint"
    takes_checkpoint = False
    default_options = {"seed": 0}
    checkpoint_forms = ("none: weights are drawn from option seed (torchvision default init)",)

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Draw the encoder weights for ``options["seed"]``."""
        from segmentation_models_pytorch.encoders import get_encoder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options["seed"])
            state = get_encoder("resnet50", weights=None).state_dict()
        report = LoadReport("random-init")
        return Weights(report, match_resnet50_encoder(state, report))


class TorchvisionResNet50(Adapter):
    """A torchvision ResNet-50 state dict from a local file, e.g. ImageNet weights: the "ImageNet" row.

    Accepts the plain state dict (320 keys; ``fc.*`` is ignored), the same wrapped as ``{"state_dict": ...}``
    or ``{"model": ...}`` (other wrapper entries are ignored as training state), and a DataParallel
    ``module.`` or torch.compile ``_orig_mod.`` prefix on every key. Each unwrapping is recorded in the
    layout string. Input contract: torchvision's ImageNet recipe, 224 pixels, ImageNet mean/std.
    """

    name = "resnet50"
    description = "torchvision ResNet-50 weights from a local file (e.g. ImageNet); fc ignored"
    checkpoint_forms = (
        "torchvision ResNet-50 state dict .pth/.safetensors (320 keys; fc ignored)",
        "the same inside {'state_dict': ...} or {'model': ...} (e.g. a Lightning .ckpt), "
        "keys optionally prefixed 'module.' or '_orig_mod.'",
    )

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Unwrap, strip ``module.``/``_orig_mod.``, ignore ``fc.*`` and account the rest as a ResNet-50 encoder."""
        report = LoadReport("torchvision-resnet50")
        state, prefix = unwrap_state_dict(checkpoint, report, containers=("state_dict", "model"),
                                          what="a ResNet-50 checkpoint")
        head, body = split_prefix(state, "fc.")
        report.ignore(FC_REASON, [prefix + k for k in head])
        return Weights(report, match_resnet50_encoder(body, report, source_prefix=prefix))
