"""ConVIRT (Zhang et al., MLHC 2022) as re-trained on MIMIC-CXR by BenchX: ResNet-50, global embeddings.

The ConVIRT authors publish no weights. BenchX (yangzhou12/BenchX) re-trained ConVIRT with its ViLMedic-derived
code and publishes ``ConVIRT.pth`` on Hugging Face (``youngzhou12/ConVIRT``); every number from this adapter is
from BenchX's weights, not the ConVIRT authors'. The file is BenchX's trainer checkpoint (the trainer saves
``{"model", "training_scheduler", "optimizer", "config", "scaler"}``, unifier/executors/trainer.py:210-220;
the published file may hold ``model`` alone); ``model`` is the state dict of ``unifier/models/vilmedic/ConVIRT.py``:

- ``visual.model.*``: ``VisualEncoder(backbone=resnet50)``: torchvision's ResNet-50 children up to ``layer4``
  plus ``avgpool`` as an ``nn.Sequential`` (unifier/blocks/vision/visual_encoder.py:103-124). BenchX names the
  children by default (``named_children`` True, visual_encoder.py:104; its ConVIRT config does not change it,
  configs/_base_/models/convirt.yml), so the keys are torchvision's: ``visual.model.conv1.weight``,
  ``visual.model.layer4.2.bn3.running_var`` (318 keys, no ``fc``). BenchX's own segmentation converter reads
  them that way (preprocess/model_converters/medvlm2mmseg.py:293, 321-322: the prefix stripped, no renaming,
  unlike MedKLIP's numbered children, :184-209). ViLMedic's unnamed ``nn.Sequential(*children)`` numbering
  (``visual.model.0.weight`` = conv1, ``1`` = bn1, ``4``-``7`` = layer1-4) is accepted too; the layout says which.
- ``vis_proj.{0,2}``: Linear 2048→768, ReLU, Linear 768→768 (ConVIRT.py:62-66; widths from BenchX's config,
  convirt.yml:16-21). Mapped: ``embed_image``.
- ``linguistic.encoder.*``: the text encoder, ``EncoderModel`` around a Hugging Face ``AutoModel`` BERT with
  pooler (unifier/blocks/huggingface/encoder/encoder_model.py:23-32), and ``lin_proj.{0,2}``: Linear
  hidden→768, ReLU, Linear 768→768 over its ``pooler_output`` (ConVIRT.py:67-71, 117-118). Mapped with option
  ``text_encoder`` (a local folder with the BERT's config and tokenizer): ``embed_text``; ignored otherwise.
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
    loaded_eval,
    match_keys,
    resnet50_encoder_shapes,
    split_prefix,
    unwrap_state_dict,
)
from vlpbench.adapters.parts import match_head, strip
from vlpbench.adapters.text import TEXT_ENCODER_HINT, bert_config, build_bert, match_bert, open_text_folder

IMAGE_PREFIX = "visual.model."
VIS_PROJ, LIN_PROJ = "vis_proj.", "lin_proj."
TEXT_PREFIX = "linguistic.encoder."
VISUAL_WIDTH, PROJECTION_DIM = 2048, 768
TEXT_SIDE_REASON = ("ConVIRT's text side (linguistic.encoder: BERT; lin_proj: its projection): mapped only with "
                    "option text_encoder=DIR (a local BERT folder: config and tokenizer)")
# ViLMedic's nn.Sequential(*children) numbering of torchvision's ResNet-50 children (relu, maxpool, avgpool
# hold no weights).
NUMBERED_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_NAMED_TO_NUMBER = {name: number for number, name in NUMBERED_CHILDREN.items()}
# BenchX's zero-shot tokenisation: truncation at 97 tokens (bin/test_zeroshot.py:44-54).
_TEXT_MAX_LENGTH = 97


def projection(in_dim: int) -> nn.Sequential:
    """ConVIRT's projection head (``vis_proj`` / ``lin_proj``): Linear in_dim→768, ReLU, Linear 768→768."""
    return nn.Sequential(nn.Linear(in_dim, PROJECTION_DIM), nn.ReLU(), nn.Linear(PROJECTION_DIM, PROJECTION_DIM))


