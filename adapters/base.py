"""The adapter contract: safe checkpoint reading, strict key accounting, and the ``Adapter`` base class.

An adapter turns a checkpoint, in the form its authors publish it, into what the protocols consume:
a fresh smp encoder (``encoder()``; ResNet-50 unless the adapter's ``encoder_name`` says otherwise) and,
where the checkpoint carries one, the weights of an ``smp.Unet("resnet50", classes=1)`` decoder
(``decoder_state_dict()``).

Loading is strict. Every checkpoint key is either mapped onto a module key or listed as deliberately
ignored with a reason; anything missing, unexpected or of the wrong shape makes the constructor raise
``CheckpointError`` with the full accounting (``LoadReport.format()``). ``Adapter.inspect`` produces the
same accounting without raising, for diagnosing a file.

A concrete adapter is a key-mapping function, ``map_weights``, usually built from ``unwrap_state_dict``
(training containers and ``module.``/``_orig_mod.`` prefixes), ``split_prefix`` and ``match_encoder``.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import pickle
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Iterable, Mapping

import torch

from vlpbench.adapters import containers
from vlpbench.errors import CheckpointError, ConfigError
from vlpbench.files import atomic_path
from vlpbench.options import typed_value

# Embedding capabilities used by the zero-shot and grounding protocols (see ``Adapter.embed_image`` etc.).
EMBED_IMAGE, EMBED_TEXT, DENSE_EMBED = "embed_image", "embed_text", "dense_embed"
# What the zero-shot protocols ask for. An adapter with image and text embeddings has ZERO_SHOT through
# the default ``zero_shot_scores``; with dense and text embeddings it has GROUNDING through the default
# ``grounding_maps``. Models that score classes another way (MedKLIP's entity queries) declare them directly.
ZERO_SHOT, GROUNDING = "zero_shot", "grounding"


class CapabilityError(ConfigError):
    """An adapter instance lacks a capability a protocol needs; the message says what would provide it."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_HASH_CHUNK = 1 << 20
# How many keys of each problem list go into a result record; format() lists all of them.
_SUMMARY_KEYS = 5

Shape = tuple[int, ...]


class TensorSpec(tuple):
    """The shape of a module tensor (a tuple, equal to ``tuple(t.shape)``) that also carries the module's dtype.

    ``match_keys`` checks a checkpoint tensor's dtype against it: a float tensor stored as an integer (or an
    integer buffer stored as a float) would be cast silently by ``load_state_dict``, loading garbage.
    """

    dtype: torch.dtype

    def __new__(cls, shape: Iterable[int], dtype: torch.dtype) -> TensorSpec:
        spec = super().__new__(cls, shape)
        spec.dtype = dtype
        return spec


def tensor_spec(tensor: torch.Tensor) -> TensorSpec:
    """The ``TensorSpec`` (shape and dtype) of ``tensor``; meta tensors work."""
    return TensorSpec(tensor.shape, tensor.dtype)


def state_specs(module: torch.nn.Module) -> dict[str, TensorSpec]:
    """Key → ``TensorSpec`` of every entry of ``module.state_dict()``: what ``match_keys`` expects."""
    return {k: tensor_spec(v) for k, v in module.state_dict().items()}


def dtype_kind(dtype: torch.dtype) -> str:
    """``"floating point"``, ``"bool"`` or ``"integer"``: the dtypes ``load_state_dict`` may convert between
    (float16 into a float32 parameter, int32 into an int64 counter) share a kind; across kinds it corrupts."""
    if dtype.is_floating_point or dtype.is_complex:
        return "floating point"
    return "bool" if dtype == torch.bool else "integer"


def _expected_kind(spec: Shape) -> str:
    """The dtype kind ``spec`` asks for; a bare shape is a parameter written out by hand: floating point."""
    return dtype_kind(spec.dtype) if isinstance(spec, TensorSpec) else "floating point"


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks so large checkpoints stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(folder: str | Path, names: Iterable[str]) -> tuple[str, list[str]]:
    """One sha256 over the files ``names`` (paths relative to ``folder``) that exist there.

    For folders read piecewise, such as a Hugging Face text encoder (config, tokenizer files, weights):
    the digest covers each present file's relative path and content digest, in sorted order, so it
    changes when any of them does. Returns ``(hex digest, the relative paths hashed, sorted)``.
    """
    folder = Path(folder)
    present = sorted(name for name in set(names) if (folder / name).is_file())
    digest = hashlib.sha256()
    for name in present:
        digest.update(f"{name}\0{sha256_file(folder / name)}\n".encode())
    return digest.hexdigest(), present


