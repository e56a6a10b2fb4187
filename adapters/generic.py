"""Any torchvision ResNet or timm model from a local state dict, as an smp encoder of the same architecture.

Option ``arch`` names the architecture, as smp's ``get_encoder`` does:

- ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``: a torchvision state dict
  (``conv1.weight``, ``layer4.1.bn2.running_var``, ...); smp's ResNet encoders use the same names.
- ``tu-<timm name>`` (e.g. ``tu-efficientnet_b0``, ``tu-convnext_tiny``, ``tu-swin_tiny_patch4_window7_224``):
  a timm state dict (``timm.create_model(name).state_dict()``). smp's ``TimmUniversalEncoder`` holds timm's
  feature extractor as ``self.model``. Its keys are timm's own, except where timm's feature wrapper flattens
  a sequential container into the extractor (``layers.0`` -> ``layers_0`` for Swin, ``stem.0`` -> ``stem_0``,
  ``stages.0`` -> ``stages_0`` for ConvNeXt): file key ``k`` becomes encoder key ``model.<flattened k>``.
  A Swin is built to take any input size (``vlpbench.adapters.swin.build_swin_encoder``).

Classification heads (``fc.*``, ``head.*``, ``classifier.*``) and, for timm models, the other layers that
come after the deepest feature map (e.g. EfficientNet's ``conv_head``/``bn2``) are ignored with a reason.
Checkpoint containers and ``module.``/``_orig_mod.`` prefixes are unwrapped as for every adapter.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

import torch

from vlpbench.adapters.base import Adapter, LoadReport, Weights, encoder_shapes, match_keys, unwrap_state_dict
from vlpbench.adapters.swin import build_swin_encoder, is_timm_swin
from vlpbench.errors import ConfigError

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
TIMM_PREFIX = "tu-"
HEAD_PREFIXES = ("fc.", "head.", "classifier.")
HEAD_REASON = "classification head of the pre-training task; the encoder ends at the deepest feature map"
TAIL_REASON = ("layers of the timm model after its deepest feature map (e.g. a final 1×1 conv and norm before "
               "pooling); smp's feature extractor stops at that map")
# smp's TimmUniversalEncoder keeps the timm feature extractor in this attribute.
_TIMM_MODULE = "model."


class GenericAdapter(Adapter):
    """A torchvision ResNet (18-152) or a timm model, chosen by option ``arch``; ImageNet input contract.

    The instance's ``encoder_name`` is its ``arch``, so ``encoder()`` builds the matching smp encoder and the
    segmentation U-Net is built around it.
    """

    name = "generic"
    description = "any torchvision ResNet (arch=resnet18..resnet152) or timm model (arch=tu-<name>), local file"
    default_options = {"arch": "resnet50"}
    checkpoint_forms = (
        "torchvision ResNet state dict, arch=resnet18/34/50/101/152 (fc ignored)",
        "timm model state dict, arch=tu-<timm name> (head/classifier and layers after the last feature map "
        "ignored)",
        "either inside {'state_dict': ...} or {'model': ...}, keys optionally prefixed 'module.' or '_orig_mod.'",
    )

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly against the encoder of option ``arch`` (see ``Adapter.__init__``)."""
        super().__init__(checkpoint, **options)
        self.encoder_name = self.options["arch"]

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Unwrap, ignore the head (and a timm model's tail), account the rest against the smp encoder of ``arch``.

        Raises:
            ConfigError: ``arch`` is neither a torchvision ResNet nor ``tu-<timm name>`` timm knows.
            CheckpointError: the file does not hold a dict of tensors.
        """
        arch = options["arch"]
        if arch not in TORCHVISION_RESNETS and not arch.startswith(TIMM_PREFIX):
            raise ConfigError(f"adapter 'generic': arch={arch!r} is not supported; expected one of "
                              f"{', '.join(TORCHVISION_RESNETS)} or {TIMM_PREFIX}<timm model name>")
        expected = encoder_shapes(arch)
        report = LoadReport(f"generic-{arch}")
        state, prefix = unwrap_state_dict(checkpoint, report, containers=("state_dict", "model"),
                                          what=f"a {arch} checkpoint")
        timm = arch.startswith(TIMM_PREFIX)
        # Encoder key -> the key the file holds it under: timm's own name for timm models.
        sources = _timm_sources(arch[len(TIMM_PREFIX):]) if timm else {k: k for k in expected}
        expected = {sources[k]: shape for k, shape in expected.items()}
        tail = _timm_tail_keys(arch[len(TIMM_PREFIX):]) if timm else frozenset()

        body = {}
        for key, value in state.items():
            if key in expected:
                body[key] = value
            elif isinstance(key, str) and key.startswith(HEAD_PREFIXES):
                report.ignore(HEAD_REASON, [prefix + key])
            elif key in tail:
                report.ignore(TAIL_REASON, [prefix + key])
            else:
                body[key] = value  # accounted as unexpected by match_keys, named as in the file
        first = len(report.mapped)
        matched = match_keys(body, expected, report, source_prefix=prefix)
        target = {source: key for key, source in sources.items()}
        report.mapped[first:] = [(k, "encoder." + target[k[len(prefix):]]) for k, _ in report.mapped[first:]]
        return Weights(report, {target[k]: v for k, v in matched.items()})

    def encoder(self) -> torch.nn.Module:
        """``Adapter.encoder``; a timm Swin is built to take any input size (``build_swin_encoder``)."""
        if is_timm_swin(self.encoder_name):
            return build_swin_encoder(self.encoder_name, self._encoder_state)
        return super().encoder()


@functools.lru_cache(maxsize=None)
def _timm_sources(timm_name: str) -> Mapping[str, str]:
    """Key of smp's ``tu-<timm_name>`` encoder -> the key of the full timm model that holds the same tensor.

    The encoder's keys are ``model.<feature extractor key>``; timm's feature wrapper names a module it lifts
    out of a sequential container ``<container>_<child>`` (``layers_0``) where the model has
    ``<container>.<child>`` (``layers.0``). The first dotted part is unflattened at the underscore that gives
    a key of the full model; keys that are the model's own already stay.
    """
    full = _timm_full_keys(timm_name)
    sources = {}
    for key in encoder_shapes(TIMM_PREFIX + timm_name):
        inner = key[len(_TIMM_MODULE):]
        head, _, rest = inner.partition(".")
        candidates = [inner] + [f"{head[:i]}.{head[i + 1:]}.{rest}" for i, c in enumerate(head) if c == "_"]
        sources[key] = next((c for c in candidates if c in full), inner)
    return sources


@functools.lru_cache(maxsize=None)
def _timm_full_keys(timm_name: str) -> frozenset[str]:
    """State-dict keys of the full timm model ``timm_name`` (built on the meta device: names only)."""
    import timm

    with torch.device("meta"):
        return frozenset(timm.create_model(timm_name, pretrained=False).state_dict())


@functools.lru_cache(maxsize=None)
def _timm_tail_keys(timm_name: str) -> frozenset[str]:
    """Keys of the full timm model that its smp feature extractor drops (head and final layers)."""
    return _timm_full_keys(timm_name) - set(_timm_sources(timm_name).values())
