"""Synthetic NIH ChestX-ray14 dataset in the real on-disk format, built from the shipped label files.

:func:`synth_cxr14` picks real Image Index values from the ``Data_Entry_2017_v2020.csv`` that
torchxrayvision ships, copies their rows byte for byte (9 header names over 11 fields, the
``0.14300000000000002`` spellings), copies the real ``BBox_List_2017.csv`` rows of the chosen
images (9 header fields, 6 row fields, ``Infiltrate``), writes ``train_val_list.txt`` /
``test_list.txt`` and one PNG per image under the Kaggle folder that holds it in the real data
(``images_001/images/`` … ``images_012/images/``).

Every finding is drawn so that a model can learn it: where a box exists, the finding fills the
box (an opacity, or a dark pneumothorax); the image's other findings are drawn where they occur
in a real chest, composed from :mod:`vlpbench.synthetic.chest`'s helpers: plate atelectasis, an
enlarged heart, lobar consolidation, perihilar oedema, a basal effusion with a meniscus, hyperlucent
emphysematous lungs, reticular fibrosis, a retrocardiac hernia, patchy infiltrates, a mass,
nodules, apical-lateral pleural thickening, a pneumonic patch and an apical pneumothorax rim.
"""

from __future__ import annotations

import functools
import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlpbench.data import SYNTHETIC_MARKER
from vlpbench.data.cxr14 import (
    BBOX_FILE, DATA_ENTRY_FILES, NO_FINDING, TEST_LIST, TRAIN_VAL_LIST, Cxr14Entry, read_bboxes, read_data_entry,
)
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.synthetic.chest import blur, pick_lung, prepare_output, render, resize_field, smooth_noise
from vlpbench.synthetic.chest import lungs as lung_masks
from vlpbench.synthetic.chest import write_marker

XRV_DATA_ENTRY = "Data_Entry_2017_v2020.csv.gz"
XRV_BBOX = "BBox_List_2017.csv.gz"
DATA_ENTRY = DATA_ENTRY_FILES[0]
NATIVE = 1024  # the real PNGs, and the pixel space of the real boxes

# Files per Kaggle folder images_001 … images_012, in Image Index order (docs/datasets.md,
# "ChestX-ray14 layout").
FOLDER_SIZES = (4999,) + (10000,) * 10 + (7121,)
FOLDERS = tuple(f"images_{k:03d}" for k in range(1, len(FOLDER_SIZES) + 1))

BOX_SHARE = 0.25  # of the sample: images with box rows (880 of 112,120 in the real data)
MAX_PER_PATIENT = 3  # images per patient in the random part, so patients with follow-ups occur
TEST_SHARE = 25596 / 112120  # the official test list's share of the images
RGBA_EVERY = 50  # images 1, 51, 101, ... are written as RGBA, a quirk of a few real PNGs

LISTS_NOTE = (
    "train_val_list.txt and test_list.txt are not the official lists (which do not ship): the chosen "
    "images are split by patient with the seed, about 22.8 % of them in test like the real lists."
)


@functools.cache
def _shipped() -> tuple[dict[str, Cxr14Entry], dict[str, list[tuple[str, list[float]]]], list[str], list[str]]:
    """The shipped Data_Entry and BBox files, parsed and as lines (read once per process)."""
    entry_file, bbox_file = xrv_data_file(XRV_DATA_ENTRY), xrv_data_file(XRV_BBOX)
    entry_lines = gzip.decompress(entry_file.read_bytes()).decode("utf-8").splitlines()
    box_lines = gzip.decompress(bbox_file.read_bytes()).decode("utf-8").splitlines()
    return read_data_entry(entry_file), read_bboxes(bbox_file), entry_lines, box_lines


def _folder(position: int) -> str:
    """The Kaggle folder of the image at ``position`` in Image Index order."""
    return FOLDERS[int(np.searchsorted(np.cumsum(FOLDER_SIZES), position, side="right"))]


def _take(candidates: list[str], chosen: list[str], rng: np.random.Generator) -> None:
    """Append a random candidate not yet chosen (none if all are)."""
    taken = set(chosen)
    left = [c for c in candidates if c not in taken]
    if left:
        chosen.append(left[int(rng.integers(len(left)))])


