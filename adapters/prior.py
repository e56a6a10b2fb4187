"""PRIOR (Cheng et al., ICCV 2023): a single-channel ResNet-50 with prototype-based image-report alignment.

PRIOR publishes two files (QtacierP/PRIOR readme.md, "Pre-trained weights"), both loaded here and told apart by
their keys:

- ``pretrained/prior_resnet50.pt`` (in the repository), layout ``"image_encoder"``: the state dict of
  ``resnet50_224(in_channels=1)`` (codes/prior/encoders/image/resnet.py:137-146): torchvision's ResNet-50 whose
  ``conv1`` takes one channel (weight ``(64, 1, 7, 7)``) and whose ``fc`` is ``nn.Identity()``: 318 keys, no
  ``fc``. (Users load it by prefixing ``encoder.`` and loading strictly into PRIOR's ``ResNet``; the blob is not
  in the git mirror read for this adapter.)
- the whole image-text model (Google Drive link in the readme), layout ``"full"``: a plain state dict of
  ``Prior`` (codes/prior/models/prior.py:19-111), which ``ZeroShotClassificationModel`` loads with
  ``torch.load`` + ``load_state_dict`` (codes/prior/downstream/zero_classification_model.py:81-83):

  - ``image_encoder.encoder.*``: the same ResNet-50 (318 keys); ``image_encoder.atten_pool.*``: CLIP-style
    attention pool over the 7×7 layer4 grid, 8 heads, ``positional_embedding (50, 2048)`` and separate
    ``q/k/v/c_proj`` (resnet.py:15-48, 59-63; ``pool_method: attention``, configs/image_encoder/resnet.yaml);
    ``global_image_projection`` Linear 2048→768 (prior.py:35). Mapped: ``embed_image``.
  - ``text_encoder.encoder.*``: Bio_ClinicalBERT ``AutoModel`` with pooler (codes/prior/encoders/language/bert.py);
    ``local_text_projection`` Linear hidden→768 (prior.py:38); ``sentence_bank.embed`` the 512 sentence
    prototypes (SPB, codes/prior/modules/spb.py:8-17); ``global_text_attention`` the sentence attention pool, 8
    heads, no positional embedding (prior.py:30, codes/prior/modules/sentence_pool.py). Mapped with option
    ``text_encoder`` (a local Bio_ClinicalBERT folder: config and tokenizer): ``embed_text``; ignored otherwise.
  - ignored, each with its reason: ``local_image_projection``, ``global_text_projection``, ``predictor``,
    ``local_cross_attention``, ``sentence_decoder``, ``prototype_queries``, ``image_decoder``, ``logit_scale``,
    ``local_logit_scale``.

``encoder()`` is an smp ResNet-50 built with ``in_channels=1`` behind ``GreyInputEncoder``, which takes the
protocols' three-channel input (``vlpbench.adapters.single_channel``): the network receives the task-normalised
grey value. PRIOR normalised its pre-training images with mean 0.4755, std 0.3011 (one channel,
codes/prior/data/pretrain/mimiccxr.py:116-119): this adapter's ``mean``/``std``, used by ``preprocess`` (zero-shot);
the image tasks apply their own (e.g. MGCA's 0.5/0.5); BenchX used 0.4978/0.2449 for every model
(preprocess/mmsegmentation/configs/_base_/models/upernet_my_r50.py, with ``RGB2Gray`` and ``in_channels=1`` for
PRIOR in benchmark/*/upernet_prior.py).
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
)
from vlpbench.adapters.parts import match_head, strip
from vlpbench.adapters.single_channel import CONVERSION, GreyInputEncoder
from vlpbench.adapters.text import TEXT_ENCODER_HINT, bert_config, build_bert, match_bert, open_text_folder
from vlpbench.errors import CheckpointError, ConfigError

LAYOUTS = ("image_encoder", "full")
IMAGE_PREFIX, POOL_PREFIX = "image_encoder.encoder.", "image_encoder.atten_pool."
IMAGE_PROJECTION = "global_image_projection."
TEXT_PREFIX, TEXT_PROJECTION = "text_encoder.encoder.", "local_text_projection."
BANK, TEXT_POOL = "sentence_bank.embed.", "global_text_attention."
# configs/pretrain_model/prior.yaml: embed_dim 768; spb_k 512. resnet.py:62: 7×7 grid, 8 heads.
EMBED_DIM, PROTOTYPES, VISUAL_WIDTH, HEADS, GRID = 768, 512, 2048, 8, 7
# SPB's Gumbel-softmax temperature (spb.py:9, temp_decay: fixed).
SPB_TEMPERATURE = 0.9
# PRIOR tokenises prompts padded to 256 tokens (codes/prior/data/zero_shot_classification/chexpert_zls.py:46-73).
_TEXT_LENGTH = 256

TEXT_SIDE_REASON = ("PRIOR's text side (text_encoder: Bio_ClinicalBERT; local_text_projection, sentence_bank, "
                    "global_text_attention): mapped only with option text_encoder=DIR (a local Bio_ClinicalBERT "
                    "folder: config and tokenizer)")
IGNORED_PARTS = (
    (("local_image_projection.",), "PRIOR's local image projection (layer4 tokens → 768) of its local alignment "
                                   "and reconstruction losses; no protocol uses patch embeddings of PRIOR"),
    (("global_text_projection.",), "defined by PRIOR but unused: its global text embedding is pooled from the "
                                   "sentence prototypes (prior.py:133-138, 346-350)"),
    (("predictor.",), "SimSiam predictor of PRIOR's local alignment loss (prior.py:39-41, 219-224)"),
    (("local_cross_attention.",), "PRIOR's local cross-attention between image patches and sentences, used by its "
                                  "local alignment loss (codes/prior/modules/local_attention.py)"),
    (("sentence_decoder.", "prototype_queries"), "PRIOR's sentence-prototype decoder and its queries, which "
                                                 "reconstruct reports in pre-training (prior.py:45-47, 235-256)"),
    (("image_decoder.",), "PRIOR's image reconstruction decoder (codes/prior/decoders/image.py), pre-training only"),
    (("logit_scale", "local_logit_scale"), "temperatures of PRIOR's contrastive losses; embeddings are compared "
                                           "by cosine"),
)


class SeparateProjectionPool(nn.Module):
    """PRIOR's attention pools (resnet.py:15-48, sentence_pool.py:5-43): the mean token queries itself and the
    tokens, with separate q/k/v projections and ``c_proj`` as output projection; a learned positional embedding
    for the image pool, none for the sentence pool. Takes ``(L, B, dim)`` tokens, returns ``(B, dim)``."""

    def __init__(self, dim: int, heads: int, positions: int = 0) -> None:
        super().__init__()
        self.heads = heads
        if positions:
            self.positional_embedding = nn.Parameter(torch.zeros(positions, dim))
        self.k_proj, self.q_proj, self.v_proj, self.c_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
        if hasattr(self, "positional_embedding"):
            x = x + self.positional_embedding[:, None, :].to(x.dtype)
        # PRIOR attends with every token as query and keeps the first output: querying with the first alone is
        # the same number.
        out, _ = nn.functional.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.heads,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, training=False, need_weights=False, use_separate_proj_weight=True,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight)
        return out[0]


def image_pool() -> SeparateProjectionPool:
    """PRIOR's image attention pool: 2048 wide, 8 heads, 7² + 1 positions."""
    return SeparateProjectionPool(VISUAL_WIDTH, HEADS, GRID**2 + 1)


