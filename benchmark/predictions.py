"""Predictions of a run saved in the formats ``vlpbench score`` reads (``vlpbench run --save-predictions DIR``).

- Segmentation: one ``<image_id>.png`` per test image, 0 or 255, at the image's native resolution and
  thresholded as the protocol scores (a pixel is positive when its probability is strictly above the
  task's ``threshold``). ``vlpbench score`` on the folder reproduces the run's Dice when the task scores
  at native resolution (``dice_resolution: native``, the default); with ``input`` the run's Dice was
  measured on resized masks, and the saved native masks give the native-resolution Dice instead.
- Grounding: ``heatmaps.npz`` in the folder, holding the raw heat map (the model's own resolution) of
  every validation and test query, keyed as ``score`` expects (``<image_id>``, or
  ``<image_id>#<phrase index>`` for MS-CXR). With the validation maps present, ``score`` chooses the
  threshold on them as the run did, so it reproduces the run's metrics.

A protocol saves predictions when it takes a ``predictions`` keyword (the folder, or None); ``api.run``
passes one only to protocols that declare it (:func:`saves_predictions`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlpbench.errors import ConfigError

HEATMAPS_FILE = "heatmaps.npz"


def saves_predictions(protocol: Callable[..., Any]) -> bool:
    """Whether a protocol callable accepts the ``predictions`` keyword."""
    return "predictions" in inspect.signature(protocol).parameters


def prepare_folder(folder: str | Path, protocol: Callable[..., Any], protocol_name: str) -> Path:
    """Check that ``protocol`` can save predictions and create ``folder`` (new or empty); its absolute path.

    Called before any work starts, so a run that could not save what was asked for never trains.

    Raises:
        ConfigError: the protocol saves no predictions, or ``folder`` is a file or a non-empty folder.
    """
    folder = Path(folder).expanduser().absolute()
    if not saves_predictions(protocol):
        raise ConfigError(f"--save-predictions: protocol {protocol_name!r} saves no predictions "
                          "(segmentation and grounding tasks do)")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"--save-predictions {folder}: expected a new or empty folder, so that files of "
                          "another run are never mixed in")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_mask(folder: Path, image_id: str, probabilities: torch.Tensor, shape: tuple[int, int],
               threshold: float) -> Path:
    """Save one image's prediction as ``<folder>/<image_id>.png`` (0/255) at ``shape``.

    ``probabilities`` is a 2-D map (any device); when it is not already at ``shape`` it is resized
    bilinearly, as the segmentation protocol does before scoring.
    """
    probs = probabilities.detach().float()
    if tuple(probs.shape) != tuple(shape):
        probs = F.interpolate(probs[None, None], size=tuple(shape), mode="bilinear", align_corners=False)[0, 0]
    pixels = np.where((probs > threshold).cpu().numpy(), 255, 0).astype(np.uint8)
    path = folder / f"{image_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)  # ids with "/" (file paths) become sub-folders
    Image.fromarray(pixels, mode="L").save(path)
    return path


def write_heatmaps(folder: Path, maps: Mapping[str, Any]) -> Path:
    """Save ``{query key: 2-D heat map}`` as ``<folder>/heatmaps.npz`` (float32, uncompressed); its path."""
    arrays = {key: np.asarray(torch.as_tensor(value).detach().cpu(), dtype=np.float32) for key, value in maps.items()}
    path = folder / HEATMAPS_FILE
    np.savez(path, **arrays)
    return path
