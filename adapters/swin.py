"""Hugging Face ``SwinModel`` weights as an smp Swin encoder, for every protocol (U-Net, YOLO head, linear, finetune).

MedCLIP's ViT variant (``vision_model.model.*``) and CXR-CLIP's Swin-T (``image_encoder.image_encoder.*``) hold
a ``transformers.SwinModel`` (``microsoft/swin-tiny-patch4-window7-224``) saved by transformers 4.x. Its key
names (transformers 4.x ``models/swin/modeling_swin.py``; transformers 5 renamed them and lists the old names
in ``conversion_mapping.py``, entry ``"swin"``) per block ``encoder.layers.<i>.blocks.<j>.``:
``layernorm_before``, ``attention.self.{query,key,value,relative_position_bias_table}``, the constant buffer
``attention.self.relative_position_index``, ``attention.output.dense``, ``layernorm_after``,
``intermediate.dense``, ``output.dense``; per stage but the last ``encoder.layers.<i>.downsample.{reduction,norm}``;
``embeddings.patch_embeddings.projection``, ``embeddings.norm`` and the final ``layernorm``.

They are converted to timm's ``SwinTransformer`` inside smp's ``tu-swin_tiny_patch4_window7_224`` encoder
(``TimmUniversalEncoder``; timm's feature wrapper flattens ``layers.<i>`` to ``layers_<i>``): q, k and v are
concatenated into ``attn.qkv``, and HF's patch merging at the *end* of stage i is timm's ``downsample`` at the
*start* of stage i + 1 (both concatenate the 2×2 neighbours in the same order). The architecture (width,
depths, heads, window, patch, MLP ratio) is read from the weight shapes, so any SwinModel converts; the
protocols' U-Net is built for Swin-T's channels ``(3, 0, 96, 192, 384, 768)`` (smp's stride-2 stage is empty
for a Swin; its U-Net and the detection head, which reads the last three maps, work with it).

Input size: the encoder is built with ``strict_img_size=False`` (timm computes the shifted-window masks per
input) and a forward pre-hook (``InputSizeFit``) that sets each stage's resolution to the input's, windows kept
at the trained 7, as a Swin built for that size would have them (and as HF's ``SwinLayer`` decides per input:
no shift where a stage is no larger than its window). So 224 (pre-training), 256 and 416 inputs run the
model the authors' code would run. Below 224 a stage would be smaller than its window, which HF cannot run and
timm would answer by resizing the trained position-bias tables; there the 224 configuration is kept and inputs
are zero-padded to whole windows, as both libraries do for sizes that are no multiple of the window.

The final ``layernorm`` is not part of the feature maps (smp stops at the last stage); the adapters apply it
for their image embeddings (``final_norm``).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import LoadReport, match_keys, tensor_spec

SWIN_ENCODER_NAME = "tu-swin_tiny_patch4_window7_224"
# The first key of the file's final LayerNorm and of its patch embedding, without the SwinModel prefix.
PATCH_KEY = "embeddings.patch_embeddings.projection.weight"
FINAL_NORM = "layernorm."
POSITION_INDEX_REASON = ("relative_position_index buffers of transformers 4.x Swin attention: the constant "
                         "window-position table, recomputed by the model, not a weight")
_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.")
_TABLE = "encoder.layers.{i}.blocks.0.attention.self.relative_position_bias_table"
_FC1 = "encoder.layers.0.blocks.0.intermediate.dense.weight"
_INDEX_SUFFIX = ".attention.self.relative_position_index"


@dataclass(frozen=True)
class SwinArch:
    """The shape of a Swin Transformer, as read from a SwinModel's weights."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    patch_size: int
    mlp_ratio: float

    @classmethod
    def swin_tiny(cls) -> "SwinArch":
        """``microsoft/swin-tiny-patch4-window7-224``, the image encoder of MedCLIP-ViT and CXR-CLIP Swin-T."""
        return cls(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, patch_size=4,
                   mlp_ratio=4.0)

    @property
    def num_features(self) -> int:
        """Channels of the last stage (and of the final LayerNorm)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def timm_kwargs(self) -> dict[str, Any]:
        """Arguments of ``timm.create_model("swin_tiny_patch4_window7_224", ...)`` that build this shape."""
        return {"embed_dim": self.embed_dim, "depths": self.depths, "num_heads": self.num_heads,
                "window_size": self.window_size, "patch_size": self.patch_size, "mlp_ratio": self.mlp_ratio}

    def describe(self) -> dict[str, Any]:
        """JSON-able fields, for result records."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def read_hf_swin_arch(state: Mapping[str, Any]) -> tuple[SwinArch | None, list[str]]:
    """The architecture of the SwinModel weights ``state`` (SwinModel key names), or None and the keys it lacks.

    Width and patch size come from the patch embedding, depths from the block indices, heads and window from
    each stage's first position-bias table ((2w - 1)² rows × heads), the MLP ratio from the first MLP.
    """
    blocks: dict[int, set[int]] = {}
    for key in state:
        if isinstance(key, str) and (m := _BLOCK.match(key)):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = range(max(blocks) + 1) if blocks else range(0)
    needed = [PATCH_KEY, _FC1, *(_TABLE.format(i=i) for i in stages)]
    absent = [k for k in needed if not isinstance(state.get(k), torch.Tensor)]
    if absent or not blocks:
        return None, absent or [_TABLE.format(i=0)]
    patch = state[PATCH_KEY]
    tables = [state[_TABLE.format(i=i)].shape for i in stages]
    window = (math.isqrt(tables[0][0]) + 1) // 2
    return SwinArch(
        embed_dim=patch.shape[0],
        depths=tuple(len(blocks.get(i, ())) for i in stages),
        num_heads=tuple(int(t[1]) for t in tables),
        window_size=window,
        patch_size=patch.shape[-1],
        mlp_ratio=state[_FC1].shape[0] / patch.shape[0],
    ), []