# The containers training frameworks pickle around hyper-parameters, by the path pickle records for them,
# with the harmless stand-in each is rebuilt as. Lightning's AttributeDict is a dict with attribute
# access; torch's weights-only unpickler fills only exact dicts, so it comes back as a plain dict.
# argparse.Namespace (Lightning's hparams when a model saved an argparse result) only carries
# attributes, which SimpleNamespace holds the same way.
LIGHTNING_ATTRIBUTE_DICT = "pytorch_lightning.utilities.parsing.AttributeDict"
CHECKPOINT_CONTAINERS: Mapping[str, type] = MappingProxyType({
    LIGHTNING_ATTRIBUTE_DICT: dict,  # pytorch_lightning < 2.0
    "lightning_fabric.utilities.data.AttributeDict": dict,  # pytorch_lightning >= 2.0
    "lightning.fabric.utilities.data.AttributeDict": dict,  # the unified ``lightning`` package
    "argparse.Namespace": types.SimpleNamespace,
})
# Everything one load allows: the containers above, and the inert stand-ins for what Lightning 1.1 checkpoints
# name (callback classes as keys of ``callbacks``, an omegaconf DictConfig as ``hyper_parameters``; see
# ``vlpbench.adapters.containers``).
_SAFE_GLOBALS = tuple((stand_in, name) for name, stand_in in {**CHECKPOINT_CONTAINERS, **containers.READ_AS}.items())


