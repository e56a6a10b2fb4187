"""RAD-DINO (Pérez-García et al.): a DINOv2 ViT-B/14 trained on chest X-rays, image only, on every image protocol.

Microsoft publishes it as the Hugging Face folder ``microsoft/rad-dino``: ``config.json`` (a transformers
``Dinov2Config``: 768 wide, 12 blocks, 14-pixel patches, 518² position grid, LayerScale, no registers),
``preprocessor_config.json`` (a ``BitImageProcessor``: resize to 518, centre crop 518, its own mean and std)
and ``model.safetensors`` (the ``Dinov2Model`` state dict), beside ``backbone_compatible.safetensors`` (the
same backbone in the layout of the DINOv2 repository's ``DinoVisionTransformer``) and ``dino_head.safetensors``
(the pre-training projection head, not an encoder). The folder (or one of the two backbone files inside it)
is the checkpoint; the folder's config and image processor are read either way.

Key layouts, told apart by the keys and accounted strictly under the file's own names:

- ``dinov2-hf`` (``model.safetensors``): ``embeddings.{cls_token, mask_token, position_embeddings,
  patch_embeddings.projection.*}``, ``encoder.layer.N.{norm1, attention.attention.{query,key,value},
  attention.output.dense, layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2, layer_scale2.lambda1}``,
  ``layernorm.*``: the names ``save_pretrained`` writes (transformers ≥ 5 renames the attention projections
  to ``q_proj`` … ``o_proj`` in the module and back on saving).
- ``dinov2-repo`` (``backbone_compatible.safetensors``): facebookresearch/dinov2
  dinov2/models/vision_transformer.py:107-169 — ``cls_token``, ``pos_embed``, ``mask_token``,
  ``patch_embed.proj.*`` (layers/patch_embed.py:65), ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
  mlp.fc1, mlp.fc2, ls2.gamma}`` (layers/block.py:63-85, attention.py:52-54, layer_scale.py:27), ``norm.*``;
  the fused ``qkv`` is split in query, key, value order (attention.py:71-72). Chunked blocks
  (``blocks.C.N.``, ``block_chunks`` > 0: vision_transformer.py:154-161, where chunk C pads with identities so
  that N stays the block's index) are read as ``blocks.N.``. ``register_tokens`` (the registers variants) have
  no place in RAD-DINO's register-free model and are reported unexpected.

Both load into the same transformers ``Dinov2Model``, so the forward is transformers': the position embedding
is resampled to the input's patch grid by ``Dinov2Embeddings.interpolate_pos_encoding`` (bicubic), as the model
card's example runs it (transformers' ``AutoModel`` on the model's folder). The DINOv2 repository's own
resampling (vision_transformer.py:180-212) passes a scale factor with a 0.1 offset instead of the output size,
so its embeddings at other sizes differ slightly; weights in its layout still run transformers' here.

Protocols: the linear probe takes the class token after the final LayerNorm (``pooler_output``): the model
card's image classification use is "a classifier trained on top of the CLS token". The dense tasks take the
patch tokens of blocks (3, 5, 7, 11) through :class:`~vlpbench.adapters.hf_vit.HfViTEncoder`'s
Feature2Pyramid neck (taps resampled from the 14-pixel grid to stride 16; input sides divisible by 112,
e.g. 224). No text side: no zero-shot, grounding or retrieval.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vlpbench.adapters.base import Adapter, LoadReport, ModelCard, Weights, match_keys, tensor_spec, unwrap_state_dict
from vlpbench.adapters.hf_vit import HfFolder, HfViTEncoder, materialize, pyramid_name, read_hf_folder
from vlpbench.adapters.transformer import default_out_indices
from vlpbench.errors import CheckpointError, ConfigError

# microsoft/rad-dino's input size (its model card: 518² px); the normalisation is read from each folder's
# preprocessor_config.json (BitImageProcessor), so `models` lists none of its own.
RAD_DINO_SIZE = 518
POOL = "cls: class token after the final LayerNorm (Dinov2Model pooler_output)"
# Module key part -> the name save_pretrained writes (transformers >= 5 renames these in the module only).
_SAVED_NAMES = (("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
                ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense."))
# Hugging Face name -> DINOv2-repository name, for everything but the fused q/k/v projection.
_REPO_NAMES = (("embeddings.cls_token", "cls_token"), ("embeddings.mask_token", "mask_token"),
               ("embeddings.position_embeddings", "pos_embed"),
               ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
               ("attention.output.dense.", "attn.proj."), ("layer_scale1.lambda1", "ls1.gamma"),
               ("layer_scale2.lambda1", "ls2.gamma"), ("encoder.layer.", "blocks."), ("layernorm.", "norm."))
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_CHUNKED = re.compile(r"blocks\.\d+\.(\d+)\.")


class DinoV2Encoder(HfViTEncoder):
    """A ``Dinov2Model`` as a protocol encoder: one class token, pooled by the class token after the final norm."""

    def __init__(self, model: nn.Module, config: Any):
        super().__init__(model, patch_size=config.patch_size, width=config.hidden_size,
                         depth=config.num_hidden_layers, prefix_tokens=1, pooled_channels=config.hidden_size)

    def _outputs(self, x: torch.Tensor, hidden_states: bool) -> Any:
        return self.model(pixel_values=x, output_hidden_states=hidden_states)

    def _pool(self, outputs: Any) -> torch.Tensor:
        return outputs.last_hidden_state[:, 0]


class RadDinoAdapter(Adapter):
    """RAD-DINO's backbone from its Hugging Face folder (module docstring)."""

    name = "rad_dino"
    description = ("RAD-DINO (DINOv2 ViT-B/14 on CXR) from its Hugging Face folder: class-token linear probe; "
                   "frozen ViT + Feature2Pyramid for dense tasks; image only")
    card = ModelCard(
        paper="Pérez-García, Sharma, Bond-Taylor et al., Exploring scalable medical image encoders beyond text "
              "supervision (RAD-DINO), Nature Machine Intelligence 2025; arXiv 2401.10815",
        repository="huggingface.co/microsoft/rad-dino (transformers Dinov2Model; pip package rad-dino); "
                   "github.com/facebookresearch/dinov2 for the backbone_compatible layout",
        checkpoints=("the Hugging Face folder microsoft/rad-dino (config.json, preprocessor_config.json, "
                     "model.safetensors; backbone_compatible.safetensors holds the same backbone in the DINOv2 "
                     "repository's layout)",),
        pretraining_data=("mimic_cxr", "chexpert", "cxr14"),
        notes=("also pre-trained on PadChest and BRAX, which are no vlpbench datasets",
               "image only: no text encoder, so no zero-shot, grounding or retrieval",
               "14-pixel patches: dense-task inputs must be multiples of 112 px (e.g. 224); the taps are resampled "
               "to stride 16 for the neck"),
    )
    capabilities = frozenset({"features"})
    image_size = RAD_DINO_SIZE
    mean = None
    std = None
    encoder_name = "vit+feature2pyramid"
    pool_description = POOL
    checkpoint_forms = (
        "Hugging Face folder (config.json: model_type dinov2; preprocessor_config.json; model.safetensors or "
        "pytorch_model.bin): Dinov2Model keys, embeddings.*, encoder.layer.N.*, layernorm.*",
        "backbone_compatible.safetensors inside that folder: DINOv2-repository keys (cls_token, pos_embed, "
        "mask_token, patch_embed.proj, blocks.N.{attn.qkv, attn.proj, ls1, ls2, ...}, norm), chunked blocks too",
    )
    capability_hints = dict.fromkeys(("embed_image", "embed_text"), "RAD-DINO has no text encoder and no shared "
                                     "embedding space: linear, dense and fine-tuning protocols only")
    procedures = {"linear": "class token after the final LayerNorm (transformers Dinov2Model pooler_output): the "
                            "microsoft/rad-dino model card's classification use, a classifier on the CLS token"}

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load the folder strictly (see ``Adapter``); the input contract is its image processor's.

        Raises:
            CheckpointError: as ``Adapter``; also a folder that is not a ``dinov2`` one, a SwiGLU config, an
                image processor setting vlpbench cannot reproduce, or an input side that is no multiple of the
                patch size.
        """
        super().__init__(checkpoint, **options)
        extra = self._extra_state
        self.config, self.contract, self._files = extra["config"], extra["contract"], extra["files"]
        self.image_size, self.mean, self.std = self.contract.image_size, self.contract.mean, self.contract.std
        if self.image_size % self.config.patch_size:
            raise CheckpointError(f"{self.checkpoint_path}: the image processor's size {self.image_size} is no "
                                  f"multiple of the {self.config.patch_size}-pixel patches")

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Account every key of the weights file against a ``Dinov2Model`` of the folder's config, in whichever
        of the two layouts the keys show (module docstring); return the module's state dict.

        Raises:
            CheckpointError: ``checkpoint`` is not a folder read by ``_read`` or its weights are not a dict.
        """
        if not isinstance(checkpoint, HfFolder):
            raise CheckpointError("adapter 'rad_dino' reads a Hugging Face folder (or a weights file inside one); "
                                  "pass its path")
        saved = _saved_shapes(checkpoint.config)  # name as saved -> (module key, spec)
        report = LoadReport("dinov2-hf")
        state, prefix = unwrap_state_dict(checkpoint.state, report, what="a RAD-DINO checkpoint")
        if any(isinstance(k, str) and k.startswith("embeddings.") for k in state) or not _repo_like(state):
            found = match_keys(state, {name: spec for name, (_, spec) in saved.items()}, report, source_prefix=prefix)
            report.mapped = [(source, saved[source[len(prefix):]][0]) for source, _ in report.mapped]
            encoder = {saved[name][0]: tensor for name, tensor in found.items()}
        else:
            encoder = _map_repo_layout(state, saved, report, prefix)
        report.layout += f" ({checkpoint.weights_file})"
        return Weights(report, encoder, extra={"config": checkpoint.config, "contract": checkpoint.contract,
                                               "files": checkpoint.files_record()})

    def encoder(self) -> DinoV2Encoder:
        """A new :class:`DinoV2Encoder` holding this checkpoint's backbone (the neck new)."""
        from transformers import Dinov2Model

        return DinoV2Encoder(materialize(lambda: Dinov2Model(self.config), self._encoder_state), self.config)

    def describe(self) -> dict[str, Any]:
        """``Adapter.describe`` plus the architecture, the input contract, the folder's configuration files, the
        pyramid and the pooling."""
        c = self.config
        return {**super().describe(),
                "architecture": {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                                 "num_attention_heads": c.num_attention_heads, "patch_size": c.patch_size,
                                 "image_size": c.image_size, "layerscale_value": c.layerscale_value},
                "input_contract": asdict(self.contract), "configuration": self._files,
                "pyramid": pyramid_name(default_out_indices(c.num_hidden_layers), c.patch_size),
                "pool": self.pool_description}

    @classmethod
    def _read(cls, checkpoint: str | Path | None) -> tuple[Any, str | None, str | None]:
        """The folder (or a weights file inside it), read by :func:`read_hf_folder`; a SwiGLU config is refused."""
        from transformers import Dinov2Config

        if checkpoint is None:
            raise ConfigError("adapter 'rad_dino' needs a checkpoint: the microsoft/rad-dino folder")
        folder, path, sha256 = read_hf_folder(Path(checkpoint), "dinov2", Dinov2Config, cls.name)
        if folder.config.use_swiglu_ffn:
            raise CheckpointError(f"{folder.folder}/config.json: use_swiglu_ffn is true; RAD-DINO's blocks have "
                                  "the plain MLP (mlp.fc1, mlp.fc2)")
        return folder, path, sha256


