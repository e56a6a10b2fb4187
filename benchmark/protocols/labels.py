"""Task labels read through each dataset reader's own methods.

A classification task names its classes (``config["classes"]``, in the dataset's own spelling) and
how they combine (``config["label_kind"]``):

* ``binary``: one class; labels ``(N, 1)`` int.
* ``multilabel``: any number of classes present at once; labels ``(N, C)`` int.
* ``multiclass``: exactly one class per image; labels ``(N,)`` int, the index into ``classes``.

Every reader gives its labels through one method, :meth:`vlpbench.data.base.DatasetReader.class_labels`
(the image's 0/1 value of each requested class; the reader checks the class names). CheXpert's uncertain
labels go through ``config["label_policy"]`` there (with ``ignore`` a value may be -1).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from vlpbench.data.base import DatasetReader
from vlpbench.errors import ConfigError, DataError

LABEL_KINDS = ("binary", "multilabel", "multiclass")


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


def dataset_classes(source) -> tuple[str, ...]:
    """The class names ``source``'s dataset has (:attr:`vlpbench.data.base.DatasetReader.classes`)."""
    return tuple(source.classes)


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
    if not isinstance(source, DatasetReader):
        raise ConfigError(f"no classification labels for dataset reader {type(source).__name__}: it is not a "
                          "vlpbench.data.base.DatasetReader")
    if kind == "binary" and len(classes) != 1:
        raise ConfigError(f"label_kind binary takes one class, got {len(classes)}: {', '.join(classes)}")
    values = np.array([source.class_labels(image_id, classes, config) for image_id in ids],
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