def hf_swin_shapes(arch: SwinArch) -> dict[str, tuple[int, ...]]:
    """Key → shape of a transformers 4.x ``SwinModel`` of ``arch``, parameters only (module docstring)."""
    shapes: dict[str, tuple[int, ...]] = {
        PATCH_KEY: (arch.embed_dim, 3, arch.patch_size, arch.patch_size),  # RGB: smp builds 3-channel encoders
        "embeddings.patch_embeddings.projection.bias": (arch.embed_dim,),
        "embeddings.norm.weight": (arch.embed_dim,), "embeddings.norm.bias": (arch.embed_dim,),
    }
    for i, (depth, heads) in enumerate(zip(arch.depths, arch.num_heads)):
        dim, hidden = arch.embed_dim * 2 ** i, int(arch.embed_dim * 2 ** i * arch.mlp_ratio)
        for j in range(depth):
            block = f"encoder.layers.{i}.blocks.{j}."
            for name, out, inp in (("attention.self.query", dim, dim), ("attention.self.key", dim, dim),
                                   ("attention.self.value", dim, dim), ("attention.output.dense", dim, dim),
                                   ("intermediate.dense", hidden, dim), ("output.dense", dim, hidden)):
                shapes[f"{block}{name}.weight"], shapes[f"{block}{name}.bias"] = (out, inp), (out,)
            for norm in ("layernorm_before", "layernorm_after"):
                shapes[f"{block}{norm}.weight"] = shapes[f"{block}{norm}.bias"] = (dim,)
            shapes[f"{block}attention.self.relative_position_bias_table"] = ((2 * arch.window_size - 1) ** 2, heads)
        if i < len(arch.depths) - 1:
            shapes[f"encoder.layers.{i}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
            shapes[f"encoder.layers.{i}.downsample.norm.weight"] = (4 * dim,)
            shapes[f"encoder.layers.{i}.downsample.norm.bias"] = (4 * dim,)
    shapes[FINAL_NORM + "weight"] = shapes[FINAL_NORM + "bias"] = (arch.num_features,)
    return shapes


# HF block part -> timm block part, for the parts that differ only in name.
_BLOCK_RENAMES = {
    "layernorm_before.": "norm1.", "layernorm_after.": "norm2.", "attention.output.dense.": "attn.proj.",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "intermediate.dense.": "mlp.fc1.", "output.dense.": "mlp.fc2.",
}
_QKV = re.compile(r"attention\.self\.(query|key|value)\.(weight|bias)$")


def smp_swin_name(key: str) -> str:
    """Where SwinModel key ``key`` goes: an smp ``tu-swin`` encoder key (``model.layers_<i>...``; q, k and v all
    go to ``attn.qkv``), or ``final_norm.<weight|bias>`` for the final LayerNorm.

    Raises:
        KeyError: ``key`` is no SwinModel weight (``hf_swin_shapes`` names).
    """
    if key.startswith(FINAL_NORM):
        return "final_norm." + key[len(FINAL_NORM):]
    if key.startswith("embeddings.patch_embeddings.projection."):
        return "model.patch_embed.proj." + key.rsplit(".", 1)[1]
    if key.startswith("embeddings.norm."):
        return "model.patch_embed.norm." + key.rsplit(".", 1)[1]
    if m := re.match(r"encoder\.layers\.(\d+)\.downsample\.(.*)", key):
        # HF merges patches at the end of stage i, timm at the start of stage i + 1.
        return f"model.layers_{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    if m := re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.*)", key):
        block, part = f"model.layers_{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
        if qkv := _QKV.match(part):
            return f"{block}attn.qkv.{qkv.group(2)}"
        old = next((o for o in _BLOCK_RENAMES if part.startswith(o)), None)
        if old is not None:
            return block + _BLOCK_RENAMES[old] + part[len(old):]
    raise KeyError(f"not a SwinModel weight: {key}")


