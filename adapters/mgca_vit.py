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

Input contract: 224² (the ViT forward, encoder.py:135-136, does not resize, unlike the ResNet's 299²
upsampling), mean = std = 0.5 (``mgca/datasets/transforms.py``:8-21). The shape is read from the weights, so
a smaller ViT in the same names also loads (tests use one).

Dense and linear protocols: ``encoder()`` is the ViT behind a Feature2Pyramid neck (``transformer.ViTEncoder``,
from ``ViTAdapter``); option ``pool`` picks the linear probe's feature, by default the class token after the
final norm, the feature MGCA's own image embedding starts from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    EMBED_IMAGE,
    EMBED_TEXT,
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
from vlpbench.adapters.timm_vit import frozen_backbone, vit_tokens
from vlpbench.adapters.transformer import ViTAdapter, match_vit
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


class MgcaVitAdapter(MgcaAdapter, ViTAdapter):
    """MGCA's ViT-B/16 image encoder and global embeddings from the published Lightning ``vit_base.ckpt``.

    Everything but the image encoder is MGCA's ResNet adapter's: the text side with ``text_encoder=DIR``, its
    ``embed_text`` and the CheXzero-style ``zero_shot_scores`` over the 128-d report space. ``encoder()``,
    option ``pool`` and the record's ``vit``, ``pyramid`` and ``pool`` entries are ``ViTAdapter``'s.
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
    capabilities = frozenset({"features", EMBED_IMAGE, EMBED_TEXT})
    default_options = {"text_encoder": "", "pool": "cls"}
    checkpoint_forms = (
        "MGCA vit_base.ckpt (Lightning checkpoint: state_dict with img_encoder_q.model.*, the DeiT/BLIP ViT-B/16, "
        "150 keys; img_encoder_q.global_embed for embed_image; text_encoder_q.model.* and text_encoder_q."
        "global_embed with --model-option text_encoder=DIR; local heads and prototypes ignored)",
        "its state_dict alone, keys optionally prefixed 'module.' or '_orig_mod.'",
    )
    capability_hints = {
        **MgcaAdapter.capability_hints,
        EMBED_IMAGE: "needs MGCA's full vit_base.ckpt, whose img_encoder_q.global_embed holds the image head",
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
        self.image_size = self.vit_config.image_size
        self._vit = frozen_backbone(self.vit_config, self._encoder_state)

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
        report = LoadReport("mgca")
        state, prefix = unwrap_state_dict(checkpoint, report, what="an MGCA checkpoint")
        if any(isinstance(k, str) and k.startswith(_RESNET_KEYS) for k in state):
            raise CheckpointError(_RESNET_MESSAGE.format(found=f"keys {IMAGE_ENCODER_PREFIX}conv1.* / layer1.*"))

        image, rest = split_prefix(state, IMAGE_ENCODER_PREFIX)
        image = {k[len(IMAGE_ENCODER_PREFIX):]: v for k, v in image.items()}
        encoder = match_vit(image, report, source_prefix=prefix + IMAGE_ENCODER_PREFIX)  # layout: mgca-vit-b16
        width = encoder["cls_token"].shape[-1] if "cls_token" in encoder else VIT_WIDTH
        rest, extra = map_heads_and_text(rest, options, report, prefix, image_width=width,
                                         local_head_reason=IMAGE_LOCAL_HEAD_REASON)
        report.unexpected += [f"{prefix}{k}" for k in rest]
        return Weights(report, encoder, extra=extra)

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """128-d report-space image embeddings, L2-normalised, of preprocessed images ``(B, 3, 224, 224)``.

        As MGCA's ``ImageEncoder`` with ``vit_base`` (encoder.py:135-143, mgca_module.py:86-91): the ViT's class
        token after its final norm, ``global_embed`` (BatchNorm with its running statistics), L2 norm.

        Raises:
            CapabilityError: the checkpoint carries no ``img_encoder_q.global_embed``.
            ConfigError: the images are not ``image_size``².
        """
        self.require(EMBED_IMAGE)
        cls_token = vit_tokens(self._vit, self.vit_config, images)[:, 0]
        return nn.functional.normalize(self._image_head.to(cls_token.device)(cls_token), dim=-1)

