"""Synthetic Object-CXR dataset in the real on-disk format, with the foreign objects drawn in.

No Object-CXR label file ships in a package, so ids and annotations are invented in the real format
(docs/datasets.md, "Object-CXR annotations"): ``train.csv`` and ``dev.csv`` (header
``image_name,annotation``, negatives keep their comma), ids numbered as in the release (train from
``00001.jpg``, dev from ``08001.jpg``), half of each part positive, objects of all three types (box,
ellipse, polygon) with integer coordinates, and 8-bit greyscale baseline JFIF JPEGs of varying size in
``train/`` and ``dev/``. Each object is rendered as a near-white, sharp-edged foreign object exactly
where its annotation puts it (the pixels of :func:`vlpbench.data.object_cxr.rasterize`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlpbench.data.object_cxr import BOX, ELLIPSE, TYPE_NAMES, format_annotation, rasterize
from vlpbench.data.splits import apportion
from vlpbench.synthetic.chest import lungs as lung_masks
from vlpbench.synthetic.chest import pick_lung, prepare_output, render, write_marker

PARTS = (("train", 1, 8000), ("dev", 8001, 1000))  # folder, first id, images in the release
HEADER = "image_name,annotation"
JPEG_QUALITY = 95  # the real files hold about 3 bits per pixel
OBJECT_COUNTS = (1, 1, 1, 2, 2, 3)  # objects per positive image (dev: 1,015 in 500 images)


def _objects(rng: np.random.Generator, width: int, height: int, first_type: int) -> list[tuple[int, np.ndarray]]:
    """Invented objects inside the chest area: small boxes, ellipses and star-shaped polygons."""
    objects = []
    side = min(width, height)
    for k in range(int(rng.choice(OBJECT_COUNTS))):
        kind = (first_type + k) % 3
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.15, 0.8) * height
        rx, ry = rng.uniform(0.015, 0.06, size=2) * side + 2
        if kind in (BOX, ELLIPSE):
            corners = np.rint([[cx - rx, cy - ry], [cx + rx, cy + ry]])
        else:
            # Vertices at sorted angles around a centre make a simple (non-crossing) polygon.
            n = int(rng.integers(4, 10))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radius = rng.uniform(0.5, 1.0, n)
            corners = np.rint(np.column_stack([cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles)]))
            corners = corners[np.any(corners != np.roll(corners, 1, axis=0), axis=1)]
            if len(corners) < 3:
                corners = np.rint([[cx - rx, cy + ry], [cx, cy - ry], [cx + rx, cy + ry]])
        corners = np.clip(corners, 0, [width - 1, height - 1]).astype(np.int64)
        objects.append((kind, corners))
    return objects


def synth_object_cxr(out: str | Path, n: int = 200, seed: int = 0, *, size: int = 512, progress: bool = True) -> dict:
    """Write a synthetic Object-CXR dataset of ``n`` images to ``out`` in the real on-disk format.

    Layout: ``out/train.csv`` and ``out/dev.csv`` (header ``image_name,annotation``, LF), JPEGs
    ``out/train/00001.jpg`` … and ``out/dev/08001.jpg`` …, and ``out/VLPBENCH_SYNTHETIC.json``. The
    images split 8:1 between train and dev like the release (at least one in each), half of each part
    positive. Images are about ``size`` px (the real ones are 2,000-3,000 px; readers take the size
    from the file): width 0.8-1.0 and height 0.9-1.1 times ``size``; the coordinates are pixels of the
    written image. Deterministic given ``seed``; a previous synth output in ``out`` is replaced, any
    other non-empty folder refused.

    Returns:
        ``{"n", "positives", "objects": {"box", "ellipse", "polygon"}, "path"}``.

    Raises:
        DataError: ``out`` holds other data.
        ValueError: ``n`` below 2 or ``size`` below 64.
    """
    out = Path(out)
    if n < 2:
        raise ValueError(f"n must be at least 2 (a train and a dev image), got {n}")
    if size < 64:
        raise ValueError(f"size must be at least 64, got {size}")
    prepare_output(out, ("train.csv", "dev.csv", "train", "dev"))
    for name in ("train", "dev"):
        if (out / name).exists():
            shutil.rmtree(out / name)
        (out / f"{name}.csv").unlink(missing_ok=True)
    write_marker(out, "object_cxr", n, seed)

    n_train, n_dev = apportion(n, [count for _, _, count in PARTS])
    if n_dev == 0:
        n_train, n_dev = n_train - 1, 1
    # Exactly half of each part positive, in a seeded order.
    order = np.random.default_rng(seed)
    positive = []
    for count in (n_train, n_dev):
        flags = np.zeros(count, dtype=bool)
        flags[: (count + 1) // 2] = True
        positive.extend(order.permutation(flags).tolist())

    lungs = lung_masks()
    rows: dict[str, list[str]] = {"train": [], "dev": []}
    counts = dict.fromkeys(TYPE_NAMES.values(), 0)
    first_type = 0
    jobs = [(folder, first + k) for (folder, first, _), count in zip(PARTS, (n_train, n_dev)) for k in range(count)]
    for index, (folder, number) in enumerate(tqdm(jobs, desc="synth object_cxr", unit="image", disable=not progress)):
        rng = np.random.default_rng([seed, index])
        width, height = int(size * rng.uniform(0.8, 1.0)), int(size * rng.uniform(0.9, 1.1))
        objects = _objects(rng, width, height, first_type) if positive[index] else []
        # Rotate the first type from image to image, so that every type appears in a small sample.
        first_type = (first_type + len(objects)) % 3
        for kind, _ in objects:
            counts[TYPE_NAMES[kind]] += 1
        # The chest is rendered square and cropped to the image, objects drawn in image coordinates.
        side = max(width, height)
        left, top = (side - width) // 2, (side - height) // 2
        bright = np.zeros((side, side), dtype=np.float32)
        bright[top : top + height, left : left + width] = rasterize(objects, width, height)
        pixels = render(rng, pick_lung(rng, lungs, None), side, bright=bright if objects else None)
        name = f"{number:05d}.jpg"
        path = out / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[top : top + height, left : left + width]).save(path, quality=JPEG_QUALITY)
        rows[folder].append(f"{name},{format_annotation(objects)}\n")
    for folder, lines in rows.items():
        (out / f"{folder}.csv").write_bytes((HEADER + "\n" + "".join(lines)).encode())
    return {"n": n, "positives": int(sum(positive)), "objects": counts, "path": str(out)}
