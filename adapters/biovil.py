"""BioViL (ECCV 2022) and BioViL-T (CVPR 2023): ResNet-50 image models with CXR-BERT text sides (microsoft/hi-ml).

Both image files are ``ImageModel.state_dict()`` saved with ``torch.save`` and loaded strictly by hi-ml
(hi-ml-multimodal/src/health_multimodal/image/model/model.py:63-67). Which one a file is, is read from its keys:

- BioViL, ``biovil_image_resnet50_proj_size_128.pt`` (328 keys): ``encoder.encoder.*``, a torchvision ResNet-50
  including its ImageNet ``fc`` (320 keys; ``ImageEncoder`` builds ``resnet50(pretrained=False)``,
  image/model/encoder.py:36-47, resnet.py:83-91, and never calls ``fc``, resnet.py:37-50), and
  ``projector.model.{0,1,3}.*`` (8 keys): ``MLP(2048, 128, hidden_dim=128, use_1x1_convs=True)``
  (model.py:50-55, modules.py:27-46): Conv1x1 2048→128 without bias, BatchNorm2d, ReLU, Conv1x1 128→128.
- BioViL-T, ``biovil_t_image_model_proj_size_128.pt`` (372 keys): ``MultiImageEncoder`` (encoder.py:84-112) adds
  ``encoder.backbone_to_vit.weight`` (Conv1x1 2048→256, no bias), ``encoder.missing_previous_emb`` (1, 256, 1, 1)
  and ``encoder.vit_pooler.*`` (42 keys: ``VisionTransformerPooler(256, (14, 14))`` with its fixed 3 blocks of
  8 heads, MLP ratio 1, no q/k/v bias, transformer.py:34-69, 145-161, 204-224; its ``pos_embed`` is a
  non-persistent buffer). The projector takes the 512 channels ``[patch, previous]`` (encoder.py:135).

For one image (every vlpbench task) ``MultiImageEncoder.forward`` takes the ``previous_image is None`` branch
(encoder.py:129-133): the previous-image half of each location is ``missing_previous_emb`` repeated, and the
transformer pooler is not run. This adapter does the same, so the pooler's 42 keys are checked by name and
shape against hi-ml's definition and then ignored with that reason.

Embeddings (``ImageModel.forward``, model.py:77-94): ``projector`` over the layer4 patches (BioViL-T: over
``[backbone_to_vit(layer4), missing_previous_emb]``) gives the projected patch embeddings (``dense_embed``,
L2-normalised per location, model.py:101-115); their spatial mean, L2-normalised, is the global embedding
(``embed_image``, model.py:85, image/inference_engine.py:72-87) — the mean of the projections, not the
projection of the mean.

Text side, with ``--model-option text_encoder=DIR``: a local CXR-BERT folder (BioViL:
microsoft/BiomedVLP-CXR-BERT-specialized; BioViL-T: microsoft/BiomedVLP-BioViL-T), read without its remote code.
``CXRBertModel`` is a ``BertForMaskedLM`` plus ``cls_projection_head`` (text/model/modelling_cxrbert.py:30-70), so
its weights file holds ``bert.*`` (a ``BertModel`` without pooler), ``cls.predictions.*`` (the masked-LM head,
ignored) and ``cls_projection_head.*``; all are accounted strictly in the same report, under ``text_encoder/``.
The text embedding is the projected [CLS] output (modelling_cxrbert.py:100-103, 122-146).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import (
    DENSE_EMBED,
    EMBED_IMAGE,
    EMBED_TEXT,
    ZERO_SHOT,
    Adapter,
    LoadReport,
    ModelCard,
    Weights,
    check_zero_shot_arguments,
    load_state_dict_file,
    loaded_eval,
    match_keys,
    match_resnet50_encoder,
    split_prefix,
    tensor_spec,
    unwrap_state_dict,
)
from vlpbench.adapters.parts import strip
from vlpbench.adapters.text import TEXT_ENCODER_FILES, bert_config, build_bert, match_bert, text_encoder_record
from vlpbench.errors import CheckpointError, ConfigError

BIOVIL, BIOVIL_T = "biovil", "biovil_t"
# hi-ml image/utils.py:13,31-36: Resize(512) then CenterCrop 448 (BioViL-T) or 480 (BioViL).
CROP = {BIOVIL: 480, BIOVIL_T: 448}
# image/model/pretrained.py:20: both published files have a 128-d joint space.
JOINT = 128
RESNET_WIDTH = 2048
# encoder.py:95-96: BioViL-T's patch width (each of the current / previous halves) and the pooler's grid.
TEMPORAL_WIDTH = 256
# transformer.py:38-39,47,146: the pooler's fixed shape: 3 blocks, MLP ratio 1, no q/k/v bias; 2 series (:61).
POOLER_BLOCKS, POOLER_SERIES = 3, 2
# vlp/inference_engine.py:92,106-108: the patch similarity grid is smoothed by scipy's gaussian_filter
# (sigma 1.5 on both axes, its defaults mode="reflect", truncate=4.0).
SMOOTHING_SIGMA, SMOOTHING_TRUNCATE = 1.5, 4.0

ENCODER_PREFIX = "encoder.encoder."
PROJECTOR_PREFIX = "projector.model."
TEMPORAL_KEYS = ("encoder.missing_previous_emb", "encoder.backbone_to_vit.weight")
POOLER_PREFIX = "encoder.vit_pooler."
TEXT_FILE_PREFIX = "text_encoder/"  # names the text folder's weights in the load report
FC_REASON = ("torchvision ResNet-50 ImageNet classifier (fc): ResNetHIML.forward stops at layer4 "
             "(hi-ml image/model/resnet.py:37-50), so BioViL never uses it")
POOLER_REASON = ("BioViL-T's transformer pooler (VisionTransformerPooler, 3 blocks): runs only with a previous "
                 "image (hi-ml image/model/encoder.py:122-128); for one image the previous half is "
                 "missing_previous_emb (:129-133). Checked by name and shape, not run")
MLM_REASON = ("CXR-BERT's masked-language-model head (BertForMaskedLM cls.predictions): predicts masked tokens; "
              "the embeddings use cls_projection_head over [CLS] (hi-ml text/model/modelling_cxrbert.py:100-103)")
TEXT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TEXT_HINT = ("pass --model-option text_encoder=DIR: a local CXR-BERT folder with config.json, vocab.txt and its "
             "weights (BioViL: microsoft/BiomedVLP-CXR-BERT-specialized; BioViL-T: microsoft/BiomedVLP-BioViL-T)")

# hi-ml-multimodal/test_multimodal/vlp/test_zero_shot_classification.py:39-56: the positive and negative
# prompt sets of hi-ml's own pneumonia zero-shot check (each set's embeddings averaged, :147-157 compares them).
HIML_PROMPTS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pneumonia": (
        ("Findings consistent with pneumonia", "Findings suggesting pneumonia",
         "This opacity can represent pneumonia", "Findings are most compatible with pneumonia"),
        ("There is no pneumonia", "No evidence of pneumonia", "No evidence of acute pneumonia",
         "No signs of pneumonia"),
    ),
}
PROMPT_CHOICES = ("task", "himl")


def projector(in_dim: int) -> nn.Sequential:
    """hi-ml's image projector ``MLP(in_dim, 128, hidden_dim=128, use_1x1_convs=True).model`` (modules.py:27-46)."""
    return nn.Sequential(
        nn.Conv2d(in_dim, JOINT, kernel_size=1, bias=False), nn.BatchNorm2d(JOINT), nn.ReLU(inplace=True),
        nn.Conv2d(JOINT, JOINT, kernel_size=1, bias=True),
    )


