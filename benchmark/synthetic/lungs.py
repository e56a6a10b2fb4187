"""Real lung masks (v7labs, shipped in torchxrayvision) used to give synthetic images real anatomy."""

from __future__ import annotations

import functools
import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlpbench.data.xrv_files import LUNG_MASKS, xrv_data_file
from vlpbench.errors import DataError

# Lookup table that binarises a mode-L image inside Pillow: the masks are PNGs (whatever their
# extension), about 50 of them with grey values besides 0 and 255.
_BINARISE = [0] * 128 + [255] * 128


def _decode(data: bytes, size: int) -> np.ndarray | None:
    """One archive entry as a uint8 0/1 mask of size x size; None if it is not an image."""
    try:
        image = Image.open(io.BytesIO(data)).convert("L")
    except UnidentifiedImageError:
        return None
    resized = image.point(_BINARISE).resize((size, size), Image.BILINEAR)
    return (np.asarray(resized) > 127).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _lung_masks(size: int) -> tuple[np.ndarray, ...]:
    path = xrv_data_file(LUNG_MASKS)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [archive.read(entry) for entry in archive.infolist() if not entry.is_dir()]
        # The masks are large PNGs (up to 5623 x 4757); Pillow decodes without the GIL, so
        # threads cut the one-off cost (about 4 s on one core).
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            decoded = list(pool.map(functools.partial(_decode, size=size), entries))
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read the lung mask archive ({type(exc).__name__}: {exc})") from exc
    # About 80 entries are blank (images that were never annotated): skip them too.
    masks = tuple(mask for mask in decoded if mask is not None and mask.any())
    if not masks:
        raise DataError(f"{path}: no lung mask images found in the archive")
    for mask in masks:
        mask.setflags(write=False)
    return masks


def load_lung_masks(size: int) -> list[np.ndarray]:
    """Return the real lung masks of torchxrayvision's v7labs archive at ``size`` x ``size``.

    Each mask is uint8 0/1 (both lungs, as drawn on a real chest X-ray), decoded with Pillow,
    binarised and resized (the aspect ratio of the source image is not kept). Archive entries
    that are not images, and blank masks, are skipped. Decoding happens once per process and size;
    the arrays are shared and read-only.

    Raises:
        DataError: torchxrayvision or its archive is missing or unreadable.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    return list(_lung_masks(size))
