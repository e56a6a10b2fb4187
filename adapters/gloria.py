"""GLoRIA (ICCV 2021): global-local image-text representations, ResNet-50 or ResNet-18 image encoder.

GLoRIA publishes PyTorch Lightning 1.1.4 checkpoints (``pretrained/chexpert_resnet50.ckpt``,
``chexpert_resnet18.ckpt``): ``state_dict``, ``hyper_parameters`` (an omegaconf ``DictConfig``), ``hparams_type``,
``callbacks`` keyed by callback class, optimizer and scheduler states (read safely: ``vlpbench.adapters.containers``).
Inside ``state_dict`` (``marshuang80/gloria``; ``pretrain_model.py:17-18`` holds the model as ``self.gloria``):

- ``gloria.img_encoder.model.*``: a torchvision ResNet with ``fc = Identity`` (``models/cnn_backbones.py:17-35``;
  ResNet-50 318 keys, ResNet-18 120), the variant told by the keys (bottleneck ``conv3`` or not).
- ``gloria.img_encoder.global_embedder.*``: ``Linear(2048 or 512 → 768)`` on the average-pooled layer4 feature
  (``models/vision_model.py:21``, ``73-75``). Mapped: ``embed_image``.
- ``gloria.img_encoder.local_embedder.weight``: ``Conv2d(1024 → 768, 1×1, no bias)`` on the layer3 feature map
  (``vision_model.py:22-29``, ``69-70``). Mapped: ``dense_embed``. ``cnn_backbones.py`` gives every ResNet an
  intermediate width of 1024, which only ResNet-50's layer3 has: on ResNet-18 (layer3: 256 channels) GLoRIA's
  own code cannot apply it, so a 1024-wide local embedder there is ignored and the instance has no
  ``dense_embed`` (a 256-wide one would be mapped).
- ``gloria.text_encoder.model.*``: the Bio_ClinicalBERT ``AutoModel`` (with pooler; transformers 4.2.1 saved
  ``embeddings.position_ids``), mapped with option ``text_encoder`` (a local Bio_ClinicalBERT folder: config and
  tokenizer; the weights come from the checkpoint) for ``embed_text``; otherwise ignored.

Zero-shot and grounding follow GLoRIA's code, not the CLIP defaults (``procedures``). GLoRIA's text features
(``models/text_model.py:92-144``, config ``last_n_layers: 4``, ``aggregate_method: sum``, ``agg_tokens: true``,
``norm: false``): the sum of BERT's last 4 hidden layers, word pieces summed into words up to ``[SEP]``, zero
padding after it (``aggregate_tokens``, ``text_model.py:32-90``); the sentence embedding is the mean of those
word vectors over all 97 positions. The image side runs at 299² (``vision_model.py:60``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    DENSE_EMBED,
    EMBED_IMAGE,
    EMBED_TEXT,
    GROUNDING,
    ZERO_SHOT,
    Adapter,
    CapabilityError,
    LoadReport,
    ModelCard,
    Weights,
    check_zero_shot_arguments,
    loaded_eval,
    match_encoder,
    match_keys,
    split_prefix,
    unwrap_state_dict,
)
from vlpbench.adapters.parts import strip
from vlpbench.adapters.text import bert_config, build_bert, match_bert, open_text_folder
from vlpbench.errors import ConfigError

IMAGE_MODEL_PREFIX = "gloria.img_encoder.model."
GLOBAL_EMBEDDER_PREFIX = "gloria.img_encoder.global_embedder."
LOCAL_EMBEDDER_PREFIX = "gloria.img_encoder.local_embedder."
TEXT_PREFIX = "gloria.text_encoder."
TEXT_MODEL_PREFIX = "gloria.text_encoder.model."
TEXT_SIDE_REASON = ("GLoRIA's text encoder (Bio_ClinicalBERT): mapped only with option text_encoder=DIR (a local "
                    "Bio_ClinicalBERT folder: config and tokenizer)")
LOCAL_EMBEDDER_REASON = ("GLoRIA's local embedder is 1024 wide for every ResNet (models/cnn_backbones.py:17-21), "
                         "but ResNet-18's layer3 has 256 channels: GLoRIA's own forward cannot apply it, so no "
                         "dense_embed (and no local similarity) is offered")
_TEXT_HINT = ("needs a text encoder: pass --model-option text_encoder=DIR (a local Bio_ClinicalBERT folder with "
              "config and tokenizer; the weights come from the checkpoint)")
SIMILARITIES = ("both", "global", "local")
# Config chexpert_pretrain_config.yaml: model.text.embedding_dim, data.text.word_num, last_n_layers.
EMBEDDING_DIM, WORD_NUM, LAST_N_LAYERS = 768, 97, 4
# vision_model.py:60 resizes every input to 299² (bilinear, align_corners=True).
_GLORIA_INPUT = 299
# Attention sharpening (gloria_model.py:117-119 and loss temp1 = 4.0) and the word-score scale of
# get_local_similarities (gloria_model.py:130).
_TEMP_ATTENTION, _TEMP_WORDS = 4.0, 5.0
# The smp encoder names of the torchvision ResNets GLoRIA publishes, told apart by the bottleneck's conv3, with
# their layer3 and layer4 widths (the local and the global embedder's input).
_BOTTLENECK_KEY = "layer1.0.conv3.weight"
_WIDTHS = {"resnet50": (1024, 2048), "resnet18": (256, 512)}
_SENTENCE_SPLIT = re.compile(r"[0-9]+\.")
_WORD = re.compile(r"\w+")


class GloriaAdapter(Adapter):
    """GLoRIA's ResNet image encoder with its global and local embedders, and (with ``text_encoder``) its BERT.

    Input contract (``configs/chexpert_pretrain_config.yaml``; ``builder.build_transformation``): the image is
    resized to 256 on its long side and zero-padded to 256² (``pretraining_dataset.py:201-247``), centre-cropped to
    224², normalised with mean = std = 0.5 (``norm: half``). vlpbench's ``preprocess`` resizes to 224² without the
    padding; the embeddings resize to 299² themselves, as GLoRIA's image encoder does.
    """

    name = "gloria"
    card = ModelCard(
        paper="Huang et al., GLoRIA: A Multimodal Global-Local Representation Learning Framework for "
              "Label-efficient Medical Image Recognition, ICCV 2021",
        repository="github.com/marshuang80/gloria (gloria/models/vision_model.py, text_model.py, gloria_model.py, "
                   "gloria/gloria.py)",
        checkpoints=("chexpert_resnet50.ckpt — Stanford Box link in the repository's README "
                     "(stanfordmedicine.box.com/s/j5h7q99f3pfi7enc0dom73m4nsm6yzvh)",
                     "chexpert_resnet18.ckpt — same link"),
        pretraining_data=("chexpert",),
        notes=("pre-trained on CheXpert with its reports (not public); the GLoRIA-MIMIC weights that papers such as "
               "MGCA and G2D report are not public",
               "the ResNet-18 file's local embedder cannot run on ResNet-18 in GLoRIA's own code; with a 1024-wide "
               "one this adapter offers no dense_embed and zero-shot only with similarity=global"),
    )
    description = ("GLoRIA (ICCV 2021) ResNet-50 / ResNet-18: the published Lightning chexpert_resnet*.ckpt; "
                   "local-global zero-shot and word-attention grounding with text_encoder=DIR")
    capabilities = frozenset({"features", EMBED_IMAGE, EMBED_TEXT, DENSE_EMBED})
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    default_options = {"text_encoder": "", "similarity": "both"}
    checkpoint_forms = (
        "GLoRIA chexpert_resnet50.ckpt (Lightning 1.1.4 checkpoint: gloria.img_encoder.model.* torchvision "
        "ResNet-50 without fc, 318 keys; global_embedder for embed_image; local_embedder for dense_embed; "
        "gloria.text_encoder.model.* with --model-option text_encoder=DIR)",
        "GLoRIA chexpert_resnet18.ckpt (the same with a ResNet-18, 120 keys)",
        "its state_dict alone, keys optionally prefixed 'module.' or '_orig_mod.'",
    )
    capability_hints = {
        **dict.fromkeys((EMBED_TEXT, ZERO_SHOT), _TEXT_HINT),
        GROUNDING: f"{_TEXT_HINT}; and a local embedder that fits the ResNet's layer3 (not GLoRIA's ResNet-18 files)",
        DENSE_EMBED: "this checkpoint's local embedder does not fit its ResNet's layer3 (GLoRIA's ResNet-18 files)",
    }
    procedures = {
        "zero_shot": (
            "GLoRIA's similarity per prompt (gloria/gloria.py:get_similarities, lines 218-237): with option "
            "similarity=both (default) the mean of the local similarity (models/gloria_model.py:"
            "get_local_similarities, lines 103-139: 5 × the best cosine of a prompt word with its attention-weighted "
            "image context, attention_fn temp 4.0) and the global cosine (get_global_similarities, lines 96-101); the "
            "word window is tokens 1..n with n the prompt's character count, as process_text computes cap_lens "
            "(gloria_model.py:229-231). The pair (positive, negative prompt) becomes a probability by a softmax over "
            "the two similarities, read at the positive one; GLoRIA's own zero_shot_classification (gloria.py:"
            "240-275) instead z-scores each class over the images of the batch, which makes a score depend on the "
            "other images"
        ),
        "grounding": (
            "GLoRIA's word-region attention (models/gloria_model.py:get_attn_maps, lines 141-143 → loss/"
            "gloria_loss.py:local_loss, lines 94-110, attention_fn lines 19-57, temp 4.0) over [CLS] and the "
            "phrase's words, reduced to one map per phrase by the maximum over those word maps, as GLoRIA's "
            "visualisation does (utils/utils.py:build_attention_images, lines 229-232); 19×19 at 299² input"
        ),
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``) and build the embedders and text encoder it carries.

        Raises:
            ConfigError: also when ``text_encoder`` is not a readable BERT folder, or ``similarity`` is not one of
                ``both``, ``global``, ``local``.
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        self.encoder_name = extra["encoder_name"]
        lacking = set()
        self._local = self._bert = self._tokenizer = self._text_encoder_record = None
        # The random init of the modules below is overwritten at once; keep it off the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            weight = extra["global_embedder"]["weight"]
            self._global = loaded_eval(nn.Linear(weight.shape[1], weight.shape[0]), extra["global_embedder"])
            if "local_embedder" in extra:
                out_dim, in_dim = extra["local_embedder"]["weight"].shape[:2]
                self._local = loaded_eval(nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False),
                                          extra["local_embedder"])
            else:
                lacking.add(DENSE_EMBED)
            if "text_model" in extra:
                self._bert = build_bert(extra["text_config"], extra["text_model"], pooler=True)
                self._tokenizer, self._text_encoder_record = open_text_folder(self.options["text_encoder"], self.name)
            else:
                lacking.add(EMBED_TEXT)
        self.capabilities = self.capabilities - lacking
        self._image_encoder: nn.Module | None = None

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Map the ResNet, both image embedders and (with ``text_encoder``) the BERT (module docstring).

        Raises:
            CheckpointError: the file is not a dict of tensors.
            ConfigError: ``similarity`` unknown, or ``text_encoder`` not a local BERT folder with a config.json.
        """
        if options["similarity"] not in SIMILARITIES:
            raise ConfigError(f"adapter 'gloria': option similarity={options['similarity']!r}; expected one of "
                              f"{', '.join(SIMILARITIES)} (GLoRIA's get_similarities similarity_type)")
        report = LoadReport("gloria")
        state, prefix = unwrap_state_dict(checkpoint, report, what="a GLoRIA checkpoint")
        image, rest = split_prefix(state, IMAGE_MODEL_PREFIX)
        image = strip(image, IMAGE_MODEL_PREFIX)
        encoder_name = "resnet50" if _BOTTLENECK_KEY in image or not image else "resnet18"
        report.layout = f"gloria-{encoder_name}{report.layout[len('gloria'):]}"  # after unwrapping's notes
        encoder = match_encoder(image, report, encoder_name, source_prefix=prefix + IMAGE_MODEL_PREFIX)
        extra: dict[str, Any] = {"encoder_name": encoder_name}

        text_side, rest = split_prefix(rest, TEXT_PREFIX)
        embedding_dim = _embedding_dim(rest)
        if options["text_encoder"]:
            config = bert_config(options["text_encoder"], cls.name)
            model_part, other = split_prefix(text_side, TEXT_MODEL_PREFIX)
            report.unexpected += [f"{prefix}{k}" for k in other]
            extra["text_model"] = match_bert(strip(model_part, TEXT_MODEL_PREFIX), report, config,
                                             source_prefix=prefix + TEXT_MODEL_PREFIX, target_prefix="text_model.")
            extra["text_config"] = config
            # GLoRIA has no text projection: the image embedders must emit the BERT's width.
            embedding_dim = config.hidden_size
        else:
            report.ignore(TEXT_SIDE_REASON, [prefix + k for k in text_side])

        pooled = _WIDTHS[encoder_name][1]
        global_part, rest = split_prefix(rest, GLOBAL_EMBEDDER_PREFIX)
        extra["global_embedder"] = match_keys(
            strip(global_part, GLOBAL_EMBEDDER_PREFIX), {"weight": (embedding_dim, pooled), "bias": (embedding_dim,)},
            report, source_prefix=prefix + GLOBAL_EMBEDDER_PREFIX, target_prefix="global_embedder.")
        local_part, rest = split_prefix(rest, LOCAL_EMBEDDER_PREFIX)
        local = _map_local_embedder(strip(local_part, LOCAL_EMBEDDER_PREFIX), encoder_name, embedding_dim, report,
                                    prefix + LOCAL_EMBEDDER_PREFIX)
        if local is not None:
            extra["local_embedder"] = local
        report.unexpected += [f"{prefix}{k}" for k in rest]
        return Weights(report, encoder, extra=extra)

    # --- image side (models/vision_model.py: resnet_forward, generate_embeddings) -------------------------

    @torch.no_grad()
    def _image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(average-pooled layer4 ``(B, C4)``, layer3 map ``(B, C3, 19, 19)``) of images resized to 299²."""
        if self._image_encoder is None:
            self._image_encoder = self.encoder().eval()
        x = nn.functional.interpolate(images.float(), size=(_GLORIA_INPUT, _GLORIA_INPUT), mode="bilinear",
                                      align_corners=True)
        features = self._image_encoder.to(x.device)(x)
        return features[-1].mean(dim=(2, 3)), features[-2]

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """GLoRIA's global image embeddings (``global_embedder`` on the pooled layer4 feature), L2-normalised."""
        pooled, _ = self._image_features(images)
        return nn.functional.normalize(self._global.to(pooled.device)(pooled), dim=-1)

    @torch.no_grad()
    def _local_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """GLoRIA's region embeddings ``(B, D, 19, 19)``: ``local_embedder`` on layer3, not normalised."""
        self.require(DENSE_EMBED)
        _, layer3 = self._image_features(images)
        return self._local.to(layer3.device)(layer3)

    def dense_embed(self, images: torch.Tensor) -> torch.Tensor:
        """GLoRIA's region embeddings (``local_embedder`` on layer3), L2-normalised over ``D``: ``(B, D, 19, 19)``."""
        return nn.functional.normalize(self._local_embeddings(images), dim=1)

    # --- text side (models/text_model.py: BertEncoder.forward, aggregate_tokens) --------------------------

    @torch.no_grad()
    def _encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """GLoRIA's text features of ``texts``: word embeddings ``(T, D, 97)``, sentence embeddings ``(T, D)``
        (neither normalised, as ``norm: false``) and each text's word count (without [CLS] and [SEP])."""
        self.require(EMBED_TEXT)
        words, counts = bert_word_features(self._tokenizer, self._bert, texts, "gloria")
        return words.transpose(1, 2), words.mean(dim=1), counts

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """GLoRIA's sentence embeddings, L2-normalised (``text_model.py:110-114``)."""
        _, sentences, _ = self._encode_text(texts)
        return nn.functional.normalize(sentences, dim=-1)

    # --- zero-shot and grounding (models/gloria_model.py, gloria/gloria.py) -------------------------------

    @torch.no_grad()
    def similarities(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """GLoRIA's image-text similarity ``(B, T)`` by option ``similarity`` (``gloria.py:get_similarities``).

        ``both``: (local + global) / 2; ``global``: the cosine of the global embeddings; ``local``: 5 × the best
        cosine of a word of the text with its attention-weighted region context, over the word window of
        ``get_local_similarities`` (tokens 1..n, n the text's character count: ``gloria_model.py:229-231``).

        Raises:
            CapabilityError: no text encoder, or a local similarity asked of a checkpoint without local embedder.
        """
        kind = self.options["similarity"]
        if kind != "global" and DENSE_EMBED not in self.capabilities:
            raise CapabilityError(f"adapter 'gloria': similarity={kind} needs the local embedder, which this "
                                  f"checkpoint cannot apply ({LOCAL_EMBEDDER_REASON}); pass --model-option "
                                  f"similarity=global")
        words, sentences, _ = self._encode_text(texts)
        pooled, layer3 = self._image_features(images)  # one ResNet pass for both similarities
        result = []
        if kind != "local":
            image = nn.functional.normalize(self._global.to(pooled.device)(pooled), dim=-1)
            result.append(image @ nn.functional.normalize(sentences, dim=-1).to(image.device).T)
        if kind != "global":
            regions = self._local.to(layer3.device)(layer3)
            words = words.to(regions.device)
            windows = [words[i, :, 1:min(len(text), WORD_NUM - 1) + 1] for i, text in enumerate(texts)]
            result.append(torch.stack([local_similarity(regions, w) for w in windows], dim=1))
        return sum(result) / len(result)

    def zero_shot_scores(self, images: torch.Tensor, classes: list[str],
                         templates: tuple[str, str] = ("{}", "no {}")) -> torch.Tensor:
        """Probability per class ``(B, len(classes))``: softmax over GLoRIA's similarities of the image with the
        positive and the negative prompt, read at the positive one (``procedures["zero_shot"]``).

        Raises:
            CapabilityError: no text encoder, or the local embedder is needed but cannot be applied.
            ConfigError: ``templates`` is not a pair of strings with one ``{}`` each, or no classes.
        """
        self.require(ZERO_SHOT)
        check_zero_shot_arguments(classes, templates)
        prompts = [t.format(c) for c in classes for t in templates]
        scores = self.similarities(images, prompts).view(images.shape[0], len(classes), 2)
        return scores.softmax(dim=-1)[..., 0]

    @torch.no_grad()
    def grounding_maps(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Heat maps ``(B, len(texts), 19, 19)``: GLoRIA's word-region attention of each phrase, the maximum over
        [CLS] and its words (``procedures["grounding"]``).

        Raises:
            CapabilityError: no text encoder or no applicable local embedder.
            ConfigError: ``texts`` is not a non-empty list of strings.
        """
        self.require(DENSE_EMBED, EMBED_TEXT)
        words, _, counts = self._encode_text(texts)
        regions = self._local_embeddings(images)
        words = words.to(regions.device)
        # get_attn_maps → _calc_local_loss: cap_lens = words + 1, window [:cap_len] = [CLS] and the words.
        maps = [attention(words[i, :, :count + 1], regions)[1].amax(dim=1) for i, count in enumerate(counts)]
        return torch.stack(maps, dim=1)


def clean_text(text: str) -> str:
    """GLoRIA's report cleaning (``gloria_model.py:process_text``, lines 171-198): sentences split at numbered
    points and full stops, each lower-cased and reduced to its ASCII ``\\w+`` tokens, joined by spaces.

    GLoRIA also drops sentences of one token (line 188), meant for report fragments; applied to a one-word class
    prompt such as ``"pneumonia"`` it would leave an empty text, so one-word sentences are kept here.
    """
    sentences = [s for point in _SENTENCE_SPLIT.split(text.replace("\n", " ")) for s in point.split(".")]
    cleaned = []
    for sentence in sentences:
        tokens = [t.encode("ascii", "ignore").decode("ascii") for t in _WORD.findall(sentence.lower())]
        if tokens := [t for t in tokens if t]:
            cleaned.append(" ".join(tokens))
    return " ".join(cleaned)


def bert_word_features(tokenizer: Any, bert: nn.Module, texts: list[str], adapter: str,
                       word_num: int = WORD_NUM, last_n_layers: int = LAST_N_LAYERS) -> tuple[torch.Tensor, list[int]]:
    """GLoRIA's word features (``text_model.py:93-148``; CARZero's text model is the same code): the texts
    cleaned, tokenised to ``word_num`` positions, the sum of BERT's last ``last_n_layers`` hidden states, word
    pieces merged (:func:`aggregate_word_pieces`) and zeros after ``[SEP]``: ``(T, word_num, D)``, with each
    text's word count (without ``[CLS]`` and ``[SEP]``).

    Raises:
        ConfigError: ``texts`` is not a non-empty list of strings, or the tokenizer is not a BERT tokenizer
            (the message names ``adapter``).
    """
    if isinstance(texts, str) or not texts:
        raise ConfigError(f"adapter {adapter!r} takes a non-empty list of texts, got {texts!r}")
    batch = tokenizer([clean_text(t) for t in texts], padding="max_length", truncation=True,
                      max_length=word_num, return_tensors="pt")
    device = next(bert.parameters()).device
    out = bert(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
               token_type_ids=batch["token_type_ids"].to(device), output_hidden_states=True)
    hidden = torch.stack(out.hidden_states[-last_n_layers:]).sum(dim=0)  # (T, L, D): aggregate_method sum
    words, counts = [], []
    for states, ids in zip(hidden, batch["input_ids"]):
        merged = aggregate_word_pieces(states, tokenizer.convert_ids_to_tokens(ids.tolist()), adapter)
        counts.append(len(merged) - 2)
        words.append(torch.cat([torch.stack(merged), states.new_zeros(word_num - len(merged), states.shape[-1])]))
    return torch.stack(words), counts


def aggregate_word_pieces(states: torch.Tensor, tokens: list[str], adapter: str = "gloria") -> list[torch.Tensor]:
    """GLoRIA's ``aggregate_tokens`` (``text_model.py:32-90``) for one text: the vectors of ``[CLS]``, each word
    (its ``##`` pieces summed) and ``[SEP]``; what follows ``[SEP]`` is dropped."""
    merged, bank = [], []
    for state, token in zip(states, tokens):
        if token == "[SEP]":
            return merged + [torch.stack(bank).sum(dim=0), state]
        if token.startswith("##"):
            bank.append(state)
        else:
            if bank:
                merged.append(torch.stack(bank).sum(dim=0))
            bank = [state]
    raise ConfigError(f"adapter {adapter!r}: a tokenised text has no [SEP] token; the text encoder folder's tokenizer "
                      "is not a BERT tokenizer")


def attention(words: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GLoRIA's ``attention_fn`` (``loss/gloria_loss.py:19-57``) of one text's words ``(D, n)`` over the regions
    ``(B, D, h, w)`` of each image: the attention-weighted region context ``(B, D, n)`` and the attention maps
    ``(B, n, h, w)``. Each region's scores are first normalised over the words, then each word's over the regions
    with temperature 4."""
    batch, dim, height, width = regions.shape
    context = regions.reshape(batch, dim, height * width)
    scores = torch.einsum("bdr,dn->brn", context, words).softmax(dim=-1)  # over words
    attn = (scores.transpose(1, 2) * _TEMP_ATTENTION).softmax(dim=-1)  # (B, n, regions), over regions
    return torch.bmm(context, attn.transpose(1, 2)), attn.view(batch, -1, height, width)


def local_similarity(regions: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """GLoRIA's ``get_local_similarities`` (``gloria_model.py:103-139``) for one text's word window ``(D, n)``:
    ``log(max_w exp(5 · cos(word_w, context_w)))`` = 5 × the best word's cosine, per image ``(B,)``."""
    context, _ = attention(words, regions)
    # gloria_loss.py:cosine_similarity: the product of the norms is clamped, so a zero (padding) word scores 0.
    cos = (words.unsqueeze(0) * context).sum(dim=1) / (words.norm(dim=0) * context.norm(dim=1)).clamp(min=1e-8)
    return (cos * _TEMP_WORDS).amax(dim=1)


def _embedding_dim(state: Mapping[str, Any]) -> int:
    """The image embedders' output width: the rows of the global embedder in the file, else GLoRIA's 768."""
    weight = state.get(GLOBAL_EMBEDDER_PREFIX + "weight")
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.ndim == 2 else EMBEDDING_DIM


def _map_local_embedder(part: Mapping[str, Any], encoder_name: str, embedding_dim: int, report: LoadReport,
                        source_prefix: str) -> dict[str, torch.Tensor] | None:
    """Account the local embedder: mapped when it fits the ResNet's layer3, ignored when it is the 1024-wide one of
    GLoRIA's ResNet-18 code (``LOCAL_EMBEDDER_REASON``); None when it is not mapped."""
    layer3 = _WIDTHS[encoder_name][0]
    weight = part.get("weight")
    if (encoder_name == "resnet18" and isinstance(weight, torch.Tensor)
            and tuple(weight.shape) == (embedding_dim, 1024, 1, 1) and set(part) == {"weight"}):
        report.ignore(LOCAL_EMBEDDER_REASON, [source_prefix + "weight"])
        return None
    local = match_keys(part, {"weight": (embedding_dim, layer3, 1, 1)}, report, source_prefix=source_prefix,
                       target_prefix="local_embedder.")
    return local if "weight" in local else None

