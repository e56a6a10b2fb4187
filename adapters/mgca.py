"""MGCA (NeurIPS 2022): multi-granularity cross-modal alignment, ResNet-50 image encoder.

MGCA publishes PyTorch Lightning ``.ckpt`` files (``resnet_50.ckpt``, ``vit_base.ckpt``): ``state_dict``,
``hyper_parameters`` (a Lightning ``AttributeDict``), ``epoch``, ``global_step``, ``optimizer_states``, ...
Inside ``state_dict`` (``mgca/models/mgca/mgca_module.py``, ``mgca/models/backbones/encoder.py``):

- ``img_encoder_q.model.*``: torchvision ResNet-50 with ``fc = Identity`` (318 keys). MGCA's own
  downstream loaders strip the first two dotted parts and load the rest strictly; so does this adapter.
- ``img_encoder_q.global_embed.head.{0,1,3,4}.*``: the global image head (Linear 2048→2048, BN, ReLU,
  Linear 2048→128, BN without affine) over the average-pooled layer4 feature. Mapped: ``embed_image``.
- ``img_encoder_q.local_embed.*``: the local image head (Conv1d on layer3 patches). Ignored: its patch
  embeddings are trained against MGCA's *word* embeddings, not against the report embedding that
  ``embed_text`` gives, so a cosine map between the two would mix spaces; ``dense_embed`` is not offered.
- ``text_encoder_q.model.*``: the BLIP-style ``med.BertModel`` (6 layers, with cross-attention blocks that
  MGCA never runs, no pooler, no token-type embeddings); ``text_encoder_q.global_embed.*`` its report head
  (Linear 768→2048, BN, ReLU, Linear 2048→128, BN without affine); ``text_encoder_q.local_embed.*`` its
  word head. With option ``text_encoder`` (a local Bio_ClinicalBERT folder: config and tokenizer) the BERT
  and the report head are mapped onto a ``transformers.BertModel``: ``embed_text``, and with
  ``embed_image`` the default CheXzero-style ``zero_shot_scores``. Without it the text side is ignored.
- ``patch_local_atten_layer.*``, ``word_local_atten_layer.*``: token-level cross-attention.
- ``prototype_layer.*``: the disease prototypes.

The ViT-B/16 variant (``vit_base.ckpt``) loads with adapter ``mgca_vit`` (``mgca_vit.py``), which shares this
module's heads and text side. :func:`vlpbench.testing.write_mgca_checkpoint` writes random-init files in this
exact layout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    ModelCard,
    DENSE_EMBED,
    EMBED_IMAGE,
    EMBED_TEXT,
    Adapter,
    LoadReport,
    Weights,
    loaded_eval,
    match_keys,
    match_resnet50_encoder,
    split_prefix,
    tensor_spec,
    unwrap_state_dict,
)
from vlpbench.adapters.parts import strip
from vlpbench.adapters.text import bert_config, open_text_folder
from vlpbench.errors import CheckpointError, ConfigError

IMAGE_ENCODER_PREFIX = "img_encoder_q.model."
IMAGE_GLOBAL_PREFIX = "img_encoder_q.global_embed.head."
TEXT_PREFIX = "text_encoder_q."
TEXT_MODEL_PREFIX = "text_encoder_q.model."
TEXT_GLOBAL_PREFIX = "text_encoder_q.global_embed.head."
IMAGE_LOCAL_HEAD_REASON = (
    "MGCA's local image head (Conv1d 1024→2048→128 on layer3 patches): its patch embeddings are aligned with "
    "MGCA's word embeddings, not with the report embedding of embed_text, so no protocol uses them"
)
TEXT_SIDE_REASON = (
    "MGCA's text side: the BLIP-style 6-layer BERT report encoder and its projection heads; mapped only with "
    "option text_encoder=DIR (a local Bio_ClinicalBERT folder: config and tokenizer)"
)
TEXT_LOCAL_HEAD_REASON = (
    "MGCA's local text head (Conv1d 768→2048→128 per word): word embeddings for its token-level loss in "
    "pre-training; embed_text gives the report embedding of the global head"
)
CROSS_ATTENTION_REASON = (
    "cross-attention blocks of MGCA's med.BertModel (add_cross_attention in its bert_config.json): never run, "
    "MGCA calls the text encoder in mode 'text'"
)
POSITION_IDS_REASON = "position_ids buffer of med.BertEmbeddings: the constant 0..511, not a weight"
TOKEN_ATTENTION_REASON = (
    "MGCA's token-level cross-attention between image patches and report words (one head, width 128), "
    "used only by its local alignment loss in pre-training; image-only protocols do not use it"
)
PROTOTYPE_REASON = (
    "MGCA's 500 learnable disease prototypes (Linear 128→500, no bias) of its cluster-level alignment loss "
    "in pre-training; image-only protocols do not use them"
)
_IGNORED_PARTS = (
    (("patch_local_atten_layer.", "word_local_atten_layer."), TOKEN_ATTENTION_REASON),
    (("prototype_layer.",), PROTOTYPE_REASON),
)
# Key prefixes of the ViT-B/16 (DeiT) image encoder under img_encoder_q.model.
_VIT_PARTS = ("patch_embed.", "blocks.", "cls_token", "pos_embed")

_VIT_MESSAGE = (
    "this is MGCA's ViT-B/16 variant (vit_base.ckpt; {found}); adapter 'mgca' loads the ResNet-50 variant "
    "(resnet_50.ckpt): load this file with --model mgca_vit"
)
# med.BertEmbeddings has no token-type embeddings; BertModel's are set to zero so they add nothing.
_TOKEN_TYPES = "embeddings.token_type_embeddings.weight"
_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.")
# ImageEncoder.resnet_forward resizes every input to 299×299 (bilinear, align_corners=True) first.
_MGCA_INPUT = 299
# MultimodalPretrainingDataset tokenises reports with truncation at max_words = 112 tokens.
_TEXT_MAX_LENGTH = 112
_WORD = re.compile(r"\w+")
# MGCA defaults: emb_dim 128, hidden width 2048 of the projection heads.
EMB_DIM, HEAD_HIDDEN = 128, 2048


class MgcaAdapter(Adapter):
    """MGCA's ResNet-50 image encoder from its published Lightning checkpoint, with its global embeddings.

    Input contract (``mgca/datasets/transforms.py``, ``DataTransforms``): 224×224 crops, normalised with
    mean = std = 0.5 per channel. The encoder is convolutional and accepts any size divisible by 32;
    ``embed_image`` resizes to 299² itself, as MGCA's image encoder does.
    """

    name = "mgca"
    card = ModelCard(
        paper="Wang et al., Multi-Granularity Cross-modal Alignment for Generalized Medical Visual "
              "Representation Learning, NeurIPS 2022",
        repository="github.com/HKU-MedAI/MGCA (mgca/models/mgca/mgca_module.py, mgca/models/backbones/encoder.py)",
        checkpoints=("resnet_50.ckpt — Google Drive link in the repository's README",),
        pretraining_data=("mimic_cxr",),
        notes=("vit_base.ckpt (the ViT-B/16 variant) loads with adapter mgca_vit",),
    )
    description = ("MGCA (NeurIPS 2022) ResNet-50: the published Lightning resnet_50.ckpt; 128-d global "
                   "embeddings, text side with text_encoder=DIR")
    capabilities = frozenset({"features", EMBED_IMAGE, EMBED_TEXT})
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    default_options = {"text_encoder": ""}
    checkpoint_forms = (
        "MGCA resnet_50.ckpt (Lightning checkpoint: state_dict with img_encoder_q.model.*, torchvision "
        "ResNet-50 without fc, 318 keys; img_encoder_q.global_embed for embed_image; text_encoder_q.model.* "
        "and text_encoder_q.global_embed with --model-option text_encoder=DIR; local heads and prototypes ignored)",
        "its state_dict alone, keys optionally prefixed 'module.' or '_orig_mod.'",
    )
    capability_hints = {
        EMBED_IMAGE: "needs MGCA's full resnet_50.ckpt, whose img_encoder_q.global_embed holds the image head",
        EMBED_TEXT: "zero-shot needs a text encoder: pass --model-option text_encoder=DIR (a local "
                    "Bio_ClinicalBERT folder with config and tokenizer; the weights come from the checkpoint)",
        DENSE_EMBED: "MGCA's patch embeddings are aligned with its word embeddings, not with the report "
                       "embedding of embed_text, so this adapter offers no dense_embed",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``) and build the heads it carries.

        Raises:
            ConfigError: also when ``text_encoder`` is not a readable BERT folder (config or tokenizer).
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        lacking = set()
        self._image_head = self._bert = self._text_head = self._tokenizer = self._text_encoder_record = None
        # The random init of the modules below is overwritten at once; keep it off the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            if "image_head" in extra:
                width = extra["image_head"]["0.weight"].shape[1]  # 2048 (ResNet-50), 768 (ViT-B/16)
                self._image_head = loaded_eval(global_embedding(width), extra["image_head"])
            else:
                lacking.add(EMBED_IMAGE)
            if "text_model" in extra:
                from transformers import BertModel

                config = extra["text_config"]
                state = dict(extra["text_model"])
                state[_TOKEN_TYPES] = torch.zeros(config.type_vocab_size, config.hidden_size)
                self._bert = loaded_eval(BertModel(config, add_pooling_layer=False), state)
                self._text_head = loaded_eval(global_embedding(config.hidden_size), extra["text_head"])
                self._tokenizer, self._text_encoder_record = open_text_folder(self.options["text_encoder"], self.name)
            else:
                lacking.add(EMBED_TEXT)
        self.capabilities = self.capabilities - lacking
        self._image_encoder: nn.Module | None = None

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Map the encoder, the global image head and (with ``text_encoder``) the text side (module docstring).

        The global image head is optional: a state dict without any ``img_encoder_q.global_embed`` key loads as
        an encoder alone (no ``embed_image``). Once one of its keys is present, all are required.

        Raises:
            CheckpointError: the file is not a dict of tensors, or it is MGCA's ViT variant.
            ConfigError: ``text_encoder`` is not a local BERT folder with a config.json.
        """
        report = LoadReport("mgca-resnet50")
        _refuse_vit(checkpoint)
        state, prefix = unwrap_state_dict(checkpoint, report, what="an MGCA checkpoint")
        if any(isinstance(k, str) and k.startswith(tuple(IMAGE_ENCODER_PREFIX + p for p in _VIT_PARTS))
               for k in state):
            raise CheckpointError(_VIT_MESSAGE.format(found=f"keys {IMAGE_ENCODER_PREFIX}patch_embed.* / blocks.*"))

        state, extra = map_heads_and_text(state, options, report, prefix, image_width=2048,
                                          local_head_reason=IMAGE_LOCAL_HEAD_REASON)
        image, rest = split_prefix(state, IMAGE_ENCODER_PREFIX)
        report.unexpected += [f"{prefix}{k}" for k in rest]
        encoder = match_resnet50_encoder(strip(image, IMAGE_ENCODER_PREFIX), report,
                                         source_prefix=prefix + IMAGE_ENCODER_PREFIX)
        return Weights(report, encoder, extra=extra)

    # --- embeddings (mgca/models/mgca/mgca_module.py: forward; backbones/encoder.py) ---------------------

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """128-d report-space image embeddings, L2-normalised, of preprocessed images ``(B, 3, H, W)``.

        As MGCA's ``ImageEncoder``: resize to 299² (bilinear, ``align_corners=True``), ResNet-50 to layer4,
        global average pool, ``global_embed`` (BatchNorm with its running statistics).

        Raises:
            CapabilityError: the checkpoint carries no ``img_encoder_q.global_embed``.
        """
        self.require(EMBED_IMAGE)
        if self._image_encoder is None:
            self._image_encoder = self.encoder().eval()
        x = nn.functional.interpolate(images.float(), size=(_MGCA_INPUT, _MGCA_INPUT), mode="bilinear",
                                      align_corners=True)
        pooled = self._image_encoder.to(x.device)(x)[-1].mean(dim=(2, 3))
        return nn.functional.normalize(self._image_head.to(x.device)(pooled), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """128-d report embeddings, L2-normalised: ``global_embed`` over the BERT's [CLS] output.

        As MGCA's pre-training: each text is lower-cased and reduced to its ASCII word characters joined by
        spaces (``MultimodalPretrainingDataset.create_path_2_sent_mapping``), tokenised with truncation at
        112 tokens, and encoded with the token-type ids passed where ``med.BertModel`` takes position ids
        (``BertEncoder.forward`` calls ``self.model(ids, attn_mask, token_type)``): every token gets position
        embedding 0, so the [CLS] output does not depend on word order. The weights were trained that way.

        Raises:
            CapabilityError: no ``text_encoder`` was given.
            ConfigError: ``texts`` is not a non-empty list of strings.
        """
        self.require(EMBED_TEXT)
        if isinstance(texts, str) or not texts:
            raise ConfigError(f"embed_text takes a non-empty list of strings, got {texts!r}")
        cleaned = [" ".join(_WORD.findall(text.lower().encode("ascii", "ignore").decode("ascii"))) for text in texts]
        batch = self._tokenizer(cleaned, padding="longest", truncation=True, max_length=_TEXT_MAX_LENGTH,
                                return_tensors="pt")
        zeros = torch.zeros_like(batch["input_ids"])
        hidden = self._bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=zeros, position_ids=zeros).last_hidden_state
        return nn.functional.normalize(self._text_head(hidden[:, 0]), dim=-1)