def sentence_pool() -> SeparateProjectionPool:
    """PRIOR's ``global_text_attention``: 768 wide, 8 heads, no positional embedding."""
    return SeparateProjectionPool(EMBED_DIM, HEADS)


def one_channel_encoder_shapes() -> dict[str, tuple[int, ...]]:
    """The smp ResNet-50 encoder's keys and shapes with a one-channel ``conv1`` (64, 1, 7, 7)."""
    return {**resnet50_encoder_shapes(), "conv1.weight": (64, 1, 7, 7)}


class PriorAdapter(Adapter):
    """PRIOR's single-channel ResNet-50; from the full checkpoint also its 768-d global embeddings.

    Input contract (mimiccxr.py:39-40, 116-119; configs/image_transformation.yaml): one grey channel, resized to
    224×224, normalised with mean 0.4755, std 0.3011. ``encoder()`` and the embeddings take three-channel input
    and reduce it to that channel (``GreyInputEncoder``); ``mean``/``std`` hold PRIOR's statistics per channel.
    """

    name = "prior"
    card = ModelCard(
        paper="Cheng et al., PRIOR: Prototype Representation Joint Learning from Medical Images and Reports, ICCV 2023",
        repository="github.com/QtacierP/PRIOR (codes/prior/models/prior.py, codes/prior/encoders/image/resnet.py)",
        checkpoints=("pretrained/prior_resnet50.pt — in the repository (image encoder)",
                     "the whole image-text model — Google Drive link in the repository's readme"),
        pretraining_data=("mimic_cxr",),
        notes=("single-channel input: conv1 takes one channel; encoder() reduces the protocols' three equal "
               "channels to one (BT.601 luma), so the network sees the task's normalisation of the grey value",
               "PRIOR pre-trained with mean 0.4755, std 0.3011; BenchX evaluated it with 0.4978/0.2449; the image "
               "tasks use their own unless set",
               "embed_text runs PRIOR's sentence-prototype bank without its Gumbel noise (deterministic)"),
    )
    description = ("PRIOR (ICCV 2023) single-channel ResNet-50: prior_resnet50.pt or the full image-text "
                   "checkpoint; 768-d global embeddings, text side with text_encoder=DIR")
    capabilities = frozenset({"features", EMBED_IMAGE, EMBED_TEXT})
    in_channels = 1
    mean = (0.4755,) * 3
    std = (0.3011,) * 3
    default_options = {"text_encoder": ""}
    checkpoint_forms = (
        "PRIOR pretrained/prior_resnet50.pt (torchvision ResNet-50, conv1 (64, 1, 7, 7), fc = Identity, 318 keys)",
        "PRIOR whole image-text state dict (image_encoder.encoder.*, image_encoder.atten_pool, "
        "global_image_projection for embed_image; text_encoder.encoder.*, local_text_projection, sentence_bank, "
        "global_text_attention with --model-option text_encoder=DIR; decoders and local heads ignored)",
    )
    capability_hints = {
        EMBED_IMAGE: "needs PRIOR's whole image-text checkpoint, which holds the attention pool and projection",
        EMBED_TEXT: f"zero-shot needs the whole image-text checkpoint and --model-option text_encoder=DIR "
                    f"({TEXT_ENCODER_HINT})",
    }
    procedures = {
        ZERO_SHOT: "PRIOR's global alignment (prior.py:140-168): embed_image = global_image_projection(attention "
                   "pool(layer4)); embed_text = global_text_attention(SPB prototype of the mean local_text_projection "
                   "of the prompt's tokens after [CLS]), as zero_classification_model.py:98-117 embeds a prompt, with "
                   "SPB's Gumbel noise left out (spb.py:27-37: softmax(x·bank/0.9)·bank); cosine similarity; each "
                   "class scored by vlpbench's default, the softmax over the cosines with the positive and negative "
                   "prompt (CheXzero). PRIOR's own zero-shot adds a local attention term and picks one of 5 classes",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``) and build the heads it carries.

        Raises:
            ConfigError: also when ``text_encoder`` is not a readable BERT folder (config or tokenizer).
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        lacking = set()
        self._pool = self._image_projection = self._bert = self._tokenizer = self._text_encoder_record = None
        self._text_projection = self._bank = self._sentence_pool = None
        # The random init of the modules below is overwritten at once; keep it off the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            if "pool" in extra:
                self._pool = loaded_eval(image_pool(), extra["pool"])
                self._image_projection = loaded_eval(nn.Linear(VISUAL_WIDTH, EMBED_DIM), extra["image_projection"])
            else:
                lacking.add(EMBED_IMAGE)
            if "text_model" in extra:
                config = extra["text_config"]
                self._bert = build_bert(config, extra["text_model"], pooler=True)
                self._text_projection = loaded_eval(nn.Linear(config.hidden_size, EMBED_DIM),
                                                    extra["text_projection"])
                self._bank = extra["bank"]["weight"]
                self._sentence_pool = loaded_eval(sentence_pool(), extra["sentence_pool"])
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
            ConfigError: ``text_encoder`` given for the image-encoder file, or not a local BERT folder.
        """
        layout = detect_layout(checkpoint)
        report = LoadReport(layout)
        if layout == "image_encoder":
            if options["text_encoder"]:
                raise ConfigError("adapter 'prior': option text_encoder needs PRIOR's whole image-text checkpoint; "
                                  "this file is the image encoder alone (prior_resnet50.pt)")
            return Weights(report, _match_encoder(checkpoint, report, source_prefix=""))

        state = dict(checkpoint)
        for prefixes, reason in IGNORED_PARTS:
            part, state = split_prefix(state, *prefixes)
            report.ignore(reason, list(part))
        extra: dict[str, Any] = {}
        text_side, state = split_prefix(state, TEXT_PREFIX, TEXT_PROJECTION, BANK, TEXT_POOL)
        if options["text_encoder"]:
            extra.update(_map_text_side(text_side, options["text_encoder"], report))
        else:
            report.ignore(TEXT_SIDE_REASON, list(text_side))
        heads, state = split_prefix(state, POOL_PREFIX, IMAGE_PROJECTION)
        extra["pool"] = match_head(heads, POOL_PREFIX, image_pool, report)
        extra["image_projection"] = match_head(heads, IMAGE_PROJECTION, lambda: nn.Linear(VISUAL_WIDTH, EMBED_DIM),
                                               report)
        image, rest = split_prefix(state, IMAGE_PREFIX)
        report.unexpected += [str(k) for k in rest]
        return Weights(report, _match_encoder(strip(image, IMAGE_PREFIX), report, source_prefix=IMAGE_PREFIX),
                       extra=extra)

    def encoder(self) -> nn.Module:
        """A new ``GreyInputEncoder`` around an smp ResNet-50 with ``in_channels=1`` holding PRIOR's weights.

        ``forward(x)`` takes ``(B, 3, H, W)`` (the protocols' input), reduces it to one channel (BT.601 luma; the
        grey value itself on equal channels) and returns 6 feature maps with ``out_channels``
        ``(3, 64, 256, 512, 1024, 2048)``. The module is in training mode, like any new module.
        """
        from segmentation_models_pytorch.encoders import get_encoder

        with torch.device("meta"):
            module = get_encoder(self.encoder_name, in_channels=1, weights=None)
        # ResNets have no non-persistent buffers, so every tensor is filled by the strict load below.
        module = module.to_empty(device="cpu")
        module.load_state_dict(dict(self._encoder_state))
        return GreyInputEncoder(module)

    def describe(self) -> dict[str, Any]:
        """``Adapter.describe`` plus what the network receives."""
        record = super().describe()
        record["input_conversion"] = CONVERSION
        return record

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """768-d global image embeddings: ``global_image_projection(atten_pool(layer4))``, L2-normalised.

        Raises:
            CapabilityError: the checkpoint is prior_resnet50.pt, without the pool and projection.
            ConfigError: the input is not 224×224 (the pool's positional embedding holds 7² + 1 positions).
        """
        self.require(EMBED_IMAGE)
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ConfigError(f"adapter 'prior': embed_image needs {self.image_size}×{self.image_size} input, got "
                              f"{tuple(images.shape[-2:])}: PRIOR's attention pool has {GRID**2 + 1} positions "
                              f"(7×7 + 1), fixed at pre-training; use adapter.preprocess()")
        if self._image_encoder is None:
            self._image_encoder = self.encoder().eval()
        layer4 = self._image_encoder.to(images.device)(images)[-1]
        pooled = self._pool.to(images.device)(layer4.flatten(start_dim=2).permute(2, 0, 1))
        return nn.functional.normalize(self._image_projection.to(images.device)(pooled), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """768-d global text embeddings, each text embedded as PRIOR embeds a zero-shot prompt, L2-normalised.

        Tokenised as PRIOR does (padded to 256 tokens, no token types); the BERT's last hidden states after
        position 0 where the attention mask is 1 (the words and [SEP]) are projected by ``local_text_projection``
        and averaged (one sentence), replaced by their prototype mixture ``softmax(x·bank / 0.9)·bank`` (SPB
        without the Gumbel noise PRIOR draws), and pooled by ``global_text_attention`` over that one sentence.

        Raises:
            CapabilityError: no ``text_encoder`` was given.
        """
        self.require(EMBED_TEXT)
        batch = self._tokenizer(list(texts), padding="max_length", truncation=True, max_length=_TEXT_LENGTH,
                                return_tensors="pt")
        hidden = self._bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        # zero_classification_model.py:106-110: positions 1 .. L-2, kept where the attention mask is 1.
        words = self._text_projection(hidden[:, 1:-1])
        mask = batch["attention_mask"][:, 1:-1, None].to(words.dtype)
        sentence = (words * mask).sum(dim=1) / mask.sum(dim=1)
        prototype = (sentence @ self._bank.T / SPB_TEMPERATURE).softmax(dim=-1) @ self._bank
        return nn.functional.normalize(self._sentence_pool(prototype[None]), dim=-1)


def detect_layout(checkpoint: Any) -> str:
    """``"full"`` when any key starts with ``image_encoder.``, else ``"image_encoder"`` (prior_resnet50.pt).

    Raises:
        CheckpointError: the object is not a dict of keys.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"a PRIOR checkpoint is a dict of tensors; this file holds a {type(checkpoint).__name__}")
    return "full" if any(isinstance(k, str) and k.startswith("image_encoder.") for k in checkpoint) else "image_encoder"


def _match_encoder(found: Mapping[str, Any], report: LoadReport, *, source_prefix: str) -> dict[str, torch.Tensor]:
    """Account ``found`` (torchvision names) against the one-channel ResNet-50 encoder."""
    return match_keys(found, one_channel_encoder_shapes(), report, source_prefix=source_prefix,
                      target_prefix="encoder.")


def _map_text_side(text_side: Mapping[str, Any], text_encoder: str, report: LoadReport) -> dict[str, Any]:
    """Account PRIOR's text encoder, token projection, prototype bank and sentence pool; return their tensors."""
    config = bert_config(text_encoder, "prior")
    return {
        "text_model": match_bert(strip(text_side, TEXT_PREFIX), report, config, source_prefix=TEXT_PREFIX,
                                 target_prefix="text_model."),
        "text_projection": match_head(text_side, TEXT_PROJECTION, lambda: nn.Linear(config.hidden_size, EMBED_DIM),
                                      report),
        "bank": match_head(text_side, BANK, lambda: nn.Embedding(PROTOTYPES, EMBED_DIM), report),
        "sentence_pool": match_head(text_side, TEXT_POOL, sentence_pool, report),
        "text_config": config,
    }
