"""Random-init state dicts in the published layouts of MedCLIP and CXR-CLIP, built from the authors' modules.

The image encoders are what the authors' code instantiates: torchvision's ResNet-50 (MedCLIP replaces ``fc`` by
``Linear(2048, 512, bias=False)``, RyanWangZf/MedCLIP ``medclip/modeling_medclip.py:51-53``; CXR-CLIP deletes it,
kakaobrain/cxr-clip ``cxrclip/model/modules/image_encoder.py:52-58``) or transformers' ``SwinModel``. The text
encoders are ``BertModel`` with pooler (``AutoModel`` of Bio_ClinicalBERT in both). Key names are those of the
transformers 4.x the authors saved with: ``SwinModel`` keys are renamed back from transformers 5's names
(``SWIN_V5_TO_V4``) and the constant buffers 4.x saved (Swin ``relative_position_index``, BERT
``embeddings.position_ids``) are added.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

# transformers 5 name -> transformers 4.x name of SwinModel weights: the "swin" entry of transformers 5's
# conversion_mapping.py lists each 4.x name with the name it loads into.
SWIN_V5_TO_V4 = (
    ("attention.q_proj.", "attention.self.query."),
    ("attention.k_proj.", "attention.self.key."),
    ("attention.v_proj.", "attention.self.value."),
    ("attention.relative_position_bias.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)


def tiny_swin_config(**overrides: Any) -> Any:
    """A small ``transformers.SwinConfig`` (width 8, two blocks per stage, window 7, 224 px) for fast tests."""
    from transformers import SwinConfig

    fields = {"embed_dim": 8, "depths": [2, 2, 2, 2], "num_heads": [1, 1, 2, 2], "window_size": 7, "image_size": 224}
    return SwinConfig(**{**fields, **overrides})


def hf_swin_model(config: Any) -> nn.Module:
    """``transformers.SwinModel(config)`` (pooler included, as ``AutoModel``/``SwinModel.from_pretrained`` build it)."""
    from transformers import SwinModel

    return SwinModel(config)


def swin_v4_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict under transformers 4.x names, with 4.x's persistent ``relative_position_index``.

    The index is 4.x's ``(window², window²)`` table of relative positions (``modeling_swin.py`` of 4.x).
    """
    state = {}
    for key, value in model.state_dict().items():
        for new, old in SWIN_V5_TO_V4:
            key = key.replace(new, old)
        state[key] = value
    window = model.config.window_size
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    index = relative[..., 0] * (2 * window - 1) + relative[..., 1]
    for key in list(state):
        if key.endswith("attention.self.relative_position_bias_table"):
            state[key.replace("relative_position_bias_table", "relative_position_index")] = index.clone()
    return state


def bert_v4_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A ``BertModel``'s state dict with the ``embeddings.position_ids`` buffer transformers < 4.31 saved."""
    state = dict(model.state_dict())
    positions = model.config.max_position_embeddings
    state.setdefault("embeddings.position_ids", torch.arange(positions).unsqueeze(0))
    return state


def tiny_bert(folder: str) -> nn.Module:
    """``BertModel`` (with pooler) of the config in ``folder`` (e.g. ``write_tiny_bert_folder``), random init."""
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig.from_pretrained(folder, local_files_only=True))


def medclip_resnet() -> nn.Module:
    """MedCLIPVisionModel's network: torchvision ResNet-50 with ``fc = Linear(2048, 512, bias=False)``."""
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Linear(2048, 512, bias=False)
    return model


def cxrclip_resnet() -> nn.Module:
    """CXR-CLIP's ``ResNet50.resnet``: torchvision ResNet-50 with ``fc`` deleted (SyncBatchNorm keeps the names)."""
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    del model.fc
    return model


def medclip_state(vision: nn.Module, bert: nn.Module, *, swin: bool, logit_scale: float = 2.6593) -> dict:
    """``MedCLIPModel.state_dict()`` around ``vision`` (ResNet-50 or SwinModel) and ``bert``.

    ``vision_model.model.*`` (+ ``vision_model.projection_head.weight`` (512, width) for the Swin),
    ``text_model.model.*``, ``text_model.projection_head.weight`` (512, hidden), ``logit_scale``
    (``modeling_medclip.py:26, :95, :144``; init log(1/0.07) = 2.6593).
    """
    state: dict[str, torch.Tensor] = {}
    vision_state = swin_v4_state(vision) if swin else vision.state_dict()
    state.update({f"vision_model.model.{k}": v for k, v in vision_state.items()})
    if swin:
        state["vision_model.projection_head.weight"] = torch.randn(512, vision.num_features) * 0.02
    state.update({f"text_model.model.{k}": v for k, v in bert_v4_state(bert).items()})
    state["text_model.projection_head.weight"] = torch.randn(512, bert.config.hidden_size) * 0.02
    state["logit_scale"] = torch.tensor(logit_scale)
    return state


def cxrclip_checkpoint(vision: nn.Module, bert: nn.Module, *, swin: bool,
                       datasets: tuple[str, ...] = ("mimic_cxr", "chexpert")) -> dict[str, Any]:
    """A CXR-CLIP ``.tar`` payload (``cxrclip/trainer.py:161-170``) around ``vision`` and ``bert``.

    ``model``: ``image_encoder.resnet.*`` or ``image_encoder.image_encoder.*``, ``text_encoder.text_encoder.*``,
    ``image_projection.projection`` and ``text_projection.projection`` (Linear to 512, with bias),
    ``logit_scale``; ``config`` names ``datasets`` (cxr-clip names) in ``data_train``.
    """
    width = vision.num_features if swin else 2048
    model: dict[str, torch.Tensor] = {}
    if swin:
        model.update({f"image_encoder.image_encoder.{k}": v for k, v in swin_v4_state(vision).items()})
    else:
        model.update({f"image_encoder.resnet.{k}": v for k, v in vision.state_dict().items()})
    model.update({f"text_encoder.text_encoder.{k}": v for k, v in bert_v4_state(bert).items()})
    for name, inputs in (("image_projection", width), ("text_projection", bert.config.hidden_size)):
        model[f"{name}.projection.weight"] = torch.randn(512, inputs) * 0.02
        model[f"{name}.projection.bias"] = torch.zeros(512)
    model["logit_scale"] = torch.tensor(2.6593)
    encoder = "resnet" if not swin else "microsoft/swin-tiny-patch4-window7-224"
    config = {"base": {"image_size": 224, "text_max_length": 256},
              "model": {"name": "clip_custom", "image_encoder": {"name": encoder}},
              "data_train": {name: {"name": name} for name in datasets}}
    return {"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "params": [0]}]},
            "scheduler": {"last_epoch": 3}, "config": config, "epoch": 15, "train_loss": 1.25}


def renamed(state: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
    """``state`` with key ``old`` renamed to ``new`` (for the strict-loading tests)."""
    return {(new if k == old else k): v for k, v in state.items()}
