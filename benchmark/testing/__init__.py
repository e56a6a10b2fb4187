"""Checkpoints in each adapter's published key layout, for tests, the demo and users' own tests.

Each writer draws random weights under a seed in a forked RNG (the caller's RNG is untouched, and one seed
always gives the same file) and saves them in the exact container, key names and shapes that the model's
authors publish, so an adapter loads them as it loads the real file. Text encoders can be shrunk to keep
test files small. This module holds the CNN families; ``vlpbench.testing.vit`` the ViT families (MGCA-ViT,
BiomedCLIP), ``vlpbench.testing.hf`` MedCLIP and CXR-CLIP (built from torchvision and transformers modules),
``vlpbench.testing.aligned`` hand-set heads under which a zero-shot score must beat chance, and
``vlpbench.testing.weightless`` a base for test models that compute their embeddings from the inputs;
``vlpbench.testing.dicom`` writes uncompressed DICOMs of any bit depth for tests of the DICOM reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlpbench.adapters.base import LightningAttributeDict, save_checkpoint
from vlpbench.adapters.containers import DictConfigLike, EarlyStoppingClass, ModelCheckpointClass, dict_config
from vlpbench.adapters.clip import HEAD_WIDTH, ClipConfig
from vlpbench.adapters.g2d import LAYOUTS as G2D_LAYOUTS
from vlpbench.adapters.g2d import PROJECTION_WIDTH, AttentionPool2d, image_projection, text_projection
from vlpbench.adapters.medklip import (
    D_MODEL,
    ENTITY_NAMES,
    ENTITY_WIDTH,
    HEADS,
    LAYERS,
    N_ENTITIES,
    PUBLISHED_KEY_SPELLINGS,
    MedKLIPHead,
)
from vlpbench.adapters.mgca import EMB_DIM, HEAD_HIDDEN, global_embedding
from vlpbench.errors import ConfigError

# --- text encoders ------------------------------------------------------------------------------------

TINY_BERT_WORDS = ("no", "pleural", "effusion", "pneumothorax", "pneumonia", "cardiomegaly", "edema", "atelectasis",
                   "consolidation", "opacity", "lung", "left", "right", "small", "large", "normal", "finding")


def write_tiny_bert_folder(folder: str | Path, *, hidden: int = 32, layers: int = 2, heads: int = 2,
                           words: tuple[str, ...] = TINY_BERT_WORDS) -> Path:
    """A tiny local BERT folder (config.json and a word-piece tokenizer; no weights), as a ``text_encoder``.

    The vocabulary holds BERT's special tokens, ``words``, single letters with their ``##`` continuations and
    200 filler tokens, so any lower-case English text tokenises. Returns the folder.
    """
    from transformers import BertConfig, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(97, 123)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *words, *letters,
             *(f"##{c}" for c in letters), *(f"tok{i}" for i in range(200))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               intermediate_size=4 * hidden, max_position_embeddings=512, type_vocab_size=2).save_pretrained(folder)
    return folder


# --- Lightning 1.1 containers -------------------------------------------------------------------------


def lightning_1_1_checkpoint(state_dict: dict[str, torch.Tensor], hyper_parameters: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` in the container PyTorch Lightning 1.1.4 writes for a module that saved an omegaconf config.

    As ``checkpoint_connector.py: dump_checkpoint`` (Lightning 1.1.4): epoch and step counters, ``callbacks`` keyed
    by the ModelCheckpoint and EarlyStopping classes (with tensor scores), Adam and ReduceLROnPlateau states,
    native AMP scaler state, ``hparams_name``, ``hyper_parameters`` as an omegaconf 2.0.5 ``DictConfig`` of
    ``hyper_parameters`` and ``hparams_type`` its class. ``save_checkpoint`` writes it with the real class paths.
    """
    score = torch.tensor(1.25)
    return {
        "epoch": 12,
        "global_step": 4800,
        "pytorch-lightning_version": "1.1.4",
        "callbacks": {
            ModelCheckpointClass: {"monitor": "val_loss", "best_model_score": score, "best_model_path": "epoch=11.ckpt",
                                   "current_score": score + 0.1, "dirpath": "./data/ckpt"},
            EarlyStoppingClass: {"wait_count": 0, "stopped_epoch": 0, "best_score": score, "patience": 10},
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 5e-05, "betas": (0.5, 0.999), "eps": 1e-08,
                                                             "weight_decay": 1e-06, "amsgrad": False, "params": []}]}],
        "lr_schedulers": [{"factor": 0.5, "min_lrs": [0], "patience": 5, "verbose": False, "cooldown": 0,
                           "cooldown_counter": 0, "mode": "min", "threshold": 0.0001, "threshold_mode": "rel",
                           "best": 1.25, "num_bad_epochs": 0, "mode_worse": float("inf"), "eps": 1e-08,
                           "last_epoch": 12, "_last_lr": [5e-05]}],
        "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                     "growth_interval": 2000, "_growth_tracker": 0},
        "state_dict": state_dict,
        "hparams_name": "cfg",
        "hyper_parameters": dict_config(hyper_parameters),
        "hparams_type": DictConfigLike,
    }