def _saved_shapes(config: Any) -> dict[str, tuple[str, Any]]:
    """Each ``Dinov2Model(config)`` state-dict key as ``save_pretrained`` names it -> (module key, spec)."""
    from transformers import Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(config)
    out = {}
    for key, value in model.state_dict().items():
        name = key
        for module_part, saved_part in _SAVED_NAMES:
            name = name.replace(module_part, saved_part)
        out[name] = (key, tensor_spec(value))
    return out


def _repo_like(state: Mapping[str, Any]) -> bool:
    """True when the keys are the DINOv2 repository's (``cls_token``, ``blocks.*``)."""
    return "cls_token" in state or any(isinstance(k, str) and k.startswith("blocks.") for k in state)


def _repo_name(name: str) -> tuple[str, int | None]:
    """The DINOv2-repository key holding Hugging Face key ``name``, and its third (0-2) where it is the fused qkv."""
    qkv = _QKV.match(name)
    if qkv is not None:
        block, part, kind = qkv.groups()
        return f"blocks.{block}.attn.qkv.{kind}", ("query", "key", "value").index(part)
    for hf_part, repo_part in _REPO_NAMES:
        name = name.replace(hf_part, repo_part)
    return name, None


def _map_repo_layout(state: Mapping[str, Any], saved: Mapping[str, tuple[str, Any]], report: LoadReport,
                     prefix: str) -> dict[str, torch.Tensor]:
    """Account DINOv2-repository keys (chunked blocks flattened) and split each fused qkv into the module's
    query, key and value; returns the module's state dict."""
    report.layout = report.layout.replace("dinov2-hf", "dinov2-repo", 1)
    if any(isinstance(k, str) and _CHUNKED.match(k) for k in state):
        state = {_CHUNKED.sub(r"blocks.\1.", k) if isinstance(k, str) else k: v for k, v in state.items()}
        report.layout += " (block chunks flattened)"
    sources = {name: _repo_name(name) for name in saved}
    expected: dict[str, Any] = {}
    for name, (repo, third) in sources.items():
        spec = saved[name][1]
        expected[repo] = spec if third is None else type(spec)((3 * spec[0], *spec[1:]), spec.dtype)
    found = match_keys(state, expected, report, source_prefix=prefix)
    targets: dict[str, list[str]] = {}
    for name, (repo, _) in sources.items():
        targets.setdefault(repo, []).append(saved[name][0])
    report.mapped = [(source, ", ".join(targets[source[len(prefix):]])) for source, _ in report.mapped]
    encoder = {}
    for name, (repo, third) in sources.items():
        if repo in found:
            encoder[saved[name][0]] = found[repo] if third is None else found[repo].chunk(3)[third]
    return encoder
