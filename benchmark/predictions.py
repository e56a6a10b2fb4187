"""Prediction files: what ``vlpbench run --save-predictions DIR`` writes and ``vlpbench score`` reads.

Every protocol saves its test predictions (and the validation predictions its thresholds come from) in the
format its ``score`` reads, so ``score`` on the folder gives the run's metrics, CIs and thresholds.

- Segmentation: one ``<image_id>.png`` per test image, 0 or 255, at the image's native resolution and
  thresholded as the protocol scores (a pixel is positive when its probability is strictly above the
  task's ``threshold``). ``vlpbench score`` on the folder reproduces the run's Dice when the task scores
  at native resolution (``dice_resolution: native``, the default); with ``input`` the run's Dice was
  measured on resized masks, and the saved native masks give the native-resolution Dice instead.
- Grounding: ``heatmaps.npz`` in the folder, holding the raw heat map (the model's own resolution) of
  every validation and test query, keyed as ``score`` expects (``<image_id>``, or
  ``<image_id>#<phrase index>`` for MS-CXR). With the validation maps present, ``score`` chooses the
  threshold on them as the run did, so it reproduces the run's metrics.
- Classification (linear probe, fine-tuning, zero-shot): ``predictions.csv``, a header ``image_id`` and
  one probability column per class (named as the task names its classes), one row per test image and per
  image the thresholds come from (validation images; CheXpert's valid.csv for the radiologist test set).
- Retrieval: ``similarity.npz``, the cosine similarity of every test image with every candidate text
  (``similarity``, float32, images × texts) with ``image_ids`` and ``texts`` naming its rows and columns
  (:mod:`vlpbench.protocols.retrieval`).
- Detection: ``detections.json``, COCO results ``[{"image_id", "bbox": [x, y, w, h], "score"}]`` in
  original image pixels, every detection the protocol kept for every test image.

``score`` checks every prediction where it enters, with the functions below (the ``run --save-predictions``
read-back is ``score`` on the folder, so it goes through the same checks), and refuses with a DataError naming
the file (and line, key or entry) and what was expected; no value is coerced or silently dropped:

- Segmentation (:func:`find_masks`, :func:`read_mask_values`, :func:`fit_mask`): exactly one ``.png`` or
  ``.npy`` per scored image and no other file (hidden files aside); ``.npy`` values finite and in [0, 1];
  the image's size, or its aspect ratio (then resized, with a scoring note), never stretched.
- Grounding (:func:`check_heatmap`): finite real values, any range and resolution (each map is min-max
  scaled and resized to the image); keys name test or validation images.
- Classification (:func:`read_probabilities`): every probability a number in [0, 1]; rows of images other
  than the test and threshold images are errors.
- Retrieval (:func:`vlpbench.protocols.retrieval.read_similarity`): finite floats, any range (only the
  ranking counts); exactly the task's test images and candidate texts.
- Detection (:func:`read_coco_results`): finite boxes with ``w, h >= 0`` and finite scores (any range, only
  their order counts); entries of images outside the split are errors.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlpbench.errors import ConfigError, DataError

HEATMAPS_FILE = "heatmaps.npz"
PROBABILITIES_FILE = "predictions.csv"
DETECTIONS_FILE = "detections.json"
ID_COLUMN = "image_id"


def prepare_folder(folder: str | Path) -> Path:
    """Create ``folder`` (new or empty) for a run's predictions; its absolute path.

    Called before any work starts, so a run that could not save what was asked for never trains.

    Raises:
        ConfigError: ``folder`` is a file or a non-empty folder.
    """
    folder = Path(folder).expanduser().absolute()
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


def write_probabilities(folder: Path, classes: Sequence[str], rows: Mapping[str, Sequence[float]]) -> Path:
    """Save ``{image_id: probability per class}`` as ``<folder>/predictions.csv`` (repr of each float, so
    reading it back gives the same numbers bit for bit); its path."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([ID_COLUMN, *classes])
    for image_id, values in rows.items():
        writer.writerow([image_id, *(repr(float(v)) for v in values)])
    path = folder / PROBABILITIES_FILE
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def read_probabilities(path: Path, classes: list[str], *, single_column: bool) -> dict[str, np.ndarray]:
    """``{image_id: probabilities in classes order}`` from a predictions CSV.

    ``single_column``: a header of ``image_id`` and one other column is that one class's probability,
    whatever the column is called.

    Raises:
        DataError: naming the file, and the line and column where it applies, for an unreadable file,
            a header without ``image_id`` or with missing or unknown class columns, a row with the
            wrong number of fields, an empty or repeated id, or a value that is not a number in [0, 1].
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the predictions CSV ({type(e).__name__}: {e})") from e
    reader = csv.reader(text.splitlines())
    header = [name.strip() for name in next(reader, [])]
    expected = ", ".join([ID_COLUMN, *classes])
    if ID_COLUMN not in header:
        raise DataError(f"{path} line 1: no {ID_COLUMN!r} column; expected the columns {expected}")
    others = [name for name in header if name != ID_COLUMN]
    if single_column and len(others) == 1:
        columns = {classes[0]: header.index(others[0])}
    else:
        missing = [c for c in classes if c not in header]
        unknown = [name for name in others if name not in classes]
        repeated = sorted({name for name in header if header.count(name) > 1})
        if missing or unknown or repeated:
            problems = [f"{what} {', '.join(map(repr, names))}" for what, names in
                        (("lacks", missing), ("has unknown", unknown), ("repeats", repeated)) if names]
            raise DataError(f"{path} line 1: the header {'; '.join(problems)}; expected the columns {expected}")
        columns = {c: header.index(c) for c in classes}
    id_at = header.index(ID_COLUMN)
    rows: dict[str, np.ndarray] = {}
    first_line: dict[str, int] = {}
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise DataError(f"{path} line {line}: {len(fields)} fields, the header has {len(header)}")
        image_id = fields[id_at].strip()
        if not image_id:
            raise DataError(f"{path} line {line}: empty {ID_COLUMN}")
        if image_id in first_line:
            raise DataError(f"{path} line {line}: {ID_COLUMN} {image_id} repeats line {first_line[image_id]}")
        first_line[image_id] = line
        values = []
        for name, at in columns.items():
            text = fields[at].strip()
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not 0.0 <= value <= 1.0:  # also false for NaN
                raise DataError(f"{path} line {line} column {header[at]!r}: {text!r} is not a probability "
                                "(a number in [0, 1])")
            values.append(value)
        rows[image_id] = np.array(values)
    return rows


def write_detections(folder: Path, ids: Sequence[str], detections: Sequence[Sequence[np.ndarray]], *,
                     multiclass: bool = False) -> Path:
    """Save each image's ``(boxes (K, 4) xyxy, scores (K,))`` as COCO results ``<folder>/detections.json``
    (``bbox`` = ``[x, y, width, height]`` in original pixels); its path. ``multiclass``: each image's
    ``(boxes, scores, labels)``, and every entry carries ``category_id``, the index of its class in the task's
    ``classes``."""
    entries = []
    for image_id, (boxes, scores, *labels) in zip(ids, detections):
        classes = np.asarray(labels[0], dtype=np.int64).tolist() if multiclass else [None] * len(scores)
        for (x1, y1, x2, y2), score, label in zip(np.asarray(boxes, dtype=np.float64).tolist(),
                                                  np.asarray(scores, dtype=np.float64).tolist(), classes):
            entry = {"image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
            entries.append(entry if label is None else {**entry, "category_id": label})
    path = folder / DETECTIONS_FILE
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def read_coco_results(path: Path, split_ids: Sequence[str], *, n_classes: int | None = None) -> dict[str, tuple]:
    """A COCO-results JSON ``[{"image_id", "bbox": [x, y, w, h], "score"}, ...]`` (original pixels) as
    ``{image_id: (boxes (K, 4) xyxy, scores (K,))}`` for every id of ``split_ids`` (no entry: no detection).
    With ``n_classes`` (a task with several classes) every entry needs ``category_id``, the index of its class
    in the task's ``classes``, and each image gives ``(boxes, scores, labels (K,) int64)``.

    Raises:
        DataError: the file is unreadable or not a JSON list; an entry is not an object, lacks a key, has
            a non-string ``image_id``, a ``bbox`` that is not four finite numbers with ``w, h >= 0``, a
            non-finite ``score`` or a ``category_id`` that is not an integer in ``0..n_classes-1`` (the message
            names the entry's index and the key); or entries name images outside the split (the message
            names one).
    """
    try:
        entries = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"predictions file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{\"image_id\", \"bbox\", \"score\"}} objects "
                        f"(COCO results), found a {type(entries).__name__}")
    boxes: dict[str, list[list[float]]] = {image_id: [] for image_id in split_ids}
    scores: dict[str, list[float]] = {image_id: [] for image_id in split_ids}
    labels: dict[str, list[int]] = {image_id: [] for image_id in split_ids}
    keys = ("image_id", "bbox", "score") if n_classes is None else ("image_id", "bbox", "score", "category_id")
    outside: list[str] = []
    for index, entry in enumerate(entries):
        where = f"{path}: entry {index}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object with image_id, bbox and score, found {entry!r}")
        for key in keys:
            if key not in entry:
                raise DataError(f"{where}: missing key {key!r}")
        image_id, bbox, score = entry["image_id"], entry["bbox"], entry["score"]
        if not isinstance(image_id, str):
            raise DataError(f"{where}: 'image_id' must be the dataset's image id as a string, found {image_id!r}")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
            raise DataError(f"{where}: 'bbox' must be [x, y, width, height], four finite numbers, found {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DataError(f"{where}: 'bbox' width and height must be >= 0, found {bbox!r}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"{where}: 'score' must be a finite number, found {score!r}")
        category = entry.get("category_id") if n_classes is not None else 0
        if isinstance(category, bool) or not isinstance(category, int) or not 0 <= category < (n_classes or 1):
            raise DataError(f"{where}: 'category_id' must be the class index, an integer in 0..{(n_classes or 1) - 1}, "
                            f"found {category!r}")
        if image_id not in boxes:
            outside.append(image_id)
            continue
        x, y, w, h = (float(v) for v in bbox)
        boxes[image_id].append([x, y, x + w, y + h])
        scores[image_id].append(float(score))
        labels[image_id].append(category)
    if outside:
        raise DataError(f"{path}: {len(outside)} entries name images outside the split being scored, "
                        f"e.g. {outside[0]!r}")
    read = {image_id: (np.array(boxes[image_id], dtype=np.float64).reshape(-1, 4),
                       np.array(scores[image_id], dtype=np.float64)) for image_id in split_ids}
    if n_classes is None:
        return read
    return {image_id: (*pair, np.array(labels[image_id], dtype=np.int64)) for image_id, pair in read.items()}


def is_real(dtype: np.dtype) -> bool:
    """Whether ``dtype`` holds real numbers (bool, int or float): not complex, text or objects."""
    return dtype == np.bool_ or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


def check_heatmap(path: Path, key: str, heat: np.ndarray) -> np.ndarray:
    """``heat``, the grounding heat map under ``key`` of ``path``, checked at the door: a non-empty 2-D array of
    finite real numbers. Any range and any resolution: the protocol min-max scales each map and resizes it
    to the image, so only the order of its values within the map counts.

    Raises:
        DataError: naming the file, the key and what was found.
    """
    if heat.ndim != 2 or 0 in heat.shape or heat.dtype == np.bool_ or not is_real(heat.dtype):  # bool: no order
        raise DataError(f"{path} key {key!r}: expected a 2-D numeric heat map (H, W), got "
                        f"shape {heat.shape} of {heat.dtype}")
    if not np.isfinite(heat).all():
        raise DataError(f"{path} key {key!r}: the heat map holds NaN or infinite values")
    return heat


def read_mask_values(path: Path) -> np.ndarray:
    """A segmentation prediction file checked at the door, as a float32 array at its own size.

    PNG: any image; non-zero is positive (1.0), zero negative. NPY: a 2-D array of real numbers (bool, int
    or float; no pickles), every value finite and in [0, 1] (probabilities, thresholded as the task
    thresholds). A NaN, an infinity or a value outside [0, 1] is refused rather than thresholded into an
    empty or a full mask.

    Raises:
        DataError: naming the file: unreadable, not a non-empty 2-D array, not real numbers, or values
            that are not finite probabilities (with how many and the range found).
    """
    try:
        if path.suffix == ".png":
            with Image.open(path) as image:
                return (np.asarray(image.convert("L")) > 0).astype(np.float32)
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the prediction: {exc}") from exc
    if not isinstance(values, np.ndarray):  # an .npz archive under a .npy name
        values.close()
        raise DataError(f"{path}: expected one 2-D array (.npy), found an .npz archive")
    if values.ndim != 2 or 0 in values.shape:
        raise DataError(f"{path}: expected a 2-D mask (H, W) of probabilities, got shape {values.shape}")
    if not is_real(values.dtype):
        raise DataError(f"{path}: expected probabilities (bool, int or float), found dtype {values.dtype}")
    finite = np.isfinite(values)
    if not finite.all():
        raise DataError(f"{path}: {values.size - int(finite.sum())} of {values.size} values are NaN or infinite; "
                        "expected probabilities in [0, 1]")
    low, high = values.min(), values.max()
    if low < 0 or high > 1:
        hint = " (a 0/255 mask belongs in a .png)" if high > 1 else ""
        raise DataError(f"{path}: values range from {low:g} to {high:g}; expected probabilities in [0, 1]{hint}")
    return values.astype(np.float32)


def fit_mask(path: Path, mask: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """``mask`` (from :func:`read_mask_values`) at the image's ``shape``.

    The resize rule: a mask at another size is resized to ``shape`` (PNG masks with nearest neighbour, .npy
    probabilities bilinearly) only when it has the image's aspect ratio, up to the rounding of one side to
    whole pixels (``|w*H - h*W| < max(H, W)``); a mask of another aspect ratio would be stretched, so it is
    refused.

    Raises:
        DataError: naming the file, the mask's size and the image's.
    """
    (h, w), (height, width) = mask.shape, tuple(shape)
    tensor = torch.from_numpy(mask)
    if (h, w) == (height, width):
        return tensor
    if abs(w * height - h * width) >= max(height, width):
        raise DataError(f"{path}: a {h}x{w} (HxW) mask for a {height}x{width} image; expected the image's size "
                        "or its aspect ratio (a mask is resized, never stretched)")
    mode, kwargs = ("nearest", {}) if path.suffix == ".png" else ("bilinear", {"align_corners": False})
    return F.interpolate(tensor[None, None], size=(height, width), mode=mode, **kwargs)[0, 0]


def read_prediction_mask(path: Path, shape: tuple[int, int]) -> torch.Tensor:
    """A segmentation prediction as probabilities at ``shape``: :func:`read_mask_values` then
    :func:`fit_mask` (the checks and the resize rule are theirs)."""
    return fit_mask(path, read_mask_values(path), shape)


MASK_SUFFIXES = (".png", ".npy")


def find_masks(folder: Path, ids: Sequence[str], *, complete: bool = True) -> dict[str, Path]:
    """``<image_id>.png`` (or ``.npy``) for every id.

    ``complete``: the folder holds the predictions of exactly ``ids`` (as ``score`` requires), so any other
    file is an error; hidden files (a name starting with ".") are skipped. False looks up ``ids`` only.

    Raises:
        DataError: naming the folder: it does not exist, ids without a prediction (how many, a few of them),
            an id with both a .png and a .npy, or (``complete``) files that are no id's prediction.
    """
    if not folder.is_dir():
        raise DataError(f"predictions folder {folder} does not exist")
    found: dict[str, Path] = {}
    missing, both = [], []
    for image_id in ids:
        candidates = [folder / f"{image_id}{suffix}" for suffix in MASK_SUFFIXES]
        present = [candidate for candidate in candidates if candidate.is_file()]
        if not present:
            missing.append(image_id)
        elif len(present) > 1:
            both.append(image_id)
        else:
            found[image_id] = present[0]
    if missing:
        raise DataError(f"{folder}: {len(missing)} of {len(ids)} test images have no prediction "
                        f"(<image_id>.png or .npy), e.g. {', '.join(missing[:3])}")
    if both:
        raise DataError(f"{folder}: {len(both)} images have both a .png and a .npy prediction, e.g. "
                        f"{both[0]}; keep one")
    if complete:
        known = set(found.values())
        unknown = sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                         if path.is_file() and path not in known
                         and not any(part.startswith(".") for part in path.relative_to(folder).parts))
        if unknown:
            raise DataError(f"{folder}: {len(unknown)} file(s) are not the prediction of a test image "
                            f"(<image_id>.png or .npy for the {len(ids)} images scored), e.g. "
                            f"{', '.join(unknown[:3])}")
    return found
