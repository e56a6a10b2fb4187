"""Plain ViT backbones on every protocol: a timm ``VisionTransformer`` behind a Feature2Pyramid neck.

A plain ViT has one token map (stride = patch size). The dense protocols want the multi-scale maps of an
smp encoder (``forward(x)`` → x, strides 2, 4, 8, 16, 32; ``out_channels``), and the classification
protocols a pooled vector. :class:`ViTEncoder` gives both, the way BenchX and MRM put a ViT under a
dense head:

- taps: the token maps after blocks ``out_indices`` (default ``(3, 5, 7, 11)``), the class token
  dropped, reshaped to ``(B, C, H/p, W/p)``; the last tap after the final LayerNorm (BenchX
  preprocess/mmsegmentation/configs/_base_/models/upernet_my_vit.py:22,28 ``out_indices=(3, 5, 7, 11)``,
  ``final_norm=True``; MRM Siim_Segmentation/configs/_base_/models/upernet_mrm.py:14);
- neck: :class:`Feature2Pyramid` rescales the taps by ``(4, 2, 1, 0.5)`` for 16-pixel patches (strides
  4, 8, 16, 32; upernet_my_vit.py:33, upernet_mrm.py:21; mmseg ``mmseg/models/necks/featurepyramid.py:30-46``:
  deconv-BN-GELU-deconv, deconv, identity, max-pool). For 32-pixel patches (CLIP ViT-B/32) the same
  construction with ``(8, 4, 2, 1)`` gives the same strides, 8 being one more deconv-BN-GELU stage;
- ``forward(x)`` returns ``[x, <0-channel stride-2 map>, *pyramid]`` with ``out_channels =
  (3, 0, C, C, C, C)``: the smp U-Net decoder and the YOLOv3 head are built for it as for a ResNet
  (smp's U-Net concatenates an empty skip at stride 2, as for its own transformer encoders).

Why U-Net / YOLOv3 over the neck, not BenchX's UperNet: every backbone of a vlpbench table then gets
the same head family, the one MGCA and G2D define the tasks with, so a row differs from the ResNet rows
by the backbone (and the neck it needs), not by the decoder. Records name it (``head``, e.g.
``"unet over feature2pyramid(3,5,7,11)"``; :func:`vlpbench.protocols.runtime.head_name`).

What trains: the transformer stays frozen (BenchX freezes every backbone parameter of its ViT
segmentation configs, ``frozen_exclude=[]``, benchmark/siim/upernet_vit.py:24); the neck is new and
trains with the head. The protocols find the neck through the ``neck`` attribute (the convention of
:mod:`vlpbench.protocols.runtime`: ``freeze_backbone``, ``eval_backbone``); detection caches the frozen
taps (``taps``) and runs the neck in the trained part (``neck.level``). Fine-tuning trains the whole ViT.

Pooled features (linear probe, fine-tuning): ``pool="cls"`` is the class token after the final
LayerNorm (timm ``global_pool='token'``; jeonsworld ViT-pytorch models/modeling.py:274); ``pool="mean"``
is timm's ``global_pool='avg'`` as MAE-style fine-tuning builds it: the mean of the patch tokens of the
last block, then a new LayerNorm ``fc_norm`` (weight 1, bias 0; MRM NIH_ChestX-ray/models_vit.py:27-32,46-48,
its checkpoint has no ``fc_norm``, train.py:124 asserts it missing). Each adapter defaults to its paper's.

Input size: any multiple of the patch size; the position embedding is resampled to the grid on every
forward (timm ``dynamic_img_size``: ``resample_abs_pos_embed``, bicubic), so the checkpoint's own
embedding is what trains under fine-tuning.

:class:`ViTAdapter` is the base of the ViT adapters (``mrm``, ``refers``; ``clip`` builds a
:class:`ViTEncoder` from its visual tower): its ``map_weights`` puts the checkpoint's ViT under timm key
names (:func:`match_vit` accounts them against :meth:`ViTConfig.shapes` of the shape the weights show);
``encoder()`` returns a new :class:`ViTEncoder` holding them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from vlpbench.adapters.base import Adapter, LoadReport, match_keys, tensor_spec
from vlpbench.errors import ConfigError

POOLS = {
    "cls": "class token after the final LayerNorm",
    "mean": "mean of the last block's patch tokens, then a new LayerNorm (timm global_pool='avg' fc_norm)",
}
DEFAULT_OUT_INDICES = (3, 5, 7, 11)
LEVEL_STRIDES = (4, 8, 16, 32)


def default_out_indices(depth: int) -> tuple[int, ...]:
    """BenchX's taps (3, 5, 7, 11) of a 12-block ViT, at the same relative depths of a ``depth``-block one
    (repeated where it has fewer than four blocks)."""
    return tuple(max(0, round((i + 1) * depth / 12) - 1) for i in DEFAULT_OUT_INDICES)


def default_rescales(patch_size: int) -> tuple[float, ...]:
    """The factors that bring ``patch_size``-strided taps to strides 4, 8, 16, 32: (4, 2, 1, 0.5) for 16-pixel
    patches (BenchX), (8, 4, 2, 1) for 32.

    Raises:
        ConfigError: a patch size that is not a power of two.
    """
    if patch_size < 1 or patch_size & (patch_size - 1):
        raise ConfigError(f"no pyramid for {patch_size}-pixel patches: the rescales need a power of two")
    return tuple(patch_size / stride for stride in LEVEL_STRIDES)


@dataclass(frozen=True)
class ViTConfig:
    """The shape of a plain ViT, as timm's ``VisionTransformer`` builds it.

    Attributes:
        patch_size, embed_dim, depth, num_heads, mlp_ratio: the architecture.
        image_size: the pre-training side; the position embedding has ``(image_size / patch_size)² + 1`` rows.
        norm_eps: LayerNorm epsilon (1e-6 for MAE/DeiT/jeonsworld ViTs, 1e-5 for CLIP).
        pre_norm: CLIP's LayerNorm after the embeddings (``norm_pre``; the patch projection has no bias then).
        act: ``"gelu"`` or ``"quick_gelu"`` (OpenAI CLIP).
    """

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    image_size: int = 224
    norm_eps: float = 1e-6
    pre_norm: bool = False
    act: str = "gelu"

    # The timm keys the shape is read from (:meth:`from_timm_state`).
    SHAPE_KEYS: ClassVar[tuple[str, ...]] = ("cls_token", "pos_embed", "patch_embed.proj.weight",
                                             "blocks.0.mlp.fc1.weight")

    @classmethod
    def from_timm_state(cls, state: Mapping[str, Any], **fixed: Any) -> "ViTConfig":
        """The shape of the timm-named ViT weights ``state`` (which must hold :attr:`SHAPE_KEYS` as tensors):
        width, depth (blocks counted), patch, image side (from the position embedding's rows) and MLP ratio;
        heads are 64 wide, as in every ViT size (Ti/S/B/L: 3/6/12/16). ``fixed``: the fields weights do not
        show (``norm_eps``, ``pre_norm``, ``act``)."""
        width = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        grid = round((state["pos_embed"].shape[-2] - 1) ** 0.5)
        depth = len({k.split(".")[1] for k in state if isinstance(k, str) and k.startswith("blocks.")})
        return cls(patch_size=patch, embed_dim=width, depth=depth, num_heads=max(1, width // 64),
                   mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width, image_size=grid * patch, **fixed)

    def name(self) -> str:
        """``"vit-b16"`` for ViT-B/16 at 224, else a shape summary such as ``"vit-w64-d12-p16-64"``."""
        if (self.embed_dim, self.depth, self.patch_size, self.image_size) == (768, 12, 16, 224):
            return "vit-b16"
        return f"vit-w{self.embed_dim}-d{self.depth}-p{self.patch_size}-{self.image_size}"

    @property
    def grid(self) -> int:
        """Patches per side at ``image_size``."""
        return self.image_size // self.patch_size

    def build(self) -> nn.Module:
        """A new timm ``VisionTransformer`` of this shape (no classifier head, dynamic image size)."""
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=self.image_size, patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
            num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=True, num_classes=0, global_pool="token",
            pre_norm=self.pre_norm, norm_layer=functools.partial(nn.LayerNorm, eps=self.norm_eps),
            act_layer=self.act, dynamic_img_size=True)

    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        """The timm state-dict keys and shapes of :meth:`build` (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
        ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``; ``norm_pre.*`` with pre-norm)."""
        return _shapes(self)


@functools.lru_cache(maxsize=None)
def _shapes(config: ViTConfig) -> Mapping[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = config.build()
    return {k: tensor_spec(v) for k, v in model.state_dict().items()}


class Feature2Pyramid(nn.Module):
    """mmseg's Feature2Pyramid neck (``mmseg/models/necks/featurepyramid.py:30-46``): one tap per level,
    each rescaled by transposed convolutions (x2 each; BatchNorm and GELU between two of them), kept,
    or max-pooled. Factors beyond mmseg's 4 (8, for 32-pixel patches) chain one more deconv-BN-GELU stage."""

    def __init__(self, embed_dim: int, rescales: Sequence[float]):
        super().__init__()
        self.rescales = tuple(rescales)
        self.levels = nn.ModuleList(_rescale(embed_dim, r) for r in self.rescales)

    def level(self, index: int, tap: torch.Tensor) -> torch.Tensor:
        """Level ``index`` of the pyramid from its tap."""
        return self.levels[index](tap)

    def forward(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.level(i, tap) for i, tap in enumerate(taps)]


def _rescale(embed_dim: int, factor: float) -> nn.Module:
    """The module that rescales a tap by ``factor``, a power of two (up: deconvolutions; down: max-pooling)."""
    if factor <= 0 or math.log2(factor) != round(math.log2(factor)):
        raise ConfigError(f"Feature2Pyramid rescale {factor}: expected a power of two")
    if factor < 1:
        return nn.MaxPool2d(kernel_size=round(1 / factor), stride=round(1 / factor))
    if factor == 1:
        return nn.Identity()
    layers: list[nn.Module] = []
    for _ in range(int(factor).bit_length() - 2):  # every x2 stage but the last is followed by BN and GELU
        layers += [nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2), nn.BatchNorm2d(embed_dim),
                   nn.GELU()]
    layers.append(nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class ViTEncoder(nn.Module):
    """A frozen-able timm ViT with a Feature2Pyramid neck, used by the protocols like an smp encoder.

    Attributes:
        backbone: the timm ``VisionTransformer`` (state-dict keys as :meth:`ViTConfig.shapes`).
        neck: the :class:`Feature2Pyramid` (new; it trains with a dense head).
        fc_norm: the LayerNorm of ``pool="mean"`` (absent for ``"cls"``).
        out_channels: ``(3, 0, C, C, C, C)``; ``forward`` returns maps at strides 1, 2, 4, 8, 16, 32.
        output_stride: 32. first_level: the index in ``forward``'s list of the neck's level 0 (2).
        pool: ``"cls"`` or ``"mean"`` (:data:`POOLS`); pooled_channels: C.
        pyramid: ``"feature2pyramid(3,5,7,11)"``, what records name the neck by.

    Args:
        config: the ViT's shape.
        state: the backbone's weights under timm key names (loaded strictly; the backbone is then built
            without random init); None for a randomly initialised backbone.
        pool: see :data:`POOLS`.
        out_indices: the blocks tapped, shallow to deep (default: :func:`default_out_indices`); the last block
            gets the final norm.
        rescales: the neck's factors, one per tap (default: :func:`default_rescales`).
    """

    output_stride = 32
    first_level = 2

    def __init__(self, config: ViTConfig, state: Mapping[str, torch.Tensor] | None = None, *, pool: str = "cls",
                 out_indices: Sequence[int] | None = None, rescales: Sequence[float] | None = None):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"pool={pool!r}: expected one of {', '.join(POOLS)}")
        out_indices = default_out_indices(config.depth) if out_indices is None else tuple(out_indices)
        rescales = default_rescales(config.patch_size) if rescales is None else tuple(rescales)
        if len(rescales) != len(out_indices) or list(out_indices) != sorted(out_indices) \
                or not 0 <= out_indices[0] <= out_indices[-1] < config.depth:
            raise ConfigError(f"out_indices {tuple(out_indices)} must be non-decreasing blocks of the {config.depth} "
                              f"and one per rescale {tuple(rescales)}")
        self.config = config
        self.pool = pool
        self.out_indices = tuple(out_indices)
        if state is None:
            self.backbone = config.build()
        else:  # built without init, then every tensor comes from the checkpoint
            with torch.device("meta"):
                self.backbone = config.build()
            self.backbone.to_empty(device="cpu")
            self.backbone.load_state_dict(dict(state))
        self.neck = Feature2Pyramid(config.embed_dim, rescales)
        if pool == "mean":
            self.fc_norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.out_channels = (3, 0) + (config.embed_dim,) * len(rescales)
        self.pooled_channels = config.embed_dim
        self.pyramid = f"feature2pyramid({','.join(map(str, self.out_indices))})"

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens after the patch and position embeddings (and CLIP's pre-norm), and the patch grid."""
        p = self.config.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ConfigError(f"a ViT with {p}-pixel patches takes image sides divisible by {p}, got "
                              f"{tuple(x.shape[-2:])}")
        tokens = self.backbone.patch_embed(x)  # (B, h, w, C) under dynamic_img_size
        grid = tuple(tokens.shape[1:3])
        tokens = self.backbone._pos_embed(tokens)  # resamples the embedding to the grid (timm)
        return self.backbone.norm_pre(self.backbone.patch_drop(tokens)), grid

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's token maps ``(B, C, h, w)`` after blocks ``out_indices``, the last after the final norm."""
        tokens, (h, w) = self._embed(x)
        prefix = self.backbone.num_prefix_tokens
        kept = {}
        for i, block in enumerate(self.backbone.blocks[:self.out_indices[-1] + 1]):
            tokens = block(tokens)
            if i == len(self.backbone.blocks) - 1:
                tokens = self.backbone.norm(tokens)
            if i in self.out_indices:
                kept[i] = tokens[:, prefix:].transpose(1, 2).reshape(len(tokens), -1, h, w)
        return [kept[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor, output: str = "maps") -> list[torch.Tensor] | torch.Tensor:
        """``output="maps"``: ``[x, empty stride-2 map, *neck(taps(x))]`` (``out_channels``); ``"taps"``:
        :meth:`taps`; ``"pooled"``: :meth:`pooled`. Protocols reach the frozen part through ``forward`` so
        that ``prepare_model``'s precision wrapper covers it."""
        return pyramid_output(self, x, output)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The ``pool`` feature ``(B, C)`` of the whole transformer (the neck is not used)."""
        tokens, _ = self._embed(x)
        tokens = self.backbone.blocks(tokens)
        if self.pool == "cls":
            return self.backbone.norm(tokens)[:, 0]
        return self.fc_norm(tokens[:, self.backbone.num_prefix_tokens:].mean(dim=1))


class ViTAdapter(Adapter):
    """Base class of adapters whose checkpoint is a plain ViT (module docstring).

    Subclasses set ``default_options = {"pool": <the paper's pooling>}`` and, in ``map_weights``, return the
    backbone's weights under timm names (``Weights.encoder``; :func:`match_vit`). The architecture is read
    from those weights (:meth:`ViTConfig.from_timm_state`, ``vit_fixed`` for what weights do not show).
    """

    vit_fixed: ClassVar[Mapping[str, Any]] = {}
    encoder_name = "vit+feature2pyramid"
    default_options: ClassVar[Mapping[str, Any]] = {"pool": "cls"}

    @classmethod
    def _resolve_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``Adapter._resolve_options``, checking ``pool`` against :data:`POOLS`."""
        resolved = super()._resolve_options(options)
        if resolved["pool"] not in POOLS:
            raise ConfigError(f"adapter {cls.name!r}: option pool={resolved['pool']!r} is not one of "
                              f"{', '.join(POOLS)}")
        return resolved

    def __init__(self, checkpoint=None, **options: Any) -> None:
        """``Adapter.__init__``, then the ViT's shape from the loaded weights (``vit_config``)."""
        super().__init__(checkpoint, **options)
        self.vit_config = ViTConfig.from_timm_state(self._encoder_state, **self.vit_fixed)

    @property
    def pool_description(self) -> str:
        """What the linear probe's feature is (goes into the feature-cache key and the record)."""
        return f"{self.options['pool']}: {POOLS[self.options['pool']]}"

    def encoder(self) -> ViTEncoder:
        """A new :class:`ViTEncoder` holding this checkpoint's ViT (neck and ``fc_norm`` new)."""
        return ViTEncoder(self.vit_config, self._encoder_state, pool=self.options["pool"])

    def describe(self) -> dict[str, Any]:
        """``Adapter.describe`` plus the ViT's shape, the pyramid and the pooling."""
        return {**super().describe(), "vit": asdict(self.vit_config),
                "pyramid": f"feature2pyramid({','.join(map(str, default_out_indices(self.vit_config.depth)))})",
                "pool": self.pool_description}


def match_vit(found: Mapping[str, Any], report: LoadReport, *, source_prefix: str = "",
              **fixed: Any) -> dict[str, torch.Tensor]:
    """Account ``found`` (keys already under timm names) against the ViT its weights describe
    (:meth:`ViTConfig.from_timm_state`, ``fixed`` fields as given); module keys are recorded as
    ``encoder.backbone.<key>``. Returns the backbone state dict ({} when a key the shape is read from is
    absent: those are then missing and every other key unexpected). Appends the shape name to the layout."""
    absent = [k for k in ViTConfig.SHAPE_KEYS if not isinstance(found.get(k), torch.Tensor)]
    if absent:
        report.missing += [source_prefix + k for k in absent]
        report.unexpected += [f"{source_prefix}{k}" for k in found if k not in ViTConfig.SHAPE_KEYS]
        return {}
    config = ViTConfig.from_timm_state(found, **fixed)
    head, _, notes = report.layout.partition(" ")
    report.layout = f"{head}-{config.name()}" + (f" {notes}" if notes else "")
    return match_keys(found, config.shapes(), report, source_prefix=source_prefix, target_prefix="encoder.backbone.")



def pyramid_output(encoder: nn.Module, x: torch.Tensor, output: str) -> list[torch.Tensor] | torch.Tensor:
    """What a ViT pyramid encoder's ``forward(x, output)`` returns: ``"maps"``, ``[x, an empty stride-2 map,
    *neck(taps(x))]`` (smp's encoder contract); ``"taps"``, its ``taps(x)``; ``"pooled"``, its ``pooled(x)``."""
    if output == "taps":
        return encoder.taps(x)
    if output == "pooled":
        return encoder.pooled(x)
    if output != "maps":
        raise ValueError(f"output={output!r}: expected maps, taps or pooled")
    empty = x.new_zeros(len(x), 0, x.shape[-2] // 2, x.shape[-1] // 2)
    return [x, empty, *encoder.neck(encoder.taps(x))]