def image_encoder_hparam(checkpoint: Any) -> Any:
    """The ``img_encoder`` hyper-parameter of a Lightning checkpoint (``"resnet_50"``, ``"vit_base"``), or None."""
    if not isinstance(checkpoint, Mapping):
        return None
    hparams = checkpoint.get("hyper_parameters")
    # Lightning's AttributeDict loads as a dict, an argparse.Namespace as a SimpleNamespace.
    return hparams.get("img_encoder") if isinstance(hparams, Mapping) else getattr(hparams, "img_encoder", None)


def _refuse_vit(checkpoint: Any) -> None:
    """Raise ``CheckpointError`` when the checkpoint's hyper-parameters name the ViT image encoder."""
    if image_encoder_hparam(checkpoint) == "vit_base":
        raise CheckpointError(_VIT_MESSAGE.format(found="hyper_parameters.img_encoder == 'vit_base'"))


def map_heads_and_text(state: Mapping[str, Any], options: Mapping[str, Any], report: LoadReport, prefix: str, *,
                       image_width: int, local_head_reason: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Account every part of an MGCA state dict except the image encoder; shared by both image encoders.

    Ignored, with their reasons: the local image head (``local_head_reason``), the token-level attention and
    the prototypes. The text side is mapped with option ``text_encoder`` (:func:`map_text_side`), else ignored.
    The global image head (``GlobalEmbedding`` over ``image_width`` features, encoder.py:17-33) is optional:
    once one of its keys is present, all are required. Returns the rest of ``state`` (the image encoder's
    keys, and anything unexpected) and the mapped tensors by part (``image_head``, ``text_model`` ...).
    """
    local_head, state = split_prefix(state, "img_encoder_q.local_embed.")
    report.ignore(local_head_reason, [prefix + k for k in local_head])
    for prefixes, reason in _IGNORED_PARTS:
        part, state = split_prefix(state, *prefixes)
        report.ignore(reason, [prefix + k for k in part])
    extra: dict[str, Any] = {}
    text_side, state = split_prefix(state, TEXT_PREFIX)
    if options["text_encoder"]:
        extra.update(map_text_side(text_side, options["text_encoder"], report, prefix))
    else:
        report.ignore(TEXT_SIDE_REASON, [prefix + k for k in text_side])
    image_head, state = split_prefix(state, IMAGE_GLOBAL_PREFIX)
    if image_head:
        with torch.device("meta"):  # shapes only: no init, no draw from the global RNG
            expected = _shapes(global_embedding(image_width))
        extra["image_head"] = match_keys(strip(image_head, IMAGE_GLOBAL_PREFIX), expected, report,
                                         source_prefix=prefix + IMAGE_GLOBAL_PREFIX,
                                         target_prefix="image_global_embed.")
    return state, extra


def map_text_side(text_side: Mapping[str, Any], text_encoder: str, report: LoadReport, prefix: str) -> dict[str, Any]:
    """Account ``text_encoder_q.*`` against a ``BertModel`` (config from ``text_encoder``) and the report head.

    The layer count is read from the checkpoint (MGCA's bert_config.json sets 6, Bio_ClinicalBERT's config 12);
    every layer present must be complete. Returns the BERT and head tensors and the config.
    """
    from transformers import BertModel

    config = bert_config(text_encoder, "mgca")
    model_part, rest = split_prefix(text_side, TEXT_MODEL_PREFIX)
    head_part, rest = split_prefix(rest, TEXT_GLOBAL_PREFIX)
    local_head, rest = split_prefix(rest, "text_encoder_q.local_embed.")
    report.ignore(TEXT_LOCAL_HEAD_REASON, [prefix + k for k in local_head])
    report.unexpected += [f"{prefix}{k}" for k in rest]

    model_part = strip(model_part, TEXT_MODEL_PREFIX)
    cross = [k for k in model_part if ".crossattention." in k]
    report.ignore(CROSS_ATTENTION_REASON, [prefix + TEXT_MODEL_PREFIX + k for k in cross])
    position_ids = [k for k in model_part if k == "embeddings.position_ids"]
    report.ignore(POSITION_IDS_REASON, [prefix + TEXT_MODEL_PREFIX + k for k in position_ids])
    model_part = {k: v for k, v in model_part.items() if k not in cross and k not in position_ids}

    layers = {int(m.group(1)) for k in model_part if (m := _LAYER_KEY.match(k))}
    config.num_hidden_layers = max(layers) + 1 if layers else 0
    config.add_cross_attention = False
    with torch.device("meta"):  # shapes only: no init time spent on the BERT
        expected = _shapes(BertModel(config, add_pooling_layer=False))
        head = _shapes(global_embedding(config.hidden_size))
    del expected[_TOKEN_TYPES]
    return {
        "text_model": match_keys(model_part, expected, report, source_prefix=prefix + TEXT_MODEL_PREFIX,
                                 target_prefix="text_model."),
        "text_head": match_keys(strip(head_part, TEXT_GLOBAL_PREFIX), head, report,
                                source_prefix=prefix + TEXT_GLOBAL_PREFIX, target_prefix="text_global_embed."),
        "text_config": config,
    }


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key → shape of ``module``'s state dict."""
    return {k: tensor_spec(v) for k, v in module.state_dict().items()}


def global_embedding(in_dim: int) -> nn.Sequential:
    """MGCA's ``GlobalEmbedding``: Linear, BN, ReLU, Linear, BN without affine parameters."""
    return nn.Sequential(
        nn.Linear(in_dim, HEAD_HIDDEN), nn.BatchNorm1d(HEAD_HIDDEN), nn.ReLU(inplace=True),
        nn.Linear(HEAD_HIDDEN, EMB_DIM), nn.BatchNorm1d(EMB_DIM, affine=False),
    )