def _choose_ids(findings: dict[str, tuple[str, ...]], patients: dict[str, int],
                boxes: dict[str, list[tuple[str, list[float]]]], n: int, seed: int) -> list[str]:
    """Draw ``n`` Image Index values: a quarter with boxes (one with several boxes, every box
    finding where the share allows), then one image per finding the sample lacks (rarest first),
    one whose Finding Labels are not sorted, and the rest as up to 3 images of random patients."""
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    n_box = min(len(boxes), max(1, round(n * BOX_SHARE)), n)
    boxed = sorted(boxes)
    _take([i for i in boxed if len(boxes[i]) > 1], chosen, rng)
    box_having: dict[str, list[str]] = {}
    for image_id in boxed:
        for label in sorted({label for label, _ in boxes[image_id]}):
            box_having.setdefault(label, []).append(image_id)
    for label in sorted(box_having, key=lambda f: (len(box_having[f]), f)):
        if len(chosen) < n_box and not set(box_having[label]) & set(chosen):
            _take(box_having[label], chosen, rng)
    for j in rng.permutation(len(boxed)):
        if len(chosen) >= n_box:
            break
        if boxed[j] not in chosen:
            chosen.append(boxed[j])

    ids = sorted(findings)
    having: dict[str, list[str]] = {}
    for image_id in ids:
        for finding in findings[image_id] or (NO_FINDING,):
            having.setdefault(finding, []).append(image_id)
    for finding in sorted(having, key=lambda f: (len(having[f]), f)):
        if len(chosen) < n and not set(having[finding]) & set(chosen):
            _take(having[finding], chosen, rng)
    unsorted = [i for i in ids if list(findings[i]) != sorted(findings[i])]
    if len(chosen) < n and not set(unsorted) & set(chosen):
        _take(unsorted, chosen, rng)

    by_patient: dict[int, list[str]] = {}
    for image_id in ids:
        by_patient.setdefault(patients[image_id], []).append(image_id)
    order = sorted(by_patient)
    for p in rng.permutation(len(order)):
        if len(chosen) >= n:
            break
        own = by_patient[order[p]]
        picked = [own[k] for k in rng.permutation(len(own))[:MAX_PER_PATIENT] if own[k] not in chosen]
        chosen.extend(picked[: n - len(chosen)])
    return chosen


def _official_lists(ids: list[str], patients: dict[str, int], seed: int) -> tuple[list[str], list[str]]:
    """(train_val, test), sorted, split by patient in a seeded order with about TEST_SHARE of the
    images in test; both non-empty where there are two patients."""
    rng = np.random.default_rng([seed, 1])
    people = sorted({patients[i] for i in ids})
    order = [people[k] for k in rng.permutation(len(people))]
    target = round(len(ids) * TEST_SHARE)
    if len(people) > 1:
        target = max(target, 1)
    test_patients: set[int] = set()
    size = 0
    for patient in order[:-1]:  # the last patient stays in train_val
        if size >= target:
            break
        test_patients.add(patient)
        size += sum(patients[i] == patient for i in ids)
    test = sorted(i for i in ids if patients[i] in test_patients)
    return sorted(i for i in ids if patients[i] not in test_patients), test


# --- Findings drawn into the picture. Fields are float [0, 1] at the lung mask's size g (the
# anatomy grid) and resized to the image size; each returns ("pneumothorax" | "opacity", field).

Field = tuple[str, np.ndarray]


