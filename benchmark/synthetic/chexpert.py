"""Synthetic CheXpert (small release) in the real on-disk format, built from the real train.csv.

:func:`synth_chexpert` picks real images from the committed splits ``chexpert/v1`` and
``chexpert5x200/v1`` plus real lateral rows, copies their rows of the shipped train.csv byte for
byte, writes a ``valid.csv`` of explicit 0.0/1.0 rows under ``valid/patient645NN/``, and draws one
grayscale JPEG per row whose picture shows the findings its labels say (the five competition
classes under the ``mgca`` policy, plus pneumothorax and support devices when 1.0):

- Cardiomegaly: an enlarged cardiac silhouette (cardiothoracic ratio about 0.6).
- Pleural Effusion: a bright base with a meniscus and a blunted costophrenic angle, one or both sides.
- Edema: a bilateral perihilar haze.
- Consolidation: one or two dense, irregular focal opacities.
- Atelectasis: a plate-like linear band in a lower zone.
- Pneumothorax: a dark apical-lateral cap with a pleural line; Support Devices: a tube and ECG leads.

Lateral views show a chest without findings (they leave every frontal-only protocol).

It also writes the radiologist-labelled test set as a user who fetched it keeps it beside train/ and
valid/ (docs/datasets.md, "CheXpert radiologist test set"; read by
:class:`vlpbench.data.chexpert.ChexpertTestSet`): a ``groundtruth.csv`` of study-level integer 0/1
labels (no final newline), whose ``Study`` values name the full release as the real file does, and
``test/patient647NN/study1/view1_frontal.jpg`` images (some with a ``view2_lateral.jpg``). Its labels
are those of further real train.csv rows under U-zeros (empty and -1.0 become 0), and each study's
frontal view shows its findings as above.
"""

from __future__ import annotations

import functools
import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlpbench.data.chexpert import (
    CHEXPERT_TRAIN,
    COLUMNS,
    COMPETITION_5,
    MGCA_UNCERTAIN,
    OBSERVATIONS,
    apply_policy,
    shipped_table,
)
from vlpbench.data.splits import apportion, load_split
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.errors import DataError
from vlpbench.synthetic.chest import ANATOMY_SIZE, blur, pick_lung, prepare_output, render, resize_field, smooth_noise
from vlpbench.synthetic.chest import lungs as lung_masks
from vlpbench.synthetic.chest import write_marker

RELEASE = "CheXpert-v1.0-small"
FIRST_VALID_PATIENT = 64541
FINDINGS = (*COMPETITION_5, "Pneumothorax", "Support Devices")

# Share of the images per pool (per 100): valid.csv, the 5x200 set, split val, split train (itself
# 1:9:90 from train_1pct, the rest of train_10pct and the rest of train), train laterals.
POOL_WEIGHTS = (15, 15, 15, 45, 10)
TRAIN_WEIGHTS = (1, 9, 90)
VALID_LATERAL_SHARE = 32 / 234  # the real valid.csv: 202 frontal and 32 lateral images
MIN_IMAGES = 10  # one per pool
MAX_IMAGES = 5000  # keeps every pool's share within the pool (the 5x200 set: 150 of 200 per class)
LANDSCAPE = 0.75  # share of images wider than tall (inferred for the small release)
MAX_ASPECT = 1.3

# The radiologist test set (docs/datasets.md, "CheXpert radiologist test set"): groundtruth.csv's exact
# header, and its Study values, which name the full release whichever copy the user has.
GROUNDTRUTH = "groundtruth.csv"
GROUNDTRUTH_HEADER = (
    "Study,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,"
    "Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices"
)
TEST_RELEASE = "CheXpert-v1.0"
FIRST_TEST_PATIENT = 64741
TEST_SHARE = 0.1  # test studies per image of n (beyond n: train.csv and valid.csv stay as they were)
MIN_TEST = 5
# CheXlocalize: 668 test images from 500 studies, each with a view1 (CheXzero); the further views
# are taken to be laterals (inferred).
TEST_EXTRA_VIEW_SHARE = 168 / 500


def _nonempty(counts: list[int]) -> list[int]:
    """Give every empty pool one image taken from the largest pool."""
    counts = list(counts)
    for i, count in enumerate(counts):
        if count == 0:
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    return counts


