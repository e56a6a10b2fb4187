"""Ark-6 and Ark+ (Ma et al.): Swin Transformers pre-trained on the expert labels of public chest X-ray datasets.

What the authors publish (jlianglab/Ark @ cba3fad), on request through the Google Form of its README:

- Ark-6, ``ark6_teacher_ep200_swinb_projector1376_mlp.pth.tar``: the teacher's state dict alone; the README
  loads it with ``torch.load`` into timm 0.5.4's ``swin_base_patch4_window7_224`` after deleting ``head.*``
  (``Ark_MICCAI2023/README.md:78-93``).
- Ark+, ``Ark6_swinLarge768_ep50.pth.tar`` (the name ``Ark_Plus/Zeroshot/Ark+zeroshot-pred.ipynb`` loads, cell 2):
  the training checkpoint ``save_checkpoint`` writes, ``{epoch, lossMIN, state_dict, teacher, optimizer,
  scheduler}`` with the student under ``state_dict`` (``Ark_Plus/Pretraining/engine.py:181-188``,
  ``Ark_MICCAI2023/engine.py:175-182``). Ark's code evaluates ``teacher`` (notebook cell 2 ``key = "teacher"``,
  ``Ark_Plus/README.md:67`` ``--key teacher``, ``Ark_Plus/Finetuning/models.py:210-213``); option
  ``weights=student`` reads the student instead. Keys carry ``module.`` where training ran on several GPUs
  (``DataParallel``, ``Ark_Plus/Pretraining/engine.py:77-79``), which Ark's loaders strip
  (``Ark_Plus/Pretraining/models.py:97-98``).

Both are ``ArkSwinTransformer`` state dicts (``Ark_MICCAI2023/models.py:13-46``,
``Ark_Plus/Pretraining/models.py:15-47``): a timm 0.5.4 ``SwinTransformer`` (every requirements file pins
``timm==0.5.4``) with two additions. Accounted strictly:

- the backbone: ``patch_embed.{proj,norm}``; per block ``layers.<i>.blocks.<j>.{norm1, attn.qkv,
  attn.relative_position_bias_table, attn.proj, norm2, mlp.fc1, mlp.fc2}``; timm 0.5.4's patch merging at the
  *end* of stages 0-2, ``layers.<i>.downsample.{reduction,norm}``, which is timm 1.x's ``downsample`` at the
  *start* of stage i + 1 (same neighbour order; timm's own ``checkpoint_filter_fn`` moves it so); the final
  ``norm`` (the LayerNorm before the average pool). Mapped onto smp's timm Swin (``vlpbench.adapters.swin``).
- the constant buffers 0.5.4 saved: ``attn.relative_position_index`` and the shifted blocks' ``attn_mask`` (Ark's
  fine-tuning deletes the masks before loading at another size, ``Finetuning/models.py:218-225``). Both are
  recomputed by the model and ignored; the masks' shapes must agree with the input size read from them.
- ``head.*``: the parent class's 1000-class classifier, which ``ArkSwinTransformer.forward`` never calls
  (``models.py:33-40``): ignored.
- ``projector.*``: ``Linear(C, 1376)`` (Ark+: ``use_mlp=False``, notebook cell 2) or Linear–ReLU–Linear
  (``projector.0``, ``projector.2``: the Ark-6 "_mlp" file), ``models.py:20-25``.
- ``omni_heads.<k>.*``: one classifier per pre-training dataset in ``--data_set`` order, MIMIC, CheXpert,
  ChestX-ray14, RSNA Pneumonia, VinDr-CXR, Shenzhen (14, 14, 14, 3, 6, 1 outputs, notebook cell 2): ignored.

The architecture is read from the shapes (width, patch, depths, heads, window, MLP ratio) and the trained input
size from the shifted-window masks of the first stage that has them ((side / (patch × 2^i × window))² windows):
Swin-B, window 7, 224 px for Ark-6 (``Ark_MICCAI2023/models.py:51``), Swin-L, window 12, 768 px for Ark+
(``Ark_Plus/Pretraining/models.py:89-90``, ``Ark_Plus/README.md:46`` ``--input_size 768``).

Input contract: the trained size, ImageNet mean and std, the image resized without a crop (the teacher's input in
``Ark_Plus/Pretraining/dataloader.py:126-140`` and ``Ark_MICCAI2023/dataloader.py:130-146``; notebook cell 3).

Pooled feature (option ``pool``):

- ``projector`` (default): Ark's embedding, ``generate_embeddings(x, after_proj=True)`` (``models.py:42-46``):
  final LayerNorm, average over the tokens, projector; 1376 wide. Ark's linear probing reads it
  (``Ark_Plus/Linearprobing/main_linearprobing.py:37``, ``emb_dim`` 1376).
- ``norm``: timm 0.5.4's ``forward_features``, the final LayerNorm and average pool (1024 or 1536 wide): where Ark's
  fine-tuning puts its classifier (``Ark_Plus/Finetuning/models.py:145-159`` build a plain ``SwinTransformer``;
  the projector and task heads are not loaded).

The dense tasks read the four stage maps (strides 4 to 32), without the final norm, as ``vlpbench.adapters.swin``
gives them. No text side: no zero-shot, grounding or retrieval.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    WRAPPER_REASON,
    Adapter,
    LoadReport,
    ModelCard,
    Weights,
    match_keys,
    unwrap_state_dict,
)
from vlpbench.adapters.parts import match_head, strip
from vlpbench.adapters.swin import SWIN_ENCODER_NAME, SwinArch, build_swin_encoder, swin_encoder_shapes
from vlpbench.errors import ConfigError

PATCH, FC1 = "patch_embed.proj.weight", "layers.0.blocks.0.mlp.fc1.weight"
TABLE = "layers.{i}.blocks.0.attn.relative_position_bias_table"
MASK = "layers.{i}.blocks.{j}.attn_mask"
_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")
_MASK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.attn_mask$")
_INDEX_SUFFIX = ".attn.relative_position_index"
FINAL_NORM, PROJECTOR, HEADS, HEAD = "norm.", "projector.", "omni_heads.", "head."
# Which entry of Ark's training checkpoint holds which weights (engine.py:181-188), by option ``weights``.
CONTAINER_KEYS = {"teacher": "teacher", "student": "state_dict"}
POOLS = {
    "projector": "projector: final LayerNorm, token average, projector (Ark generate_embeddings, after_proj=True)",
    "norm": "norm: final LayerNorm and token average (timm 0.5.4 SwinTransformer.forward_features)",
}
# smp encoder names whose U-Net decoder fits Ark's widths (the timm models Ark builds: Swin-B and Swin-L/12); the
# encoder itself is built from the weights' own shape either way (``swin.build_swin_encoder``).
SMP_NAMES = {128: "tu-swin_base_patch4_window7_224", 192: "tu-swin_large_patch4_window12_384"}
FALLBACK_SIZE = 224  # accounts the keys of a file whose trained size cannot be read (reported missing)

INDEX_REASON = ("relative_position_index buffers of timm 0.5.4's Swin attention: the constant window-position "
                "table, recomputed by the model, not a weight")
MASK_REASON = ("attn_mask buffers of timm 0.5.4's shifted-window blocks: constants of the trained input size "
               "(shapes checked), recomputed by the model for each input, not weights")
HEAD_REASON = ("head: timm SwinTransformer's 1000-class classifier, which ArkSwinTransformer.forward never calls "
               "(jlianglab/Ark Ark_MICCAI2023/models.py:33-40)")
HEADS_REASON = ("omni_heads: Ark's per-dataset pre-training classifiers (MIMIC, CheXpert, ChestX-ray14, RSNA, "
                "VinDr-CXR, Shenzhen label sets); image-only adapter, no protocol reads them")
PROJECTOR_REASON = "projector: not used with option pool=norm (the Swin's own pooled feature)"
OTHER_WEIGHTS_REASON = {
    "teacher": "the student's weights beside the teacher; Ark evaluates the teacher (option weights=student reads it)",
    "student": "the teacher's weights beside the student (option weights=student)",
}


class ArkEncoder(nn.Module):
    """smp's timm Swin holding Ark's backbone, with Ark's final LayerNorm and, for ``pool=projector``, its projector.

    ``forward(x)`` returns smp's six maps (the input, an empty stride-2 map, the four stages; ``out_channels``);
    ``forward(x, output="pooled")`` Ark's pooled feature (module docstring), ``pooled_channels`` wide.
    """

    def __init__(self, swin: nn.Module, norm: nn.LayerNorm, projector: nn.Module | None):
        super().__init__()
        self.swin, self.norm, self.projector = swin, norm, projector
        self.out_channels = tuple(swin.out_channels)
        self.pooled_channels = norm.normalized_shape[0] if projector is None else projector_width(projector)

    @property
    def output_stride(self) -> int:
        """The deepest map's stride (smp's U-Net checks inputs against it)."""
        return self.swin.output_stride

    def forward(self, x: torch.Tensor, output: str = "maps") -> list[torch.Tensor] | torch.Tensor:
        maps = self.swin(x)
        if output == "maps":
            return maps
        if output != "pooled":
            raise ConfigError(f"ArkEncoder output {output!r}: expected 'maps' or 'pooled'")
        pooled = self.norm(maps[-1].permute(0, 2, 3, 1)).mean(dim=(1, 2))
        return pooled if self.projector is None else self.projector(pooled)


def projector_width(projector: nn.Module) -> int:
    """The output width of a projector built by :func:`build_projector`."""
    last = projector[-1] if isinstance(projector, nn.Sequential) else projector
    return last.out_features


def build_projector(form: str, in_features: int, out_features: int) -> nn.Module:
    """Ark's projector (``models.py:22-25``): ``linear`` is one ``Linear``, ``mlp`` Linear–ReLU–Linear."""
    if form == "linear":
        return nn.Linear(in_features, out_features)
    return nn.Sequential(nn.Linear(in_features, out_features), nn.ReLU(inplace=True),
                         nn.Linear(out_features, out_features))


