"""CARZero (CVPR 2024): cross-attention alignment of a ViT-B/16 and a BERT for radiology zero-shot classification.

Sources are ``laihaoran/CARZero`` (paths below are in that repository). The released model is
``CARZero_best_model.ckpt`` (README, "Zeroshot classification"; ``CARZero/CARZero.py:26``), a PyTorch Lightning
1.1.4 checkpoint (requirements.txt) of ``PretrainDQNWOSAMLPGLModel``: ``state_dict``, ``hyper_parameters`` (the
omegaconf config given to ``save_hyperparameters``, ``lightning/pretrain_model_dqn_wo_self_atten_mlp_gl.py:17``),
callback, optimizer and scheduler states (read safely: ``vlpbench.adapters.containers``). CARZero's own loader
takes ``state_dict`` and ``hyper_parameters``, strips everything up to ``CARZero.`` and loads strictly into
``CARZeroDQNWOSAGLMLP`` (``CARZero.py:77-94``). The Lightning module holds the model as ``self.CARZero``
(``pretrain_model_dqn_wo_self_atten_mlp_gl.py:18``), so the keys are (``models/CARZero_model_dqn_wo_self_atten_gl_mlp
.py:22-24``, config ``configs/mimic_pretrain_llm_dqn_wo_self_atten_mlp_gl.yaml``):

- ``CARZero.img_encoder.model.*``: the ``MRM`` ViT-B/16 (``models/transformer_backbones.py:79-99``, built by
  ``mrm_vit_b16`` :326-334): timm ``PatchEmbed`` and ``Block`` (q/k/v bias, LayerNorm eps 1e-6), ``cls_token``,
  ``pos_embed`` (fixed sin-cos, still a parameter), ``norm``; no decoder. 150 keys in timm's names. The global
  and local embedders of the transformer branch are ``Identity`` (``models/vision_model.py:49-50``): no keys.
- ``CARZero.text_encoder.model.*``: the ``AutoModel`` of ``Laihaoran/BioClinicalMPBERT`` (``models/text_model.py:19``;
  a BertModel with pooler, 199 keys with transformers 4.35, which no longer saves ``embeddings.position_ids``).
  Mapped with option ``text_encoder`` (a local BERT folder: config and tokenizer; the weights come from the
  checkpoint); otherwise ignored.
- ``CARZero.fusion_module.*``: ``TQN_Model`` (``models/dqn_wo_self_atten_mlp.py:15-71``): ``decoder_norm`` (one
  LayerNorm, also saved as ``decoder.norm``: the decoder's final norm is the same module, :33-35), 4 decoder
  layers ``TransformerDecoderWoSelfAttenLayer`` (``models/transformer_decoder.py:146-239``; width 768, 4 heads,
  FFN 1024, pre-norm) and ``mlp_head`` (Linear 768→1024→512→256→1 with ReLU, :60-71). Ignored: each layer's
  ``self_attn`` and ``norm1`` (constructed, but ``forward_pre`` has the self-attention commented out,
  transformer_decoder.py:208-213) and ``logit_scale`` (never read by ``forward``, :166-182).

How the protocols are served (``procedures``):

- zero-shot: CARZero's ``dqn_shot_classification`` (``CARZero.py:1127-1184``, what ``inference.py:29-30`` runs):
  per image and prompt, ``get_dqn_similarities`` (:405-512) averages two cross-attention scores: the prompt's
  sentence embedding queries the image tokens ([CLS] and the 196 patches; :469) and the image's [CLS] token queries
  the prompt's tokens (sentence embedding and the 97 word positions, zero padding included; :479). CARZero scores
  a class from its one prompt, so only the positive template is used; its score is a logit that CARZero ranks as
  it is (``inference.py:106``: AUC of the raw scores). vlpbench needs values in [0, 1]: the adapter returns the
  sigmoid of the score (float64), which changes no ranking, no per-class threshold cut and no arg-max, so every
  metric equals that of CARZero's raw score. It is not a trained probability (the fusion head is trained with
  cross-entropy across the batch, ``loss/dqn_cos_loss.py:13-19``), so no calibration is reported.
- grounding: ``get_grounding_map`` (``CARZero.py:863-948``, called by ``grounding_shot_classification`` :1291-1333):
  the head-averaged cross-attention of the prompt's sentence embedding over the image tokens, the [CLS] column
  dropped (:925) and the last 4 layers averaged (``conve_attention_map`` :819-848), a 14×14 map at 224 px.
- linear probe and dense tasks: the ViT as ``ViTAdapter`` gives it; the linear feature is the [CLS] token after the
  final norm, the global image feature every CARZero score starts from (``transformer_backbones.py:247``).

CARZero's global image and text features are not trained to be compared by cosine (``calc_loss`` keeps only the
cross-attention head's loss, ``CARZero_model_dqn_wo_self_atten_gl_mlp.py:79-96``), so the adapter offers no
``embed_image`` / ``embed_text`` and no retrieval.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    GROUNDING,
    ZERO_SHOT,
    LoadReport,
    ModelCard,
    Weights,
    check_zero_shot_arguments,
    loaded_eval,
    match_keys,
    split_prefix,
    unwrap_state_dict,
)
from vlpbench.adapters.gloria import bert_word_features
from vlpbench.adapters.mrm import MRM_MEAN, MRM_STD
from vlpbench.adapters.parts import meta_shapes, strip
from vlpbench.adapters.text import bert_config, build_bert, match_bert, open_text_folder
from vlpbench.adapters.timm_vit import frozen_backbone, vit_tokens
from vlpbench.adapters.transformer import ViTAdapter, match_vit
from vlpbench.errors import CheckpointError, ConfigError

MODEL_PREFIX = "CARZero."
IMAGE_PREFIX = "img_encoder.model."
TEXT_PREFIX = "text_encoder."
TEXT_MODEL_PREFIX = "text_encoder.model."
FUSION_PREFIX = "fusion_module."
VIT_WIDTH = 768
# dqn_wo_self_atten_mlp.py:31-35 (4 heads, FFN 1024; config model.fusion.decoder_number_layer: 4) and the "v3"
# mlp_head of :60-71.
HEADS, FFN, LAYERS = 4, 1024, 4
MLP_WIDTHS = (1024, 512, 256)
# Config data.text.word_num: the tokenizer's max_length (CARZero_model_dqn_wo_self_atten_gl_mlp.py:235-241).
WORD_NUM = 97
# text_model.py:100-122 with config model.text.last_n_layers: 4, aggregate_method: sum.
LAST_N_LAYERS = 4
# conve_attention_map averages the attention of the last 4 decoder layers (CARZero.py:821).
GROUNDING_LAYERS = 4
# What the adapter hard-codes from the published config (configs/mimic_pretrain_llm_dqn_wo_self_atten_mlp_gl.yaml),
# checked against a checkpoint's hyper_parameters, which CARZero's loader builds the model from (CARZero.py:78-83).
EXPECTED_HYPER_PARAMETERS = {
    "model.vision.model_name": "vit_b_16",
    "model.text.last_n_layers": LAST_N_LAYERS,
    "model.text.aggregate_method": "sum",
    "model.text.agg_tokens": True,
    "model.text.norm": False,
    "model.fusion.decoder_number_layer": LAYERS,
    "model.fusion.class_num": 1,
    "data.text.word_num": WORD_NUM,
    "transforms.norm": "CXR_MAE",
}
TEXT_SIDE_REASON = ("CARZero's text encoder (BioClinicalMPBERT): mapped only with option text_encoder=DIR (a local "
                    "BERT folder: config and tokenizer)")
SELF_ATTENTION_REASON = ("self_attn and norm1 of each decoder layer: constructed by TransformerDecoderWoSelfAttenLayer "
                         "but unused, its forward_pre has the self-attention commented out "
                         "(models/transformer_decoder.py:208-213)")
LOGIT_SCALE_REASON = "logit_scale: a parameter TQN_Model never reads (models/dqn_wo_self_atten_mlp.py:30, 166-182)"
_UNUSED_LAYER_PART = re.compile(r"decoder\.layers\.\d+\.(self_attn|norm1)\.")
_MISSING = object()
_TEXT_HINT = ("needs CARZero's text encoder: pass --model-option text_encoder=DIR (a local copy of "
              "Laihaoran/BioClinicalMPBERT with config and tokenizer; the weights come from the checkpoint)")
_NO_EMBEDDING = ("CARZero's global image and text features are not trained for cosine comparison; it scores "
                 "image-text pairs with its cross-attention head (zero_shot, grounding)")


class CrossAttentionLayer(nn.Module):
    """``TransformerDecoderWoSelfAttenLayer.forward_pre`` (transformer_decoder.py:200-225) in eval mode.

    Sequence-first: queries ``(Q, B, d)``, memory ``(M, B, d)``. Cross-attention of ``norm2(queries)`` over the
    memory, added back; a ReLU FFN of ``norm3`` of the result, added back. Returns the queries and the
    head-averaged attention ``(B, Q, M)``.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(width, HEADS)
        self.linear1 = nn.Linear(width, FFN)
        self.linear2 = nn.Linear(FFN, width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.multihead_attn(self.norm2(queries), memory, memory, need_weights=True,
                                                average_attn_weights=True)
        queries = queries + attended
        queries = queries + self.linear2(nn.functional.relu(self.linear1(self.norm3(queries))))
        return queries, weights


class Decoder(nn.Module):
    """``TransformerDecoder`` (transformer_decoder.py:9-46): the layers, then ``norm``, the fusion's ``decoder_norm``."""

    def __init__(self, width: int, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(width) for _ in range(LAYERS))
        self.norm = norm


class FusionModule(nn.Module):
    """CARZero's ``TQN_Model`` (dqn_wo_self_atten_mlp.py:15-182) without its unused parameters, eval mode."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.decoder_norm = nn.LayerNorm(width)
        self.decoder = Decoder(width, self.decoder_norm)
        layers: list[nn.Module] = []
        for inputs, outputs in zip((width, *MLP_WIDTHS), MLP_WIDTHS):
            layers += [nn.Linear(inputs, outputs), nn.ReLU(), nn.Dropout(0.1)]
        self.mlp_head = nn.Sequential(*layers, nn.Linear(MLP_WIDTHS[-1], 1))

    def forward(self, memory: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Memory tokens ``(N, M, d)`` (batch-first) and queries ``(Q, d)`` → scores ``(N, Q)`` and each layer's
        attention ``(N, Q, M)``: every query attends to every memory item on its own (:166-182)."""
        memory = self.decoder_norm(memory.transpose(0, 1))
        x = self.decoder_norm(queries).unsqueeze(1).expand(-1, memory.shape[1], -1)
        weights = []
        for layer in self.decoder.layers:
            x, layer_weights = layer(x, memory)
            weights.append(layer_weights)
        return self.mlp_head(self.decoder.norm(x).transpose(0, 1)).squeeze(-1), weights


class CARZeroAdapter(ViTAdapter):
    """CARZero's ViT-B/16, and with ``text_encoder`` its cross-attention zero-shot and grounding (module docstring).

    Input contract (``process_img``, ``CARZero_model_dqn_wo_self_atten_gl_mlp.py:283-303``; ``builder.py:196-209``):
    the grey image resized to 256 on its long side and zero-padded to 256² (``_resize_img`` :319-365), repeated to
    RGB, centre-cropped to 224², normalised with mean 0.4978 and std 0.2449 (``norm: CXR_MAE``, builder.py:206-207).
    vlpbench's ``preprocess`` resizes to 224² without the padding; the zero-shot protocol's ``center_crop`` gives
    the 256 → 224 crop.
    """

    name = "carzero"
    card = ModelCard(
        paper="Lai et al., CARZero: Cross-Attention Alignment for Radiology Zero-Shot Classification, CVPR 2024",
        repository="github.com/laihaoran/CARZero (CARZero/CARZero.py, CARZero/models/"
                   "CARZero_model_dqn_wo_self_atten_gl_mlp.py, dqn_wo_self_atten_mlp.py, transformer_backbones.py, "
                   "text_model.py)",
        checkpoints=("CARZero_best_model.ckpt — Google Drive link in the repository's README (drive.google.com/file/"
                     "d/1kYF-k5otW5DHwz1En5d_ScV3zu2E27Ch)",
                     "text encoder config and tokenizer: the Hugging Face folder Laihaoran/BioClinicalMPBERT"),
        pretraining_data=("mimic_cxr", "padchest"),
        notes=("pre-trained on MIMIC-CXR images with LLM-rewritten reports (constants.py:6); its text encoder "
               "BioClinicalMPBERT was fine-tuned on MIMIC-CXR and PadChest reports (README, Pretraining Model), "
               "so PadChest runs are flagged although no PadChest image was seen",
               "the ViT was initialised from an M3AE ViT-B/16 (transformer_backbones.py:332)",
               "zero-shot scores are the sigmoid of CARZero's cross-attention score of the positive prompt alone"),
    )
    description = ("CARZero (CVPR 2024) ViT-B/16: the published Lightning CARZero_best_model.ckpt; cross-attention "
                   "zero-shot and grounding with text_encoder=DIR; frozen ViT + Feature2Pyramid for dense tasks")
    capabilities = frozenset({"features", ZERO_SHOT, GROUNDING})
    native_capabilities = frozenset({ZERO_SHOT, GROUNDING})
    mean = MRM_MEAN
    std = MRM_STD
    default_options = {"pool": "cls", "text_encoder": ""}
    checkpoint_forms = (
        "CARZero_best_model.ckpt (Lightning 1.1.4 checkpoint: state_dict with CARZero.img_encoder.model.* ViT-B/16, "
        "150 keys; CARZero.fusion_module.* cross-attention head, self_attn / norm1 / logit_scale ignored; "
        "CARZero.text_encoder.model.* with --model-option text_encoder=DIR)",
        "its state_dict alone, or the CARZeroDQNWOSAGLMLP state dict without the 'CARZero.' prefix; keys "
        "optionally prefixed 'module.' or '_orig_mod.'",
    )
    capability_hints = {ZERO_SHOT: _TEXT_HINT, GROUNDING: _TEXT_HINT, "embed_image": _NO_EMBEDDING,
                        "embed_text": _NO_EMBEDDING}
    procedures = {
        "zero_shot": (
            "CARZero's dqn_shot_classification (laihaoran/CARZero CARZero/CARZero.py:1127-1184 → get_dqn_similarities "
            ":405-512): the mean of the cross-attention head's score with the prompt's sentence embedding querying "
            "the image tokens ([CLS] + patches, :469) and with the image [CLS] token querying the prompt's tokens "
            "(sentence embedding + 97 word positions, :479), for the positive prompt only; returned as the sigmoid of "
            "that score, which keeps every ranking and per-class threshold of CARZero's raw score (inference.py:106). "
            "Text: BERT's last 4 hidden layers summed, word pieces summed into words, sentence = mean over the 97 "
            "positions (models/text_model.py:33-148); prompts cleaned as process_text (one-word sentences kept)"
        ),
        "grounding": (
            "CARZero's get_grounding_map (CARZero/CARZero.py:863-948): head-averaged cross-attention of the phrase's "
            "sentence embedding over the image tokens, [CLS] column dropped (:925), mean of the last 4 decoder layers "
            "(conve_attention_map :819-848); 14×14 at 224 px"
        ),
        "linear": "the [CLS] token after the ViT's final norm, CARZero's global image feature "
                  "(CARZero/models/transformer_backbones.py:247)",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``), then the ViT, the fusion head and (with ``text_encoder``)
        the BERT and its tokenizer.

        Raises:
            ConfigError: also when ``text_encoder`` is not a readable BERT folder or its width is not the ViT's.
            CheckpointError: as ``Adapter``; also ``decoder_norm`` and ``decoder.norm`` holding different values
                (one module in CARZero).
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        self.image_size = self.vit_config.image_size
        self.grid = self.vit_config.grid
        fusion = extra["fusion"]
        for part in ("weight", "bias"):
            if not torch.equal(fusion[f"decoder_norm.{part}"], fusion[f"decoder.norm.{part}"]):
                raise CheckpointError(f"{self.checkpoint_path}: {extra['fusion_prefix']}decoder_norm.{part} and "
                                      f"{extra['fusion_prefix']}decoder.norm.{part} differ; in CARZero they are one "
                                      "module (models/dqn_wo_self_atten_mlp.py:33-35)")
        self._bert = self._tokenizer = None
        # The random init of the modules below is overwritten at once; keep it off the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            self._fusion = loaded_eval(FusionModule(self.vit_config.embed_dim), fusion)
            if "text_model" in extra:
                self._bert = build_bert(extra["text_config"], extra["text_model"], pooler=True)
        self._vit = frozen_backbone(self.vit_config, self._encoder_state)
        if self._bert is not None:
            self._tokenizer, self._text_encoder_record = open_text_folder(self.options["text_encoder"], self.name)
        else:
            self.capabilities = self.capabilities - self.native_capabilities

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Map the ViT, the fusion head and (with ``text_encoder``) the BERT (module docstring).

        Raises:
            CheckpointError: the file is not a dict of tensors, or its ``hyper_parameters`` describe another
                CARZero configuration than the one this adapter implements (the key is named).
            ConfigError: ``text_encoder`` is not a local BERT folder with a config.json, or its hidden size is not
                the ViT's width.
        """
        _check_hyper_parameters(checkpoint)
        report = LoadReport("carzero")
        state, prefix = unwrap_state_dict(checkpoint, report, what="a CARZero checkpoint")
        if any(isinstance(k, str) and k.startswith(MODEL_PREFIX) for k in state):
            prefix += MODEL_PREFIX
            state, rest = split_prefix(state, MODEL_PREFIX)
            report.unexpected += [str(k) for k in rest]
            state = strip(state, MODEL_PREFIX)

        image, state = split_prefix(state, IMAGE_PREFIX)
        encoder = match_vit(strip(image, IMAGE_PREFIX), report, source_prefix=prefix + IMAGE_PREFIX)
        width = encoder["cls_token"].shape[-1] if "cls_token" in encoder else VIT_WIDTH
        extra: dict[str, Any] = {"fusion_prefix": prefix + FUSION_PREFIX}

        text_side, state = split_prefix(state, TEXT_PREFIX)
        if options["text_encoder"]:
            config = bert_config(options["text_encoder"], cls.name)
            if config.hidden_size != width:
                raise ConfigError(f"adapter 'carzero': text_encoder={options['text_encoder']!r} has hidden_size "
                                  f"{config.hidden_size}, but CARZero's fusion head takes the ViT's width {width} "
                                  "(model.fusion.d_model)")
            model_part, other = split_prefix(text_side, TEXT_MODEL_PREFIX)
            report.unexpected += [f"{prefix}{k}" for k in other]
            extra["text_model"] = match_bert(strip(model_part, TEXT_MODEL_PREFIX), report, config,
                                             source_prefix=prefix + TEXT_MODEL_PREFIX, target_prefix="text_model.")
            extra["text_config"] = config
        else:
            report.ignore(TEXT_SIDE_REASON, [prefix + k for k in text_side])

        fusion, state = split_prefix(state, FUSION_PREFIX)
        fusion = strip(fusion, FUSION_PREFIX)
        source = prefix + FUSION_PREFIX
        unused = [k for k in fusion if _UNUSED_LAYER_PART.match(k)]
        report.ignore(SELF_ATTENTION_REASON, [source + k for k in unused])
        if "logit_scale" in fusion:
            report.ignore(LOGIT_SCALE_REASON, [source + "logit_scale"])
        kept = {k: v for k, v in fusion.items() if k != "logit_scale" and k not in unused}
        extra["fusion"] = match_keys(kept, meta_shapes(lambda: FusionModule(width)), report, source_prefix=source,
                                     target_prefix=FUSION_PREFIX)
        report.unexpected += [f"{prefix}{k}" for k in state]
        return Weights(report, encoder, extra=extra)

    # --- CARZero's forward (models/CARZero_model_dqn_wo_self_atten_gl_mlp.py, text_model.py) -----------------

    def _to(self, device: torch.device) -> None:
        """Move the BERT and the fusion head to ``device`` (the ViT follows the images in ``vit_tokens``)."""
        self._bert.to(device)
        self._fusion.to(device)

    def _image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's tokens after the final norm ``(B, 1 + grid², d)``: [CLS] (``img_emb_g``), then the patches in
        row-major order (``img_emb_l``; ``transformer_backbones.py:227-247``, ``image_encoder_forward`` :48-53)."""
        return vit_tokens(self._vit, self.vit_config, images)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CARZero's text features: word embeddings ``(T, 97, d)`` ([CLS], words, [SEP], zeros after it) and sentence
        embeddings ``(T, d)`` (their mean over the 97 positions), neither normalised (``text_model.py:93-148``).

        Raises:
            CapabilityError: no text encoder was given.
            ConfigError: ``texts`` is not a non-empty list of strings.
        """
        self.require(ZERO_SHOT)
        words, _ = bert_word_features(self._tokenizer, self._bert, texts, "carzero", WORD_NUM, LAST_N_LAYERS)
        return words, words.mean(dim=1)

    @torch.no_grad()
    def pair_scores(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CARZero's image-text score ``(B, T)`` of preprocessed images and texts: the mean of the image-to-text and
        the text-to-image cross-attention scores (``get_dqn_similarities``, CARZero.py:469-501), float32.

        Raises:
            CapabilityError: no text encoder was given.
            ConfigError: no texts, or images not ``(B, 3, image_size, image_size)``.
        """
        self.require(ZERO_SHOT)
        self._to(images.device)
        words, sentences = self.encode_text(texts)
        tokens = self._image_tokens(images)
        image_to_text, _ = self._fusion(tokens, sentences)
        text_to_image, _ = self._fusion(torch.cat([sentences.unsqueeze(1), words], dim=1), tokens[:, 0])
        return ((image_to_text + text_to_image.T) / 2).float()

    @torch.no_grad()
    def zero_shot_scores(self, images: torch.Tensor, classes: list[str],
                         templates: tuple[str, str] = ("{}", "no {}")) -> torch.Tensor:
        """Sigmoid of CARZero's score of each image with each class's positive prompt, ``(B, len(classes))``,
        float64 (``procedures["zero_shot"]``); the negative template is checked, not used.

        Raises:
            CapabilityError: no text encoder was given.
            ConfigError: ``templates`` is not a pair of strings with one ``{}`` each, or no classes.
        """
        self.require(ZERO_SHOT)
        check_zero_shot_arguments(classes, templates)
        return torch.sigmoid(self.pair_scores(images, [templates[0].format(c) for c in classes]).double())

    @torch.no_grad()
    def grounding_maps(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CARZero's grounding maps ``(B, len(texts), grid, grid)`` (14×14 at 224 px): the mean over the last 4
        decoder layers of the head-averaged attention of each text's sentence embedding over the patches
        (``procedures["grounding"]``).

        Raises:
            CapabilityError: no text encoder was given.
            ConfigError: no texts, or images not ``(B, 3, image_size, image_size)``.
        """
        self.require(GROUNDING)
        self._to(images.device)
        _, sentences = self.encode_text(texts)
        tokens = self._image_tokens(images)
        _, weights = self._fusion(tokens, sentences)
        maps = torch.stack(weights[-GROUNDING_LAYERS:]).mean(dim=0)[..., 1:]  # (B, T, grid²), [CLS] dropped
        return maps.reshape(len(images), len(texts), self.grid, self.grid)


def _check_hyper_parameters(checkpoint: Any) -> None:
    """Refuse a checkpoint whose ``hyper_parameters`` differ from ``EXPECTED_HYPER_PARAMETERS`` (absent: no check).

    Raises:
        CheckpointError: a listed setting is missing or has another value; the message names the key.
    """
    hyper_parameters = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    if not isinstance(hyper_parameters, Mapping):
        return
    for path, expected in EXPECTED_HYPER_PARAMETERS.items():
        node: Any = hyper_parameters
        for part in path.split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is _MISSING or type(node) is not type(expected) or node != expected:
            found = "no such key" if node is _MISSING else repr(node)
            raise CheckpointError(f"hyper_parameters.{path}: expected {expected!r} (CARZero's published "
                                  f"configs/mimic_pretrain_llm_dqn_wo_self_atten_mlp_gl.yaml, which adapter 'carzero' "
                                  f"implements), found {found}")
