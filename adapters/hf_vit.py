"""Vision transformers read from local Hugging Face folders (RAD-DINO's ``Dinov2Model``, MedSigLIP's ``SiglipModel``).

What the folder adapters (``rad_dino``, ``medsiglip``) share:

- :func:`read_hf_folder`: the folder as ``save_pretrained`` writes it: ``config.json`` (its ``model_type`` checked,
  read by the transformers config class with ``local_files_only``), ``preprocessor_config.json`` (the input
  contract, :func:`read_input_contract`) and one weights file (``model.safetensors`` or ``pytorch_model.bin``,
  read by the safe loader; sharded weights are refused). A weights file inside such a folder may be passed
  instead of the folder: its keys then say which layout it holds.
- :func:`materialize`: a transformers module built without random init and loaded strictly.
- :class:`HfViTEncoder`: the tower as the protocols use an encoder, behind the same Feature2Pyramid neck as
  :class:`~vlpbench.adapters.transformer.ViTEncoder`.

The input contract is the folder's own image processor: the square side it resizes (and, for RAD-DINO's
``BitImageProcessor``, crops) to, its ``image_mean`` and ``image_std`` on pixels rescaled by 1/255. Anything
vlpbench's ``Adapter.preprocess`` cannot reproduce (another rescale factor, a crop that cuts the border off
a square image, a non-square size) is refused, naming the field.

Dense tasks: the taps are the token maps after blocks :func:`~vlpbench.adapters.transformer.default_out_indices`
(the last after the final LayerNorm), the prefix (class) token dropped, as ``ViTEncoder`` takes them. The
position embedding is resampled to the input's patch grid by the model's own embedding module (transformers'
``interpolate_pos_encoding``: bicubic from the pre-training grid). A 14-pixel patch grid is not a power-of-two
stride, so each tap is resampled bilinearly to the stride-16 grid (``H/16 × W/16``) before the neck, whose
rescales (4, 2, 1, 0.5) then give strides 4, 8, 16, 32 as for a ViT-B/16; the input side must divide by the
patch size (the patch embedding would silently drop the remainder) and by 16.
"""

from __future__ import annotations

import abc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlpbench.adapters.base import load_state_dict_file, sha256_tree
from vlpbench.adapters.transformer import Feature2Pyramid, default_out_indices, default_rescales, pyramid_output
from vlpbench.errors import CheckpointError, ConfigError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE, PROCESSOR_FILE = "config.json", "preprocessor_config.json"
# The taps' stride before the neck: that of a 16-pixel-patch ViT, whose neck rescales (4, 2, 1, 0.5) give 4-32.
TAP_STRIDE = 16
# vlpbench's preprocess scales uint8 pixels by exactly this before normalising.
RESCALE = 1 / 255