def read_arch(state: Mapping[str, Any]) -> tuple[SwinArch | None, list[str]]:
    """The Swin shape of timm 0.5.4 keys ``state``, or None and the keys it lacks (as ``swin.read_hf_swin_arch``)."""
    blocks: dict[int, set[int]] = {}
    for key in state:
        if isinstance(key, str) and (m := _BLOCK.match(key)):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = range(max(blocks) + 1) if blocks else range(0)
    needed = [PATCH, FC1, *(TABLE.format(i=i) for i in stages)]
    absent = [k for k in needed if not isinstance(state.get(k), torch.Tensor)]
    if absent or not blocks:
        return None, absent or [TABLE.format(i=0)]
    patch = state[PATCH]
    tables = [state[TABLE.format(i=i)].shape for i in stages]
    return SwinArch(embed_dim=patch.shape[0], depths=tuple(len(blocks.get(i, ())) for i in stages),
                    num_heads=tuple(int(t[-1]) for t in tables), window_size=(math.isqrt(tables[0][0]) + 1) // 2,
                    patch_size=patch.shape[-1], mlp_ratio=state[FC1].shape[0] / patch.shape[0]), []


def mask_shapes(arch: SwinArch, size: int) -> dict[str, tuple[int, int, int]]:
    """The ``attn_mask`` buffers timm 0.5.4 saves for ``arch`` at ``size`` px: every odd block of each stage larger
    than its window, ``(windows, window², window²)``."""
    shapes = {}
    for i, depth in enumerate(arch.depths):
        side = size // (arch.patch_size * 2 ** i)
        if side <= arch.window_size:  # timm 0.5.4 neither shifts nor masks such a stage
            continue
        area = arch.window_size ** 2
        for j in range(1, depth, 2):
            shapes[MASK.format(i=i, j=j)] = (math.ceil(side / arch.window_size) ** 2, area, area)
    return shapes


