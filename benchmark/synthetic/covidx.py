"""Synthetic COVIDx dataset in the real on-disk format, with a visible finding per class.

No COVIDx label file ships in a package, so the lines are invented in the real format of the chosen
version (docs/datasets.md, "COVIDx label lines"): no header, single spaces, LF; patient ids and file
names shaped like those of each data source (``rsna`` uuids, the ``rnsa`` typo, ``cohen`` figure names,
``sirm`` ``COVID(70).png``, ``ricord``, ``actmed``, ``fig1``, ``bimcv``); PNG and JPEG files with
``png`` / ``jpg`` / ``jpeg`` / ``JPG`` extensions, some RGB, of varying size.

Versions:

- ``"9A"`` (default; MGCA's): ``train_COVIDx9A.txt`` / ``test_COVIDx9A.txt``, normal / pneumonia /
  COVID-19, 4 fields a line (9A replaced the spaced sirm ids by ``COVID_<n>``).
- ``"7A"``: ``train_COVIDx7A.txt`` / ``test_COVIDx7A.txt``, 3-class; sirm patient ids contain a
  space (``COVID 70``: 5 fields) and the rsna lines of the test file have no data source (3 fields).
- ``"CXR-4"``: the Kaggle ``train.txt`` / ``val.txt`` / ``test.txt`` with ``train/``, ``val/``,
  ``test/``, negative / positive.

The finding is rendered on the shared synthetic chest: none for normal / negative; for pneumonia a
dense lobar consolidation in one lung, above or below an oblique fissure; for COVID-19 / positive
hazy, patchy opacities at the periphery of both lower lungs.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlpbench.data.covidx import BINARY, SCHEMES, THREE_CLASS
from vlpbench.data.splits import apportion
from vlpbench.synthetic.chest import blur, pick_lung, prepare_output, render, resize_field, smooth_noise, write_marker
from vlpbench.synthetic.chest import lungs as lung_masks

# version -> (scheme, {part: label file}, {part: class weights}). Weights follow the real files:
# 9A train 8,085 / 5,555 / 16,490 and test 100 / 100 / 200; 9B-like 13,992 / 16,490 for binary train.
VERSIONS = {
    "9A": (THREE_CLASS, {"train": "train_COVIDx9A.txt", "test": "test_COVIDx9A.txt"},
           {"train": (8085, 5555, 16490), "test": (100, 100, 200)}),
    "7A": (THREE_CLASS, {"train": "train_COVIDx7A.txt", "test": "test_COVIDx7A.txt"},
           {"train": (8085, 5555, 16490), "test": (100, 100, 200)}),
    "CXR-4": (BINARY, {"train": "train.txt", "val": "val.txt", "test": "test.txt"},
              {"train": (13992, 16490), "val": (1, 1), "test": (1, 1)}),
}
PART_SHARES = {"train": 80, "test": 20}  # 3-class versions: test 20 % of n
BINARY_SHARES = {"train": 70, "val": 15, "test": 15}
# Data sources per class, taken in turn, so that every quirk shows up in a small sample.
SOURCES = {
    "normal": ("rsna", "rsna", "rsna", "rnsa"),
    "pneumonia": ("rsna", "cohen", "rsna"),
    "COVID-19": ("sirm", "ricord", "cohen", "actmed", "fig1", "bimcv"),
    "negative": ("rsna",),
    "positive": ("ricord", "bimcv", "sirm", "cohen"),
}
COHEN_EXTENSIONS = ("jpg", "jpeg", "png", "JPG")
JPEG_QUALITY = 90


def _names(rng: np.random.Generator, source: str, name: str, k: int, nth: int, version: str) -> tuple[str, str]:
    """An invented (patient id, file name) in the shape of the data source's real ones, for the image
    numbered ``k`` (unique), the ``nth`` of its source."""
    if source in ("rsna", "rnsa"):
        patient = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        return patient, f"{patient}.png"
    if source == "cohen":
        stem = "covid-19-pneumonia" if name in ("COVID-19", "positive") else "streptococcus-pneumoniae-pneumonia"
        return str(k + 2), f"{stem}-{k}-PA.{COHEN_EXTENSIONS[nth % len(COHEN_EXTENSIONS)]}"
    if source == "sirm":
        # COVIDx 7 and 8 wrote "COVID 70"; 9A onwards "COVID_70".
        return (f"COVID {k}" if version == "7A" else f"COVID_{k}"), f"COVID({k}).png"
    if source == "ricord":
        return f"419639-{k:06d}", f"MIDRC-RICORD-1C-419639-{k:06d}-{int(rng.integers(10000, 99999))}-0.png"
    if source == "actmed":
        stamp = f"202003{int(rng.integers(10, 31))}{int(rng.integers(10 ** 11, 10 ** 12))}"
        return f"ANON{k}", f"CR.1.2.840.113564.1722810170.{stamp}.1003000225002.png"
    if source == "fig1":
        return f"COVID-{k:05d}", f"COVID-{k:05d}.jpg"
    return f"sub-S{k:05d}", f"sub-S{k:05d}_ses-E{int(rng.integers(10000, 99999))}_run-1_bp-chest_vp-ap_cr-corrected.png"


def _finding(rng: np.random.Generator, lung: np.ndarray, name: str) -> np.ndarray | None:
    """The class's opacity as a [0, 1] field on the placed lung mask's grid; None for normal."""
    if name in ("normal", "negative"):
        return None
    size = lung.shape[0]
    rows, cols = np.nonzero(lung)
    top, bottom = rows.min() / size, rows.max() / size
    centre = (cols.min() + cols.max()) / 2 / size
    y = (np.arange(size, dtype=np.float32) / size)[:, None]
    x = (np.arange(size, dtype=np.float32) / size)[None, :]
    lung = lung.astype(np.float32)
    if name == "pneumonia":
        side = 1 if rng.random() < 0.5 else -1
        level = top + (bottom - top) * rng.uniform(0.4, 0.6)
        below = (y - level - rng.uniform(-0.3, 0.3) * (x - centre) * side > 0).astype(np.float32)
        lobe = below if rng.random() < 0.65 else 1 - below
        return lung * ((x - centre) * side > 0.02) * lobe
    # COVID-19: the outer rim of both lungs, lateral and lower, in patches; hazy (ground glass).
    rim = np.clip((0.98 - blur(lung, size / 14)) / 0.2, 0, 1)
    lateral = np.clip((np.abs(x - centre) - 0.08) / 0.08, 0, 1)
    lower = np.clip((y - top - 0.25 * (bottom - top)) / (0.2 * (bottom - top)), 0, 1)
    patches = np.clip(0.8 * smooth_noise(rng, 8, size) + 0.7, 0, 1)
    return 0.8 * np.clip(2 * lung * rim * lateral * lower * patches, 0, 1)


def _save(path: Path, pixels: np.ndarray, rgb: bool) -> None:
    image = Image.fromarray(pixels)
    if rgb:
        image = image.convert("RGB")
    if path.suffix.lower() == ".png":
        image.save(path)
    else:
        image.save(path, format="JPEG", quality=JPEG_QUALITY)


def synth_covidx(out: str | Path, n: int = 200, seed: int = 0, *, size: int = 320, progress: bool = True,
                 version: str = "9A") -> dict:
    """Write a synthetic COVIDx dataset of ``n`` images to ``out`` in the real on-disk format of ``version``.

    Layout: the version's label files in ``out`` (see the module docstring) and the images in
    ``out/train/``, ``out/test/`` (and ``out/val/``), plus ``out/VLPBENCH_SYNTHETIC.json``. 3-class
    versions put 20 % of the images in the test file (normal / pneumonia / COVID-19 1:1:2 as in 9A) and
    the rest in the train file (class shares of 9A train); CXR-4 splits 70/15/15 over train / val / test.
    Images are about ``size`` px a side (0.8-1.2 times, each side on its own; the real ones are mostly
    1,000-3,000 px, and readers take the size from the file); cohen and fig1 images are RGB.
    Deterministic given ``seed``; a previous synth output in ``out`` is replaced, any other non-empty
    folder refused.

    Returns:
        ``{"n", "version", "classes": {part: {class: count}}, "path"}``.

    Raises:
        DataError: ``out`` holds other data.
        ValueError: an unknown version, ``n`` too small for one image per part, or ``size`` below 64.
    """
    out = Path(out)
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")
    scheme, files, weights = VERSIONS[version]
    shares = BINARY_SHARES if scheme == BINARY else PART_SHARES
    parts = list(files)
    if n < len(parts):
        raise ValueError(f"n must be at least {len(parts)} (one image per label file), got {n}")
    if size < 64:
        raise ValueError(f"size must be at least 64, got {size}")
    # A previous output of any version may be replaced.
    label_files = sorted({name for _, names, _ in VERSIONS.values() for name in names.values()})
    prepare_output(out, (*label_files, "train", "val", "test"))
    for name in ("train", "val", "test"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    for name in label_files:
        (out / name).unlink(missing_ok=True)
    write_marker(out, "covidx", n, seed)

    sizes = apportion(n, [shares[p] for p in parts])
    # Every part gets an image, taken from the largest.
    for i in range(len(sizes)):
        if sizes[i] == 0:
            sizes[sizes.index(max(sizes))] -= 1
            sizes[i] = 1
    classes = SCHEMES[scheme]
    plan = []  # (part, class name), grouped by class within a part like the real files
    for part, count in zip(parts, sizes):
        for name, k in zip(classes, apportion(count, weights[part])):
            plan += [(part, name)] * k

    lungs = lung_masks()
    lines: dict[str, list[str]] = {part: [] for part in parts}
    taken = {name: 0 for name in classes}
    per_source: dict[str, int] = {}
    summary = {part: dict.fromkeys(classes, 0) for part in parts}
    for index, (part, name) in enumerate(tqdm(plan, desc="synth covidx", unit="image", disable=not progress)):
        rng = np.random.default_rng([seed, index])
        k = taken[name]
        taken[name] += 1
        source = SOURCES[name][k % len(SOURCES[name])]
        patient, filename = _names(rng, source, name, index + 1, per_source.get(source, 0), version)
        per_source[source] = per_source.get(source, 0) + 1
        width, height = (int(size * f) for f in rng.uniform(0.8, 1.2, size=2))
        side = max(width, height)
        lung = pick_lung(rng, lungs, None)
        finding = _finding(rng, lung, name)
        pixels = render(rng, lung, side, opacity=None if finding is None else resize_field(finding, side))
        left, top = (side - width) // 2, (side - height) // 2
        path = out / part / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(path, pixels[top : top + height, left : left + width], rgb=source in ("cohen", "fig1"))
        # 7A's test file has no data source on its rsna lines.
        no_source = version == "7A" and part == "test" and source == "rsna"
        fields = [patient, filename, name] + ([] if no_source else [source])
        lines[part].append(" ".join(fields) + "\n")
        summary[part][name] += 1
    for part in parts:
        (out / files[part]).write_bytes("".join(lines[part]).encode())
    return {"n": n, "version": version, "classes": summary, "path": str(out)}