def _grid(g: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: (y column, x row)."""
    axis = (np.arange(g, dtype=np.float32) + 0.5) / g
    return axis[:, None], axis[None, :]


def _extent(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(top, bottom, left, right) of a mask as fractions of its size."""
    rows, cols = np.nonzero(mask)
    g = mask.shape[0]
    return rows.min() / g, (rows.max() + 1) / g, cols.min() / g, (cols.max() + 1) / g


def _blob(g: int, cx: float, cy: float, rx: float, ry: float, power: float = 2.0) -> np.ndarray:
    """A filled super-ellipse (power 2: ellipse; 4: rounded rectangle) centred at (cx, cy)."""
    y, x = _grid(g)
    return ((np.abs(x - cx) / rx) ** power + (np.abs(y - cy) / ry) ** power <= 1).astype(np.float32)


def _sides(lung: np.ndarray) -> list[np.ndarray]:
    """The image-left and image-right lung (split at the middle of the lung extent), as floats."""
    _, _, left, right = _extent(lung)
    _, x = _grid(lung.shape[0])
    mid = (left + right) / 2
    return [(lung * (x < mid)).astype(np.float32), (lung * (x >= mid)).astype(np.float32)]


def _one_side(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    return _sides(lung)[int(rng.integers(2))]


def _inside(rng: np.random.Generator, lung: np.ndarray, radius: float) -> tuple[float, float]:
    """A random point of the lung at least about ``radius`` (a fraction) from its edge, as (x, y) fractions."""
    deep = blur(lung.astype(np.float32), radius * lung.shape[0]) > 0.9
    rows, cols = np.nonzero(deep if deep.any() else lung)
    k = int(rng.integers(len(rows)))
    return (cols[k] + 0.5) / lung.shape[0], (rows[k] + 0.5) / lung.shape[0]


def _atelectasis(rng: np.random.Generator, lung: np.ndarray) -> Field:
    side = _one_side(rng, lung)
    top, bottom, left, right = _extent(side)
    y, x = _grid(lung.shape[0])
    cy = top + (bottom - top) * rng.uniform(0.55, 0.75)
    band = np.abs(y - cy - rng.uniform(-0.15, 0.15) * (x - (left + right) / 2)) < rng.uniform(0.012, 0.02)
    return "opacity", 0.9 * side * band


def _cardiomegaly(rng: np.random.Generator, lung: np.ndarray) -> Field:
    _, bottom, left, right = _extent(lung)
    centre = (left + right) / 2 + 0.04
    heart = _blob(lung.shape[0], centre, bottom - 0.1, rng.uniform(0.2, 0.24), rng.uniform(0.12, 0.15))
    return "opacity", 0.7 * heart


def _consolidation(rng: np.random.Generator, lung: np.ndarray) -> Field:
    side = _one_side(rng, lung)
    top, bottom, left, right = _extent(side)
    cy = top + (bottom - top) * rng.choice([0.3, 0.7])
    lobe = _blob(lung.shape[0], (left + right) / 2, cy, 0.45 * (right - left), 0.22 * (bottom - top), 3.0)
    return "opacity", side * lobe


def _edema(rng: np.random.Generator, lung: np.ndarray) -> Field:
    top, bottom, left, right = _extent(lung)
    y, x = _grid(lung.shape[0])
    hila = np.exp(-(((x - (left + right) / 2) / 0.22) ** 2 + ((y - (top + bottom) / 2) / 0.22) ** 2))
    return "opacity", rng.uniform(0.55, 0.7) * lung * hila


def _effusion(rng: np.random.Generator, lung: np.ndarray) -> Field:
    sides = _sides(lung) if rng.random() < 0.3 else [_one_side(rng, lung)]
    y, x = _grid(lung.shape[0])
    field = np.zeros_like(sides[0])
    for side in sides:
        top, bottom, left, right = _extent(side)
        medial = right if (left + right) / 2 < 0.5 else left
        lateral = np.abs(x - medial) / (right - left)
        # The fluid level rises towards the chest wall (the meniscus) and fills the costophrenic angle.
        level = bottom - (bottom - top) * (rng.uniform(0.15, 0.3) + 0.12 * lateral)
        field = np.maximum(field, (blur(side, 2) > 0.2) * (y > level))
    return "opacity", field


def _emphysema(rng: np.random.Generator, lung: np.ndarray) -> Field:
    # A faint, soft-edged pneumothorax field darkens the lungs and thins their markings
    # (hyperlucency) without the pleural line of a real pneumothorax.
    return "pneumothorax", rng.uniform(0.3, 0.4) * blur(lung.astype(np.float32), lung.shape[0] / 40)


def _fibrosis(rng: np.random.Generator, lung: np.ndarray) -> Field:
    top, bottom, _, _ = _extent(lung)
    y, _ = _grid(lung.shape[0])
    upper = np.clip((bottom - y) / (bottom - top), 0, 1)
    mesh = smooth_noise(rng, 40, lung.shape[0]) > 0.8
    return "opacity", 0.7 * lung * mesh * upper


def _hernia(rng: np.random.Generator, lung: np.ndarray) -> Field:
    _, bottom, left, right = _extent(lung)
    sac = _blob(lung.shape[0], (left + right) / 2 + rng.uniform(-0.02, 0.02), bottom - 0.08, 0.07, 0.06)
    return "opacity", 0.9 * sac


def _infiltration(rng: np.random.Generator, lung: np.ndarray) -> Field:
    patches = np.clip(smooth_noise(rng, 10, lung.shape[0]) - 0.2, 0, 1)
    return "opacity", 0.6 * lung * patches


def _mass(rng: np.random.Generator, lung: np.ndarray) -> Field:
    radius = rng.uniform(0.05, 0.08)
    cx, cy = _inside(rng, lung, radius)
    return "opacity", _blob(lung.shape[0], cx, cy, radius, radius * rng.uniform(0.8, 1.2))


def _nodule(rng: np.random.Generator, lung: np.ndarray) -> Field:
    field = np.zeros(lung.shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(0.012, 0.02)
        cx, cy = _inside(rng, lung, radius)
        field = np.maximum(field, _blob(lung.shape[0], cx, cy, radius, radius))
    return "opacity", field


def _pleural_thickening(rng: np.random.Generator, lung: np.ndarray) -> Field:
    side = _one_side(rng, lung)
    top, bottom, _, _ = _extent(side)
    y, _ = _grid(lung.shape[0])
    rim = side * (blur(side, 4) < 0.95)  # the lung's outer few pixels
    return "opacity", rim * (y < top + 0.6 * (bottom - top))


def _pneumonia(rng: np.random.Generator, lung: np.ndarray) -> Field:
    side = _one_side(rng, lung)
    top, bottom, left, right = _extent(side)
    cy = top + (bottom - top) * rng.uniform(0.45, 0.8)
    patch = _blob(lung.shape[0], (left + right) / 2 + rng.uniform(-0.03, 0.03), cy, 0.12, 0.1)
    texture = 0.6 + 0.4 * np.clip(smooth_noise(rng, 16, lung.shape[0]), 0, 1)
    return "opacity", 0.85 * side * patch * texture


def _pneumothorax(rng: np.random.Generator, lung: np.ndarray) -> Field:
    side = _one_side(rng, lung)
    top, bottom, left, right = _extent(side)
    g = lung.shape[0]
    # The collapsed lung: the side shrunk towards its medial base, so that air fills the apical
    # and lateral rim it leaves behind.
    hx, hy = (right if (left + right) / 2 < 0.5 else left), bottom
    scale = rng.uniform(0.75, 0.85)
    axis = (np.arange(g) + 0.5) / g
    ys = np.clip(((axis - hy) / scale + hy) * g, 0, g - 1).astype(int)
    xs = np.clip(((axis - hx) / scale + hx) * g, 0, g - 1).astype(int)
    collapsed = side[ys[:, None], xs[None, :]]
    return "pneumothorax", side * (1 - collapsed)


FINDINGS: dict[str, Callable[[np.random.Generator, np.ndarray], Field]] = {
    "Atelectasis": _atelectasis, "Cardiomegaly": _cardiomegaly, "Effusion": _effusion,
    "Infiltration": _infiltration, "Mass": _mass, "Nodule": _nodule, "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax, "Consolidation": _consolidation, "Edema": _edema,
    "Emphysema": _emphysema, "Fibrosis": _fibrosis, "Pleural_Thickening": _pleural_thickening, "Hernia": _hernia,
}


def _box_field(label: str, box: list[float], g: int) -> Field:
    """A rounded-rectangle lesion filling a box given in native (1024) pixels."""
    x, y, w, h = (v / NATIVE for v in box)
    shape = _blob(g, x + w / 2, y + h / 2, max(w / 2, 1 / g), max(h / 2, 1 / g), 4.0)
    if label == "Pneumothorax":
        return "pneumothorax", shape
    return "opacity", 0.9 * shape


def _picture(rng: np.random.Generator, lungs: list[np.ndarray], findings: tuple[str, ...],
             boxes: list[tuple[str, list[float]]], size: int) -> np.ndarray:
    """The uint8 image: boxed findings in their boxes, the others where they occur in a chest but
    outside the boxes, so that a box shows its own finding only."""
    g = lungs[0].shape[0]
    fields = [_box_field(label, box, g) for label, box in boxes]
    union = np.max([f for _, f in fields], axis=0) if fields else None
    lung = pick_lung(rng, lungs, union)
    boxed = {label for label, _ in boxes}
    outside = 1 - union if union is not None else 1
    fields += [(kind, field * outside) for kind, field in (FINDINGS[f](rng, lung) for f in findings if f not in boxed)]
    layers = {}
    for kind in ("pneumothorax", "opacity"):
        parts = [f for k, f in fields if k == kind]
        if parts:
            layers[kind] = resize_field(np.clip(np.max(parts, axis=0), 0, 1).astype(np.float32), size)
    return render(rng, lung, size, **layers)


def _scaled_box_row(row: str, size: int) -> str:
    """A real BBox row with its coordinates scaled from 1024 to ``size`` pixels (15 digits, as written)."""
    if size == NATIVE:
        return row
    image_id, label, *values = row.split(",")
    return ",".join([image_id, label, *(format(float(v) * size / NATIVE, ".15g") for v in values)])


def synth_cxr14(out: str | Path, n: int = 200, seed: int = 0, *, size: int = NATIVE, progress: bool = True) -> dict:
    """Write a synthetic ChestX-ray14 dataset of ``n`` images to ``out`` in the real on-disk format.

    Layout (Kaggle ``nih-chest-xrays/data``): ``out/Data_Entry_2017_v2020.csv`` (the shipped header
    and rows of the chosen images, byte for byte, in shipped order), ``out/BBox_List_2017.csv`` (the
    shipped header and box rows of the chosen images; coordinates scaled to ``size`` when it is not
    1024, the real files relate boxes to the 1024-pixel PNGs), ``out/train_val_list.txt`` and
    ``out/test_list.txt`` (the chosen images split by patient, see :data:`LISTS_NOTE`, one per line,
    sorted), ``out/images_0NN/images/<Image Index>`` (8-bit grey PNGs of ``size`` x ``size`` in the
    folder that holds the image in the real data; every 50th from the second on is RGBA) and
    ``out/VLPBENCH_SYNTHETIC.json`` (with the note on the lists).

    The Image Index values are real: a quarter with box rows (one with several boxes and every box
    finding where the share allows), one image for every finding and for No Finding the sample
    would otherwise lack, one with unsorted Finding Labels, the rest up to 3 images each of random
    patients. PNGs are written at compression level 1 for speed. Deterministic given ``seed``; a
    previous synth output in ``out`` is replaced, any other non-empty folder is refused.

    Returns:
        ``{"n", "boxes" (box rows written), "test" (images in test_list.txt), "rgba", "path"}``.

    Raises:
        DataError: ``out`` holds other data, or a shipped label file is missing.
        ValueError: ``n`` is outside 1..112,120 or ``size`` is below 32.
    """
    out = Path(out)
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    entries, boxes, entry_lines, box_lines = _shipped()
    if not 1 <= n <= len(entries):
        raise ValueError(f"n must be between 1 and {len(entries)} (the images of Data_Entry), got {n}")
    prepare_output(out, (DATA_ENTRY, BBOX_FILE, TRAIN_VAL_LIST, TEST_LIST, *FOLDERS))
    patients = {i: e.patient_id for i, e in entries.items()}
    chosen = set(_choose_ids({i: e.findings for i, e in entries.items()}, patients, boxes, n, seed))
    train_val, test = _official_lists(sorted(chosen), patients, seed)

    # Byte-identical rows, in shipped order (Data_Entry is ordered by patient, not by Image Index).
    header, *rows = entry_lines
    rows = [row for row in rows if row.split(",", 1)[0] in chosen]
    box_header, *box_rows = box_lines
    box_rows = [_scaled_box_row(row, size) for row in box_rows if row.split(",", 1)[0] in chosen]
    position = {image_id: k for k, image_id in enumerate(sorted(entries))}

    for name in FOLDERS:
        if (out / name).exists():
            shutil.rmtree(out / name)
    for name in (DATA_ENTRY, BBOX_FILE, TRAIN_VAL_LIST, TEST_LIST):
        (out / name).unlink(missing_ok=True)
    write_marker(out, "cxr14", n, seed)
    marker = json.loads((out / SYNTHETIC_MARKER).read_text())
    (out / SYNTHETIC_MARKER).write_text(json.dumps({**marker, "note": LISTS_NOTE}, sort_keys=True, indent=2) + "\n")

    lungs = lung_masks()
    rgba = 0
    for index, row in enumerate(tqdm(rows, desc="synth cxr14", unit="image", disable=not progress)):
        image_id = row.split(",", 1)[0]
        rng = np.random.default_rng([seed, index])
        pixels = _picture(rng, lungs, entries[image_id].findings, boxes.get(image_id, []), size)
        folder = out / _folder(position[image_id]) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        if index % RGBA_EVERY == 1:
            rgba += 1
            image = Image.fromarray(np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)]), mode="RGBA")
        else:
            image = Image.fromarray(pixels, mode="L")
        image.save(folder / image_id, format="PNG", compress_level=1)

    (out / BBOX_FILE).write_bytes("".join(f"{line}\n" for line in [box_header, *box_rows]).encode())
    (out / TRAIN_VAL_LIST).write_bytes("".join(f"{i}\n" for i in train_val).encode())
    (out / TEST_LIST).write_bytes("".join(f"{i}\n" for i in test).encode())
    (out / DATA_ENTRY).write_bytes("".join(f"{line}\n" for line in [header, *rows]).encode())
    return {"n": n, "boxes": len(box_rows), "test": len(test), "rgba": rgba, "path": str(out)}
