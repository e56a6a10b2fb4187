"""MGCA (NeurIPS 2022): multi-granularity cross-modal alignment, ResNet-50 image encoder.

MGCA publishes PyTorch Lightning ``.ckpt`` files (``resnet_50.ckpt``, ``vit_base.ckpt``): ``state_dict``,
``hyper_parameters`` (a Lightning ``AttributeDict``), ``epoch``, ``global_step``, ``optimizer_states``, ...
Inside ``state_dict`` (``mgca/models/mgca/mgca_module.py``):

- ``img_encoder_q.model.*``: torchvision ResNet-50 with ``fc = Identity`` (318 keys). MGCA's own
  downstream loaders strip the first two dotted parts and load the rest strictly; so does this adapter.
- ``img_encoder_q.global_embed.*`` / ``img_encoder_q.local_embed.*``: image projection heads.
- ``text_encoder_q.*``: the BLIP-style ``med.BertModel`` (6 layers with cross-attention, no pooler) and
  its projection heads.
- ``patch_local_atten_layer.*``, ``word_local_atten_layer.*``: token-level cross-attention.
- ``prototype_layer.*``: the disease prototypes.

Only the image encoder is used by image-only protocols; everything else is listed as ignored with what
it is. The ViT-B/16 variant is refused. ``write_mgca_checkpoint`` writes random-init files in this exact
layout for the demo and the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    Adapter,
    LightningAttributeDict,
    LoadReport,
    Weights,
    match_resnet50_encoder,
    save_checkpoint,
    split_prefix,
    unwrap_state_dict,
)
from vlpbench.errors import CheckpointError, ConfigError

IMAGE_ENCODER_PREFIX = "img_encoder_q.model."
IMAGE_HEADS_REASON = (
    "MGCA's image projection heads (global: MLP 2048→2048→128 on the pooled layer4 feature; local: Conv1d "
    "1024→2048→128 on layer3 patches) into the 128-d image-text space of its contrastive losses; "
    "image-only protocols use the encoder's feature maps instead"
)
TEXT_SIDE_REASON = (
    "MGCA's text side: the BLIP-style 6-layer BERT report encoder (initialised from Bio_ClinicalBERT, with "
    "cross-attention blocks that MGCA never uses) and its global/local projection heads; image-only "
    "protocols take no text"
)
TOKEN_ATTENTION_REASON = (
    "MGCA's token-level cross-attention between image patches and report words (one head, width 128), "
    "used only by its local alignment loss in pre-training; image-only protocols do not use it"
)
PROTOTYPE_REASON = (
    "MGCA's 500 learnable disease prototypes (Linear 128→500, no bias) of its cluster-level alignment loss "
    "in pre-training; image-only protocols do not use them"
)
_IGNORED_PARTS = (
    (("img_encoder_q.global_embed.", "img_encoder_q.local_embed."), IMAGE_HEADS_REASON),
    (("text_encoder_q.",), TEXT_SIDE_REASON),
    (("patch_local_atten_layer.", "word_local_atten_layer."), TOKEN_ATTENTION_REASON),
    (("prototype_layer.",), PROTOTYPE_REASON),
)
# Key prefixes of the ViT-B/16 (DeiT) image encoder under img_encoder_q.model.
_VIT_PARTS = ("patch_embed.", "blocks.", "cls_token", "pos_embed")

_VIT_MESSAGE = (
    "this is MGCA's ViT-B/16 variant (vit_base.ckpt; {found}); only the ResNet-50 variant (resnet_50.ckpt, "
    "hyper_parameters.img_encoder == 'resnet_50') is supported yet"
)


class MgcaAdapter(Adapter):
    """MGCA's ResNet-50 image encoder from its published Lightning checkpoint.

    Input contract (``mgca/datasets/transforms.py``, ``DataTransforms``): 224×224 crops, normalised with
    mean = std = 0.5 per channel. The encoder is convolutional and accepts any size divisible by 32.
    """

    name = "mgca"
    description = "MGCA (NeurIPS 2022) ResNet-50: the published Lightning resnet_50.ckpt; text side ignored"
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    checkpoint_forms = (
        "MGCA resnet_50.ckpt (Lightning checkpoint: state_dict with img_encoder_q.model.*, torchvision "
        "ResNet-50 without fc, 318 keys; heads, text encoder and prototypes ignored)",
        "its state_dict alone, keys optionally prefixed 'module.' or '_orig_mod.'",
    )

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Map ``img_encoder_q.model.*`` onto the encoder; list the rest as ignored (module docstring).

        Raises:
            CheckpointError: the file is not a dict of tensors, or it is MGCA's ViT variant.
        """
        report = LoadReport("mgca-resnet50")
        _refuse_vit(checkpoint)
        state, prefix = unwrap_state_dict(checkpoint, report, what="an MGCA checkpoint")
        if any(isinstance(k, str) and k.startswith(tuple(IMAGE_ENCODER_PREFIX + p for p in _VIT_PARTS))
               for k in state):
            raise CheckpointError(_VIT_MESSAGE.format(found=f"keys {IMAGE_ENCODER_PREFIX}patch_embed.* / blocks.*"))

        for prefixes, reason in _IGNORED_PARTS:
            part, state = split_prefix(state, *prefixes)
            report.ignore(reason, [prefix + k for k in part])
        image, rest = split_prefix(state, IMAGE_ENCODER_PREFIX)
        report.unexpected += [f"{prefix}{k}" for k in rest]
        encoder = match_resnet50_encoder(
            {k[len(IMAGE_ENCODER_PREFIX):]: v for k, v in image.items()}, report,
            source_prefix=prefix + IMAGE_ENCODER_PREFIX,
        )
        return Weights(report, encoder)


