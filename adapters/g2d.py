"""G2D (NeurIPS 2024): ResNet-50 U-Net pre-trained with global alignment and pseudo-segmentation.

G2D's pre-training code (``cheliu-computation/G2D-NeurIPS24``, ``PRETRAIN/utils/trainer.py``) writes three
files, and this adapter loads each of them, telling them apart by their keys, never by the file name:

- ``*_encoder.pth``, layout ``"encoder"``: ``img_model.encoder.state_dict()``, a bare smp ResNet-50
  encoder (torchvision names without ``fc``, 318 keys).
- ``*_encoder_decoder.pth``, layout ``"encoder_decoder"``: ``img_model.state_dict()``, a full
  ``smp.Unet('resnet50', in_channels=3, classes=1)`` (380 keys: ``encoder.*``, ``decoder.*``,
  ``segmentation_head.*``). The decoder is exposed by ``decoder_state_dict()``.
- ``*_checkpoint.pth``, layout ``"pretrain"``: ``{"epoch", "model_state_dict", "optimizer_state_dict"}``
  where the model holds ``img_model.*`` (the U-Net), ``lm_model.*`` (Bio_ClinicalBERT), the projection
  heads ``proj_v.*``/``proj_t.*``, ``attnpool.*`` and ``pseudo_conv.*``. The U-Net is mapped; the text
  side, the heads and the training state are listed as ignored.

``write_g2d_checkpoint`` writes random-init files in these exact layouts for the demo and the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    Adapter,
    LoadReport,
    Weights,
    match_keys,
    match_resnet50_encoder,
    save_checkpoint,
    split_prefix,
    unet_decoder_shapes,
)
from vlpbench.errors import CheckpointError, ConfigError

LAYOUTS = ("encoder", "encoder_decoder", "pretrain")

TEXT_SIDE_PREFIXES = ("lm_model.", "proj_v.", "proj_t.", "attnpool.", "pseudo_conv.")
TEXT_SIDE_REASON = "text side and projection heads: used by zero-shot tasks, not by image-only protocols"
TRAINING_STATE_REASON = "training state (epoch counter, optimizer): resumes pre-training, not used for evaluation"
_TRAINING_STATE_KEYS = ("epoch", "optimizer_state_dict")
_UNET_PARTS = ("encoder.", "decoder.", "segmentation_head.")


class G2DAdapter(Adapter):
    """G2D's ResNet-50 image encoder, plus its U-Net decoder when the checkpoint carries one.

    Input contract (``PRETRAIN/utils/dataset.py``, config ``img_size: 256``): 256×256 RGB after
    ``CenterCrop(256)``, ImageNet mean/std. The 256 matters only for the attention-pool (zero-shot) path;
    the convolutional encoder accepts any size divisible by 32.
    """

    name = "g2d"
    description = "G2D (NeurIPS 2024) ResNet-50 U-Net: *_encoder.pth, *_encoder_decoder.pth or full checkpoint"
    capabilities = frozenset({"features", "decoder"})
    image_size = 256
    checkpoint_forms = (
        "G2D *_encoder.pth (smp ResNet-50 encoder, 318 keys)",
        "G2D *_encoder_decoder.pth (smp Unet('resnet50', classes=1), 380 keys; decoder exposed)",
        "G2D *_checkpoint.pth (pre-training checkpoint: model_state_dict with img_model.*, text side ignored)",
    )

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Detect the G2D layout from the keys and map the image U-Net (see the module docstring)."""
        layout = detect_layout(checkpoint)
        report = LoadReport(layout)
        if layout == "encoder":
            return Weights(report, match_resnet50_encoder(checkpoint, report))
        if layout == "encoder_decoder":
            encoder, decoder = _map_unet(checkpoint, report, prefix="")
            return Weights(report, encoder, decoder)

        model_state = checkpoint["model_state_dict"]
        report.ignore(TRAINING_STATE_REASON, [k for k in checkpoint if k in _TRAINING_STATE_KEYS])
        report.unexpected += [str(k) for k in checkpoint if k not in (*_TRAINING_STATE_KEYS, "model_state_dict")]
        text_side, image_side = split_prefix(model_state, *TEXT_SIDE_PREFIXES)
        report.ignore(TEXT_SIDE_REASON, list(text_side))
        encoder, decoder = _map_unet(image_side, report, prefix="img_model.")
        return Weights(report, encoder, decoder)


