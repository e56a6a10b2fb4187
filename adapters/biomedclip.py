"""BiomedCLIP (Zhang et al.): open_clip's ``CustomTextCLIP`` with a timm ViT-B/16 and a PubMedBERT text tower.

Microsoft publishes it on Hugging Face as ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``: a
folder with ``open_clip_config.json`` and ``open_clip_pytorch_model.bin`` (a plain ``OrderedDict``; its
``text.transformer.embeddings.position_ids`` buffer is a ``LongStorage`` tensor, which the weights-only
unpickler reads). The folder is the checkpoint path; the ``.bin`` alone is read with the published config.

The config (``model_cfg``) builds, in open_clip (``model.py`` ``CustomTextCLIP``):

- ``visual``: ``TimmModel`` (``timm_model.py``:60-103) with ``timm_model_name = "vit_base_patch16_224"``,
  ``timm_pool = ""`` (timm's default for a ViT: the class token), ``timm_proj = "linear"``:
  ``visual.trunk.*`` the timm ViT without classifier (150 keys, ``timm_vit.py``) and ``visual.head.proj``,
  ``Linear(768, 512, bias=False)``.
- ``text``: ``HFTextEncoder`` (``hf_model.py``:96-169) with ``hf_model_name`` BiomedBERT-base-uncased-abstract,
  ``hf_proj_type = "mlp"``, ``hf_pooler_type = "cls_last_hidden_state_pooler"``: ``text.transformer.*`` a
  ``BertModel`` without pooler (``add_pooling_layer`` is False for that pooler, hf_model.py:115, :128),
  ``text.proj`` = Linear(768, 640, bias=False), GELU, Linear(640, 512, bias=False) (hf_model.py:146-152); the
  [CLS] output of the last layer (hf_model.py:83-93), attention over tokens that are not padding (:155).
- ``logit_scale``; ``context_length = 256``; ``preprocess_cfg``: OpenAI CLIP's mean and std.

The folder carries neither the BERT's config nor its tokenizer (open_clip's ``get_tokenizer`` fetches them by
``hf_tokenizer_name``; open_clip issue #772 describes loading both from a local copy). They come from option
``text_encoder`` (a local BiomedBERT folder); without it the text side is not loaded. The tokenizer is
open_clip's own ``HFTokenizer`` (``tokenizer.py``:405-499: whitespace cleaning, padding to the context length).

Dense and linear protocols: ``encoder()`` is the trunk behind a Feature2Pyramid neck (``transformer.ViTEncoder``,
from ``ViTAdapter``); option ``pool`` picks the linear probe's feature, by default the class token after the
final norm, which open_clip projects into the embedding space.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from vlpbench.adapters.base import (
    DENSE_EMBED,
    EMBED_IMAGE,
    EMBED_TEXT,
    LoadReport,
    ModelCard,
    Weights,
    check_zero_shot_arguments,
    load_state_dict_file,
    loaded_eval,
    match_keys,
    split_prefix,
    tensor_spec,
    unwrap_state_dict,
)
from vlpbench.adapters.clip import OPENAI_MEAN, OPENAI_STD
from vlpbench.adapters.text import TEXT_ENCODER_HINT, bert_config, build_bert, match_bert, text_encoder_record
from vlpbench.adapters.timm_vit import frozen_backbone, patch_grid, vit_tokens
from vlpbench.adapters.transformer import ViTAdapter, match_vit
from vlpbench.errors import CheckpointError, ConfigError

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
# open_clip_config.json of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224, the settings this adapter
# implements; a config that sets any of them otherwise is refused, naming the field.
PUBLISHED_SETTINGS: Mapping[str, Mapping[str, Any]] = {
    "vision_cfg": {"timm_pool": "", "timm_proj": "linear"},
    "text_cfg": {"hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler"},
}
CONTEXT_LENGTH = 256
TRUNK, VISUAL_PROJ = "visual.trunk.", "visual.head.proj.weight"
TEXT_MODEL, TEXT_PROJ = "text.transformer.", "text.proj."
TEXT_SIDE_REASON = ("BiomedCLIP's text tower (PubMedBERT, its MLP projection) and logit_scale: mapped only with "
                    "option text_encoder=DIR (a local BiomedBERT folder: config and tokenizer)")


@dataclass
class BiomedClipFolder:
    """What ``BiomedClipAdapter._read`` reads: the weights and the settings of ``open_clip_config.json``.

    Attributes:
        state: the weights file's state dict.
        weights_file: the file the weights came from.
        context_length: tokens per text (``text_cfg.context_length``).
        mean, std: ``preprocess_cfg`` normalisation, on images scaled to [0, 1].
    """

    state: dict[str, Any] = field(repr=False)
    weights_file: str
    context_length: int = CONTEXT_LENGTH
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD


class BiomedClipAdapter(ViTAdapter):
    """BiomedCLIP's image and text towers: embeddings, patch embeddings, zero-shot scores with its logit scale."""

    name = "biomedclip"
    card = ModelCard(
        paper="Zhang et al., BiomedCLIP: a multimodal biomedical foundation model pretrained from fifteen million "
              "scientific image-text pairs, arXiv 2303.00915 (2023); NEJM AI 2024",
        repository="huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (open_clip "
                   "CustomTextCLIP: open_clip/timm_model.py, open_clip/hf_model.py)",
        checkpoints=("the Hugging Face folder microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
                     "(open_clip_config.json, open_clip_pytorch_model.bin); its text side also needs the "
                     "tokenizer and config of microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",),
        pretraining_data=(),
        notes=("pre-trained on PMC-15M (figure-caption pairs from PubMed Central articles), which is no vlpbench "
               "dataset: its overlap with any test set is unknown, and no run is flagged",),
    )
    description = ("BiomedCLIP (PMC-15M) ViT-B/16 + PubMedBERT from its Hugging Face open_clip folder; 512-d "
                   "embeddings, zero-shot and grounding with text_encoder=DIR")
    capabilities = frozenset({"features", EMBED_IMAGE, EMBED_TEXT, DENSE_EMBED})
    mean = OPENAI_MEAN
    std = OPENAI_STD
    default_options = {"text_encoder": "", "pool": "cls"}
    checkpoint_forms = (
        "Hugging Face folder with open_clip_config.json and open_clip_pytorch_model.bin (or "
        "open_clip_model.safetensors): visual.trunk.* (timm ViT-B/16, 150 keys), visual.head.proj, and with "
        "--model-option text_encoder=DIR text.transformer.* (BertModel without pooler), text.proj.{0,2}, logit_scale",
        "open_clip_pytorch_model.bin alone (read with the published config: context 256, OpenAI mean/std)",
    )
    capability_hints = {
        EMBED_TEXT: "pass --model-option text_encoder=DIR (a local microsoft/BiomedNLP-BiomedBERT-base-uncased-"
                    f"abstract folder: {TEXT_ENCODER_HINT})",
    }
    procedures = {
        "zero_shot": "per class, the softmax over the (positive, negative) prompt pair of logit_scale.exp() times "
                     "the cosine similarities, as the model card's open_clip example scores its prompts (softmax "
                     "of logit_scale * image_features @ text_features.T); the pair, not all classes, because "
                     "the tasks are multi-label. Image: class token (timm ViT, final norm) through visual.head."
                     "proj; text: [CLS] of the last layer through text.proj (open_clip hf_model.py:154-158)",
        "grounding": "cosine similarity of the text embedding with each patch token after the ViT's final norm "
                     "through visual.head.proj (the class token's projection; BiomedCLIP publishes no "
                     "grounding procedure), 14×14 at 224²",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``) and build the towers it carries.

        Raises:
            ConfigError: ``text_encoder`` is not a local BERT folder with a config and a tokenizer.
            CheckpointError: as ``Adapter``; also a folder whose config is not BiomedCLIP's (field named).
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        self.image_size = self.vit_config.image_size
        self.mean, self.std = extra["mean"], extra["std"]
        self.context_length = extra["context_length"]
        self._bert = self._text_proj = self._tokenizer = self._text_encoder_record = None
        self._vit = frozen_backbone(self.vit_config, self._encoder_state)
        with torch.random.fork_rng(devices=[]):  # every random init below is overwritten at once
            self._visual_proj = loaded_eval(_linear(extra["visual_proj"]), {"weight": extra["visual_proj"]})
            if "text_model" in extra:
                self._bert = build_bert(extra["text_config"], extra["text_model"], pooler=False)
                embed_dim, hidden = extra["text_proj"]["2.weight"].shape
                self._text_proj = loaded_eval(text_projection(extra["text_config"].hidden_size, hidden, embed_dim),
                                              extra["text_proj"])
                self._tokenizer = _tokenizer(self.options["text_encoder"], self.context_length)
                self._text_encoder_record = text_encoder_record(self.options["text_encoder"])
                self._logit_scale = extra["logit_scale"]
            else:
                self.capabilities = self.capabilities - {EMBED_TEXT}

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Account every key: the ViT trunk and projection, and (with ``text_encoder``) the text tower.

        Raises:
            CheckpointError: the object is not a dict of tensors.
            ConfigError: ``text_encoder`` is not a local BERT folder with a config.json.
        """
        folder = checkpoint if isinstance(checkpoint, BiomedClipFolder) else BiomedClipFolder(checkpoint, "")
        report = LoadReport("biomedclip" + (f" ({folder.weights_file})" if folder.weights_file else ""))
        state, prefix = unwrap_state_dict(folder.state, report, what="a BiomedCLIP checkpoint")
        trunk, rest = split_prefix(state, TRUNK)
        encoder = match_vit({k[len(TRUNK):]: v for k, v in trunk.items()}, report, source_prefix=prefix + TRUNK)
        extra: dict[str, Any] = {"context_length": folder.context_length,
                                 "mean": folder.mean, "std": folder.std}
        proj, rest = split_prefix(rest, VISUAL_PROJ)
        value = proj.get(VISUAL_PROJ)
        embed_dim = value.shape[0] if isinstance(value, torch.Tensor) and value.ndim == 2 else 0
        width = encoder["cls_token"].shape[-1] if "cls_token" in encoder else 0
        extra["visual_proj"] = match_keys(proj, {VISUAL_PROJ: (embed_dim, width)}, report,
                                          source_prefix=prefix).get(VISUAL_PROJ)
        text_side, rest = split_prefix(rest, "text.", "logit_scale")
        if options["text_encoder"]:
            extra.update(_map_text_side(text_side, options["text_encoder"], embed_dim, report, prefix))
        else:
            report.ignore(TEXT_SIDE_REASON, [prefix + k for k in text_side])
        report.unexpected += [f"{prefix}{k}" for k in rest]
        return Weights(report, encoder, extra=extra)

    def describe(self) -> dict[str, Any]:
        """``ViTAdapter.describe`` plus the context length."""
        return {**super().describe(), "context_length": self.context_length}

    # --- embeddings (open_clip model.py CustomTextCLIP.encode_image / encode_text, normalize=True) ----------

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, 512)``, L2-normalised: the class token after the final norm, ``visual.head.proj``.

        Raises:
            ConfigError: the images are not ``(B, 3, image_size, image_size)``.
        """
        cls_token = vit_tokens(self._vit, self.vit_config, images)[:, 0]
        return nn.functional.normalize(self._visual_proj.to(cls_token.device)(cls_token), dim=-1)

    @torch.no_grad()
    def dense_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``(B, 512, grid, grid)``: the patch tokens after the final norm through
        ``visual.head.proj`` (the class token's projection), L2-normalised over the embedding."""
        tokens = vit_tokens(self._vit, self.vit_config, images)[:, 1:]
        projected = self._visual_proj.to(tokens.device)(tokens)
        return nn.functional.normalize(patch_grid(projected, self.vit_config), dim=1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings ``(B, 512)``, L2-normalised, as open_clip's ``HFTextEncoder`` computes them.

        Tokenised by open_clip's ``HFTokenizer`` (whitespace cleaning, padded and truncated to the context
        length, 256); attention over the tokens that are not padding; the [CLS] output of the last layer through
        the MLP projection.

        Raises:
            CapabilityError: no ``text_encoder`` was given.
            ConfigError: ``texts`` is not a non-empty list of strings.
        """
        self.require(EMBED_TEXT)
        if isinstance(texts, str) or not texts:
            raise ConfigError(f"embed_text takes a non-empty list of strings, got {texts!r}")
        ids = self._tokenizer(list(texts))
        mask = (ids != self._bert.config.pad_token_id).long()
        hidden = self._bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return nn.functional.normalize(self._text_proj(hidden[:, 0]), dim=-1)

    @torch.no_grad()
    def zero_shot_scores(self, images: torch.Tensor, classes: Sequence[str],
                         templates: tuple[str, str] = ("{}", "no {}")) -> torch.Tensor:
        """Probability per image and class, ``(B, len(classes))``: the softmax over each class's prompt pair of
        ``logit_scale.exp()`` × cosine similarity (``procedures["zero_shot"]``), read at the positive prompt.

        Raises:
            CapabilityError: no ``text_encoder`` was given.
            ConfigError: ``templates`` is not a pair of strings with one ``{}`` each, or no classes.
        """
        self.require(EMBED_TEXT)
        check_zero_shot_arguments(list(classes), templates)
        image = self.embed_image(images)
        text = self.embed_text([t.format(c) for c in classes for t in templates]).view(len(classes), 2, -1)
        logits = torch.einsum("bd,cpd->bcp", image, text.to(image.device)) * self._logit_scale.exp()
        return logits.softmax(dim=-1)[..., 0]

    @classmethod
    def _read(cls, checkpoint: str | Path | None) -> tuple[Any, str | None, str | None]:
        """``Adapter._read``; a directory is read as BiomedCLIP's Hugging Face folder (``_read_folder``)."""
        if checkpoint is not None and Path(checkpoint).is_dir():
            return _read_folder(Path(checkpoint))
        return super()._read(checkpoint)


def text_projection(width: int, hidden: int, embed_dim: int) -> nn.Sequential:
    """open_clip's ``hf_proj_type = "mlp"`` head (hf_model.py:146-152): Linear, GELU, Linear, no biases."""
    return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` of ``weight``'s shape (to be loaded with it)."""
    return nn.Linear(weight.shape[1], weight.shape[0], bias=False)


def _map_text_side(text_side: Mapping[str, Any], text_encoder: str, embed_dim: int, report: LoadReport,
                   prefix: str) -> dict[str, Any]:
    """Account ``text.*`` and ``logit_scale`` against a ``BertModel`` without pooler (config from
    ``text_encoder``), the MLP projection to ``embed_dim`` and the scalar logit scale."""
    config = bert_config(text_encoder, "biomedclip")
    model_part, rest = split_prefix(text_side, TEXT_MODEL)
    text_model = match_bert({k[len(TEXT_MODEL):]: v for k, v in model_part.items()}, report, config,
                            source_prefix=prefix + TEXT_MODEL, target_prefix=TEXT_MODEL, pooler=False)
    proj_part, rest = split_prefix(rest, TEXT_PROJ)
    hidden = (config.hidden_size + embed_dim) // 2  # hf_model.py:147
    with torch.device("meta"):
        expected = {k: tensor_spec(v) for k, v in text_projection(config.hidden_size, hidden, embed_dim)
                    .state_dict().items()}
    text_proj = match_keys({k[len(TEXT_PROJ):]: v for k, v in proj_part.items()}, expected, report,
                           source_prefix=prefix + TEXT_PROJ, target_prefix=TEXT_PROJ)
    scale = match_keys(rest, {"logit_scale": ()}, report, source_prefix=prefix)
    return {"text_config": config, "text_model": text_model, "text_proj": text_proj,
            "logit_scale": scale.get("logit_scale")}


def _tokenizer(folder: str, context_length: int) -> Any:
    """open_clip's ``HFTokenizer`` over the local folder ``folder`` (nothing downloaded).

    Raises:
        ConfigError: no tokenizer can be loaded from the folder.
    """
    from open_clip.tokenizer import HFTokenizer

    try:
        return HFTokenizer(str(folder), context_length=context_length, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"adapter 'biomedclip': no tokenizer can be loaded from text_encoder={folder!r}: {e}") from e


def _read_folder(folder: Path) -> tuple[BiomedClipFolder, str, str]:
    """Read BiomedCLIP's Hugging Face folder: ``(BiomedClipFolder, folder, sha256 of the weights file)``.

    Raises:
        CheckpointError: no ``open_clip_config.json`` or weights file, or a config whose settings differ from
            the published ones (``PUBLISHED_SETTINGS``), naming the field.
    """
    config_path = folder / CONFIG_FILE
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if not config_path.is_file() or weights is None:
        raise CheckpointError(f"{folder} is not BiomedCLIP's Hugging Face folder: it needs {CONFIG_FILE} and "
                              f"one of {', '.join(WEIGHT_FILES)}")
    try:
        config = json.loads(config_path.read_text())
        model_cfg, preprocess = config["model_cfg"], config.get("preprocess_cfg", {})
        towers = {name: model_cfg[name] for name in PUBLISHED_SETTINGS}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path} is not an open_clip config with model_cfg.vision_cfg and "
                              f"model_cfg.text_cfg: {e}") from e
    for tower, settings in PUBLISHED_SETTINGS.items():
        for key, wanted in settings.items():
            if towers[tower].get(key) != wanted:
                raise CheckpointError(f"{config_path}: model_cfg.{tower}.{key} is {towers[tower].get(key)!r}; "
                                      f"adapter 'biomedclip' implements BiomedCLIP's {wanted!r}")
    state, sha256 = load_state_dict_file(weights)
    loaded = BiomedClipFolder(state, weights.name,
                              context_length=int(towers["text_cfg"].get("context_length", CONTEXT_LENGTH)),
                              mean=tuple(preprocess.get("mean", OPENAI_MEAN)),
                              std=tuple(preprocess.get("std", OPENAI_STD)))
    return loaded, str(folder), sha256