def pooler_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``VisionTransformerPooler(256, (14, 14))``'s state dict (42 keys).

    Per block (transformer.py:217-224): ``norm1``/``norm2`` LayerNorms, ``attn.proj_q/k/v`` without bias and
    ``attn.proj`` with bias (:155-160), timm's ``Mlp`` ``fc1``/``fc2`` of hidden width 256 × 1.0; then
    ``norm_post`` (:55) and ``type_embed`` (2, 1, 256) (:62). ``pos_embed`` is not persistent (:69).
    """
    d = TEMPORAL_WIDTH
    shapes: dict[str, tuple[int, ...]] = {}
    for b in range(POOLER_BLOCKS):
        block = f"blocks.{b}."
        for norm in ("norm1", "norm2"):
            shapes |= {f"{block}{norm}.weight": (d,), f"{block}{norm}.bias": (d,)}
        shapes |= {f"{block}attn.proj_{p}.weight": (d, d) for p in "qkv"}
        shapes |= {f"{block}attn.proj.weight": (d, d), f"{block}attn.proj.bias": (d,)}
        for fc in ("fc1", "fc2"):
            shapes |= {f"{block}mlp.{fc}.weight": (d, d), f"{block}mlp.{fc}.bias": (d,)}
    return shapes | {"norm_post.weight": (d,), "norm_post.bias": (d,), "type_embed": (POOLER_SERIES, 1, d)}


class ProjectedPatches(nn.Module):
    """Layer4 patches → 128-d projected patch embeddings, as ``ImageModel.forward`` computes them for one image.

    BioViL: ``projector(layer4)``. BioViL-T (``temporal``): ``projector([backbone_to_vit(layer4),
    missing_previous_emb repeated])`` (encoder.py:129-135). Parameter names follow the checkpoint's.
    """

    def __init__(self, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        if temporal:
            self.backbone_to_vit = nn.Conv2d(RESNET_WIDTH, TEMPORAL_WIDTH, kernel_size=1, bias=False)
            self.missing_previous_emb = nn.Parameter(torch.zeros(1, TEMPORAL_WIDTH, 1, 1))
        self.projector = projector(2 * TEMPORAL_WIDTH if temporal else RESNET_WIDTH)

    def forward(self, layer4: torch.Tensor) -> torch.Tensor:
        """``(B, 2048, h, w)`` → ``(B, 128, h, w)``, not normalised."""
        x = layer4
        if self.temporal:
            patches = self.backbone_to_vit(x)
            previous = self.missing_previous_emb.expand(x.shape[0], -1, *x.shape[-2:])
            x = torch.cat([patches, previous], dim=1)
        return self.projector(x)


class CxrBertProjection(nn.Module):
    """CXR-BERT's ``cls_projection_head``: Linear, GELU, LayerNorm(eps 1e-12), Linear (modelling_cxrbert.py:30-51)."""

    def __init__(self, hidden: int, projection: int) -> None:
        super().__init__()
        self.dense_to_hidden = nn.Linear(hidden, projection)
        self.LayerNorm = nn.LayerNorm(projection, eps=1e-12)
        self.dense_to_output = nn.Linear(projection, projection)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        """``(B, hidden)`` [CLS] outputs → ``(B, projection)``, not normalised."""
        return self.dense_to_output(self.LayerNorm(nn.functional.gelu(self.dense_to_hidden(cls))))


