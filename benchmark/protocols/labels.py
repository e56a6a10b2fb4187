"""Task labels read through each dataset reader's own methods.

A classification task names its classes (``config["classes"]``, in the dataset's own spelling) and
how they combine (``config["label_kind"]``):

* ``binary``: one class; labels ``(N, 1)`` int.
* ``multilabel``: any number of classes present at once; labels ``(N, C)`` int.
* ``multiclass``: exactly one class per image; labels ``(N,)`` int, the index into ``classes``.

Each reader type has one entry in :data:`READERS`: the class names the dataset has, and the image's
0/1 value of each requested class. CheXpert's uncertain labels go through ``config["label_policy"]``
(:func:`vlpbench.data.chexpert.apply_policy`; with ``ignore`` a value may be -1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from vlpbench.data import chexpert, covidx, cxr14, rsna, siim
from vlpbench.data.splits import SIIM_LABEL
from vlpbench.errors import ConfigError, DataError

LABEL_KINDS = ("binary", "multilabel", "multiclass")


@dataclass(frozen=True)
class LabelReader:
    """How labels are read from one reader type.

    Attributes:
        classes: ``source -> the dataset's class names``.
        values: ``(source, image_id, classes, config) -> one int per class`` (0/1; -1 under a CheXpert
            ``ignore`` policy).
    """

    classes: Callable[[Any], Sequence[str]]
    values: Callable[[Any, str, Sequence[str], dict[str, Any]], list[int]]


def _single(name: str) -> LabelReader:
    """A dataset with one binary label read by ``source.label(id)`` (RSNA pneumonia, SIIM pneumothorax)."""
    return LabelReader(classes=lambda source: (name,),
                       values=lambda source, image_id, classes, config: [source.label(image_id)])


def _chexpert_values(source, image_id: str, classes: Sequence[str], config: dict[str, Any]) -> list[int]:
    policy = config.get("label_policy")
    if policy is None:
        raise ConfigError(f"CheXpert labels need config key label_policy (one of {', '.join(chexpert.POLICIES)})")
    try:
        labels = source.labels(image_id, classes, policy)
    except ValueError as e:  # an unknown policy, or 'mgca' with a class it has no mapping for
        raise ConfigError(f"label_policy={policy!r}: {e}") from e
    return [labels[c] for c in classes]


def _covidx_values(source, image_id: str, classes: Sequence[str], config: dict[str, Any]) -> list[int]:
    name = source.classes[source.label(image_id)]
    return [int(name == c) for c in classes]


READERS: dict[type, LabelReader] = {
    rsna.RsnaSource: _single(rsna.SPLIT_LABEL),
    siim.SiimSource: _single(SIIM_LABEL),
    chexpert.ChexpertSource: LabelReader(classes=lambda source: chexpert.OBSERVATIONS, values=_chexpert_values),
    chexpert.ChexpertTestSet: LabelReader(
        classes=lambda source: chexpert.OBSERVATIONS,
        values=lambda source, image_id, classes, config: list(source.labels(image_id, classes).values())),
    cxr14.Cxr14Source: LabelReader(
        classes=lambda source: cxr14.LABELS,
        values=lambda source, image_id, classes, config: [source.labels(image_id)[c] for c in classes]),
    covidx.CovidxSource: LabelReader(classes=lambda source: source.classes, values=_covidx_values),
}


def class_names(config: dict[str, Any]) -> list[str]:
    """The task's classes (``config["classes"]``), checked to be a non-empty list of distinct strings."""
    classes = config.get("classes")
    if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise ConfigError(f"config key classes must be a non-empty list of distinct class names, got {classes!r}")
    return list(classes)


def label_kind(config: dict[str, Any]) -> str:
    """``config["label_kind"]``, checked against :data:`LABEL_KINDS`."""
    kind = config.get("label_kind")
    if kind not in LABEL_KINDS:
        raise ConfigError(f"config key label_kind is {kind!r}; expected one of {', '.join(LABEL_KINDS)}")
    return kind


def class_slug(name: str) -> str:
    """A class name as part of a metric name: ``Pleural Effusion`` → ``pleural_effusion``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def label_reader(source) -> LabelReader:
    """The :class:`LabelReader` of ``source``'s type; ConfigError for a reader without labels here."""
    for kind, reader in READERS.items():
        if isinstance(source, kind):
            return reader
    known = ", ".join(kind.__name__ for kind in READERS)
    raise ConfigError(f"no classification labels for dataset reader {type(source).__name__}; "
                      f"classification tasks read {known}")


def dataset_classes(source) -> tuple[str, ...]:
    """The class names ``source``'s dataset has."""
    return tuple(label_reader(source).classes(source))


def task_labels(source, ids: Sequence[str], config: dict[str, Any]) -> np.ndarray:
    """Labels of ``ids`` for the task: ``(N, 1)`` (binary), ``(N, C)`` (multilabel) or ``(N,)``
    (multiclass class indices into ``config["classes"]``), int64.

    Raises:
        ConfigError: a bad ``label_kind`` or ``classes``, a class the dataset does not have (the
            message lists the dataset's classes), a binary task with several classes, or a CheXpert
            task without a valid ``label_policy``.
        DataError: an id the dataset lacks, or, for a multiclass task, an image with no class or
            several of ``classes`` positive.
    """
    kind = label_kind(config)
    classes = class_names(config)
    reader = label_reader(source)
    known = tuple(reader.classes(source))
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise ConfigError(f"class(es) {', '.join(map(repr, unknown))} not in dataset reader "
                          f"{type(source).__name__}; its classes: {', '.join(known)}")
    if kind == "binary" and len(classes) != 1:
        raise ConfigError(f"label_kind binary takes one class, got {len(classes)}: {', '.join(classes)}")
    values = np.array([reader.values(source, image_id, classes, config) for image_id in ids],
                      dtype=np.int64).reshape(len(ids), len(classes))
    if kind != "multiclass":
        return values
    counts = (values == 1).sum(axis=1)
    if (bad := np.flatnonzero((counts != 1) | ((values != 0) & (values != 1)).any(axis=1))).size:
        image_id = ids[int(bad[0])]
        raise DataError(f"label_kind multiclass needs exactly one of {', '.join(classes)} per image; "
                        f"image {image_id} has {dict(zip(classes, values[bad[0]].tolist()))} "
                        f"({bad.size} such images)")
    return values.argmax(axis=1)
