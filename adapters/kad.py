"""KAD (Nature Communications 2023): a ResNet-50 image encoder queried by disease names through a Transformer.

KAD's pre-training (``xiaoman-zhang/KAD``, ``A3_CLIP/main.py:191-216``) saves ``best_valid.pt`` as a dict of
``model`` (the ``TQN_Model`` query network), ``image_encoder`` (``ModelRes512``, or ``ModelRes`` when the
config's ``img_res`` is 224), ``text_encoder`` (``CLP_clinical``), ``optimizer``, ``lr_scheduler``, ``config``
and ``epoch``. The modules (``A3_CLIP/models/clip_tqn.py``) and their keys:

- ``image_encoder``: ``resnet`` is a whole torchvision ResNet-50 (320 keys with ``fc``) and ``res_features`` is
  ``nn.Sequential(*list(resnet.children())[:-2])`` (``ModelRes512``, ``clip_tqn.py:236-245``) or ``[:-3]``
  (``ModelRes``, ``:119-128``): the *same* modules under a second name, so the state dict holds each trunk
  tensor twice. The forward runs ``res_features`` (``:258``, ``:142``), then ``res_l1`` → ReLU → ``res_l2`` on
  every patch: Linear(2048, 2048), Linear(2048, 768) at 512; Linear(1024, 1024), Linear(1024, 768) for
  ``ModelRes``, whose ``res_features`` ends at layer3 (``children[:-3]``), so its ``resnet.layer4`` never
  ran in training and still holds the ImageNet initialisation. This adapter maps ``res_features`` and checks
  that every ``resnet.*`` duplicate equals it; ``resnet.fc`` and ``ModelRes``'s ``resnet.layer4`` are
  ignored as unused. The ``ModelRes`` encoder has 4 stages (``encoder_depth`` 4, like MedKLIP's).
- ``model`` (``TQN_Model``, ``clip_tqn.py:184-233``): a 4-layer pre-norm Transformer decoder (width 768,
  4 heads, FFN 1024, ReLU; ``transformer_decoder.py:47-124``) whose queries are the class-name embeddings and
  whose memory is the image tokens, ``mlp_head`` Linear(768, 2). ``decoder_norm`` is also the decoder's
  final ``norm`` (``clip_tqn.py:194-196``): ``decoder.norm.*`` duplicates ``decoder_norm.*``, checked equal.
  ``logit_scale`` is ignored (never used in a forward).
- ``text_encoder`` (``CLP_clinical``, ``clip_tqn.py:34-84``): ``bert_model`` (a ``BertModel`` with pooler,
  Med-KEBERT) and ``mlp_embed`` (Linear, GELU, Linear over the pooler output); ``logit_scale`` is ignored.
  It is mapped when option ``text_encoder`` names a local BERT folder (config and tokenizer), which enables
  ``zero_shot_scores`` and ``grounding_maps``; otherwise it is ignored.

``image_encoder_shapes`` and ``query_network_shapes`` give the expected keys and shapes of the first two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    GROUNDING,
    ZERO_SHOT,
    Adapter,
    LoadReport,
    ModelCard,
    Weights,
    check_zero_shot_arguments,
    encoder_shapes,
    loaded_eval,
    match_keys,
    tensor_spec,
)
# MedKLIP's decoder layer is KAD's too (both from DETR's pre-norm TransformerDecoderLayer, same key names):
# KAD's forward_pre, transformer_decoder.py:101-124, is MedKLIP's with another width.
from vlpbench.adapters.medklip import QueryDecoderLayer
from vlpbench.adapters.text import bert_config, build_bert, match_bert, text_encoder_record
from vlpbench.errors import CheckpointError, ConfigError

# The three state dicts of best_valid.pt (A3_CLIP/main.py:206-214) and the training state beside them.
PARTS = ("image_encoder", "model", "text_encoder")
TRAINING_STATE_REASON = ("training state of best_valid.pt (optimizer, lr_scheduler, config, epoch; "
                         "A3_CLIP/main.py:206-214): resumes pre-training, not used for evaluation")
DUPLICATE_TRUNK_REASON = ("resnet.* trunk tensors: the same modules as res_features.* (ModelRes512/ModelRes build "
                          "res_features from resnet.children(), models/clip_tqn.py:93,126), which the forward runs "
                          "(:258, :142) and this adapter maps; checked equal")
UNUSED_RESNET_REASON = ("resnet.* outside res_features (fc; layer4 of the 224 ModelRes, children[:-3]): never run "
                        "by the image encoder's forward (models/clip_tqn.py:139-150, 255-267), so never trained")
DUPLICATE_NORM_REASON = ("decoder.norm: the same LayerNorm as decoder_norm (TQN_Model passes self.decoder_norm as "
                         "the decoder's norm, models/clip_tqn.py:194-196), mapped under that name; checked equal")
LOGIT_SCALE_REASON = ("logit_scale of TQN_Model and CLP_clinical (models/clip_tqn.py:47, 191): used by no forward "
                      "pass and no loss (ClipLoss makes its own scale, factory/loss.py:90)")
TEXT_SIDE_REASON = ("text_encoder (CLP_clinical: Med-KEBERT and mlp_embed): mapped only with option "
                    "text_encoder=DIR (a local Med-KEBERT folder: config and tokenizer)")
QUERY_HINT = ("needs KAD's text side: pass --model-option text_encoder=DIR (a local Med-KEBERT folder, "
              "xmcmic/Med-KEBERT: config.json and tokenizer files; the weights come from the checkpoint)")
STAGE_NOTE_224 = ("KAD's 224 image encoder (ModelRes) runs ResNet-50 to layer3 (children[:-3]); the checkpoint's "
                  "resnet.layer4 was never trained (ImageNet weights), so features end at layer3 "
                  "(1024 ch, stride 16)")

# TQN_Model(embed_dim=768) with TransformerDecoderLayer(768, 4, 1024, 0.1, 'relu', normalize_before=True) × 4
# (models/clip_tqn.py:185-196); CLP_clinical's embed_dim is the same 768 (:37).
WIDTH, HEADS, FFN, LAYERS = 768, 4, 1024, 4
# Zero-shot tokenisation: max_length 256 (test_chexpert.py:341), pad_to_max_length (:96), lower case (:70).
TEXT_MAX_LENGTH = 256
# res_features index → torchvision ResNet-50 module (2 and 3 are the parameter-free ReLU and max-pool).
TRUNK_STAGES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
# The two image encoders: layer4 in res_features or not, and the width res_l1/res_l2 read.
VARIANTS = {
    "ModelRes512": {"stages": ("0", "1", "4", "5", "6", "7"), "features": 2048, "depth": 5, "img_res": 512},
    "ModelRes": {"stages": ("0", "1", "4", "5", "6"), "features": 1024, "depth": 4, "img_res": 224},
}
_TORCHVISION_FC = {"fc.weight": (1000, 2048), "fc.bias": (1000,)}


class QueryNetwork(nn.Module):
    """KAD's ``TQN_Model`` for evaluation, by its key names (``decoder.norm`` is ``decoder_norm``, as in KAD).

    ``forward(tokens (B, N, 768), queries (Q, 768))`` returns the logits ``(B, Q, 2)`` (absent, present) and the
    head-averaged cross-attention of the last decoder layer ``(B, Q, N)``, which KAD's decoder returns
    (``transformer_decoder.py:27-44``). Dropout is off (eval).
    """

    def __init__(self) -> None:
        super().__init__()
        self.decoder_norm = nn.LayerNorm(WIDTH)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(QueryDecoderLayer(WIDTH, HEADS, FFN) for _ in range(LAYERS))
        self.mlp_head = nn.Sequential(nn.Linear(WIDTH, 2))

    def forward(self, tokens: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = tokens.shape[0]
        # clip_tqn.py:222-227: both inputs pass decoder_norm, sequence first, the queries repeated per image.
        memory = self.decoder_norm(tokens.transpose(0, 1))
        x = self.decoder_norm(queries).unsqueeze(1).repeat(1, batch, 1)
        attention = None
        for layer in self.decoder.layers:
            x, attention = layer(x, memory)
        logits = self.mlp_head(self.decoder_norm(x)).transpose(0, 1)
        return logits, attention


class ImageHead(nn.Module):
    """``res_l1`` → ReLU → ``res_l2`` on every patch of the trunk's last feature map (``clip_tqn.py:105-117``)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.res_l1 = nn.Linear(features, features)
        self.res_l2 = nn.Linear(features, WIDTH)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` → patch tokens ``(B, h·w, 768)`` in row-major order (``b d n1 n2 -> b (n1 n2) d``)."""
        tokens = features.flatten(2).transpose(1, 2)
        return self.res_l2(nn.functional.relu(self.res_l1(tokens)))


def text_projection() -> nn.Sequential:
    """``CLP_clinical.mlp_embed`` (``clip_tqn.py:41-45``): Linear, GELU, Linear, all 768 wide."""
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH))


class KADAdapter(Adapter):
    """KAD's image encoder (ResNet-50; to layer3 for the 224 variant) and, given its text side, zero-shot
    classification and attention grounding through the query network.

    Input contract (KAD's test datasets, ``dataset/test_dataset.py:62-67``): ``Resize([img_res, img_res])``
    bicubic, ImageNet mean/std, where ``img_res`` is the checkpoint config's (512 for KAD-512, 1024 for KAD-1024,
    224 for the ``ModelRes`` variant); option ``image_size`` overrides it. Any size divisible by 32 runs.
    """

    name = "kad"
    card = ModelCard(
        paper="Zhang et al., Knowledge-enhanced visual-language pre-training on chest radiology images, "
              "Nature Communications 2023",
        repository="github.com/xiaoman-zhang/KAD (A3_CLIP/models/clip_tqn.py, A3_CLIP/test_chexpert.py)",
        checkpoints=("best_valid.pt of KAD-512 and KAD-1024 — Google Drive folder or Baidu pan (code m35f) linked "
                     "from the README's 'Model Checkpoints'; the code also builds a 224 variant (ModelRes)",
                     "Med-KEBERT config and tokenizer (Hugging Face xmcmic/Med-KEBERT) for "
                     "--model-option text_encoder=DIR",),
        pretraining_data=("mimic_cxr",),
        notes=(
            "KAD's F1/ACC/MCC thresholds are chosen on the test set (max-MCC cut, test_chexpert.py:135-138, "
            "296-326; xiaoman-zhang/KAD#23); vlpbench's zero-shot tasks take them from validation unless "
            "threshold_source=test_oracle, so F1/ACC are not comparable to KAD's tables",
            "best_valid.pt is the epoch with the best zero-shot AUC on ChestX-ray14 validation images "
            "(A3_CLIP/main.py:68, 168, 203-216)",
            "the 224 variant (ModelRes) uses ResNet-50 to layer3 only; its resnet.layer4 is untrained ImageNet",
            "KAD's test loaders drop the last partial batch (drop_last=True, test_chexpert.py:49-58); "
            "vlpbench scores every image",
        ),
    )
    description = ("KAD (Nat. Commun. 2023) best_valid.pt: ResNet-50 (to layer3 at 224); zero-shot and attention "
                   "grounding through its query network with --model-option text_encoder=DIR")
    capabilities = frozenset({"features", ZERO_SHOT, GROUNDING})
    native_capabilities = frozenset({ZERO_SHOT, GROUNDING})
    image_size = 512
    default_options = {"text_encoder": "", "image_size": 0}
    checkpoint_forms = (
        "KAD best_valid.pt ({'image_encoder': ModelRes512 (642 keys: resnet.* 320, res_features.* 318 "
        "duplicates, res_l1/res_l2) or the 224 ModelRes (582: res_features to layer3), 'model': TQN_Model (79), "
        "'text_encoder': CLP_clinical (Med-KEBERT with pooler, mlp_embed, logit_scale), 'optimizer', "
        "'lr_scheduler', 'config', 'epoch'}); the variant is told by res_features.7 (layer4)",
        "text side: --model-option text_encoder=DIR (local Med-KEBERT folder: config.json and tokenizer)",
    )
    capability_hints = {ZERO_SHOT: QUERY_HINT, GROUNDING: QUERY_HINT}
    # TQN_Model's 2 logits per class are trained with cross-entropy against presence labels
    # (xiaoman-zhang/KAD A3_CLIP/engine/train_fg.py:52, 106): their softmax is meant as a probability.
    zero_shot_probabilities = True
    procedures = {
        ZERO_SHOT: "KAD's zero-shot test: each class text as is (no template; lower-cased by the tokenizer, padded "
                   "to 256 tokens) through CLP_clinical.encode_text, mlp_embed over Med-KEBERT's pooler output "
                   "(A3_CLIP/test_chexpert.py:95-98, models/clip_tqn.py:72-77); image tokens res_l2(relu(res_l1(.))) "
                   "of the trunk's last map (clip_tqn.py:105-117); TQN_Model gives 2 logits per class "
                   "(clip_tqn.py:218-233); softmax over them, read at index 1 (test_chexpert.py:129-133)",
        GROUNDING: "the head-averaged cross-attention of TQN_Model's last decoder layer (transformer_decoder.py:27-44, "
                   "115-118) at each text's query, over the image tokens, as KAD's plot_visualize_512.py:103-117 "
                   "reads it (return_atten=True); each map sums to 1. KAD publishes no grounding metric",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``) and, with option ``text_encoder``, KAD's text side.

        Raises:
            ConfigError: also when ``text_encoder`` is not a local BERT folder (config and tokenizer).
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        self.variant = extra["variant"]
        spec = VARIANTS[self.variant]
        self.encoder_depth = spec["depth"]
        self.stage_note = STAGE_NOTE_224 if spec["depth"] == 4 else None
        self.image_size, self.image_size_source = _input_size(self.options["image_size"], extra["img_res"],
                                                              spec["img_res"])
        with torch.random.fork_rng(devices=[]):  # the inits below are overwritten at once
            self._image_head = loaded_eval(ImageHead(spec["features"]), extra["image_head"])
            self._query_network = loaded_eval(QueryNetwork(), extra["query_network"])
            self._bert = self._mlp_embed = self._tokenizer = None
            if "bert" in extra:
                self._bert = build_bert(extra["text_config"], extra["bert"], pooler=True)
                self._mlp_embed = loaded_eval(text_projection(), extra["mlp_embed"])
                self._tokenizer = _lower_case_tokenizer(self.options["text_encoder"])
        self._text_encoder_record = (text_encoder_record(self.options["text_encoder"])
                                     if self._bert is not None else None)
        if self._bert is None:
            self.capabilities = self.capabilities - self.native_capabilities
        self._image_encoder: nn.Module | None = None
        self._queries: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Account the three state dicts of ``best_valid.pt``; see the module docstring for what maps where.

        Raises:
            CheckpointError: the object is not a dict holding ``image_encoder``, ``model`` and ``text_encoder``
                dicts.
            ConfigError: option ``text_encoder`` is not a local BERT folder with a config.json.
        """
        parts = _parts(checkpoint)
        variant = "ModelRes512" if any(k.startswith("res_features.7.") for k in parts["image_encoder"]) else "ModelRes"
        report = LoadReport(f"kad-{variant}")
        report.ignore(TRAINING_STATE_REASON, [str(k) for k in checkpoint if k not in PARTS])
        encoder, image_head = _map_image_encoder(parts["image_encoder"], variant, report)
        extra = {"variant": variant, "img_res": _config_img_res(checkpoint.get("config")), "image_head": image_head,
                 "query_network": _map_query_network(parts["model"], report)}
        text = parts["text_encoder"]
        if options["text_encoder"]:
            extra.update(_map_text_encoder(text, options["text_encoder"], report))
        else:
            report.ignore(TEXT_SIDE_REASON, [f"text_encoder.{k}" for k in text])
        return Weights(report, encoder, extra=extra)

    def encoder(self) -> nn.Module:
        """A new smp ResNet-50 encoder with KAD's ``res_features`` weights, loaded strictly.

        KAD-512/1024 (``ModelRes512``): 6 feature maps, strides up to 32, ``out_channels``
        ``(3, 64, 256, 512, 1024, 2048)``. The 224 ``ModelRes``: depth 4, strides up to 16, ``out_channels``
        ``(3, 64, 256, 512, 1024)``, its ``layer4`` deleted so that the untrained ImageNet stage cannot be used.
        The module is in training mode, like any new module.
        """
        if self.encoder_depth == 5:
            return super().encoder()
        from segmentation_models_pytorch.encoders import get_encoder

        with torch.device("meta"):
            module = get_encoder(self.encoder_name, depth=self.encoder_depth, weights=None)
        del module.layer4
        module = module.to_empty(device="cpu")  # ResNets have no non-persistent buffers: the load fills all
        module.load_state_dict(dict(self._encoder_state))
        return module

    def describe(self) -> dict[str, Any]:
        """``Adapter.describe`` plus the image encoder variant, depth, stage note and input size."""
        return {**super().describe(), "variant": self.variant, "encoder_depth": self.encoder_depth,
                "stage_note": self.stage_note, "image_size": self.image_size,
                "image_size_source": self.image_size_source}

    @classmethod
    def _resolve_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``Adapter._resolve_options``, also checking ``image_size`` before anything is read.

        Raises:
            ConfigError: ``image_size`` is neither 0 (from the checkpoint) nor a positive multiple of 32.
        """
        resolved = super()._resolve_options(options)
        size = resolved["image_size"]
        if size and (size < 0 or size % 32):
            raise ConfigError(f"adapter 'kad': option image_size={size} must be a positive multiple of 32 "
                              "(or 0: the checkpoint config's img_res)")
        return resolved

    @torch.no_grad()
    def zero_shot_scores(self, images: torch.Tensor, classes: list[str],
                         templates: tuple[str, str] = ("{}", "no {}")) -> torch.Tensor:
        """Probability that each class is present ``(B, len(classes))``: the softmax of the query network's two
        logits at the class text's query, read at index 1, as KAD's zero-shot tests do.

        ``templates`` is checked but not used: KAD embeds the bare class text (``test_chexpert.py:104, 111``).

        Raises:
            CapabilityError: no ``text_encoder`` was given.
            ConfigError: ``classes`` empty or not a list, bad ``templates``, or images not ``(B, 3, H, W)``.
        """
        self.require(ZERO_SHOT)
        check_zero_shot_arguments(classes, templates)
        logits, _ = self._forward(images, list(classes))
        return logits.float().softmax(dim=-1)[..., 1]

    @torch.no_grad()
    def grounding_maps(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The last decoder layer's cross-attention at each text's query ``(B, len(texts), h, w)``, h = H/32
        (H/16 for the 224 variant); each map is non-negative and sums to 1 over the h·w patches.

        Raises:
            CapabilityError: no ``text_encoder`` was given.
            ConfigError: ``texts`` empty or not a list, or images not ``(B, 3, H, W)``.
        """
        self.require(GROUNDING)
        if isinstance(texts, str) or not texts:
            raise ConfigError(f"grounding_maps takes a non-empty list of texts, got {texts!r}")
        _, attention = self._forward(images, list(texts))
        return attention

    @torch.no_grad()
    def embed_queries(self, texts: list[str]) -> torch.Tensor:
        """KAD's text features ``(len(texts), 768)``, not normalised: ``mlp_embed`` over the pooler output
        (``CLP_clinical.encode_text``), tokenised lower case and padded to 256 tokens; cached per text list.

        Raises:
            CapabilityError: no ``text_encoder`` was given.
        """
        self.require(ZERO_SHOT)
        key = tuple(texts)
        if key not in self._queries:
            tokens = self._tokenizer(list(texts), add_special_tokens=True, padding="max_length", truncation=True,
                                     max_length=TEXT_MAX_LENGTH, return_tensors="pt")
            # KAD passes input ids and attention mask only (clip_tqn.py:74); token types default to zeros.
            pooled = self._bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
            self._queries[key] = self._mlp_embed(pooled)
        return self._queries[key]

    def _forward(self, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """KAD's image encoder and query network in eval mode: ``(logits (B, Q, 2), attention (B, Q, h, w))``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"adapter 'kad' takes preprocessed images (B, 3, H, W), got {tuple(images.shape)}")
        if self._image_encoder is None:
            self._image_encoder = self.encoder().eval()
        device = images.device
        queries = self.embed_queries(texts).to(device)
        features = self._image_encoder.to(device)(images.float())[-1]
        logits, attention = self._query_network.to(device)(self._image_head.to(device)(features), queries)
        return logits, attention.reshape(*attention.shape[:2], *features.shape[-2:])


# --- key accounting ----------------------------------------------------------------------------------------


def _parts(checkpoint: Any) -> dict[str, Mapping[str, Any]]:
    """The three state dicts of ``best_valid.pt``.

    Raises:
        CheckpointError: ``checkpoint`` is not a dict with an ``image_encoder``, ``model`` and ``text_encoder``
            dict each.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"a KAD checkpoint (best_valid.pt) is a dict of {', '.join(PARTS)} state dicts and "
                              f"training state; this file holds a {type(checkpoint).__name__}")
    lacking = [part for part in PARTS if not isinstance(checkpoint.get(part), Mapping)]
    if lacking:
        found = ", ".join(sorted(map(str, checkpoint))[:8]) or "nothing"
        raise CheckpointError(f"a KAD checkpoint (best_valid.pt, A3_CLIP/main.py:206-214) holds the state dicts "
                              f"{', '.join(PARTS)}; this file has no {', '.join(lacking)} dict (keys: {found})")
    return {part: checkpoint[part] for part in PARTS}


def trunk_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """``res_features.*`` names and shapes of the variant's trunk (318 keys for ModelRes512, 258 for ModelRes)."""
    index = {stage: i for i, stage in TRUNK_STAGES.items() if i in VARIANTS[variant]["stages"]}
    shapes = {}
    for key, shape in encoder_shapes("resnet50").items():
        stage, rest = key.split(".", 1)
        if stage in index:
            shapes[f"res_features.{index[stage]}.{rest}"] = shape
    return shapes


def image_encoder_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Every key and shape of ``image_encoder``: ``resnet.*`` (torchvision ResNet-50 with fc, 320 keys),
    ``res_features.*`` and ``res_l1``/``res_l2``."""
    resnet = {f"resnet.{k}": v for k, v in {**encoder_shapes("resnet50"), **_TORCHVISION_FC}.items()}
    with torch.device("meta"):
        head = {k: tensor_spec(v) for k, v in ImageHead(VARIANTS[variant]["features"]).state_dict().items()}
    return {**resnet, **trunk_shapes(variant), **head}


def query_network_shapes() -> dict[str, tuple[int, ...]]:
    """Every key and shape of ``TQN_Model``'s state dict: ``QueryNetwork``'s plus ``decoder.norm`` and
    ``logit_scale``."""
    with torch.device("meta"):
        shapes = {k: tensor_spec(v) for k, v in QueryNetwork().state_dict().items()}
    return {**shapes, "decoder.norm.weight": (WIDTH,), "decoder.norm.bias": (WIDTH,), "logit_scale": ()}


def _torchvision_key(key: str) -> str:
    """``res_features.4.0.conv1.weight`` → ``layer1.0.conv1.weight``."""
    index, rest = key[len("res_features."):].split(".", 1)
    return f"{TRUNK_STAGES[index]}.{rest}"


def _map_image_encoder(state: Mapping[str, Any], variant: str,
                       report: LoadReport) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map ``res_features`` onto the smp encoder and ``res_l1``/``res_l2`` onto ``ImageHead``; account the
    ``resnet.*`` duplicates (equal to what they duplicate, else reported) and the unused ``resnet.*`` keys."""
    found = match_keys(state, image_encoder_shapes(variant), report, source_prefix="image_encoder.")
    trunk = {_torchvision_key(k): v for k, v in found.items() if k.startswith("res_features.")}
    head = {k: v for k, v in found.items() if k.startswith(("res_l1.", "res_l2."))}
    duplicates, unused, differing = [], [], []
    in_trunk = _trunk_torchvision_keys(variant)
    for key in [k for k in found if k.startswith("resnet.")]:
        name = key[len("resnet."):]
        if name not in in_trunk:
            unused.append(key)
        elif name in trunk and not torch.equal(found[key], trunk[name]):
            differing.append(key)
        else:
            duplicates.append(key)
    # A twin that differs cannot come from KAD's shared modules: the file fails, naming the key.
    report.unexpected += [f"image_encoder.{k} (differs from the res_features tensor it duplicates, which the "
                          "forward uses)" for k in differing]
    _unmap(report, {f"image_encoder.{k}" for k in duplicates + unused + differing})
    report.ignore(DUPLICATE_TRUNK_REASON, [f"image_encoder.{k}" for k in duplicates])
    report.ignore(UNUSED_RESNET_REASON, [f"image_encoder.{k}" for k in unused])
    report.mapped = [(s, _image_target(s[len("image_encoder."):])) if s.startswith("image_encoder.") else (s, t)
                     for s, t in report.mapped]
    return trunk, head


def _image_target(key: str) -> str:
    """Where a mapped ``image_encoder`` key goes: ``encoder.<torchvision name>`` or ``image_head.<key>``."""
    return f"encoder.{_torchvision_key(key)}" if key.startswith("res_features.") else f"image_head.{key}"


def _trunk_torchvision_keys(variant: str) -> set[str]:
    """Torchvision names of the trunk tensors ``res_features`` holds for ``variant``."""
    return {_torchvision_key(k) for k in trunk_shapes(variant)}


def _map_query_network(state: Mapping[str, Any], report: LoadReport) -> dict[str, torch.Tensor]:
    """Map ``model`` onto ``QueryNetwork``; ``decoder.norm`` must equal ``decoder_norm``; ``logit_scale`` ignored."""
    found = match_keys(state, query_network_shapes(), report, source_prefix="model.", target_prefix="query_network.")
    ignored = {"model.logit_scale"} & {s for s, _ in report.mapped}
    duplicates, differing = [], []
    for name in ("weight", "bias"):
        key, twin = f"decoder.norm.{name}", f"decoder_norm.{name}"
        if key in found and twin in found and not torch.equal(found[key], found[twin]):
            differing.append(f"model.{key}")
            report.unexpected.append(f"model.{key} (differs from model.{twin}, the module it is in KAD)")
        elif key in found:
            duplicates.append(f"model.{key}")
    _unmap(report, ignored | set(duplicates) | set(differing))
    report.ignore(DUPLICATE_NORM_REASON, duplicates)
    report.ignore(LOGIT_SCALE_REASON, sorted(ignored))
    return {k: v for k, v in found.items() if not k.startswith("decoder.norm.") and k != "logit_scale"}


def _map_text_encoder(state: Mapping[str, Any], text_encoder: str, report: LoadReport) -> dict[str, Any]:
    """Map ``bert_model.*`` onto a ``BertModel`` (with pooler) of ``text_encoder``'s config and ``mlp_embed``."""
    config = bert_config(text_encoder, "kad")
    if config.hidden_size != WIDTH:
        raise ConfigError(f"adapter 'kad': text_encoder={text_encoder!r} has width {config.hidden_size}; KAD's "
                          f"mlp_embed and query network take {WIDTH}-d Med-KEBERT features")
    bert = {k[len("bert_model."):]: v for k, v in state.items() if k.startswith("bert_model.")}
    rest = {k: v for k, v in state.items() if not k.startswith("bert_model.")}
    with torch.device("meta"):
        shapes = {f"mlp_embed.{k}": tensor_spec(v) for k, v in text_projection().state_dict().items()}
    mlp = match_keys(rest, {**shapes, "logit_scale": ()}, report, source_prefix="text_encoder.",
                     target_prefix="text_encoder.")
    if mlp.pop("logit_scale", None) is not None:
        _unmap(report, {"text_encoder.logit_scale"})
        report.ignore(LOGIT_SCALE_REASON, ["text_encoder.logit_scale"])
    return {
        "bert": match_bert(bert, report, config, source_prefix="text_encoder.bert_model.",
                           target_prefix="text_encoder.bert_model.", pooler=True),
        "mlp_embed": {k[len("mlp_embed."):]: v for k, v in mlp.items()},
        "text_config": config,
    }


def _unmap(report: LoadReport, sources: set[str]) -> None:
    """Remove the mapped pairs whose checkpoint key is in ``sources`` (they are ignored instead)."""
    report.mapped = [(s, t) for s, t in report.mapped if s not in sources]


def _config_img_res(config: Any) -> int | None:
    """``img_res`` of the checkpoint's saved training config (``configs/Res_train.yaml``), if it has one."""
    value = config.get("img_res") if isinstance(config, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _input_size(option: int, config: int | None, default: int) -> tuple[int, str]:
    """The input side for zero-shot and grounding and where it came from: the option, the config, the variant."""
    if option:
        return option, "option image_size"
    if config is not None:
        return config, "checkpoint config img_res"
    return default, "image encoder variant (no img_res in the checkpoint config)"


def _lower_case_tokenizer(folder: str) -> Any:
    """The tokenizer of ``folder`` with ``do_lower_case=True``, as KAD loads it (``test_chexpert.py:70``).

    Raises:
        ConfigError: no tokenizer can be loaded from the folder.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), do_lower_case=True, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"adapter 'kad': no tokenizer can be loaded from text_encoder={folder!r}: {e}") from e
