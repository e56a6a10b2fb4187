"""MedCLIP (EMNLP 2022): ResNet-50 or Swin-T image encoder, Bio_ClinicalBERT text encoder, 512-d embeddings.

MedCLIP publishes two zips (``medclip-pretrained.zip``, ``medclip-vit-pretrained.zip``; their URLs are in
``medclip/medclip_resnet_weight.txt`` and ``medclip_vit_weight.txt``), each holding ``pytorch_model.bin``: the
plain ``state_dict()`` of ``MedCLIPModel``, which ``MedCLIPModel.from_pretrained`` loads strictly
(RyanWangZf/MedCLIP ``medclip/modeling_medclip.py:184-185``). The variant is told apart by the keys:

- ResNet-50 (``MedCLIPVisionModel``, ``modeling_medclip.py:45-53``): ``vision_model.model.*`` is a torchvision
  ResNet-50 whose ``fc`` is ``Linear(2048, 512, bias=False)``, the image projection (318 encoder keys +
  ``fc.weight``).
- ViT (``MedCLIPVisionModelViT``, ``:84-95``): ``vision_model.model.*`` is a transformers ``SwinModel``
  (``microsoft/swin-tiny-patch4-window7-224``, ``constants.py:5``; converted by ``vlpbench.adapters.swin``) and
  ``vision_model.projection_head.weight`` (512, 768) projects its ``pooler_output`` (``:118-127``).
- Both: ``text_model.model.*`` (Bio_ClinicalBERT ``AutoModel``, pooler included, ``:23``),
  ``text_model.projection_head.weight`` (512, 768, no bias, ``:26``) and ``logit_scale`` (``:144``). The text
  side is mapped with ``--model-option text_encoder=DIR`` (a local Bio_ClinicalBERT folder: config and
  tokenizer), else ignored with a reason.

Input contract (``constants.py:7-9``, ``dataset.py:176-181``): 224², grey normalised with mean 0.5862785803043838
and std 0.27950088968644304, repeated to 3 channels (``modeling_medclip.py:80``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    EMBED_IMAGE,
    EMBED_TEXT,
    ZERO_SHOT,
    Adapter,
    LoadReport,
    ModelCard,
    Weights,
    check_zero_shot_arguments,
    match_keys,
    match_resnet50_encoder,
    split_prefix,
    unwrap_state_dict,
)
from vlpbench.adapters.parts import linear, strip
from vlpbench.adapters.swin import SWIN_ENCODER_NAME, build_swin_encoder, final_norm, match_hf_swin, swin_tokens
from vlpbench.adapters.text import TEXT_ENCODER_HINT, bert_config, build_bert, match_bert, open_text_folder
from vlpbench.errors import ConfigError

MEDCLIP_MEAN, MEDCLIP_STD = 0.5862785803043838, 0.27950088968644304
EMBED_DIM = 512  # MedCLIPTextModel proj_dim and the vision projections (modeling_medclip.py:18, :53, :95)
RESNET_FEATURES = 2048
# MedCLIPModel.compute_logits clamps the log-scale to [0, ln 100] before use (modeling_medclip.py:229).
LOGIT_SCALE_MAX = 4.6052
# prompts.py:110 / dataset.py:153: the tokenizer's model_max_length is set to 77, with truncation.
TEXT_MAX_LENGTH = 77
# MedCLIPTextModel.forward averages the hidden states of BERT layers 1, 2 and the last (modeling_medclip.py:36).
TEXT_LAYERS = (1, 2, -1)

VISION, TEXT = "vision_model.", "text_model."
VISION_MODEL, VISION_HEAD = "vision_model.model.", "vision_model.projection_head."
TEXT_MODEL, TEXT_HEAD = "text_model.model.", "text_model.projection_head."
LOGIT_SCALE = "logit_scale"
TEXT_SIDE_REASON = ("MedCLIP's text side (Bio_ClinicalBERT and its projection head): mapped only with option "
                    "text_encoder=DIR (a local Bio_ClinicalBERT folder: config and tokenizer)")


class MedCLIPAdapter(Adapter):
    """MedCLIP's image encoder (ResNet-50 or Swin-T, from the keys), its 512-d embeddings and zero-shot scores."""

    name = "medclip"
    card = ModelCard(
        paper="Wang et al., MedCLIP: Contrastive Learning from Unpaired Medical Images and Text, EMNLP 2022",
        repository="github.com/RyanWangZf/MedCLIP (medclip/modeling_medclip.py, medclip/constants.py)",
        checkpoints=("medclip-pretrained.zip (ResNet-50) and medclip-vit-pretrained.zip (Swin-T), each holding "
                     "pytorch_model.bin — URLs in medclip/medclip_resnet_weight.txt and medclip_vit_weight.txt",),
        pretraining_data=("chexpert", "mimic_cxr"),
        notes=("images and reports decoupled: trained on CheXpert and MIMIC-CXR images with sentence labels, "
               "so image-text pairs were not needed",
               "the ViT variant is a Swin-T (HF SwinModel), run through timm's Swin in vlpbench; identical "
               "outputs at 224 px"),
    )
    description = ("MedCLIP (EMNLP 2022) ResNet-50 or Swin-T: pytorch_model.bin of the published zips; 512-d "
                   "embeddings, text side with text_encoder=DIR")
    capabilities = frozenset({"features", EMBED_IMAGE, EMBED_TEXT})
    mean = (MEDCLIP_MEAN,) * 3
    std = (MEDCLIP_STD,) * 3
    default_options = {"text_encoder": ""}
    checkpoint_forms = (
        "MedCLIP-ResNet pytorch_model.bin (plain MedCLIPModel state dict: vision_model.model.* torchvision "
        "ResNet-50 with fc Linear(2048, 512, no bias), 319 keys; text_model.*, logit_scale)",
        "MedCLIP-ViT pytorch_model.bin (vision_model.model.* HF SwinModel swin-tiny, 219 weights + 12 "
        "relative_position_index buffers; vision_model.projection_head (512, 768); text_model.*, logit_scale)",
        "text_model.model.* (Bio_ClinicalBERT) and text_model.projection_head mapped with --model-option "
        "text_encoder=DIR, else ignored",
    )
    capability_hints = {EMBED_TEXT: f"pass --model-option text_encoder=DIR ({TEXT_ENCODER_HINT})"}
    procedures = {
        "zero_shot": (
            "MedCLIP PromptClassifier (RyanWangZf/MedCLIP medclip/modeling_medclip.py:242-280): each prompt's "
            "logit is logit_scale.exp() (clamped to [0, 4.6052], :228-232) times the cosine of the normalised "
            "embeddings; the positive and negative prompt of a class compete as two classes, scored by the "
            "softmax of their logits (the ranking of MedCLIP's two-output argmax, evaluator.py:72-75). Text "
            "embedding: mean over tokens of BERT layers 1, 2 and last (:36-37) of each prompt tokenised alone "
            "(max 77 tokens, prompts.py:110-113), then projection_head"
        ),
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``) and build the heads and, with ``text_encoder``, the text side.

        Raises:
            ConfigError: also when ``text_encoder`` is not a readable BERT folder (config or tokenizer).
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        self.arch = extra.get("arch")
        if self.arch is not None:
            self.encoder_name = SWIN_ENCODER_NAME
        self._bert = self._tokenizer = self._text_encoder_record = None
        self._logit_scale = extra[LOGIT_SCALE].clamp(0, LOGIT_SCALE_MAX).exp()
        # The random init of the modules below is overwritten at once; keep it off the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            self._image_head = linear(extra["image_head"])
            self._final_norm = final_norm(self.arch, extra["final_norm"]) if self.arch is not None else None
            if "text_model" in extra:
                self._bert = build_bert(extra["text_config"], extra["text_model"], pooler=True)
                self._text_head = linear(extra["text_head"])
                self._tokenizer, self._text_encoder_record = open_text_folder(self.options["text_encoder"], self.name)
        if self._bert is None:
            self.capabilities = self.capabilities - {EMBED_TEXT}
        self._image_encoder: nn.Module | None = None

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Account the vision model (ResNet-50 or SwinModel, by its keys), heads, ``logit_scale`` and text side.

        Raises:
            CheckpointError: the file is not a dict of tensors.
            ConfigError: ``text_encoder`` is not a local BERT folder with a config.json.
        """
        report = LoadReport("medclip")
        state, prefix = unwrap_state_dict(checkpoint, report, what="a MedCLIP pytorch_model.bin")
        vision, rest = split_prefix(state, VISION)
        text, rest = split_prefix(rest, TEXT)
        scale, rest = split_prefix(rest, LOGIT_SCALE)
        report.unexpected += [f"{prefix}{k}" for k in rest]
        extra: dict[str, Any] = dict(match_keys(scale, {LOGIT_SCALE: ()}, report, source_prefix=prefix))

        model, rest = split_prefix(vision, VISION_MODEL)
        head, rest = split_prefix(rest, VISION_HEAD)
        report.unexpected += [f"{prefix}{k}" for k in rest]
        model = strip(model, VISION_MODEL)
        if any(k.startswith(("embeddings.", "encoder.")) for k in model):  # SwinModel (MedCLIPVisionModelViT)
            arch, encoder, norm = match_hf_swin(model, report, source_prefix=prefix + VISION_MODEL)
            width = arch.num_features if arch is not None else 768
            extra.update(arch=arch, final_norm=norm)
            report.layout = report.layout.replace("medclip", "medclip-swin", 1)
            image_head = match_keys(strip(head, VISION_HEAD), {"weight": (EMBED_DIM, width)}, report,
                                    source_prefix=prefix + VISION_HEAD, target_prefix="image_head.")
        else:  # torchvision ResNet-50 whose fc is the projection (MedCLIPVisionModel)
            report.layout = report.layout.replace("medclip", "medclip-resnet50", 1)
            report.unexpected += [f"{prefix}{k}" for k in head]
            fc, body = split_prefix(model, "fc.")
            encoder = match_resnet50_encoder(body, report, source_prefix=prefix + VISION_MODEL)
            image_head = match_keys(strip(fc, "fc."), {"weight": (EMBED_DIM, RESNET_FEATURES)}, report,
                                    source_prefix=prefix + VISION_MODEL + "fc.", target_prefix="image_head.")
        extra["image_head"] = image_head

        if options["text_encoder"]:
            extra.update(_map_text_side(text, options["text_encoder"], report, prefix))
        else:
            report.ignore(TEXT_SIDE_REASON, [prefix + k for k in text])
        return Weights(report, encoder, extra=extra)

    def encoder(self) -> nn.Module:
        """The smp encoder holding the image encoder: ResNet-50, or timm's Swin-T (``vlpbench.adapters.swin``)."""
        if self.arch is None:
            return super().encoder()
        return build_swin_encoder(self.encoder_name, self._encoder_state, self.arch.timm_kwargs())

    def describe(self) -> dict[str, Any]:
        """``Adapter.describe`` plus the variant and the Swin shape."""
        record = {**super().describe(), "variant": "resnet50" if self.arch is None else "swin"}
        if self.arch is not None:
            record["swin"] = self.arch.describe()
        return record

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """512-d image embeddings, L2-normalised, of preprocessed images ``(B, 3, H, W)``.

        ResNet-50: average-pooled layer4 through ``fc`` (``modeling_medclip.py:81``); Swin: the SwinModel's
        ``pooler_output`` (mean of the final-LayerNorm tokens) through ``projection_head`` (``:123-126``).
        """
        if self._image_encoder is None:
            self._image_encoder = self.encoder().eval()
        encoder = self._image_encoder.to(images.device)
        if self.arch is None:
            pooled = encoder(images.float())[-1].mean(dim=(2, 3))
        else:
            pooled = swin_tokens(encoder, self._final_norm.to(images.device), images.float()).mean(dim=(1, 2))
        return nn.functional.normalize(self._image_head.to(images.device)(pooled), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """512-d text embeddings, L2-normalised, as ``MedCLIPTextModel.forward`` (``modeling_medclip.py:28-43``).

        The mean over tokens of the hidden states of BERT layers 1, 2 and the last, averaged over the three, then
        ``projection_head``. MedCLIP averages over every position of its padded batch, pads included, so its
        embedding of a text depends on the batch it is in; here the mean runs over the text's own tokens, which
        is MedCLIP's value for the text tokenised alone (as ``PromptClassifier`` does for a one-prompt class).

        Raises:
            CapabilityError: no ``text_encoder`` was given.
            ConfigError: ``texts`` is not a non-empty list of strings.
        """
        self.require(EMBED_TEXT)
        if isinstance(texts, str) or not texts:
            raise ConfigError(f"embed_text takes a non-empty list of strings, got {texts!r}")
        batch = self._tokenizer(list(texts), truncation=True, max_length=TEXT_MAX_LENGTH, padding=True,
                                return_tensors="pt")
        hidden = self._bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].unsqueeze(-1).float()
        token_means = [(hidden[i] * mask).sum(dim=1) / mask.sum(dim=1) for i in TEXT_LAYERS]
        return nn.functional.normalize(self._text_head(torch.stack(token_means).mean(dim=0)), dim=-1)

    @torch.no_grad()
    def zero_shot_scores(self, images: torch.Tensor, classes: list[str],
                         templates: tuple[str, str] = ("{}", "no {}")) -> torch.Tensor:
        """Probability per image and class, ``(B, len(classes))``: MedCLIP's scaled logits (``procedures``).

        Raises:
            CapabilityError: no ``text_encoder`` was given.
            ConfigError: ``templates`` is not a pair of strings with one ``{}`` each, or no classes.
        """
        self.require(ZERO_SHOT)
        check_zero_shot_arguments(classes, templates)
        image = self.embed_image(images)
        text = self.embed_text([t.format(c) for c in classes for t in templates]).view(len(classes), 2, -1)
        logits = torch.einsum("bd,cpd->bcp", image, text.to(image.device)) * self._logit_scale
        return logits.softmax(dim=-1)[..., 0]


def _map_text_side(text: Mapping[str, Any], text_encoder: str, report: LoadReport, prefix: str) -> dict[str, Any]:
    """Account ``text_model.*`` against a ``BertModel`` (with pooler) of ``text_encoder``'s config and the head."""
    config = bert_config(text_encoder, "medclip")
    model, rest = split_prefix(text, TEXT_MODEL)
    head, rest = split_prefix(rest, TEXT_HEAD)
    report.unexpected += [f"{prefix}{k}" for k in rest]
    return {
        "text_model": match_bert(strip(model, TEXT_MODEL), report, config, source_prefix=prefix + TEXT_MODEL,
                                 target_prefix="text_model."),
        "text_head": match_keys(strip(head, TEXT_HEAD), {"weight": (EMBED_DIM, config.hidden_size)}, report,
                                source_prefix=prefix + TEXT_HEAD, target_prefix="text_head."),
        "text_config": config,
    }


