"""The interface every dataset reader implements, so that protocols, ``score`` and ``data check`` treat all
datasets alike.

A reader opens a dataset folder in the format its download unpacks to. Constructing one reads the label
files and lists the image files; it decodes no image. Images are decoded one at a time by :meth:`image`
(and cached by :mod:`vlpbench.data.cache`); everything ``score`` needs (labels, masks, boxes) comes from the
label files, so ``score`` works on a folder that holds only those: it asks :meth:`unlabelled`, never
:meth:`missing`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpbench.errors import ConfigError


class DatasetReader(ABC):
    """A dataset folder: its image ids and labels, and its images on demand.

    Attributes:
        root: the folder the reader was opened on.
    """

    root: Path

    @property
    @abstractmethod
    def image_ids(self) -> list[str]:
        """Every image id of the label file(s), in file order."""

    @property
    @abstractmethod
    def synthetic(self) -> bool:
        """True for a folder written by ``vlpbench synth`` (its marker file is present)."""

    @abstractmethod
    def image(self, image_id: str) -> np.ndarray:
        """The decoded image, uint8 (H, W)."""

    @abstractmethod
    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` that have no row in the label file(s), in order (images are not looked at)."""

    @abstractmethod
    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` that lack a label row or an image file, in order."""

    @property
    def classes(self) -> tuple[str, ...]:
        """The classification labels the dataset has, in its own spelling (none by default)."""
        return ()

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping[str, Any]) -> list[int]:
        """One int per class of ``classes``, in that order: 1 present, 0 absent (-1 where a task's label
        policy keeps a label uncertain). ``config`` is the task's, for options such as CheXpert's
        ``label_policy``. Every classification task reads its labels through this one method.

        Raises:
            ConfigError: the dataset has no classification labels, or a class it does not have.
        """
        raise ConfigError(f"no classification labels for dataset reader {type(self).__name__}")

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """The per-image attributes the dataset's files can carry, of ``sex``, ``age``, ``view``, ``site``
        (:mod:`vlpbench.data.attributes`); none by default."""
        return ()

    def attributes(self, image_id: str) -> dict[str, Any]:
        """The image's attributes among :attr:`attribute_names`, normalised by :mod:`vlpbench.data.attributes`
        (``unknown`` where the file leaves one empty); an attribute the image's files cannot carry (an RSNA
        JPEG has no header) is absent. Read from label files and image headers, never from pixels.

        Raises:
            DataError: a value in no accepted form, naming the file (and line).
        """
        return {}

    def geometry_problems(self, image_id: str, height: int, width: int) -> list[str]:
        """What is wrong with the image's label geometry (boxes, outlines) on its decoded ``height`` x ``width``
        pixels, one line per label row naming its file and line (``box_problem``); none for readers without
        geometry. ``vlpbench data check`` asks this of every image it decodes."""
        return []


def box_problem(x1: float, y1: float, x2: float, y2: float, height: int, width: int) -> str | None:
    """Why the pixel box ``[x1, x2] x [y1, y2]`` is not a box on a ``width`` x ``height`` image (no area, or a part
    outside it), or None. A run clips such a box silently, so data check names it."""
    box = f"box x {x1:g}..{x2:g}, y {y1:g}..{y2:g}"
    if x2 <= x1 or y2 <= y1:
        return f"{box} has no area; expected a positive width and height"
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        return f"{box} reaches outside the {width}x{height} image"
    return None


def check_classes(reader: DatasetReader, classes: Sequence[str]) -> None:
    """ConfigError naming the classes of ``classes`` that ``reader``'s dataset does not have, and its classes."""
    unknown = [c for c in classes if c not in reader.classes]
    if unknown:
        raise ConfigError(f"class(es) {', '.join(map(repr, unknown))} not in dataset reader {type(reader).__name__}; "
                          f"its classes: {', '.join(reader.classes)}")
