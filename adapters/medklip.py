"""MedKLIP (ICCV 2023): a ResNet-50 (to layer3) image encoder queried by 75 medical entities.

MedKLIP publishes ``checkpoint_final.pth``, written by ``PreTrain_MedKLIP/train_MedKLIP.py``: a dict of
``model`` (the ``state_dict()`` of an ``nn.DataParallel``, every key prefixed ``module.``), ``optimizer``,
``lr_scheduler``, ``config`` and ``epoch``. This adapter also accepts the model state dict alone, with or
without the prefix. The model (``models/model_MedKLIP.py``) holds 342 keys:

- ``res_features.{0,1,4,5,6}.*`` (258 keys): ``nn.Sequential(*list(resnet50.children())[:-3])``, i.e.
  torchvision's conv1, bn1, layer1, layer2, layer3 (indices 2 and 3 are ReLU and max-pool). There is **no
  layer4**: the encoder ends at stride 16 with 1024 channels, and ``encoder()`` says so (``encoder_depth`` 4,
  ``out_channels`` ``(3, 64, 256, 512, 1024)``).
- ``res_l1`` Linear(1024, 1024), ``res_l2`` Linear(1024, 256): project the 1024-d patch features to 256.
- ``disease_embedding_layer`` Linear(768, 256): projects the 75 entity embeddings into queries.
- ``decoder.layers.{0..3}.*`` and ``decoder.norm.*``: a 4-layer pre-norm Transformer decoder (width 256,
  4 heads, FFN 1024, ReLU) whose cross-attention reads the patch tokens.
- ``classifier`` Linear(256, 2): absent / present per entity.
- ``cl_fc`` Linear(256, 768): ignored, used only by the pre-training contrastive loss against the anatomy
  book (``ana_book``), which is not part of the checkpoint.

The entity queries are not in the checkpoint either: MedKLIP embeds the 75 descriptions of its
``observation explanation.json`` with Bio_ClinicalBERT ([CLS] of the last layer, tokenised to 64 tokens with
padding to that length) each time it builds the model. This adapter does the same from a local BERT folder
(options ``text_encoder`` and ``entities``) and caches the (75, 768) result, or takes the tensor from a file
(option ``entity_embeddings``). With either, it provides ``zero_shot_scores`` (the classifier's softmax at
each class's entity) and ``grounding_maps`` (the decoder's cross-attention at each class's entity).

:mod:`vlpbench.testing` writes random-init files in these layouts (``write_medklip_checkpoint``,
``write_medklip_entities``, ``write_medklip_entity_embeddings``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    ModelCard,
    GROUNDING,
    ZERO_SHOT,
    Adapter,
    LoadReport,
    Weights,
    encoder_shapes,
    load_state_dict_file,
    loaded_eval,
    match_keys,
    sha256_file,
    split_prefix,
    tensor_spec,
    unwrap_state_dict,
)
from vlpbench.adapters.text import TEXT_ENCODER_FILES, load_tokenizer, text_encoder_record
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.files import atomic_path

# MedKLIP's ``original_class`` (Sample_zero-shot_Classification_CXR14/test.py; ``disease_name`` in
# models/model_MedKLIP.py): the 75 entities, in the order of the queries and of observation explanation.json.
ENTITY_NAMES = (
    "normal", "clear", "sharp", "sharply", "unremarkable", "intact", "stable", "free",
    "effusion", "opacity", "pneumothorax", "edema", "atelectasis", "tube", "consolidation", "process",
    "abnormality", "enlarge", "tip", "low", "pneumonia", "line", "congestion", "catheter",
    "cardiomegaly", "fracture", "air", "tortuous", "lead", "disease", "calcification", "prominence",
    "device", "engorgement", "picc", "clip", "elevation", "expand", "nodule", "wire", "fluid",
    "degenerative", "pacemaker", "thicken", "marking", "scar", "hyperinflate", "blunt", "loss",
    "widen", "collapse", "density", "emphysema", "aerate", "mass", "crowd", "infiltrate", "obscure",
    "deformity", "hernia", "drainage", "distention", "shift", "stent", "pressure", "lesion", "finding",
    "borderline", "hardware", "dilation", "chf", "redistribution", "aspiration",
    "tail_abnorm_obs", "excluded_obs",
)
# The published observation explanation.json spells its key at position 20 "eumonia"; MedKLIP reads the file
# by position, and so does this adapter.
PUBLISHED_KEY_SPELLINGS = {20: "eumonia"}
# Class names of the benchmark's zero-shot tasks that are not entity names themselves → entity. Each entity
# name is accepted as is. Matching is case-insensitive and reads "_" as a space.
CLASS_ENTITIES: Mapping[str, str] = {
    # ChestX-ray14, as MedKLIP's CXR14 zero-shot test maps its labels (chexray14_cls there).
    "infiltration": "infiltrate",
    "pleural thickening": "thicken",
    "fibrosis": "tail_abnorm_obs",  # MedKLIP: rare in MIMIC-CXR, folded into the tail entity
    # CheXpert label names.
    "pleural effusion": "effusion",
    "enlarged cardiomediastinum": "enlarge",
    "lung opacity": "opacity",
    "lung lesion": "lesion",
    "support devices": "device",
    "no finding": "normal",
}
N_ENTITIES, ENTITY_WIDTH = len(ENTITY_NAMES), 768
# Zero-shot test tokenisation of the descriptions (get_tokenizer in MedKLIP's test scripts).
ENTITY_MAX_LENGTH = 64
# Weights files a transformers BertModel folder may hold, in the order from_pretrained prefers them.
BERT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

CL_FC_REASON = ("cl_fc (Linear 256→768): used only by MedKLIP's pre-training contrastive loss against the "
                "anatomy book (ana_book), which the checkpoint does not hold; evaluation does not use it")
STAGE_NOTE = "MedKLIP has no layer4: features end at layer3 (1024 ch, stride 16)"
ENTITY_QUERY_HINT = ("needs MedKLIP's 75 entity queries: pass --model-option text_encoder=DIR (a local "
                     "Bio_ClinicalBERT folder with weights) and --model-option entities=FILE (MedKLIP's "
                     "'observation explanation.json'), or --model-option entity_embeddings=FILE (a (75, 768) "
                     "tensor in .safetensors or .pt)")
# res_features index → torchvision ResNet-50 module (indices 2 and 3 are the parameter-free ReLU and max-pool).
_BACKBONE_STAGES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}
_BACKBONE_PREFIX = "res_features."
D_MODEL, HEADS, FFN, LAYERS, FEATURES = 256, 4, 1024, 4, 1024


class QueryDecoderLayer(nn.Module):
    """One pre-norm decoder layer of MedKLIP (``TransformerDecoderLayer(normalize_before=True)``), eval only.

    Self-attention over the queries, cross-attention from the queries to the patch tokens, ReLU FFN, each
    applied to a LayerNorm of its input and added back. Sequence-first tensors: queries ``(Q, B, d)``,
    memory ``(N, B, d)``. Returns the new queries and the head-averaged cross-attention ``(B, Q, N)``.
    """

    def __init__(self, d_model: int = D_MODEL, heads: int = HEADS, ffn: int = FFN) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads)
        self.multihead_attn = nn.MultiheadAttention(d_model, heads)
        self.linear1 = nn.Linear(d_model, ffn)
        self.linear2 = nn.Linear(ffn, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm1(queries)
        queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        attended, weights = self.multihead_attn(self.norm2(queries), memory, memory, need_weights=True,
                                                average_attn_weights=True)
        queries = queries + attended
        queries = queries + self.linear2(nn.functional.relu(self.linear1(self.norm3(queries))))
        return queries, weights


class QueryDecoder(nn.Module):
    """MedKLIP's ``TransformerDecoder``: the layers, then a final LayerNorm; also returns each layer's attention."""

    def __init__(self, layers: int = LAYERS) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QueryDecoderLayer() for _ in range(layers))
        self.norm = nn.LayerNorm(D_MODEL)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        weights = []
        for layer in self.layers:
            queries, layer_weights = layer(queries, memory)
            weights.append(layer_weights)
        return self.norm(queries), weights


class MedKLIPHead(nn.Module):
    """Everything of MedKLIP after the ResNet trunk (except the pre-training-only ``cl_fc``), by its key names."""

    def __init__(self) -> None:
        super().__init__()
        self.disease_embedding_layer = nn.Linear(ENTITY_WIDTH, D_MODEL)
        self.res_l1 = nn.Linear(FEATURES, FEATURES)
        self.res_l2 = nn.Linear(FEATURES, D_MODEL)
        self.decoder = QueryDecoder()
        self.classifier = nn.Linear(D_MODEL, 2)

    def forward(self, features: torch.Tensor, entities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer3 features ``(B, 1024, h, w)`` and entity embeddings ``(75, 768)`` → ``(logits, attention)``.

        ``logits`` is ``(B, 75, 2)`` (absent, present); ``attention`` is ``(B, 75, h, w)``: the head-averaged
        cross-attention of the decoder layers, averaged over the layers (each sums to 1 over the h·w patches).
        """
        batch, _, h, w = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (B, h·w, 1024), patches in row-major order
        memory = self.res_l2(nn.functional.relu(self.res_l1(tokens))).transpose(0, 1)
        queries = self.disease_embedding_layer(entities).unsqueeze(1).repeat(1, batch, 1)
        out, weights = self.decoder(queries, memory)
        logits = self.classifier(out).transpose(0, 1)
        attention = torch.stack(weights).mean(dim=0).view(batch, -1, h, w)
        return logits, attention


