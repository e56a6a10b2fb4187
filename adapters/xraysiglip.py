"""CheXagent's XraySigLIP encoders stored as Hugging Face ``CLIPModel`` folders: SigLIP's sigmoid zero-shot rule.

CheXagent (Chen et al., arXiv 2401.12208) publishes eight CXR-adapted encoders
(github.com/Stanford-AIMI/CheXagent README.md, "Vision Encoder": "Eight SigLIP/CLIP models"). Their names say
the objective, then the initialisation: ``XraySigLIP__*`` were trained with SigLIP's sigmoid loss, ``XrayCLIP__*``
with CLIP's softmax loss; ``*__laion2b-*`` start from open_clip's LAION CLIPs and are stored in transformers' CLIP
classes (Hub library tag ``clip``; tokenizer ``vocab.json``/``merges.txt``), ``*__webli`` start from Google's
SigLIPs and are ``SiglipModel`` folders (tag ``siglip``; ``spiece.model``), which the ``medsiglip`` adapter reads.

This adapter takes the two SigLIP-trained towers in CLIP classes, ``StanfordAIMI/XraySigLIP__vit-b-16__laion2b-
s34b-b88k`` and ``XraySigLIP__vit-l-14__laion2b-s32b-b82k``: the folder loads exactly as the ``clip`` adapter
loads a ``CLIPModel`` folder (GELU towers, the config's image size and context length), and the only difference
is the zero-shot rule, the one the towers were trained with: SigLIP's per-pair probability
``sigmoid(logit_scale.exp() * cosine(image, positive prompt) + logit_bias)`` (Zhai et al., ICCV 2023;
transformers ``SiglipModel.forward``), not CheXzero's softmax over a positive/negative prompt pair, which ranks
images by a different quantity (the difference of two cosines).

``CLIPModel`` has no ``logit_bias`` parameter. A weights file that holds one (a 0-d or one-element ``logit_bias``
saved beside the CLIP keys) has it read and used; without it the bias is taken as 0 and ``describe()`` says so
(``logit_bias: null``). The bias shifts every logit equally, so it changes the probabilities but no zero-shot
metric: per-class AUC, the F1/accuracy/MCC thresholds chosen on validation images and the arg-max over classes
all depend only on the order of the cosines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from vlpbench.adapters.base import ModelCard, Weights, check_zero_shot_arguments
from vlpbench.adapters.clip import ClipAdapter, HfClipDirectory, _map_hf_weights, _read_hf_directory
from vlpbench.errors import CheckpointError, ConfigError

LOGIT_BIAS = "logit_bias"


class XraySiglipAdapter(ClipAdapter):
    """A SigLIP-trained ``CLIPModel`` folder (CheXagent's XraySigLIP laion2b towers): SigLIP's sigmoid zero-shot."""

    name = "xraysiglip"
    description = ("CheXagent's XraySigLIP ViT-B/16 and ViT-L/14 (SigLIP loss, Hugging Face CLIPModel folders): "
                   "embeddings, SigLIP's sigmoid zero-shot; frozen ViT + Feature2Pyramid for dense tasks")
    card = ModelCard(
        paper="Chen et al., CheXagent: Towards a Foundation Model for Chest X-Ray Interpretation, arXiv 2401.12208 "
              "(2024); SigLIP: Zhai et al., Sigmoid Loss for Language Image Pre-Training, ICCV 2023",
        repository="github.com/Stanford-AIMI/CheXagent (README.md, Vision Encoder: the Hugging Face collection "
                   "'CheXagent and its byproducts'); no training or loading code for the encoders is published",
        checkpoints=("the Hugging Face folders StanfordAIMI/XraySigLIP__vit-b-16__laion2b-s34b-b88k and "
                     "StanfordAIMI/XraySigLIP__vit-l-14__laion2b-s32b-b82k (CC-BY-NC-4.0; config.json, "
                     "model.safetensors, preprocessor_config.json, CLIP tokenizer files)",),
        pretraining_data=("mimic_cxr", "chexpert", "padchest"),
        notes=("pre-training data as Stanford-AIMI/chexpert-plus README.md (Model Zoo) lists it for the XrayCLIP "
               "encoder of the same collection: MIMIC-CXR, CheXpert Plus, PadChest, BIMCV and Candid-PTX; the "
               "XraySigLIP folders state none of their own",
               "the SigLIP-trained loss is read from the folder names (XraySigLIP vs XrayCLIP) and the CheXagent "
               "paper's vision-encoder stage; the XraySigLIP__*__webli folders are SiglipModel folders: load them "
               "with the medsiglip adapter",
               "a weights file without logit_bias scores sigmoid(logit_scale.exp() * cosine): the probabilities "
               "differ from the trained ones by the missing bias, the zero-shot metrics do not",
               "the input side is config.json's image_size; the mean and std are the folder's "
               "preprocessor_config.json's (normalization=folder, the default; openai or chexzero override it)"),
    )
    # Normalisation comes from the checkpoint folder's preprocessor_config.json (normalization=folder).
    mean = None
    std = None
    default_options = {"normalization": "folder"}
    checkpoint_forms = (
        "Hugging Face CLIPModel directory (config.json + model.safetensors or pytorch_model.bin; ViT, hidden_act "
        "quick_gelu or gelu), optionally with a scalar logit_bias beside the CLIP keys",
    )
    procedures = {
        "zero_shot": "per class, sigmoid(logit_scale.exp() * cosine(image embedding, positive prompt embedding) + "
                     "logit_bias): SigLIP's pairwise probability (transformers SiglipModel.forward logits_per_image, "
                     "then torch.sigmoid), the rule the XraySigLIP towers were trained with; logit_bias from the "
                     "weights file, 0 where it has none (describe() logit_bias null); the negative template is not "
                     "used. Image: projected class token; text: projected end-of-text token (OpenAI's BPE, the "
                     "config's context length)",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load the folder as the ``clip`` adapter does (see ``ClipAdapter``) and keep its ``logit_bias``, if any.

        Raises:
            ConfigError: no checkpoint, a checkpoint that is not a directory, or a bad option.
            CheckpointError: as ``ClipAdapter``.
        """
        super().__init__(checkpoint, **options)
        self.logit_bias: torch.Tensor | None = self._extra_state.get(LOGIT_BIAS)

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """``ClipAdapter``'s accounting of a ``CLIPModel`` folder, with a ``logit_bias`` key taken out and mapped.

        Raises:
            CheckpointError: ``checkpoint`` is not a folder read by ``_read``, or its ``logit_bias`` is not a
                one-element tensor.
        """
        if not isinstance(checkpoint, HfClipDirectory):
            raise CheckpointError("adapter 'xraysiglip' reads a Hugging Face CLIPModel folder; pass its path")
        state = dict(checkpoint.state)
        bias = state.pop(LOGIT_BIAS, None)
        if bias is not None and not (isinstance(bias, torch.Tensor) and bias.numel() == 1):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise CheckpointError(f"{checkpoint.weights_file}: {LOGIT_BIAS} is {shape}; expected one number")
        weights = _map_hf_weights(HfClipDirectory(checkpoint.config, state, checkpoint.weights_file))
        if bias is not None:
            weights.report.mapped.append((LOGIT_BIAS, LOGIT_BIAS))
            weights.extra[LOGIT_BIAS] = bias.detach().float().reshape(())
        return weights

    def describe(self) -> dict[str, Any]:
        """``ClipAdapter.describe`` plus the ``logit_bias`` the zero-shot scores add (None: none in the file)."""
        bias = None if self.logit_bias is None else float(self.logit_bias)
        return {**super().describe(), LOGIT_BIAS: bias}

    @torch.no_grad()
    def zero_shot_scores(self, images: torch.Tensor, classes: Sequence[str],
                         templates: tuple[str, str] = ("{}", "no {}")) -> torch.Tensor:
        """``sigmoid(logit_scale.exp() * cos + logit_bias)`` of each image with each class's positive prompt,
        ``(B, len(classes))`` (``procedures["zero_shot"]``); the negative template is checked, not used.

        Raises:
            ConfigError: ``templates`` is not a pair of strings with one ``{}`` each, or no classes.
        """
        check_zero_shot_arguments(list(classes), templates)
        image = self.embed_image(images)
        text = self.embed_text([templates[0].format(c) for c in classes]).to(image.device)
        logits = image @ text.T * self.model.logit_scale.exp()
        if self.logit_bias is not None:
            logits = logits + self.logit_bias.to(logits.device)
        return torch.sigmoid(logits)

    @classmethod
    def _read(cls, checkpoint: str | Path | None) -> tuple[Any, str | None, str | None]:
        """The folder, read as ``ClipAdapter`` reads a ``CLIPModel`` directory; anything else is refused."""
        if checkpoint is None or not Path(checkpoint).is_dir():
            raise ConfigError(f"adapter 'xraysiglip' needs a Hugging Face CLIPModel folder (e.g. StanfordAIMI/"
                              f"XraySigLIP__vit-b-16__laion2b-s34b-b88k), got {checkpoint}")
        return _read_hf_directory(Path(checkpoint))
