"""G2D (NeurIPS 2024): ResNet-50 U-Net pre-trained with global alignment and pseudo-segmentation.

G2D's pre-training code (``cheliu-computation/G2D-NeurIPS24``, ``PRETRAIN/utils/trainer.py``) writes three
files, and this adapter loads each of them, telling them apart by their keys, never by the file name:

- ``*_encoder.pth``, layout ``"encoder"``: ``img_model.encoder.state_dict()``, a bare smp ResNet-50
  encoder (torchvision names without ``fc``, 318 keys).
- ``*_encoder_decoder.pth``, layout ``"encoder_decoder"``: ``img_model.state_dict()``, a full
  ``smp.Unet('resnet50', in_channels=3, classes=1)`` (380 keys: ``encoder.*``, ``decoder.*``,
  ``segmentation_head.*``). The decoder is exposed by ``decoder_state_dict()``.
- ``*_checkpoint.pth``, layout ``"pretrain"``: ``{"epoch", "model_state_dict", "optimizer_state_dict"}``
  where the model holds ``img_model.*`` (the U-Net), ``lm_model.*`` (Bio_ClinicalBERT), the projection
  heads ``proj_v.*``/``proj_t.*``, ``attnpool.*`` and ``pseudo_conv.*``. The U-Net, ``proj_v`` and
  ``attnpool`` are mapped (``embed_image``, ``dense_embed``). ``lm_model`` and ``proj_t`` are mapped when
  option ``text_encoder`` names a local Bio_ClinicalBERT directory (config and tokenizer; the weights
  come from the checkpoint), which adds ``embed_text``; otherwise they are ignored. ``pseudo_conv`` (not
  used in G2D's forward) and the training state are ignored.

Option ``heatmap_source`` picks what ``grounding_maps`` returns: ``similarity`` (default), the cosine of each
text with each location of ``dense_embed``; or ``attention_pool``, the attention of the pool's mean-token
query (mean over heads, the source of G2D's pseudo masks), the same map for every text and needing no
text encoder.

:func:`vlpbench.testing.write_g2d_checkpoint` writes random-init files in these exact layouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    ModelCard,
    DENSE_EMBED,
    EMBED_IMAGE,
    EMBED_TEXT,
    GROUNDING,
    Adapter,
    LoadReport,
    Weights,
    loaded_eval,
    match_keys,
    match_resnet50_encoder,
    split_prefix,
    tensor_spec,
    unet_decoder_shapes,
)
from vlpbench.adapters.parts import strip
from vlpbench.adapters.text import bert_config, build_bert, match_bert, open_text_folder
from vlpbench.errors import CheckpointError, ConfigError

LAYOUTS = ("encoder", "encoder_decoder", "pretrain")
HEATMAP_SOURCES = ("similarity", "attention_pool")

TEXT_SIDE_PREFIXES = ("lm_model.", "proj_t.")
TEXT_SIDE_REASON = ("text encoder and its projection head: mapped only with option text_encoder=DIR "
                    "(a local Bio_ClinicalBERT directory: config and tokenizer)")
IMAGE_HEAD_PREFIXES = ("proj_v.", "attnpool.")
PSEUDO_CONV_REASON = "pseudo_conv: defined by G2D's model but not used in its forward pass"
TRAINING_STATE_REASON = "training state (epoch counter, optimizer): resumes pre-training, not used for evaluation"
_TRAINING_STATE_KEYS = ("epoch", "optimizer_state_dict")
_UNET_PARTS = ("encoder.", "decoder.", "segmentation_head.")
# G2D config.yaml: projection width 128, 4 attention-pool heads, 256-pixel images (8×8 at stride 32).
PROJECTION_WIDTH, _POOL_HEADS, _POOL_POSITIONS = 128, 4, (256 // 32) ** 2 + 1
# Training tokenisation truncates at 256 tokens (PRETRAIN/utils/dataset.py).
_TEXT_MAX_LENGTH = 256


class G2DAdapter(Adapter):
    """G2D's ResNet-50 image encoder, plus its U-Net decoder when the checkpoint carries one.

    From the full pre-training checkpoint it also provides ``embed_image`` and ``dense_embed`` (128-d,
    ``proj_v``/``attnpool``), and ``embed_text`` when option ``text_encoder`` names a local BERT directory.

    Input contract (``PRETRAIN/utils/dataset.py``, config ``img_size: 256``): 256×256 RGB after
    ``CenterCrop(256)``, ImageNet mean/std. The 256 matters only for the attention-pool (``embed_image``)
    path; the convolutional encoder and ``dense_embed`` accept any size divisible by 32.
    """

    name = "g2d"
    card = ModelCard(
        paper="Liu et al., G2D: From Global to Dense Radiography Representation Learning via Vision-Language "
              "Pre-training, NeurIPS 2024",
        repository="github.com/cheliu-computation/G2D-NeurIPS24 (PRETRAIN/models/cnn_ae.py, PRETRAIN/utils/trainer.py)",
        checkpoints=("no weights are linked from the repository; the trainer writes *_encoder.pth, "
                     "*_encoder_decoder.pth and *_checkpoint.pth",),
        pretraining_data=("mimic_cxr",),
        notes=("G2D ships no downstream code: its tables follow MGCA's and MedKLIP's protocols",),
    )
    description = "G2D (NeurIPS 2024) ResNet-50 U-Net: *_encoder.pth, *_encoder_decoder.pth or full checkpoint"
    capabilities = frozenset({"features", "decoder", EMBED_IMAGE, EMBED_TEXT, DENSE_EMBED})
    image_size = 256
    default_options = {"text_encoder": "", "heatmap_source": "similarity"}
    checkpoint_forms = (
        "G2D *_encoder.pth (smp ResNet-50 encoder, 318 keys)",
        "G2D *_encoder_decoder.pth (smp Unet('resnet50', classes=1), 380 keys; decoder exposed)",
        "G2D *_checkpoint.pth (pre-training checkpoint: U-Net, proj_v, attnpool; lm_model and proj_t "
        "with --model-option text_encoder=DIR)",
    )
    capability_hints = {
        EMBED_IMAGE: "needs G2D's full pre-training checkpoint *_checkpoint.pth, which holds proj_v and attnpool",
        DENSE_EMBED: "needs G2D's full pre-training checkpoint *_checkpoint.pth, which holds proj_v",
        EMBED_TEXT: "zero-shot needs a text encoder: load the full *_checkpoint.pth and pass "
                    "--model-option text_encoder=DIR (a local Bio_ClinicalBERT directory with config and tokenizer)",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``) and build the heads it carries.

        Raises:
            ConfigError: also when ``text_encoder`` is not a readable BERT directory (config or tokenizer).
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        lacking = set()
        self._proj_v = self._attnpool = self._bert = self._proj_t = self._tokenizer = None
        # The random init of the modules below is overwritten at once; keep it off the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            if "proj_v" in extra:
                self._proj_v = loaded_eval(image_projection(), extra["proj_v"])
                self._attnpool = loaded_eval(AttentionPool2d(), extra["attnpool"])
            else:
                lacking |= {EMBED_IMAGE, DENSE_EMBED}
            if "lm_model" in extra:
                config = extra["text_config"]
                self._bert = build_bert(config, extra["lm_model"], pooler=True)
                self._proj_t = loaded_eval(text_projection(config.hidden_size), extra["proj_t"])
                self._tokenizer, self._text_encoder_record = open_text_folder(self.options["text_encoder"], self.name)
            else:
                lacking.add(EMBED_TEXT)
        if self.options["heatmap_source"] == "attention_pool":
            # Text-independent maps: grounding needs the pool only, not the text side.
            self.native_capabilities = frozenset({GROUNDING})
        self.capabilities = self.capabilities - lacking
        self._image_encoder: nn.Module | None = None

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Detect the G2D layout from the keys and map what it holds (see the module docstring).

        Raises:
            ConfigError: ``text_encoder`` given for a file without a text side, or not a local BERT directory.
        """
        layout = detect_layout(checkpoint)
        report = LoadReport(layout)
        if options["heatmap_source"] not in HEATMAP_SOURCES:
            raise ConfigError(f"adapter 'g2d': option heatmap_source={options['heatmap_source']!r}; expected one of "
                              f"{', '.join(HEATMAP_SOURCES)}")
        if options["heatmap_source"] == "attention_pool" and layout != "pretrain":
            raise ConfigError(f"adapter 'g2d': option heatmap_source=attention_pool needs the full pre-training "
                              f"checkpoint (*_checkpoint.pth, which holds attnpool); this file has layout {layout!r}")
        if options["text_encoder"] and layout != "pretrain":
            raise ConfigError(f"adapter 'g2d': option text_encoder needs the full pre-training checkpoint "
                              f"(*_checkpoint.pth, which holds lm_model and proj_t); this file has layout {layout!r}")
        if layout == "encoder":
            return Weights(report, match_resnet50_encoder(checkpoint, report))
        if layout == "encoder_decoder":
            encoder, decoder = _map_unet(checkpoint, report, prefix="")
            return Weights(report, encoder, decoder)

        model_state = checkpoint["model_state_dict"]
        report.ignore(TRAINING_STATE_REASON, [k for k in checkpoint if k in _TRAINING_STATE_KEYS])
        report.unexpected += [str(k) for k in checkpoint if k not in (*_TRAINING_STATE_KEYS, "model_state_dict")]
        text_side, rest = split_prefix(model_state, *TEXT_SIDE_PREFIXES)
        pseudo_conv, rest = split_prefix(rest, "pseudo_conv.")
        report.ignore(PSEUDO_CONV_REASON, list(pseudo_conv))
        image_heads, image_side = split_prefix(rest, *IMAGE_HEAD_PREFIXES)
        with torch.device("meta"):  # shapes only: no init, no draw from the global RNG
            heads = {"proj_v": image_projection(), "attnpool": AttentionPool2d()}
        extra = {name: _match_part(image_heads, f"{name}.", module, report) for name, module in heads.items()}
        if options["text_encoder"]:
            extra.update(_map_text_side(text_side, options["text_encoder"], report))
        else:
            report.ignore(TEXT_SIDE_REASON, list(text_side))
        encoder, decoder = _map_unet(image_side, report, prefix="img_model.")
        return Weights(report, encoder, decoder, extra)

    # --- embeddings (G2D PRETRAIN/models/cnn_ae.py: get_img_emb, get_text_emb) ------------------------

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """128-d global embeddings: ``attnpool(proj_v(layer4))`` with the mean-token query, L2-normalised.

        Raises:
            CapabilityError: the checkpoint carries no ``proj_v``/``attnpool``.
            ConfigError: the input is not 256×256 (the pool's positional embedding has (256/32)²+1 = 65 rows).
        """
        self._check_pool_input(images, "embed_image")
        tokens = self._projected_layer4(images)
        return nn.functional.normalize(self._attnpool.to(images.device)(tokens), dim=-1)

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Per-head attention of the pool's mean-token query on each projected layer4 token, ``(B, 4, 8, 8)``.

        The source of G2D's pseudo masks (``CNN_AE.get_img_emb`` with ``average_attn_weights=False``): the
        weight on the mean token itself is dropped, so each head's map sums to 1 minus that weight.

        Raises:
            CapabilityError: the checkpoint carries no ``proj_v``/``attnpool``.
            ConfigError: the input is not 256×256 (the pool's positional embedding fixes it).
        """
        self._check_pool_input(images, "attention_maps")
        tokens = self._projected_layer4(images)
        return self._attnpool.to(images.device).pixel_attention(tokens)

    @torch.no_grad()
    def dense_embed(self, images: torch.Tensor) -> torch.Tensor:
        """128-d per-location embeddings ``proj_v(layer4)`` ``(B, 128, H/32, W/32)``, L2-normalised per location.

        Raises:
            CapabilityError: the checkpoint carries no ``proj_v``.
        """
        self.require(DENSE_EMBED)
        return nn.functional.normalize(self._projected_layer4(images), dim=1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """128-d text embeddings: ``proj_t`` over BERT's last hidden state, CLS position, L2-normalised.

        Tokenised as G2D does at evaluation, padding to the longest text; truncated at G2D's training length of
        256 tokens (its evaluation code does not truncate, so only texts past 256 tokens differ).

        Raises:
            CapabilityError: no ``text_encoder`` was given (or the checkpoint has no text side).
        """
        self.require(EMBED_TEXT)
        batch = self._tokenizer(list(texts), padding="longest", truncation=True, max_length=_TEXT_MAX_LENGTH,
                                return_tensors="pt")
        # G2D passes input ids and attention mask only; token types default to zeros.
        hidden = self._bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return nn.functional.normalize(self._proj_t(hidden.transpose(1, 2))[:, :, 0], dim=-1)

    def grounding_maps(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Heat maps ``(B, len(texts), h, w)`` from the source that option ``heatmap_source`` names.

        ``similarity``: ``Adapter.grounding_maps`` (text with each ``dense_embed`` location). ``attention_pool``:
        the mean over heads of ``attention_maps``, repeated for every text (the pool's query is not a text).
        """
        if self.options["heatmap_source"] == "similarity":
            return super().grounding_maps(images, texts)
        if isinstance(texts, str) or not texts:
            raise ConfigError(f"grounding_maps takes a non-empty list of texts, got {texts!r}")
        return self.attention_maps(images).mean(dim=1, keepdim=True).expand(-1, len(texts), -1, -1)

    def _check_pool_input(self, images: torch.Tensor, method: str) -> None:
        """Require the pool's heads and the 256×256 input its positional embedding was trained for."""
        self.require(EMBED_IMAGE)
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ConfigError(
                f"adapter {self.name!r}: {method} needs {self.image_size}×{self.image_size} input, got "
                f"{tuple(images.shape[-2:])}: G2D's attention pool has {_POOL_POSITIONS} positions "
                f"((256/32)²+1), fixed at pre-training; use adapter.preprocess()"
            )

    def _projected_layer4(self, images: torch.Tensor) -> torch.Tensor:
        """``proj_v`` over the stride-32 ResNet-50 features, ``(B, 128, H/32, W/32)``; encoder in eval mode."""
        if self._image_encoder is None:
            self._image_encoder = self.encoder().eval()
        encoder = self._image_encoder.to(images.device)
        return self._proj_v.to(images.device)(encoder(images)[-1])


def detect_layout(checkpoint: Any) -> str:
    """Name the G2D layout of a loaded checkpoint: ``"encoder"``, ``"encoder_decoder"`` or ``"pretrain"``.

    Anything that is not one of the first two is accounted as ``"encoder"``, so that its keys are reported
    against the simplest layout.

    Raises:
        CheckpointError: the object is not a dict of keys (e.g. a bare tensor or a list).
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"a G2D checkpoint is a dict of tensors; this file holds a {type(checkpoint).__name__}")
    if "model_state_dict" in checkpoint:
        if not isinstance(checkpoint["model_state_dict"], Mapping):
            raise CheckpointError("'model_state_dict' of this G2D checkpoint is not a dict of tensors")
        return "pretrain"
    if any(isinstance(k, str) and k.startswith(_UNET_PARTS) for k in checkpoint):
        return "encoder_decoder"
    return "encoder"


class AttentionPool2d(nn.Module):
    """G2D's attention pool (CLIP's ``AttentionPool2d`` with ``nn.MultiheadAttention``) over projected tokens.

    The query is the mean token; keys and values are the mean token plus the H·W pixel tokens, each with
    the learned positional embedding added; ``c_proj`` follows the attention. Returns ``(B, dim)``.
    ``pixel_attention`` gives the per-head attention weights that G2D turns into its pseudo masks.
    """

    def __init__(self, positions: int = _POOL_POSITIONS, dim: int = PROJECTION_WIDTH, heads: int = _POOL_HEADS) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(positions, dim) / dim**0.5)
        self.mhsa = nn.MultiheadAttention(dim, heads)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._sequence(x)
        x, _ = self.mhsa(x[:1], x, x, need_weights=False)
        return self.c_proj(x).squeeze(0)

    def pixel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head weights of the mean-token query on the H·W pixel tokens of ``x`` ``(B, C, H, W)``.

        Returns ``(B, heads, H, W)``: the attention over the mean token itself is left out.
        """
        height, width = x.shape[-2:]
        sequence = self._sequence(x)
        _, weights = self.mhsa(sequence[:1], sequence, sequence, need_weights=True, average_attn_weights=False)
        # weights: (B, heads, 1 query, 1 + H·W keys); key 0 is the mean token.
        return weights[:, :, 0, 1:].reshape(x.shape[0], -1, height, width)

    def _sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (1 + H·W, B, C), sequence first: the mean token, then the pixels, plus positions."""
        x = x.flatten(start_dim=2).permute(2, 0, 1)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        return x + self.positional_embedding[:, None, :].to(x.dtype)


def image_projection() -> nn.Sequential:
    """G2D's image projection: 1×1 conv 2048→128, BatchNorm without affine (running stats only), ReLU, 1×1 conv."""
    return nn.Sequential(
        nn.Conv2d(2048, PROJECTION_WIDTH, 1, bias=False), nn.BatchNorm2d(PROJECTION_WIDTH, affine=False), nn.ReLU(),
        nn.Conv2d(PROJECTION_WIDTH, PROJECTION_WIDTH, 1, bias=False),
    )


