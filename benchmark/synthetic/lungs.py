"""Real lung masks (v7labs, shipped in torchxrayvision) used to give synthetic images real anatomy."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from vlpbench.config import cache_dir
from vlpbench.data.xrv_files import LUNG_MASKS, xrv_data_file
from vlpbench.errors import DataError

log = logging.getLogger("vlpbench")

# Part of the cache file's name: raise it whenever _decode changes what it makes of an entry, so that
# masks decoded the old way are never read back.
CACHE_FORMAT = 1

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


def cache_file(archive: bytes, size: int) -> Path:
    """Where the masks decoded from ``archive`` at ``size`` are kept: under ``cache_dir()/lungs``, named by
    the archive's sha256, the size, the Pillow version (its resize makes the masks) and :data:`CACHE_FORMAT`."""
    digest = hashlib.sha256(archive).hexdigest()[:16]
    return cache_dir() / "lungs" / f"{digest}-{size}px-pillow{PIL.__version__}-v{CACHE_FORMAT}.npy"


def _read_cache(path: Path, size: int) -> tuple[np.ndarray, ...] | None:
    """The masks kept at ``path`` (bit-packed, one row each), or None if there are none or they are unreadable."""
    try:
        packed = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if packed.dtype != np.uint8 or packed.ndim != 2 or len(packed) == 0 or packed.shape[1] != -(-size * size // 8):
        return None
    masks = np.unpackbits(packed, axis=1, count=size * size).reshape(len(packed), size, size)
    return tuple(masks)


def _write_cache(path: Path, masks: tuple[np.ndarray, ...]) -> None:
    """Keep ``masks`` at ``path`` for later processes; written whole or not at all, since processes share it."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            temporary = Path(handle.name)
            np.save(handle, np.stack([np.packbits(mask) for mask in masks]))
        os.replace(temporary, path)
    except OSError as exc:
        # The masks are already decoded: a cache that cannot be written only costs the next process time.
        log.warning("cannot keep the decoded lung masks at %s (%s: %s)", path, type(exc).__name__, exc)
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def _decode_archive(path: Path, archive: bytes, size: int) -> tuple[np.ndarray, ...]:
    """Every non-blank image of the zip ``archive`` (read from ``path``) as a 0/1 mask at ``size``."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as opened:
            entries = [opened.read(entry) for entry in opened.infolist() if not entry.is_dir()]
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
    return masks


def read_lung_masks(path: Path, size: int) -> tuple[np.ndarray, ...]:
    """The masks of the archive at ``path`` at ``size``: from the cache file if one is kept for this archive,
    else decoded and kept. Read-only arrays."""
    try:
        archive = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the lung mask archive ({type(exc).__name__}: {exc})") from exc
    kept = cache_file(archive, size)
    masks = _read_cache(kept, size)
    if masks is None:
        masks = _decode_archive(path, archive, size)
        _write_cache(kept, masks)
    for mask in masks:
        mask.setflags(write=False)
    return masks


@functools.lru_cache(maxsize=None)
def _lung_masks(size: int) -> tuple[np.ndarray, ...]:
    return read_lung_masks(xrv_data_file(LUNG_MASKS), size)


def load_lung_masks(size: int) -> list[np.ndarray]:
    """Return the real lung masks of torchxrayvision's v7labs archive at ``size`` x ``size``.

    Each mask is uint8 0/1 (both lungs, as drawn on a real chest X-ray), decoded with Pillow,
    binarised and resized (the aspect ratio of the source image is not kept). Archive entries
    that are not images, and blank masks, are skipped. Decoding happens once per archive, size and
    Pillow version: the masks are kept under ``cache_dir()/lungs`` for later processes, and once per
    process the arrays are shared and read-only.

    Raises:
        DataError: torchxrayvision or its archive is missing or unreadable.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    return list(_lung_masks(size))