def gaussian_smooth(maps: torch.Tensor, sigma: float = SMOOTHING_SIGMA,
                    truncate: float = SMOOTHING_TRUNCATE) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(m, sigma=(sigma, sigma))`` over the last two axes of ``maps``.

    As scipy: kernel radius ``int(truncate * sigma + 0.5)``, weights ``exp(-x² / 2σ²)`` summing to 1, and
    mode ``reflect`` (the edge sample repeated: ``d c b a | a b c d | d c b a``), for grids of any size.
    """
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=maps.device)
    kernel = torch.exp(-0.5 * offsets.double() ** 2 / sigma ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    out = maps
    for dim in (-2, -1):
        n = out.shape[dim]
        index = torch.arange(-radius, n + radius, device=maps.device) % (2 * n)
        index = torch.where(index >= n, 2 * n - 1 - index, index)
        padded = out.index_select(dim, index)
        out = sum(weight * padded.narrow(dim, k, n) for k, weight in enumerate(kernel))
    return out


class BioVilAdapter(Adapter):
    """BioViL / BioViL-T image model from hi-ml's published state dict; CXR-BERT text side with ``text_encoder``.

    Input contract (hi-ml ``create_chest_xray_transform_for_inference``, image/data/transforms.py:28-38, and
    image/utils.py:13-41): ``Resize(512)``, ``CenterCrop`` 480 (BioViL) or 448 (BioViL-T), ``ToTensor`` (pixels
    in [0, 1]), grey repeated to 3 channels, no intensity normalisation (mean 0, std 1). ``image_size`` is set
    per instance from the detected variant (the class value, 480, is BioViL's). vlpbench resizes the whole image
    to ``image_size``² rather than cropping the central 480/512, so that grounding maps cover the whole image;
    the network is fully convolutional, so nothing else changes. Option ``image_size`` (0 = the variant's)
    runs the same network at another size, off the published contract.

    Option ``prompts``: ``task`` (default) scores each class from the task's positive / negative template pair;
    ``himl`` uses hi-ml's own pneumonia prompt sets (HIML_PROMPTS), each set's embeddings averaged, and refuses
    classes it has no set for.
    """

    name = "biovil"
    card = ModelCard(
        paper="Boecking et al., Making the Most of Text Semantics to Improve Biomedical Vision-Language "
              "Processing (BioViL), ECCV 2022; Bannur et al., Learning to Exploit Temporal Structure for "
              "Biomedical Vision-Language Processing (BioViL-T), CVPR 2023",
        repository="github.com/microsoft/hi-ml (hi-ml-multimodal/src/health_multimodal: image/model/model.py, "
                   "image/model/encoder.py, text/model/modelling_cxrbert.py, vlp/inference_engine.py)",
        checkpoints=(
            "biovil_image_resnet50_proj_size_128.pt — Hugging Face microsoft/BiomedVLP-CXR-BERT-specialized "
            "(tag v1.1), with the CXR-BERT text folder (config.json, vocab.txt, pytorch_model.bin)",
            "biovil_t_image_model_proj_size_128.pt — Hugging Face microsoft/BiomedVLP-BioViL-T (tag v1.0), "
            "with its own CXR-BERT text folder",
        ),
        pretraining_data=("mimic_cxr",),
        notes=(
            "both were pre-trained on MIMIC-CXR image-report pairs; MS-CXR (BioViL's own grounding set) "
            "annotates MIMIC-CXR images, so ms_cxr_ground tests on the pre-training images",
            "no intensity normalisation: linear, fine-tune and segmentation tasks need --set mean=0 --set std=1 "
            "to feed the published input contract",
            "BioViL-T runs on one image as hi-ml does without a prior: missing_previous_emb in place of the "
            "previous image; its transformer pooler is not run",
        ),
    )
    description = ("BioViL (ECCV 2022) / BioViL-T (CVPR 2023) ResNet-50 from hi-ml's *_proj_size_128.pt; 128-d "
                   "global and patch embeddings; CXR-BERT text side with text_encoder=DIR")
    capabilities = frozenset({"features", EMBED_IMAGE, DENSE_EMBED, EMBED_TEXT})
    image_size = CROP[BIOVIL]
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)
    default_options = {"text_encoder": "", "prompts": "task", "image_size": 0}
    checkpoint_forms = (
        "BioViL biovil_image_resnet50_proj_size_128.pt (ImageModel.state_dict(), 328 keys: encoder.encoder.* "
        "torchvision ResNet-50 with fc (ignored), projector.model.{0,1,3}.*); input 480²",
        "BioViL-T biovil_t_image_model_proj_size_128.pt (372 keys: also encoder.backbone_to_vit, "
        "encoder.missing_previous_emb, encoder.vit_pooler.* (checked, not run)); input 448²",
        "text side: --model-option text_encoder=DIR, a CXR-BERT folder with its weights (bert.*, "
        "cls_projection_head.*; cls.predictions.* ignored)",
    )
    capability_hints = {EMBED_TEXT: TEXT_HINT}
    procedures = {
        "zero_shot": "per class, cosine of the L2-normalised global image embedding (mean of the projected "
                     "patches, hi-ml image/model/model.py:85) with the positive and the negative text embedding "
                     "(a prompt set's projected [CLS] embeddings averaged then normalised, "
                     "vlp/inference_engine.py:43-55); probability = softmax over the pair, > 0.5 exactly when "
                     "positive > negative as hi-ml decides (test_multimodal/vlp/test_zero_shot_classification.py"
                     ":147-157); prompts: the task's pair, or with prompts=himl hi-ml's pneumonia sets (:39-56)",
        "grounding": "cosine of each L2-normalised projected patch embedding with the L2-normalised text "
                     "embedding, smoothed by a Gaussian of sigma 1.5 patches (scipy gaussian_filter, reflect), "
                     "hi-ml vlp/inference_engine.py:91-109; the protocol resizes the patch grid to the image",
        "linear": "features: the ResNet-50 (encoder.encoder.*) layer4, average-pooled by the protocol (BioViL's "
                  "ImageEncoder pooled embedding, hi-ml image/model/encoder.py:52-53)",
    }

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly (see ``Adapter``), set the variant's input size and build the heads.

        Raises:
            ConfigError: an unknown ``prompts`` value, a negative ``image_size``, or a ``text_encoder`` folder
                that lacks a config, tokenizer or weights.
            CheckpointError: as ``Adapter.__init__`` (keys of the image file or of the text folder's weights).
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        self.variant = extra["variant"]
        self.image_size = self.options["image_size"] or CROP[self.variant]
        # The random init of the modules below is overwritten at once; keep it off the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            self._patches = loaded_eval(ProjectedPatches(self.variant == BIOVIL_T), extra["patches"])
            self._bert = self._text_head = self._tokenizer = self._text_encoder_record = None
            if "text_model" in extra:
                config = extra["text_config"]
                self._bert = build_bert(config, extra["text_model"], pooler=False)
                self._text_head = loaded_eval(CxrBertProjection(config.hidden_size, JOINT), extra["text_head"])
                self._tokenizer = _cxr_bert_tokenizer(self.options["text_encoder"])
                self._text_encoder_record = text_encoder_record(
                    self.options["text_encoder"], TEXT_ENCODER_FILES + (extra["text_weights"],))
        if self._bert is None:
            self.capabilities = self.capabilities - {EMBED_TEXT}
        self._resnet: nn.Module | None = None

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Detect the variant from the keys and account every key (module docstring); with ``text_encoder``
        also every key of the text folder's weights file.

        Raises:
            CheckpointError: the file is not a dict of tensors; the text weights file is unreadable.
            ConfigError: bad ``prompts`` / ``image_size``; ``text_encoder`` lacks a config or weights file.
        """
        if options["prompts"] not in PROMPT_CHOICES:
            raise ConfigError(f"adapter 'biovil': option prompts={options['prompts']!r}; expected one of "
                              f"{', '.join(PROMPT_CHOICES)}")
        if options["image_size"] < 0:
            raise ConfigError(f"adapter 'biovil': option image_size={options['image_size']} must be 0 (the "
                              "variant's published crop) or a positive side in pixels")
        report = LoadReport(BIOVIL)
        state, prefix = unwrap_state_dict(checkpoint, report, what="a BioViL ImageModel state dict")
        variant = BIOVIL_T if any(isinstance(k, str) and k.startswith((*TEMPORAL_KEYS, POOLER_PREFIX))
                                  for k in state) else BIOVIL
        report.layout = variant + report.layout[len(BIOVIL):]

        resnet, rest = split_prefix(state, ENCODER_PREFIX)
        fc, resnet = split_prefix(resnet, ENCODER_PREFIX + "fc.")
        _account_unused(strip(fc, ENCODER_PREFIX), {"fc.weight": (1000, RESNET_WIDTH), "fc.bias": (1000,)},
                        report, FC_REASON, prefix + ENCODER_PREFIX)
        encoder = match_resnet50_encoder(strip(resnet, ENCODER_PREFIX), report, source_prefix=prefix + ENCODER_PREFIX)

        temporal = variant == BIOVIL_T
        with torch.device("meta"):  # shapes only: no init, no draw from the global RNG
            expected = {k: tensor_spec(v) for k, v in ProjectedPatches(temporal).state_dict().items()}
        projector_shapes, temporal_shapes = split_prefix(expected, "projector.")
        head, rest = split_prefix(rest, PROJECTOR_PREFIX)
        # ProjectedPatches names the checkpoint's projector.model.<i> projector.<i> and encoder.<part> <part>.
        patches = {f"projector.{k}": v for k, v in match_keys(
            strip(head, PROJECTOR_PREFIX), strip(projector_shapes, "projector."), report,
            source_prefix=prefix + PROJECTOR_PREFIX, target_prefix="projector.").items()}
        if temporal:
            parts, rest = split_prefix(rest, *TEMPORAL_KEYS)
            patches |= match_keys(strip(parts, "encoder."), temporal_shapes, report,
                                  source_prefix=prefix + "encoder.")
            pooler, rest = split_prefix(rest, POOLER_PREFIX)
            _account_unused(strip(pooler, POOLER_PREFIX), pooler_shapes(), report, POOLER_REASON,
                            prefix + POOLER_PREFIX)
        report.unexpected += [f"{prefix}{k}" for k in rest]

        extra: dict[str, Any] = {"variant": variant, "patches": patches}
        if options["text_encoder"]:
            extra |= _map_text_side(Path(options["text_encoder"]), report)
        return Weights(report, encoder, extra=extra)

    def describe(self) -> dict[str, Any]:
        """``Adapter.describe`` plus the variant and input size."""
        record = super().describe()
        record["variant"] = self.variant
        record["image_size"] = self.image_size
        return record

    # --- embeddings (hi-ml image/model/model.py:77-115, text/model/modelling_cxrbert.py:122-146) -----------

    @torch.no_grad()
    def projected_patches(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 128, h, w)`` projected patch embeddings, not normalised (``projected_patch_embeddings``)."""
        if self._resnet is None:
            self._resnet = self.encoder().eval()
        layer4 = self._resnet.to(images.device)(images)[-1]
        return self._patches.to(images.device)(layer4)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """128-d global embeddings: the mean of the projected patches, L2-normalised (model.py:85)."""
        return nn.functional.normalize(self.projected_patches(images).mean(dim=(2, 3)), dim=-1)

    def dense_embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 128, h, w)`` projected patch embeddings, L2-normalised per location (model.py:111-113)."""
        return nn.functional.normalize(self.projected_patches(images), dim=1)

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """128-d projected [CLS] embeddings, L2-normalised (``get_projected_text_embeddings``).

        Raises:
            CapabilityError: no ``text_encoder`` was given.
            ConfigError: ``texts`` is not a non-empty list, or a text is longer than the BERT's positions.
        """
        return nn.functional.normalize(self._projected_text(texts), dim=-1)

    @torch.no_grad()
    def _projected_text(self, texts: list[str]) -> torch.Tensor:
        """Projected [CLS] embeddings, not normalised, tokenised as hi-ml's ``TextInput`` does
        (text/data/io.py:38-44: trailing ``!?.`` stripped, special tokens added, padded to the longest)."""
        self.require(EMBED_TEXT)
        if isinstance(texts, str) or not texts:
            raise ConfigError(f"embed_text takes a non-empty list of strings, got {texts!r}")
        batch = self._tokenizer([t.rstrip("!?.") for t in texts], add_special_tokens=True, padding="longest",
                                return_tensors="pt")
        limit = self._bert.config.max_position_embeddings
        if batch["input_ids"].shape[1] > limit:  # text/inference_engine.py:43-48 refuses these too
            raise ConfigError(f"adapter 'biovil': a text is {batch['input_ids'].shape[1]} tokens long, more than "
                              f"CXR-BERT's {limit} positions")
        device = next(self._bert.parameters()).device
        hidden = self._bert(input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device)).last_hidden_state
        return self._text_head(hidden[:, 0])

    def zero_shot_scores(self, images: torch.Tensor, classes: list[str],
                         templates: tuple[str, str] = ("{}", "no {}")) -> torch.Tensor:
        """Probability that each class is present: softmax over the cosines with the positive and the negative
        text embedding (``procedures["zero_shot"]``); a prompt set's embeddings are averaged before the
        normalisation, as ``get_similarity_score_from_raw_data`` does.

        Raises:
            CapabilityError: no ``text_encoder``.
            ConfigError: bad ``templates`` or ``classes``; with ``prompts=himl`` a class hi-ml has no prompts for.
        """
        self.require(ZERO_SHOT)
        check_zero_shot_arguments(classes, templates)
        prompt_sets = [prompts for name in classes for prompts in self._prompt_sets(name, templates)]
        text = torch.stack([nn.functional.normalize(self._projected_text(list(prompts)).mean(dim=0), dim=-1)
                            for prompts in prompt_sets]).view(len(classes), 2, -1)
        image = self.embed_image(images)
        text = text.to(image.device)
        return torch.einsum("bd,cpd->bcp", image, text).softmax(dim=-1)[..., 0]

    def _prompt_sets(self, name: str, templates: tuple[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(positive prompts, negative prompts) of class text ``name`` under option ``prompts``."""
        if self.options["prompts"] == "task":
            return (templates[0].format(name),), (templates[1].format(name),)
        sets = HIML_PROMPTS.get(name.strip().lower())
        if sets is None:
            raise ConfigError(f"adapter 'biovil': prompts=himl has hi-ml's prompt sets for "
                              f"{', '.join(HIML_PROMPTS)} only, not {name!r}; use prompts=task (the task's pair)")
        return sets

    def grounding_maps(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """``(B, T, h, w)`` similarity maps on the patch grid, each smoothed as hi-ml's
        ``_get_similarity_map_from_embeddings`` does (``procedures["grounding"]``)."""
        return gaussian_smooth(super().grounding_maps(images, texts).float())


def _account_unused(part: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], report: LoadReport,
                    reason: str, source_prefix: str) -> None:
    """Check ``part`` against ``expected`` names and shapes like ``match_keys``, but list the keys that match
    as ignored for ``reason`` (they are part of the published model, not run here)."""
    scratch = LoadReport(report.layout)
    match_keys(part, expected, scratch, source_prefix=source_prefix)
    report.missing += scratch.missing
    report.unexpected += scratch.unexpected
    report.mismatched += scratch.mismatched
    report.ignore(reason, [key for key, _ in scratch.mapped])


def _text_weights_file(folder: Path) -> Path:
    """The CXR-BERT weights file in ``folder``: ``model.safetensors`` or ``pytorch_model.bin``.

    Raises:
        ConfigError: neither is there (a sharded checkpoint's index is named as such).
    """
    for name in TEXT_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    sharded = [p.name for p in folder.glob("*.index.json")]
    detail = f"; sharded weights ({', '.join(sharded)}) are not supported" if sharded else ""
    raise ConfigError(f"adapter 'biovil': text_encoder={str(folder)!r} has no {' or '.join(TEXT_WEIGHT_FILES)}: "
                      f"BioViL's text side is CXR-BERT's own weights, which the image file does not carry{detail}")


def _map_text_side(folder: Path, report: LoadReport) -> dict[str, Any]:
    """Account the CXR-BERT weights of ``folder`` against ``BertModel`` (no pooler) and the projection head.

    Returns the BERT and head tensors, the config and the weights file's name.

    Raises:
        ConfigError: no config or weights file; a ``projection_size`` other than the image side's 128.
    """
    config = bert_config(folder, "biovil")
    # CXRBertConfig's default (text/model/configuration_cxrbert.py:20) when config.json does not say.
    projection = getattr(config, "projection_size", JOINT)
    if projection != JOINT:
        raise ConfigError(f"adapter 'biovil': {folder / 'config.json'} has projection_size {projection}, but the "
                          f"image model projects to {JOINT}")
    weights = _text_weights_file(folder)
    state, _ = load_state_dict_file(weights)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{weights} is not a state dict (it holds a {type(state).__name__})")
    source = f"{TEXT_FILE_PREFIX}{weights.name}:"
    bert, rest = split_prefix(state, "bert.")
    mlm, rest = split_prefix(rest, "cls.predictions.")
    report.ignore(MLM_REASON, [source + k for k in mlm])
    head, rest = split_prefix(rest, "cls_projection_head.")
    report.unexpected += [f"{source}{k}" for k in rest]
    with torch.device("meta"):
        head_shapes = {k: tensor_spec(v) for k, v in CxrBertProjection(config.hidden_size, JOINT).state_dict().items()}
    return {
        "text_model": match_bert(strip(bert, "bert."), report, config, source_prefix=source + "bert.",
                                 target_prefix="text.bert.", pooler=False),
        "text_head": match_keys(strip(head, "cls_projection_head."), head_shapes, report,
                                source_prefix=source + "cls_projection_head.",
                                target_prefix="text.cls_projection_head."),
        "text_config": config,
        "text_weights": weights.name,
    }


def _cxr_bert_tokenizer(folder: str) -> Any:
    """CXR-BERT's tokenizer from ``folder``: ``CXRBertTokenizer`` is ``BertTokenizer`` unchanged
    (text/model/configuration_cxrbert.py:25-27), so BertTokenizer reads the folder without its remote code.

    Raises:
        ConfigError: the folder has no readable vocab.txt.
    """
    from transformers import BertTokenizer

    try:
        return BertTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"adapter 'biovil': no BERT tokenizer can be loaded from text_encoder={folder!r}: {e}") from e
