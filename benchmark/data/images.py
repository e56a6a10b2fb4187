"""Reading PNG and JPEG chest X-rays as 8-bit greyscale, with errors that name the file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlpbench.data.dicom import scale_to_uint8
from vlpbench.errors import DataError


def read_image(path: str | Path) -> np.ndarray:
    """Decode a PNG/JPEG file into uint8 (H, W).

    Colour and alpha images (some NIH PNGs are RGBA, some COVIDx files RGB) are converted to
    luminance; 16-bit greyscale is scaled to 8 bits by its maximum, as DICOMs are. A missing,
    truncated or undecodable file raises DataError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                    return scale_to_uint8(np.asarray(image))
                return np.array(image.convert("L"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc
