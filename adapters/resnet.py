"""Baselines of the papers' tables: a randomly initialised and a torchvision (e.g. ImageNet) ResNet-50."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from vlpbench.adapters.base import Adapter, LoadReport, Weights, match_resnet50_encoder, split_prefix
from vlpbench.errors import CheckpointError

FC_REASON = "classification head of the pre-training task"
WRAPPER_REASON = "other entries of the checkpoint wrapper (training state, not weights)"
_WRAPPERS = ("state_dict", "model")
_DDP_PREFIX = "module."


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
    ``module.`` prefix on every key. Each unwrapping is recorded in the layout string. Input contract:
    torchvision's ImageNet recipe, 224 pixels, ImageNet mean/std.
    """

    name = "resnet50"
    description = "torchvision ResNet-50 weights from a local file (e.g. ImageNet); fc ignored"

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Unwrap, strip ``module.``, ignore ``fc.*`` and account the rest as a ResNet-50 encoder."""
        report = LoadReport("torchvision-resnet50")
        state = checkpoint
        notes = []
        while isinstance(state, Mapping):
            wrapper = next((k for k in _WRAPPERS if isinstance(state.get(k), Mapping)), None)
            if wrapper is None:
                break
            report.ignore(WRAPPER_REASON, [str(k) for k in state if k != wrapper])
            notes.append(f"unwrapped {wrapper!r}")
            state = state[wrapper]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"a ResNet-50 checkpoint is a dict of tensors; this file holds a "
                                  f"{type(state).__name__}")

        prefix = ""
        if state and all(isinstance(k, str) and k.startswith(_DDP_PREFIX) for k in state):
            prefix = _DDP_PREFIX
            notes.append(f"stripped {_DDP_PREFIX!r}")
        if notes:
            report.layout += f" ({', '.join(notes)})"

        head, body = split_prefix(state, prefix + "fc.")
        report.ignore(FC_REASON, list(head))
        body = {(k[len(prefix):] if isinstance(k, str) else k): v for k, v in body.items()}
        return Weights(report, match_resnet50_encoder(body, report, source_prefix=prefix))