def trained_size(state: Mapping[str, Any], arch: SwinArch) -> int | None:
    """The input side the masks were computed for: from the first stage with a 3-d ``attn_mask``, else None."""
    for i in range(len(arch.depths)):
        mask = state.get(MASK.format(i=i, j=1))
        if isinstance(mask, torch.Tensor) and mask.ndim == 3:
            return math.isqrt(mask.shape[0]) * arch.window_size * arch.patch_size * 2 ** i
    return None


def smp_name(key: str) -> str:
    """The smp encoder key of timm 0.5.4 backbone key ``key`` (patch merging moved to the next stage)."""
    if m := re.match(r"layers\.(\d+)\.downsample\.(.*)", key):
        return f"model.layers_{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    if m := re.match(r"layers\.(\d+)\.(.*)", key):
        return f"model.layers_{m.group(1)}.{m.group(2)}"
    return "model." + key


def ark_key(smp_key: str) -> str:
    """The timm 0.5.4 key of smp encoder key ``smp_key`` (the inverse of :func:`smp_name`)."""
    key = smp_key.removeprefix("model.")
    if m := re.match(r"layers_(\d+)\.downsample\.(.*)", key):
        return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
    return re.sub(r"^layers_(\d+)\.", r"layers.\1.", key)


class ArkAdapter(Adapter):
    """Ark-6 / Ark+ Swin backbones from the published files (module docstring)."""

    name = "ark"
    description = ("Ark-6 (Swin-B, 224 px) and Ark+ (Swin-L, 768 px) from the published .pth.tar: teacher "
                   "weights; projector embedding for the linear probe; Swin stage maps for dense tasks; image only")
    card = ModelCard(
        paper="Ma, Pang, Gotway, Liang: Foundation Ark: Accruing and Reusing Knowledge for Superior and Robust "
              "Performance, MICCAI 2023 (Ark-6); A fully open AI foundation model applied to chest radiography, "
              "Nature 2025 (Ark+)",
        repository="github.com/jlianglab/Ark (Ark_MICCAI2023/models.py, Ark_Plus/Pretraining/models.py, "
                   "Ark_Plus/Zeroshot/Ark+zeroshot-pred.ipynb)",
        checkpoints=("ark6_teacher_ep200_swinb_projector1376_mlp.pth.tar (Ark-6, Swin-B, 224 px) and "
                     "Ark6_swinLarge768_ep50.pth.tar (Ark+, Swin-L, 768 px): download links on request through "
                     "the Google Form (or wjx.cn) in the repository's README",),
        pretraining_data=("mimic_cxr", "chexpert", "cxr14", "rsna", "vindr"),
        notes=("also pre-trained on the Shenzhen tuberculosis set, which is no vlpbench dataset; Ark+'s continual "
               "training adds COVIDx (Ark_Plus/README.md:50-54)",
               "input size read from each file's shifted-window masks: 224 (Ark-6) or 768 (Ark+); ImageNet mean/std",
               "linear probe on the 1376-d projector embedding, as Ark's own linear probing (pool=norm: the Swin's "
               "pooled feature, where Ark's fine-tuning puts its classifier)",
               "image only: no text encoder, so no zero-shot, grounding or retrieval"),
    )
    capabilities = frozenset({"features"})
    default_options = {"weights": "teacher", "pool": "projector"}
    checkpoint_forms = (
        "ark6_teacher_ep200_swinb_projector1376_mlp.pth.tar: the teacher's state dict alone (timm 0.5.4 "
        "SwinTransformer keys with relative_position_index and attn_mask buffers; head.*, projector.{0,2}.*, "
        "omni_heads.N.*)",
        "Ark6_swinLarge768_ep50.pth.tar: Ark's training checkpoint {epoch, lossMIN, state_dict (student), teacher, "
        "optimizer, scheduler}; 'teacher' is read (option weights=student: 'state_dict'); projector.*",
        "either with keys prefixed 'module.' (DataParallel)",
    )
    capability_hints = dict.fromkeys(("embed_image", "embed_text"), "Ark has no text encoder and no shared "
                                     "embedding space: linear, dense and fine-tuning protocols only")
    procedures = {"linear": "option pool (default projector): Ark's generate_embeddings(x, after_proj=True), final "
                            "LayerNorm, token average, projector (jlianglab/Ark Ark_Plus/Pretraining/models.py:43-47), "
                            "the 1376-d embedding Ark's linear probing reads (Linearprobing/main_linearprobing.py:37); "
                            "pool=norm stops before the projector"}

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``); the input size is the one the file was trained at.

        Raises:
            ConfigError: also an unknown ``weights`` or ``pool`` value, or ``pool=projector`` on a file without one.
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        self.arch, self.image_size = extra["arch"], extra["image_size"]
        self.encoder_name = SMP_NAMES.get(self.arch.embed_dim, SWIN_ENCODER_NAME)
        self.pool_description = POOLS[self.options["pool"]]

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Account the container, backbone, buffers, projector and heads (module docstring).

        Raises:
            CheckpointError: the file holds no dict of tensors.
            ConfigError: an unknown ``weights`` or ``pool``, or ``pool=projector`` on a file without a projector.
        """
        for option, allowed in (("weights", CONTAINER_KEYS), ("pool", POOLS)):
            if options[option] not in allowed:
                raise ConfigError(f"adapter 'ark': option {option}={options[option]!r}; expected one of "
                                  f"{', '.join(allowed)}")
        report = LoadReport("ark")
        state, prefix = _unpack(checkpoint, options["weights"], report)
        index = [k for k in state if isinstance(k, str) and k.endswith(_INDEX_SUFFIX)]
        masks = [k for k in state if isinstance(k, str) and _MASK.match(k)]
        heads = [k for k in state if isinstance(k, str) and k.startswith(HEADS)]
        head = [k for k in state if k in (HEAD + "weight", HEAD + "bias")]
        projector = strip(state, PROJECTOR)
        report.ignore(INDEX_REASON, [prefix + k for k in index])
        report.ignore(HEAD_REASON, [prefix + k for k in head])
        report.ignore(HEADS_REASON, [prefix + k for k in heads])
        backbone = {k: v for k, v in state.items()
                    if k not in {*index, *masks, *heads, *head} and not str(k).startswith(PROJECTOR)}

        arch, absent = read_arch(backbone)
        if arch is None:
            report.missing += [prefix + k for k in absent]
            report.unexpected += [f"{prefix}{k}" for k in [*backbone, *masks, *map(PROJECTOR.__add__, projector)]
                                  if k not in absent]
            return Weights(report, {}, extra={"arch": None, "image_size": None})
        size = trained_size(state, arch)
        _account_masks(state, masks, arch, size, report, prefix)
        size = size or FALLBACK_SIZE

        smp_shapes = swin_encoder_shapes(arch, size)
        expected = {ark_key(k): spec for k, spec in smp_shapes.items()}
        expected.update({FINAL_NORM + "weight": (arch.num_features,), FINAL_NORM + "bias": (arch.num_features,)})
        first = len(report.mapped)
        found = match_keys(backbone, expected, report, source_prefix=prefix)
        report.mapped[first:] = [(source, _target(source[len(prefix):])) for source, _ in report.mapped[first:]]
        encoder = {smp_name(k): v for k, v in found.items() if not k.startswith(FINAL_NORM)}
        norm = strip(found, FINAL_NORM)

        extra: dict[str, Any] = {"arch": arch, "image_size": size, "final_norm": norm, "projector": None}
        if options["pool"] == "norm":
            report.ignore(PROJECTOR_REASON, [prefix + PROJECTOR + k for k in projector])
        else:
            extra["projector"] = _match_projector(projector, arch, report, prefix)
        report.layout += f" (swin {arch.embed_dim}-wide, window {arch.window_size}, {size} px, {options['weights']})"
        return Weights(report, encoder, extra=extra)

    def encoder(self) -> ArkEncoder:
        """A new :class:`ArkEncoder`: smp's timm Swin built for the trained size, the final norm, the projector."""
        extra = self._extra_state
        kwargs = {**self.arch.timm_kwargs(), "img_size": self.image_size}
        swin = build_swin_encoder(self.encoder_name, self._encoder_state, kwargs)
        norm = nn.LayerNorm(self.arch.num_features)  # timm 0.5.4 SwinTransformer's norm_layer: eps 1e-5
        norm.load_state_dict(extra["final_norm"])
        projector = None
        if extra["projector"] is not None:
            form, state = extra["projector"]
            with torch.random.fork_rng(devices=[]):  # the init drawn here is overwritten at once
                projector = build_projector(form, self.arch.num_features, state[_last_weight(form)].shape[0])
            projector.load_state_dict(state)
        return ArkEncoder(swin, norm, projector)

    def describe(self) -> dict[str, Any]:
        """``Adapter.describe`` plus the Swin shape, the trained input size, the projector and the pooling."""
        projector = self._extra_state["projector"]
        return {**super().describe(), "swin": self.arch.describe(), "input_size": self.image_size,
                "projector": projector[0] if projector is not None else None, "pool": self.pool_description}