def _refuse_vit(checkpoint: Any) -> None:
    """Raise ``CheckpointError`` when the checkpoint's hyper-parameters name the ViT image encoder."""
    if not isinstance(checkpoint, Mapping):
        return
    hparams = checkpoint.get("hyper_parameters")
    # Lightning's AttributeDict loads as a dict, an argparse.Namespace as a SimpleNamespace.
    encoder = hparams.get("img_encoder") if isinstance(hparams, Mapping) else getattr(hparams, "img_encoder", None)
    if encoder == "vit_base":
        raise CheckpointError(_VIT_MESSAGE.format(found="hyper_parameters.img_encoder == 'vit_base'"))


# --- random-init checkpoints in the published layout -------------------------------------------------

# mgca/configs/bert_config.json: Bio_ClinicalBERT vocabulary and positions, 6 layers, cross-attention.
_VOCAB, _POSITIONS, _TEXT_LAYERS, _TEXT_HIDDEN = 28996, 512, 6, 768
# MGCA defaults: emb_dim 128, hidden width 2048 of the projection heads, 500 prototypes.
_EMB, _HEAD_HIDDEN, _PROTOTYPES = 128, 2048, 500


def write_mgca_checkpoint(
    path: str | Path, seed: int = 0, *, text_layers: int = _TEXT_LAYERS, text_hidden: int = _TEXT_HIDDEN
) -> Path:
    """Write a random-init MGCA ``resnet_50.ckpt`` with the published keys and shapes; return its path.

    The image encoder equals ``torchvision.models.resnet50()`` (without ``fc``) built right after
    ``torch.manual_seed(seed)``; heads and text encoder follow from the same seed. The global RNG is restored
    afterwards, so one seed always gives the same tensors.

    The text encoder is BLIP's ``med.BertModel`` as MGCA configures it: embeddings without token types,
    ``position_ids`` buffer, ``text_layers`` layers each with self-attention, cross-attention, FFN (4× width),
    no pooler. The real width is 768 (the file is then about 400 MB); tests may shrink ``text_hidden``
    (and ``text_layers``) to keep files small, which changes only ``text_encoder_q.*`` shapes, and with
    them ``text_encoder_q.{global,local}_embed.head.0``.

    Lightning entries: ``hyper_parameters`` (written as Lightning's ``AttributeDict`` class, readable without
    Lightning), ``epoch``, ``global_step``, ``optimizer_states`` (empty), ``lr_schedulers`` (empty),
    ``pytorch-lightning_version`` "1.5.9".

    Raises:
        ConfigError: ``text_layers`` negative or ``text_hidden`` not a positive multiple of 12 (the heads).
    """
    import torchvision

    if text_layers < 0:
        raise ConfigError(f"text_layers must be >= 0, got {text_layers}")
    if text_hidden <= 0 or text_hidden % 12:
        raise ConfigError(f"text_hidden must be a positive multiple of 12 (BERT's 12 heads), got {text_hidden}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resnet = torchvision.models.resnet50(weights=None)
        resnet.fc = nn.Identity()
        parts: list[tuple[str, nn.Module]] = [
            ("img_encoder_q.model.", resnet),
            ("img_encoder_q.global_embed.head.", _global_embedding(2048)),
            ("img_encoder_q.local_embed.head.", _local_embedding(1024)),
            ("text_encoder_q.model.", _MedBert(text_layers, text_hidden)),
            ("text_encoder_q.global_embed.head.", _global_embedding(text_hidden)),
            ("text_encoder_q.local_embed.head.", _local_embedding(text_hidden)),
            ("patch_local_atten_layer.", nn.MultiheadAttention(_EMB, 1)),
            ("word_local_atten_layer.", nn.MultiheadAttention(_EMB, 1)),
            ("prototype_layer.", nn.Linear(_EMB, _PROTOTYPES, bias=False)),
        ]
        state = {prefix + k: v for prefix, module in parts for k, v in module.state_dict().items()}

    hyper_parameters = LightningAttributeDict(img_encoder="resnet_50", emb_dim=_EMB, num_prototypes=_PROTOTYPES)
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "1.5.9",
        "state_dict": state,
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters,
    }
    return save_checkpoint(checkpoint, path)