def load_state_dict_file(path: str | Path) -> tuple[Any, str]:
    """Load a checkpoint without executing code from it; return ``(object, sha256 of the file)``.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. The
    hyper-parameter containers of training frameworks (``CHECKPOINT_CONTAINERS``: Lightning's
    ``AttributeDict`` under its three module paths, ``argparse.Namespace``) are allowed for this call only
    and rebuilt as ``dict`` / ``types.SimpleNamespace``, so Lightning ``.ckpt`` files load without
    Lightning installed. So do Lightning 1.1 files (``callbacks`` keyed by callback classes, an omegaconf
    ``DictConfig`` as ``hyper_parameters``): those objects come back as the inert stand-ins of
    ``vlpbench.adapters.containers.READ_AS`` (a ``DictConfig`` as a plain dict of its values, named classes as
    ``GlobalName`` markers), and neither Lightning nor omegaconf is imported. Nothing else is allowed, and there is
    no fallback to full unpickling.

    Raises:
        CheckpointError: the file is missing or unreadable, truncated or corrupt, or it needs arbitrary
            unpickling (loading it would execute code from the file; that payload is never run).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        sha256 = sha256_file(path)
    except OSError as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {e}") from e

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), sha256
        except Exception as e:  # safetensors raises its own error type, or OSError/ValueError
            raise CheckpointError(f"checkpoint file {path} is not a readable safetensors file "
                                  f"(truncated or corrupt?): {e}") from e

    try:
        # Scoped allow-list: torch removes these entries again on exit, so nothing leaks into later loads.
        with torch.serialization.safe_globals(list(_SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True), sha256
    except pickle.UnpicklingError as e:
        if str(e).startswith("Weights only load failed"):
            raise CheckpointError(
                f"refused to load checkpoint file {path}: it is not a plain state dict, and loading it "
                f"would execute code from the file (arbitrary unpickling). The payload was not run. "
                f"Re-save its tensors as a plain state dict or safetensors. "
                f"Detail: {_weights_only_detail(str(e))}"
            ) from e
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {e}") from e
    except Exception as e:  # a damaged file surfaces as RuntimeError, EOFError, KeyError, ... by where it breaks
        raise CheckpointError(
            f"checkpoint file {path} is truncated or corrupt ({type(e).__name__}: {e})"
        ) from e


def _weights_only_detail(message: str) -> str:
    """What the file asked for, from torch's weights-only refusal.

    Only the name of the blocked callable (or opcode) is kept: torch's message also advises retrying
    with ``weights_only=False`` or allow-listing the callable, advice not to pass on for unknown files.
    """
    if match := re.search(r"GLOBAL\s+([\w.]+)", message):
        return f"the file calls {match.group(1)} while unpickling"
    if match := re.search(r"Unsupported operand (\d+)", message):
        return f"the file uses pickle opcode {match.group(1)}, outside the weights-only subset"
    return "the file needs objects outside the weights-only allow-list"


class LightningAttributeDict(dict):
    """What ``save_checkpoint`` writes as Lightning's ``AttributeDict`` (Lightning itself is not needed).

    ``load_state_dict_file`` reads it back, like a real Lightning ``AttributeDict``, as a plain ``dict``.
    """


class _StandInPickler(pickle._Pickler):
    """Pickler that records the stand-in classes under the class paths of the real ones.

    The pure-Python pickler is used because its ``save_global`` can be overridden; it only pickles the
    container structure, since torch stores tensor data outside the pickle. Besides ``LightningAttributeDict``
    it writes the Lightning 1.1 / omegaconf 2.0.5 look-alikes of ``vlpbench.adapters.containers.WRITTEN_AS``.
    """

    _paths: ClassVar[Mapping[type, str]] = {LightningAttributeDict: LIGHTNING_ATTRIBUTE_DICT, **containers.WRITTEN_AS}

    def save_global(self, obj: Any, name: str | None = None) -> None:
        path = self._paths.get(obj) if isinstance(obj, type) else None
        if path is None:
            super().save_global(obj, name)
            return
        module, qualname = path.rsplit(".", 1)
        # GLOBAL is valid in every protocol; unpicklers resolve it by module and name alone.
        self.write(pickle.GLOBAL + module.encode() + b"\n" + qualname.encode() + b"\n")
        self.memoize(obj)


def save_checkpoint(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, writing ``LightningAttributeDict`` and the look-alikes of
    ``vlpbench.adapters.containers.WRITTEN_AS`` as the classes they stand for.

    The file is written beside the target and renamed (``vlpbench.files.atomic_path``), so an interrupted
    write never leaves a truncated checkpoint. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp, pickle_module=types.SimpleNamespace(__name__="pickle", Pickler=_StandInPickler))
    return path


@dataclass
class LoadReport:
    """Accounting of how a checkpoint's keys were used.

    Attributes:
        layout: the detected checkpoint layout, e.g. ``"encoder"`` or ``"pretrain"``.
        mapped: ``(checkpoint key, module key)`` pairs; module keys are named as in
            ``smp.Unet("resnet50", classes=1)`` (``encoder.*``, ``decoder.*``, ``segmentation_head.*``).
        ignored: reason → checkpoint keys deliberately not used.
        missing: checkpoint keys the layout needs but the file lacks.
        unexpected: checkpoint keys that are neither mapped nor ignored.
        mismatched: ``(checkpoint key, expected shape, found shape)``.
        wrong_dtype: ``(checkpoint key, expected dtype kind, found dtype)``, e.g.
            ``("conv1.weight", "floating point", "int32")`` (see ``dtype_kind``).
    """

    layout: str
    mapped: list[tuple[str, str]] = field(default_factory=list)
    ignored: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    wrong_dtype: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected, mismatched or of the wrong dtype."""
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype)

    def ignore(self, reason: str, keys: list[str]) -> None:
        """Record ``keys`` as deliberately unused for ``reason`` (no-op for an empty list)."""
        if keys:
            self.ignored.setdefault(reason, []).extend(keys)

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest for result records: counts plus the first few keys of each problem list."""
        return {
            "layout": self.layout,
            "ok": self.ok,
            "mapped": len(self.mapped),
            "ignored": {reason: len(keys) for reason, keys in self.ignored.items()},
            "missing": {"count": len(self.missing), "first": self.missing[:_SUMMARY_KEYS]},
            "unexpected": {"count": len(self.unexpected), "first": self.unexpected[:_SUMMARY_KEYS]},
            "mismatched": {
                "count": len(self.mismatched),
                "first": [[k, list(exp), list(got)] for k, exp, got in self.mismatched[:_SUMMARY_KEYS]],
            },
            "wrong_dtype": {
                "count": len(self.wrong_dtype),
                "first": [list(entry) for entry in self.wrong_dtype[:_SUMMARY_KEYS]],
            },
        }

    def format(self) -> str:
        """Human-readable accounting; lists every missing, unexpected, mismatched and wrong-dtype key."""
        lines = [f"layout: {self.layout}", f"mapped: {len(self.mapped)} keys"]
        n_ignored = sum(len(keys) for keys in self.ignored.values())
        lines.append(f"ignored: {n_ignored} keys")
        for reason, keys in self.ignored.items():
            groups = ", ".join(dict.fromkeys(k.split(".", 1)[0] for k in keys))
            lines.append(f"  - {len(keys)} keys ({groups}): {reason}")
        lines.append(f"missing: {len(self.missing)} keys")
        lines += [f"  - {k}" for k in self.missing]
        lines.append(f"unexpected: {len(self.unexpected)} keys")
        lines += [f"  - {k}" for k in self.unexpected]
        lines.append(f"mismatched: {len(self.mismatched)} keys")
        lines += [f"  - {k}: expected shape {exp}, found {got}" for k, exp, got in self.mismatched]
        lines.append(f"wrong dtype: {len(self.wrong_dtype)} keys")
        lines += [f"  - {k}: expected {exp} dtype, found {got}" for k, exp, got in self.wrong_dtype]
        return "\n".join(lines)


def build_meta_encoder(encoder_name: str) -> torch.nn.Module:
    """smp encoder ``encoder_name`` (``get_encoder(name, weights=None)``) with its tensors on the meta device.

    Meta construction skips the random init: only names and shapes exist, no time or global RNG is spent.

    Raises:
        ConfigError: smp (or timm, for ``tu-`` names) knows no encoder of that name.
    """
    from segmentation_models_pytorch.encoders import get_encoder

    try:
        with torch.device("meta"):
            return get_encoder(encoder_name, weights=None)
    except (KeyError, RuntimeError) as e:  # smp: KeyError for its own names; timm: RuntimeError "Unknown model"
        raise ConfigError(f"unknown encoder {encoder_name!r}: expected an smp encoder name such as 'resnet50', "
                          f"or 'tu-<timm model name>'") from e


@functools.lru_cache(maxsize=None)
def encoder_shapes(encoder_name: str = "resnet50") -> Mapping[str, Shape]:
    """Keys and shapes of the state dict of smp encoder ``encoder_name``, cached per name.

    ResNets use torchvision names without ``fc`` (``resnet50``: 318 keys); ``tu-`` encoders hold the timm
    feature extractor under ``model.``.
    """
    # Read-only: the cached mapping is shared by every caller.
    return MappingProxyType(state_specs(build_meta_encoder(encoder_name)))


def resnet50_encoder_shapes() -> Mapping[str, Shape]:
    """Keys and shapes of the smp ResNet-50 encoder state dict (torchvision names without ``fc``: 318 keys)."""
    return encoder_shapes("resnet50")


@functools.lru_cache(maxsize=None)
def unet_decoder_shapes() -> Mapping[str, Shape]:
    """Keys and shapes of the ``decoder.*`` and ``segmentation_head.*`` part of ``smp.Unet("resnet50", classes=1)``."""
    import segmentation_models_pytorch as smp

    with torch.device("meta"):
        unet = smp.Unet("resnet50", encoder_weights=None, in_channels=3, classes=1)
    return MappingProxyType({k: v for k, v in state_specs(unet).items() if not k.startswith("encoder.")})


def split_prefix(state: Mapping[str, Any], *prefixes: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``state`` into (keys starting with one of ``prefixes``, the rest); keys are kept whole."""
    taken = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefixes)}
    rest = {k: v for k, v in state.items() if k not in taken}
    return taken, rest


