"""MGCA (NeurIPS 2022) with its ViT-B/16 image encoder: the published Lightning ``vit_base.ckpt``.

The file is the same Lightning container as ``resnet_50.ckpt`` (``state_dict``, ``hyper_parameters`` with
``img_encoder = "vit_base"``, training state; ``mgca.py`` describes the shared parts), with another image
encoder (``mgca/models/backbones/encoder.py`` ``ImageEncoder`` :71-94):

- ``img_encoder_q.model.*``: ``create_vit("base", 224)`` (``vits.py``:325-333), BLIP's copy of the DeiT
  ViT-B/16, initialised from DeiT-B (encoder.py:82-86): ``patch_embed.proj``, ``cls_token``, ``pos_embed``
  (197 positions), ``blocks.0-11`` and ``norm``, no classifier: 150 keys in timm's names (``timm_vit.py``).
- ``img_encoder_q.global_embed.head.*``: ``GlobalEmbedding(768, 2048, 128)`` (encoder.py:88-90) over the
  class token, which ``ImageEncoder.forward`` returns as the global feature (encoder.py:141-143:
  ``img_feat[:, 0]``, after the ViT's final norm, vits.py:196). Mapped: ``embed_image``.
- ``img_encoder_q.local_embed.head.*``: ``LocalEmbedding(768, 2048, 128)`` (encoder.py:92-94: Conv1d
  768→2048, BN, ReLU, Conv1d 2048→128, BN without affine) over the 196 patch tokens. Ignored, for the reason
  the ResNet adapter ignores its local head: aligned with MGCA's word embeddings, not with ``embed_text``.
- the text side, token-level attention and prototypes exactly as in ``resnet_50.ckpt``; the text side is
  mapped with option ``text_encoder`` by the functions of ``mgca.py``.

Input contract: 224² (the positional embedding fixes it; the ViT forward, encoder.py:135-136, does not
resize, unlike the ResNet's 299² upsampling), mean = std = 0.5 (``mgca/datasets/transforms.py``:8-21).
The shape is read from the weights, so a smaller ViT in the same names also loads (tests use one).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    EMBED_IMAGE,
    EMBED_TEXT,
    CapabilityError,
    LoadReport,
    ModelCard,
    Weights,
    split_prefix,
    unwrap_state_dict,
)
from vlpbench.adapters.mgca import (
    IMAGE_ENCODER_PREFIX,
    MgcaAdapter,
    image_encoder_hparam,
    map_heads_and_text,
)
from vlpbench.adapters.timm_vit import VitShape, build_vit, match_vit, vit_tokens
from vlpbench.errors import CheckpointError

VIT_WIDTH = 768
IMAGE_LOCAL_HEAD_REASON = (
    "MGCA's local image head (Conv1d 768→2048→128 over the ViT's patch tokens): its patch embeddings are aligned "
    "with MGCA's word embeddings, not with the report embedding of embed_text, so no protocol uses them"
)
_RESNET_MESSAGE = (
    "this is MGCA's ResNet-50 variant (resnet_50.ckpt; {found}); adapter 'mgca_vit' loads the ViT-B/16 "
    "variant (vit_base.ckpt): load this file with --model mgca"
)
_RESNET_KEYS = tuple(IMAGE_ENCODER_PREFIX + k for k in ("conv1.", "layer1."))
_ENCODER_MESSAGE = (
    "adapter {name!r} has no multi-scale encoder yet: its ViT-B/16 needs the ViT feature pyramid "
    "(vlpbench.adapters.transformer), which is not part of this version; use the zero-shot tasks "
    "(embed_image, embed_text) instead"
)


class MgcaVitAdapter(MgcaAdapter):
    """MGCA's ViT-B/16 image encoder and global embeddings from the published Lightning ``vit_base.ckpt``.

    Everything but the image encoder is MGCA's ResNet adapter's: the text side with ``text_encoder=DIR``, its
    ``embed_text`` and the CheXzero-style ``zero_shot_scores`` over the 128-d report space.
    """

    name = "mgca_vit"
    card = ModelCard(
        paper="Wang et al., Multi-Granularity Cross-modal Alignment for Generalized Medical Visual "
              "Representation Learning, NeurIPS 2022",
        repository="github.com/HKU-MedAI/MGCA (mgca/models/mgca/mgca_module.py, mgca/models/backbones/encoder.py, "
                   "mgca/models/backbones/vits.py)",
        checkpoints=("vit_base.ckpt — Google Drive link in the repository's README",),
        pretraining_data=("mimic_cxr",),
        notes=("the ViT-B/16 variant; resnet_50.ckpt loads with adapter mgca",
               "the image encoder was initialised from ImageNet DeiT-B before MGCA's pre-training"),
    )
    description = ("MGCA (NeurIPS 2022) ViT-B/16: the published Lightning vit_base.ckpt; 128-d global embeddings "
                   "of the class token, text side with text_encoder=DIR")
    capabilities = frozenset({EMBED_IMAGE, EMBED_TEXT})
    checkpoint_forms = (
        "MGCA vit_base.ckpt (Lightning checkpoint: state_dict with img_encoder_q.model.*, the DeiT/BLIP ViT-B/16, "
        "150 keys; img_encoder_q.global_embed for embed_image; text_encoder_q.model.* and text_encoder_q."
        "global_embed with --model-option text_encoder=DIR; local heads and prototypes ignored)",
        "its state_dict alone, keys optionally prefixed 'module.' or '_orig_mod.'",
    )
    capability_hints = {
        **MgcaAdapter.capability_hints,
        EMBED_IMAGE: "needs MGCA's full vit_base.ckpt, whose img_encoder_q.global_embed holds the image head",
        "features": "the ViT feature pyramid for segmentation, detection and linear probing is not part of "
                    "this version",
    }
    procedures = {
        "zero_shot": "CheXzero's softmax over the (positive, negative) prompt pair of bare cosine similarities "
                     "(Adapter.zero_shot_scores); MGCA publishes no zero-shot code. Image: class token after the "
                     "ViT's final norm (mgca/models/backbones/encoder.py:141-143) through global_embed "
                     "(mgca_module.py:90-91); text: as adapter mgca",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``), build the heads (``MgcaAdapter``) and the ViT."""
        super().__init__(checkpoint, **options)
        self.vit_shape: VitShape = self._extra_state["vit_shape"]
        self.image_size = self.vit_shape.image_size
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten at once
            self._vit = build_vit(self.vit_shape, self._encoder_state)

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Map the ViT, the global image head and (with ``text_encoder``) the text side (module docstring).

        Raises:
            CheckpointError: the file is not a dict of tensors, or it is MGCA's ResNet-50 variant.
            ConfigError: ``text_encoder`` is not a local BERT folder with a config.json.
        """
        hparam = image_encoder_hparam(checkpoint)
        if isinstance(hparam, str) and hparam.startswith("resnet"):
            raise CheckpointError(_RESNET_MESSAGE.format(found=f"hyper_parameters.img_encoder == {hparam!r}"))
        report = LoadReport("mgca-vit")
        state, prefix = unwrap_state_dict(checkpoint, report, what="an MGCA checkpoint")
        if any(isinstance(k, str) and k.startswith(_RESNET_KEYS) for k in state):
            raise CheckpointError(_RESNET_MESSAGE.format(found=f"keys {IMAGE_ENCODER_PREFIX}conv1.* / layer1.*"))

        image, rest = split_prefix(state, IMAGE_ENCODER_PREFIX)
        image = {k[len(IMAGE_ENCODER_PREFIX):]: v for k, v in image.items()}
        encoder, shape = match_vit(image, report, source_prefix=prefix + IMAGE_ENCODER_PREFIX)
        rest, extra = map_heads_and_text(rest, options, report, prefix,
                                         image_width=shape.width if shape else VIT_WIDTH,
                                         local_head_reason=IMAGE_LOCAL_HEAD_REASON)
        report.unexpected += [f"{prefix}{k}" for k in rest]
        if shape is not None:
            report.layout = f"mgca-vit-w{shape.width}-d{shape.depth}-p{shape.patch_size}-{shape.image_size}" + \
                report.layout[len("mgca-vit"):]
        extra["vit_shape"] = shape
        return Weights(report, encoder, extra=extra)

    def encoder(self) -> torch.nn.Module:
        """Refused until the ViT feature pyramid exists (``_ENCODER_MESSAGE``).

        Raises:
            CapabilityError: always.
        """
        raise CapabilityError(_ENCODER_MESSAGE.format(name=self.name))

    def describe(self) -> dict[str, Any]:
        """``MgcaAdapter.describe`` plus the ViT's shape as read from the weights."""
        return {**super().describe(), "architecture": asdict(self.vit_shape)}

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """128-d report-space image embeddings, L2-normalised, of preprocessed images ``(B, 3, 224, 224)``.

        As MGCA's ``ImageEncoder`` with ``vit_base`` (encoder.py:135-143, mgca_module.py:86-91): the ViT's class
        token after its final norm, ``global_embed`` (BatchNorm with its running statistics), L2 norm.

        Raises:
            CapabilityError: the checkpoint carries no ``img_encoder_q.global_embed``.
            ConfigError: the images are not ``image_size``² (the positional embedding fixes the size).
        """
        self.require(EMBED_IMAGE)
        cls_token = vit_tokens(self._vit, self.vit_shape, images)[:, 0]
        return nn.functional.normalize(self._image_head.to(cls_token.device)(cls_token), dim=-1)

