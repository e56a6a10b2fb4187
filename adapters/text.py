"""Text encoders from a local Hugging Face BERT folder, shared by every adapter with a text side.

The published checkpoints of the CXR models carry their BERT's weights (G2D ``lm_model.*``, GLoRIA
``gloria.text_encoder.model.*``, CXR-CLIP ``text_encoder.text_encoder.*`` ...) but not its configuration or
tokenizer: those come from the folder the user names with ``--model-option text_encoder=DIR`` (config.json
and the tokenizer files of Bio_ClinicalBERT, CXR-BERT, PubMedBERT ...). Nothing is downloaded.

The pieces: ``bert_config`` reads the folder's config; ``match_bert`` accounts a checkpoint's BERT keys against
a ``BertModel`` of that config, strictly; ``build_bert`` materialises the model with those weights;
``load_tokenizer`` and ``text_encoder_record`` give the tokenizer and the sha256 of the files read, which
goes into result records; ``open_text_folder`` gives both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import LoadReport, loaded_eval, match_keys, sha256_tree, tensor_spec
from vlpbench.errors import ConfigError

# What BertConfig and AutoTokenizer read from a local Hugging Face BERT folder; those present are hashed into
# result records. The weights are not among them: they come from the checkpoint.
TEXT_ENCODER_FILES = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                      "tokenizer.json", "added_tokens.json")
POSITION_IDS_REASON = "position_ids buffer (saved by transformers < 4.31): recomputed by BertModel, not a weight"
TEXT_ENCODER_HINT = ("a local BERT folder with config.json and the tokenizer files; the weights come from the "
                     "checkpoint")


def bert_config(folder: str | Path, adapter: str) -> Any:
    """``transformers.BertConfig`` of the local folder ``folder``; ``adapter`` names the adapter in errors.

    Raises:
        ConfigError: the folder holds no readable BERT config.json.
    """
    from transformers import BertConfig

    try:
        return BertConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"adapter {adapter!r}: text_encoder={str(folder)!r} is not a local BERT folder with a "
                          f"config.json: {e}") from e


def bert_shapes(config: Any, *, pooler: bool) -> dict[str, tuple[int, ...]]:
    """Key → shape of ``BertModel(config)``'s state dict, built on the meta device (no init time spent)."""
    from transformers import BertModel

    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=pooler)
    return {k: tensor_spec(v) for k, v in model.state_dict().items()}


def match_bert(part: Mapping[str, Any], report: LoadReport, config: Any, *, source_prefix: str,
               target_prefix: str = "", pooler: bool = True) -> dict[str, torch.Tensor]:
    """Account ``part`` (a BERT's keys, ``source_prefix`` already removed) against ``BertModel(config)``.

    ``embeddings.position_ids`` (a constant buffer older transformers versions saved) is ignored with
    ``POSITION_IDS_REASON``; every other key must match by name and shape. Returns the tensors under the
    ``BertModel`` names.
    """
    part = dict(part)
    if "embeddings.position_ids" in part:
        report.ignore(POSITION_IDS_REASON, [source_prefix + "embeddings.position_ids"])
        del part["embeddings.position_ids"]
    return match_keys(part, bert_shapes(config, pooler=pooler), report, source_prefix=source_prefix,
                      target_prefix=target_prefix)


def build_bert(config: Any, state: Mapping[str, torch.Tensor], *, pooler: bool = True) -> nn.Module:
    """A ``BertModel(config)`` holding ``state`` (loaded strictly), in eval mode."""
    from transformers import BertModel

    return loaded_eval(BertModel(config, add_pooling_layer=pooler), state)


def load_tokenizer(text_encoder: str | Path, adapter: str) -> Any:
    """The tokenizer saved in ``text_encoder`` (local files only); ``adapter`` names the adapter in errors.

    Raises:
        ConfigError: no tokenizer can be loaded from the folder (also where it needs a package that is not
            installed, e.g. ``sentencepiece``).
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(text_encoder), local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"adapter {adapter!r}: no tokenizer can be loaded from text_encoder={str(text_encoder)!r}: "
                          f"{e}") from e


def text_encoder_record(folder: str | Path, names: tuple[str, ...] = TEXT_ENCODER_FILES) -> dict[str, Any]:
    """``{"path", "sha256", "files"}`` of a text-encoder folder: one digest over the files ``names`` found there."""
    digest, files = sha256_tree(folder, names)
    return {"path": str(folder), "sha256": digest, "files": files}


def open_text_folder(folder: str | Path, adapter: str) -> tuple[Any, dict[str, Any]]:
    """``(tokenizer, text_encoder_record)`` of the text-encoder folder an adapter's text side reads."""
    return load_tokenizer(folder, adapter), text_encoder_record(folder)