@functools.lru_cache(maxsize=1)
def _pools() -> tuple[list[list[str]], list[list[str]], list[str]]:
    """(5x200 ids per class, [val, train_1pct, rest of train_10pct, rest of train], train laterals),
    each sorted; read once per process."""
    split, five = load_split("chexpert"), load_split("chexpert5x200")
    by_class = five.labels("test", "class")
    classes = [sorted(i for i, c in by_class.items() if c == k) for k in range(len(COMPETITION_5))]
    sub1, sub10 = set(split.ids("train_1pct")), set(split.ids("train_10pct"))
    parts = [sorted(split.ids("val")), sorted(sub1), sorted(sub10 - sub1), sorted(set(split.ids("train")) - sub10)]
    table = shipped_table()
    return classes, parts, sorted(table.paths[i] for i in np.flatnonzero(~table.frontal))


def _choose(n: int, seed: int, n_test: int) -> tuple[list[str], list[str], list[str]]:
    """(train.csv Paths to copy, source Paths for the valid.csv rows, source Paths for the
    ``n_test`` test studies), drawn from the splits."""
    classes, parts, laterals = _pools()
    n_valid, n_five, n_val, n_train, n_lateral = _nonempty(apportion(n, POOL_WEIGHTS))
    counts = [n_val, *_nonempty(apportion(n_train, TRAIN_WEIGHTS)), n_lateral]

    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for members, count in zip(classes, apportion(n_five, [1] * len(classes))):
        chosen.extend(members[j] for j in rng.permutation(len(members))[:count])
    for pool, count in zip([*parts, laterals], counts):
        chosen.extend(pool[j] for j in rng.permutation(len(pool))[:count])
    # valid.csv borrows the labels of further training images (under new paths).
    rest, taken = parts[-1], set(chosen)
    spare = [rest[j] for j in rng.permutation(len(rest))[: n_valid + len(taken)] if rest[j] not in taken]
    valid = spare[:n_valid]
    # So do the test studies (drawn last, so that the draws above do not depend on n_test).
    taken.update(valid)
    spare = [rest[j] for j in rng.permutation(len(rest))[: n_test + len(taken)] if rest[j] not in taken]
    return chosen, valid, spare[:n_test]


def _valid_rows(sources: list[str], lines: dict[str, str]) -> list[tuple[str, str]]:
    """valid.csv rows ``(Path, line)``: one study per patient from patient64541 on, a frontal view1
    and for some a lateral view2; every observation explicit 0.0 / 1.0 (empty -> 0.0, -1.0 -> the
    mgca mapping for the competition classes, 0.0 for the others)."""
    n_lateral = min(round(len(sources) * VALID_LATERAL_SHARE), len(sources) - 1)
    n_studies = len(sources) - n_lateral
    rows = []
    for k in range(n_studies):
        fields = lines[sources[k]].split(",")
        for name in OBSERVATIONS:
            j = COLUMNS.index(name)
            fields[j] = {"": "0.0", "-1.0": f"{MGCA_UNCERTAIN.get(name, 0)}.0"}.get(fields[j], fields[j])
        folder = f"{RELEASE}/valid/patient{FIRST_VALID_PATIENT + k:05d}/study1"
        fields[0] = f"{folder}/view1_frontal.jpg"
        rows.append((fields[0], ",".join(fields)))
        if k < n_lateral:
            lateral = [f"{folder}/view2_lateral.jpg", *fields[1:3], "Lateral", "", *fields[5:]]
            rows.append((lateral[0], ",".join(lateral)))
    return rows


def _test_rows(values: np.ndarray) -> tuple[list[str], list[tuple[str, list[str], bool]]]:
    """For the test studies' source observations (N x 14, OBSERVATIONS order, NaN = empty): the
    groundtruth.csv lines (U-zeros: empty and -1.0 -> 0) and the images to draw, as
    ``(path below the dataset folder, findings, frontal)``: ``view1_frontal.jpg`` per study and, for
    the first studies, a ``view2_lateral.jpg``."""
    labels = apply_policy(values, OBSERVATIONS, "zeros")
    n_extra = min(round(len(labels) * TEST_EXTRA_VIEW_SHARE), len(labels))
    lines, images = [], []
    for k, row in enumerate(labels.tolist()):
        study = f"test/patient{FIRST_TEST_PATIENT + k:05d}/study1"
        lines.append(",".join([f"{TEST_RELEASE}/{study}", *map(str, row)]))
        images.append((f"{study}/view1_frontal.jpg", _present(np.array(row, dtype=np.float32)), True))
        if k < n_extra:
            images.append((f"{study}/view2_lateral.jpg", [], False))
    return lines, images