class MedKLIPAdapter(Adapter):
    """MedKLIP's image encoder (ResNet-50 to layer3) and, given its entity queries, zero-shot and grounding.

    Input contract (MedKLIP's zero-shot and grounding test scripts): 224×224 RGB, ImageNet mean/std; the
    14×14 grid of attention maps follows from stride 16. Any size divisible by 16 runs.
    """

    name = "medklip"
    card = ModelCard(
        paper="Wu et al., MedKLIP: Medical Knowledge Enhanced Language-Image Pre-Training, ICCV 2023",
        repository="github.com/MediaBrain-SJTU/MedKLIP (PreTrain_MedKLIP/models/model_MedKLIP.py)",
        checkpoints=("checkpoint_final.pth — Google Drive or Baidu links in checkpoints/README.md",
                     "observation explanation.json — in the repository",),
        pretraining_data=("mimic_cxr",),
        notes=("the image trunk ends at layer3 (ResNet-50 children[:-3]): layer4 is not part of the model",),
    )
    description = ("MedKLIP (ICCV 2023) checkpoint_final.pth: ResNet-50 to layer3 (no layer4); zero-shot and "
                   "grounding through its 75 entity queries")
    capabilities = frozenset({"features", ZERO_SHOT, GROUNDING})
    native_capabilities = frozenset({ZERO_SHOT, GROUNDING})
    free_text = False
    encoder_depth = 4
    stage_note = STAGE_NOTE
    default_options = {"text_encoder": "", "entities": "", "entity_embeddings": ""}
    checkpoint_forms = (
        "MedKLIP checkpoint_final.pth ({'model': DataParallel state dict, 'module.'-prefixed, 342 keys; "
        "'optimizer', 'lr_scheduler', 'config', 'epoch'}); cl_fc ignored",
        "its model state dict alone, with or without the 'module.' prefix",
        "entity queries: --model-option text_encoder=DIR (local Bio_ClinicalBERT with weights) and "
        "entities=FILE (MedKLIP's observation explanation.json), or entity_embeddings=FILE ((75, 768) tensor)",
    )
    capability_hints = {ZERO_SHOT: ENTITY_QUERY_HINT, GROUNDING: ENTITY_QUERY_HINT}
    # The classifier's 2 logits per entity are trained with cross-entropy against presence labels
    # (MediaBrain-SJTU/MedKLIP PreTrain_MedKLIP/models/model_MedKLIP.py:196): their softmax is meant as a probability.
    zero_shot_probabilities = True
    # Checkpoint layout: the trunk's key prefix, the query network's module, the keys left out and why.
    family = "MedKLIP"
    layout = "medklip-resnet50-layer3"
    backbone_prefix = _BACKBONE_PREFIX
    head_module: type[nn.Module] = MedKLIPHead
    ignored: tuple[tuple[str, str], ...] = (("cl_fc.", CL_FC_REASON),)

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``), then the entity queries the options name.

        Raises:
            ConfigError: an option combination that names no single source of entity queries, an entities
                file that is not MedKLIP's 75-entry JSON, or a text encoder folder that cannot embed them.
            CheckpointError: as ``Adapter``; also an ``entity_embeddings`` file that is not a (75, 768) tensor.
        """
        super().__init__(checkpoint, **options)
        with torch.random.fork_rng(devices=[]):  # overwritten at once; keep the init off the caller's RNG
            self._head = loaded_eval(self.head_module(), self._extra_state["head"])
        self._image_encoder: nn.Module | None = None
        self._entities, self._entity_record = self._load_entities()
        if self._entities is None:
            self.capabilities = self.capabilities - self.native_capabilities

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Unwrap ``model`` and ``module.``, leave out the ``ignored`` prefixes (with their reasons), map the
        ``backbone_prefix`` trunk onto the encoder and the rest onto the ``head_module``.

        Raises:
            CheckpointError: the object is not a dict of tensors.
        """
        report = LoadReport(cls.layout)
        state, prefix = unwrap_state_dict(checkpoint, report, containers=("model",),
                                          what=f"a {cls.family} checkpoint")
        for ignored, reason in cls.ignored:
            left_out, state = split_prefix(state, ignored)
            report.ignore(reason, [prefix + k for k in left_out])
        trunk = cls.backbone_prefix
        found = match_keys(state, {**backbone_shapes(trunk), **head_shapes(cls.head_module)}, report,
                           source_prefix=prefix)
        report.mapped = [(key, _module_key(key[len(prefix):], trunk)) for key, _ in report.mapped]
        encoder = {_encoder_key(k, trunk): v for k, v in found.items() if k.startswith(trunk)}
        head = {k: v for k, v in found.items() if not k.startswith(trunk)}
        return Weights(report, encoder, extra={"head": head})

    def encoder(self) -> nn.Module:
        """A new smp ResNet-50 encoder of depth 4 (no layer4) holding MedKLIP's weights, loaded strictly.

        ``forward(x)`` returns 5 feature maps, x and strides 2, 4, 8, 16, with ``out_channels``
        ``(3, 64, 256, 512, 1024)``. Its ``layer4`` is deleted, so nothing can use untrained weights.
        The module is in training mode, like any new module.
        """
        from segmentation_models_pytorch.encoders import get_encoder

        with torch.device("meta"):
            module = get_encoder(self.encoder_name, depth=self.encoder_depth, weights=None)
        del module.layer4
        # ResNets have no non-persistent buffers, so every tensor is filled by the strict load below.
        module = module.to_empty(device="cpu")
        module.load_state_dict(dict(self._encoder_state))
        return module

    def describe(self) -> dict[str, Any]:
        """``Adapter.describe`` plus the encoder depth, the stage note and where the entity queries came from."""
        return {**super().describe(), "encoder_depth": self.encoder_depth, "stage_note": self.stage_note,
                "entity_queries": self._entity_record}

    @property
    def entity_embeddings(self) -> torch.Tensor | None:
        """The (75, 768) entity embeddings the queries are projected from, or None without them."""
        return self._entities

    @torch.no_grad()
    def zero_shot_scores(self, images: torch.Tensor, classes: list[str],
                         templates: tuple[str, str] = ("{}", "no {}")) -> torch.Tensor:
        """Probability that each class is present ``(B, len(classes))``: softmax of the classifier's two logits
        at the class's entity query, read at "present", as MedKLIP's zero-shot test does.

        ``templates`` is ignored: MedKLIP has no prompts; its queries are fixed entity descriptions.
        Class names map to entities through ``entity_index``.

        Raises:
            CapabilityError: no entity queries were given (the message names the options).
            ConfigError: ``classes`` is empty or names a class without an entity.
        """
        self.require(ZERO_SHOT)
        indices = _entity_indices(classes, "classes")
        logits, _ = self._forward(images)
        return logits.softmax(dim=-1)[:, indices, 1]

    @torch.no_grad()
    def grounding_maps(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cross-attention maps ``(B, len(texts), h, w)`` (14×14 at 224 input) at each text's entity query.

        The head-averaged cross-attention weights of the 4 decoder layers, averaged, as MedKLIP's RSNA
        grounding test reads them: each map is non-negative and sums to 1 over the patches. ``texts`` are
        class names (``free_text`` is False), mapped as in ``zero_shot_scores``.

        Raises:
            CapabilityError: no entity queries were given.
            ConfigError: ``texts`` is empty or names a class without an entity.
        """
        self.require(GROUNDING)
        indices = _entity_indices(texts, "texts")
        _, attention = self._forward(images)
        return attention[:, indices]

    def _forward(self, images: torch.Tensor) -> Any:
        """The model's forward in eval mode on preprocessed images: what ``head_module`` returns (MedKLIP:
        ``(logits (B, 75, 2), attention (B, 75, h, w))``)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"adapter {self.name!r} takes preprocessed images (B, 3, H, W), got {tuple(images.shape)}")
        if self._image_encoder is None:
            self._image_encoder = self.encoder().eval()
        device = images.device
        features = self._image_encoder.to(device)(images.float())[-1]
        return self._head.to(device)(features, self._entities.to(device))

    def _load_entities(self) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
        """The entity embeddings from the options, with a record of their source (both None without options)."""
        if self.options["entity_embeddings"]:
            path = self.options["entity_embeddings"]
            return load_entity_embeddings(path), {"entity_embeddings": {"path": path, "sha256": sha256_file(path)}}
        if self.options["text_encoder"]:
            return cached_entity_embeddings(self.options["entities"], self.options["text_encoder"])
        return None, None

    @classmethod
    def inspect(cls, checkpoint: str | Path | None = None, **options: Any) -> LoadReport:
        """``Adapter.inspect``, also reading the entity files the options name (``entities``' 75 descriptions,
        ``entity_embeddings``' tensor), without computing embeddings.

        Raises:
            ConfigError / CheckpointError: as ``Adapter.inspect``; also an entity file that a run would refuse.
        """
        report = super().inspect(checkpoint, **options)
        resolved = cls._resolve_options(options)
        if resolved["entity_embeddings"]:
            load_entity_embeddings(resolved["entity_embeddings"])
        if resolved["entities"]:
            load_entity_descriptions(resolved["entities"])
            _bert_weights_file(Path(resolved["text_encoder"]))
        return report

    @classmethod
    def _resolve_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``Adapter._resolve_options``, also checking that the options name one source of entity queries.

        Raises:
            ConfigError: ``entity_embeddings`` together with ``text_encoder``/``entities``, or only one of the
                latter two.
        """
        resolved = super()._resolve_options(options)
        text_encoder, entities = resolved["text_encoder"], resolved["entities"]
        if resolved["entity_embeddings"] and (text_encoder or entities):
            raise ConfigError("adapter 'medklip': pass either entity_embeddings=FILE or text_encoder=DIR with "
                              "entities=FILE, not both")
        if bool(text_encoder) != bool(entities):
            given, needed = ("text_encoder=DIR", "entities=FILE (MedKLIP's 'observation explanation.json')") \
                if text_encoder else ("entities=FILE", "text_encoder=DIR (a local Bio_ClinicalBERT folder)")
            raise ConfigError(f"adapter 'medklip': option {given} also needs {needed} to compute the entity queries")
        return resolved


def entity_index(name: str) -> int:
    """Position of the MedKLIP entity for a class name: an entity name or a ``CLASS_ENTITIES`` alias.

    Matching ignores case and reads "_" as a space ("Pleural_Thickening" → "thicken", "Pleural Effusion" →
    "effusion", "Pneumonia" → entity 20).

    Raises:
        ConfigError: no entity for ``name``; the message lists the known names.
    """
    index = _ENTITY_LOOKUP.get(_normal(name)) if isinstance(name, str) else None
    if index is None:
        raise ConfigError(f"MedKLIP has no entity for class {name!r}; known names (case-insensitive, '_' as space): "
                          f"{', '.join(sorted(_ENTITY_LOOKUP))}")
    return index


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", " ")


_ENTITY_LOOKUP: Mapping[str, int] = {
    **{_normal(name): i for i, name in enumerate(ENTITY_NAMES)},
    **{_normal(alias): ENTITY_NAMES.index(entity) for alias, entity in CLASS_ENTITIES.items()},
}


def _entity_indices(names: list[str], what: str) -> list[int]:
    """``entity_index`` of each name; ``what`` names the argument in the error for an empty or bare-string list."""
    if isinstance(names, str) or not names:
        raise ConfigError(f"{what} must be a non-empty list of class names, got {names!r}")
    return [entity_index(name) for name in names]


# --- key layout --------------------------------------------------------------------------------------------


def _encoder_key(key: str, trunk: str = _BACKBONE_PREFIX) -> str:
    """``res_features.4.0.conv1.weight`` → ``layer1.0.conv1.weight`` (torchvision / smp encoder names); ``trunk``:
    the checkpoint's prefix of the ResNet children."""
    index, rest = key[len(trunk):].split(".", 1)
    return f"{_BACKBONE_STAGES[index]}.{rest}"


