"""CXR-CLIP (MICCAI 2023): ResNet-50 or Swin-T image encoder, Bio_ClinicalBERT text encoder, 512-d embeddings.

CXR-CLIP publishes six files, ``r50_{m,mc,mcc}.tar`` and ``swint_{m,mc,mcc}.tar`` (links in kakaobrain/cxr-clip
``README.md:30-36``): ``torch.save({"model", "optimizer", "scheduler", "config", "epoch", "train_loss"})``
(``cxrclip/trainer.py:161-170``), ``config`` being the run's Hydra configuration as a plain dict
(``train.py:33``). ``model`` is ``CXRClip.state_dict()`` (``cxrclip/model/clip.py:14-44``):

- ``image_encoder.resnet.*``: torchvision ResNet-50 with ``fc`` deleted and BatchNorm converted to SyncBatchNorm,
  which keeps the key names (``model/modules/image_encoder.py:48-59``; 318 keys), or
  ``image_encoder.image_encoder.*``: a transformers ``SwinModel`` (``microsoft/swin-tiny-patch4-window7-224``,
  ``:7-21``, ``configs/model/clip_swin_clinical.yaml:6``; converted by ``vlpbench.adapters.swin``). The keys
  decide the variant; the config's ``model.image_encoder.name`` is recorded beside it.
- ``text_encoder.text_encoder.*``: Bio_ClinicalBERT ``AutoModel`` with pooler (``model/modules/text_encoder.py:18``).
- ``image_projection.projection`` (512 × 2048 or 768, with bias) and ``text_projection.projection`` (512 × 768):
  ``LinearProjectionHead`` (``model/modules/projection.py:23-29``; ``projection_head.name: linear`` in both
  model configs); ``logit_scale`` (``clip.py:41``).

The text side is mapped with ``--model-option text_encoder=DIR`` (a local Bio_ClinicalBERT folder), else ignored.
The training datasets (``config["data_train"]``: ``mimic_cxr``, ``chexpert``, ``chest14``) name the variant
(m, mc, mcc) and narrow the instance's ``card.pretraining_data``.

Input contract: resize to 224 and center-crop 224 (``configs/transform/default.yaml``); ImageNet mean/std for
the ResNet-50 (``evaluator.py:36-39``), 0.5/0.5 for the Swin (``data/data_utils.py:57-59``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    EMBED_IMAGE,
    EMBED_TEXT,
    Adapter,
    LoadReport,
    ModelCard,
    Weights,
    match_keys,
    match_resnet50_encoder,
    split_prefix,
    unwrap_state_dict,
)
from vlpbench.adapters.parts import linear, strip
from vlpbench.adapters.swin import SWIN_ENCODER_NAME, build_swin_encoder, final_norm, match_hf_swin, swin_tokens
from vlpbench.adapters.text import TEXT_ENCODER_HINT, bert_config, build_bert, match_bert, open_text_folder
from vlpbench.errors import ConfigError

EMBED_DIM = 512  # projection_head.proj_dim in configs/model/clip_{resnet,swin}_clinical.yaml
RESNET_FEATURES = 2048
# configs/train.yaml:21 base.text_max_length; the evaluator tokenises with it (evaluator.py:138-140).
DEFAULT_TEXT_MAX_LENGTH = 256
HF_MEAN = HF_STD = (0.5, 0.5, 0.5)

RESNET, SWIN = "image_encoder.resnet.", "image_encoder.image_encoder."
TEXT_MODEL = "text_encoder.text_encoder."
IMAGE_HEAD, TEXT_HEAD = "image_projection.projection.", "text_projection.projection."
LOGIT_SCALE = "logit_scale"
TRAINING_KEYS = ("optimizer", "scheduler", "epoch", "train_loss")
TRAINING_STATE_REASON = "optimizer and scheduler states, epoch and training loss: training state, not weights"
CONFIG_REASON = ("the run's configuration (plain dict): read for the variant's training datasets, the image "
                 "encoder named and the text length, not weights")
COPY_REASON = "a copy of the model's tensor of the same name (same values), beside 'model'"
TEXT_SIDE_REASON = ("CXR-CLIP's text side (Bio_ClinicalBERT and text_projection): mapped only with option "
                    "text_encoder=DIR (a local Bio_ClinicalBERT folder: config and tokenizer)")
# cxr-clip configs/data_train/*.yaml dataset names -> vlpbench dataset names, in the variant code's order.
DATASETS = {"mimic_cxr": "mimic_cxr", "chexpert": "chexpert", "chest14": "cxr14"}
VARIANTS = {("mimic_cxr",): "m", ("mimic_cxr", "chexpert"): "mc", ("mimic_cxr", "chexpert", "cxr14"): "mcc"}


class CXRClipAdapter(Adapter):
    """CXR-CLIP's image encoder (ResNet-50 or Swin-T, from the keys), its 512-d embeddings and zero-shot scores."""

    name = "cxrclip"
    card = ModelCard(
        paper="You et al., CXR-CLIP: Toward Large Scale Chest X-ray Language-Image Pre-training, MICCAI 2023",
        repository="github.com/kakaobrain/cxr-clip (cxrclip/model/clip.py, cxrclip/model/modules/*.py, "
                   "cxrclip/evaluator.py)",
        checkpoints=("r50_m.tar, r50_mc.tar, r50_mcc.tar, swint_m.tar, swint_mc.tar, swint_mcc.tar — links in "
                     "the repository's README (Pre-trained model checkpoint)",),
        pretraining_data=("mimic_cxr", "chexpert", "cxr14"),
        notes=("the union over variants: m = MIMIC-CXR; mc = + CheXpert; mcc = + CheXpert + ChestX-ray14. A file "
               "whose config names its training datasets narrows the loaded instance's card to them",
               "input: ImageNet mean/std for the ResNet-50, 0.5/0.5 for the Swin-T (set per loaded file)",
               "Swin-T: HF SwinModel run through timm's Swin in vlpbench; identical outputs at 224 px"),
    )
    description = ("CXR-CLIP (MICCAI 2023) ResNet-50 or Swin-T: the published r50_*/swint_*.tar; 512-d "
                   "embeddings, text side with text_encoder=DIR")
    capabilities = frozenset({"features", EMBED_IMAGE, EMBED_TEXT})
    default_options = {"text_encoder": ""}
    checkpoint_forms = (
        "r50_{m,mc,mcc}.tar ({'model', 'optimizer', 'scheduler', 'config', 'epoch', 'train_loss'}; model: "
        "image_encoder.resnet.* torchvision ResNet-50 without fc, 318 keys; image_projection, text_projection, "
        "logit_scale, text_encoder.text_encoder.*)",
        "swint_{m,mc,mcc}.tar (the same with image_encoder.image_encoder.* HF SwinModel swin-tiny, 219 weights "
        "+ 12 relative_position_index buffers)",
        "the 'model' state dict alone, keys optionally prefixed 'module.' or '_orig_mod.'",
    )
    capability_hints = {EMBED_TEXT: f"pass --model-option text_encoder=DIR ({TEXT_ENCODER_HINT})"}
    procedures = {
        "zero_shot": (
            "CXR-CLIP Evaluator.zeroshot_binary (kakaobrain/cxr-clip cxrclip/evaluator.py:208-226): per class, the "
            "softmax over the bare cosine similarities (no logit scale) of the image embedding with the negative "
            "and the positive prompt, read at the positive; CXR-CLIP's prompts are 'No {}' and '{}' (:215), the "
            "task's templates here. Embeddings: encode_image + image_projection and encode_text ('eos' pooling: "
            "the [SEP] token's last hidden state, clip.py:59-62) + text_projection, L2-normalised (:129-146)"
        ),
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``); set the variant's input contract, heads and text side.

        Raises:
            ConfigError: also when ``text_encoder`` is not a readable BERT folder (config or tokenizer).
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        self.arch = extra.get("arch")
        self.variant = extra["variant"]
        if self.arch is not None:
            self.encoder_name = SWIN_ENCODER_NAME
            self.mean, self.std = HF_MEAN, HF_STD
        if self.variant["pretraining_data"]:
            self.card = dataclasses.replace(self.card, pretraining_data=tuple(self.variant["pretraining_data"]))
        self._bert = self._tokenizer = self._text_encoder_record = None
        with torch.random.fork_rng(devices=[]):  # init drawn here is overwritten at once
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
        """Account the container, the image encoder (ResNet-50 or SwinModel, by its keys), heads and text side.

        Raises:
            CheckpointError: the file holds no dict of tensors.
            ConfigError: ``text_encoder`` is not a local BERT folder with a config.json.
        """
        report = LoadReport("cxrclip")
        state, prefix, config = _unpack(checkpoint, report)
        resnet, rest = split_prefix(state, RESNET)
        swin, rest = split_prefix(rest, SWIN)
        text, rest = split_prefix(rest, TEXT_MODEL, TEXT_HEAD)
        image_head, rest = split_prefix(rest, IMAGE_HEAD)
        scale, rest = split_prefix(rest, LOGIT_SCALE)
        report.unexpected += [f"{prefix}{k}" for k in rest]
        extra: dict[str, Any] = dict(match_keys(scale, {LOGIT_SCALE: ()}, report, source_prefix=prefix))

        if swin and not resnet:
            arch, encoder, norm = match_hf_swin(strip(swin, SWIN), report, source_prefix=prefix + SWIN)
            width = arch.num_features if arch is not None else 768
            extra.update(arch=arch, final_norm=norm)
            report.layout = report.layout.replace("cxrclip", "cxrclip-swin", 1)
        else:
            report.unexpected += [f"{prefix}{k}" for k in swin]
            encoder = match_resnet50_encoder(strip(resnet, RESNET), report, source_prefix=prefix + RESNET)
            width = RESNET_FEATURES
            report.layout = report.layout.replace("cxrclip", "cxrclip-resnet50", 1)
        extra["image_head"] = match_keys(strip(image_head, IMAGE_HEAD), {"weight": (EMBED_DIM, width),
                                                                          "bias": (EMBED_DIM,)},
                                         report, source_prefix=prefix + IMAGE_HEAD, target_prefix="image_head.")
        extra["variant"] = _variant(config, "swin" if "arch" in extra else "resnet50")

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
        """``Adapter.describe`` plus the variant (from keys and config), and the Swin shape."""
        record = {**super().describe(), "variant": dict(self.variant)}
        if self.arch is not None:
            record["swin"] = self.arch.describe()
        return record

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """512-d image embeddings, L2-normalised, of preprocessed images ``(B, 3, H, W)``.

        ResNet-50: average-pooled layer4 (``image_encoder.py:61-77``); Swin: the first token of the SwinModel's
        ``last_hidden_state`` (``clip.py:49-54``: its "[CLS]" for ViTs, for a Swin the top-left patch of the last
        stage after the final LayerNorm); then ``image_projection``.
        """
        if self._image_encoder is None:
            self._image_encoder = self.encoder().eval()
        encoder = self._image_encoder.to(images.device)
        if self.arch is None:
            pooled = encoder(images.float())[-1].mean(dim=(2, 3))
        else:
            pooled = swin_tokens(encoder, self._final_norm.to(images.device), images.float())[:, 0, 0]
        return nn.functional.normalize(self._image_head.to(images.device)(pooled), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """512-d text embeddings, L2-normalised: the last hidden state of each text's [SEP] token (``eos`` pooling,
        ``clip.py:59-62``) through ``text_projection``; padded to the longest, truncated at the config's
        ``text_max_length`` (256 by default), as ``Evaluator.encode_text`` tokenises (``evaluator.py:136-146``).

        Raises:
            CapabilityError: no ``text_encoder`` was given.
            ConfigError: ``texts`` is not a non-empty list of strings.
        """
        self.require(EMBED_TEXT)
        if isinstance(texts, str) or not texts:
            raise ConfigError(f"embed_text takes a non-empty list of strings, got {texts!r}")
        batch = self._tokenizer(list(texts), padding="longest", truncation=True, return_tensors="pt",
                                max_length=self.variant["text_max_length"])
        hidden = self._bert(**batch).last_hidden_state
        eos = batch["attention_mask"].sum(dim=-1) - 1
        return nn.functional.normalize(self._text_head(hidden[torch.arange(len(hidden)), eos]), dim=-1)


def _unpack(checkpoint: Any, report: LoadReport) -> tuple[dict[str, Any], str, Mapping[str, Any] | None]:
    """``(model state dict, stripped prefix, config or None)`` of a CXR-CLIP ``.tar`` or a bare state dict.

    Every entry beside ``model`` is accounted: training state and ``config`` are ignored with their reasons;
    ``image_encoder`` / ``text_encoder`` dicts beside it (as some trainers save the towers separately) must be
    copies of the model's tensors under those prefixes, each ignored as such, else unexpected (``name/key``).
    """
    if not (isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping)):
        state, prefix = unwrap_state_dict(checkpoint, report, what="a CXR-CLIP checkpoint")
        return state, prefix, None
    state, prefix = unwrap_state_dict(checkpoint["model"], report, containers=(), what="a CXR-CLIP 'model' entry")
    report.layout = report.layout.replace("cxrclip", "cxrclip (unwrapped 'model')", 1)
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), Mapping) else None
    for key, value in checkpoint.items():
        if key == "model":
            continue
        if key in TRAINING_KEYS:
            report.ignore(TRAINING_STATE_REASON, [key])
        elif key == "config" and config is not None:
            report.ignore(CONFIG_REASON, [key])
        elif key in ("image_encoder", "text_encoder") and isinstance(value, Mapping):
            for name, tensor in value.items():
                twin = state.get(f"{key}.{name}")
                copy = isinstance(tensor, torch.Tensor) and isinstance(twin, torch.Tensor) and \
                    tensor.shape == twin.shape and torch.equal(tensor, twin)
                if copy:
                    report.ignore(COPY_REASON, [f"{key}/{name}"])
                else:
                    report.unexpected.append(f"{key}/{name}")
        else:
            report.unexpected.append(str(key))
    return state, prefix, config


