"""MAVL (CVPR 2024): MedKLIP's query design with each of 75 entities split into a description and 8 visual aspects.

Sources are ``HieuPhan33/CVPR2024_MAVL`` (the repository github.com/hieuvmphan/CVPR2024_MAVL redirects to).
``Pretrain/train_MAVL.py:264-286`` saves ``{'model': model.state_dict(), 'optimizer', 'lr_scheduler', 'config',
'epoch'}``; the released files are ``checkpoint_full_40.pth``, ``checkpoint_full_46.pth`` and
``checkpoint_short_37.pth`` (README "Pre-train", ``Zero-shot_classification/test.sh``). The test scripts strip a
``module.`` prefix (``Zero-shot_classification/test.py:325``), so both forms load here. Keys
(``Zero-shot_classification/models/model_MAVL.py:72-158``, ResNet-50 config ``configs/chexpert_mavl.yaml``):

- ``backbone.{0,1,4,5,6}.*``: ``nn.Sequential(*list(resnet50.children())[:-3])`` (model_MAVL.py:167-170), i.e.
  conv1, bn1, layer1-3 — as in MedKLIP there is no layer4 (1024 channels at stride 16).
- ``pool``: a CLIP attention pool over the 14×14 layer3 grid, 8 heads, 1024 → 256 (model_MAVL.py:34-68, 107):
  the global feature of the "text" zero-shot mode.
- ``res_l1`` (1×1 conv 1024→1024, PReLU), ``res_l2`` (1×1 conv 1024→256): patch tokens (model_MAVL.py:114-118).
- ``disease_embedding_layer`` Linear(768, 256): projects the 75×9 concept embeddings into queries.
- ``decoder``: MedKLIP's 4-layer pre-norm query decoder (width 256, 4 heads, FFN 1024;
  ``models/transformer.py`` TransformerDecoderLayer.forward_pre), reused from :mod:`.medklip`.
- ``classifier`` Linear(9·256, 2): absent / present from the 9 decoded queries of an entity, concatenated.
- Ignored: ``location_emb`` (feeds only the anatomy-location output ``sim`` against ``ana_book``,
  model_MAVL.py:263-264, which neither zero-shot nor grounding reads) and ``temp`` (pre-training temperature,
  dropped by MAVL's own loaders, test.py:328 and Zero-shot_grounding/test.py:158).

The 675 queries are not in the checkpoint: MAVL embeds, with Bio_ClinicalBERT ([CLS], 64 tokens,
test.py:143-147), each entity's description (``observation explanation.json``, read by key, test.py:278)
followed by its 8 aspects (``Pretrain/concept_gen/gpt4_mimic.json``, read by key, test.py:300-305), in
``original_class`` order (model_MAVL.py:88-94). This adapter does the same from local files (options
``text_encoder``, ``entities``, ``concepts``) or reads the (75, 9, 768) tensor (``concept_embeddings``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    GROUNDING,
    ZERO_SHOT,
    LoadReport,
    ModelCard,
    load_state_dict_file,
    sha256_file,
)
from vlpbench.adapters.medklip import (
    D_MODEL,
    ENTITY_NAMES,
    ENTITY_WIDTH,
    FEATURES,
    N_ENTITIES,
    STAGE_NOTE,
    MedKLIPAdapter,
    QueryDecoder,
    _bert_weights_file,
    _entity_indices,
    compute_entity_embeddings,
)
from vlpbench.adapters.text import TEXT_ENCODER_FILES, text_encoder_record
from vlpbench.errors import CheckpointError, ConfigError

# Concepts per entity: the description, then the 8 aspects of gpt4_mimic.json (model_MAVL.py:93-94).
N_ASPECTS = 8
N_CONCEPTS = N_ASPECTS + 1
POOL_HEADS, POOL_GRID = 8, 224 // 16  # model_MAVL.py:107
# Concepts whose cross-attention MAVL's grounding averages: the description and aspects 6-8
# (Zero-shot_grounding/test.py:202-206, mode 'avg' of configs/rsna_mavl.yaml).
GROUNDING_CONCEPTS = (0, 6, 7, 8)
# Zero-shot rules of Zero-shot_classification/test.py:339-369: "feature" (the default there, and in the
# CheXpert, RSNA and ChestX-ray14 configs) reads the classifier; "text" (configs/covid_mavl.yaml) the
# cosine similarity of the pooled image feature to each concept query.
ZERO_SHOT_MODES = ("feature", "text")
LOCATION_REASON = ("location_emb (Conv1d 256→768 over an entity's 9 queries): feeds only MAVL's anatomy-location "
                   "output against ana_book (model_MAVL.py:263-264), which zero-shot and grounding do not read")
TEMP_REASON = "temp: pre-training temperature, dropped by MAVL's own loaders (Zero-shot_classification/test.py:328)"
CONCEPT_HINT = ("needs MAVL's 75×9 concept queries: pass --model-option text_encoder=DIR (a local Bio_ClinicalBERT "
                "folder with weights), entities=FILE (MAVL's 'observation explanation.json') and concepts=FILE "
                "(its gpt4_mimic.json), or --model-option concept_embeddings=FILE (a (75, 9, 768) tensor)")


class ConceptPool(nn.Module):
    """MAVL's ``AttentionPool2d``: the mean token attends to itself and the patches (with learned positions)."""

    def __init__(self, grid: int = POOL_GRID, width: int = FEATURES, heads: int = POOL_HEADS,
                 out: int = D_MODEL) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(grid**2 + 1, width))
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.c_proj = nn.Linear(width, out)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` → ``(B, out)``; the positions table fixes h·w to ``grid²``, as in MAVL."""
        x = x.flatten(2).permute(2, 0, 1)
        x = torch.cat([x.mean(dim=0, keepdim=True), x]) + self.positional_embedding[:, None].to(x.dtype)
        out, _ = nn.functional.multi_head_attention_forward(
            x, x, x, x.shape[-1], self.heads, None, torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            None, None, False, 0.0, self.c_proj.weight, self.c_proj.bias, training=False, need_weights=False,
            use_separate_proj_weight=True, q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight)
        return out[0]


class MAVLHead(nn.Module):
    """MAVL after the ResNet trunk, by its key names (without the ignored ``location_emb`` and ``temp``)."""

    def __init__(self) -> None:
        super().__init__()
        self.disease_embedding_layer = nn.Linear(ENTITY_WIDTH, D_MODEL)
        self.pool = ConceptPool()
        self.res_l1 = nn.Sequential(nn.Conv2d(FEATURES, FEATURES, 1), nn.PReLU())
        self.res_l2 = nn.Conv2d(FEATURES, D_MODEL, 1)
        self.decoder = QueryDecoder()
        self.classifier = nn.Linear(D_MODEL * N_CONCEPTS, 2)

    def forward(self, features: torch.Tensor, concepts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layer3 features ``(B, 1024, h, w)`` and concepts ``(75, 9, 768)`` → MAVL's outputs.

        ``logits`` ``(B, 75, 2)``: the classifier; ``similarity`` ``(B, 9, 75)``: cosine of the pooled feature and
        each query (model_MAVL.py:276-277, needs a 14×14 grid); ``attention`` ``(B, 75, 9, h, w)``: cross-attention,
        head- and layer-averaged.
        """
        batch, _, h, w = features.shape
        memory = self.res_l2(self.res_l1(features)).flatten(2).permute(2, 0, 1)  # (h·w, B, 256)
        queries = self.disease_embedding_layer(concepts.reshape(-1, ENTITY_WIDTH))  # entity-major, concept-minor
        out, weights = self.decoder(queries.unsqueeze(1).repeat(1, batch, 1), memory)
        logits = self.classifier(out.transpose(0, 1).reshape(batch, N_ENTITIES, N_CONCEPTS * D_MODEL))
        attention = torch.stack(weights).mean(dim=0).view(batch, N_ENTITIES, N_CONCEPTS, h, w)
        result = {"logits": logits, "attention": attention}
        if h * w == POOL_GRID**2:
            pooled = nn.functional.normalize(self.pool(features), dim=-1)
            cosine = pooled @ nn.functional.normalize(queries, dim=-1).T
            result["similarity"] = cosine.view(batch, N_ENTITIES, N_CONCEPTS).transpose(1, 2)
        return result


def text_mode_probabilities(similarity: torch.Tensor) -> torch.Tensor:
    """MAVL's "text" zero-shot rule on ``similarity`` ``(B, 9, 75)`` → ``(B, 75)`` (test.py:353-369).

    For each of the entities "normal" (0) and "clear" (1) as the reference, softmax over (reference, entity)
    similarity per concept, read at the entity; average the two references, then the 9 concepts.
    """
    present = []
    for reference in (0, 1):
        pair = torch.stack([similarity[:, :, [reference]].expand_as(similarity), similarity], dim=-1)
        present.append(pair.softmax(dim=-1)[..., 1])
    return torch.stack(present).mean(dim=0).mean(dim=1)


class MAVLAdapter(MedKLIPAdapter):
    """MAVL's image encoder (ResNet-50 to layer3) and, given its concept queries, zero-shot and grounding.

    Input contract (MAVL's zero-shot datasets, Zero-shot_classification/dataset/dataset.py:35, 47): 224×224 RGB,
    ImageNet mean/std. The "text" zero-shot mode needs exactly 224 (the pool's 14×14 positions); the rest runs at
    any size divisible by 16.
    """

    name = "mavl"
    card = ModelCard(
        paper=("Phan et al., Decomposing Disease Descriptions for Enhanced Pathology Detection: A Multi-Aspect "
               "Vision-Language Pre-training Framework, CVPR 2024"),
        repository="github.com/hieuvmphan/CVPR2024_MAVL (Zero-shot_classification/models/model_MAVL.py)",
        checkpoints=("checkpoint_full_46.pth (zero-shot classification), checkpoint_full_40.pth (grounding), "
                     "checkpoint_short_37.pth — Google Drive folder linked from Pretrain/data_file/DATA_Prepare.md",
                     "observation explanation.json and Pretrain/concept_gen/gpt4_mimic.json — in the repository"),
        pretraining_data=("mimic_cxr",),
        notes=("the image trunk ends at layer3 (ResNet-50 children[:-3]): layer4 is not part of the model",),
    )
    description = ("MAVL (CVPR 2024) checkpoint_full_*.pth: ResNet-50 to layer3 (no layer4); zero-shot and "
                   "grounding through 75 entities × (description + 8 visual aspects) queries")
    default_options = {"text_encoder": "", "entities": "", "concepts": "", "concept_embeddings": "",
                       "zero_shot_mode": "feature"}
    checkpoint_forms = (
        "MAVL checkpoint_full_40.pth / checkpoint_full_46.pth / checkpoint_short_37.pth ({'model': state dict, "
        "'optimizer', 'lr_scheduler', 'config', 'epoch'}); location_emb and temp ignored",
        "its model state dict alone, with or without the 'module.' prefix",
        "concept queries: --model-option text_encoder=DIR entities=FILE concepts=FILE, or concept_embeddings=FILE "
        "((75, 9, 768) tensor); zero_shot_mode=feature|text",
    )
    capability_hints = {ZERO_SHOT: CONCEPT_HINT, GROUNDING: CONCEPT_HINT}
    stage_note = STAGE_NOTE.replace("MedKLIP", "MAVL")
    # The feature rule reads the classifier trained with cross-entropy on presence (test.py:366), as MedKLIP's; the
    # text rule is a softmax of similarities to reference texts (test.py:357), no trained probability (__init__).
    zero_shot_probabilities = True
    family = "MAVL"
    layout = "mavl-resnet50-layer3"
    backbone_prefix = "backbone."
    head_module = MAVLHead
    ignored = (("location_emb.", LOCATION_REASON), ("temp", TEMP_REASON))

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``), then the concept queries the options name.

        Raises:
            ConfigError: options naming no single source of concept queries, unreadable or incomplete
                entities / concepts files, a text encoder that cannot embed them, an unknown zero_shot_mode.
            CheckpointError: as ``Adapter``; also a ``concept_embeddings`` file that is not a (75, 9, 768) tensor.
        """
        super().__init__(checkpoint, **options)
        self.zero_shot_probabilities = self.options["zero_shot_mode"] == "feature"

    @property
    def concept_embeddings(self) -> torch.Tensor | None:
        """The (75, 9, 768) concept embeddings the queries are projected from, or None without them."""
        return self._entities

    @torch.no_grad()
    def zero_shot_scores(self, images: torch.Tensor, classes: list[str],
                         templates: tuple[str, str] = ("{}", "no {}")) -> torch.Tensor:
        """Probability that each class is present ``(B, len(classes))`` by MAVL's rule of ``zero_shot_mode``.

        "feature": softmax of the classifier's two logits of the class's entity, at "present" (test.py:366-367).
        "text": ``text_mode_probabilities`` of the pooled-feature similarities (test.py:353-369).
        ``templates`` is ignored (fixed descriptions, no prompts); class names map to entities as in MedKLIP
        (``medklip.entity_index``: MAVL's ``original_class`` is MedKLIP's 75 entities).

        Raises:
            CapabilityError: no concept queries were given.
            ConfigError: ``classes`` is empty or names a class without an entity; "text" mode off 224×224.
        """
        self.require(ZERO_SHOT)
        indices = _entity_indices(classes, "classes")
        outputs = self._forward(images)
        if self.options["zero_shot_mode"] == "feature":
            return outputs["logits"].softmax(dim=-1)[:, indices, 1]
        if "similarity" not in outputs:
            raise ConfigError(f"adapter 'mavl': zero_shot_mode=text pools a {POOL_GRID}×{POOL_GRID} grid (224×224 "
                              f"input); got images of {tuple(images.shape[-2:])}")
        return text_mode_probabilities(outputs["similarity"])[:, indices]

    @torch.no_grad()
    def grounding_maps(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cross-attention maps ``(B, len(texts), h, w)`` as MAVL's grounding test reads them.

        The head-averaged cross-attention of the 4 decoder layers, averaged over the layers and over the
        concepts ``GROUNDING_CONCEPTS`` of the text's entity (Zero-shot_grounding/test.py:192-210): each map sums
        to 1 over the patches.

        Raises:
            CapabilityError: no concept queries were given.
            ConfigError: ``texts`` is empty or names a class without an entity.
        """
        self.require(GROUNDING)
        indices = _entity_indices(texts, "texts")
        attention = self._forward(images)["attention"]
        return attention[:, indices][:, :, list(GROUNDING_CONCEPTS)].mean(dim=2)

    def _load_entities(self) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
        """The concept embeddings from the options, with a record of their source (both None without options)."""
        if self.options["concept_embeddings"]:
            path = self.options["concept_embeddings"]
            return load_concept_embeddings(path), {"concept_embeddings": {"path": path, "sha256": sha256_file(path)}}
        if self.options["text_encoder"]:
            texts = concept_texts(self.options["entities"], self.options["concepts"])
            embeddings = compute_entity_embeddings(texts, self.options["text_encoder"], self.name)
            weights = _bert_weights_file(Path(self.options["text_encoder"]), self.name)
            record = {"entities": {"path": self.options["entities"], "sha256": sha256_file(self.options["entities"])},
                      "concepts": {"path": self.options["concepts"], "sha256": sha256_file(self.options["concepts"])},
                      "text_encoder": text_encoder_record(self.options["text_encoder"], (*TEXT_ENCODER_FILES, weights))}
            return embeddings.view(N_ENTITIES, N_CONCEPTS, ENTITY_WIDTH), record
        return None, None

    @classmethod
    def inspect(cls, checkpoint: str | Path | None = None, **options: Any) -> LoadReport:
        """``Adapter.inspect``, also reading the concept files the options name, without computing embeddings.

        Raises:
            ConfigError / CheckpointError: as ``Adapter.inspect``; also a concept file that a run would refuse.
        """
        report = super(MedKLIPAdapter, cls).inspect(checkpoint, **options)
        resolved = cls._resolve_options(options)
        if resolved["concept_embeddings"]:
            load_concept_embeddings(resolved["concept_embeddings"])
        if resolved["text_encoder"]:
            concept_texts(resolved["entities"], resolved["concepts"])
            _bert_weights_file(Path(resolved["text_encoder"]), cls.name)
        return report

    @classmethod
    def _resolve_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``Adapter._resolve_options``, checking the zero-shot mode and that one source of concepts is named.

        Raises:
            ConfigError: an unknown ``zero_shot_mode``; ``concept_embeddings`` with any of ``text_encoder`` /
                ``entities`` / ``concepts``; or only some of those three.
        """
        resolved = super(MedKLIPAdapter, cls)._resolve_options(options)
        if resolved["zero_shot_mode"] not in ZERO_SHOT_MODES:
            raise ConfigError(f"adapter 'mavl': zero_shot_mode={resolved['zero_shot_mode']!r}; expected one of "
                              f"{', '.join(ZERO_SHOT_MODES)} (MAVL Zero-shot_classification/test.py:339)")
        computed = {name: resolved[name] for name in ("text_encoder", "entities", "concepts")}
        if resolved["concept_embeddings"] and any(computed.values()):
            raise ConfigError("adapter 'mavl': pass either concept_embeddings=FILE or text_encoder=DIR with "
                              "entities=FILE and concepts=FILE, not both")
        missing = [name for name, value in computed.items() if not value]
        if any(computed.values()) and missing:
            raise ConfigError(f"adapter 'mavl': computing the concept queries also needs option(s) "
                              f"{', '.join(missing)} ({CONCEPT_HINT})")
        return resolved


# --- key layout --------------------------------------------------------------------------------------------


# --- concept queries ---------------------------------------------------------------------------------------


def _read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        book = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what} file {path}: cannot be read as JSON: {e}") from e
    if not isinstance(book, dict):
        raise ConfigError(f"{what} file {path}: expected a JSON object keyed by entity name, found {type(book).__name__}")
    return book


def concept_texts(entities: str | Path, concepts: str | Path) -> list[str]:
    """The 675 texts MAVL embeds, entity-major: each entity's description, then its 8 aspects.

    Both files are read by key in ``ENTITY_NAMES`` order, as MAVL's test scripts do (test.py:278, 301); extra
    keys (e.g. "covid19") are not used.

    Raises:
        ConfigError: unreadable, not a JSON object, an entity missing (named), a description that is not a
            string, or aspects that are not a list of 8 strings.
    """
    descriptions = _read_json_object(entities, "entities")
    aspects = _read_json_object(concepts, "concepts")
    texts = []
    for name in ENTITY_NAMES:
        if not isinstance(descriptions.get(name), str):
            raise ConfigError(f"entities file {entities}: no string description for entity {name!r} (MAVL reads "
                              "'observation explanation.json' by entity name)")
        entry = aspects.get(name)
        if not (isinstance(entry, list) and len(entry) == N_ASPECTS and all(isinstance(t, str) for t in entry)):
            raise ConfigError(f"concepts file {concepts}: entity {name!r} needs a list of {N_ASPECTS} aspect strings "
                              f"(as in MAVL's gpt4_mimic.json), found {entry!r:.80}")
        texts += [descriptions[name], *entry]
    return texts


def load_concept_embeddings(path: str | Path) -> torch.Tensor:
    """A (75, 9, 768) concept-embedding tensor from ``.safetensors`` or ``.pt`` (a tensor or a dict of one).

    Raises:
        CheckpointError: unreadable or unsafe file, or not exactly one floating (75, 9, 768) tensor.
    """
    obj, _ = load_state_dict_file(path)
    if isinstance(obj, Mapping) and len(obj) == 1:
        obj = next(iter(obj.values()))
    shape = (N_ENTITIES, N_CONCEPTS, ENTITY_WIDTH)
    if not isinstance(obj, torch.Tensor) or tuple(obj.shape) != shape or not obj.is_floating_point():
        found = f"a {tuple(obj.shape)} {obj.dtype} tensor" if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise CheckpointError(f"concept_embeddings file {path}: expected one floating {shape} tensor (MAVL's "
                              f"description + {N_ASPECTS} aspect embeddings per entity), found {found}")
    return obj.float().contiguous()
