"""Synthetic MS-CXR: phrase/box CSV and COCO JSON over a synthetic MIMIC-CXR-JPG tree.

:func:`synth_ms_cxr` writes frontal images under the MIMIC-CXR-JPG path recipe, each with one or
two phrases naming a finding; every finding is rendered into the picture (an opacity, or a dark
pneumothorax, :func:`vlpbench.synthetic.chest.render`) and the phrase's boxes are the tight bounds of
what was drawn, in the written image's pixels, which are the CSV's ``image_width`` x ``image_height``
(docs/datasets.md, "MS-CXR CSV": boxes in original pixels).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlpbench.data.ms_cxr import CATEGORIES, COLUMNS, COLUMNS_SPLIT, VERSIONS, label_file_name
from vlpbench.synthetic.chest import ANATOMY_SIZE, blur, pick_lung, prepare_output, render, resize_field, write_marker
from vlpbench.synthetic.chest import lungs as lung_masks
from vlpbench.synthetic.mimic_cxr import make_dicom_id

MIMIC = "mimic-cxr-jpg/2.0.0"
SPLIT_SHARES = (0.6, 0.2, 0.2)  # of subjects: train / val / test (the v1.1.0 column)
MAX_ASPECT = 1.2
TWO_PHRASES = 0.3  # share of images with a second phrase
BILATERAL = 0.3  # share of phrases (besides cardiomegaly) with a box in each lung

# Phrases per category: {side} is "right" / "left" (the patient's) or "bilateral"; some hold commas,
# which the CSV must quote.
PHRASES = {
    "Atelectasis": ("{side} basilar atelectasis", "Atelectasis at the {side} lung base"),
    "Cardiomegaly": ("Cardiomegaly", "Moderately enlarged heart"),
    "Consolidation": ("{side} lower lobe consolidation", "Consolidation, {side} lung"),
    "Edema": ("{side} pulmonary edema", "Interstitial edema, {side}"),
    "Lung Opacity": ("{side} lung opacity", "Patchy opacity, {side} mid lung"),
    "Pleural Effusion": ("Small {side} pleural effusion", "{side} pleural effusion, unchanged"),
    "Pneumonia": ("{side} lower lobe pneumonia", "Opacity in the {side} base, concerning for pneumonia"),
    "Pneumothorax": ("Small {side} apical pneumothorax", "{side} pneumothorax"),
}


def _grid() -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(ANATOMY_SIZE, dtype=np.float32) / ANATOMY_SIZE
    return axis[:, None], axis[None, :]


def _extent(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a mask as fractions of its size."""
    rows, cols = np.nonzero(mask)
    return cols.min() / ANATOMY_SIZE, rows.min() / ANATOMY_SIZE, cols.max() / ANATOMY_SIZE, rows.max() / ANATOMY_SIZE


def _lesion(rng: np.random.Generator, category: str, side: np.ndarray) -> np.ndarray:
    """A [0, 1] field of the finding on one lung ``side`` (the heart for cardiomegaly), anatomy size."""
    y, x = _grid()
    left, top, right, bottom = _extent(side)
    if category == "Cardiomegaly":
        cx, cy, rx, ry = (left + right) / 2 + 0.04, bottom - 0.12, (right - left) * 0.3, (right - left) * 0.2
        inside = 1.0
    else:
        inside = np.clip(2 * blur(side.astype(np.float32), 2), 0, 1)
        if category == "Pleural Effusion":
            cx, cy, rx, ry = (left + right) / 2, bottom, (right - left) * 0.7, (bottom - top) * rng.uniform(0.2, 0.3)
        elif category == "Pneumothorax":
            cx, cy, rx, ry = (left + right) / 2, top, (right - left) * 0.7, (bottom - top) * rng.uniform(0.25, 0.4)
        else:
            rows, cols = np.nonzero(side & (y > top + (bottom - top) * 0.3))
            k = int(rng.integers(len(rows)))
            cx, cy = cols[k] / ANATOMY_SIZE, rows[k] / ANATOMY_SIZE
            rx, ry = rng.uniform(0.05, 0.09), rng.uniform(0.05, 0.09)
    ellipse = np.clip((1 - ((x - cx) / rx) ** 2 - ((y - cy) / ry) ** 2) * 4, 0, 1)
    return (ellipse * inside).astype(np.float32)


def _sides(lung: np.ndarray) -> list[np.ndarray]:
    """The image-left lung (the patient's right) and the image-right lung, split at the middle."""
    left, _, right, _ = _extent(lung)
    _, x = _grid()
    middle = x < (left + right) / 2
    return [lung & middle, lung & ~middle]


def _box(field: np.ndarray, width: int, height: int) -> list[int]:
    """The tight integer box [x, y, w, h] (written-image pixels) of ``field > 0.5``."""
    left, top, right, bottom = _extent(field > 0.5)
    x0, y0 = int(np.floor(left * width)), int(np.floor(top * height))
    x1 = min(int(np.ceil((right + 1 / ANATOMY_SIZE) * width)), width)
    y1 = min(int(np.ceil((bottom + 1 / ANATOMY_SIZE) * height)), height)
    return [x0, y0, x1 - x0, y1 - y0]