def _global_embedding(in_dim: int) -> nn.Sequential:
    """MGCA's ``GlobalEmbedding``: Linear, BN, ReLU, Linear, BN without affine parameters."""
    return nn.Sequential(
        nn.Linear(in_dim, _HEAD_HIDDEN), nn.BatchNorm1d(_HEAD_HIDDEN), nn.ReLU(inplace=True),
        nn.Linear(_HEAD_HIDDEN, _EMB), nn.BatchNorm1d(_EMB, affine=False),
    )


def _local_embedding(in_dim: int) -> nn.Sequential:
    """MGCA's ``LocalEmbedding``: 1×1 Conv1d (no bias), BN, ReLU, Conv1d, BN without affine parameters."""
    return nn.Sequential(
        nn.Conv1d(in_dim, _HEAD_HIDDEN, 1, bias=False), nn.BatchNorm1d(_HEAD_HIDDEN), nn.ReLU(inplace=True),
        nn.Conv1d(_HEAD_HIDDEN, _EMB, 1, bias=False), nn.BatchNorm1d(_EMB, affine=False),
    )


class _MedBert(nn.Module):
    """Only the parameter structure of BLIP's ``med.BertModel`` (no forward): the key names and shapes."""

    def __init__(self, layers: int, hidden: int) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(_VOCAB, hidden)
        self.embeddings.position_embeddings = nn.Embedding(_POSITIONS, hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden)
        self.embeddings.register_buffer("position_ids", torch.arange(_POSITIONS).expand((1, -1)))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_med_layer(hidden) for _ in range(layers))


def _med_layer(hidden: int) -> nn.Module:
    """One ``med.BertLayer`` with cross-attention (``encoder_width`` = the text width, as in MGCA's config)."""

    def attention() -> nn.Module:
        block = nn.Module()
        block.self = nn.Module()
        for projection in ("query", "key", "value"):
            setattr(block.self, projection, nn.Linear(hidden, hidden))
        block.output = nn.Module()
        block.output.dense = nn.Linear(hidden, hidden)
        block.output.LayerNorm = nn.LayerNorm(hidden)
        return block

    layer = nn.Module()
    layer.attention = attention()
    layer.crossattention = attention()
    layer.intermediate = nn.Module()
    layer.intermediate.dense = nn.Linear(hidden, 4 * hidden)
    layer.output = nn.Module()
    layer.output.dense = nn.Linear(4 * hidden, hidden)
    layer.output.LayerNorm = nn.LayerNorm(hidden)
    return layer
