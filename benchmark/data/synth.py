"""Synthetic SIIM-ACR dataset in the real on-disk format, built from the real label file.

:func:`synth_siim` picks real ImageIds from the committed split ``siim/v1``, copies their real
rows of the stage-2 label file, and writes one SIIM-style DICOM per image whose picture carries
the real pneumothorax mask as a visible, learnable lesion: a chest with a body silhouette, two
lungs from a real lung mask, ribs, lung markings and noise; each pneumothorax region is darker
than lung, has no lung markings and is rimmed by a thin bright pleural line.
"""

from __future__ import annotations

import gzip
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from vlpbench.data.dicom import write_dicom
from vlpbench.data.lungs import load_lung_masks
from vlpbench.data.siim import EMPTY, HEIGHT, SYNTHETIC_MARKER, WIDTH, decode_rle
from vlpbench.data.splits import apportion, load_split
from vlpbench.data.xrv_files import SIIM_RLE, xrv_data_file
from vlpbench.errors import DataError

LABEL_FILE = "stage_2_train.csv"
DICOM_DIR = "dicom-images-train"
GENERATOR = "vlpbench synth"
UID_PREFIX = "1.2.276.0.7230010.3.1.4."

# Share of the sample drawn from each part of split v1: test/val/train 15/15/70, and within
# train the 1 % subset, the rest of the 10 % subset and the rest of train 1:9:90.
TOP_WEIGHTS = (15, 15, 70)
TRAIN_WEIGHTS = (1, 9, 90)

# Anatomy is drawn at this size and resized: it is smooth, so only the lesion, its pleural line
# and the grain need the full resolution.
ANATOMY_SIZE = 256
LUNG_CANDIDATES = 16  # lung masks tried per positive image; the one covering the lesion best wins
PIXEL_SPACINGS = (0.139, 0.143, 0.168, 0.171)  # mm at 1024 px, values seen in the real files

# Grey levels (0-255). The lesion sits far below aerated lung so that a small U-Net separates
# it within a few epochs at 64-128 px.
BACKGROUND, TISSUE, LUNG, LESION, PLEURA = 10.0, 150.0, 78.0, 30.0, 80.0


def _at_least_one(counts: list[int]) -> list[int]:
    """Give every empty part one item taken from the largest part, where the total allows."""
    counts = list(counts)
    if sum(counts) >= len(counts):
        for i, count in enumerate(counts):
            if count == 0:
                counts[i] = 1
                counts[counts.index(max(counts))] -= 1
    return counts


def _choose_ids(n: int, seed: int) -> list[str]:
    """Draw ``n`` ImageIds from split siim/v1: proportionally from its parts, and with the
    positives apportioned over the parts like the split's positive rates."""
    split = load_split("siim", "v1")
    train, sub10, sub1 = (split.labels(p) for p in ("train", "train_10pct", "train_1pct"))
    pools = [
        split.labels("test"),
        split.labels("val"),
        sub1,
        {i: y for i, y in sub10.items() if i not in sub1},
        {i: y for i, y in train.items() if i not in sub10},
    ]
    available = sum(len(pool) for pool in pools)
    if not 1 <= n <= available:
        raise ValueError(f"n must be between 1 and {available} (the images of split siim/v1), got {n}")
    sizes = [len(pool) for pool in pools]
    n_test, n_val, n_train = _at_least_one(apportion(n, TOP_WEIGHTS, [sizes[0], sizes[1], len(train)]))
    counts = [n_test, n_val, *_at_least_one(apportion(n_train, TRAIN_WEIGHTS, sizes[2:]))]
    # Apportion the positives over all parts at once: per-part rounding would lose most of
    # them in a small sample (12 images would get 1 instead of 3).
    n_pos = [sum(pool.values()) for pool in pools]
    expected = [count * pos / size for count, pos, size in zip(counts, n_pos, sizes)]
    n_neg = [size - pos for size, pos in zip(sizes, n_pos)]
    positives = apportion(round(sum(expected)), expected, [min(c, p) for c, p in zip(counts, n_pos)])
    # A part may lack negatives for its share (a tiny pool): such a part takes more positives.
    positives = [max(p, c - neg) for p, c, neg in zip(positives, counts, n_neg)]

    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for pool, count, k in zip(pools, counts, positives):
        for label, wanted in ((1, k), (0, count - k)):
            members = sorted(i for i, y in pool.items() if y == label)
            chosen.extend(members[j] for j in rng.permutation(len(members))[:wanted])
    return chosen


def _uids(image_id: str) -> tuple[str, str]:
    """Study and series UIDs of a SIIM image, derived from its SOP Instance UID as in the real
    files: ``...3.1.2...``/``...3.1.3...`` with the same ``<n>.<t>`` part, last part - 1 / - 2."""
    if not image_id.startswith(UID_PREFIX):
        raise DataError(f"ImageId {image_id} does not start with {UID_PREFIX}")
    parts = image_id.split(".")
    last = int(parts[-1])
    study = ".".join(parts[:7] + ["2"] + parts[8:-1] + [str(last - 1)])
    series = ".".join(parts[:7] + ["3"] + parts[8:-1] + [str(last - 2)])
    return study, series