def _image(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, list[tuple[str, str, list[list[int]]]]]:
    """One picture of ``shape`` (h, w) and its phrases ``[(category, text, [[x, y, w, h], ...])]``."""
    height, width = shape
    lung = pick_lung(rng, lung_masks(), None).astype(bool)
    sides = _sides(lung)
    count = 2 if rng.random() < TWO_PHRASES else 1
    categories = [CATEGORIES[k] for k in rng.choice(len(CATEGORIES), size=count, replace=False)]
    phrases, dark, bright = [], [], []
    for category in categories:
        if category == "Cardiomegaly":
            chosen = [lung]
        elif rng.random() < BILATERAL:
            chosen = sides
        else:
            chosen = [sides[int(rng.integers(2))]]
        fields = [_lesion(rng, category, side) for side in chosen]
        fields = [f for f in fields if (f > 0.5).any()]
        (dark if category == "Pneumothorax" else bright).extend(fields)
        # Image-left is the patient's right.
        side = "bilateral" if len(chosen) == 2 else ("right" if chosen[0] is sides[0] else "left")
        text = str(rng.choice(PHRASES[category])).format(side=side)
        phrases.append((category, text[0].upper() + text[1:], [_box(f, width, height) for f in fields]))
    size = max(shape)
    pixels = render(rng, lung, size,
                    pneumothorax=resize_field(np.maximum.reduce(dark), size) if dark else None,
                    opacity=resize_field(np.maximum.reduce(bright), size) if bright else None)
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR)), phrases


def synth_ms_cxr(out: str | Path, n: int = 200, seed: int = 0, *, size: int = 512, version: str = "1.1.0",
                 progress: bool = True) -> dict:
    """Write a synthetic MS-CXR of ``n`` frontal images to ``out``.

    Layout: ``out/MS_CXR_Local_Alignment_v<version>.csv`` (one row per box; v1.1.0 adds ``split``,
    train / val / test by subject 60 / 20 / 20 %; phrases with commas are quoted) and ``.json`` (COCO),
    ``out/mimic-cxr-jpg/2.0.0/files/pXX/p<subject>/s<study>/<dicom_id>.jpg`` (grayscale JPEG,
    ``size`` px on the short side, up to 1.2x on the long side; some subjects have two studies) and
    ``out/VLPBENCH_SYNTHETIC.json``. Deterministic per ``seed``.

    Returns:
        ``{"n", "path", "version", "images": {dicom_id: {"path", "size": (h, w), "split",
        "phrases": [(category, text, [[x, y, w, h], ...])]}}}``.

    Raises:
        DataError: ``out`` holds other data.
        ValueError: ``n`` below 1, ``size`` below 64, or an unknown version.
    """
    out = Path(out)
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")
    if n < 1 or size < 64:
        raise ValueError(f"need n >= 1 and size >= 64, got n={n}, size={size}")
    files = (label_file_name(version), label_file_name(version, ".json"))
    prepare_output(out, ("mimic-cxr-jpg", *files))
    rng = np.random.default_rng(seed)
    subjects = [str(s) for s in sorted((rng.choice(10_000_000, size=n, replace=False) + 10_000_000).tolist())]
    studies = rng.choice(10_000_000, size=n, replace=False) + 50_000_000
    if (out / "mimic-cxr-jpg").exists():
        shutil.rmtree(out / "mimic-cxr-jpg")
    write_marker(out, "ms_cxr", n, seed)

    images: dict[str, dict] = {}
    subject, split = subjects[0], None
    for index in tqdm(range(n), desc="synth ms_cxr", unit="image", disable=not progress):
        image_rng = np.random.default_rng([seed, index])
        if index == 0 or image_rng.random() > 0.2:  # 20 % of images are a further study of the same subject
            subject = subjects[index]
            split = ("train", "val", "test")[index] if index < 3 else str(image_rng.choice(["train", "val", "test"], p=SPLIT_SHARES))
        long_side = int(round(size * image_rng.uniform(1.0, MAX_ASPECT)))
        shape = (long_side, size) if image_rng.random() < 0.7 else (size, long_side)
        pixels, phrases = _image(image_rng, shape)
        dicom = make_dicom_id(image_rng)
        path = f"files/p{subject[:2]}/p{subject}/s{studies[index]}/{dicom}.jpg"
        target = out / MIMIC / path
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target, format="JPEG", quality=90)
        images[dicom] = {"path": path, "size": shape, "split": split, "phrases": phrases}

    with_split = version == "1.1.0"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS_SPLIT if with_split else COLUMNS)
    coco: dict[str, list] = {"images": [], "annotations": [],
                             "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CATEGORIES)]}
    for number, (dicom, image) in enumerate(images.items(), start=1):
        height, width = image["size"]
        coco["images"].append({"id": number, "file_name": f"{dicom}.jpg", "path": image["path"],
                               "width": width, "height": height})
        for category, text, boxes in image["phrases"]:
            for box in boxes:
                writer.writerow([dicom, category, text, image["path"], *box, width, height,
                                 *([image["split"]] if with_split else [])])
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": number,
                    "category_id": CATEGORIES.index(category) + 1, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": 0, "label_text": text})
    (out / files[1]).write_text(json.dumps(coco) + "\n")
    (out / files[0]).write_bytes(buffer.getvalue().encode())
    return {"n": n, "path": str(out), "version": version, "images": images}