def _unpack(checkpoint: Any, weights: str, report: LoadReport) -> tuple[dict[str, Any], str]:
    """The chosen model's state dict (``weights``: teacher or student) and its stripped prefix.

    A dict holding ``teacher`` or ``state_dict`` dicts is Ark's training checkpoint: the chosen entry is read, the
    other model's weights and the training state are ignored with their reasons. Anything else is the state dict
    itself (the Ark-6 file: the teacher alone); ``weights=student`` then reports ``state_dict`` missing.
    """
    key = CONTAINER_KEYS[weights]
    if isinstance(checkpoint, Mapping) and any(isinstance(checkpoint.get(k), Mapping) for k in CONTAINER_KEYS.values()):
        if not isinstance(checkpoint.get(key), Mapping):
            report.missing.append(key)
            return {}, ""
        other = next(k for k in CONTAINER_KEYS.values() if k != key)
        report.ignore(OTHER_WEIGHTS_REASON[weights], [other] if other in checkpoint else [])
        report.ignore(WRAPPER_REASON, [str(k) for k in checkpoint if k not in (key, other)])
        report.layout += f" (unwrapped {key!r})"
        checkpoint = checkpoint[key]
    elif weights == "student":
        report.missing.append(key)
    return unwrap_state_dict(checkpoint, report, containers=(), what="an Ark checkpoint")