def _present(values: np.ndarray) -> list[str]:
    """The findings to draw for one row of observations (OBSERVATIONS order, NaN = empty)."""
    competition = apply_policy(values[None, :], COMPETITION_5, "mgca")[0]
    present = [name for name, label in zip(COMPETITION_5, competition) if label == 1]
    return present + [name for name in FINDINGS[5:] if values[OBSERVATIONS.index(name)] == 1.0]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(ANATOMY_SIZE, dtype=np.float32) / ANATOMY_SIZE
    return axis[:, None], axis[None, :]


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(top, bottom, left, right) of a mask, as fractions of its size."""
    rows, cols = np.nonzero(mask)
    size = mask.shape[0]
    return rows.min() / size, rows.max() / size, cols.min() / size, cols.max() / size


def _sides(lung: np.ndarray) -> list[np.ndarray]:
    """The image-left and image-right lung (split at the middle of the lung box)."""
    _, _, left, right = _box(lung)
    _, x = _grid()
    middle = x < (left + right) / 2
    return [lung * middle, lung * ~middle]


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float,
             sharpness: float = 4.0) -> np.ndarray:
    """A soft-edged filled ellipse: 1 inside, falling to 0 at the rim over 1/sharpness of its radius."""
    return np.clip((1 - ((x - cx) / a) ** 2 - ((y - cy) / b) ** 2) * sharpness, 0, 1)


def _point(rng: np.random.Generator, mask: np.ndarray) -> tuple[float, float]:
    """A random pixel of ``mask`` as (x, y) fractions."""
    rows, cols = np.nonzero(mask)
    k = rng.integers(len(rows))
    return cols[k] / mask.shape[1], rows[k] / mask.shape[0]


def _cardiomegaly(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    top, bottom, left, right = _box(lung)
    y, x = _grid()
    centre = (left + right) / 2
    a = (right - left) * rng.uniform(0.28, 0.33)  # half width: cardiothoracic ratio 0.56-0.66
    # Spare the mediastinum, which is already brighter than the heart's level.
    mediastinum = np.exp(-(((x - centre) / 0.06) ** 2))
    return 0.8 * _ellipse(x, y, centre + 0.05, bottom - 0.13, a, a * 0.7) * (1 - mediastinum)


def _effusion(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    y, x = _grid()
    sides = _sides(lung)
    field = np.zeros_like(x * y)
    for index in ((0,), (1,), (0, 1))[rng.choice(3, p=[0.35, 0.35, 0.3])]:
        side = sides[index]
        top, bottom, left, right = _box(side)
        lateral = left if index == 0 else right
        depth = (bottom - top) * rng.uniform(0.2, 0.35)
        # The meniscus climbs towards the chest wall; the fluid spills past the lung edge there.
        level = bottom - depth - 0.5 * depth * np.clip(1 - np.abs(x - lateral) / (right - left), 0, 1)
        region = np.clip(2 * blur(side.astype(np.float32), ANATOMY_SIZE / 40), 0, 1)
        field = np.maximum(field, region / (1 + np.exp(-(y - level) / 0.01)))
    return field


def _edema(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    top, bottom, left, right = _box(lung)
    y, x = _grid()
    # Perihilar: strongest beside the mediastinum at mid-height, fading towards the periphery.
    across, down = (x - (left + right) / 2) / (0.45 * (right - left)), (y - (top + bottom) / 2) / 0.3
    spread = np.exp(-(across**2) - down**2)
    texture = 0.85 + 0.15 * smooth_noise(rng, 10, ANATOMY_SIZE)
    return rng.uniform(0.5, 0.65) * blur(lung.astype(np.float32), 3) * np.clip(spread * texture * 1.3, 0, 1)


def _consolidation(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    y, x = _grid()
    field = np.zeros_like(x * y)
    for _ in range(rng.integers(1, 3)):
        cx, cy = _point(rng, lung)
        radius = rng.uniform(0.05, 0.09)
        blob = 1 - ((x - cx) / radius) ** 2 - ((y - cy) / (radius * rng.uniform(0.7, 1.3))) ** 2
        field = np.maximum(field, np.clip((blob + 0.3 * smooth_noise(rng, 24, ANATOMY_SIZE)) * 4, 0, 1))
    return field * lung


def _atelectasis(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    top, bottom, _, _ = _box(lung)
    y, x = _grid()
    lower = lung * (y > (top + bottom) / 2)
    cx, cy = _point(rng, lower if lower.any() else lung)
    angle = rng.uniform(-0.35, 0.35)
    along = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    across = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    half_length, half_width = rng.uniform(0.07, 0.12), rng.uniform(0.012, 0.022)
    band = np.clip((1 - (along / half_length) ** 2) * 3, 0, 1) * np.clip((1 - (across / half_width) ** 2) * 3, 0, 1)
    return band * np.clip(2 * blur(lung.astype(np.float32), 2), 0, 1)


def _pneumothorax(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    y, x = _grid()
    index = int(rng.integers(2))
    side = _sides(lung)[index]
    top, bottom, left, right = _box(side)
    rows, cols = np.nonzero(side)
    apex = cols[rows <= rows.min() + 2].mean() / side.shape[1]
    # A cap over the apex, reaching down the chest wall.
    shift = (right - left) * 0.25 * (-1 if index == 0 else 1)
    a, b = (right - left) * rng.uniform(0.5, 0.7), (bottom - top) * rng.uniform(0.3, 0.45)
    return _ellipse(x, y, apex + shift, top, a, b, 50) * side


def _devices(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    top, bottom, left, right = _box(lung)
    y, x = _grid()
    tube_x = (left + right) / 2 + rng.uniform(-0.02, 0.02)
    field = (np.abs(x - tube_x) < 0.005) * (y < top + (bottom - top) * rng.uniform(0.1, 0.25))
    for _ in range(2):  # ECG leads over the chest wall
        cx, cy = rng.uniform(left, right), rng.uniform(top, top + 0.15)
        field = np.maximum(field, (x - cx) ** 2 + (y - cy) ** 2 < 0.012**2)
    return field.astype(np.float32)


DRAW = {
    "Cardiomegaly": _cardiomegaly,
    "Pleural Effusion": _effusion,
    "Edema": _edema,
    "Consolidation": _consolidation,
    "Atelectasis": _atelectasis,
    "Pneumothorax": _pneumothorax,
    "Support Devices": _devices,
}


def finding_fields(rng: np.random.Generator, lung: np.ndarray, findings: list[str]) -> dict[str, np.ndarray]:
    """Float [0, 1] fields at the anatomy size, one per finding, drawn on the placed ``lung`` mask."""
    return {name: DRAW[name](rng, lung).astype(np.float32) for name in findings}


def draw(seed: list[int], findings: list[str], shape: tuple[int, int], *, frontal: bool = True) -> np.ndarray:
    """One uint8 picture of ``shape`` (h, w) showing ``findings`` (frontal views only).

    The findings use their own generator, so the chest itself depends only on ``seed``: the same
    seed with and without a finding differs only by the finding (and the grain).
    """
    rng = np.random.default_rng(seed)
    finding_rng = np.random.default_rng(rng.integers(2**63))
    lung = pick_lung(rng, lung_masks(), None)
    side = max(shape)
    if not frontal:
        # A lateral: one wide lung field, heart and spine overlapping it.
        return _resize(render(rng, np.maximum(lung, lung[:, ::-1]), side), shape)
    fields = finding_fields(finding_rng, lung, findings)
    opacities = [resize_field(f, side) for name, f in fields.items() if name in COMPETITION_5]
    pneumothorax, devices = fields.get("Pneumothorax"), fields.get("Support Devices")
    pixels = render(
        rng, lung, side,
        opacity=np.maximum.reduce(opacities) if opacities else None,
        pneumothorax=None if pneumothorax is None else resize_field(pneumothorax, side),
        bright=None if devices is None else resize_field(devices, side),
    )
    return _resize(pixels, shape)


def _resize(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if pixels.shape == shape:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((shape[1], shape[0]), Image.BILINEAR))


def _shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(h, w) with ``size`` on the short side, as in the small release (320 x 320-416)."""
    long_side = int(round(size * rng.uniform(1.0, MAX_ASPECT)))
    return (size, long_side) if rng.random() < LANDSCAPE else (long_side, size)


