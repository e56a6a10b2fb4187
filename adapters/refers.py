"""REFERS (Zhou et al., Nature Machine Intelligence 2022): its ViT-B/16 image encoder on every protocol.

``refers_checkpoint.pth`` is a plain state dict of jeonsworld ViT-pytorch's ``VisionTransformer``, the model
REFERS fine-tunes (funnyzhou/REFERS Fine-tune/NIH_ChestX-ray/models/modeling.py; its ``load_weights`` keeps
the file's keys that the model has, train.py:88-100, and BenchX loads it the same way after unwrapping
``state_dict``/``model`` and dropping ``head.*``, unifier/blocks/custom/refers/transformer.py:311-328):

- ``transformer.embeddings.patch_embeddings.*`` (Conv2d, modeling.py:147-150), ``.position_embeddings``
  (1, 197, 768; :151), ``.cls_token`` (:152);
- per block ``transformer.encoder.layer.N.`` (:171-178): ``attention_norm``, ``ffn_norm`` (LayerNorm eps 1e-6),
  ``ffn.fc1``/``ffn.fc2`` (:103-104), ``attn.query``/``attn.key``/``attn.value``/``attn.out`` (Linear, :60-64);
- ``transformer.encoder.encoder_norm`` (:235).

It is timm's ViT-B/16 under other names (pre-norm blocks, exact GELU :49,105, heads split as contiguous
64-wide slices of each projection :70-74, scaled by 1/sqrt(64) :86): the separate query, key and value
projections are stacked, in that order, into timm's ``attn.qkv`` (timm reshapes its output as (3, heads,
head_dim)). Keys are accounted under REFERS's names; ``head.*`` (a fine-tuned classifier, if present) is
ignored. Input: 224 pixels, ImageNet normalisation (Fine-tune/NIH_ChestX-ray/utils/data_utils.py:23,30).
Pooling: ``cls``, the class token after ``encoder_norm`` (modeling.py:246,274).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from vlpbench.adapters.base import LoadReport, ModelCard, Weights, match_keys, split_prefix, unwrap_state_dict
from vlpbench.adapters.transformer import ViTAdapter, ViTConfig

HEAD_REASON = "classification head of a fine-tuned REFERS model (head.*), not part of the image encoder"
# timm key part -> REFERS key part; block parts are under "blocks.N." / "transformer.encoder.layer.N.".
_RENAMES = (
    ("cls_token", "transformer.embeddings.cls_token"),
    ("pos_embed", "transformer.embeddings.position_embeddings"),
    ("patch_embed.proj.", "transformer.embeddings.patch_embeddings."),
    ("norm.", "transformer.encoder.encoder_norm."),
)
_BLOCK_RENAMES = (
    ("norm1.", "attention_norm."), ("norm2.", "ffn_norm."), ("mlp.fc1.", "ffn.fc1."), ("mlp.fc2.", "ffn.fc2."),
    ("attn.proj.", "attn.out."),
)
_QKV = ("query", "key", "value")


def refers_names(key: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The REFERS key(s) and shape(s) holding timm key ``key`` of ``shape``: three (query, key, value) for
    ``attn.qkv``, each a third of its rows."""
    block = re.match(r"blocks\.(\d+)\.(.*)", key)
    if block is None:
        old, new = next((o, n) for o, n in _RENAMES if key.startswith(o))
        return [(new + key[len(old):], shape)]
    index, part = block.groups()
    head = f"transformer.encoder.layer.{index}."
    if part.startswith("attn.qkv."):
        kind = part.removeprefix("attn.qkv.")
        return [(f"{head}attn.{p}.{kind}", (shape[0] // 3, *shape[1:])) for p in _QKV]
    old, new = next((o, n) for o, n in _BLOCK_RENAMES if part.startswith(o))
    return [(head + new + part[len(old):], shape)]


def _timm_view(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` renamed to timm names where a rename applies (q/k/v left apart): enough to read the shape."""
    back = [(n, o) for o, n in _RENAMES]
    view = {}
    for key, value in state.items():
        if not isinstance(key, str):
            continue
        block = re.match(r"transformer\.encoder\.layer\.(\d+)\.(.*)", key)
        if block is not None:
            index, part = block.groups()
            part = next((o + part[len(n):] for o, n in _BLOCK_RENAMES if part.startswith(n)), part)
            view[f"blocks.{index}.{part}"] = value
        else:
            view[next((o + key[len(n):] for n, o in back if key.startswith(n)), key)] = value
    return view


class RefersAdapter(ViTAdapter):
    """REFERS's ViT-B/16 (module docstring)."""

    name = "refers"
    description = "REFERS ViT-B/16 (jeonsworld ViT-pytorch layout): frozen ViT + Feature2Pyramid, class-token pooling"
    card = ModelCard(
        paper="Zhou et al., Generalized radiograph representation learning via cross-supervision between images "
              "and free-text radiology reports (REFERS), Nature Machine Intelligence 2022",
        repository="github.com/funnyzhou/REFERS (Fine-tune/*/models/modeling.py: jeonsworld ViT-pytorch)",
        checkpoints=("refers_checkpoint.pth — Google Drive link in the repository's README (fine-tuning section)",),
        pretraining_data=("mimic_cxr",),
        notes=("image encoder only: REFERS's report side is not published in the checkpoint, so no zero-shot",),
    )
    default_options = {"pool": "cls"}
    procedures = {"linear": "class token after encoder_norm, as REFERS's classifier reads it "
                            "(funnyzhou/REFERS Fine-tune/NIH_ChestX-ray/models/modeling.py:274)"}
    checkpoint_forms = (
        "refers_checkpoint.pth: jeonsworld ViT-pytorch state dict (transformer.embeddings.*, "
        "transformer.encoder.layer.N.*, transformer.encoder.encoder_norm.*), optionally with head.* (ignored)",
        "either inside {'state_dict': ...} or {'model': ...}, keys optionally prefixed 'module.'",
    )

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Account the REFERS keys under their own names, then rename them to timm's and stack q/k/v into qkv."""
        report = LoadReport("refers")
        state, prefix = unwrap_state_dict(checkpoint, report, containers=("state_dict", "model"),
                                          what="a REFERS checkpoint")
        heads, state = split_prefix(state, "head.")
        report.ignore(HEAD_REASON, [prefix + k for k in heads])
        view = _timm_view(state)
        absent = [k for k in ViTConfig.SHAPE_KEYS if not isinstance(view.get(k), torch.Tensor)]
        if absent:
            report.missing += [prefix + refers_names(k, ())[0][0] for k in absent]
            report.unexpected += [f"{prefix}{k}" for k in state]
            return Weights(report, {})
        config = ViTConfig.from_timm_state(view)
        report.layout = f"refers-{config.name()}{report.layout[len('refers'):]}"
        sources = {key: refers_names(key, shape) for key, shape in config.shapes().items()}
        found = match_keys(state, {name: shape for names in sources.values() for name, shape in names}, report,
                           source_prefix=prefix)
        target = {name: key for key, names in sources.items() for name, _ in names}
        report.mapped = [(name, f"encoder.backbone.{target[name[len(prefix):]]}") for name, _ in report.mapped]
        converted = {}
        for key, names in sources.items():
            if all(name in found for name, _ in names):
                tensors = [found[name] for name, _ in names]
                converted[key] = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        return Weights(report, converted)
