"""Score predictions made by any framework with vlpbench's canonical metrics and splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlpbench.errors import DataError
from vlpbench.metrics.bootstrap import bootstrap_ci
from vlpbench.metrics.dice import dice_per_image


def read_prediction_mask(path: Path, shape: tuple[int, int]) -> torch.Tensor:
    """A prediction as probabilities at ``shape``.

    PNG: non-zero is positive, resized with nearest neighbour. NPY: 2-D probabilities in [0, 1],
    resized bilinearly.
    """
    try:
        if path.suffix == ".png":
            mask = torch.from_numpy((np.asarray(Image.open(path).convert("L")) > 0).astype(np.float32))
            mode = "nearest"
        else:
            mask = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
            mode = "bilinear"
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the prediction: {exc}") from exc
    if mask.ndim != 2:
        raise DataError(f"{path}: expected a 2-D mask, got shape {tuple(mask.shape)}")
    if tuple(mask.shape) != tuple(shape):
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        mask = F.interpolate(mask[None, None], size=shape, mode=mode, **kwargs)[0, 0]
    return mask


def find_predictions(folder: Path, ids: list[str]) -> dict[str, Path]:
    """``<image_id>.png`` (or ``.npy``) for every id; an error lists how many are missing."""
    if not folder.is_dir():
        raise DataError(f"predictions folder {folder} does not exist")
    found: dict[str, Path] = {}
    missing = []
    for image_id in ids:
        for suffix in (".png", ".npy"):
            candidate = folder / f"{image_id}{suffix}"
            if candidate.is_file():
                found[image_id] = candidate
                break
        else:
            missing.append(image_id)
    if missing:
        raise DataError(f"{folder}: {len(missing)} of {len(ids)} split images have no prediction "
                        f"(<image_id>.png or .npy), e.g. {', '.join(missing[:3])}")
    return found


def score_segmentation(folder: Path, source, ids: list[str], config: dict[str, Any], *,
                       val_ids: list[str] | None = None, bootstrap_resamples: int = 1000) -> dict[str, Any]:
    """Per-image Dice of each prediction against the full-resolution ground truth of ``ids``, at the task's
    ``threshold``."""
    threshold = config["threshold"]
    found = find_predictions(folder, ids)
    scores = np.empty(len(ids))
    for index, image_id in enumerate(ids):
        truth = source.mask(image_id)
        prediction = read_prediction_mask(found[image_id], truth.shape)
        scores[index] = dice_per_image(prediction[None], torch.from_numpy(truth)[None], threshold)[0]
    return {
        "metrics": {"dice": float(scores.mean())},
        "ci": {"dice": bootstrap_ci(scores, n_resamples=bootstrap_resamples)},
        "n": len(ids),
    }
