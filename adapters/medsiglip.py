"""MedSigLIP (Google Health): a SigLIP image and text encoder pair trained on medical images, on every protocol.

Google publishes it as the gated Hugging Face folder ``google/medsiglip-448``, as ``save_pretrained`` writes a
transformers ``SiglipModel``: ``config.json`` (model_type ``siglip``; vision tower 1152 wide, 27 blocks,
14-pixel patches at 448²; text tower with 64 positions), ``model.safetensors``, ``preprocessor_config.json``
(``SiglipImageProcessor``: resize to 448², mean and std 0.5) and the tokenizer files. The folder is the
checkpoint; any ``SiglipModel`` folder loads the same way. Every key of the weights file is accounted
strictly against ``SiglipModel(config)``: ``vision_model.{embeddings, encoder.layers.N, post_layernorm, head}``
(``head``: the attention-pooling head, probe, ``nn.MultiheadAttention``, LayerNorm and MLP), ``text_model.
{embeddings, encoder.layers.N, final_layer_norm, head}``, ``logit_scale`` and ``logit_bias``. The text side
needs the folder's tokenizer (read with ``local_files_only``; a SentencePiece ``SiglipTokenizer`` needs the
``sentencepiece`` package); a folder whose tokenizer cannot be read loads image-only, and the zero-shot
protocols name the reason.

What the protocols get (``procedures``), all from the transformers modules' own forward:

- image embedding: the attention-pooling head's output (``pooler_output``), L2-normalised; it is also the
  linear probe's feature;
- text embedding: the text tower's ``pooler_output`` (the last position's state through ``text_model.head``),
  prompts padded and truncated to the 64 positions as the processor's ``padding="max_length"`` does;
- zero-shot, by option ``zero_shot_rule``: ``sigmoid`` (default), SigLIP's own pairwise probability,
  ``sigmoid(logit_scale.exp() · cos + logit_bias)`` of the image with each class's positive prompt: the sigmoid
  loss trains every image–text pair as an independent binary match, so unlike CLIP's softmax no second (negative)
  prompt enters the score; or ``softmax``, CLIP's rule as the ``clip`` adapter computes it for CheXzero (the
  softmax over the positive and negative prompt of ``logit_scale.exp() · cos``; ``logit_bias`` shifts both alike
  and cancels), for towers trained with CLIP's loss but stored as ``SiglipModel`` folders;
- grounding: each patch token after ``post_layernorm`` through the attention-pooling head on its own (a single
  key takes all the attention, so this is the head's value and output projections and its LayerNorm-MLP
  residual: the value-embedding reading of an attention pool of MaskCLIP, Zhou et al., ECCV 2022), compared
  with the text embedding by cosine similarity; a (448 / 14)² = 32² map;
- dense tasks: the vision tower behind :class:`~vlpbench.adapters.hf_vit.HfViTEncoder`'s Feature2Pyramid neck
  (blocks 8, 13, 17, 26 of 27; taps resampled from stride 14 to 16; position embedding resampled to the task's
  size by transformers' ``interpolate_pos_encoding``).

CheXagent's ``StanfordAIMI/XraySigLIP__*`` encoders are not all ``SiglipModel`` folders: the
``XraySigLIP__vit-l-14__laion2b-s32b-b82k`` folder holds CLIP's BPE tokenizer (``vocab.json``, ``merges.txt``) and
is tagged ``clip``, a transformers ``CLIPModel``; its ``model_type`` is refused here, naming it. A variant that
is a ``SiglipModel`` folder loads like MedSigLIP. The ``XrayCLIP__*__webli`` folders are ``SiglipModel`` folders
whose towers were trained with CLIP's softmax loss (the folder names; CheXagent's README, "Vision Encoder"):
``zero_shot_rule=softmax`` scores them by that rule.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlpbench.adapters.base import (
    DENSE_EMBED,
    EMBED_IMAGE,
    EMBED_TEXT,
    Adapter,
    LoadReport,
    ModelCard,
    Weights,
    check_zero_shot_arguments,
    match_keys,
    state_specs,
    unwrap_state_dict,
)
from vlpbench.adapters.clip import pair_softmax
from vlpbench.adapters.hf_vit import HfFolder, HfViTEncoder, materialize, pyramid_name, read_hf_folder
from vlpbench.adapters.text import text_encoder_record
from vlpbench.adapters.transformer import default_out_indices
from vlpbench.errors import CheckpointError, ConfigError

# google/medsiglip-448 preprocessor_config.json (SiglipImageProcessor): the class-level contract `models` lists.
MEDSIGLIP_SIZE = 448
MEDSIGLIP_MEAN = (0.5,) * 3
MEDSIGLIP_STD = (0.5,) * 3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "added_tokens.json")
VISION = "vision_model."
POOL = "map: the attention-pooling head's output (SiglipVisionModel pooler_output), the image embedding"
ENCODING = ("Image: attention-pooling head output; text: last position through text_model.head, padded to "
            "max_position_embeddings")
# zero_shot_rule -> procedures["zero_shot"]: the rule the towers were trained with (SigLIP's or CLIP's loss).
ZERO_SHOT_PROCEDURES = {
    "sigmoid": "per class, sigmoid(logit_scale.exp() * cosine(image embedding, positive prompt embedding) + "
               "logit_bias): SigLIP's pairwise probability (transformers SiglipModel.forward logits_per_image, then "
               "torch.sigmoid as its docstring computes probabilities); the negative template is not used. " + ENCODING,
    "softmax": "per class, the positive entry of the softmax over the (positive, negative) prompt pair of "
               "logit_scale.exp() * cosine(image embedding, prompt embedding): CLIP's rule as the clip adapter "
               "computes it for CheXzero (rajpurkarlab/CheXzero zero_shot.py:259-260, with CLIP's temperature), for "
               "towers trained with CLIP's loss (zero_shot_rule=softmax); logit_bias adds to both entries and "
               "cancels. " + ENCODING,
}


class SiglipVisionEncoder(HfViTEncoder):
    """A SigLIP vision tower as a protocol encoder: no class token; pooled by its attention-pooling head."""

    def __init__(self, model: nn.Module, config: Any):
        super().__init__(model, patch_size=config.patch_size, width=config.hidden_size,
                         depth=config.num_hidden_layers, prefix_tokens=0, pooled_channels=config.hidden_size)

    def _outputs(self, x: torch.Tensor, hidden_states: bool) -> Any:
        return self.model(pixel_values=x, output_hidden_states=hidden_states, interpolate_pos_encoding=True)

    def _pool(self, outputs: Any) -> torch.Tensor:
        return outputs.pooler_output


class MedSiglipAdapter(Adapter):
    """A ``SiglipModel`` folder (MedSigLIP): embeddings, sigmoid (or CLIP softmax) zero-shot, patch grounding, dense
    tasks."""

    name = "medsiglip"
    description = ("MedSigLIP (SigLIP 400M + 400M, 448²) from its Hugging Face folder: embeddings, sigmoid "
                   "zero-shot (zero_shot_rule=softmax: CLIP's), patch grounding; frozen ViT + Feature2Pyramid for "
                   "dense tasks")
    card = ModelCard(
        paper="Sellergren et al., MedGemma Technical Report, arXiv 2507.05201 (2025), MedSigLIP section; SigLIP: "
              "Zhai et al., Sigmoid Loss for Language Image Pre-Training, ICCV 2023",
        repository="github.com/google-health/medsiglip; huggingface.co/google/medsiglip-448 (transformers "
                   "SiglipModel)",
        checkpoints=("the Hugging Face folder google/medsiglip-448 (gated: accept the Health AI Developer "
                     "Foundations terms; config.json, model.safetensors, preprocessor_config.json, tokenizer "
                     "files)",),
        pretraining_data=("mimic_cxr",),
        notes=("the model card names its chest X-ray training data only as de-identified chest X-rays with "
               "reports, besides dermatology, ophthalmology, pathology and CT/MRI slices and natural images: "
               "MIMIC-CXR is flagged as its likely public chest X-ray source, overlap with other test sets is "
               "unknown",
               "zero-shot scores are SigLIP's sigmoid probabilities of the positive prompt alone; "
               "zero_shot_rule=softmax scores by CLIP's positive / negative prompt softmax instead",
               "14-pixel patches: dense-task inputs must be multiples of 112 px (e.g. 224)",
               "CheXagent's XraySigLIP__vit-b-16-siglip-512__webli and XraySigLIP__vit-l-16-siglip-384__webli "
               "(huggingface.co/StanfordAIMI, CC-BY-NC-4.0; SigLIP loss) are SiglipModel folders and load here; the "
               "XrayCLIP__vit-b-16-siglip-512__webli and XrayCLIP__vit-l-16-siglip-384__webli folders load too, but "
               "were trained with CLIP's softmax loss: score them with --model-option zero_shot_rule=softmax"),
    )
    capabilities = frozenset({"features", EMBED_IMAGE, EMBED_TEXT, DENSE_EMBED})
    image_size = MEDSIGLIP_SIZE
    mean = MEDSIGLIP_MEAN
    std = MEDSIGLIP_STD
    encoder_name = "vit+feature2pyramid"
    pool_description = POOL
    checkpoint_forms = (
        "Hugging Face SiglipModel folder (config.json: model_type siglip; preprocessor_config.json; "
        "model.safetensors or pytorch_model.bin; tokenizer files for the text side)",
    )
    capability_hints = {EMBED_TEXT: "the checkpoint folder's tokenizer files give the text side"}
    default_options = {"zero_shot_rule": "sigmoid"}
    procedures = {
        "zero_shot": ZERO_SHOT_PROCEDURES["sigmoid"],
        "grounding": "cosine similarity of the text embedding with each patch token after post_layernorm passed "
                     "through the attention-pooling head alone (value and output projections, LayerNorm-MLP "
                     "residual: MaskCLIP's value-embedding reading, Zhou et al. ECCV 2022); MedSigLIP publishes no "
                     "grounding procedure",
        "linear": "the attention-pooling head's output (pooler_output), the embedding the MedSigLIP model card "
                  "trains data-efficient classifiers on",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load the folder strictly (see ``Adapter``), build the model from it and read its tokenizer.

        Raises:
            ConfigError: an unknown option or ``zero_shot_rule`` value, or no checkpoint.
            CheckpointError: as ``Adapter``; also a folder that is not a ``siglip`` one, a vision tower without
                its attention-pooling head, or an image processor whose size or settings the model or vlpbench's
                preprocess cannot take (field named).
        """
        super().__init__(checkpoint, **options)
        self.procedures = {**self.procedures, "zero_shot": ZERO_SHOT_PROCEDURES[self.options["zero_shot_rule"]]}
        extra = self._extra_state
        self.config, self.contract, self._files = extra["config"], extra["contract"], extra["files"]
        self.image_size, self.mean, self.std = self.contract.image_size, self.contract.mean, self.contract.std
        vision = self.config.vision_config
        if self.image_size != vision.image_size:
            raise CheckpointError(f"{self.checkpoint_path}: the image processor resizes to {self.image_size}², but "
                                  f"the position embedding is for vision_config.image_size {vision.image_size}")
        self.context_length = self.config.text_config.max_position_embeddings
        from transformers import SiglipModel

        self.model = materialize(lambda: SiglipModel(self.config), self._encoder_state, share=True)
        self.model.eval().requires_grad_(False)
        self._tokenizer = self._read_tokenizer(extra["folder"])

    def _read_tokenizer(self, folder: Path) -> Any:
        """The folder's tokenizer, or None (and no text side, the reason kept for the capability message)."""
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            reason = f"{folder} holds none of the tokenizer files {', '.join(TOKENIZER_FILES)}"
        else:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            # ImportError: transformers' SentencePiece SiglipTokenizer without the sentencepiece package
            except (OSError, ValueError, ImportError) as e:
                reason = f"no tokenizer can be loaded from the checkpoint folder {folder}: {e}"
            else:
                self._text_encoder_record = text_encoder_record(folder, TOKENIZER_FILES)
                return tokenizer
        self.capabilities = self.capabilities - {EMBED_TEXT}
        self.capability_hints = {**self.capability_hints, EMBED_TEXT: reason}
        return None

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Account every key against ``SiglipModel(config)`` of the folder's config, under the file's names.

        Raises:
            CheckpointError: ``checkpoint`` is not a folder read by ``_read`` or its weights are not a dict.
        """
        if not isinstance(checkpoint, HfFolder):
            raise CheckpointError("adapter 'medsiglip' reads a Hugging Face SiglipModel folder; pass its path")
        from transformers import SiglipModel

        with torch.device("meta"):
            expected = state_specs(SiglipModel(checkpoint.config))
        report = LoadReport(f"siglip-hf ({checkpoint.weights_file})")
        state, prefix = unwrap_state_dict(checkpoint.state, report, what="a SigLIP checkpoint")
        encoder = match_keys(state, expected, report, source_prefix=prefix)
        return Weights(report, encoder, extra={"config": checkpoint.config, "contract": checkpoint.contract,
                                               "files": checkpoint.files_record(), "folder": checkpoint.folder})

    def encoder(self) -> SiglipVisionEncoder:
        """A new :class:`SiglipVisionEncoder` holding the vision tower (the neck new)."""
        from transformers import SiglipModel

        vision = {k[len(VISION):]: v for k, v in self._encoder_state.items() if k.startswith(VISION)}
        tower = materialize(lambda: SiglipModel(self.config).vision_model, vision)
        return SiglipVisionEncoder(tower, self.config.vision_config)

    def describe(self) -> dict[str, Any]:
        """``Adapter.describe`` plus the architecture, the input contract, the folder's configuration files, the
        context length, the pyramid and the pooling."""
        v, t = self.config.vision_config, self.config.text_config
        return {**super().describe(),
                "architecture": {"vision": {"hidden_size": v.hidden_size, "num_hidden_layers": v.num_hidden_layers,
                                            "patch_size": v.patch_size, "image_size": v.image_size},
                                 "text": {"hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
                                          "vocab_size": t.vocab_size}},
                "input_contract": asdict(self.contract), "configuration": self._files,
                "context_length": self.context_length,
                "pyramid": pyramid_name(default_out_indices(v.num_hidden_layers), v.patch_size),
                "pool": self.pool_description}

    # --- embeddings ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, hidden)``, L2-normalised: the attention-pooling head's output.

        Raises:
            ConfigError: the images are not ``(B, 3, image_size, image_size)``.
        """
        return F.normalize(self._vision(images).pooler_output, dim=-1)

    @torch.no_grad()
    def dense_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``(B, hidden, grid, grid)``, L2-normalised over the embedding: each patch token after
        ``post_layernorm`` through the attention-pooling head on its own (``procedures["grounding"]``)."""
        tokens = self._vision(images).last_hidden_state
        b, n, d = tokens.shape
        grid = self.image_size // self.config.vision_config.patch_size
        pooled = self.model.vision_model.head(tokens.reshape(b * n, 1, d))  # one key: all the attention on it
        return F.normalize(pooled.view(b, grid, grid, d).permute(0, 3, 1, 2), dim=1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings ``(B, hidden)``, L2-normalised: the text tower's ``pooler_output`` for the folder's
        tokenisation padded (and truncated) to the context length, with whatever mask the tokenizer returns.

        Raises:
            CapabilityError: the folder's tokenizer could not be read.
            ConfigError: ``texts`` is not a non-empty list of strings.
        """
        self.require(EMBED_TEXT)
        if isinstance(texts, str) or not texts:
            raise ConfigError(f"embed_text takes a non-empty list of strings, got {texts!r}")
        tokens = self._tokenizer(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                                 return_tensors="pt")
        device = self.model.logit_scale.device
        inputs = {k: tokens[k].to(device) for k in ("input_ids", "attention_mask") if k in tokens}
        return F.normalize(self.model.text_model(**inputs).pooler_output, dim=-1)

    @torch.no_grad()
    def zero_shot_scores(self, images: torch.Tensor, classes: Sequence[str],
                         templates: tuple[str, str] = ("{}", "no {}")) -> torch.Tensor:
        """Zero-shot scores ``(B, len(classes))`` by ``zero_shot_rule`` (``procedures["zero_shot"]``): ``sigmoid``,
        ``sigmoid(logit_scale.exp() * cos + logit_bias)`` of each image with each class's positive prompt (the
        negative template checked, not used); ``softmax``, :func:`~vlpbench.adapters.clip.pair_softmax` of the
        positive and negative prompt.

        Raises:
            CapabilityError: the folder's tokenizer could not be read.
            ConfigError: ``templates`` is not a pair of strings with one ``{}`` each, or no classes.
        """
        self.require(EMBED_TEXT)
        check_zero_shot_arguments(list(classes), templates)
        image = self.embed_image(images)
        if self.options["zero_shot_rule"] == "softmax":
            return pair_softmax(image, self.embed_text, list(classes), templates, self.model.logit_scale)
        text = self.embed_text([templates[0].format(c) for c in classes]).to(image.device)
        logits = image @ text.T * self.model.logit_scale.exp() + self.model.logit_bias
        return torch.sigmoid(logits)

    def _vision(self, images: torch.Tensor) -> Any:
        """The vision tower's output for preprocessed images at the contract size, on their device."""
        size = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ConfigError(f"adapter 'medsiglip' embeds images (B, 3, {size}, {size}), its pre-training size; "
                              f"got {tuple(images.shape)}")
        self.model.to(images.device)
        return self.model.vision_model(pixel_values=images.float())

    @classmethod
    def _resolve_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``Adapter._resolve_options``, also checking ``zero_shot_rule`` (before anything is loaded).

        Raises:
            ConfigError: an unknown option, or a ``zero_shot_rule`` not in ``ZERO_SHOT_PROCEDURES``.
        """
        resolved = super()._resolve_options(options)
        if resolved["zero_shot_rule"] not in ZERO_SHOT_PROCEDURES:
            raise ConfigError(f"adapter {cls.name!r}: option zero_shot_rule={resolved['zero_shot_rule']!r} is not one "
                              f"of {', '.join(ZERO_SHOT_PROCEDURES)}")
        return resolved

    @classmethod
    def _read(cls, checkpoint: str | Path | None) -> tuple[Any, str | None, str | None]:
        """The folder, read by :func:`read_hf_folder`; a vision tower without its pooling head is refused."""
        from transformers import SiglipConfig

        if checkpoint is None:
            raise ConfigError("adapter 'medsiglip' needs a checkpoint: the google/medsiglip-448 folder")
        folder, path, sha256 = read_hf_folder(Path(checkpoint), "siglip", SiglipConfig, cls.name)
        if not getattr(folder.config.vision_config, "vision_use_head", True):
            raise CheckpointError(f"{folder.folder}/config.json: vision_config.vision_use_head is false; the "
                                  "image embedding is the attention-pooling head's output")
        return folder, path, sha256