def _account_masks(state: Mapping[str, Any], masks: list[str], arch: SwinArch, size: int | None,
                   report: LoadReport, prefix: str) -> None:
    """Check the ``attn_mask`` buffers against those of ``size`` (ignored when right; a file without them is
    missing the first, from which the size is read)."""
    if size is None:
        report.missing.append(prefix + MASK.format(i=0, j=1))
        report.unexpected += [prefix + k for k in masks]
        return
    expected = mask_shapes(arch, size)
    ok = []
    for key in masks:
        value = state[key]
        if key not in expected:
            report.unexpected.append(prefix + key)
        elif tuple(value.shape) != expected[key]:
            report.mismatched.append((prefix + key, expected[key], tuple(value.shape)))
        else:
            ok.append(prefix + key)
    report.ignore(MASK_REASON, ok)
    report.missing += [prefix + k for k in expected if k not in masks]


def _match_projector(projector: Mapping[str, Any], arch: SwinArch, report: LoadReport,
                     prefix: str) -> tuple[str, dict[str, torch.Tensor]] | None:
    """Account ``projector.*`` as Ark's linear or MLP projector (told apart by the keys); ``(form, state)``."""
    form = "mlp" if "0.weight" in projector else "linear"
    weight = projector.get(_last_weight(form))
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        if not projector:
            raise ConfigError("adapter 'ark': option pool=projector, but the file has no projector.* keys (an Ark "
                              "model trained without --projector_features); pass --model-option pool=norm")
        report.missing.append(prefix + PROJECTOR + _last_weight(form))
        report.unexpected += [prefix + PROJECTOR + k for k in projector if k != _last_weight(form)]
        return None
    width = weight.shape[0]
    found = match_head({PROJECTOR + k: v for k, v in projector.items()}, PROJECTOR,
                       lambda: build_projector(form, arch.num_features, width), report, source_prefix=prefix)
    return form, found


def _last_weight(form: str) -> str:
    """The projector's output weight: its width is the embedding's."""
    return "2.weight" if form == "mlp" else "weight"


def _target(key: str) -> str:
    """Where a mapped backbone key goes, for the report: the encoder, or the final norm."""
    return key if key.startswith(FINAL_NORM) else "encoder." + smp_name(key)
