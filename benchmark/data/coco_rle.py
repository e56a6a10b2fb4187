"""COCO's compressed RLE string (``{"size": [h, w], "counts": "<string>"}``), decoded and encoded without
pycocotools.

Format (cocodataset/cocoapi common/maskApi.c, ``rleToString`` / ``rleFrString``): the mask is read in
column-major (Fortran) order as alternating runs, zeros first (a mask starting with a one has a first run
of 0). Every run from the third on is stored as its difference from the run two before it. Each number is
written in 5-bit groups, least significant first, as characters ``48 + group``: bit 0x20 says another
group follows, and in the last group bit 0x10 is the sign (the value is negative: sign-extend).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlpbench.errors import DataError


def parse_counts(text: str, where: str) -> np.ndarray:
    """The run lengths (int64) of a compressed RLE string.

    Raises:
        DataError: naming ``where`` for a character outside the format, a number cut off at the end, or a
            negative run length.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text):
                raise DataError(f"{where}: RLE counts string ends inside a number (at character {position})")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise DataError(f"{where}: RLE counts character {text[position]!r} at {position} is outside "
                                "the format's range '0' to 'o'")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value -= 1 << shift  # the sign bit of the last group
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            raise DataError(f"{where}: RLE run {len(counts)} has negative length {value}")
        counts.append(value)
    return np.array(counts, dtype=np.int64)


def check_rle(entry: Any, where: str) -> tuple[tuple[int, int], np.ndarray]:
    """``((h, w), runs)`` of one ``{"size": [h, w], "counts": str}`` entry, checked: positive integer size
    and runs summing to ``h * w``.

    Raises:
        DataError: naming ``where`` and what was expected.
    """
    if not isinstance(entry, dict) or set(entry) != {"size", "counts"}:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise DataError(f"{where}: expected {{'size': [h, w], 'counts': '<COCO RLE string>'}}, found {keys}")
    size, text = entry["size"], entry["counts"]
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise DataError(f"{where}: size {size!r}; expected [h, w], two positive integers")
    if not isinstance(text, str):
        raise DataError(f"{where}: counts is {type(text).__name__}; expected the compressed RLE string")
    runs = parse_counts(text, where)
    height, width = size
    if int(runs.sum()) != height * width:
        raise DataError(f"{where}: RLE runs cover {int(runs.sum())} pixels; size {height}x{width} has {height * width}")
    return (height, width), runs


def runs_to_mask(runs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 0/1 mask of ``shape`` from run lengths (zeros first, column-major), as checked by :func:`check_rle`."""
    values = np.arange(len(runs), dtype=np.int64) % 2
    flat = np.repeat(values.astype(np.uint8), runs)
    return flat.reshape(shape[1], shape[0]).T.copy()


def decode(entry: Any, where: str = "RLE") -> np.ndarray:
    """The uint8 (h, w) mask of a COCO compressed RLE entry (:func:`check_rle` checks it first)."""
    shape, runs = check_rle(entry, where)
    return runs_to_mask(runs, shape)


def encode(mask: Any) -> dict[str, Any]:
    """The COCO compressed RLE entry ``{"size": [h, w], "counts": str}`` of a 2-D mask (non-zero = 1)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode needs a 2-D mask, got shape {mask.shape}")
    flat = (mask.T.ravel() > 0).astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(edges).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]
    chars: list[str] = []
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index > 2 else run
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            chars.append(chr(48 + (group | (0x20 if more else 0))))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}