def text_projection(hidden: int) -> nn.Sequential:
    """G2D's text projection over token features ``(B, hidden, L)``: Conv1d hidden→128, BN, ReLU, Conv1d."""
    return nn.Sequential(
        nn.Conv1d(hidden, PROJECTION_WIDTH, 1, bias=False), nn.BatchNorm1d(PROJECTION_WIDTH, affine=False), nn.ReLU(),
        nn.Conv1d(PROJECTION_WIDTH, PROJECTION_WIDTH, 1, bias=False),
    )


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key → shape of ``module``'s state dict."""
    return {k: tensor_spec(v) for k, v in module.state_dict().items()}


def _match_part(
    state: Mapping[str, Any], prefix: str, module: nn.Module, report: LoadReport
) -> dict[str, torch.Tensor]:
    """Account the keys of ``state`` under ``prefix`` against ``module``'s state dict (built on meta is fine)."""
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return match_keys(part, _shapes(module), report, source_prefix=prefix, target_prefix=prefix)


def _map_text_side(text_side: Mapping[str, Any], text_encoder: str, report: LoadReport) -> dict[str, Any]:
    """Account ``lm_model.*`` against a ``BertModel`` (with pooler) built from ``text_encoder``'s config,
    and ``proj_t.*`` against a projection of that model's width; return the tensors and the config."""
    config = bert_config(text_encoder, "g2d")
    lm_model, rest = split_prefix(text_side, "lm_model.")
    with torch.device("meta"):  # shapes only
        proj_t = text_projection(config.hidden_size)
    return {
        "lm_model": match_bert(strip(lm_model, "lm_model."), report, config, source_prefix="lm_model.",
                               target_prefix="lm_model."),
        "proj_t": _match_part(rest, "proj_t.", proj_t, report),
        "text_config": config,
    }


def _map_unet(
    state: Mapping[str, Any], report: LoadReport, *, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map a U-Net state dict whose keys start with ``prefix``; other keys are unexpected."""
    encoder_part, rest = split_prefix(state, prefix + "encoder.")
    decoder_part, rest = split_prefix(rest, prefix + "decoder.", prefix + "segmentation_head.")
    report.unexpected += [str(k) for k in rest]
    encoder = match_resnet50_encoder(
        {k[len(prefix + "encoder."):]: v for k, v in encoder_part.items()}, report, source_prefix=prefix + "encoder."
    )
    decoder = match_keys(
        {k[len(prefix):]: v for k, v in decoder_part.items()}, unet_decoder_shapes(), report, source_prefix=prefix
    )
    return encoder, decoder
