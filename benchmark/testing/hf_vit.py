"""Hugging Face folders of RAD-DINO (``Dinov2Model``) and MedSigLIP (``SiglipModel``), for tests and users' tests.

Each writer builds the transformers model from a (small) config with random weights under a seed in a forked RNG
and writes the folder as the published one is laid out: ``save_pretrained`` of the model (``config.json``,
``model.safetensors``, in the key names it saves) and of its image processor (``preprocessor_config.json``),
and for SigLIP a tokenizer. The tokenizer is a tiny word-level one built with the ``tokenizers`` package
(lower-cased, whitespace split, the end-of-sequence token ``</s>`` appended and used for padding, input ids
only: the conventions of SigLIP's tokenizer), so no SentencePiece model is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

DEFAULT_WORDS = ("no", "pneumonia", "pneumothorax", "effusion", "opacity", "lung", "normal", "finding")


def write_rad_dino_folder(folder: str | Path, *, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2,
                          patch: int = 14, image_size: int = 56, mean: Sequence[float] = (0.53,) * 3,
                          std: Sequence[float] = (0.26,) * 3, **processor: Any) -> Path:
    """A RAD-DINO-shaped folder: ``Dinov2Model`` weights and config, and a ``BitImageProcessor`` resizing the
    shortest edge to ``image_size`` and centre-cropping ``image_size`` (``processor`` overrides its settings).
    Returns the folder."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = Path(folder)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch,
                          image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config)
        # LayerScale starts at 1.0 and the mask token at 0: draw them too, so that a swap shows.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lambda1" in name or "mask_token" in name:
                    parameter.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    settings = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
                "image_mean": list(mean), "image_std": list(std), **processor}
    BitImageProcessor(**settings).save_pretrained(folder)
    return folder


def write_siglip_folder(folder: str | Path, *, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2,
                        patch: int = 14, image_size: int = 56, context: int = 8,
                        words: Sequence[str] = DEFAULT_WORDS, mean: Sequence[float] = (0.5,) * 3,
                        std: Sequence[float] = (0.5,) * 3, tokenizer: bool = True) -> Path:
    """A MedSigLIP-shaped folder: ``SiglipModel`` weights and config (both towers ``hidden`` wide, ``layers``
    deep; the text tower ``context`` positions long over the tokenizer's vocabulary), a ``SiglipImageProcessor``
    resizing to ``image_size``², and (``tokenizer``) the tokenizer of :func:`write_siglip_tokenizer`. The logit
    scale and bias are drawn too, so that both enter the scores. Returns the folder."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    folder = Path(folder)
    tower = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
             "num_attention_heads": heads}
    vocab = len(_vocabulary(words))
    config = SiglipConfig(text_config={**tower, "vocab_size": vocab, "max_position_embeddings": context,
                                       "pad_token_id": 0, "eos_token_id": 0, "bos_token_id": 0},
                          vision_config={**tower, "image_size": image_size, "patch_size": patch})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(config)
        with torch.no_grad():
            model.logit_scale.uniform_(1.0, 2.5)
            model.logit_bias.uniform_(-2.0, 2.0)
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(mean),
                         image_std=list(std)).save_pretrained(folder)
    if tokenizer:
        write_siglip_tokenizer(folder, words, context)
    return folder


def _vocabulary(words: Sequence[str]) -> list[str]:
    """``</s>`` (id 0: end of sequence and padding), ``<unk>``, then ``words``."""
    return ["</s>", "<unk>", *dict.fromkeys(w.lower() for w in words)]


def write_siglip_tokenizer(folder: str | Path, words: Sequence[str] = DEFAULT_WORDS, context: int = 8) -> Path:
    """A tiny word-level tokenizer with SigLIP's conventions (module docstring), saved into ``folder``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(_vocabulary(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="</s>", eos_token="</s>", unk_token="<unk>",
                            model_input_names=["input_ids"], model_max_length=context).save_pretrained(folder)
    return Path(folder)
