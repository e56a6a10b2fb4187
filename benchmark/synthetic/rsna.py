"""Synthetic RSNA Pneumonia dataset in the real on-disk format, built from the real label file.

:func:`synth_rsna` picks real patientIds from the committed split ``rsna/v1``, copies their real
rows of the stage-2 label file, and writes one RSNA-style DICOM per patient (sex, age, view and
pixel spacing from the real header table) whose picture carries each real box as a soft bright
opacity: a chest with a body, two lungs from a real lung mask, ribs, lung markings and noise, and
over every box a consolidation clipped to the thorax, so a detector or segmenter can learn it.
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlpbench.data.dicom import write_dicom
from vlpbench.data.rsna import (
    CLASS_HEADER,
    HEADER,
    LUNG_OPACITY,
    NATIVE_SIZE,
    RSNA_DICOM_HEADERS,
    RSNA_LABELS,
    boxes_to_mask,
    class_file_name,
    image_dir_names,
    label_file_name,
)
from vlpbench.data.splits import load_split, sample_split
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.synthetic.chest import ANATOMY_SIZE, blur, pick_lung, prepare_output, render, resize_field, write_marker
from vlpbench.synthetic.chest import lungs as lung_masks

LABEL_FILE = label_file_name("2")
CLASS_FILE = class_file_name("2")
IMAGE_DIR = image_dir_names("2")[0]

# Patients without opacity are "No Lung Opacity / Not Normal" or "Normal" in the real file, about
# 11,821 : 8,851 (docs/datasets.md, "RSNA class file"); the per-patient class does not ship, so it
# is drawn.
NEGATIVE_CLASSES = ("No Lung Opacity / Not Normal", "Normal")
NEGATIVE_WEIGHTS = (11821, 8851)

UID_ROOT = "1.2.276.0.7230010.3.1"  # DCMTK's; .4 instance, .2 study, .3 series, as in the real files
UID_SITE = "8323329"


def _headers(ids: set[str]) -> dict[str, dict[str, str]]:
    """The real DICOM header rows (PatientSex, PatientAge, ViewPosition, PixelSpacing, ...) of ``ids``."""
    text = gzip.decompress(xrv_data_file(RSNA_DICOM_HEADERS).read_bytes()).decode("utf-8")
    return {row["PatientID"]: row for row in csv.DictReader(io.StringIO(text)) if row["PatientID"] in ids}


def _uids(rng: np.random.Generator) -> tuple[str, str, str]:
    """SOP instance, study and series UIDs shaped like the real files':
    ``<root>.4.8323329.<n>.<time>.<k>``, ``<root>.2...<k-1>`` and ``<root>.3...<k-2>``."""
    middle = f"{UID_SITE}.{int(rng.integers(1000, 32768))}.{int(rng.integers(1517874000, 1517875000))}"
    last = int(rng.integers(100000, 1000000))
    return tuple(f"{UID_ROOT}.{kind}.{middle}.{last - step}" for kind, step in (("4", 0), ("2", 1), ("3", 2)))


def _number(value: float) -> str:
    """A coordinate as the real file spells it: a float with ``.0`` when whole (``264.0``)."""
    return repr(float(value))


def _scaled_row(row: str, scale: float) -> str:
    """A positive label row with its box in pixels of an image ``scale`` times the native size."""
    patient, *box, target = row.split(",")
    return ",".join([patient, *(_number(float(v) * scale) for v in box), target])


def _opacity(boxes: np.ndarray, lung: np.ndarray, size: int) -> np.ndarray:
    """The boxes (xyxy, pixels at ``size``) as a float field, clipped to the thorax: the lungs and a
    margin around them, so that no opacity lies on the air outside the body."""
    thorax = resize_field(np.clip(3 * blur(lung.astype(np.float32), ANATOMY_SIZE / 16), 0, 1), size)
    return boxes_to_mask(boxes, size, size).astype(np.float32) * thorax


def synth_rsna(out: str | Path, n: int = 200, seed: int = 0, *, size: int = NATIVE_SIZE, progress: bool = True) -> dict:
    """Write a synthetic RSNA Pneumonia dataset of ``n`` patients to ``out`` in the real on-disk format.

    Layout: ``out/stage_2_train_labels.csv`` (header ``patientId,x,y,width,height,Target``, LF, the
    shipped rows of the chosen patients in shipped order: one row per box, empty box fields for
    negatives), ``out/stage_2_detailed_class_info.csv`` (``patientId,class``, one row per label row,
    so patients with several boxes repeat; ``Lung Opacity`` for positives, and for negatives
    ``No Lung Opacity / Not Normal`` or ``Normal`` drawn at the real ratio),
    ``out/stage_2_train_images/<patientId>.dcm`` (RSNA-style JPEG-Baseline DICOMs, ``size`` x ``size``,
    PatientName = PatientID = patientId, a DCMTK-style SOPInstanceUID, real sex/age/view/spacing)
    and ``out/VLPBENCH_SYNTHETIC.json``.

    The patientIds are real and drawn from split rsna/v1, from test/val/train in proportion to
    their sizes and within train 1:9:90 from train_1pct, the rest of train_10pct and the rest of
    train, with positives apportioned like the split's. At the default 1024 px the label rows are
    the shipped ones byte for byte; at another ``size`` the boxes are scaled to it (written as
    floats), since the label file's coordinates are pixels of the image. Deterministic given
    ``seed``. A previous synth output in ``out`` is replaced; any other non-empty folder is refused.

    Returns:
        ``{"n", "positives", "path"}``.

    Raises:
        DataError: ``out`` holds other data, or a real label file is missing.
        ValueError: ``n`` is outside 1..26,684 or ``size`` is below 32.
    """
    out = Path(out)
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    prepare_output(out, (LABEL_FILE, CLASS_FILE, IMAGE_DIR))
    chosen = sample_split(load_split("rsna", "v1"), n, seed)

    with zipfile.ZipFile(xrv_data_file(RSNA_LABELS)) as archive:
        shipped = archive.read(LABEL_FILE).decode("utf-8").splitlines()[1:]
    wanted = set(chosen)
    rows = [row for row in shipped if row.split(",", 1)[0] in wanted]
    scale = size / NATIVE_SIZE
    boxes: dict[str, list[list[float]]] = {patient: [] for patient in chosen}
    for row in rows:
        patient, x, y, width, height, target = row.split(",")
        if target == "1":
            x1, y1 = float(x) * scale, float(y) * scale
            boxes[patient].append([x1, y1, x1 + float(width) * scale, y1 + float(height) * scale])
    headers = _headers(wanted)

    if (out / IMAGE_DIR).exists():
        shutil.rmtree(out / IMAGE_DIR)
    for name in (LABEL_FILE, CLASS_FILE):
        (out / name).unlink(missing_ok=True)
    write_marker(out, "rsna", n, seed)
    lungs = lung_masks()
    classes: dict[str, str] = {}
    for index, patient in enumerate(tqdm(chosen, desc="synth rsna", unit="image", disable=not progress)):
        rng = np.random.default_rng([seed, index])
        if boxes[patient]:
            classes[patient] = LUNG_OPACITY
            box_array = np.array(boxes[patient])
            target = boxes_to_mask(box_array, size, size).astype(np.float32)
            lung = pick_lung(rng, lungs, target)
            pixels = render(rng, lung, size, opacity=_opacity(box_array, lung, size))
        else:
            classes[patient] = str(rng.choice(NEGATIVE_CLASSES, p=np.divide(NEGATIVE_WEIGHTS, sum(NEGATIVE_WEIGHTS))))
            pixels = render(rng, pick_lung(rng, lungs, None), size)
        sop, study, series = _uids(rng)
        header = headers[patient]
        write_dicom(
            out / IMAGE_DIR / f"{patient}.dcm",
            pixels,
            sop_instance_uid=sop,
            study_instance_uid=study,
            series_instance_uid=series,
            patient_id=patient,
            patient_sex=header["PatientSex"],
            patient_age=int(header["PatientAge"]),
            view_position=header["ViewPosition"],
            pixel_spacing=float(header["PixelSpacing"]) / scale,
        )

    if size != NATIVE_SIZE:
        rows = [_scaled_row(row, scale) if row.endswith(",1") else row for row in rows]
    class_rows = [f"{row.split(',', 1)[0]},{classes[row.split(',', 1)[0]]}" for row in rows]
    (out / CLASS_FILE).write_bytes((CLASS_HEADER + "\n" + "".join(f"{r}\n" for r in class_rows)).encode())
    (out / LABEL_FILE).write_bytes((HEADER + "\n" + "".join(f"{r}\n" for r in rows)).encode())
    return {"n": n, "positives": sum(bool(b) for b in boxes.values()), "path": str(out)}
