"""Checkpoints of the ViT families (MGCA ``vit_base.ckpt``, BiomedCLIP's open_clip folder), and aligned weights.

The writers build each checkpoint from its authors' module structure and save it in the published container
(:mod:`vlpbench.testing` does the same for the CNN families): MGCA's from the parameter structure of
``mgca/models/backbones/vits.py`` and ``encoder.py``, BiomedCLIP's from open_clip's own ``CustomTextCLIP``
(a timm ViT by name, a Hugging Face BERT from a local folder). Sizes can shrink for tests.

``aligned=True`` overwrites the weights so that the model is a tiny *aligned* image-text model whose zero-shot
answer is known: the image embedding is ``+p`` for an image brighter than the normalisation mean and ``-p``
for a darker one (``p = e0 - e1`` in the embedding space, normalised), and the text embedding of any text is
``+p``, or ``-p`` when it contains the word "no". So "<finding>" wins over "no <finding>" exactly for bright
images. The construction (:func:`align_vit`, :func:`align_bert`, the heads) uses only the key names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, MutableMapping

import torch
from torch import nn

from vlpbench.adapters.base import LightningAttributeDict, save_checkpoint
from vlpbench.adapters.mgca import EMB_DIM
from vlpbench.errors import ConfigError
from vlpbench.testing import MGCA_PROTOTYPES, mgca_state

# How much the text head weighs the "no" direction against the [CLS] direction (module docstring).
_NEGATION_GAIN = 50.0
# The patch embedding multiplies a patch's mean brightness by this, so that each patch token keeps its own
# sign through the residual stream (the class token's uniform attention average is of unit scale).
_PATCH_GAIN = 100.0


# --- MGCA vit_base.ckpt ------------------------------------------------------------------------------------


class MgcaVit(nn.Module):
    """Parameter structure of MGCA's ``VisionTransformer`` (mgca/models/backbones/vits.py:111-164; no forward).

    ``patch_embed.proj`` is timm's ``PatchEmbed`` convolution (:144-145), ``cls_token`` (:149), ``pos_embed``
    (:150-151), ``blocks`` of ``Block`` (:84-98: ``norm1``, ``attn.qkv`` with bias, ``attn.proj``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2``), ``norm`` (:164); LayerNorm eps 1e-6 (:142).
    """

    def __init__(self, width: int = 768, depth: int = 12, patch: int = 16, grid: int = 14) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(nn.init.uniform_(torch.empty(1, 1, width), -0.05, 0.05))
        self.pos_embed = nn.Parameter(nn.init.uniform_(torch.empty(1, grid * grid + 1, width), -0.05, 0.05))
        self.blocks = nn.ModuleList(_mgca_block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)


def _mgca_block(width: int) -> nn.Module:
    """One ``vits.Block``: its parameters under their names (vits.py:84-98, ``Attention`` :36-47, ``Mlp`` :14-24)."""
    block = nn.Module()
    block.norm1 = nn.LayerNorm(width, eps=1e-6)
    block.attn = nn.Module()
    block.attn.qkv = nn.Linear(width, 3 * width)
    block.attn.proj = nn.Linear(width, width)
    block.norm2 = nn.LayerNorm(width, eps=1e-6)
    block.mlp = nn.Module()
    block.mlp.fc1 = nn.Linear(width, 4 * width)
    block.mlp.fc2 = nn.Linear(4 * width, width)
    return block


def mgca_vit_state(seed: int = 0, *, width: int = 768, depth: int = 12, grid: int = 14, text_layers: int = 6,
                   text_hidden: int = 768) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of MGCA with ``img_encoder = "vit_base"`` (mgca_module.py:64-76), random init.

    ``img_encoder_q``: ``MgcaVit`` and the global and local heads over its ``width`` (encoder.py:88-94);
    ``text_encoder_q``, the token-level attention and the prototypes as in ``resnet_50.ckpt``
    (:func:`vlpbench.testing.write_mgca_checkpoint`). The published file has the defaults.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mgca_state(MgcaVit(width, depth, 16, grid), width, width, text_layers, text_hidden)


def write_mgca_vit_checkpoint(path: str | Path, seed: int = 0, *, width: int = 768, depth: int = 12, grid: int = 14,
                              text_layers: int = 6, text_hidden: int = 768, aligned_no_token: int | None = None
                              ) -> Path:
    """Write a random-init MGCA ``vit_base.ckpt`` (Lightning container, ``img_encoder = "vit_base"``).

    ``aligned_no_token``: the vocabulary id of "no"; when given, the weights are made aligned (module
    docstring). The file has the real sizes by default (about 700 MB); tests shrink them.

    Raises:
        ConfigError: ``text_hidden`` is not a positive multiple of 12 (BERT's heads).
    """
    if text_hidden <= 0 or text_hidden % 12:
        raise ConfigError(f"text_hidden must be a positive multiple of 12 (BERT's 12 heads), got {text_hidden}")
    state = mgca_vit_state(seed, width=width, depth=depth, grid=grid, text_layers=text_layers,
                           text_hidden=text_hidden)
    if aligned_no_token is not None:
        align_vit(state, "img_encoder_q.model.")
        align_bert(state, "text_encoder_q.model.", aligned_no_token)
        _set_mgca_head(state, "img_encoder_q.global_embed.head.", {0: {0: 1.0}, 1: {0: -1.0}}, {0: 1.0, 1: -1.0})
        _set_mgca_head(state, "text_encoder_q.global_embed.head.", {0: {2: 1.0}, 1: {0: 1.0}},
                       {0: 1.0, 1: -_NEGATION_GAIN})
    checkpoint = {
        "epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.5.10", "state_dict": state, "callbacks": {},
        "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
        "hyper_parameters": LightningAttributeDict(img_encoder="vit_base", emb_dim=EMB_DIM,
                                                   num_prototypes=MGCA_PROTOTYPES),
    }
    return save_checkpoint(checkpoint, path)


def _set_mgca_head(state: MutableMapping[str, torch.Tensor], prefix: str, first: Mapping[int, Mapping[int, float]],
                   second: Mapping[int, float]) -> None:
    """Make a ``GlobalEmbedding`` compute ``p * sum_h second[h] * relu(sum_i first[h][i] * x_i)`` (BatchNorm at
    identity: zero running mean, unit running variance, unit weight)."""
    _set_linear(state, prefix + "0.", first)
    state[prefix + "0.bias"] = torch.zeros_like(state[prefix + "0.bias"])
    for bn in ("1.", "4."):
        state[prefix + bn + "running_mean"] = torch.zeros_like(state[prefix + bn + "running_mean"])
        state[prefix + bn + "running_var"] = torch.ones_like(state[prefix + bn + "running_var"])
    state[prefix + "1.weight"] = torch.ones_like(state[prefix + "1.weight"])
    state[prefix + "1.bias"] = torch.zeros_like(state[prefix + "1.bias"])
    _set_linear(state, prefix + "3.", _towards_p(second))
    state[prefix + "3.bias"] = torch.zeros_like(state[prefix + "3.bias"])


# --- BiomedCLIP's Hugging Face folder ----------------------------------------------------------------------

# open_clip_config.json of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (the model card's folder);
# the writer points hf_model_name / hf_tokenizer_name at a local BERT folder.
BIOMEDCLIP_CONFIG: Mapping[str, Any] = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}


def biomedclip_model(text_encoder: str | Path, *, timm_model: str = "vit_base_patch16_224",
                     embed_dim: int = 512) -> nn.Module:
    """open_clip's ``CustomTextCLIP`` as BiomedCLIP's config builds it, with the BERT of the local folder
    ``text_encoder`` (config only; random init, nothing downloaded) and the timm ViT ``timm_model``."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    cfg = BIOMEDCLIP_CONFIG["model_cfg"]
    vision = {**cfg["vision_cfg"], "timm_model_name": timm_model}
    text = {**cfg["text_cfg"], "hf_model_name": str(text_encoder), "hf_tokenizer_name": str(text_encoder),
            "hf_model_pretrained": False}
    return CustomTextCLIP(embed_dim, vision_cfg=CLIPVisionCfg(**vision), text_cfg=CLIPTextCfg(**text))


def write_biomedclip_folder(folder: str | Path, text_encoder: str | Path, seed: int = 0, *,
                            timm_model: str = "vit_base_patch16_224", embed_dim: int = 512,
                            aligned_no_token: int | None = None) -> Path:
    """Write BiomedCLIP's Hugging Face folder: ``open_clip_config.json`` and ``open_clip_pytorch_model.bin``.

    The weights are ``biomedclip_model(...).state_dict()`` (an ``OrderedDict``) drawn under ``seed``, plus the
    ``text.transformer.embeddings.position_ids`` buffer (int64, ``1 × max positions``) that the published
    file carries from an older transformers. ``aligned_no_token``: as for :func:`write_mgca_vit_checkpoint`.
    Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = biomedclip_model(text_encoder, timm_model=timm_model, embed_dim=embed_dim)
    state = model.state_dict()
    positions = state["text.transformer.embeddings.position_embeddings.weight"].shape[0]
    state["text.transformer.embeddings.position_ids"] = torch.arange(positions)[None]
    if aligned_no_token is not None:
        align_vit(state, "visual.trunk.")
        _set_linear(state, "visual.head.proj.", _towards_p({0: 1.0}))
        align_bert(state, "text.transformer.", aligned_no_token)
        _set_linear(state, "text.proj.0.", {0: {2: 1.0}, 1: {0: 1.0}})
        _set_linear(state, "text.proj.2.", _towards_p({0: 1.0, 1: -_NEGATION_GAIN}))
        state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    config = json.loads(json.dumps(BIOMEDCLIP_CONFIG))
    config["model_cfg"]["embed_dim"] = embed_dim
    config["model_cfg"]["vision_cfg"]["timm_model_name"] = timm_model
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    return folder


# --- aligned weights ---------------------------------------------------------------------------------------


def align_vit(state: MutableMapping[str, torch.Tensor], prefix: str) -> None:
    """Overwrite the timm-named ViT under ``prefix`` so that channel 0 of its tokens reads brightness.

    Patch embedding: channel 0 is ``_PATCH_GAIN`` × the patch's mean (normalised) value, channel 1 its negative;
    class token and positions zero. Each block attends uniformly (zero queries and keys) with identity values
    and output projection, and its MLP adds nothing, so the class token becomes the mean of the layer-normed
    patch tokens: ``+c(e0 - e1)`` when most patches are brighter than the mean, ``-c(e0 - e1)`` otherwise.
    Patch tokens keep their own sign. All norms are identity-affine.
    """
    conv = state[prefix + "patch_embed.proj.weight"]
    width, channels, patch, _ = conv.shape
    weight = torch.zeros_like(conv)
    weight[0] = _PATCH_GAIN / (channels * patch * patch)
    weight[1] = -weight[0]
    state[prefix + "patch_embed.proj.weight"] = weight
    for key in ("patch_embed.proj.bias", "cls_token", "pos_embed"):
        state[prefix + key] = torch.zeros_like(state[prefix + key])
    eye = torch.eye(width)
    for key in [k for k in state if k.startswith(prefix + "blocks.")]:
        part = key[len(prefix):].split(".", 2)[2]
        value = torch.zeros_like(state[key])
        if part.startswith(("norm1.weight", "norm2.weight")):
            value = torch.ones_like(value)
        elif part == "attn.qkv.weight":
            value[2 * width:] = eye
        elif part == "attn.proj.weight":
            value = eye.clone()
        state[key] = value
    state[prefix + "norm.weight"] = torch.ones(width)
    state[prefix + "norm.bias"] = torch.zeros(width)


def align_bert(state: MutableMapping[str, torch.Tensor], prefix: str, no_token: int) -> None:
    """Overwrite the BERT under ``prefix`` (HF or MGCA's med names) so that its [CLS] output reads "no".

    Word embeddings: ``e0 - e1`` for ``no_token``, ``e2 - e3`` for every other token; positions and token types
    zero. Each layer attends uniformly with identity values and output, and its feed-forward adds nothing, so
    the [CLS] output is along ``e2 - e3`` plus, when the text holds "no", a positive ``e0 - e1`` part.
    Cross-attention blocks (never run) are left as they are. All LayerNorms are identity-affine.
    """
    words = state[prefix + "embeddings.word_embeddings.weight"]
    hidden = words.shape[1]
    table = torch.zeros_like(words)
    table[:, 2], table[:, 3] = 1.0, -1.0
    table[no_token] = 0.0
    table[no_token, 0], table[no_token, 1] = 1.0, -1.0
    state[prefix + "embeddings.word_embeddings.weight"] = table
    eye = torch.eye(hidden)
    for key in [k for k in state if k.startswith(prefix) and ".crossattention." not in k]:
        part = key[len(prefix):]
        if part in ("embeddings.word_embeddings.weight", "embeddings.position_ids"):
            continue
        value = torch.zeros_like(state[key])
        if "LayerNorm.weight" in part:
            value = torch.ones_like(value)
        elif part.endswith(("attention.self.value.weight", "attention.output.dense.weight")):
            value = eye.clone()
        state[key] = value


def _towards_p(weights: Mapping[int, float]) -> dict[int, dict[int, float]]:
    """Rows of a linear map whose output is ``p = e0 - e1`` times ``sum_i weights[i] * x_i``."""
    return {0: dict(weights), 1: {i: -w for i, w in weights.items()}}


def _set_linear(state: MutableMapping[str, torch.Tensor], prefix: str, rows: Mapping[int, Mapping[int, float]]) -> None:
    """Set ``prefix + "weight"`` to zero except ``weight[o, i] = rows[o][i]``."""
    weight = torch.zeros_like(state[prefix + "weight"])
    for out, entries in rows.items():
        for index, value in entries.items():
            weight[out, index] = value
    state[prefix + "weight"] = weight
