"""M-FLAG (Liu et al., MICCAI 2023): ResNet-50 aligned with a frozen CXR-BERT, global embeddings.

M-FLAG's trainer (cheliu-computation/M-FLAG-MICCAI2023 utils/utils_trainer.py:172-177) writes two files, both
loaded here and told apart by their keys:

- ``{name}_encoder.pth``, layout ``"encoder"``: ``model.encoder.state_dict()``, torchvision's ResNet-50 with
  ``fc = nn.Identity()`` (utils/utils_builder.py:19-22): 318 keys, no ``fc``.
- ``{name}_total.pth``, layout ``"total"``: ``model.state_dict()`` of ``ResNet_CXRBert`` (utils_builder.py:16-42):
  ``encoder.*`` (the same 318 keys); ``proj_v.{0,1,3,4}``: Linear 2048→2048, BatchNorm, ReLU, Linear 2048→1024,
  BatchNorm without affine (:24-29); ``proj_t.{0,1,3,4}``: the same from 768 (:31-36); ``lm_model.*``: the
  authors' ``AutoModel`` of CXR-BERT-general, a ``BertModel`` with pooler (:38-40; here its config and tokenizer
  come from the local ``text_encoder`` folder).
  BenchX publishes its M-FLAG in this layout (HF ``youngzhou12/M-FLAG``; BenchX loads it strictly into the same
  class, unifier/models/vlm_src/MFLAG/builder.py:5-10).

From the total file ``proj_v`` gives ``embed_image``; with option ``text_encoder`` (a local CXR-BERT-general
folder: config and tokenizer) ``lm_model`` and ``proj_t`` give ``embed_text``. M-FLAG computes the text features
under ``torch.no_grad()`` (utils_builder.py:54-58): the language model is never trained, so ``lm_model`` holds
CXR-BERT-general's own weights, and its pooler, which M-FLAG never uses, holds ``AutoModel``'s random init.
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
    match_resnet50_encoder,
    split_prefix,
)
from vlpbench.adapters.parts import match_head, strip
from vlpbench.adapters.text import TEXT_ENCODER_HINT, bert_config, build_bert, match_bert, open_text_folder
from vlpbench.errors import CheckpointError, ConfigError

LAYOUTS = ("encoder", "total")
ENCODER_PREFIX, PROJ_V, PROJ_T, TEXT_PREFIX = "encoder.", "proj_v.", "proj_t.", "lm_model."
HIDDEN, EMBED_DIM = 2048, 1024
TEXT_SIDE_REASON = ("M-FLAG's frozen language model (lm_model: CXR-BERT-general) and its projection proj_t: "
                    "mapped only with option text_encoder=DIR (a local CXR-BERT-general folder: config and tokenizer)")
# M-FLAG's tokenisation: truncation at 512 tokens (utils_builder.py:44-52).
_TEXT_MAX_LENGTH = 512


def projection(in_dim: int) -> nn.Sequential:
    """M-FLAG's ``proj_v`` / ``proj_t``: Linear in_dim→2048, BN, ReLU, Linear 2048→1024, BN without affine."""
    return nn.Sequential(nn.Linear(in_dim, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(inplace=True),
                         nn.Linear(HIDDEN, EMBED_DIM), nn.BatchNorm1d(EMBED_DIM, affine=False))


class MFlagAdapter(Adapter):
    """M-FLAG's ResNet-50 from ``*_encoder.pth`` or ``*_total.pth``; 1024-d embeddings from the total file.

    Input contract (utils/utils_dataset.py:54-68): 224×224 crops (``RandomCrop(224)``), RGB, mean = std = 0.5.
    """

    name = "mflag"
    card = ModelCard(
        paper="Liu et al., M-FLAG: Medical Vision-Language Pre-training with Frozen Language Models and Latent "
              "Space Geometry Optimization, MICCAI 2023",
        repository="github.com/cheliu-computation/M-FLAG-MICCAI2023 (utils/utils_builder.py, utils/utils_trainer.py)",
        checkpoints=("no official weights: the repository links none; its trainer writes {name}_encoder.pth and "
                     "{name}_total.pth",
                     "M-FLAG.pth — Hugging Face youngzhou12/M-FLAG (BenchX's re-training, the total layout)"),
        pretraining_data=("mimic_cxr",),
        notes=("the official M-FLAG weights are not public: published numbers can only come from re-trainings "
               "such as BenchX's; name whose weights a row uses",
               "the language model is frozen: embed_text runs CXR-BERT-general's own weights (lm_model)"),
    )
    description = ("M-FLAG (MICCAI 2023) ResNet-50: *_encoder.pth or *_total.pth (e.g. BenchX's HF "
                   "youngzhou12/M-FLAG); 1024-d embeddings, text side with text_encoder=DIR")
    capabilities = frozenset({"features", EMBED_IMAGE, EMBED_TEXT})
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    default_options = {"text_encoder": ""}
    checkpoint_forms = (
        "M-FLAG {name}_encoder.pth (torchvision ResNet-50 with fc = Identity, 318 keys)",
        "M-FLAG {name}_total.pth / BenchX M-FLAG.pth (encoder.*, proj_v for embed_image; lm_model.* and proj_t "
        "with --model-option text_encoder=DIR)",
    )
    capability_hints = {
        EMBED_IMAGE: "needs M-FLAG's whole-model file {name}_total.pth, which holds proj_v",
        EMBED_TEXT: f"zero-shot needs the whole-model {{name}}_total.pth and --model-option text_encoder=DIR "
                    f"({TEXT_ENCODER_HINT})",
    }
    procedures = {
        ZERO_SHOT: "embed_image = proj_v(avgpool(layer4)), embed_text = proj_t(CXR-BERT last_hidden_state[:, 0]), "
                   "both L2-normalised, the cosine of M-FLAG's alignment loss (utils/utils_builder.py:59-74, "
                   "utils/utils_trainer.py:55-60; M-FLAG has no zero-shot code); each class scored by vlpbench's "
                   "default, the softmax over the cosines with the positive and negative prompt (CheXzero)",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``) and build the heads it carries.

        Raises:
            ConfigError: also when ``text_encoder`` is not a readable BERT folder (config or tokenizer).
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        lacking = set()
        self._proj_v = self._bert = self._proj_t = self._tokenizer = self._text_encoder_record = None
        # The random init of the modules below is overwritten at once; keep it off the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            if "proj_v" in extra:
                self._proj_v = loaded_eval(projection(HIDDEN), extra["proj_v"])
            else:
                lacking.add(EMBED_IMAGE)
            if "text_model" in extra:
                config = extra["text_config"]
                self._bert = build_bert(config, extra["text_model"], pooler=True)
                self._proj_t = loaded_eval(projection(config.hidden_size), extra["proj_t"])
                self._tokenizer, self._text_encoder_record = open_text_folder(self.options["text_encoder"], self.name)
            else:
                lacking.add(EMBED_TEXT)
        self.capabilities = self.capabilities - lacking
        self._image_encoder: nn.Module | None = None

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Detect the layout from the keys and map what it holds (module docstring).

        Raises:
            CheckpointError: the file is not a dict of tensors.
            ConfigError: ``text_encoder`` given for the encoder file, or not a local BERT folder.
        """
        layout = detect_layout(checkpoint)
        report = LoadReport(layout)
        if layout == "encoder":
            if options["text_encoder"]:
                raise ConfigError("adapter 'mflag': option text_encoder needs the whole-model {name}_total.pth "
                                  "(which holds lm_model and proj_t); this file is the encoder alone")
            return Weights(report, match_resnet50_encoder(checkpoint, report))

        extra: dict[str, Any] = {}
        text_side, state = split_prefix(checkpoint, TEXT_PREFIX, PROJ_T)
        if options["text_encoder"]:
            config = bert_config(options["text_encoder"], cls.name)
            extra["text_model"] = match_bert(strip(text_side, TEXT_PREFIX), report, config,
                                             source_prefix=TEXT_PREFIX, target_prefix="text_model.")
            extra["proj_t"] = match_head(text_side, PROJ_T, lambda: projection(config.hidden_size), report)
            extra["text_config"] = config
        else:
            report.ignore(TEXT_SIDE_REASON, list(text_side))
        heads, state = split_prefix(state, PROJ_V)
        extra["proj_v"] = match_head(heads, PROJ_V, lambda: projection(HIDDEN), report)
        image, rest = split_prefix(state, ENCODER_PREFIX)
        report.unexpected += [str(k) for k in rest]
        encoder = match_resnet50_encoder(strip(image, ENCODER_PREFIX), report, source_prefix=ENCODER_PREFIX)
        return Weights(report, encoder, extra=extra)

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """1024-d image embeddings: ``proj_v`` over the average-pooled layer4 feature, L2-normalised.

        Raises:
            CapabilityError: the checkpoint is the encoder file, without ``proj_v``.
        """
        self.require(EMBED_IMAGE)
        if self._image_encoder is None:
            self._image_encoder = self.encoder().eval()
        pooled = self._image_encoder.to(images.device)(images)[-1].mean(dim=(2, 3))
        return nn.functional.normalize(self._proj_v.to(images.device)(pooled), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """1024-d text embeddings: ``proj_t`` over CXR-BERT's last hidden state at [CLS], L2-normalised.

        Tokenised as M-FLAG does (truncation at 512 tokens); input ids and attention mask only.

        Raises:
            CapabilityError: no ``text_encoder`` was given.
        """
        self.require(EMBED_TEXT)
        batch = self._tokenizer(list(texts), padding="longest", truncation=True, max_length=_TEXT_MAX_LENGTH,
                                return_tensors="pt")
        hidden = self._bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return nn.functional.normalize(self._proj_t(hidden[:, 0]), dim=-1)


def detect_layout(checkpoint: Any) -> str:
    """``"total"`` when any key starts with ``encoder.``, ``proj_v.``, ``proj_t.`` or ``lm_model.``, else ``"encoder"``.

    Raises:
        CheckpointError: the object is not a dict of keys.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"an M-FLAG checkpoint is a dict of tensors; this file holds a "
                              f"{type(checkpoint).__name__}")
    parts = (ENCODER_PREFIX, PROJ_V, PROJ_T, TEXT_PREFIX)
    return "total" if any(isinstance(k, str) and k.startswith(parts) for k in checkpoint) else "encoder"