class ConVIRTAdapter(Adapter):
    """BenchX's re-trained ConVIRT ResNet-50 with its 768-d image (and, with ``text_encoder``, text) embeddings.

    Input contract: BenchX's standard pre-training transforms (unifier/datasets/transforms.py:25-44): 224×224
    (resize 256, random crop 224), ImageNet mean/std. BenchX's ConVIRT pre-training config itself is not in its
    repository (builder.py:7 names config/templates/pretrain/convirt-mimic_resnet50.yml).
    """

    name = "convirt"
    card = ModelCard(
        paper="Zhang et al., Contrastive Learning of Medical Visual Representations from Paired Images and Text, "
              "MLHC 2022; weights: BenchX re-training (Zhou et al., BenchX, NeurIPS 2024 Datasets and Benchmarks)",
        repository="github.com/yangzhou12/BenchX (unifier/models/vilmedic/ConVIRT.py, "
                   "unifier/blocks/vision/visual_encoder.py); ConVIRT's own code: github.com/edreisMD/ConVIRT-pytorch",
        checkpoints=("ConVIRT.pth — Hugging Face youngzhou12/ConVIRT (BenchX's re-training on MIMIC-CXR)",),
        pretraining_data=("mimic_cxr",),
        notes=("BenchX's weights, not the ConVIRT authors': the authors released none",
               "the text side needs the BERT folder BenchX trained with (config and tokenizer); its pre-training "
               "config is not published, so check the vocabulary size against linguistic.encoder's embeddings"),
    )
    description = ("ConVIRT ResNet-50, BenchX's re-training (HF youngzhou12/ConVIRT ConVIRT.pth); 768-d "
                   "embeddings, text side with text_encoder=DIR")
    capabilities = frozenset({"features", EMBED_IMAGE, EMBED_TEXT})
    default_options = {"text_encoder": ""}
    checkpoint_forms = (
        "BenchX ConVIRT.pth ({'model': ...} plus any trainer entries): visual.model.* (torchvision ResNet-50, "
        "named or ViLMedic-numbered children, 318 keys), vis_proj (embed_image); linguistic.encoder.* and "
        "lin_proj with --model-option text_encoder=DIR",
    )
    capability_hints = {
        EMBED_TEXT: f"zero-shot needs a text encoder: pass --model-option text_encoder=DIR ({TEXT_ENCODER_HINT})",
    }
    procedures = {
        ZERO_SHOT: "embed_image = vis_proj(avgpool(layer4)), embed_text = lin_proj(BERT pooler_output), both "
                   "L2-normalised (BenchX unifier/models/vilmedic/ConVIRT.py:112-121); each class scored by "
                   "vlpbench's default, the softmax over the cosines with the positive and negative prompt "
                   "(CheXzero). BenchX itself takes the cosine, max over a class's prompts, standardised over "
                   "images (unifier/blocks/zeroshot/zeroshot_model.py:44-49, 72-92)",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``) and build the heads it carries.

        Raises:
            ConfigError: also when ``text_encoder`` is not a readable BERT folder (config or tokenizer).
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        self._bert = self._lin_proj = self._tokenizer = self._text_encoder_record = None
        # The random init of the modules below is overwritten at once; keep it off the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            self._vis_proj = loaded_eval(projection(VISUAL_WIDTH), extra["vis_proj"])
            if "text_model" in extra:
                config = extra["text_config"]
                self._bert = build_bert(config, extra["text_model"], pooler=True)
                self._lin_proj = loaded_eval(projection(config.hidden_size), extra["lin_proj"])
                self._tokenizer, self._text_encoder_record = open_text_folder(self.options["text_encoder"], self.name)
            else:
                self.capabilities = self.capabilities - {EMBED_TEXT}
        self._image_encoder: nn.Module | None = None

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Map the ResNet-50, ``vis_proj`` and (with ``text_encoder``) the text side (module docstring).

        Raises:
            CheckpointError: the file is not a dict of tensors.
            ConfigError: ``text_encoder`` is not a local BERT folder with a config.json.
        """
        report = LoadReport("convirt-benchx")
        state, prefix = unwrap_state_dict(checkpoint, report, containers=("model",), what="a ConVIRT checkpoint")
        extra: dict[str, Any] = {}
        text_side, state = split_prefix(state, TEXT_PREFIX, LIN_PROJ)
        if options["text_encoder"]:
            config = bert_config(options["text_encoder"], cls.name)
            extra["text_model"] = match_bert(strip(text_side, TEXT_PREFIX), report, config,
                                             source_prefix=prefix + TEXT_PREFIX, target_prefix="text_model.")
            extra["lin_proj"] = match_head(text_side, LIN_PROJ, lambda: projection(config.hidden_size), report,
                                           source_prefix=prefix)
            extra["text_config"] = config
        else:
            report.ignore(TEXT_SIDE_REASON, [prefix + k for k in text_side])
        heads, state = split_prefix(state, VIS_PROJ)
        extra["vis_proj"] = match_head(heads, VIS_PROJ, lambda: projection(VISUAL_WIDTH), report,
                                       source_prefix=prefix)
        image, rest = split_prefix(state, IMAGE_PREFIX)
        report.unexpected += [f"{prefix}{k}" for k in rest]
        encoder = _match_image_encoder(strip(image, IMAGE_PREFIX), report, prefix + IMAGE_PREFIX)
        return Weights(report, encoder, extra=extra)

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """768-d image embeddings: ``vis_proj`` over the average-pooled layer4 feature, L2-normalised."""
        if self._image_encoder is None:
            self._image_encoder = self.encoder().eval()
        pooled = self._image_encoder.to(images.device)(images)[-1].mean(dim=(2, 3))
        return nn.functional.normalize(self._vis_proj.to(images.device)(pooled), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """768-d text embeddings: ``lin_proj`` over the BERT's ``pooler_output``, L2-normalised.

        Tokenised with truncation at 97 tokens as BenchX's zero-shot code does; input ids and attention mask only.

        Raises:
            CapabilityError: no ``text_encoder`` was given.
        """
        self.require(EMBED_TEXT)
        batch = self._tokenizer(list(texts), padding="longest", truncation=True, max_length=_TEXT_MAX_LENGTH,
                                return_tensors="pt")
        pooled = self._bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        return nn.functional.normalize(self._lin_proj(pooled), dim=-1)


def _match_image_encoder(part: Mapping[str, Any], report: LoadReport, source_prefix: str) -> dict[str, torch.Tensor]:
    """Account ``part`` (the keys under ``visual.model.``) against the ResNet-50 encoder.

    Named children are matched as they are; ViLMedic's numbered children are matched under their numbers (so that
    the report names the file's keys) and returned under torchvision's names.
    """
    expected = resnet50_encoder_shapes()
    if not any(isinstance(k, str) and k.split(".", 1)[0].isdigit() for k in part):
        return match_keys(part, expected, report, source_prefix=source_prefix, target_prefix="encoder.")
    report.layout += " (numbered children: 0 = conv1, 1 = bn1, 4-7 = layer1-4)"
    numbered = {_renamed(k, _NAMED_TO_NUMBER): shape for k, shape in expected.items()}
    first = len(report.mapped)
    matched = match_keys(part, numbered, report, source_prefix=source_prefix)
    report.mapped[first:] = [(source, "encoder." + _renamed(target, NUMBERED_CHILDREN))
                             for source, target in report.mapped[first:]]
    return {_renamed(k, NUMBERED_CHILDREN): v for k, v in matched.items()}


def _renamed(key: str, names: Mapping[str, str]) -> str:
    """``key`` with its first dotted part replaced through ``names`` (unchanged when not in it)."""
    head, _, tail = key.partition(".")
    return f"{names.get(head, head)}.{tail}"
