"""Synthetic TBX11K dataset in the real on-disk format: lists, 512 x 512 PNGs, Pascal-VOC XML boxes.

:func:`synth_tbx11k` picks real image ids from the committed split ``tbx11k/v1`` (BenchX's lists), draws one
or two TB boxes in the lungs of every ``tb*`` image, renders them as soft opacities on a chest with real lung
anatomy, and writes the boxes as the release's XML files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlpbench.data.splits import load_split, sample_split
from vlpbench.data.tbx11k import BOX_CLASSES, IMAGE_SIZE, LISTS, TRAINVAL, boxes_to_mask
from vlpbench.synthetic.chest import lungs as lung_masks
from vlpbench.synthetic.chest import pick_lung, prepare_output, render, resize_field, write_marker

FOLDERS = {"h": "health", "s": "sick", "t": "tb"}  # by the id's first letter (h0001, s0001, tb0001)


def format_xml(image_id: str, boxes: list[tuple[str, int, int, int, int]], size: int = IMAGE_SIZE) -> str:
    """A TBX11K Pascal-VOC annotation of ``boxes`` ``[(class, xmin, ymin, xmax, ymax), ...]`` on a
    ``size`` x ``size`` image."""
    objects = "".join(
        f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>\n"
        f"\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for name, x1, y1, x2, y2 in boxes)
    return (f"<annotation>\n\t<folder>tb</folder>\n\t<filename>{image_id}.png</filename>\n"
            f"\t<size>\n\t\t<width>{size}</width>\n\t\t<height>{size}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>0</segmented>\n{objects}</annotation>\n")


def _boxes(rng: np.random.Generator, lung: np.ndarray, size: int) -> list[tuple[str, int, int, int, int]]:
    """One or two boxes centred on lung pixels, 10-25 % of the image a side, inside the image."""
    ys, xs = np.nonzero(resize_field(lung.astype(np.float32), size) > 0.5)
    boxes = []
    for _ in range(int(rng.integers(1, 3))):
        k = int(rng.integers(len(xs)))
        w, h = (int(size * rng.uniform(0.10, 0.25)) for _ in range(2))
        x1 = int(np.clip(xs[k] - w // 2, 0, size - w))
        y1 = int(np.clip(ys[k] - h // 2, 0, size - h))
        name = BOX_CLASSES[int(rng.choice(3, p=[0.75, 0.2, 0.05]))]
        boxes.append((name, x1, y1, x1 + w, y1 + h))
    return boxes


def synth_tbx11k(out: str | Path, n: int = 200, seed: int = 0, *, size: int = IMAGE_SIZE, progress: bool = True) -> dict:
    """Write a synthetic TBX11K dataset of ``n`` images to ``out`` in the real on-disk format.

    Layout: ``out/imgs/{health,sick,tb}/<id>.png`` (8-bit greyscale, 512 x 512), ``out/annotations/xml/<id>.xml``
    for every TB image (Pascal VOC, ``<size>`` 512 x 512), ``out/lists/TBX11K_train.txt`` (the ids of split v1's
    train part), ``TBX11K_val.txt`` (the others; the official train/val membership is not known here) and
    ``TBX11K_trainval.txt``, paths relative to ``imgs/``, and ``out/VLPBENCH_SYNTHETIC.json``. The ids are real,
    drawn from split tbx11k/v1 (:func:`vlpbench.data.splits.sample_split`). Deterministic given ``seed``; a
    previous synth output in ``out`` is replaced, any other non-empty folder refused.

    Returns:
        ``{"n", "positives", "boxes", "path"}``.

    Raises:
        DataError: ``out`` holds other data.
        ValueError: ``size`` other than 512 (every TBX11K image is 512 x 512) or ``n`` below 1.
    """
    out = Path(out)
    if size != IMAGE_SIZE:
        raise ValueError(f"TBX11K images are {IMAGE_SIZE} x {IMAGE_SIZE}; size {size} is not supported")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    prepare_output(out, ("imgs", "annotations", "lists"))
    for name in ("imgs", "annotations", "lists"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    write_marker(out, "tbx11k", n, seed)
    split = load_split("tbx11k", "v1")
    chosen = sample_split(split, n, seed)
    train = set(split.ids("train"))

    lungs = lung_masks()
    (out / "annotations" / "xml").mkdir(parents=True)
    entries: dict[str, list[str]] = {name: [] for name in LISTS}
    n_boxes = 0
    for index, image_id in enumerate(tqdm(chosen, desc="synth tbx11k", unit="image", disable=not progress)):
        rng = np.random.default_rng([seed, index])
        folder = FOLDERS[image_id[0]]
        lung = pick_lung(rng, lungs, None)
        if folder == "tb":
            boxes = _boxes(rng, lung, size)
            n_boxes += len(boxes)
            opacity = boxes_to_mask(np.array([b[1:] for b in boxes], dtype=np.float64), size, size)
            pixels = render(rng, lung, size, opacity=opacity.astype(np.float32) * resize_field(lung, size))
            (out / "annotations" / "xml" / f"{image_id}.xml").write_text(format_xml(image_id, boxes, size))
        else:
            pixels = render(rng, lung, size)
        path = out / "imgs" / folder / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        entries[LISTS[0] if image_id in train else LISTS[1]].append(f"{folder}/{image_id}.png\n")
    (out / "lists").mkdir()
    for name, lines in {**entries, TRAINVAL: entries[LISTS[0]] + entries[LISTS[1]]}.items():
        (out / "lists" / name).write_text("".join(lines))
    return {"n": n, "positives": sum(i.startswith("tb") for i in chosen), "boxes": n_boxes, "path": str(out)}