def detect_layout(checkpoint: Any) -> str:
    """Name the G2D layout of a loaded checkpoint: ``"encoder"``, ``"encoder_decoder"`` or ``"pretrain"``.

    Anything that is not one of the first two is accounted as ``"encoder"``, so that its keys are reported
    against the simplest layout.

    Raises:
        CheckpointError: the object is not a dict of keys (e.g. a bare tensor or a list).
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"a G2D checkpoint is a dict of tensors; this file holds a {type(checkpoint).__name__}")
    if "model_state_dict" in checkpoint:
        if not isinstance(checkpoint["model_state_dict"], Mapping):
            raise CheckpointError("'model_state_dict' of this G2D checkpoint is not a dict of tensors")
        return "pretrain"
    if any(isinstance(k, str) and k.startswith(_UNET_PARTS) for k in checkpoint):
        return "encoder_decoder"
    return "encoder"


def _map_unet(
    state: Mapping[str, Any], report: LoadReport, *, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map a U-Net state dict whose keys start with ``prefix``; other keys are unexpected."""
    encoder_part, rest = split_prefix(state, prefix + "encoder.")
    decoder_part, rest = split_prefix(rest, prefix + "decoder.", prefix + "segmentation_head.")
    report.unexpected += [str(k) for k in rest]
    encoder = match_resnet50_encoder(
        {k[len(prefix + "encoder."):]: v for k, v in encoder_part.items()}, report, source_prefix=prefix + "encoder."
    )
    decoder = match_keys(
        {k[len(prefix):]: v for k, v in decoder_part.items()}, unet_decoder_shapes(), report, source_prefix=prefix
    )
    return encoder, decoder


# --- random-init checkpoints in the published layouts -------------------------------------------------

