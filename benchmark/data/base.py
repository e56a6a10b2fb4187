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
from collections.abc import Sequence
from pathlib import Path

import numpy as np


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