def _variant(config: Mapping[str, Any] | None, image_encoder: str) -> dict[str, Any]:
    """The variant: image encoder (from the keys), the config's image encoder name, training datasets and code."""
    model = config.get("model") if config else None
    named = model.get("image_encoder", {}).get("name") if isinstance(model, Mapping) else None
    data = config.get("data_train") if config else None
    datasets = [DATASETS.get(str(k), str(k)) for k in data] if isinstance(data, Mapping) else []
    base = config.get("base") if config else None
    length = base.get("text_max_length") if isinstance(base, Mapping) else None
    return {
        "image_encoder": image_encoder,
        "config_image_encoder": named,
        "training_datasets": datasets,
        "code": VARIANTS.get(tuple(d for d in DATASETS.values() if d in datasets)) if datasets else None,
        "pretraining_data": [d for d in datasets if d in DATASETS.values()],
        "text_max_length": int(length) if isinstance(length, int) else DEFAULT_TEXT_MAX_LENGTH,
    }


def _map_text_side(text: Mapping[str, Any], text_encoder: str, report: LoadReport, prefix: str) -> dict[str, Any]:
    """Account ``text_encoder.text_encoder.*`` (BertModel with pooler) and ``text_projection.projection``."""
    config = bert_config(text_encoder, "cxrclip")
    model, head = split_prefix(text, TEXT_MODEL)
    return {
        "text_model": match_bert(strip(model, TEXT_MODEL), report, config, source_prefix=prefix + TEXT_MODEL,
                                 target_prefix="text_model."),
        "text_head": match_keys(strip(head, TEXT_HEAD), {"weight": (EMBED_DIM, config.hidden_size),
                                                          "bias": (EMBED_DIM,)},
                                report, source_prefix=prefix + TEXT_HEAD, target_prefix="text_head."),
        "text_config": config,
    }


