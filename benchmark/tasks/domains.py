"""The type and domain of every task option, declared once per option name (:data:`DOMAINS`), with a
protocol's own where the same name means something else there (:data:`PROTOCOL_DOMAINS`).

:func:`check_option` holds a value to its domain: task files and profiles when a task loads, ``--set``
values when a run, a score or a sweep resolves its config, so that ``threshold=nan``, ``batch_size=0`` or
``betas=[0.9]`` stop with a ConfigError before any image is read. This module imports no protocol (and
no torch); tests/faults/test_options.py checks that its choices are the protocols' own.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any


class OutOfDomain(ValueError):
    """A value outside its option's domain; the message says what was expected."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Int:
    """An integer ``>= low`` (and ``<= high``, a multiple of ``multiple`` where given)."""

    low: int = 1
    high: int | None = None
    multiple: int | None = None

    def describe(self) -> str:
        text = f"an integer >= {self.low}" if self.high is None else f"an integer in [{self.low}, {self.high}]"
        return text + (f", a multiple of {self.multiple}" if self.multiple else "")

    def check(self, value: Any) -> int:
        """``value`` if it is such an integer, else :class:`OutOfDomain`."""
        if not isinstance(value, int) or isinstance(value, bool) or value < self.low or (
                self.high is not None and value > self.high) or (self.multiple and value % self.multiple):
            raise OutOfDomain(self.describe())
        return value