def match_keys(
    found: Mapping[str, Any],
    expected: Mapping[str, Shape],
    report: LoadReport,
    *,
    source_prefix: str = "",
    target_prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Compare ``found`` (keys already stripped of ``source_prefix``) with ``expected`` names, shapes and dtypes.

    Fills ``report``: mapped pairs ``(source_prefix + key, target_prefix + key)``, missing and unexpected
    keys, shape mismatches and dtype-kind mismatches, all named as in the checkpoint (with ``source_prefix``).
    A ``TensorSpec`` in ``expected`` (``state_specs`` of a meta module) names the dtype the module holds; a bare
    shape asks for a floating point tensor. A value that is not a tensor counts as unexpected. Returns the
    matching tensors under their expected (unprefixed) names.
    """
    matched: dict[str, torch.Tensor] = {}
    for key, value in found.items():
        if key not in expected or not isinstance(value, torch.Tensor):
            report.unexpected.append(f"{source_prefix}{key}")  # f-string: keys of a foreign object may not be str
        elif tuple(value.shape) != expected[key]:
            report.mismatched.append((source_prefix + key, expected[key], tuple(value.shape)))
        elif dtype_kind(value.dtype) != (kind := _expected_kind(expected[key])):
            report.wrong_dtype.append((source_prefix + key, kind, str(value.dtype).removeprefix("torch.")))
        else:
            matched[key] = value
            report.mapped.append((source_prefix + key, target_prefix + key))
    report.missing += [
        source_prefix + key
        for key in expected
        if key not in found or not isinstance(found[key], torch.Tensor)
    ]
    return matched


def match_encoder(
    found: Mapping[str, Any], report: LoadReport, encoder_name: str = "resnet50", *, source_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Account ``found`` against the smp encoder ``encoder_name`` (``encoder_shapes``).

    ``found`` holds keys named as in the encoder's state dict, already stripped of ``source_prefix``. Module
    keys are recorded as ``encoder.<key>``. Returns the encoder state dict.
    """
    return match_keys(found, encoder_shapes(encoder_name), report, source_prefix=source_prefix,
                      target_prefix="encoder.")


def match_resnet50_encoder(
    found: Mapping[str, Any], report: LoadReport, *, source_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Account ``found`` against the smp ResNet-50 encoder (318 torchvision keys without ``fc``).

    ``found`` holds torchvision-named keys (``conv1.weight``, ``layer4.2.bn3.running_var``, ...) already
    stripped of ``source_prefix``. Module keys are recorded as ``encoder.<key>``. Returns the encoder state dict.
    """
    return match_encoder(found, report, "resnet50", source_prefix=source_prefix)


WRAPPER_REASON = ("other entries of the checkpoint container (hyper-parameters, epoch and step counters, "
                  "optimizer, scheduler and callback states): training state, not weights")
SIBLING_WEIGHTS_REASON = ("other model weights stored beside the state dict in the checkpoint container "
                          "(a module this adapter does not use)")
# DataParallel/DistributedDataParallel save their module under "module."; torch.compile under "_orig_mod.".
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(
    checkpoint: Any, report: LoadReport, *, containers: Iterable[str] = ("state_dict",), what: str = "a checkpoint"
) -> tuple[dict[str, Any], str]:
    """Find the state dict in ``checkpoint``; return it with wrapper prefixes removed, and the removed prefix.

    Containers: while the object has an entry named in ``containers`` (in that order) holding a dict, that
    entry is taken and the object's other entries are ignored with ``WRAPPER_REASON`` (or, for another dict of
    tensors such as a second model's weights, ``SIBLING_WEIGHTS_REASON``); a Lightning ``.ckpt``
    (``state_dict``, ``hyper_parameters``, ``epoch``, ``global_step``, ``optimizer_states``, ...) unwraps this
    way. Prefixes: while every key starts with one of ``WRAPPER_PREFIXES``, it is removed. Each step is noted
    in ``report.layout``, e.g. ``"mgca-resnet50 (unwrapped 'state_dict', stripped 'module.')"``. Pass the
    returned prefix as ``source_prefix`` so that the report names keys as they are in the file.

    Raises:
        CheckpointError: what remains is not a dict (``what`` names the expected content in the message).
    """
    containers = tuple(containers)
    notes = []
    state = checkpoint
    while isinstance(state, Mapping):
        container = next((k for k in containers if isinstance(state.get(k), Mapping)), None)
        if container is None:
            break
        others = [k for k in state if k != container]
        # An optimizer's state_dict is a dict too, but of "state" and "param_groups", never of tensors.
        siblings = [k for k in others if _holds_weights(state[k])]
        report.ignore(SIBLING_WEIGHTS_REASON, [str(k) for k in siblings])
        report.ignore(WRAPPER_REASON, [str(k) for k in others if k not in siblings])
        notes.append(f"unwrapped {container!r}")
        state = state[container]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} is a dict of tensors; this file holds a {type(state).__name__}")

    prefix = ""
    state = dict(state)
    while state:
        strip = next((p for p in WRAPPER_PREFIXES if all(isinstance(k, str) and k.startswith(p) for k in state)),
                     None)
        if strip is None:
            break
        state = {k[len(strip):]: v for k, v in state.items()}
        prefix += strip
        notes.append(f"stripped {strip!r}")
    if notes:
        report.layout += f" ({', '.join(notes)})"
    return state, prefix


def _holds_weights(entry: Any) -> bool:
    """True for a non-empty mapping whose values are all tensors (a module's state dict)."""
    return isinstance(entry, Mapping) and bool(entry) and all(isinstance(v, torch.Tensor) for v in entry.values())


@dataclass
class Weights:
    """What ``Adapter.map_weights`` returns: the accounting and the tensors it mapped."""

    report: LoadReport
    encoder: dict[str, torch.Tensor]
    decoder: dict[str, torch.Tensor] | None = None
    # Anything else the adapter mapped for its own capabilities (projection heads, a text encoder's
    # tensors and config), by a name of the adapter's choosing; kept as ``Adapter._extra_state``.
    extra: dict[str, Any] = field(default_factory=dict)


def loaded_eval(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``module`` with ``state`` loaded strictly, in eval mode (BatchNorm uses the saved running statistics)."""
    module.load_state_dict(state)
    return module.eval()


def derived_capabilities(capabilities: Iterable[str]) -> frozenset[str]:
    """ZERO_SHOT and GROUNDING where the embeddings behind the default implementations are present."""
    have = set(capabilities)
    derived = set()
    if {EMBED_IMAGE, EMBED_TEXT} <= have:
        derived.add(ZERO_SHOT)
    if {DENSE_EMBED, EMBED_TEXT} <= have:
        derived.add(GROUNDING)
    return frozenset(derived)


def check_zero_shot_arguments(classes: list[str], templates: tuple[str, str]) -> None:
    """Raise ``ConfigError`` unless ``classes`` is a non-empty list and ``templates`` a pair with one ``{}`` each."""
    if len(templates) != 2 or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ConfigError(f"templates must be a (positive, negative) pair of strings with one '{{}}' each, "
                          f"got {templates!r}")
    if isinstance(classes, str) or not classes:
        raise ConfigError(f"classes must be a non-empty list of class names, got {classes!r}")


@dataclass(frozen=True)
class ModelCard:
    """What a user should know about a model family before scoring it (``vlpbench models --verbose``).

    Attributes:
        paper: authors, title and venue.
        repository: where the authors' code is (the module definitions the adapter was read from).
        checkpoints: each published file, with where to download it.
        pretraining_data: the datasets the model saw in pre-training, as vlpbench names them where it reads
            them (``mimic_cxr``, ``chexpert``, ``cxr14`` ...), so a run whose test set comes from one of
            them is flagged in its record.
        notes: anything else that decides whether a number is right (a stage never trained, an unusual
            normalisation, weights re-trained by a third party).
    """

    paper: str
    repository: str
    checkpoints: tuple[str, ...]
    pretraining_data: tuple[str, ...]
    notes: tuple[str, ...] = ()


class Adapter(abc.ABC):
    """Base class of model adapters; subclasses implement ``map_weights``.

    Class attributes:
        name: registry name (``vlpbench run --model NAME``).
        description: one line for model listings.
        capabilities: what the family can provide (``"features"``; ``"decoder"`` when a checkpoint can carry
            a U-Net decoder; ``"embed_image"``, ``"embed_text"``, ``"dense_embed"`` for the embedding
            methods). An instance narrows this to what its checkpoint and options provide.
        capability_hints: capability → what would provide it, for ``CapabilityError`` messages
            (e.g. ``"pass --model-option text_encoder=DIR"``).
        image_size, mean, std: the pre-training input contract (square side in pixels; per-channel RGB
            normalisation applied to images scaled to [0, 1]).
        takes_checkpoint: True if a checkpoint file is required, False if the adapter accepts none.
        default_options: accepted options and their defaults.
        encoder_name: the smp encoder ``encoder()`` builds (``get_encoder`` name, e.g. ``"resnet50"``,
            ``"tu-efficientnet_b0"``); an instance may set its own from its options.
        checkpoint_forms: the checkpoint forms the adapter accepts, one human-readable line each (listings).
        in_channels: image channels the encoder takes (3; 1 for models pre-trained on single-channel input).
        card: the family's ``ModelCard`` (paper, code, files, pre-training data), None for plain backbones.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    capabilities: frozenset[str] = frozenset({"features"})
    image_size: ClassVar[int] = 224
    mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, float, float]] = IMAGENET_STD
    takes_checkpoint: ClassVar[bool] = True
    default_options: ClassVar[Mapping[str, Any]] = {}
    encoder_name: str = "resnet50"
    # How many downsampling stages ``encoder()`` has: 5 (strides up to 32) unless a model's checkpoint stops
    # earlier (MedKLIP: 4, up to stride 16); protocols build their heads from ``encoder().out_channels``.
    encoder_depth: ClassVar[int] = 5
    checkpoint_forms: ClassVar[tuple[str, ...]] = ()
    capability_hints: ClassVar[Mapping[str, str]] = {}
    in_channels: ClassVar[int] = 3
    card: ClassVar[ModelCard | None] = None
    # How this family computes what a protocol asks of it, by capability (``"zero_shot"``, ``"grounding"``,
    # ``"linear"``), each naming its source line: goes into every record, so a number says how it was made.
    procedures: ClassVar[Mapping[str, str]] = {}
    # Whether ``zero_shot_scores`` are probabilities the model was trained to output (a present/absent head fitted
    # with cross-entropy), not a softmax over prompt similarities that ranks images: only then does the zero-shot
    # protocol report their calibration (ECE, Brier).
    zero_shot_probabilities: ClassVar[bool] = False
    # ``vlpbench.adapters.text.text_encoder_record`` of the text-encoder folder an instance read, if any: it
    # goes into ``describe()`` so a record names the files (and their sha256) its text side came from.
    _text_encoder_record: dict[str, Any] | None = None

    def __init__(self, checkpoint: str | Path | None = None, **options: Any) -> None:
        """Load ``checkpoint`` strictly.

        Raises:
            ConfigError: an unknown option, or a checkpoint missing where one is required (or given where
                none is accepted).
            CheckpointError: the file is unsafe or corrupt, or any key is missing, unexpected or mismatched
                (the message carries the full ``LoadReport.format()``); nothing is loaded then.
        """
        self.options = self._resolve_options(options)
        obj, self.checkpoint_path, self.checkpoint_sha256 = self._read(checkpoint)
        weights = self.map_weights(obj, self.options)
        self.report = weights.report
        if not self.report.ok:
            source = self.checkpoint_path or "generated weights"
            hint = "" if self.report.mapped else " No key matched at all: is it from another model family?"
            raise CheckpointError(
                f"{source} does not match the key layout of adapter {self.name!r}; nothing was loaded.{hint}\n"
                f"{self.report.format()}"
            )
        self._encoder_state = weights.encoder
        self._decoder_state = weights.decoder
        self._extra_state = weights.extra
        if weights.decoder is None:
            self.capabilities = type(self).capabilities - {"decoder"}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.capabilities = frozenset(cls.capabilities) | derived_capabilities(cls.capabilities)

    def __setattr__(self, name: str, value: Any) -> None:
        # ZERO_SHOT and GROUNDING follow from the embeddings, however a subclass narrows its capabilities.
        if name == "capabilities":
            value = frozenset(value)
            value = (value - {ZERO_SHOT, GROUNDING}) | derived_capabilities(value) | (value & self.native_capabilities)
        super().__setattr__(name, value)

    @classmethod
    @abc.abstractmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Map a loaded checkpoint object (None for adapters that take none) onto encoder/decoder weights.

        Must account for every key in the returned report and must not raise for key problems (``inspect``
        relies on that); raise ``CheckpointError`` only when the object is not a state dict at all.
        """

    @classmethod
    def inspect(cls, checkpoint: str | Path | None = None, **options: Any) -> LoadReport:
        """Return the key accounting for ``checkpoint`` without raising on missing/unexpected/mismatched keys.

        Still raises ``CheckpointError`` for unsafe, missing or corrupt files and ``ConfigError`` for bad options.
        """
        resolved = cls._resolve_options(options)
        obj, _, _ = cls._read(checkpoint)
        return cls.map_weights(obj, resolved).report

    def encoder(self) -> torch.nn.Module:
        """A new smp encoder ``self.encoder_name`` holding this adapter's weights (loaded strictly).

        ``forward(x)`` returns 6 feature maps: x itself and strides 2, 4, 8, 16, 32, with channels
        ``out_channels`` (ResNet-50: ``(3, 64, 256, 512, 1024, 2048)``). The module is in training mode,
        like any new module.
        """
        module = build_meta_encoder(self.encoder_name).to_empty(device="cpu")
        if set(module.state_dict()) != {n for n, _ in module.named_parameters()} | {
            n for n, _ in module.named_buffers()
        }:
            # A non-persistent buffer would stay uninitialised after to_empty(); never hand that out.
            raise RuntimeError(f"smp encoder {self.encoder_name!r} has tensors outside its state dict; "
                               "cannot materialise it")
        # smp's ResNet load_state_dict pops "fc.*" from the dict it is given, so it gets a copy; strict by default.
        module.load_state_dict(dict(self._encoder_state))
        return module

    def decoder_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Copies of the U-Net decoder weights (``decoder.*``, ``segmentation_head.*`` as in
        ``smp.Unet("resnet50", classes=1)``), or None when the checkpoint carries no decoder."""
        if self._decoder_state is None:
            return None
        return {k: v.clone() for k, v in self._decoder_state.items()}

    def describe(self) -> dict[str, Any]:
        """JSON-able description for result records."""
        checkpoint = None
        if self.checkpoint_path is not None:
            checkpoint = {"path": self.checkpoint_path, "sha256": self.checkpoint_sha256}
        return {
            "adapter": self.name,
            "checkpoint": checkpoint,
            "pretraining_data": list(self.card.pretraining_data) if self.card else None,
            "procedures": dict(self.procedures),
            "layout": self.report.layout,
            "options": dict(self.options),
            "load_report": self.report.summary(),
            **({"text_encoder": self._text_encoder_record} if self._text_encoder_record is not None else {}),
        }

    # --- embedding capabilities ------------------------------------------------------------------------
    #
    # Images given to the embedding methods are already preprocessed to the adapter's input contract
    # (``image_size``, ``mean``, ``std``); ``preprocess`` does that. Adapters that provide an embedding
    # override the method and list its name in their (instance) ``capabilities``.

    def require(self, *capabilities: str) -> None:
        """Raise ``CapabilityError`` unless this instance provides every one of ``capabilities``.

        Protocols call this before any work, so a missing text encoder fails at once, not after an hour.
        """
        missing = [c for c in capabilities if c not in self.capabilities]
        if missing:
            raise CapabilityError(self._capability_message(missing))

    def _capability_message(self, missing: Iterable[str]) -> str:
        """Name the adapter, each missing capability, and what would provide it."""
        parts = []
        for capability in missing:
            hint = self.capability_hints.get(capability, "no checkpoint form of this adapter provides it")
            parts.append(f"{capability} ({hint})")
        return f"adapter {self.name!r} cannot provide {'; '.join(parts)}"

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embeddings ``(B, D)``, L2-normalised, of preprocessed images ``(B, 3, H, W)``."""
        raise CapabilityError(self._capability_message([EMBED_IMAGE]))

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings ``(B, D)``, L2-normalised, in the same space as ``embed_image``."""
        raise CapabilityError(self._capability_message([EMBED_TEXT]))

    def dense_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Per-location embeddings ``(B, D, h, w)`` of preprocessed images, L2-normalised over ``D``."""
        raise CapabilityError(self._capability_message([DENSE_EMBED]))

    # ZERO_SHOT / GROUNDING that the adapter implements itself rather than through the embeddings.
    native_capabilities: ClassVar[frozenset[str]] = frozenset()
    # Whether ``grounding_maps`` takes free text (a phrase) or only class names the model knows.
    free_text: ClassVar[bool] = True

    def zero_shot_scores(self, images: torch.Tensor, classes: list[str],
                         templates: tuple[str, str] = ("{}", "no {}")) -> torch.Tensor:
        """Probability that each class is present, ``(B, len(classes))``, for preprocessed images.

        The default is CheXzero's: per class, the cosine similarities of the image embedding with the
        positive and the negative prompt (``templates`` formatted with the class name), and the softmax
        over that pair (``run_softmax_eval``: bare cosines, no logit scale), read at the positive prompt.

        Raises:
            CapabilityError: the adapter has no image or no text embedding.
            ConfigError: ``templates`` is not a pair of strings with one ``{}`` each, or no classes.
        """
        self.require(ZERO_SHOT)
        check_zero_shot_arguments(classes, templates)
        image = self.embed_image(images)
        text = self.embed_text([t.format(c) for c in classes for t in templates]).view(len(classes), 2, -1)
        return torch.einsum("bd,cpd->bcp", image, text.to(image.device)).softmax(dim=-1)[..., 0]

    def grounding_maps(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Heat maps ``(B, len(texts), h, w)`` at the model's own resolution: higher = more likely there.

        The default is BioViL's: the cosine similarity of each text embedding with each location of
        ``dense_embed``. Adapters whose ``free_text`` is False take class names they know instead of phrases.

        Raises:
            CapabilityError: the adapter has no dense or no text embedding.
        """
        self.require(GROUNDING)
        if isinstance(texts, str) or not texts:
            raise ConfigError(f"grounding_maps takes a non-empty list of texts, got {texts!r}")
        dense = self.dense_embed(images)
        text = self.embed_text(list(texts)).to(dense.device)
        return torch.einsum("bdhw,td->bthw", dense, text)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Bring images to the input contract: resize to ``image_size``², normalise with ``mean``/``std``.

        ``images`` is ``(B, C, H, W)`` with C = 1 (grey, repeated to RGB) or 3, either ``uint8`` in
        [0, 255] or floating point in [0, 1]. The resize is bilinear with antialiasing and does not keep
        the aspect ratio; a crop, where a model's contract wants one, is the caller's.

        Raises:
            ConfigError: not a 4-d tensor with 1 or 3 channels.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"adapter {self.name!r}: preprocess expects (B, 1 or 3, H, W) images, "
                              f"got shape {tuple(images.shape)}")
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = x.expand(-1, 3, -1, -1)  # grey to RGB, as the pre-training loaders do; a no-op for 3 channels
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @classmethod
    def _resolve_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``options`` over the defaults; reject unknown names and values of the wrong type.

        Each value takes the type of its default (``vlpbench.options.typed_value``): text for a number or
        a boolean is read by the command line's rules, so ``"false"`` is False and ``"yes"`` an error.
        """
        unknown = sorted(set(options) - set(cls.default_options))
        if unknown:
            known = ", ".join(sorted(cls.default_options)) or "none"
            raise ConfigError(f"adapter {cls.name!r} has no option {', '.join(unknown)}; known options: {known}")
        resolved = dict(cls.default_options)
        for key, value in options.items():
            resolved[key] = typed_value(value, cls.default_options[key], f"adapter {cls.name!r}: option {key}")
        return resolved

    @classmethod
    def _read(cls, checkpoint: str | Path | None) -> tuple[Any, str | None, str | None]:
        """Return ``(loaded object, path, sha256)``, all None when there is no checkpoint."""
        if checkpoint is None:
            if cls.takes_checkpoint:
                raise ConfigError(f"adapter {cls.name!r} needs a checkpoint file")
            return None, None, None
        if not cls.takes_checkpoint:
            raise ConfigError(f"adapter {cls.name!r} takes no checkpoint (got {checkpoint})")
        obj, sha256 = load_state_dict_file(checkpoint)
        return obj, str(checkpoint), sha256