@dataclass(frozen=True)
class InputContract:
    """A folder's image processor as ``Adapter.preprocess`` applies it.

    Attributes:
        image_size: the square side the processor resizes (and crops) to.
        mean, std: ``image_mean`` / ``image_std`` per RGB channel, on pixels scaled to [0, 1].
        processor: ``image_processor_type`` (for records).
        resample: the processor's PIL resampling filter number (for records: vlpbench's image cache resizes).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    processor: str
    resample: int | None


def read_input_contract(path: Path) -> InputContract:
    """Read and validate ``preprocessor_config.json`` (``path``).

    Raises:
        CheckpointError: the file is missing or not a JSON object, or a setting is one vlpbench's preprocess
            cannot reproduce; the message names the file and the field.
    """
    try:
        processor = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the image processor's settings: {e}") from e
    if not isinstance(processor, dict):
        raise CheckpointError(f"{path}: expected a JSON object of image processor settings")

    def fail(key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{path}: {key} is {processor.get(key)!r}; expected {expected}")

    if processor.get("do_rescale", True) is not True or not _close(processor.get("rescale_factor", RESCALE), RESCALE):
        raise fail("rescale_factor" if processor.get("do_rescale", True) is True else "do_rescale",
                   "pixels rescaled by 1/255 (do_rescale true, rescale_factor 0.00392156862745098)")
    if processor.get("do_resize") is not True:
        raise fail("do_resize", "true: the processor's size is the model's input size")
    side = _square_side(processor, "size", path)
    if processor.get("do_center_crop"):
        crop = _square_side(processor, "crop_size", path)
        if crop != side:
            raise CheckpointError(f"{path}: size {processor['size']!r} then crop_size {processor['crop_size']!r} "
                                  "cuts the border off; vlpbench resizes the whole image to the input size")
    if processor.get("do_normalize", True):
        mean, std = _channels(processor, "image_mean", path), _channels(processor, "image_std", path)
        if min(std) <= 0:
            raise fail("image_std", "positive values")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = processor.get("resample")
    return InputContract(side, mean, std, str(processor.get("image_processor_type", "")),
                         resample if isinstance(resample, int) else None)


def _close(value: Any, wanted: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isclose(value, wanted,
                                                                                             rel_tol=1e-9)


def _square_side(processor: Mapping[str, Any], key: str, path: Path) -> int:
    """The side of a square ``{"height": s, "width": s}`` or ``{"shortest_edge": s}`` entry."""
    size = processor.get(key)
    sides = ([size.get("height"), size.get("width")] if isinstance(size, dict) and "height" in size
             else [size.get("shortest_edge")] if isinstance(size, dict) else [None])
    if len(set(map(repr, sides))) != 1 or not isinstance(sides[0], int) or isinstance(sides[0], bool) or sides[0] < 1:
        raise CheckpointError(f"{path}: {key} is {size!r}; expected a square size, {{'height': S, 'width': S}} or "
                              "{'shortest_edge': S}")
    return sides[0]


def _channels(processor: Mapping[str, Any], key: str, path: Path) -> tuple[float, float, float]:
    """A per-channel value: one finite number or a list of three."""
    value = processor.get(key)
    values = value if isinstance(value, list) else [value]
    if len(values) not in (1, 3) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v) for v in values):
        raise CheckpointError(f"{path}: {key} is {value!r}; expected a number or a list of three (R, G, B)")
    return tuple(float(v) for v in values * (3 // len(values)))


@dataclass
class HfFolder:
    """What a folder adapter's ``_read`` reads (:func:`read_hf_folder`).

    Attributes:
        folder: the Hugging Face folder.
        config: its ``config.json`` as the transformers config class reads it.
        contract: its image processor (:class:`InputContract`).
        state: the weights file's state dict.
        weights_file: the weights file's name in ``folder``.
    """

    folder: Path
    config: Any
    contract: InputContract
    state: dict[str, Any] = field(repr=False)
    weights_file: str

    def files_record(self) -> dict[str, Any]:
        """``{"path", "sha256", "files"}`` of the configuration files read (config and image processor)."""
        digest, files = sha256_tree(self.folder, (CONFIG_FILE, PROCESSOR_FILE))
        return {"path": str(self.folder), "sha256": digest, "files": files}


def weights_file(folder: Path, resave: str) -> Path:
    """The first of :data:`WEIGHT_FILES` in the Hugging Face ``folder``.

    Raises:
        CheckpointError: there is none; a sharded save (``*.index.json``) is named as unsupported, with
            ``resave`` as the advice.
    """
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        sharded = any(folder.glob("*.index.json"))
        raise CheckpointError(f"{folder} has no {' or '.join(WEIGHT_FILES)}"
                              + (f"; sharded weights are not supported: {resave}" if sharded else ""))
    return weights


def read_hf_folder(checkpoint: Path, model_type: str, config_class: Any, adapter: str) -> tuple[HfFolder, str, str]:
    """Read a Hugging Face folder of ``model_type``: ``(HfFolder, checkpoint as given, sha256 of the weights)``.

    ``checkpoint`` is the folder (weights: the first of :data:`WEIGHT_FILES` there) or a weights file inside it.

    Raises:
        CheckpointError: a file is missing, the config is of another model type or unreadable, the weights are
            sharded, unsafe or unreadable, or the image processor's settings are refused (field named).
    """
    folder, weights = (checkpoint, None) if checkpoint.is_dir() else (checkpoint.parent, checkpoint)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}: adapter {adapter!r} reads a Hugging Face folder "
                              f"({CONFIG_FILE}, {PROCESSOR_FILE} and {' or '.join(WEIGHT_FILES)})")
    try:
        found = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{config_path} is not a JSON object with a model_type: {e}") from e
    if found != model_type:
        raise CheckpointError(f"{config_path}: model_type is {found!r}; adapter {adapter!r} reads {model_type!r} "
                              "folders")
    try:
        config = config_class.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path} cannot be read as a {config_class.__name__}: {e}") from e
    if weights is None:
        weights = weights_file(folder, "re-save them with a larger max_shard_size")
    contract = read_input_contract(folder / PROCESSOR_FILE)
    state, sha256 = load_state_dict_file(weights)
    return HfFolder(folder, config, contract, state, weights.name), str(checkpoint), sha256


def materialize(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], *, share: bool = False) -> nn.Module:
    """The module ``build()`` makes, created without random init and holding ``state`` (loaded strictly).

    ``share``: the module's tensors are those of ``state`` (no copy; floating point tensors are made float32
    first), for a frozen copy that is never trained; otherwise they are copies. transformers' only
    non-persistent buffers here are ``position_ids``, the constant 0..n-1, which are rebuilt.

    Raises:
        RuntimeError: the module has another non-persistent buffer (it would stay uninitialised).
    """
    with torch.device("meta"):
        module = build()
    saved = set(module.state_dict())
    if share:
        module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    else:
        module.to_empty(device="cpu")
        module.load_state_dict(dict(state))
    for name, buffer in list(module.named_buffers()):
        if name in saved:
            continue
        owner, _, leaf = name.rpartition(".")
        if leaf != "position_ids":
            raise RuntimeError(f"{type(module).__name__} has a non-persistent buffer {name} that no checkpoint "
                               "fills; cannot materialise it")
        ids = torch.arange(buffer.shape[-1]).expand(buffer.shape)
        module.get_submodule(owner).register_buffer(leaf, ids.clone(), persistent=False)
    return module


def pyramid_name(out_indices: Sequence[int], patch_size: int) -> str:
    """What records name the neck by: ``"feature2pyramid(3,5,7,11)"``, plus the taps' resampling for patches
    other than 16 pixels."""
    resampled = "" if patch_size == TAP_STRIDE else f"; taps resampled from stride {patch_size} to {TAP_STRIDE}"
    return f"feature2pyramid({','.join(map(str, out_indices))}{resampled})"


class HfViTEncoder(nn.Module, abc.ABC):
    """A transformers vision tower used by the protocols like an smp encoder (module docstring).

    Subclasses say how to run the tower (:meth:`_outputs`: a transformers output with ``last_hidden_state``
    after the final LayerNorm and, on request, ``hidden_states``: the embeddings, then each block's output)
    and what its pooled feature is (:meth:`_pool`).

    Attributes:
        model: the transformers tower (its parameters are the backbone; fine-tuning trains them).
        neck: the :class:`Feature2Pyramid` (new; it trains with a dense head).
        out_channels: ``(3, 0, C, C, C, C)``; ``forward`` returns maps at strides 1, 2, 4, 8, 16, 32.
        output_stride: 32. first_level: the index in ``forward``'s list of the neck's level 0 (2).
        pooled_channels: the pooled feature's width. pyramid: what records name the neck by.

    Args:
        model: the tower, weights loaded.
        patch_size, width, depth: its patch side, token width and number of blocks.
        prefix_tokens: tokens before the patches (1: a class token; 0 for SigLIP).
        pooled_channels: the width of :meth:`_pool`'s feature.
        out_indices: the blocks tapped (default: :func:`default_out_indices`).
    """

    output_stride = 32
    first_level = 2

    def __init__(self, model: nn.Module, *, patch_size: int, width: int, depth: int, prefix_tokens: int,
                 pooled_channels: int, out_indices: Sequence[int] | None = None):
        super().__init__()
        self.model = model
        self.patch_size, self.depth, self.prefix_tokens = patch_size, depth, prefix_tokens
        self.out_indices = default_out_indices(depth) if out_indices is None else tuple(out_indices)
        self.neck = Feature2Pyramid(width, default_rescales(TAP_STRIDE))
        self.out_channels = (3, 0) + (width,) * len(self.out_indices)
        self.pooled_channels = pooled_channels
        self.pyramid = pyramid_name(self.out_indices, patch_size)

    @abc.abstractmethod
    def _outputs(self, x: torch.Tensor, hidden_states: bool) -> Any:
        """The tower's transformers output for images ``x``, position embedding resampled to their grid."""

    @abc.abstractmethod
    def _pool(self, outputs: Any) -> torch.Tensor:
        """The pooled feature ``(B, pooled_channels)`` from :meth:`_outputs`."""

    def _check(self, x: torch.Tensor, stride: int) -> None:
        if x.shape[-1] % stride or x.shape[-2] % stride:
            raise ConfigError(f"this ViT with {self.patch_size}-pixel patches takes image sides divisible by {stride} "
                              f"here, got {tuple(x.shape[-2:])}")

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Token maps ``(B, C, H/16, W/16)`` after blocks ``out_indices``, the last block's after the final norm."""
        self._check(x, self.patch_size * TAP_STRIDE // math.gcd(self.patch_size, TAP_STRIDE))
        outputs = self._outputs(x, True)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        target = (x.shape[-2] // TAP_STRIDE, x.shape[-1] // TAP_STRIDE)
        maps = []
        for i in self.out_indices:
            tokens = outputs.last_hidden_state if i == self.depth - 1 else outputs.hidden_states[i + 1]
            tap = tokens[:, self.prefix_tokens:].transpose(1, 2).reshape(len(tokens), -1, *grid)
            maps.append(tap if grid == target else F.interpolate(tap, size=target, mode="bilinear",
                                                                 align_corners=False))
        return maps

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature ``(B, pooled_channels)`` of the whole tower (the neck is not used)."""
        self._check(x, self.patch_size)
        return self._pool(self._outputs(x, False))

    def forward(self, x: torch.Tensor, output: str = "maps") -> list[torch.Tensor] | torch.Tensor:
        """``output="maps"``: ``[x, empty stride-2 map, *neck(taps(x))]``; ``"taps"``: :meth:`taps`; ``"pooled"``:
        :meth:`pooled` (as ``ViTEncoder.forward``)."""
        return pyramid_output(self, x, output)
