"""Synthetic chest radiographs: real lung shapes, a body, ribs, lung markings, and lesions drawn where labels say.

Shared by every synthesizer in :mod:`vlpbench.synthetic`, so that each synthetic dataset carries a learnable
signal on the same anatomy: a lesion is rendered inside the picture exactly where the real label
file puts it (an RLE mask, a box, an object outline), and a model can learn to find it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from vlpbench.data import SYNTHETIC_MARKER
from vlpbench.errors import DataError
from vlpbench.synthetic.lungs import load_lung_masks

GENERATOR = "vlpbench synth"

# Anatomy is drawn at this size and resized: it is smooth, so only lesions and the grain need the
# full resolution.
ANATOMY_SIZE = 256
LUNG_CANDIDATES = 16  # lung masks tried per image with a lesion; the one covering it best wins

# Grey levels (0-255). A pneumothorax sits far below aerated lung, an opacity far above it, so
# that a small network separates them within a few epochs at 64-128 px.
BACKGROUND, TISSUE, LUNG, PNEUMOTHORAX, PLEURA, OPACITY = 10.0, 150.0, 78.0, 30.0, 80.0, 170.0


def lungs() -> list[np.ndarray]:
    """The real lung masks at the anatomy size (cached per process)."""
    return load_lung_masks(ANATOMY_SIZE)

def resize_field(field: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float field to size x size (Pillow's 'F' mode, fast and smooth)."""
    if field.shape == (size, size):
        return field
    return np.asarray(Image.fromarray(field.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
def blur(mask: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a [0, 1] mask, via Pillow's 8-bit filter (its float mode has none)."""
    # A uint8 mask times 255 is already whole: rounding it would only go through float16, slowly.
    scaled = mask * np.uint8(255) if mask.dtype == np.uint8 else np.rint(mask * 255).astype(np.uint8)
    image = Image.fromarray(scaled, mode="L")
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255
def smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Zero-mean, unit-ish noise that varies over about ``size / cells`` pixels."""
    return resize_field(rng.standard_normal((cells, cells)).astype(np.float32), size)
def anatomy(rng: np.random.Generator, lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chest without lesion at the lung mask's size: (grey levels, lung markings)."""
    size = lung.shape[0]
    soft_lung = blur(lung, size / 128)
    rows, cols = np.flatnonzero(lung.any(axis=1)), np.flatnonzero(lung.any(axis=0))
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
    thorax = np.clip(2 * blur(lung, size / 12), 0, 1)
    ribs = np.clip(np.sin(2 * np.pi * phase), 0, None) ** 3 * body * (0.2 + 0.8 * thorax)

    tissue = TISSUE + rng.uniform(-15, 15) + 8 * smooth_noise(rng, 6, size)
    grey = BACKGROUND + (tissue - BACKGROUND) * body + 45 * spine * body
    lung_level = LUNG + rng.uniform(-8, 8) + 6 * smooth_noise(rng, 8, size)
    grey = grey * (1 - soft_lung) + lung_level * soft_lung + 40 * heart * body + 24 * ribs
    # Vessel markings fade towards the periphery of the lung.
    markings = (7 * smooth_noise(rng, 24, size) + 5 * smooth_noise(rng, 48, size)) * soft_lung
    markings *= np.exp(-(((x - centre) / (half * 1.2)) ** 2))
    return grey, markings
def _placement(rng: np.random.Generator, size: int) -> tuple[int, int, int]:
    """Where :func:`place_lung` puts a lung mask of ``size``: (side, top, left)."""
    side = int(size * rng.uniform(0.82, 0.94))
    margin = size - side
    top = int(margin * rng.uniform(0.2, 0.8))
    left = int(margin * rng.uniform(0.35, 0.65))
    return side, top, left
def _placed(lung: np.ndarray, side: int, top: int, left: int) -> np.ndarray:
    placed = np.zeros_like(lung)
    placed[top : top + side, left : left + side] = np.asarray(Image.fromarray(lung * 255).resize((side, side))) > 127
    return placed
def place_lung(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    """The lung mask shrunk into the film with a margin, so that the body outline shows."""
    return _placed(lung, *_placement(rng, lung.shape[0]))
def pick_lung(rng: np.random.Generator, lungs: list[np.ndarray], lesion: np.ndarray | None) -> np.ndarray:
    """A random real lung mask, placed; for a lesion, the candidate that covers most of it."""
    picks = [(lungs[i], _placement(rng, lungs[i].shape[0]))
             for i in rng.choice(len(lungs), size=LUNG_CANDIDATES, replace=False)]
    # Every candidate's placement is drawn, so that the draws that follow do not depend on the lesion;
    # without a lesion only the first is drawn into the film.
    if lesion is None:
        return _placed(picks[0][0], *picks[0][1])
    candidates = [_placed(lung, *placement) for lung, placement in picks]
    target = resize_field(lesion, candidates[0].shape[0])
    return max(candidates, key=lambda lung: float((lung * target).sum()))


def render(rng: np.random.Generator, lung: np.ndarray, size: int, *, pneumothorax: np.ndarray | None = None,
           opacity: np.ndarray | None = None, bright: np.ndarray | None = None) -> np.ndarray:
    """The uint8 picture: anatomy resized to ``size``, then lesions and the grain at ``size``.

    Lesion masks are float [0, 1] fields at ``size``: ``pneumothorax`` is dark, without lung markings
    and rimmed by a bright pleural line; ``opacity`` is a soft bright consolidation that keeps faint
    markings; ``bright`` is a near-white foreign object with a sharp edge.
    """
    grey, markings = anatomy(rng, lung)
    grey, markings = resize_field(grey, size), resize_field(markings, size)
    if pneumothorax is not None:
        inside = blur(pneumothorax, max(size / 1024, 0.5))
        # The pleural line lies just outside the lesion: where a wider blur of the mask spills
        # further out than the narrow one.
        rim = blur(pneumothorax, max(size / 400, 1.0))
        pleura = np.clip(5 * (rim - inside), 0, 1)
        level = PNEUMOTHORAX + rng.uniform(-5, 5)
        grey = grey * (1 - inside) + level * inside + PLEURA * pleura
        markings = markings * (1 - inside)
    if opacity is not None:
        inside = blur(opacity, max(size / 128, 1.0))
        level = OPACITY + rng.uniform(-10, 10) + 10 * smooth_noise(rng, 16, size)
        grey = grey * (1 - inside) + level * inside
        markings = markings * (1 - 0.7 * inside)
    if bright is not None:
        inside = blur(bright, max(size / 1024, 0.5))
        grey = grey * (1 - inside) + 245.0 * inside
        markings = markings * (1 - inside)
    grey = grey + markings + 3 * rng.standard_normal((size, size), dtype=np.float32)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def prepare_output(out: Path, entries: tuple[str, ...]) -> None:
    """Refuse anything but a missing folder, an empty one, or a previous synth output.

    ``entries`` are the names a synth output of this dataset may hold besides the marker; a
    previous output with anything else in it is refused too, so no user file is ever replaced.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = out / SYNTHETIC_MARKER
    try:
        ours = json.loads(marker.read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ours = False
    others = sorted(p.name for p in out.iterdir() if p.name not in (SYNTHETIC_MARKER, *entries))
    if not ours or others:
        raise DataError(
            f"{out} is not empty and is not a vlpbench synthetic dataset "
            f"({'unexpected entries ' + ', '.join(others[:5]) if ours else 'no ' + SYNTHETIC_MARKER}); "
            "refusing to write into it; choose an empty or new folder"
        )


def write_marker(out: Path, dataset: str, n: int, seed: int) -> None:
    """Mark ``out`` as synthetic; readers report it and result records carry it.

    Written first, so that an interrupted run can be re-run into the same folder; each synth
    writes its label file last, so that a partial dataset cannot be read as complete.
    """
    out.mkdir(parents=True, exist_ok=True)
    marker = {"dataset": dataset, "n": n, "seed": seed, "generator": GENERATOR}
    (out / SYNTHETIC_MARKER).write_text(json.dumps(marker, sort_keys=True, indent=2) + "\n")