# Bio_ClinicalBERT (a BERT-base): vocabulary, width, positions, token types, FFN width, layers.
_BERT_VOCAB, _BERT_HIDDEN, _BERT_POSITIONS, _BERT_TYPES, _BERT_FFN, _BERT_LAYERS = 28996, 768, 512, 2, 3072, 12
# G2D config.yaml: projection width 128, 4 attention-pool heads, 256-pixel images (8×8 at stride 32).
_PROJ, _POOL_HEADS, _POOL_POSITIONS = 128, 4, (256 // 32) ** 2 + 1


def write_g2d_checkpoint(
    path: str | Path, layout: str = "encoder", seed: int = 0, *, text_layers: int = _BERT_LAYERS
) -> Path:
    """Write a random-init G2D checkpoint in one of the published key layouts; return its path.

    The image U-Net is ``smp.Unet('resnet50', in_channels=3, classes=1)`` with smp's default init under
    ``torch.manual_seed(seed)`` (the global RNG is restored afterwards), so one seed gives the same image
    weights in every layout and the same file content on every call.

    For ``layout="pretrain"`` the file is the full training checkpoint: ``epoch``, ``model_state_dict``
    in G2D's module order (``img_model``, ``attnpool``, ``lm_model``, ``proj_v``, ``proj_t``,
    ``pseudo_conv``) with the real key names and shapes, and ``optimizer_state_dict`` of G2D's AdamW as
    saved before its first step (empty ``state``). ``lm_model.*`` follows transformers' ``BertModel`` with
    pooler (no persistent ``position_ids`` buffer, as in transformers ≥ 4.31). With the real 12 text layers
    the file is about 570 MB; ``text_layers`` (0-12) keeps only the first layers for small test files.

    Raises:
        ConfigError: unknown ``layout`` or ``text_layers`` outside 0-12.
    """
    import segmentation_models_pytorch as smp

    if layout not in LAYOUTS:
        raise ConfigError(f"unknown G2D layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not 0 <= text_layers <= _BERT_LAYERS:
        raise ConfigError(f"text_layers must be between 0 and {_BERT_LAYERS}, got {text_layers}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = smp.Unet("resnet50", encoder_weights=None, in_channels=3, classes=1)
        if layout == "encoder":
            obj: dict[str, Any] = unet.encoder.state_dict()
        elif layout == "encoder_decoder":
            obj = unet.state_dict()
        else:
            obj = _pretrain_checkpoint(unet, text_layers)

    return save_checkpoint(obj, path)


def _pretrain_checkpoint(unet: nn.Module, text_layers: int) -> dict[str, Any]:
    """G2D's ``save_checkpoints`` dict around ``unet``, with random text side and heads (uses the global RNG)."""
    attnpool = nn.Module()
    attnpool.positional_embedding = nn.Parameter(torch.randn(_POOL_POSITIONS, _PROJ) / _PROJ**0.5)
    attnpool.mhsa = nn.MultiheadAttention(_PROJ, _POOL_HEADS)
    attnpool.c_proj = nn.Linear(_PROJ, _PROJ)
    # BatchNorm without affine parameters: only running statistics are saved.
    proj_v = nn.Sequential(
        nn.Conv2d(2048, _PROJ, 1, bias=False), nn.BatchNorm2d(_PROJ, affine=False), nn.ReLU(),
        nn.Conv2d(_PROJ, _PROJ, 1, bias=False),
    )
    proj_t = nn.Sequential(
        nn.Conv1d(_BERT_HIDDEN, _PROJ, 1, bias=False), nn.BatchNorm1d(_PROJ, affine=False), nn.ReLU(),
        nn.Conv1d(_PROJ, _PROJ, 1, bias=False),
    )
    pseudo_conv = nn.Conv2d(1024, _PROJ, 1)
    bert = _bert_state(text_layers)

    model_state: dict[str, torch.Tensor] = {}
    n_params = 0
    parts: list[tuple[str, nn.Module | dict[str, torch.Tensor]]] = [
        ("img_model.", unet), ("attnpool.", attnpool), ("lm_model.", bert),
        ("proj_v.", proj_v), ("proj_t.", proj_t), ("pseudo_conv.", pseudo_conv),
    ]
    for prefix, part in parts:
        if isinstance(part, nn.Module):
            model_state.update({prefix + k: v for k, v in part.state_dict().items()})
            n_params += len(list(part.parameters()))
        else:
            model_state.update({prefix + k: v for k, v in part.items()})
            n_params += len(part)  # every BERT tensor is a parameter

    # G2D's optimizer: AdamW(model.parameters(), lr=2e-5, weight_decay=1e-8, betas=(0.9, 0.999)), with a
    # CosineAnnealingWarmRestarts scheduler that adds "initial_lr" to the group.
    placeholders = [nn.Parameter(torch.empty(0)) for _ in range(n_params)]
    optimizer_state = torch.optim.AdamW(placeholders, lr=2e-5, weight_decay=1e-8, betas=(0.9, 0.999)).state_dict()
    optimizer_state["param_groups"][0]["initial_lr"] = 2e-5
    return {"epoch": 0, "model_state_dict": model_state, "optimizer_state_dict": optimizer_state}


def _bert_state(layers: int) -> dict[str, torch.Tensor]:
    """A BERT-base state dict (transformers ``BertModel`` key names) with BERT's init: N(0, 0.02) weights."""

    def linear(out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        return {"weight": torch.randn(out_features, in_features) * 0.02, "bias": torch.zeros(out_features)}

    def layer_norm() -> dict[str, torch.Tensor]:
        return {"weight": torch.ones(_BERT_HIDDEN), "bias": torch.zeros(_BERT_HIDDEN)}

    def named(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v for k, v in tensors.items()}

    state = {
        "embeddings.word_embeddings.weight": torch.randn(_BERT_VOCAB, _BERT_HIDDEN) * 0.02,
        "embeddings.position_embeddings.weight": torch.randn(_BERT_POSITIONS, _BERT_HIDDEN) * 0.02,
        "embeddings.token_type_embeddings.weight": torch.randn(_BERT_TYPES, _BERT_HIDDEN) * 0.02,
        **named("embeddings.LayerNorm", layer_norm()),
    }
    for i in range(layers):
        block = f"encoder.layer.{i}"
        for projection in ("query", "key", "value"):
            state.update(named(f"{block}.attention.self.{projection}", linear(_BERT_HIDDEN, _BERT_HIDDEN)))
        state.update(named(f"{block}.attention.output.dense", linear(_BERT_HIDDEN, _BERT_HIDDEN)))
        state.update(named(f"{block}.attention.output.LayerNorm", layer_norm()))
        state.update(named(f"{block}.intermediate.dense", linear(_BERT_FFN, _BERT_HIDDEN)))
        state.update(named(f"{block}.output.dense", linear(_BERT_HIDDEN, _BERT_FFN)))
        state.update(named(f"{block}.output.LayerNorm", layer_norm()))
    state.update(named("pooler.dense", linear(_BERT_HIDDEN, _BERT_HIDDEN)))
    return state