def hf_to_smp_swin(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Convert accounted SwinModel weights (``hf_swin_shapes`` names) to (smp encoder state, final norm state).

    q, k and v are concatenated in that order into timm's ``attn.qkv``; the final norm is named as a
    ``LayerNorm``'s state (``weight``, ``bias``).
    """
    encoder: dict[str, torch.Tensor] = {}
    norm: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = smp_swin_name(key)
        if target.startswith("final_norm."):
            norm[target[len("final_norm."):]] = value
        elif qkv := _QKV.search(key):
            if qkv.group(1) == "query":
                stem = key[:qkv.start()] + "attention.self."
                encoder[target] = torch.cat([state[f"{stem}{p}.{qkv.group(2)}"] for p in ("query", "key", "value")])
        else:
            encoder[target] = value
    return encoder, norm


def match_hf_swin(part: Mapping[str, Any], report: LoadReport, *, source_prefix: str,
                  target_prefix: str = "encoder.") -> tuple[SwinArch | None, dict[str, torch.Tensor],
                                                             dict[str, torch.Tensor]]:
    """Account ``part`` (SwinModel keys, ``source_prefix`` removed) strictly; convert it for the smp encoder.

    ``relative_position_index`` buffers are ignored with ``POSITION_INDEX_REASON``. When the keys the
    architecture is read from are missing, they are reported missing and everything else unexpected.
    Returns ``(arch or None, smp encoder state, final LayerNorm state)``, both empty unless every key
    matched; mapped pairs name the targets with ``smp_swin_name`` under ``target_prefix``.
    """
    index = [k for k in part if isinstance(k, str) and k.endswith(_INDEX_SUFFIX)]
    report.ignore(POSITION_INDEX_REASON, [source_prefix + k for k in index])
    part = {k: v for k, v in part.items() if k not in index}
    arch, absent = read_hf_swin_arch(part)
    if arch is None:
        report.missing += [source_prefix + k for k in absent]
        report.unexpected += [f"{source_prefix}{k}" for k in part if k not in absent]
        return None, {}, {}
    expected = hf_swin_shapes(arch)
    first = len(report.mapped)
    matched = match_keys(part, expected, report, source_prefix=source_prefix)
    report.mapped[first:] = [(source, target_prefix + smp_swin_name(source[len(source_prefix):]))
                             for source, _ in report.mapped[first:]]
    if len(matched) != len(expected):
        return arch, {}, {}
    encoder, norm = hf_to_smp_swin(matched)
    return arch, encoder, norm


@functools.lru_cache(maxsize=None)
def swin_encoder_shapes(arch: SwinArch, img_size: int = 224) -> Mapping[str, tuple[int, ...]]:
    """Key → shape of the smp Swin encoder of ``arch`` built for ``img_size`` px (on the meta device, no init
    spent). The size matters where a stage is no larger than the window: timm shrinks that stage's window, and
    with it the position-bias table, to the stage."""
    with torch.device("meta"):
        module = _smp_swin(SWIN_ENCODER_NAME, {**arch.timm_kwargs(), "img_size": img_size})
    return {k: tensor_spec(v) for k, v in module.state_dict().items()}


def build_swin_encoder(encoder_name: str, state: Mapping[str, torch.Tensor],
                       timm_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """smp encoder ``encoder_name`` (a ``tu-`` Swin) with ``timm_kwargs``, holding ``state`` (strict), any input size.

    Built for flexible input (``strict_img_size=False``) with the ``InputSizeFit`` pre-hook (module docstring).
    The random init is drawn under a forked RNG (then overwritten), so the caller's RNG stream is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        module = _smp_swin(encoder_name, dict(timm_kwargs or {}))
    module.load_state_dict(dict(state))
    module.register_forward_pre_hook(InputSizeFit(module))
    return module


def is_timm_swin(encoder_name: str) -> bool:
    """True for smp names of timm Swin Transformers (``tu-swin_...``), which ``build_swin_encoder`` builds."""
    return encoder_name.startswith("tu-swin")


def _smp_swin(encoder_name: str, timm_kwargs: Mapping[str, Any]) -> nn.Module:
    """``get_encoder(encoder_name, weights=None, strict_img_size=False, **timm_kwargs)``."""
    from segmentation_models_pytorch.encoders import get_encoder

    return get_encoder(encoder_name, weights=None, strict_img_size=False, **timm_kwargs)


class InputSizeFit:
    """Forward pre-hook of an smp Swin encoder: each stage set to the input's resolution, windows kept.

    For an input of H × W pixels, stage i runs at the patch grid halved i times (timm's
    ``SwinTransformer.set_input_size`` arithmetic), with the window size it was built with; a stage no larger
    than its window is not shifted (timm's and HF's rule). When some stage would be smaller than its window,
    the configuration of the size the encoder was built for is used instead (module docstring).
    """

    def __init__(self, encoder: nn.Module) -> None:
        from timm.models.swin_transformer import SwinTransformerStage

        self.stages = [m for m in encoder.modules() if isinstance(m, SwinTransformerStage)]
        self.windows = [tuple(stage.blocks[0].attn.window_size) for stage in self.stages]
        patch_embed = encoder.model.patch_embed
        self.patch = tuple(patch_embed.patch_size)
        self.built = tuple(patch_embed.img_size)
        self.current = self.built

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        size = tuple(inputs[0].shape[-2:])
        if not self._fits(size):
            size = self.built
        if size != self.current:
            for (stage, window), feat in zip(zip(self.stages, self.windows), self._stage_inputs(size)):
                stage.set_input_size(feat_size=feat, window_size=window)
            self.current = size

    def _stage_inputs(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """The resolution each stage receives (before its own patch merging) for an input of ``size`` pixels."""
        grid = [s // p for s, p in zip(size, self.patch)]
        return [tuple(-(-g // 2 ** max(i - 1, 0)) for g in grid) for i in range(len(self.stages))]

    def _fits(self, size: tuple[int, int]) -> bool:
        """Whether every stage's output is at least its window in both directions at ``size``."""
        for i, (feat, window) in enumerate(zip(self._stage_inputs(size), self.windows)):
            out = feat if i == 0 else tuple(-(-f // 2) for f in feat)
            if any(o < w for o, w in zip(out, window)):
                return False
        return True


def final_norm(arch: SwinArch, state: Mapping[str, torch.Tensor]) -> nn.LayerNorm:
    """The SwinModel's final ``layernorm`` (eps 1e-5, transformers' SwinConfig default) holding ``state``."""
    norm = nn.LayerNorm(arch.num_features, eps=1e-5)
    norm.load_state_dict(dict(state))
    return norm.eval()


def swin_tokens(encoder: nn.Module, norm: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """SwinModel's ``last_hidden_state`` as a grid ``(B, h, w, C)``: the last stage's map, final LayerNorm applied."""
    return norm(encoder(images)[-1].permute(0, 2, 3, 1))