def _module_key(key: str, trunk: str = _BACKBONE_PREFIX) -> str:
    """Name of a mapped checkpoint key (without wrapper prefix) in the modules it is loaded into."""
    return f"encoder.{_encoder_key(key, trunk)}" if key.startswith(trunk) else f"head.{key}"


def backbone_shapes(trunk: str = _BACKBONE_PREFIX) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes of the ResNet-50 trunk to layer3 (258 keys), its children under ``trunk``."""
    checkpoint_name = {stage: index for index, stage in _BACKBONE_STAGES.items()}
    shapes = {}
    for key, shape in encoder_shapes("resnet50").items():
        stage, rest = key.split(".", 1)
        if stage in checkpoint_name:
            shapes[f"{trunk}{checkpoint_name[stage]}.{rest}"] = shape
    return shapes


def head_shapes(head: type[nn.Module]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the query network ``head`` (MedKLIPHead: 82 keys), built on the meta device."""
    with torch.device("meta"):
        return {k: tensor_spec(v) for k, v in head().state_dict().items()}


# --- entity queries ----------------------------------------------------------------------------------------


def load_entity_descriptions(path: str | Path) -> list[str]:
    """The 75 descriptions of MedKLIP's ``observation explanation.json``, in file order.

    The file must be a JSON object whose keys are ``ENTITY_NAMES`` in order (position 20 may be spelt
    "eumonia", as published) and whose values are strings.

    Raises:
        ConfigError: unreadable, not that JSON object, or keys out of place (naming the position).
    """
    path = Path(path)
    try:
        book = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"entities file {path}: cannot be read as JSON: {e}") from e
    if not isinstance(book, dict) or len(book) != N_ENTITIES:
        found = f"{len(book)} entries" if isinstance(book, dict) else type(book).__name__
        raise ConfigError(f"entities file {path}: expected MedKLIP's observation explanation.json, a JSON object "
                          f"of {N_ENTITIES} entity descriptions; found {found}")
    for position, (key, text) in enumerate(book.items()):
        allowed = {ENTITY_NAMES[position], PUBLISHED_KEY_SPELLINGS.get(position)}
        if key not in allowed:
            raise ConfigError(f"entities file {path}: key {position} is {key!r}, expected {ENTITY_NAMES[position]!r}; "
                              "MedKLIP reads the descriptions by position, so their order must be its own")
        if not isinstance(text, str):
            raise ConfigError(f"entities file {path}: the description of {key!r} is not a string")
    return list(book.values())


