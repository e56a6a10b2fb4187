"""Synthetic CheXlocalize: the two ground-truth mask JSONs (COCO compressed RLE) over synthetic CheXpert images.

:func:`synth_chexlocalize` writes the Stanford AIMI download's layout (rajpurkarlab/cheXlocalize README.md:65-79):
``CheXlocalize/gt_segmentations_{val,test}.json`` and ``CheXpert/{val,test}/<patient>/<study>/<view>.jpg``, with the
real patient ranges (val from patient64541, test from patient64741). Each image shows one or two findings drawn
bright (dark for pneumothorax, :func:`vlpbench.synthetic.chest.render`), and a finding's mask is exactly where its
lesion was drawn (``field > 0.5``); every key carries all ten pathologies, the others as all-zero masks, as the
real files do. A few images per part have no finding at all, as CheXlocalize keeps only images with a positive
label but not every positive label has a drawn mask.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlpbench.data.chexlocalize import MASK_FILES, PATHOLOGIES
from vlpbench.data.coco_rle import encode
from vlpbench.synthetic.chest import pick_lung, prepare_output, render, resize_field, write_marker
from vlpbench.synthetic.chest import lungs as lung_masks
from vlpbench.synthetic.ms_cxr import _lesion, _sides

FIRST_PATIENT = {"val": 64541, "test": 64741}
VAL_SHARE = 0.35
EMPTY_SHARE = 0.1  # images whose masks are all empty
DARK = ("Pneumothorax",)
# Each pathology drawn as the MS-CXR synthetic draws its nearest category.
SHAPES = {"Enlarged Cardiomediastinum": "Cardiomegaly", "Cardiomegaly": "Cardiomegaly",
          "Lung Lesion": "Consolidation", "Airspace Opacity": "Lung Opacity", "Edema": "Edema",
          "Consolidation": "Consolidation", "Atelectasis": "Atelectasis", "Pneumothorax": "Pneumothorax",
          "Pleural Effusion": "Pleural Effusion", "Support Devices": "Consolidation"}


def _findings(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One square picture and the mask (bool, ``size``²) of each finding drawn on it."""
    lung = pick_lung(rng, lung_masks(), None).astype(bool)
    sides = _sides(lung)
    count = 0 if rng.random() < EMPTY_SHARE else int(rng.integers(1, 3))
    names = [PATHOLOGIES[k] for k in rng.choice(len(PATHOLOGIES), size=count, replace=False)]
    masks, dark, bright = {}, [], []
    for name in names:
        side = lung if SHAPES[name] == "Cardiomegaly" else sides[int(rng.integers(2))]
        field = resize_field(_lesion(rng, SHAPES[name], side), size)
        if (field > 0.5).any():
            masks[name] = field > 0.5
            (dark if name in DARK else bright).append(field)
    pixels = render(rng, lung, size, pneumothorax=np.maximum.reduce(dark) if dark else None,
                    opacity=np.maximum.reduce(bright) if bright else None)
    return pixels, masks


def synth_chexlocalize(out: str | Path, n: int = 60, seed: int = 0, *, size: int = 256,
                       progress: bool = True) -> dict:
    """Write a synthetic CheXlocalize of ``n`` frontal images (35 % val, at least one each) to ``out``.

    Layout: module docstring, plus ``out/VLPBENCH_SYNTHETIC.json``. Images are ``size``² grayscale JPEGs, and
    every mask's ``size`` is ``[size, size]``. Deterministic per ``seed``.

    Returns:
        ``{"n", "path", "images": {cxr_id: {"part", "pathologies": [names with a non-empty mask]}}}``.

    Raises:
        DataError: ``out`` holds other data.
        ValueError: ``n`` below 2 or ``size`` below 64.
    """
    out = Path(out)
    if n < 2 or size < 64:
        raise ValueError(f"need n >= 2 and size >= 64, got n={n}, size={size}")
    prepare_output(out, ("CheXlocalize", "CheXpert"))
    for folder in ("CheXlocalize", "CheXpert"):
        if (out / folder).exists():
            shutil.rmtree(out / folder)
    write_marker(out, "chexlocalize", n, seed)
    n_val = min(max(1, round(n * VAL_SHARE)), n - 1)
    written: dict[str, dict[str, dict]] = {"val": {}, "test": {}}
    images: dict[str, dict] = {}
    for index in tqdm(range(n), desc="synth chexlocalize", unit="image", disable=not progress):
        rng = np.random.default_rng([seed, index])
        part = "val" if index < n_val else "test"
        patient = FIRST_PATIENT[part] + (index if part == "val" else index - n_val)
        image_id = f"patient{patient}_study1_view1_frontal"
        pixels, masks = _findings(rng, size)
        target = out / "CheXpert" / part / f"patient{patient}" / "study1" / "view1_frontal.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target, format="JPEG", quality=90)
        empty = np.zeros((size, size), dtype=np.uint8)
        written[part][image_id] = {name: encode(masks.get(name, empty)) for name in PATHOLOGIES}
        images[image_id] = {"part": part, "pathologies": [name for name in PATHOLOGIES if name in masks]}
    (out / "CheXlocalize").mkdir()
    for part, name in MASK_FILES.items():
        (out / "CheXlocalize" / name).write_text(json.dumps(written[part]))
    return {"n": n, "path": str(out), "images": images}