# --- G2D ----------------------------------------------------------------------------------------------

# Bio_ClinicalBERT (a BERT-base): vocabulary, width, positions, token types, layers; its FFN is 4× the width.
_BERT_VOCAB, _BERT_HIDDEN, _BERT_POSITIONS, _BERT_TYPES, _BERT_LAYERS = 28996, 768, 512, 2, 12


def write_g2d_checkpoint(
    path: str | Path,
    layout: str = "encoder",
    seed: int = 0,
    *,
    text_layers: int = _BERT_LAYERS,
    text_hidden: int = _BERT_HIDDEN,
    text_vocab: int = _BERT_VOCAB,
) -> Path:
    """Write a random-init G2D checkpoint in one of the published key layouts; return its path.

    The image U-Net is ``smp.Unet('resnet50', in_channels=3, classes=1)`` with smp's default init under
    ``torch.manual_seed(seed)`` (the global RNG is restored afterwards), so one seed gives the same image
    weights in every layout and the same file content on every call.

    For ``layout="pretrain"`` the file is the full training checkpoint: ``epoch``, ``model_state_dict``
    in G2D's module order (``img_model``, ``attnpool``, ``lm_model``, ``proj_v``, ``proj_t``,
    ``pseudo_conv``) with the real key names and shapes, and ``optimizer_state_dict`` of G2D's AdamW as
    saved before its first step (empty ``state``). ``lm_model.*`` follows transformers' ``BertModel`` with
    pooler (no persistent ``position_ids`` buffer, as in transformers ≥ 4.31). With the real 12 text layers
    the file is about 570 MB; ``text_layers`` (0-12) keeps only the first layers for small test files.
    ``text_hidden`` and ``text_vocab`` shrink the BERT (FFN width 4 × ``text_hidden``, 512 positions, 2 token
    types) to match a tiny ``BertConfig`` in tests; ``proj_t`` takes ``text_hidden`` inputs.

    Raises:
        ConfigError: unknown ``layout``, ``text_layers`` outside 0-12, or ``text_hidden``/``text_vocab`` < 1.
    """
    import segmentation_models_pytorch as smp

    if layout not in G2D_LAYOUTS:
        raise ConfigError(f"unknown G2D layout {layout!r}; expected one of {', '.join(G2D_LAYOUTS)}")
    if not 0 <= text_layers <= _BERT_LAYERS:
        raise ConfigError(f"text_layers must be between 0 and {_BERT_LAYERS}, got {text_layers}")
    if text_hidden < 1 or text_vocab < 1:
        raise ConfigError(f"text_hidden and text_vocab must be positive, got {text_hidden} and {text_vocab}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = smp.Unet("resnet50", encoder_weights=None, in_channels=3, classes=1)
        if layout == "encoder":
            obj: dict[str, Any] = unet.encoder.state_dict()
        elif layout == "encoder_decoder":
            obj = unet.state_dict()
        else:
            obj = _pretrain_checkpoint(unet, text_layers, text_hidden, text_vocab)

    return save_checkpoint(obj, path)


def _pretrain_checkpoint(unet: nn.Module, text_layers: int, text_hidden: int, text_vocab: int) -> dict[str, Any]:
    """G2D's ``save_checkpoints`` dict around ``unet``, with random text side and heads (uses the global RNG)."""
    attnpool = AttentionPool2d()
    # BatchNorm without affine parameters: only running statistics are saved.
    proj_v = image_projection()
    proj_t = text_projection(text_hidden)
    pseudo_conv = nn.Conv2d(1024, PROJECTION_WIDTH, 1)
    bert = _bert_state(text_layers, text_hidden, text_vocab)

    model_state: dict[str, torch.Tensor] = {}
    n_params = 0
    parts: list[tuple[str, nn.Module | dict[str, torch.Tensor]]] = [
        ("img_model.", unet), ("attnpool.", attnpool), ("lm_model.", bert),
        ("proj_v.", proj_v), ("proj_t.", proj_t), ("pseudo_conv.", pseudo_conv),
    ]
    for prefix, part in parts:
        if isinstance(part, nn.Module):
            model_state.update({prefix + k: v for k, v in part.state_dict().items()})
            n_params += len(list(part.parameters()))
        else:
            model_state.update({prefix + k: v for k, v in part.items()})
            n_params += len(part)  # every BERT tensor is a parameter

    # G2D's optimizer: AdamW(model.parameters(), lr=2e-5, weight_decay=1e-8, betas=(0.9, 0.999)), with a
    # CosineAnnealingWarmRestarts scheduler that adds "initial_lr" to the group.
    placeholders = [nn.Parameter(torch.empty(0)) for _ in range(n_params)]
    optimizer_state = torch.optim.AdamW(placeholders, lr=2e-5, weight_decay=1e-8, betas=(0.9, 0.999)).state_dict()
    optimizer_state["param_groups"][0]["initial_lr"] = 2e-5
    return {"epoch": 0, "model_state_dict": model_state, "optimizer_state_dict": optimizer_state}


def _bert_state(layers: int, hidden: int, vocab: int) -> dict[str, torch.Tensor]:
    """A BERT state dict (transformers ``BertModel`` key names) with BERT's init: N(0, 0.02) weights."""

    def linear(out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        return {"weight": torch.randn(out_features, in_features) * 0.02, "bias": torch.zeros(out_features)}

    def layer_norm() -> dict[str, torch.Tensor]:
        return {"weight": torch.ones(hidden), "bias": torch.zeros(hidden)}

    def named(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v for k, v in tensors.items()}

    state = {
        "embeddings.word_embeddings.weight": torch.randn(vocab, hidden) * 0.02,
        "embeddings.position_embeddings.weight": torch.randn(_BERT_POSITIONS, hidden) * 0.02,
        "embeddings.token_type_embeddings.weight": torch.randn(_BERT_TYPES, hidden) * 0.02,
        **named("embeddings.LayerNorm", layer_norm()),
    }
    for i in range(layers):
        block = f"encoder.layer.{i}"
        for projection in ("query", "key", "value"):
            state.update(named(f"{block}.attention.self.{projection}", linear(hidden, hidden)))
        state.update(named(f"{block}.attention.output.dense", linear(hidden, hidden)))
        state.update(named(f"{block}.attention.output.LayerNorm", layer_norm()))
        state.update(named(f"{block}.intermediate.dense", linear(4 * hidden, hidden)))
        state.update(named(f"{block}.output.dense", linear(hidden, 4 * hidden)))
        state.update(named(f"{block}.output.LayerNorm", layer_norm()))
    state.update(named("pooler.dense", linear(hidden, hidden)))
    return state


# --- MGCA ---------------------------------------------------------------------------------------------

# mgca/configs/bert_config.json: Bio_ClinicalBERT's vocabulary, width and positions, 6 layers with
# cross-attention; MGCA learns 500 prototypes.
_MGCA_TEXT_LAYERS, MGCA_PROTOTYPES = 6, 500


def write_mgca_checkpoint(
    path: str | Path, seed: int = 0, *, text_layers: int = _MGCA_TEXT_LAYERS, text_hidden: int = _BERT_HIDDEN
) -> Path:
    """Write a random-init MGCA ``resnet_50.ckpt`` with the published keys and shapes; return its path.

    The image encoder equals ``torchvision.models.resnet50()`` (without ``fc``) built right after
    ``torch.manual_seed(seed)``; heads and text encoder follow from the same seed. The global RNG is restored
    afterwards, so one seed always gives the same tensors.

    The text encoder is BLIP's ``med.BertModel`` as MGCA configures it: embeddings without token types,
    ``position_ids`` buffer, ``text_layers`` layers each with self-attention, cross-attention, FFN (4× width),
    no pooler. The real width is 768 (the file is then about 400 MB); tests may shrink ``text_hidden``
    (and ``text_layers``) to keep files small, which changes only ``text_encoder_q.*`` shapes, and with
    them ``text_encoder_q.{global,local}_embed.head.0``.

    Lightning entries: ``hyper_parameters`` (written as Lightning's ``AttributeDict`` class, readable without
    Lightning), ``epoch``, ``global_step``, ``optimizer_states`` (empty), ``lr_schedulers`` (empty),
    ``pytorch-lightning_version`` "1.5.9".

    Raises:
        ConfigError: ``text_layers`` negative or ``text_hidden`` not a positive multiple of 12 (the heads).
    """
    import torchvision

    if text_layers < 0:
        raise ConfigError(f"text_layers must be >= 0, got {text_layers}")
    if text_hidden <= 0 or text_hidden % 12:
        raise ConfigError(f"text_hidden must be a positive multiple of 12 (BERT's 12 heads), got {text_hidden}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resnet = torchvision.models.resnet50(weights=None)
        resnet.fc = nn.Identity()
        state = mgca_state(resnet, 2048, 1024, text_layers, text_hidden)

    hyper_parameters = LightningAttributeDict(img_encoder="resnet_50", emb_dim=EMB_DIM,
                                              num_prototypes=MGCA_PROTOTYPES)
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "1.5.9",
        "state_dict": state,
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters,
    }
    return save_checkpoint(checkpoint, path)


def mgca_state(image_model: nn.Module, global_width: int, local_width: int, text_layers: int,
               text_hidden: int) -> dict[str, torch.Tensor]:
    """MGCA's ``state_dict`` around ``image_model`` (mgca_module.py:64-76): the image encoder with its global
    and local heads over ``global_width`` / ``local_width`` features, the text encoder and its heads, the
    token-level attention layers and the prototypes, freshly initialised from the caller's RNG."""
    parts: list[tuple[str, nn.Module]] = [
        ("img_encoder_q.model.", image_model),
        ("img_encoder_q.global_embed.head.", global_embedding(global_width)),
        ("img_encoder_q.local_embed.head.", _local_embedding(local_width)),
        ("text_encoder_q.model.", _MedBert(text_layers, text_hidden)),
        ("text_encoder_q.global_embed.head.", global_embedding(text_hidden)),
        ("text_encoder_q.local_embed.head.", _local_embedding(text_hidden)),
        ("patch_local_atten_layer.", nn.MultiheadAttention(EMB_DIM, 1)),
        ("word_local_atten_layer.", nn.MultiheadAttention(EMB_DIM, 1)),
        ("prototype_layer.", nn.Linear(EMB_DIM, MGCA_PROTOTYPES, bias=False)),
    ]
    return {prefix + k: v for prefix, module in parts for k, v in module.state_dict().items()}


def _local_embedding(in_dim: int) -> nn.Sequential:
    """MGCA's ``LocalEmbedding``: 1×1 Conv1d, BN, ReLU, 1×1 Conv1d, BN without affine parameters."""
    return nn.Sequential(
        nn.Conv1d(in_dim, HEAD_HIDDEN, 1), nn.BatchNorm1d(HEAD_HIDDEN), nn.ReLU(inplace=True),
        nn.Conv1d(HEAD_HIDDEN, EMB_DIM, 1), nn.BatchNorm1d(EMB_DIM, affine=False),
    )


class _MedBert(nn.Module):
    """Only the parameter structure of BLIP's ``med.BertModel`` (no forward): the key names and shapes."""

    def __init__(self, layers: int, hidden: int) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(_BERT_VOCAB, hidden)
        self.embeddings.position_embeddings = nn.Embedding(_BERT_POSITIONS, hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden)
        self.embeddings.register_buffer("position_ids", torch.arange(_BERT_POSITIONS).expand((1, -1)))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_med_layer(hidden) for _ in range(layers))


def _med_layer(hidden: int) -> nn.Module:
    """One ``med.BertLayer`` with cross-attention (``encoder_width`` = the text width, as in MGCA's config)."""

    def attention() -> nn.Module:
        block = nn.Module()
        block.self = nn.Module()
        for projection in ("query", "key", "value"):
            setattr(block.self, projection, nn.Linear(hidden, hidden))
        block.output = nn.Module()
        block.output.dense = nn.Linear(hidden, hidden)
        block.output.LayerNorm = nn.LayerNorm(hidden)
        return block

    layer = nn.Module()
    layer.attention = attention()
    layer.crossattention = attention()
    layer.intermediate = nn.Module()
    layer.intermediate.dense = nn.Linear(hidden, 4 * hidden)
    layer.output = nn.Module()
    layer.output.dense = nn.Linear(4 * hidden, hidden)
    layer.output.LayerNorm = nn.LayerNorm(hidden)
    return layer


# --- CLIP (OpenAI layout, as CheXzero publishes it) ---------------------------------------------------


def write_clip_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    vit_b32: bool = False,
    embed_dim: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    vision_width: int = 64,
    vision_layers: int = 2,
    text_width: int = 64,
    text_layers: int = 2,
    context_length: int = 77,
    openai_scalars: bool = False,
) -> Path:
    """Write a random-init OpenAI-layout ViT CLIP state dict (CheXzero's file form); return its path.

    The tensors are open_clip's default init of the shape given, drawn under ``torch.manual_seed(seed)`` in a
    forked RNG (the caller's RNG is untouched; one seed always gives the same file). The defaults are tiny
    (for tests); ``vit_b32=True`` gives OpenAI's ViT-B/32 shape instead (about 600 MB in fp32) and
    overrides the shape arguments. The vocabulary is always OpenAI's 49408 BPE tokens.
    ``openai_scalars=True`` adds ``input_resolution``, ``context_length`` and ``vocab_size`` as in OpenAI's
    TorchScript archives.

    Raises:
        ConfigError: ``image_size`` not a multiple of ``patch_size``, or a width not a multiple of 64.
    """
    if vit_b32:
        config = ClipConfig.vit_b32()
    else:
        if image_size % patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if vision_width % HEAD_WIDTH or text_width % HEAD_WIDTH:
            raise ConfigError(f"widths must be multiples of {HEAD_WIDTH} (the attention head width), got "
                              f"vision {vision_width}, text {text_width}")
        # Every OpenAI-layout CLIP shares OpenAI's BPE vocabulary, whatever its size.
        config = ClipConfig(embed_dim=embed_dim, image_size=image_size, patch_size=patch_size,
                            vision_width=vision_width, vision_layers=vision_layers, context_length=context_length,
                            vocab_size=ClipConfig.vit_b32().vocab_size, text_width=text_width,
                            text_layers=text_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = config.build().state_dict()
    if openai_scalars:
        state |= {"input_resolution": torch.tensor(config.image_size),
                  "context_length": torch.tensor(config.context_length),
                  "vocab_size": torch.tensor(config.vocab_size)}
    return save_checkpoint(state, path)


# --- MedKLIP ------------------------------------------------------------------------------------------

# Pretrain_MedKLIP.yaml, the parts that describe the model and its optimisation.
_MEDKLIP_CONFIG = {
    "image_res": 224, "d_model": D_MODEL, "res_base_model": "resnet50", "num_queries": N_ENTITIES,
    "dropout": 0.1, "attribute_set_size": 2, "N": LAYERS, "H": HEADS,
    "text_encoder": "emilyalsentzer/Bio_ClinicalBERT",
    "optimizer": {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02},
    "schedular": {"sched": "cosine", "lr": 1e-4, "epochs": 100, "min_lr": 1e-5, "decay_rate": 1,
                  "warmup_lr": 1e-5, "warmup_epochs": 5, "cooldown_epochs": 0},
}


def write_medklip_checkpoint(path: str | Path, *, seed: int = 0, prefix: str = "module.") -> Path:
    """Write a random-init MedKLIP ``checkpoint_final.pth`` with the published keys and shapes; return its path.

    The container is train_MedKLIP.py's: ``model`` (342 keys, each prefixed with ``prefix``, DataParallel's
    ``"module."`` by default; ``""`` gives the unprefixed form), ``optimizer`` (AdamW as saved before its first
    step), ``lr_scheduler`` (plain values), ``config`` and ``epoch``. The trunk is torchvision's ResNet-50 init,
    the rest MedKLIP's ``_init_weights`` (Linear and attention projections N(0, 0.02)), all drawn under
    ``torch.manual_seed(seed)`` in a forked RNG: one seed always gives the same tensors, and the caller's
    RNG is untouched.
    """
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resnet = torchvision.models.resnet50(weights=None)
        head = MedKLIPHead()
        cl_fc = nn.Linear(D_MODEL, ENTITY_WIDTH)
        for module in (head, cl_fc):
            module.apply(_medklip_init)
    res_features = nn.Sequential(*list(resnet.children())[:-3])
    # MedKLIP registers its modules in this order, so its state dict lists them so.
    parts: list[tuple[str, nn.Module]] = [
        ("disease_embedding_layer", head.disease_embedding_layer), ("cl_fc", cl_fc),
        ("res_features", res_features), ("res_l1", head.res_l1), ("res_l2", head.res_l2),
        ("decoder", head.decoder), ("classifier", head.classifier),
    ]
    model = {f"{prefix}{name}.{k}": v for name, module in parts for k, v in module.state_dict().items()}
    n_params = sum(len(list(module.parameters())) for _, module in parts)
    placeholders = [nn.Parameter(torch.empty(0)) for _ in range(n_params)]
    optimizer = torch.optim.AdamW(placeholders, lr=1e-4, weight_decay=0.02).state_dict()
    schedule = _MEDKLIP_CONFIG["schedular"]
    lr_scheduler = {"t_initial": schedule["epochs"], "lr_min": schedule["min_lr"], "warmup_t": schedule["warmup_epochs"],
                    "warmup_lr_init": schedule["warmup_lr"], "base_values": [schedule["lr"]]}
    obj = {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
           "config": json.loads(json.dumps(_MEDKLIP_CONFIG)), "epoch": schedule["epochs"] - 1}
    return save_checkpoint(obj, path)


def _medklip_init(module: nn.Module) -> None:
    """MedKLIP's ``_init_weights``: N(0, 0.02) Linear weights and attention projections."""
    if isinstance(module, nn.Linear):
        module.weight.data.normal_(mean=0.0, std=0.02)
    elif isinstance(module, nn.MultiheadAttention):
        module.in_proj_weight.data.normal_(mean=0.0, std=0.02)
        module.out_proj.weight.data.normal_(mean=0.0, std=0.02)


def write_medklip_entities(path: str | Path) -> Path:
    """Write a synthetic ``observation explanation.json``: MedKLIP's 75 keys (position 20 spelt "eumonia", as
    published), each with a short made-up description. Returns the path."""
    path = Path(path)
    book = {PUBLISHED_KEY_SPELLINGS.get(i, name): f"Synthetic description {i}: findings of {name.replace('_', ' ')}."
            for i, name in enumerate(ENTITY_NAMES)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(book, indent=4) + "\n", encoding="utf-8")
    return path


def write_medklip_entity_embeddings(path: str | Path, *, seed: int = 0) -> Path:
    """Write a random N(0, 1) (75, 768) entity-embedding tensor (``.safetensors``, else ``torch.save``); return the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    embeddings = torch.randn(N_ENTITIES, ENTITY_WIDTH, generator=torch.Generator().manual_seed(seed))
    if path.suffix == ".safetensors":
        save_file({"entity_embeddings": embeddings}, str(path))
    else:
        torch.save(embeddings, path)
    return path


def write_mavl_checkpoint(path: str | Path, *, seed: int = 0, prefix: str = "") -> Path:
    """Write a random-init MAVL ``checkpoint_full_*.pth`` with the published keys and shapes; return its path.

    The container is Pretrain/train_MAVL.py's (``model``, ``optimizer``, ``lr_scheduler``, ``config``,
    ``epoch``); ``model`` holds, in MAVL's registration order, ``disease_embedding_layer``, ``backbone`` (ResNet-50
    children[:-3]), ``pool``, ``res_l1``, ``res_l2``, ``location_emb``, ``decoder``, ``classifier`` and the
    pre-training ``temp``, each key prefixed with ``prefix``. Published sizes (75 entities × 9 concepts,
    width 256) — the strict load admits no other. Drawn under ``torch.manual_seed(seed)`` in a forked RNG.
    """
    import torchvision

    from vlpbench.adapters.mavl import FEATURES, N_CONCEPTS, MAVLHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resnet = torchvision.models.resnet50(weights=None)
        head = MAVLHead()
        head.apply(_medklip_init)
        torch.nn.init.normal_(head.pool.positional_embedding, std=FEATURES ** -0.5)
        location = nn.Conv1d(D_MODEL, ENTITY_WIDTH, N_CONCEPTS, stride=N_CONCEPTS)
    parts: list[tuple[str, nn.Module]] = [
        ("disease_embedding_layer", head.disease_embedding_layer),
        ("backbone", nn.Sequential(*list(resnet.children())[:-3])), ("pool", head.pool),
        ("res_l1", head.res_l1), ("res_l2", head.res_l2), ("location_emb", location),
        ("decoder", head.decoder), ("classifier", head.classifier),
    ]
    model = {f"{prefix}{name}.{k}": v for name, module in parts for k, v in module.state_dict().items()}
    model[f"{prefix}temp"] = torch.full((N_CONCEPTS,), float(torch.log(torch.tensor(1 / 0.07))))
    config = {**_MEDKLIP_CONFIG, "model": "mavl", "concept_book": "concept_gen/gpt4_mimic.json", "cl_global": 0.1}
    obj = {"model": model, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {},
           "config": json.loads(json.dumps(config)), "epoch": 46}
    return save_checkpoint(obj, path)


def write_mavl_concept_files(folder: str | Path) -> tuple[Path, Path]:
    """Write a synthetic ``observation explanation.json`` and ``gpt4_mimic.json`` (MAVL's keys, made-up text,
    plus an unused "covid19" entry as in MAVL's files); return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [*ENTITY_NAMES, "covid19"]
    entities = folder / "observation explanation.json"
    entities.write_text(json.dumps({n: f"Synthetic description of {n.replace('_', ' ')}." for n in names}),
                        encoding="utf-8")
    concepts = folder / "gpt4_mimic.json"
    concepts.write_text(json.dumps({n: [f"aspect {k}: findings of {n.replace('_', ' ')}." for k in range(8)]
                                    for n in names}), encoding="utf-8")
    return entities, concepts