def compute_entity_embeddings(descriptions: list[str], text_encoder: str, adapter: str = "medklip") -> torch.Tensor:
    """Bio_ClinicalBERT [CLS] embeddings ``(len(descriptions), 768)`` as MedKLIP computes its queries.

    Tokenised with truncation at 64 tokens (``get_tokenizer`` of MedKLIP's and MAVL's test scripts); the BERT
    gets input ids and attention mask (token types default to zeros); the last layer's [CLS] output is taken.
    Those scripts pad every text to 64 tokens; padding only to the longest text gives the same [CLS] outputs
    (padded positions are masked out of attention) at a fraction of the cost. Weights are read from
    ``text_encoder`` (local files only); ``adapter`` names the adapter in errors.

    Raises:
        ConfigError: the folder has no tokenizer, no readable BERT or a width other than 768.
    """
    from transformers import BertModel

    folder = Path(text_encoder)
    weights = _bert_weights_file(folder, adapter)
    tokenizer = load_tokenizer(text_encoder, adapter)
    try:
        # from_pretrained initialises what the file lacks (e.g. a pooler) from the global RNG; fork it.
        with torch.random.fork_rng(devices=[]):
            model = BertModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False,
                                              use_safetensors=weights.endswith(".safetensors"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"adapter {adapter!r}: text_encoder={text_encoder!r} does not load as a BERT model: {e}") from e
    if model.config.hidden_size != ENTITY_WIDTH:
        raise ConfigError(f"adapter {adapter!r}: text_encoder={text_encoder!r} has width {model.config.hidden_size}; "
                          f"the queries are projected from {ENTITY_WIDTH}-d Bio_ClinicalBERT embeddings "
                          "(disease_embedding_layer)")
    tokens = tokenizer(list(descriptions), padding="longest", truncation=True, max_length=ENTITY_MAX_LENGTH,
                       return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    return hidden[:, 0].float().contiguous()


def cached_entity_embeddings(entities: str, text_encoder: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Entity embeddings of the ``entities`` JSON by ``text_encoder``, computed once and cached.

    The cache file is ``cache_dir()/medklip_entities/<key>.safetensors``, where the key is a sha256 over the
    JSON's sha256, the text-encoder folder's sha256 (config, tokenizer files, weights) and the tokenisation
    length; it is written atomically. Returns the (75, 768) tensor and a record of the sources for results.

    Raises:
        ConfigError: as ``load_entity_descriptions`` and ``compute_entity_embeddings``.
    """
    from safetensors.torch import load_file, save_file

    from vlpbench.config import cache_dir

    descriptions = load_entity_descriptions(entities)
    weights = _bert_weights_file(Path(text_encoder))
    encoder = text_encoder_record(text_encoder, (*TEXT_ENCODER_FILES, weights))
    entities_sha = sha256_file(entities)
    key = hashlib.sha256(f"medklip-entities\n{entities_sha}\n{encoder['sha256']}\nmax_length={ENTITY_MAX_LENGTH}"
                         .encode()).hexdigest()
    path = cache_dir() / "medklip_entities" / f"{key}.safetensors"
    if path.is_file():
        embeddings = load_file(str(path))["entity_embeddings"]
    else:
        embeddings = compute_entity_embeddings(descriptions, text_encoder)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"entity_embeddings": embeddings}, str(tmp))
    record = {"entities": {"path": str(entities), "sha256": entities_sha}, "text_encoder": encoder,
              "cache": str(path)}
    return embeddings, record


def load_entity_embeddings(path: str | Path) -> torch.Tensor:
    """A (75, 768) entity-embedding tensor from ``.safetensors`` (one tensor) or ``.pt`` (a tensor or a dict of one).

    Raises:
        CheckpointError: unreadable or unsafe file, or not exactly one floating (75, 768) tensor.
    """
    obj, _ = load_state_dict_file(path)
    if isinstance(obj, Mapping) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor) or tuple(obj.shape) != (N_ENTITIES, ENTITY_WIDTH) \
            or not obj.is_floating_point():
        found = f"a {tuple(obj.shape)} {obj.dtype} tensor" if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise CheckpointError(f"entity_embeddings file {path}: expected one floating ({N_ENTITIES}, {ENTITY_WIDTH}) "
                              f"tensor (MedKLIP's entity queries before disease_embedding_layer), found {found}")
    return obj.float().contiguous()


def _bert_weights_file(folder: Path, adapter: str = "medklip") -> str:
    """The weights file ``BertModel.from_pretrained`` reads from ``folder``; ``adapter`` names the adapter in errors.

    Raises:
        ConfigError: neither of ``BERT_WEIGHT_FILES`` is there.
    """
    weights = next((name for name in BERT_WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise ConfigError(f"adapter {adapter!r}: text_encoder={str(folder)!r} has no {' or '.join(BERT_WEIGHT_FILES)}; "
                          "the queries are computed with the BERT's own weights")
    return weights
