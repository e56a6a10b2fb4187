"""Resize rules for uint8 grey images, one per reference pipeline: what the image cache stores.

``antialias``  Pillow's BILINEAR, which widens its support when shrinking (an area-aware bilinear):
               vlpbench's canonical resize.
``linear``     OpenCV's ``INTER_LINEAR`` (half-pixel centres, two taps, no antialiasing), as
               albumentations' ``Resize`` and ``cv2.resize`` do in MGCA's segmentation and detection
               pipelines (HKU-MedAI/MGCA mgca/datasets/segmentation_dataset.py:150-156,
               mgca/datasets/detection_dataset.py:65-72). Shrinking 1024 px to 224 this way
               point-samples: thin structures alias, as they did in the published runs.
``pad_area``   MGCA's ``resize_img``: the longer side to ``size`` with OpenCV's ``INTER_AREA``, the
               shorter side ``int(side * size / longer)``, then zero padding split floor/ceil around
               the image (HKU-MedAI/MGCA mgca/datasets/utils.py:28-74). The aspect ratio is kept.

OpenCV computes in fixed point for uint8 input; these float implementations agree with it to one grey
level (tests/data/test_resize.py checks them against opencv-python-headless). OpenCV itself is not a
dependency.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

from vlpbench.errors import ConfigError


def resize_antialias(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 image → ``size``² with Pillow's antialiased bilinear filter."""
    return np.array(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))


def _linear_weights(in_size: int, out_size: int) -> np.ndarray:
    """``(out, in)`` interpolation matrix of OpenCV's INTER_LINEAR along one axis."""
    scale = in_size / out_size
    source = (np.arange(out_size) + 0.5) * scale - 0.5
    low = np.floor(source)
    frac = source - low
    low = low.astype(np.int64)
    # OpenCV clamps the taps at the borders (replicate), which is what clipping the indices does.
    left = np.clip(low, 0, in_size - 1)
    right = np.clip(low + 1, 0, in_size - 1)
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(weights, (rows, left), 1.0 - frac)
    np.add.at(weights, (rows, right), frac)
    return weights


def _area_weights(in_size: int, out_size: int) -> np.ndarray:
    """``(out, in)`` matrix of OpenCV's INTER_AREA along one axis.

    Shrinking: each output pixel is the mean of the input it covers, fractional overlaps weighted.
    Enlarging: OpenCV's area variant of linear interpolation, whose weight jumps only where an input
    pixel's edge falls inside the output pixel (imgproc resize.cpp, the INTER_AREA branch for scale < 1).
    """
    weights = np.zeros((out_size, in_size))
    scale = in_size / out_size
    if scale >= 1.0:
        edges = np.arange(out_size + 1) * scale
        for out in range(out_size):
            start, stop = edges[out], edges[out + 1]
            first, last = int(math.floor(start)), min(int(math.ceil(stop)), in_size)
            for src in range(first, last):
                overlap = min(stop, src + 1) - max(start, src)
                if overlap > 0:
                    weights[out, src] = overlap / scale
        return weights
    inverse = out_size / in_size
    for out in range(out_size):
        src = int(math.floor(out * scale))
        frac = (out + 1) - (src + 1) * inverse
        frac = 0.0 if frac <= 0 else frac - math.floor(frac)
        if src >= in_size - 1:
            src, frac = in_size - 1, 0.0
        weights[out, src] += 1.0 - frac
        if frac:
            weights[out, src + 1] += frac
    return weights


def _separable(pixels: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = rows @ pixels.astype(np.float64) @ cols.T
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_linear(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 image → ``size``² (or ``(height, width)``) as ``cv2.resize(..., INTER_LINEAR)`` does."""
    height, width = (size, size) if isinstance(size, int) else size
    return _separable(pixels, _linear_weights(pixels.shape[0], height), _linear_weights(pixels.shape[1], width))


def resize_area(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 image → ``(height, width)`` as ``cv2.resize(..., INTER_AREA)`` does."""
    return _separable(pixels, _area_weights(pixels.shape[0], height), _area_weights(pixels.shape[1], width))


def resize_pad_area(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 image → ``size``² as MGCA's ``resize_img``: aspect kept (INTER_AREA), zero padding."""
    height, width = pixels.shape
    if height >= width:  # MGCA takes the first maximal dimension, so a square image counts as "taller"
        new_h, new_w = size, int(float(width) * (size / float(height)))
    else:
        new_h, new_w = int(float(height) * (size / float(width))), size
    resized = resize_area(pixels, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    return np.pad(resized, [(pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)])


RESIZE_METHODS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "antialias": resize_antialias,
    "linear": resize_linear,
    "pad_area": resize_pad_area,
}


def resize_method(name: str, option: str = "resize") -> Callable[[np.ndarray, int], np.ndarray]:
    """The resize function called ``name``; a ConfigError naming ``option`` and the choices otherwise."""
    try:
        return RESIZE_METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"{option}={name!r}: expected one of {', '.join(RESIZE_METHODS)}") from None
