"""Synthetic VinDr-CXR dataset in the real on-disk format, built from the real train labels that ship.

:func:`synth_vindr` picks real train image ids from the committed split ``vindr/v1`` and copies their real
radiologist rows of the Kaggle release's ``train.csv`` (torchxrayvision's ``vinbigdata-train.csv.gz``) into
``annotations_train.csv``, with their image labels in ``image_labels_train.csv`` (one row per radiologist).
Test images get invented ids (the test labels do not ship) and borrow the fused boxes of other real train
images as their consensus rows. Every image is a 16-bit DICOM whose picture carries each box as a soft
bright opacity (:mod:`vlpbench.synthetic.chest`), so a detector or classifier can learn it.
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from vlpbench.data.splits import apportion, load_split, stratified_sample
from vlpbench.data.vindr import (
    ANNOTATION_COLUMNS,
    FINDINGS,
    IMAGE_SUFFIX,
    KAGGLE_TRAIN,
    LABELS,
    NO_FINDING,
    SPLIT_COLUMN,
    annotation_file,
    fuse_boxes,
    image_label_file,
)
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.synthetic.chest import lungs as lung_masks
from vlpbench.synthetic.chest import pick_lung, prepare_output, render, write_marker

ANNOTATIONS = "annotations"
TRAIN_LABEL_HEADER = ("image_id", "rad_ID", *LABELS)
# The test file's last global label as one of the sources read spells it (vindr.LABEL_SPELLINGS).
TEST_LABEL_HEADER = ("image_id", *LABELS[:-2], "Other disease", LABELS[-1])
TEST_SHARE = 3000 / 18000  # of the images: the release's test share
TRAIN_POOLS = ("val", "train_1pct", "train_10pct", "train")  # drawn in this order, each without the previous
NATIVE_SIDE = (2000, 3100)  # the real images are about this many pixels per side (box coordinates reach 3,384)
BITS_STORED = 12


def _kaggle_rows() -> dict[str, list[list[str]]]:
    """The shipped train rows ``[class_name, rad_id, x_min, y_min, x_max, y_max]`` per image, in file order."""
    text = gzip.decompress(xrv_data_file(KAGGLE_TRAIN).read_bytes()).decode("utf-8")
    rows: dict[str, list[list[str]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        rows.setdefault(row["image_id"], []).append(
            [row["class_name"], row["rad_id"], row["x_min"], row["y_min"], row["x_max"], row["y_max"]])
    return rows


def _train_ids(n: int, seed: int) -> list[str]:
    """``n`` train ids of split vindr/v1: from val, train_1pct, the rest of train_10pct and the rest of train
    in proportion to their sizes, each part at least one where ``n`` allows, stratified on ``abnormal``."""
    split = load_split("vindr", "v1")
    taken: set[str] = set()
    pools = []
    for part in TRAIN_POOLS:
        labels = {i: y for i, y in split.labels(part, SPLIT_COLUMN).items() if i not in taken}
        pools.append(labels)
        taken |= set(labels)
    counts = apportion(n, [len(pool) for pool in pools])
    for k in range(len(counts)):
        if counts[k] == 0 and max(counts) > 1:
            counts[counts.index(max(counts))] -= 1
            counts[k] = 1
    chosen = []
    for pool, count in zip(pools, counts):
        ids = sorted(pool)
        chosen += stratified_sample(ids, [pool[i] for i in ids], count, seed)
    return chosen


def _native_size(rng: np.random.Generator, boxes: np.ndarray) -> tuple[int, int]:
    """(H, W) of a real-sized film that holds every box with a margin."""
    reach = boxes[:, 2:].max(axis=0) if len(boxes) else np.zeros(2)
    height, width = (max(int(rng.integers(*NATIVE_SIDE)), int(np.ceil(r * 1.05)) + 1) for r in reach[::-1])
    return height, width


def _write_dicom(path: Path, pixels: np.ndarray, image_id: str) -> None:
    """``pixels`` (uint8, bright = dense) as a 16-bit MONOCHROME1 DICOM with 12 stored bits, uncompressed."""
    stored = ((255 - pixels.astype(np.uint16)) << (BITS_STORED - 8)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[image_id])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = image_id
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _picture(rng: np.random.Generator, lungs: list[np.ndarray], boxes: np.ndarray, height: int,
             width: int) -> np.ndarray:
    """A chest of ``height`` x ``width`` with a bright opacity in every box (xyxy pixels of that size)."""
    side = max(height, width)
    field = np.zeros((side, side), dtype=np.float32)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).astype(np.int64).tolist():
        field[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)] = 1.0
    lung = pick_lung(rng, lungs, field if len(boxes) else None)
    return render(rng, lung, side, opacity=field if len(boxes) else None)[:height, :width]


def _number(value: float) -> str:
    return repr(round(float(value), 1))


def synth_vindr(out: str | Path, n: int = 120, seed: int = 0, *, size: int = 256, progress: bool = True) -> dict:
    """Write a synthetic VinDr-CXR dataset of ``n`` images to ``out`` in the real on-disk format.

    Layout: ``out/annotations/annotations_{train,test}.csv`` (``image_id,rad_id,class_name,x_min,y_min,x_max,
    y_max``, a ``No finding`` row with empty box fields), ``out/annotations/image_labels_train.csv``
    (``image_id,rad_ID`` and the 28 labels, one row per radiologist), ``image_labels_test.csv`` (``image_id``
    and the 28 labels, ``Other disease`` spelled as some sources read the test file), ``out/train/<id>.dicom``,
    ``out/test/<id>.dicom`` and ``out/VLPBENCH_SYNTHETIC.json``.

    About a sixth of the images are test images, the rest real train ids drawn from split vindr/v1 (val,
    1 %, 10 % and train, :func:`_train_ids`) with their real rows (14 findings; a train image's labels mark what
    its radiologist boxed, so the two files agree). A test image gets a random 32-hex id and, as consensus
    rows, the radiologist-fused boxes (:func:`vlpbench.data.vindr.fuse_boxes`) of another real train image,
    abnormal about as often as the train images. Each film has a real-like size (the boxes fit in it),
    resized so that its longer side is ``size``; the coordinates are scaled with it (one decimal). The test
    rows' ``rad_id`` is left empty. Deterministic given ``seed``; a previous synth output in ``out`` is
    replaced, any other non-empty folder refused.

    Returns:
        ``{"n", "train", "test", "abnormal", "path"}``.

    Raises:
        DataError: ``out`` holds other data, or the shipped label file is missing.
        ValueError: ``n`` is below 2 or above the split's images, or ``size`` below 32.
    """
    out = Path(out)
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    if n < 2:
        raise ValueError(f"n must be at least 2 (one train and one test image), got {n}")
    n_test = max(1, round(n * TEST_SHARE))
    prepare_output(out, (ANNOTATIONS, "train", "test"))
    shipped = _kaggle_rows()
    train_ids = _train_ids(n - n_test, seed)
    rng = np.random.default_rng(seed)
    chosen = set(train_ids)
    donors = sorted(i for i in shipped if i not in chosen)
    donor_abnormal = [int(any(r[0] != NO_FINDING for r in shipped[i])) for i in donors]
    borrowed = stratified_sample(donors, donor_abnormal, n_test, seed)
    test_ids = []
    while len(test_ids) < n_test:
        candidate = "".join(rng.choice(list("0123456789abcdef"), 32))
        if candidate not in shipped and candidate not in test_ids:
            test_ids.append(candidate)

    for folder in (ANNOTATIONS, "train", "test"):
        if (out / folder).exists():
            shutil.rmtree(out / folder)
    write_marker(out, "vindr", n, seed)
    lungs = lung_masks()
    annotations = {"train": [], "test": []}
    label_rows = {"train": [], "test": []}
    items = [("train", i, shipped[i]) for i in train_ids] + [
        ("test", new, _consensus(shipped[donor])) for new, donor in zip(test_ids, borrowed)]
    for index, (split, image_id, rows) in enumerate(tqdm(items, desc="synth vindr", unit="image",
                                                         disable=not progress)):
        image_rng = np.random.default_rng([seed, index])
        boxes = np.array([[float(v) for v in r[2:]] for r in rows if r[0] != NO_FINDING]).reshape(-1, 4)
        height, width = _native_size(image_rng, boxes)
        scale = size / max(height, width)
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
        scaled = np.minimum(boxes * scale, [width, height, width, height])
        _write_dicom(out / split / f"{image_id}{IMAGE_SUFFIX}",
                     _picture(image_rng, lungs, scaled, height, width), image_id)
        boxed = iter(scaled.tolist())
        for name, radiologist, *_ in rows:
            coords = [""] * 4 if name == NO_FINDING else [_number(v) for v in next(boxed)]
            annotations[split].append([image_id, radiologist, name, *coords])
        for radiologist in dict.fromkeys(r[1] for r in rows):
            marked = {r[0] for r in rows if r[1] == radiologist}
            labels = [int(name in marked) for name in LABELS]
            label_rows[split].append([image_id, *([radiologist] if split == "train" else []), *map(str, labels)])

    (out / ANNOTATIONS).mkdir(parents=True, exist_ok=True)
    _write_csv(out / ANNOTATIONS / image_label_file("train"), TRAIN_LABEL_HEADER, label_rows["train"])
    _write_csv(out / ANNOTATIONS / image_label_file("test"), TEST_LABEL_HEADER, label_rows["test"])
    _write_csv(out / ANNOTATIONS / annotation_file("test"), ANNOTATION_COLUMNS, annotations["test"])
    _write_csv(out / ANNOTATIONS / annotation_file("train"), ANNOTATION_COLUMNS, annotations["train"])
    abnormal = sum(any(r[0] != NO_FINDING for r in rows) for _, _, rows in items)
    return {"n": n, "train": len(train_ids), "test": n_test, "abnormal": abnormal, "path": str(out)}


def _consensus(rows: list[list[str]]) -> list[list[str]]:
    """One image's radiologist rows as a test image's consensus: per finding the fused boxes, with an empty
    ``rad_id``; a single ``No finding`` row when none was marked."""
    consensus = []
    for name in FINDINGS:
        boxes = np.array([[float(v) for v in r[2:]] for r in rows if r[0] == name]).reshape(-1, 4)
        consensus += [[name, "", *map(str, box)] for box in fuse_boxes(boxes).tolist()]
    return consensus or [[NO_FINDING, "", "", "", "", ""]]


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    """A CSV with LF line endings (``csv`` quotes nothing here: no field holds a comma)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
