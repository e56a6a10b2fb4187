"""CLIP models fine-tuned on chest X-rays (CheXzero and the like): image and text embeddings, zero-shot scores.

Checkpoint forms, told apart by their keys, never by the file name:

- OpenAI-format state dicts, as CheXzero publishes them (``best_64_5e-05_original_22000_0.864.pt``: the
  ``state_dict()`` of OpenAI's ``CLIP`` class, ViT-B/32): ``visual.conv1.weight``, ``visual.class_embedding``,
  ``visual.positional_embedding``, ``visual.transformer.resblocks.N.*``, ``visual.ln_pre/ln_post.*``,
  ``visual.proj``, ``transformer.resblocks.N.*``, ``token_embedding.weight``, ``positional_embedding``,
  ``ln_final.*``, ``text_projection``, ``logit_scale``. Possibly wrapped (``{"state_dict": ...}``) or
  ``module.``/``_orig_mod.``-prefixed; the scalars ``input_resolution``, ``context_length`` and ``vocab_size``
  of OpenAI's TorchScript archives are ignored when present.
- open_clip trainer checkpoints: ``{"epoch", "name", "state_dict": {"module.<same keys>"}, "optimizer", ...}``.
  For ViT models open_clip uses the OpenAI key names, so both forms share one mapping.
- Hugging Face ``CLIPModel`` directories (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``),
  passed as the checkpoint path. The config is read by ``transformers.CLIPConfig`` with
  ``local_files_only=True``; the weights file is read like any checkpoint (safetensors, or the weights-only
  unpickler) and its sha256 recorded. The HF keys are accounted strictly under their own names, then
  converted to OpenAI's (q/k/v projections concatenated into ``in_proj``, projection matrices transposed),
  so every form runs the same model. The activation is the config's ``hidden_act``: ``quick_gelu`` (OpenAI's
  models) or ``gelu`` (open_clip's LAION-trained models, and the CheXagent encoders initialised from them,
  e.g. ``StanfordAIMI/XrayCLIP__vit-b-16__laion2b-s34b-b88k``), the same in both towers. Otherwise only configs
  that OpenAI's architecture expresses are accepted (64-wide heads, 4x MLP, LayerNorm eps 1e-5); sharded
  weights are refused.

ResNet-based CLIP checkpoints (``visual.layer1.*``, ``visual.attnpool.*``) are refused.

The architecture is read from the weights the way open_clip's ``build_model_from_openai_state_dict`` reads it
(widths, layer counts, patch and image size, context length, vocabulary, embedding width; 64-wide attention
heads; QuickGELU, which OpenAI's models were trained with), and an open_clip ``CLIP`` of that shape is built
with no pretrained weights and loaded strictly. The text side uses open_clip's ``SimpleTokenizer`` (OpenAI's
BPE; its vocabulary ships inside the package, so nothing is downloaded).

Dense and classification protocols: ``encoder()`` is the visual tower as a
:class:`~vlpbench.adapters.transformer.ViTEncoder` (timm names, as timm's own ``_convert_openai_clip``
renames them: conv1 → patch_embed.proj, ln_pre → norm_pre, resblocks → blocks, in_proj → qkv, out_proj →
proj, c_fc/c_proj → mlp.fc1/fc2, ln_post → norm; pre-norm, LayerNorm eps 1e-5, the checkpoint's activation). Its
patches are 32 pixels (ViT-B/32), so the pyramid taps blocks 3, 5, 7, 11 at stride 32 and rescales them by 8, 4, 2, 1:
strides 4, 8, 16, 32 as for 16-pixel patches (the 8x level is one more deconvolution-BN-GELU stage than the
4x one). ``visual.proj`` is not used there; the pooled feature is the class token after ``ln_post``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from vlpbench.adapters.base import (
    ModelCard,
    Adapter,
    check_zero_shot_arguments,
    LoadReport,
    Weights,
    load_state_dict_file,
    match_keys,
    split_prefix,
    tensor_spec,
    unwrap_state_dict,
)
from vlpbench.adapters.hf_vit import PROCESSOR_FILE, read_input_contract, weights_file
from vlpbench.adapters.transformer import POOLS, default_out_indices, ViTConfig, ViTEncoder
from vlpbench.errors import CheckpointError, ConfigError

# OpenAI CLIP's normalisation (open_clip.constants.OPENAI_DATASET_MEAN/STD), on images scaled to [0, 1].
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# CheXzero's own statistics (zero_shot.py ``make``: Normalize(101.48761, 83.43944) on the 0-255 scale,
# from its cxr_stats notebook), converted to images scaled to [0, 1].
CHEXZERO_MEAN = (101.48761 / 255,) * 3
CHEXZERO_STD = (83.43944 / 255,) * 3
NORMALIZATIONS: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "openai": (OPENAI_MEAN, OPENAI_STD),
    "chexzero": (CHEXZERO_MEAN, CHEXZERO_STD),
}
# normalization=folder: the mean and std of a Hugging Face folder's own preprocessor_config.json.
FOLDER_NORMALIZATION = "folder"

OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
OPENAI_SCALARS_REASON = ("hyper-parameter scalars of OpenAI's TorchScript archives (input_resolution, "
                         "context_length, vocab_size); the architecture is read from the weight shapes instead")
# OpenAI and open_clip attention heads are 64 wide in both towers.
HEAD_WIDTH = 64
# Hugging Face ``hidden_act`` values the open_clip model expresses: QuickGELU, or exact (erf) GELU as nn.GELU.
HF_ACTIVATIONS = ("quick_gelu", "gelu")
# The keys the architecture is read from; without them there is nothing to build.
_SHAPE_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
               "positional_embedding", "token_embedding.weight", "ln_final.weight")
_LAYOUT = "clip-openai"
_RESNET_KEYS = ("visual.layer1.", "visual.attnpool.")
# OpenAI visual key part -> timm VisionTransformer key part (timm vision_transformer.py _convert_openai_clip).
_TIMM_RENAMES = (("conv1.", "patch_embed.proj."), ("transformer.resblocks.", "blocks."), ("ln_pre.", "norm_pre."),
                 ("ln_post.", "norm."), ("ln_1.", "norm1."), ("ln_2.", "norm2."),
                 ("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
                 ("attn.out_proj.", "attn.proj."), ("mlp.c_fc.", "mlp.fc1."),
                 ("mlp.c_proj.", "mlp.fc2."))


@dataclass(frozen=True)
class ClipConfig:
    """The shape of an OpenAI-layout ViT CLIP, as read from its weights (``act``: from a Hugging Face config;
    weights alone do not show it, and OpenAI's models use QuickGELU)."""

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    act: str = "quick_gelu"

    @classmethod
    def vit_b32(cls) -> "ClipConfig":
        """OpenAI's ViT-B/32, the model CheXzero fine-tunes."""
        return cls(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                   context_length=77, vocab_size=49408, text_width=512, text_layers=12)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ClipConfig":
        """Read the shape from the weights as open_clip's ``build_model_from_openai_state_dict`` does.

        ``state`` must hold ``_SHAPE_KEYS`` as tensors (the caller checks).
        """
        def blocks(prefix: str) -> int:
            pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
            return len({m.group(1) for k in state if isinstance(k, str) and (m := pattern.match(k))})

        patch_size = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        return cls(
            embed_dim=state["text_projection"].shape[1],
            image_size=patch_size * grid,
            patch_size=patch_size,
            vision_width=state["visual.conv1.weight"].shape[0],
            vision_layers=blocks("visual.transformer.resblocks."),
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            text_width=state["ln_final.weight"].shape[0],
            text_layers=blocks("transformer.resblocks."),
        )

    def build(self) -> torch.nn.Module:
        """A new open_clip ``CLIP`` of this shape (random init, fp32; QuickGELU or GELU as ``act`` says).

        Raises:
            CheckpointError: a width is not a multiple of the 64-wide attention heads.
        """
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        for what, width in (("vision", self.vision_width), ("text", self.text_width)):
            if width % HEAD_WIDTH:
                raise CheckpointError(f"CLIP {what} width {width} is not a multiple of the {HEAD_WIDTH}-wide "
                                      "attention heads of OpenAI/open_clip CLIP")
        return CLIP(
            self.embed_dim,
            vision_cfg=CLIPVisionCfg(layers=self.vision_layers, width=self.vision_width,
                                     patch_size=self.patch_size, image_size=self.image_size),
            text_cfg=CLIPTextCfg(context_length=self.context_length, vocab_size=self.vocab_size,
                                 width=self.text_width, heads=self.text_width // HEAD_WIDTH,
                                 layers=self.text_layers),
            quick_gelu=self.act == "quick_gelu",
        )


@functools.lru_cache(maxsize=None)
def _expected_shapes(config: ClipConfig) -> Mapping[str, tuple[int, ...]]:
    """State-dict keys and shapes of the open_clip ``CLIP`` for ``config``, built on the meta device (no init)."""
    with torch.device("meta"):
        model = config.build()
    return {k: tensor_spec(v) for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=1)
def _tokenizer():
    """open_clip's ``SimpleTokenizer`` (OpenAI's BPE, vocabulary bundled with the package); built once."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """Token ids ``[len(texts), context_length]`` as ``ClipAdapter.embed_text`` makes them (OpenAI's BPE,
    lower-cased and cleaned; a longer text is truncated, keeping the end-of-text token)."""
    return _tokenizer()(list(texts), context_length=context_length)


def pair_softmax(image: torch.Tensor, embed_text: Callable[[list[str]], torch.Tensor], classes: Sequence[str],
                 templates: tuple[str, str], logit_scale: torch.Tensor | None) -> torch.Tensor:
    """CheXzero's zero-shot rule: per image and class, the positive entry of the softmax over the class's
    (positive, negative) prompt pair of ``logit_scale.exp() * cosine``, ``[B, len(classes)]``.

    ``image`` holds L2-normalised image embeddings ``[B, D]``; ``embed_text`` maps prompts to L2-normalised
    embeddings ``[N, D]``; ``logit_scale`` is the model's log temperature, None for the bare cosines that
    CheXzero's ``run_softmax_eval`` takes (rajpurkarlab/CheXzero zero_shot.py:259-260). The arguments are checked
    by the caller.
    """
    text = embed_text([t.format(c) for c in classes for t in templates]).view(len(classes), 2, -1)
    logits = torch.einsum("bd,cpd->bcp", image, text.to(image.device))
    if logit_scale is not None:
        logits = logits * logit_scale.exp().to(image.device)
    return logits.softmax(dim=-1)[..., 0]


class ClipAdapter(Adapter):
    """A ViT CLIP in OpenAI's layout (CheXzero, open_clip fine-tunes): embeddings and zero-shot scores.

    Input contract: square images of ``image_size`` pixels (read from the weights: patch size × grid; 224 for
    CheXzero), scaled to [0, 1] and normalised with ``mean``/``std``. Option ``normalization``: ``"openai"``
    (default: OpenAI CLIP's statistics, what open_clip fine-tunes and CLIP-initialised models expect) or
    ``"chexzero"``: CheXzero's zero_shot.py normalises with its own grayscale CXR statistics (101.48761,
    83.43944 on the 0-255 scale) rather than OpenAI's; pick it to reproduce CheXzero's numbers; or
    ``"folder"``: the mean and std of a Hugging Face folder's ``preprocessor_config.json`` (its size must be
    the model's input side).

    Methods take preprocessed image tensors ``[B, 3, image_size, image_size]`` and run without gradients in
    eval mode on the model's device (CPU after loading; ``self.model.to(device)`` moves it).
    """

    name = "clip"
    card = ModelCard(
        paper="Tiu et al., Expert-level detection of pathologies from unannotated chest X-ray images via "
              "self-supervised learning (CheXzero), Nature Biomedical Engineering 2022",
        repository="github.com/rajpurkarlab/CheXzero (model.py, zero_shot.py)",
        checkpoints=("best_64_5e-05_original_22000_0.864.pt and the other ensemble members — Google Drive "
                     "link in the repository's README",),
        pretraining_data=("mimic_cxr",),
        notes=("any OpenAI-layout, open_clip or Hugging Face CLIPModel ViT loads; the card describes CheXzero",
               "CheXagent's XrayCLIP__vit-b-16__laion2b-s34b-b88k and XrayCLIP__vit-l-14__laion2b-s32b-b82k "
               "(huggingface.co/StanfordAIMI, CC-BY-NC-4.0) are CLIPModel folders with hidden_act gelu (the first's "
               "config.json: 512² images, 16-px patches, 256 text positions), trained with CLIP's loss; the input "
               "side is the config's image_size; --model-option normalization=folder takes the mean and std of "
               "the folder's preprocessor_config.json (default openai: CLIP's)"),
    )
    description = ("CLIP ViT fine-tuned on CXR (CheXzero, open_clip): OpenAI-layout weights; embeddings, zero-shot; "
                   "frozen ViT + Feature2Pyramid for dense tasks")
    capabilities = frozenset({"features", "embed_image", "embed_text", "dense_embed"})
    mean = OPENAI_MEAN
    std = OPENAI_STD
    default_options = {"normalization": "openai"}
    encoder_name = "vit+feature2pyramid"
    pool_description = f"cls: {POOLS['cls']}"
    checkpoint_forms = (
        "OpenAI-layout ViT CLIP state dict .pt (CheXzero's released checkpoints; visual.*, transformer.*, "
        "token_embedding, positional_embedding, ln_final, text_projection, logit_scale)",
        "open_clip trainer checkpoint ({'state_dict': {'module.<same keys>'}, ...}); optimizer etc. ignored",
        "either inside {'state_dict': ...}, keys optionally prefixed 'module.' or '_orig_mod.'",
        "Hugging Face CLIPModel directory (config.json + model.safetensors or pytorch_model.bin; ViT, hidden_act "
        "quick_gelu or gelu)",
    )

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter.__init__``) and build the open_clip model from it.

        Raises:
            ConfigError: an unknown option or ``normalization`` value, or no checkpoint.
            CheckpointError: as ``Adapter.__init__``; also a vocabulary that OpenAI's BPE tokenizer does not
                fit, or a Hugging Face directory that is incomplete or not expressible as an OpenAI CLIP.
        """
        super().__init__(checkpoint, **options)
        # The weights show the shape, not the activation: a Hugging Face config names it (default QuickGELU).
        self.config = dataclasses.replace(ClipConfig.from_state_dict(self._encoder_state),
                                          act=self._extra_state.get("act", "quick_gelu"))
        self.image_size = self.config.image_size
        if self.options["normalization"] == FOLDER_NORMALIZATION:
            self.mean, self.std = self._folder_normalization()
        else:
            self.mean, self.std = NORMALIZATIONS[self.options["normalization"]]
        n_tokens = len(_tokenizer().encoder)
        if self.config.vocab_size != n_tokens:
            raise CheckpointError(f"{self.checkpoint_path}: token_embedding has {self.config.vocab_size} rows, but "
                                  f"OpenAI's BPE tokenizer has {n_tokens} tokens; not an OpenAI-vocabulary CLIP")
        self.model = self.config.build()
        self.model.load_state_dict(self._encoder_state)  # strict: map_weights accounted every key already
        # The visual tower returns (pooled, patch tokens): one forward serves embed_image and dense_embed.
        self.model.visual.output_tokens = True
        self.model.eval().requires_grad_(False)

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Unwrap, ignore OpenAI's scalars, read the shape from the weights and account every key against it.

        The returned ``Weights.encoder`` holds the whole CLIP state dict (open_clip ``CLIP`` key names, which
        are OpenAI's). When a key the shape is read from is missing, nothing is built and the report lists it.
        A Hugging Face directory (``HfClipDirectory``) is accounted under its HF key names and converted.

        Raises:
            CheckpointError: the object is not a dict of tensors, or it is a ResNet-based CLIP.
        """
        if isinstance(checkpoint, HfClipDirectory):
            return _map_hf_weights(checkpoint)
        report = LoadReport(_LAYOUT)
        state, prefix = unwrap_state_dict(checkpoint, report, what="a CLIP checkpoint")
        if any(isinstance(k, str) and k.startswith(_RESNET_KEYS) for k in state):
            raise CheckpointError("this is a ResNet-based CLIP (keys visual.layer1.* / visual.attnpool.*); only "
                                  "ViT CLIPs (visual.conv1, visual.transformer.*, visual.proj) are supported")
        scalars, state = split_prefix(state, *OPENAI_SCALARS)
        report.ignore(OPENAI_SCALARS_REASON, [prefix + k for k in scalars])

        absent = [k for k in _SHAPE_KEYS if not isinstance(state.get(k), torch.Tensor)]
        if absent:
            report.missing += [prefix + k for k in absent]
            report.unexpected += [f"{prefix}{k}" for k in state if k not in _SHAPE_KEYS]
            return Weights(report, {})
        config = ClipConfig.from_state_dict(state)
        # The unwrapping notes are already appended to the layout; the architecture goes before them.
        report.layout = f"{_LAYOUT}-{_arch_name(config)}{report.layout[len(_LAYOUT):]}"
        return Weights(report, match_keys(state, _expected_shapes(config), report, source_prefix=prefix))

    def encoder(self) -> ViTEncoder:
        """The visual tower as a new :class:`ViTEncoder` (timm names, Feature2Pyramid neck; module docstring)."""
        return ViTEncoder(self.vit_config(), timm_visual_state(self._encoder_state), pool="cls")

    def vit_config(self) -> ViTConfig:
        """The visual tower's shape as a timm ViT (pre-norm, LayerNorm eps 1e-5, the CLIP's activation, 64-wide
        heads)."""
        c = self.config
        return ViTConfig(patch_size=c.patch_size, embed_dim=c.vision_width, depth=c.vision_layers,
                         num_heads=c.vision_width // HEAD_WIDTH, image_size=c.image_size, norm_eps=1e-5,
                         pre_norm=True, act=c.act)

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[B, embed_dim]``, L2-normalised (the projected class token)."""
        return F.normalize(self._visual(images)[0], dim=-1)

    @torch.no_grad()
    def dense_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``[B, embed_dim, grid, grid]``, normalised over the embedding dimension.

        The patch tokens of the last block after ``ln_post`` and ``visual.proj``, i.e. in the space of the
        image and text embeddings, as the class token is projected; grid = image_size / patch_size.
        """
        _, tokens = self._visual(images)
        grid = self.config.image_size // self.config.patch_size
        tokens = tokens @ self.model.visual.proj
        return F.normalize(tokens.transpose(1, 2).reshape(len(tokens), -1, grid, grid), dim=1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings ``[len(texts), embed_dim]``, L2-normalised.

        Tokenised with OpenAI's BPE (lower-cased, cleaned) to the checkpoint's context length; longer texts
        are truncated, keeping the end-of-text token the embedding is read from.
        """
        if isinstance(texts, str) or not texts:
            raise ConfigError(f"embed_text takes a non-empty list of strings, got {texts!r}")
        tokens = _tokenizer()(list(texts), context_length=self.config.context_length)
        return self.model.encode_text(tokens.to(self._device()), normalize=True)

    @torch.no_grad()
    def zero_shot_scores(self, images: torch.Tensor, classes: Sequence[str],
                         templates: tuple[str, str] = ("{}", "no {}"), *,
                         apply_logit_scale: bool = True) -> torch.Tensor:
        """CheXzero's zero-shot probability per image and class, ``[B, len(classes)]``.

        For each class the positive and negative prompts (``templates``, formatted with the class name) are
        embedded; the logits are the cosine similarities with the image embedding times
        ``logit_scale.exp()``; the score is the positive entry of the softmax over the pair. CheXzero's own
        ``run_softmax_eval`` takes the softmax of the bare cosine similarities: pass
        ``apply_logit_scale=False`` to reproduce its probabilities. Both give the same ranking, hence AUROC.
        Beware "No Finding": its negative prompt "no No Finding" inverts the meaning (CheXzero issue #19).

        Raises:
            ConfigError: ``templates`` is not a pair of strings each with one ``{}``, or ``classes`` is empty.
        """
        check_zero_shot_arguments(classes, templates)
        return pair_softmax(self.embed_image(images), self.embed_text, classes, templates,
                            self.model.logit_scale if apply_logit_scale else None)

    def describe(self) -> dict[str, Any]:
        """``Adapter.describe`` plus the architecture read from the weights and the dense-task pyramid."""
        return {**super().describe(), "architecture": asdict(self.config),
                "pyramid": f"feature2pyramid({','.join(map(str, default_out_indices(self.config.vision_layers)))})",
                "pool": self.pool_description}

    def _visual(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the visual tower: (projected class token ``[B, D]``, patch tokens after ln_post ``[B, N, width]``).

        Raises:
            ConfigError: ``images`` is not ``[B, 3, image_size, image_size]`` (the positional embedding is fixed).
        """
        size = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ConfigError(f"adapter {self.name!r} takes images [B, 3, {size}, {size}] (its positional embedding "
                              f"fixes the size), got {list(images.shape)}")
        # The model follows the images' device (a protocol puts them on its --device), as the other adapters do.
        self.model.to(images.device)
        return self.model.visual(images.float())

    def _device(self) -> torch.device:
        """Where the model's tensors are; inputs are moved there."""
        return self.model.logit_scale.device

    def _folder_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std of the Hugging Face folder's ``preprocessor_config.json`` (``normalization=folder``).

        Raises:
            ConfigError: the checkpoint is not a folder with that file.
            CheckpointError: the file is unreadable, asks for a preprocessing vlpbench cannot reproduce, or
                resizes to another side than the model's input.
        """
        folder = Path(self.checkpoint_path) if self.checkpoint_path is not None else None
        if folder is None or not (folder / PROCESSOR_FILE).is_file():
            raise ConfigError(f"adapter {self.name!r}: normalization=folder reads the checkpoint folder's "
                              f"{PROCESSOR_FILE}; {self.checkpoint_path} has none (use openai or chexzero)")
        contract = read_input_contract(folder / PROCESSOR_FILE)
        if contract.image_size != self.image_size:
            raise CheckpointError(f"{folder / PROCESSOR_FILE}: size {contract.image_size} differs from the model's "
                                  f"input side {self.image_size} (config.json)")
        return contract.mean, contract.std

    @classmethod
    def _resolve_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``Adapter._resolve_options``, also checking the ``normalization`` value (before anything is loaded).

        Raises:
            ConfigError: an unknown option, or a ``normalization`` other than ``folder`` and those in
                ``NORMALIZATIONS``.
        """
        resolved = super()._resolve_options(options)
        if resolved["normalization"] not in (*NORMALIZATIONS, FOLDER_NORMALIZATION):
            raise ConfigError(f"adapter {cls.name!r}: option normalization={resolved['normalization']!r} is not one of "
                              f"{', '.join((*NORMALIZATIONS, FOLDER_NORMALIZATION))}")
        return resolved

    @classmethod
    def _read(cls, checkpoint: str | Path | None) -> tuple[Any, str | None, str | None]:
        """``Adapter._read``; a directory is read as a Hugging Face ``CLIPModel`` (``HfClipDirectory``)."""
        if checkpoint is not None and Path(checkpoint).is_dir():
            return _read_hf_directory(Path(checkpoint))
        return super()._read(checkpoint)


def timm_visual_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``visual.*`` weights of an OpenAI-layout CLIP (``visual.proj`` left out) under timm ViT names."""
    out = {}
    for key, value in state.items():
        if not key.startswith("visual.") or key == "visual.proj":
            continue
        key = key.removeprefix("visual.")
        if key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        else:
            for old, new in _TIMM_RENAMES:
                key = key.replace(old, new)
            out[key] = value
    return out


def _arch_name(config: ClipConfig) -> str:
    """``"vit-b32"`` for OpenAI's ViT-B/32 shape, else a shape summary such as ``"vit-w64-l2-p8-32"``; a GELU model
    (not OpenAI's QuickGELU) ends in ``"-gelu"``."""
    if config == ClipConfig.vit_b32():
        return "vit-b32"
    act = "" if config.act == "quick_gelu" else f"-{config.act}"
    return f"vit-w{config.vision_width}-l{config.vision_layers}-p{config.patch_size}-{config.image_size}{act}"


# --- Hugging Face CLIPModel directories -------------------------------------------------------------------

HF_POSITION_IDS_REASON = ("position_ids buffers of older transformers versions: the constant 0..n-1, "
                          "recomputed by the model")
_HF_LAYOUT = "clip-hf"
# OpenAI module key part -> HF key part, for the parts that differ only in name. Ordered: the first matching
# prefix wins, so "visual.transformer.resblocks." is tried before "transformer.resblocks.".
_HF_RENAMES = (
    ("visual.conv1.", "vision_model.embeddings.patch_embedding."),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.", "vision_model.pre_layrnorm."),  # sic: HF's spelling
    ("visual.ln_post.", "vision_model.post_layernorm."),
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("token_embedding.", "text_model.embeddings.token_embedding."),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("logit_scale", "logit_scale"),
)
_HF_BLOCK_RENAMES = (
    ("attn.out_proj.", "self_attn.out_proj."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
)
# OpenAI's projections are [width, embed_dim] matrices applied as x @ P; HF's are Linear weights, P transposed.
_HF_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


@dataclass
class HfClipDirectory:
    """A Hugging Face ``CLIPModel`` directory as ``ClipAdapter._read`` reads it.

    Attributes:
        config: the architecture, from ``config.json``.
        state: the weights file's state dict, under HF key names.
        weights_file: the name of the file the weights came from (one of ``hf_vit.WEIGHT_FILES``).
    """

    config: ClipConfig
    state: dict[str, Any] = field(repr=False)
    weights_file: str


def _read_hf_directory(directory: Path) -> tuple[HfClipDirectory, str, str]:
    """Read ``directory`` as a Hugging Face ``CLIPModel``: ``(HfClipDirectory, directory, sha256 of the weights)``.

    Raises:
        ConfigError: a tower's ``hidden_act`` is not one of ``HF_ACTIVATIONS``, or the towers' differ (open_clip
            builds both with one activation).
        CheckpointError: no ``config.json`` or weights file, sharded weights, a config that is not a CLIP or
            not expressible as an OpenAI CLIP, or an unsafe or unreadable weights file.
    """
    from transformers import CLIPConfig

    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} is a directory without config.json, not a Hugging Face CLIPModel "
                              "directory; pass an OpenAI-layout state dict (.pt) or an open_clip checkpoint file")
    weights = weights_file(directory, "a CLIP ViT fits in one file: re-save it with a larger max_shard_size")
    try:
        hf = CLIPConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:  # transformers: OSError for unreadable files, ValueError for other models
        raise CheckpointError(f"{directory}/config.json is not a Hugging Face CLIP config: {e}") from e
    vision, text = hf.vision_config, hf.text_config
    for what, tower in (("vision", vision), ("text", text)):
        if tower.hidden_act not in HF_ACTIVATIONS:
            raise ConfigError(f"{directory}/config.json: {what}_config.hidden_act is {tower.hidden_act!r}; expected "
                              f"one of {', '.join(HF_ACTIVATIONS)}")
        found = {
            "head width": tower.hidden_size / tower.num_attention_heads,
            "intermediate_size / hidden_size": tower.intermediate_size / tower.hidden_size,
            "layer_norm_eps": tower.layer_norm_eps,
        }
        wanted = {"head width": HEAD_WIDTH, "intermediate_size / hidden_size": 4, "layer_norm_eps": 1e-5}
        wrong = {k: v for k, v in found.items() if v != wanted[k]}
        if wrong:
            raise CheckpointError(f"{directory}/config.json: the {what} tower has {wrong}, which OpenAI's CLIP "
                                  f"architecture cannot express (it has {wanted})")
    if vision.hidden_act != text.hidden_act:
        raise ConfigError(f"{directory}/config.json: vision_config.hidden_act is {vision.hidden_act!r} but "
                          f"text_config.hidden_act is {text.hidden_act!r}; expected the same activation in both "
                          "towers (open_clip builds them with one)")
    config = ClipConfig(embed_dim=hf.projection_dim, image_size=vision.image_size, patch_size=vision.patch_size,
                        vision_width=vision.hidden_size, vision_layers=vision.num_hidden_layers,
                        context_length=text.max_position_embeddings, vocab_size=text.vocab_size,
                        text_width=text.hidden_size, text_layers=text.num_hidden_layers, act=vision.hidden_act)
    state, sha256 = load_state_dict_file(weights)
    return HfClipDirectory(config, state, weights.name), str(directory), sha256


def _hf_names(key: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The HF key(s) and shape(s) that hold OpenAI module key ``key`` (three for a fused q/k/v projection)."""
    if key in _HF_TRANSPOSED:
        return [(_HF_TRANSPOSED[key], shape[::-1])]
    old, new = next((o, n) for o, n in _HF_RENAMES if key.startswith(o))
    name = new + key[len(old):]
    block = re.match(r"(.*\.layers\.\d+\.)(.*)", name)
    if block is None:
        return [(name, shape)]
    head, part = block.groups()
    if part.startswith("attn.in_proj_"):
        kind = part.removeprefix("attn.in_proj_")
        return [(f"{head}self_attn.{p}_proj.{kind}", (shape[0] // 3, *shape[1:])) for p in "qkv"]
    old, new = next((o, n) for o, n in _HF_BLOCK_RENAMES if part.startswith(o))
    return [(head + new + part[len(old):], shape)]


def _map_hf_weights(directory: HfClipDirectory) -> Weights:
    """Account the HF keys strictly under their own names, then convert them to the OpenAI module keys."""
    report = LoadReport(f"{_HF_LAYOUT}-{_arch_name(directory.config)} ({directory.weights_file})")
    position_ids, state = split_prefix(directory.state, "vision_model.embeddings.position_ids",
                                       "text_model.embeddings.position_ids")
    report.ignore(HF_POSITION_IDS_REASON, list(position_ids))
    sources = {key: _hf_names(key, shape) for key, shape in _expected_shapes(directory.config).items()}
    found = match_keys(state, {name: shape for names in sources.values() for name, shape in names}, report)
    module_key = {name: key for key, names in sources.items() for name, _ in names}
    report.mapped = [(name, module_key[name]) for name, _ in report.mapped]

    converted: dict[str, torch.Tensor] = {}
    for key, names in sources.items():
        if all(name in found for name, _ in names):
            tensors = [found[name] for name, _ in names]
            if key in _HF_TRANSPOSED:
                converted[key] = tensors[0].T.contiguous()
            else:  # q, k, v stack into in_proj in that order; a single tensor (also 0-d logit_scale) is kept
                converted[key] = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
    return Weights(report, converted, extra={"act": directory.config.act})