def synth_chexpert(out: str | Path, n: int = 200, seed: int = 0, *, size: int = 320, progress: bool = True) -> dict:
    """Write a synthetic CheXpert-v1.0-small of ``n`` images to ``out`` in the real on-disk format.

    Layout: ``out/CheXpert-v1.0-small/train.csv`` (the shipped rows of the chosen images, byte for
    byte, in shipped order: laterals with empty AP/PA, -1.0 and empty values included),
    ``valid.csv`` (same header; ``valid/patient645NN/study1/view1_frontal.jpg`` and some
    ``view2_lateral.jpg`` rows, every value explicit 0.0/1.0), the JPEGs at the Paths minus their
    first folder (grayscale, ``size`` px on the short side, up to 1.3x on the long side), and
    ``out/VLPBENCH_SYNTHETIC.json``. Of the images, 15 % are valid rows, 15 % come from the 5x200
    set (equal per class), 15 % from split val, 45 % from split train (1:9:90 from train_1pct, the
    rest of train_10pct, the rest of train) and 10 % are train laterals.

    Beyond the ``n`` images, the radiologist test set in the same folder: ``groundtruth.csv`` (the
    real header, one row ``CheXpert-v1.0/test/patient647NN/study1`` per study with integer 0/1
    labels, LF, no final newline) and ``test/patient647NN/study1/view1_frontal.jpg`` (about a third of
    the studies also with ``view2_lateral.jpg``); 10 % of ``n`` studies, at least 5. Deterministic
    per ``seed``; train.csv, valid.csv and their images do not depend on the test set.

    A previous synth output in ``out`` is replaced; any other non-empty folder is refused.

    Returns:
        ``{"n", "train", "valid", "test", "positives", "test_positives", "path"}``: the row counts of
        train.csv, valid.csv and groundtruth.csv, and ``{finding: frontal images showing it}`` for
        the train and valid images and for the test images.

    Raises:
        DataError: ``out`` holds other data, or a real label file or split is missing.
        ValueError: ``n`` outside 10..5,000 or ``size`` below 32.
    """
    out = Path(out)
    if not MIN_IMAGES <= n <= MAX_IMAGES:
        raise ValueError(f"n must be between {MIN_IMAGES} and {MAX_IMAGES}, got {n}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    prepare_output(out, (RELEASE,))
    chosen, sources, test_sources = _choose(n, seed, max(MIN_TEST, round(n * TEST_SHARE)))

    text = gzip.decompress(xrv_data_file(CHEXPERT_TRAIN).read_bytes()).decode("utf-8")
    header, *shipped = text.splitlines()
    wanted = set(chosen) | set(sources) | set(test_sources)
    lines = {line.split(",", 1)[0]: line for line in shipped if line.split(",", 1)[0] in wanted}
    if len(lines) != len(wanted):
        raise DataError(f"{xrv_data_file(CHEXPERT_TRAIN)} lacks rows of split chexpert/v1; regenerate the split")
    table = shipped_table()
    index = {path: i for i, path in enumerate(table.paths)}
    train_rows = [(path, lines[path]) for path in sorted(chosen, key=index.__getitem__)]
    valid_rows = _valid_rows(sources, lines)
    test_lines, test_images = _test_rows(table.values[[index[path] for path in test_sources]])

    dataset = out / RELEASE
    if dataset.exists():
        shutil.rmtree(dataset)
    write_marker(out, "chexpert", n, seed)
    images = []  # (path below the dataset folder, findings, frontal), train and valid first
    for path, line in [*train_rows, *valid_rows]:
        fields = line.split(",")
        frontal = fields[COLUMNS.index("Frontal/Lateral")] == "Frontal"
        values = np.array([float(v) if v else np.nan for v in fields[5:]], dtype=np.float32)
        images.append((path.split("/", 1)[1], _present(values) if frontal else [], frontal))
    images += test_images
    positives = {"train": dict.fromkeys(FINDINGS, 0), "test": dict.fromkeys(FINDINGS, 0)}
    for k, (relative, findings, frontal) in enumerate(tqdm(images, desc="synth chexpert", unit="image",
                                                           disable=not progress)):
        for name in findings:
            positives["test" if relative.startswith("test/") else "train"][name] += 1
        pixels = draw([seed, k], findings, _shape(np.random.default_rng([seed, k, 1]), size), frontal=frontal)
        target = dataset / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target, format="JPEG", quality=90)
    for name, rows in (("train.csv", train_rows), ("valid.csv", valid_rows)):
        (dataset / name).write_bytes((header + "\n" + "".join(f"{line}\n" for _, line in rows)).encode())
    (dataset / GROUNDTRUTH).write_bytes("\n".join([GROUNDTRUTH_HEADER, *test_lines]).encode())
    return {"n": n, "train": len(train_rows), "valid": len(valid_rows), "test": len(test_lines),
            "positives": positives["train"], "test_positives": positives["test"], "path": str(out)}