def _resize(field: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float field to size x size (Pillow's 'F' mode, fast and smooth)."""
    if field.shape == (size, size):
        return field
    return np.asarray(Image.fromarray(field.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))


def _blur(mask: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a [0, 1] mask, via Pillow's 8-bit filter (its float mode has none)."""
    image = Image.fromarray(np.rint(mask * 255).astype(np.uint8), mode="L")
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Zero-mean, unit-ish noise that varies over about ``size / cells`` pixels."""
    return _resize(rng.standard_normal((cells, cells)).astype(np.float32), size)


def _anatomy(rng: np.random.Generator, lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chest without lesion at the lung mask's size: (grey levels, lung markings)."""
    size = lung.shape[0]
    soft_lung = _blur(lung, size / 128)
    rows, cols = np.nonzero(lung)
    top, bottom = rows.min() / size, rows.max() / size
    left, right = cols.min() / size, cols.max() / size
    centre, half = (left + right) / 2, max((right - left) / 2, 0.15)
    y = (np.arange(size, dtype=np.float32) / size)[:, None]
    x = (np.arange(size, dtype=np.float32) / size)[None, :]

    # Body: a soft super-ellipse around the lungs that runs off the top and bottom of the film.
    radius = (np.abs(x - centre) / min(half * 1.3, 0.5)) ** 4 + (np.abs(y - (top + bottom) / 2 - 0.1) / 0.8) ** 4
    body = 1 / (1 + np.exp((radius - 1) * 12))
    # Spine and mediastinum down the middle, the heart low and to the image right.
    spine = np.exp(-(((x - centre) / 0.06) ** 2)) * (y > top - 0.05)
    heart = np.exp(-(((x - centre - 0.06) / 0.13) ** 2 + ((y - bottom + 0.15) / 0.12) ** 2))
    # Posterior ribs: bands that curve down away from the spine, plain over the thorax and
    # faint over the abdomen and the arms.
    period = rng.uniform(0.065, 0.085)
    phase = (y + 0.9 * (x - centre) ** 2) / period + rng.uniform(0, 1)
    thorax = np.clip(2 * _blur(lung, size / 12), 0, 1)
    ribs = np.clip(np.sin(2 * np.pi * phase), 0, None) ** 3 * body * (0.2 + 0.8 * thorax)

    tissue = TISSUE + rng.uniform(-15, 15) + 8 * _smooth_noise(rng, 6, size)
    grey = BACKGROUND + (tissue - BACKGROUND) * body + 45 * spine * body
    lung_level = LUNG + rng.uniform(-8, 8) + 6 * _smooth_noise(rng, 8, size)
    grey = grey * (1 - soft_lung) + lung_level * soft_lung + 40 * heart * body + 24 * ribs
    # Vessel markings fade towards the periphery of the lung.
    markings = (7 * _smooth_noise(rng, 24, size) + 5 * _smooth_noise(rng, 48, size)) * soft_lung
    markings *= np.exp(-(((x - centre) / (half * 1.2)) ** 2))
    return grey, markings


def _render(rng: np.random.Generator, lung: np.ndarray, lesion: np.ndarray | None, size: int) -> np.ndarray:
    """The uint8 picture: anatomy resized to ``size``, then the lesion and the grain at ``size``."""
    grey, markings = _anatomy(rng, lung)
    grey, markings = _resize(grey, size), _resize(markings, size)
    if lesion is not None:
        inside = _blur(lesion, max(size / 1024, 0.5))
        # The pleural line lies just outside the lesion: where a wider blur of the mask spills
        # further out than the narrow one.
        rim = _blur(lesion, max(size / 400, 1.0))
        pleura = np.clip(5 * (rim - inside), 0, 1)
        lesion_level = LESION + rng.uniform(-5, 5)
        grey = grey * (1 - inside) + lesion_level * inside + PLEURA * pleura
        markings = markings * (1 - inside)
    grey = grey + markings + 3 * rng.standard_normal((size, size), dtype=np.float32)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def _lesion(masks: list[str], size: int) -> np.ndarray:
    """Union of the real RLE masks (1024 x 1024) as a float mask at size x size."""
    union = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for rle in masks:
        union |= decode_rle(rle)
    return _resize(union.astype(np.float32), size)


def _place(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    """The lung mask shrunk into the film with a margin, so that the body outline shows."""
    size = lung.shape[0]
    side = int(size * rng.uniform(0.82, 0.94))
    margin = size - side
    top = int(margin * rng.uniform(0.2, 0.8))
    left = int(margin * rng.uniform(0.35, 0.65))
    placed = np.zeros_like(lung)
    placed[top : top + side, left : left + side] = np.asarray(Image.fromarray(lung * 255).resize((side, side))) > 127
    return placed


def _pick_lung(rng: np.random.Generator, lungs: list[np.ndarray], lesion: np.ndarray | None) -> np.ndarray:
    """A random real lung mask, placed; for a lesion, the candidate that covers most of it."""
    candidates = [_place(rng, lungs[i]) for i in rng.choice(len(lungs), size=LUNG_CANDIDATES, replace=False)]
    if lesion is None:
        return candidates[0]
    target = _resize(lesion, candidates[0].shape[0])
    return max(candidates, key=lambda lung: float((lung * target).sum()))


def _check_out(out: Path) -> None:
    """Refuse anything but a missing folder, an empty one, or a previous synth output."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = out / SYNTHETIC_MARKER
    try:
        ours = json.loads(marker.read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ours = False
    others = sorted(p.name for p in out.iterdir() if p.name not in (SYNTHETIC_MARKER, LABEL_FILE, DICOM_DIR))
    if not ours or others:
        raise DataError(
            f"{out} is not empty and is not a vlpbench synthetic dataset "
            f"({'unexpected entries ' + ', '.join(others[:5]) if ours else 'no ' + SYNTHETIC_MARKER}); "
            "refusing to write into it; choose an empty or new folder"
        )


def synth_siim(out: str | Path, n: int = 200, seed: int = 0, *, size: int = 1024, progress: bool = True) -> dict:
    """Write a synthetic SIIM-ACR dataset of ``n`` images to ``out`` in the real on-disk format.

    Layout: ``out/stage_2_train.csv`` (header ``ImageId,EncodedPixels``, LF, the shipped rows of
    the chosen images in shipped order), ``out/dicom-images-train/<study>/<series>/<ImageId>.dcm``
    (SIIM-style JPEG-Baseline DICOMs, ``size`` x ``size``) and ``out/VLPBENCH_SYNTHETIC.json``.
    The ImageIds are real and drawn from split siim/v1: 15/15/70 from test/val/train, and within
    train 1:9:90 from train_1pct, the rest of train_10pct and the rest of train, stratified by
    label. Deterministic given ``seed``.

    A previous synth output in ``out`` is replaced; any other non-empty folder is refused.

    Returns:
        ``{"n", "positives", "path"}``.

    Raises:
        DataError: ``out`` holds other data, or a real label file is missing.
        ValueError: ``n`` is outside 1..12,047 or ``size`` is below 32.
    """
    out = Path(out)
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    _check_out(out)
    chosen = _choose_ids(n, seed)

    # The shipped rows of the chosen images, byte for byte and in shipped order (the rows of one
    # image are not always adjacent there).
    shipped = gzip.decompress(xrv_data_file(SIIM_RLE).read_bytes()).decode("utf-8").splitlines()[1:]
    wanted = set(chosen)
    rows = [row for row in shipped if row.split(",", 1)[0] in wanted]
    masks: dict[str, list[str]] = {}
    for row in rows:
        image_id, rle = row.split(",")
        masks.setdefault(image_id, []).append(rle)

    if (out / DICOM_DIR).exists():
        shutil.rmtree(out / DICOM_DIR)
    (out / LABEL_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    # The marker goes first so that an interrupted run can be re-run into the same folder; the
    # label file goes last so that a partial dataset cannot be read as complete.
    marker = {"dataset": "siim", "n": n, "seed": seed, "generator": GENERATOR}
    (out / SYNTHETIC_MARKER).write_text(json.dumps(marker, sort_keys=True, indent=2) + "\n")

    lungs = load_lung_masks(ANATOMY_SIZE)
    positives = 0
    for index, image_id in enumerate(tqdm(chosen, desc="synth siim", unit="image", disable=not progress)):
        rng = np.random.default_rng([seed, index])
        lesion = None if masks[image_id][0] == EMPTY else _lesion(masks[image_id], size)
        positives += lesion is not None
        pixels = _render(rng, _pick_lung(rng, lungs, lesion), lesion, size)
        study, series = _uids(image_id)
        write_dicom(
            out / DICOM_DIR / study / series / f"{image_id}.dcm",
            pixels,
            sop_instance_uid=image_id,
            study_instance_uid=study,
            series_instance_uid=series,
            patient_id=str(uuid.UUID(bytes=rng.bytes(16), version=4)),
            patient_sex=str(rng.choice(["M", "F"])),
            patient_age=int(rng.integers(18, 91)),
            view_position=str(rng.choice(["PA", "AP"], p=[0.55, 0.45])),
            pixel_spacing=float(rng.choice(PIXEL_SPACINGS)) * 1024 / size,
        )
    (out / LABEL_FILE).write_bytes(("ImageId,EncodedPixels\n" + "".join(f"{row}\n" for row in rows)).encode())
    return {"n": n, "positives": positives, "path": str(out)}