@dataclass(frozen=True)
class Real:
    """A finite number in the interval ``low`` .. ``high`` (open at an end where ``*_open``); an int stands
    for a float."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.low is None and self.high is None:
            return "a finite number"
        if self.high is None:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"a finite number {'<' if self.high_open else '<='} {self.high:g}"
        return (f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")

    def check(self, value: Any) -> float:
        """``value`` as a float if it lies in the interval, else :class:`OutOfDomain` (NaN and ±inf never do)."""
        if not _number(value) or not math.isfinite(value):
            raise OutOfDomain(self.describe())
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise OutOfDomain(self.describe())
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise OutOfDomain(self.describe())
        return float(value)


@dataclass(frozen=True)
class Flag:
    """true or false."""

    def describe(self) -> str:
        return "true or false"

    def check(self, value: Any) -> bool:
        """``value`` if it is a bool, else :class:`OutOfDomain`."""
        if not isinstance(value, bool):
            raise OutOfDomain(self.describe())
        return value


@dataclass(frozen=True)
class Text:
    """A string, non-blank unless ``blank``."""

    blank: bool = False

    def describe(self) -> str:
        return "text" if self.blank else "non-empty text"

    def check(self, value: Any) -> str:
        """``value`` if it is such a string, else :class:`OutOfDomain`."""
        if not isinstance(value, str) or not (self.blank or value.strip()):
            raise OutOfDomain(self.describe())
        return value


@dataclass(frozen=True)
class Choice:
    """One of ``values``."""

    values: tuple[Any, ...]

    def describe(self) -> str:
        return f"one of {', '.join(map(str, self.values))}"

    def check(self, value: Any) -> Any:
        """``value`` if it is one of the choices (``1`` is not ``True``), else :class:`OutOfDomain`."""
        if not any(type(value) is type(v) and value == v for v in self.values):
            texts = [v for v in self.values if isinstance(v, str)]
            close = difflib.get_close_matches(value, texts, n=1) if isinstance(value, str) else []
            raise OutOfDomain(self.describe() + (f" (did you mean {close[0]!r}?)" if close else ""))
        return value


@dataclass(frozen=True)
class ListOf:
    """A list of ``item`` values: exactly ``length`` of them, else at least ``min_len``; ``distinct``: no repeats."""

    item: Any
    length: int | None = None
    min_len: int = 0
    distinct: bool = False

    def describe(self) -> str:
        size = (f"a list of exactly {self.length}" if self.length is not None else
                "a non-empty list of" if self.min_len == 1 else
                f"a list of at least {self.min_len}" if self.min_len else "a list of")
        return f"{size}{' distinct' if self.distinct else ''} items, each {self.item.describe()}"

    def check(self, value: Any) -> list:
        """``value`` with each item checked, else :class:`OutOfDomain`."""
        if not isinstance(value, list) or (len(value) != self.length if self.length is not None
                                           else len(value) < self.min_len):
            raise OutOfDomain(self.describe())
        try:
            items = [self.item.check(v) for v in value]
        except OutOfDomain:
            raise OutOfDomain(self.describe()) from None
        if self.distinct and len(set(map(repr, items))) != len(items):
            raise OutOfDomain(self.describe())
        return items


@dataclass(frozen=True)
class MapOf:
    """A non-empty mapping of non-blank text keys (class names) to ``value`` values."""

    value: Any

    def describe(self) -> str:
        return f"a non-empty mapping of class names to {self.value.describe()}"

    def check(self, value: Any) -> dict:
        """``value`` with each entry checked, else :class:`OutOfDomain`."""
        if not isinstance(value, dict) or not value or not all(isinstance(k, str) and k.strip() for k in value):
            raise OutOfDomain(self.describe())
        try:
            return {k: self.value.check(v) for k, v in value.items()}
        except OutOfDomain:
            raise OutOfDomain(self.describe()) from None


@dataclass(frozen=True)
class Channels:
    """An image normalisation value: one finite number, or a list of three (R, G, B); ``positive``: > 0."""

    positive: bool = False

    def describe(self) -> str:
        what = "positive" if self.positive else "finite"
        return f"a {what} number or a list of three {what} numbers (R, G, B)"

    def check(self, value: Any) -> float | list[float]:
        """``value`` as a float or a list of three floats, else :class:`OutOfDomain`."""
        item = Real(0.0, low_open=True) if self.positive else Real()
        try:
            if isinstance(value, list):
                return ListOf(item, length=3).check(value)
            return item.check(value)
        except OutOfDomain:
            raise OutOfDomain(self.describe()) from None


@dataclass(frozen=True)
class CountOrAuto:
    """An integer >= 1, or ``auto`` (an inference batch size chosen to fill the device)."""

    def describe(self) -> str:
        return "an integer >= 1 or 'auto'"

    def check(self, value: Any) -> int | str:
        """``value`` if it is such an integer or ``auto``, else :class:`OutOfDomain`."""
        if value == "auto":
            return value
        try:
            return Int(1).check(value)
        except OutOfDomain:
            raise OutOfDomain(self.describe()) from None


PROBABILITY = Real(0.0, 1.0)
POSITIVE = Real(0.0, low_open=True)
NON_NEGATIVE = Real(0.0)
COUNT = Int(1)
CLASSES = ListOf(Text(), min_len=1, distinct=True)

# Option name -> domain, for every protocol that has the option (unless PROTOCOL_DOMAINS says otherwise).
DOMAINS: dict[str, Any] = {
    # sizes and counts
    "batch_size": COUNT, "batch_size_1pct": COUNT, "max_epochs": COUNT,
    # inference batches: memory and speed only (vlpbench.protocols.batch_fill)
    "feature_batch_size": CountOrAuto(), "eval_batch_size": CountOrAuto(),
    "patience": COUNT,  # epochs without improvement before stopping; 0 would stop after the first epoch
    "bootstrap_resamples": COUNT, "image_size": COUNT, "resize_size": COUNT, "eval_size": COUNT,
    "threshold_grid": COUNT, "max_detections": COUNT,
    "neck_width": Int(4, multiple=4),  # the YOLO neck splits its width in quarters
    # optimisation
    "lr": NON_NEGATIVE, "lr_1pct": NON_NEGATIVE,  # 0: the head stays as initialised
    "weight_decay": NON_NEGATIVE,
    "betas": ListOf(Real(0.0, 1.0, high_open=True), length=2),  # AdamW's (beta1, beta2), each in [0, 1)
    "focal_weight": NON_NEGATIVE, "focal_gamma": NON_NEGATIVE, "box_weight": NON_NEGATIVE,
    "noobj_weight": NON_NEGATIVE, "feature_cache_gb": NON_NEGATIVE,  # 0: frozen detection features go to a float16 file
    # thresholds on probabilities / IoUs
    "threshold": PROBABILITY, "conf_threshold": PROBABILITY, "nms_threshold": PROBABILITY,
    "ignore_threshold": PROBABILITY,
    # image normalisation
    "mean": Channels(), "std": Channels(positive=True),
    # switches
    **dict.fromkeys(("upsample_299", "center_crop", "augment", "balance_negatives", "freeze_bn", "init_decoder",
                     "train_encoder", "decay_bias_and_norm"), Flag()),
    # labels and prompts
    "classes": CLASSES,
    "label_kind": Choice(("binary", "multilabel", "multiclass")),
    "label_policy": Choice(("mgca", "ones", "zeros", "ignore")),
    "prompts": MapOf(Text()),
    "prompt": Text(),
    "class_prompts": Choice(("plain", "chexzero", "kad")),
    "templates": ListOf(Text(), length=2),  # (positive, negative), each with one {} for the class prompt
    "prompt_grid": MapOf(ListOf(ListOf(Text(blank=True), min_len=1), min_len=1)),
    # zero-shot thresholds and metrics
    "metrics": ListOf(Choice(("auc", "f1", "acc", "mcc")), min_len=1, distinct=True),
    "threshold_source": Choice(("val", "test_oracle")),
    "threshold_images": Choice(("split_val", "chexpert_valid")),
    "threshold_criterion": Choice(("f1", "mcc")),
    "threshold_ties": Choice(("highest", "lowest")),
    "acc_rule": Choice(("ge", "gt")),
    # linear probe and fine-tuning
    "linear_mode": Choice(("cached", "mgca")),
    "head_solver": Choice(("sgd", "lbfgs")),
    "train_transform": Choice(("crop", "moco2")),
    "resize": Choice(("square", "pad")),
    "select_on": Choice(("auc", "loss")),
    # detection
    "val_metric": Choice(("map", "map_mgca")),
    "anchor_iou": Choice(("plain", "mgca")),
    "noobj_assigned": Choice(("exclude", "mgca")),
    "nms": Choice(("torchvision", "mgca")),
    "input_resize": Choice(("antialias", "linear")),
    "polygon_rule": Choice(("bounds", "mgca")),
    "box_fusion": Choice(("wbf", "none")),
    # segmentation
    "dice_resolution": Choice(("native", "input")),
    "dice_average": Choice(("image", "batch")),
    "pipeline": Choice(("cached", "mgca")),
    "augment_mask": Choice(("bilinear", "nearest")),
    "train_subset": Choice(("split", "mgca")),
    "decoder": Choice(("smp", "medklip")),
    "loss": Choice(("mixed", "dice_bce")),
    "augmentation": Choice(("shift_scale_rotate", "crop_flip")),
    # grounding
    "queries": Choice(("class", "phrases", "pathologies")),
    "threshold_search": Choice(("quantiles", "per_pathology")),
    "threshold_values": ListOf(Real(0.0, 1.0, high_open=True), min_len=1),  # cuts of min-max normalised maps
    "upsample": Choice(("bilinear", "nearest")),
    "eval_resolution": Choice(("fixed", "native")),
    "normalize": Choice(("minmax", "none")),
    "image_read": Choice(("cache", "medklip")),
    # retrieval
    "candidates": Choice(("class_prompts", "reports", "class_reports")),
    "text_section": Choice(("findings", "impression", "longer", "findings_impression")),
    "images_per_study": Choice(("all", "first")),
    "views": ListOf(Text(), min_len=1, distinct=True),  # ViewPosition values such as PA, AP
    "directions": ListOf(Choice(("i2t", "t2i")), min_len=1, distinct=True),
    "recall_at": ListOf(Choice((1, 5, 10)), distinct=True),  # the cut-offs with a registered metric
    "precision_at": ListOf(Choice((1, 5, 10, 50, 100)), distinct=True),
    "per_image_metric": Text(),  # which i2t metric: the protocol checks it is among those computed
}

# Protocol -> {option name -> domain} where the name means something else in that protocol.
PROTOCOL_DOMAINS: dict[str, dict[str, Any]] = {
    "grounding": {
        "threshold_source": Choice(("val", "fixed")),
        # a cut of heat-map values: in [0, 1] after normalize=minmax, raw values (any sign) with normalize=none
        "threshold": Real(),
        "batch_size": CountOrAuto(),  # an inference batch, as zero_shot's below
    },
    # detection normalises the grey image once, before it is repeated to three channels
    "detection": {"mean": Real(), "std": POSITIVE},
    # nothing trains: their batch is an inference batch, "auto" fills the device (vlpbench.protocols.batch_fill)
    "zero_shot": {"batch_size": CountOrAuto()},
    "retrieval": {"batch_size": CountOrAuto()},
}


def domain_of(protocol: str, key: str) -> Any | None:
    """The domain of option ``key`` in tasks of ``protocol``, or None where none is declared."""
    return PROTOCOL_DOMAINS.get(protocol, {}).get(key, DOMAINS.get(key))


def check_option(protocol: str, key: str, value: Any) -> Any:
    """``value`` as option ``key`` of a ``protocol`` task takes it (an int stands for a float).

    Raises:
        KeyError: no domain is declared for ``key``.
        OutOfDomain: ``value`` is outside it; the message says what was expected.
    """
    domain = domain_of(protocol, key)
    if domain is None:
        raise KeyError(key)
    return domain.check(value)
