"""RSNA Pneumonia Detection Challenge reader: box label file, detailed class info, DICOM or JPEG images.

Formats (docs/datasets.md, "RSNA Pneumonia Detection"): ``stage_2_train_labels.csv`` (header
``patientId,x,y,width,height,Target``) has one row per box, top-left ``x, y`` and the size written as
floats (``264.0``) in pixels of the image; a patient without opacity has one row with the four box
fields empty and Target 0. ``stage_2_detailed_class_info.csv`` (header ``patientId,class``) repeats
a patient once per label row. Images are ``stage_2_train_images/<patientId>.dcm`` (DCMTK JPEG
Baseline DICOMs, 1024 x 1024), or ``stage_2_train_images_jpg/<patientId>.jpg`` in the JPEG release
that torchxrayvision reads. The stage-1 names (``stage_1_*``) are accepted too.

Split v1 (:func:`generate_split_v1`) is by patient, 16,010 / 5,337 / 5,337 as in MGCA's and G2D's
detection split, and serves every RSNA task (segmentation, detection, classification, zero-shot,
grounding). Three more committed versions reproduce published reference splits exactly:
``mgca`` (:func:`generate_split_mgca`, MGCA's detection/segmentation split), ``mgca_cls``
(:func:`generate_split_mgca_cls`, MGCA's linear-classification split and its 1 % / 10 % subsets) and
``medklip`` (:func:`generate_split_medklip`, MedKLIP's public zero-shot grounding test list).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError

from vlpbench.data import is_synthetic
from vlpbench.data.base import DatasetReader, box_problem, check_classes
from vlpbench.data.dicom import read_dicom, read_dicom_attributes
from vlpbench.data.images import read_image
from vlpbench.data.splits import (holdout_parts, mgca_fraction_subsets, nested_subsets, read_id_list, stratified_split,
                                  train_test_split_ids, write_split)
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.errors import DataError
from vlpbench.splits import SPLITS_DIR

# Real files shipped in torchxrayvision: the stage-2 label file (zip with one member
# stage_2_train_labels.csv) and a table of the DICOM headers of every train image.
RSNA_LABELS = "kaggle_stage_2_train_labels.csv.zip"
RSNA_DICOM_HEADERS = "kaggle_stage_2_train_images_dicom_headers.csv.gz"

NATIVE_SIZE = 1024  # every RSNA train image is 1024 x 1024
HEADER = "patientId,x,y,width,height,Target"
CLASS_HEADER = "patientId,class"
LUNG_OPACITY = "Lung Opacity"
CLASS_NAMES = (LUNG_OPACITY, "No Lung Opacity / Not Normal", "Normal")
STAGES = ("2", "1")  # in order of preference
IMAGE_SUFFIXES = (".dcm", ".jpg")  # the original DICOM wins over a JPEG conversion of it

SEED = 0
SPLIT_SIZES = (16010, 5337, 5337)  # train, val, test: MGCA's prepare_detection_data, G2D Table 6
SPLIT_LABEL = "pneumonia"

# MGCA's RSNA detection/segmentation split, HKU-MedAI/MGCA @ 680fe4a, mgca/preprocess/rsna.py:110-113:
# train_test_split(df, test_size=5337 * 2, random_state=0), then the held-out rows split in halves with
# train_test_split(..., test_size=0.5, random_state=0), whose first (sklearn "train") half is test_df.
MGCA_COMMIT = "680fe4a6ee0cc454ab58fd1a8b28fee81c03d742"
MGCA_HOLDOUT = 5337 * 2
MGCA_RANDOM_STATE = 0
# MGCA's RSNA linear-classification split, mgca/preprocess/rsna.py:22-64 (preprocess_rsna_data, test_fac=0.15):
# train_test_split(df, test_size=0.15 * 2, random_state=0), the held-out rows halved as above.
MGCA_CLS_TEST_FAC = 0.15
# MedKLIP's RSNA zero-shot grounding test list, MediaBrain-SJTU/MedKLIP @ 8e60b03,
# Sample_Zero-Shot_Grounding_RSNA/data_sample/test.csv (5,337 rows, columns ID,img_path,boxes,classes). Its ID
# column, in the file's row order, is committed as MEDKLIP_TEST_IDS (ids only; the labels come from the
# stage-2 label file, which agrees with the file's classes column on every row: 1,218 positives).
MEDKLIP_COMMIT = "8e60b035ddc160f44a389f476b596f1052f02d8f"
MEDKLIP_TEST_FILE = "Sample_Zero-Shot_Grounding_RSNA/data_sample/test.csv"
MEDKLIP_TEST_SHA256 = "0867ad34e59824faf961bac958462e445bb8a2c4a6b74dee54403f5ca3f453a0"
MEDKLIP_TEST_IDS = SPLITS_DIR / "rsna" / "sources" / "medklip_test_ids.csv"
MEDKLIP_VAL_SIZE = 5337  # val drawn from the other stage-2 patients, as large as v1's and MGCA's val

Box = tuple[float, float, float, float]


def label_file_name(stage: str) -> str:
    """``stage_<stage>_train_labels.csv``."""
    return f"stage_{stage}_train_labels.csv"


def class_file_name(stage: str) -> str:
    """``stage_<stage>_detailed_class_info.csv``."""
    return f"stage_{stage}_detailed_class_info.csv"


def image_dir_names(stage: str) -> tuple[str, str]:
    """The Kaggle DICOM folder and the JPEG-release folder of a stage, in order of preference."""
    return f"stage_{stage}_train_images", f"stage_{stage}_train_images_jpg"


def _read_bytes(path: Path) -> bytes:
    """The bytes of a CSV, of a ``.gz`` of it, or of the one CSV in a ``.zip`` (the shipped file)."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            return gzip.decompress(raw)
        if path.suffix == ".zip":
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                members = [m for m in archive.namelist() if not m.endswith("/")]
                if len(members) != 1:
                    raise DataError(f"{path}: expected a zip holding one CSV file, found {members}")
                return archive.read(members[0])
        return raw
    except FileNotFoundError as exc:
        raise DataError(f"{path}: label file not found") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read the label file ({type(exc).__name__}: {exc})") from exc


def _read_lines(path: Path) -> list[str]:
    try:
        # utf-8-sig: a spreadsheet re-save may prepend a byte-order mark.
        return _read_bytes(path).decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: the label file is not UTF-8 text ({exc})") from exc


def _parse_box(fields: list[str], where: str) -> Box:
    values = []
    for name, text in zip(("x", "y", "width", "height"), fields):
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{where}: {name} {text!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise DataError(f"{where}: {name} {text!r} must be a finite number >= 0 (pixels)")
        values.append(value)
    if values[2] <= 0 or values[3] <= 0:
        raise DataError(f"{where}: box width and height must be positive, found {fields[2]!r} x {fields[3]!r}")
    return values[0], values[1], values[2], values[3]


def read_labels(path: str | Path, lines_out: dict[str, list[int]] | None = None) -> dict[str, list[Box]]:
    """Read an RSNA label file into ``{patientId: [(x, y, width, height), ...]}`` in file order.

    ``lines_out``, when given, receives the line number of each box, per patient, in the same order (for
    messages that name a box's row).

    Accepts ``stage_2_train_labels.csv`` / ``stage_1_train_labels.csv``, a ``.gz`` copy, and a
    ``.zip`` holding one such CSV (torchxrayvision's ``kaggle_stage_2_train_labels.csv.zip``). A
    patient without opacity maps to ``[]``; a positive patient to its boxes in file order, top-left
    corner and size as written. A repeated negative row is tolerated.

    Raises:
        DataError: naming the file (and line) for a wrong header, a row without 6 fields, an empty
            patientId, a Target other than 0/1, a Target that disagrees with the box fields (Target 1
            needs all four, Target 0 none), a box value that is not a non-negative number, an empty
            box, or a patient with both Target 0 and Target 1 rows.
    """
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise DataError(f"{path}: empty label file; expected the header {HEADER!r}")
    if lines[0].strip() != HEADER:
        raise DataError(f"{path} line 1: header {lines[0]!r}, expected {HEADER!r}")

    labels: dict[str, list[Box]] = {}
    negative: set[str] = set()
    for number, line in enumerate(lines[1:], start=2):
        where = f"{path} line {number}"
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 6:
            raise DataError(f"{where}: expected 6 fields ({HEADER}), found {len(fields)}: {line!r}")
        patient, box_fields, target = fields[0], fields[1:5], fields[5]
        if not patient:
            raise DataError(f"{where}: empty patientId")
        if target not in ("0", "1"):
            raise DataError(f"{where}: Target {target!r}, expected 0 or 1")
        filled = [bool(field) for field in box_fields]
        if target == "1" and not all(filled):
            raise DataError(f"{where}: Target 1 needs x, y, width and height; found {line!r}")
        if target == "0" and any(filled):
            raise DataError(f"{where}: Target 0 must leave x, y, width and height empty; found {line!r}")
        if patient in labels and (patient in negative) != (target == "0"):
            raise DataError(f"{where}: patient {patient} has both Target 0 and Target 1 rows")
        boxes = labels.setdefault(patient, [])
        if target == "1":
            boxes.append(_parse_box(box_fields, where))
            if lines_out is not None:
                lines_out.setdefault(patient, []).append(number)
        else:
            negative.add(patient)
    return labels


def read_class_info(path: str | Path) -> dict[str, str]:
    """Read ``stage_2_detailed_class_info.csv`` into ``{patientId: class}``, deduplicated, in file order.

    The file repeats a patient once per label row; the repeats must agree. Classes are
    ``Lung Opacity``, ``No Lung Opacity / Not Normal`` and ``Normal``.

    Raises:
        DataError: naming the file (and line) for a wrong header, a row without 2 fields, an empty
            patientId, an unknown class, or a patient given two different classes.
    """
    path = Path(path)
    lines = _read_lines(path)
    if not lines or lines[0].strip() != CLASS_HEADER:
        found = repr(lines[0]) if lines else "an empty file"
        raise DataError(f"{path} line 1: header {found}, expected {CLASS_HEADER!r}")
    classes: dict[str, str] = {}
    for number, line in enumerate(lines[1:], start=2):
        where = f"{path} line {number}"
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 2:
            raise DataError(f"{where}: expected 2 fields ({CLASS_HEADER}), found {len(fields)}: {line!r}")
        patient, name = fields
        if not patient:
            raise DataError(f"{where}: empty patientId")
        if name not in CLASS_NAMES:
            raise DataError(f"{where}: class {name!r}, expected one of {', '.join(map(repr, CLASS_NAMES))}")
        if classes.setdefault(patient, name) != name:
            raise DataError(f"{where}: patient {patient} has class {name!r} here but {classes[patient]!r} earlier")
    return classes


def boxes_to_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boxes (K, 4) xyxy → uint8 0/1 mask, as MGCA's RSNASegmentDataset: each corner truncated to
    int, ``mask[y1:y2, x1:x2] = 1``, union over the boxes."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).astype(np.int64).tolist():
        mask[y1:y2, x1:x2] = 1
    return mask


def _find_label_file(root: Path) -> tuple[Path, str]:
    for stage in STAGES:
        name = label_file_name(stage)
        hits = [root / name] if (root / name).is_file() else sorted(root.glob(f"*/{name}"))
        if len(hits) == 1:
            return hits[0], stage
        if len(hits) > 1:
            raise DataError(f"{root}: several label files {[str(h) for h in hits]}; keep one")
    names = " or ".join(label_file_name(stage) for stage in STAGES)
    raise DataError(f"{root}: no RSNA label file; expected {names} in this folder or a direct subfolder")


class RsnaSource(DatasetReader):
    """An RSNA Pneumonia dataset on disk: the label file, the class info file and one image folder.

    Args:
        root: the dataset folder as the Kaggle download unpacks (or the folder above it). The label
            file (``stage_2_train_labels.csv``, else ``stage_1_train_labels.csv``) is looked for in
            it and its direct subfolders; the detailed class info file and the image folder beside
            the label file: the first of ``stage_<s>_train_images/`` (DICOM) and
            ``stage_<s>_train_images_jpg/`` (JPEG release), the label file's stage first. Images
            are ``<patientId>.dcm`` or ``<patientId>.jpg`` (the DICOM wins where both exist).
            Without an image folder, labels and boxes still work; :meth:`path` raises.

    Raises:
        DataError: no label file, several candidates, a malformed label or class file, or a class
            that disagrees with Target (``Lung Opacity`` ⇔ Target 1).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: RSNA dataset folder not found")
        self.label_file, stage = _find_label_file(self.root)
        self._box_lines: dict[str, list[int]] = {}
        self._labels = read_labels(self.label_file, self._box_lines)
        folder = self.label_file.parent
        stages = (stage, *(s for s in STAGES if s != stage))

        self.class_file: Path | None = next(
            (folder / class_file_name(s) for s in stages if (folder / class_file_name(s)).is_file()), None
        )
        self._classes = read_class_info(self.class_file) if self.class_file else {}
        for patient, name in self._classes.items():
            target = int(bool(self._labels.get(patient)))
            if patient in self._labels and (name == LUNG_OPACITY) != bool(target):
                raise DataError(
                    f"{self.class_file}: patient {patient} has class {name!r} but Target {target} in "
                    f"{self.label_file}; 'Lung Opacity' is exactly the patients with Target 1"
                )

        self._image_dirs = [folder / name for s in stages for name in image_dir_names(s)]
        self.image_dir: Path | None = next((d for d in self._image_dirs if d.is_dir()), None)
        self._paths: dict[str, Path] = {}
        if self.image_dir is not None:
            found: dict[str, dict[str, str]] = {}
            with os.scandir(self.image_dir) as entries:
                for entry in entries:
                    stem, suffix = os.path.splitext(entry.name)
                    if suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                        found.setdefault(stem, {})[suffix.lower()] = entry.name
            for stem, names in found.items():
                name = next(names[s] for s in IMAGE_SUFFIXES if s in names)
                self._paths[stem] = self.image_dir / name

    @property
    def image_ids(self) -> list[str]:
        """Every patientId of the label file, in file order (one image per patient)."""
        return list(self._labels)

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.rsna.synth_rsna`."""
        return is_synthetic(self.root)

    def _rows(self, image_id: str) -> list[Box]:
        try:
            return self._labels[image_id]
        except KeyError:
            raise DataError(f"patient {image_id} is not in {self.label_file}") from None

    def label(self, image_id: str) -> int:
        """Target: 1 if the patient has a lung-opacity box, else 0."""
        return int(bool(self._rows(image_id)))

    def boxes(self, image_id: str) -> np.ndarray:
        """The patient's boxes as float64 (K, 4) ``[x1, y1, x2, y2]`` in image pixels (x2 = x + width);
        (0, 4) for a patient without opacity."""
        rows = self._rows(image_id)
        boxes = np.array(rows, dtype=np.float64).reshape(len(rows), 4)
        boxes[:, 2:] += boxes[:, :2]
        return boxes

    def geometry_problems(self, image_id: str, height: int, width: int) -> list[str]:
        """Each of the patient's boxes that has no area or reaches outside its image, naming the label file's line."""
        problems = []
        for (x1, y1, x2, y2), line in zip(self.boxes(image_id).tolist(), self._box_lines.get(image_id, [])):
            if problem := box_problem(x1, y1, x2, y2, height, width):
                problems.append(f"{self.label_file} line {line}: patient {image_id}: {problem}")
        return problems

    def class_name(self, image_id: str) -> str:
        """The detailed class: ``Lung Opacity``, ``No Lung Opacity / Not Normal`` or ``Normal``.

        Raises:
            DataError: there is no class info file, or it lacks the patient.
        """
        if self.class_file is None:
            names = " or ".join(class_file_name(s) for s in STAGES)
            raise DataError(f"no detailed class info file; expected {names} beside {self.label_file}")
        try:
            return self._classes[image_id]
        except KeyError:
            raise DataError(f"patient {image_id} is not in {self.class_file}") from None

    def path(self, image_id: str) -> Path:
        """The image file of the patient (``.dcm``, or ``.jpg`` in the JPEG release).

        Raises:
            DataError: no image folder, or no ``<patientId>.dcm|.jpg`` in it.
        """
        if self.image_dir is None:
            looked = ", ".join(d.name + "/" for d in self._image_dirs)
            raise DataError(f"no RSNA image folder beside {self.label_file}; expected one of {looked}")
        try:
            return self._paths[image_id]
        except KeyError:
            raise DataError(
                f"no image for patient {image_id} in {self.image_dir} (looked for {image_id}.dcm and .jpg)"
            ) from None

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image, uint8 (H, W): DICOMs as :func:`vlpbench.data.dicom.read_dicom`
        (scaled by 255 / max, MONOCHROME1 inverted), JPEGs as :func:`vlpbench.data.images.read_image`."""
        path = self.path(image_id)
        return read_dicom(path) if path.suffix.lower() == ".dcm" else read_image(path)

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the image, from the file header without decoding pixels (DICOM Rows/Columns,
        the JPEG frame header).

        Raises:
            DataError: the file is missing, unreadable, or its header has no size.
        """
        path = self.path(image_id)
        if path.suffix.lower() == ".dcm":
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            except Exception as exc:  # pydicom reports damaged headers with many exception types
                raise DataError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc})") from exc
            if "Rows" not in ds or "Columns" not in ds:
                raise DataError(f"{path}: DICOM header has no Rows/Columns")
            return int(ds.Rows), int(ds.Columns)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read the image header of {path}: {exc}") from exc
        return height, width

    def mask(self, image_id: str) -> np.ndarray:
        """The union of the patient's boxes as a uint8 0/1 mask of the image's size, as MGCA builds it
        (see :func:`boxes_to_mask`). Without an image file, the native 1024 x 1024."""
        height, width = self.image_size(image_id) if image_id in self._paths else (NATIVE_SIZE, NATIVE_SIZE)
        return boxes_to_mask(self.boxes(image_id), height, width)

    @property
    def classes(self) -> tuple[str, ...]:
        """One class, ``pneumonia`` (Target 1)."""
        return (SPLIT_LABEL,)

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping[str, Any]) -> list[int]:
        """:meth:`label` for the one class."""
        check_classes(self, classes)
        return [self.label(image_id)]

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """``sex``, ``age`` and ``view``, from the DICOM header (PatientSex, PatientAge, ViewPosition)."""
        return ("sex", "age", "view")

    def attributes(self, image_id: str) -> dict[str, Any]:
        """The patient's ``sex``, ``age`` and ``view`` from its DICOM header
        (:func:`~vlpbench.data.dicom.read_dicom_attributes`); {} without a DICOM (a JPEG of the JPEG release
        has no header)."""
        path = self._paths.get(image_id)
        if path is None or path.suffix.lower() != ".dcm":
            return {}
        return read_dicom_attributes(path)

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without a label row, in order (images are not looked at)."""
        return [i for i in ids if i not in self._labels]

    def missing(self, ids: list[str]) -> list[str]:
        """The ids among ``ids`` that lack an image file or a row in the label file, in order."""
        return [i for i in ids if i not in self._paths or i not in self._labels]


def _stage2_labels() -> tuple[Path, dict[str, int], dict]:
    """The shipped stage-2 label file, ``{patientId: Target}`` in file order, and its manifest ``source``."""
    source = xrv_data_file(RSNA_LABELS)
    rows = read_labels(source)
    label = {patient: int(bool(boxes)) for patient, boxes in rows.items()}
    if len(label) != sum(SPLIT_SIZES):
        raise DataError(f"{source}: {len(label)} patients, expected {sum(SPLIT_SIZES)} (the stage-2 train set)")
    data = _read_bytes(source)
    info = {
        "package": "torchxrayvision",
        "file": source.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "n_rows": len(data.splitlines()) - 1,
        "n_images": len(rows),
    }
    return source, label, info


def generate_split_v1(out_dir: str | Path) -> dict:
    """Write RSNA split v1 from the real stage-2 label file shipped in torchxrayvision.

    The split is by patient (= image): the 26,684 patients are split 16,010 / 5,337 / 5,337 (the
    sizes of MGCA's detection split, which G2D reports for every RSNA task), stratified on Target
    with seed :data:`SEED`; then 10 % of train (1,601) is drawn, stratified, and the 1 % subset
    (160) is drawn from the 10 % subset. Writes ``train.csv``, ``val.csv``, ``test.csv``,
    ``train_1pct.csv``, ``train_10pct.csv`` (columns ``image_id,pneumonia``, sorted, LF) and
    ``MANIFEST.json``; regeneration is byte-identical.

    Returns:
        The manifest (also written to ``MANIFEST.json``).
    """
    _, label, source = _stage2_labels()
    ids = list(label)
    fractions = tuple(size / len(ids) for size in SPLIT_SIZES)
    train, val, test = stratified_split(ids, [label[i] for i in ids], fractions, seed=SEED)
    train_10, train_1 = nested_subsets(train, label, SEED)
    return write_split(
        out_dir,
        dataset="rsna",
        version="v1",
        parts={"train": train, "val": val, "test": test, "train_1pct": train_1, "train_10pct": train_10},
        labels={patient: {SPLIT_LABEL: y} for patient, y in label.items()},
        columns=[SPLIT_LABEL],
        generator="vlpbench.data.rsna:generate_split_v1",
        seed=SEED,
        fractions={"train": fractions[0], "val": fractions[1], "test": fractions[2],
                   "train_10pct": 0.1, "train_1pct": 0.01},
        source=source,
    )


def _write_reference_split(out_dir: str | Path, version: str, parts_of, generator: str, reference: dict) -> dict:
    """Write the RSNA split ``version`` whose parts ``parts_of(label)`` gives from the shipped stage-2 label
    file, with its ``reference`` block (the code it reproduces); files as :func:`generate_split_v1`."""
    _, label, source = _stage2_labels()
    parts = parts_of(label)
    n = len(label)
    return write_split(
        out_dir,
        dataset="rsna",
        version=version,
        parts=parts,
        labels={patient: {SPLIT_LABEL: y} for patient, y in label.items()},
        columns=[SPLIT_LABEL],
        generator=f"vlpbench.data.rsna:{generator}",
        seed=MGCA_RANDOM_STATE,
        fractions={"train": len(parts["train"]) / n, "val": len(parts["val"]) / n, "test": len(parts["test"]) / n,
                   "train_10pct": 0.1, "train_1pct": 0.01},
        source=source,
        reference=reference,
    )


def mgca_parts(label: Mapping[str, int]) -> dict[str, list[str]]:
    """MGCA's RSNA detection/segmentation split of the stage-2 patients ``label`` (``{patientId: Target}``).

    MGCA (``mgca/preprocess/rsna.py`` @ 680fe4a, ``prepare_detection_data``) reads
    ``stage_2_train_labels.csv`` and groups it by ``patientId`` (lines 98-104): one row per patient, in
    pandas' sorted group order, i.e. the patientIds sorted as strings. It then calls
    ``train_test_split(df, test_size=5337 * 2, random_state=0)`` (110-111) and splits the 10,674 held-out
    rows, in the order sklearn returned them, with ``train_test_split(test_val_df, test_size=0.5,
    random_state=0)`` (112-113), naming the two results ``test_df, valid_df``: test is the first
    (sklearn's "train") half, val the second. Both calls are sklearn's unstratified ``ShuffleSplit``,
    reimplemented in :func:`vlpbench.data.splits.shuffle_split`. On the stage-2 file: 16,010 / 5,337 /
    5,337 patients, 3,579 / 1,182 / 1,251 positive.

    ``train_10pct`` and ``train_1pct`` are not MGCA's: MGCA draws a fresh ``np.random.choice(n,
    int(pct * n))`` of its train part under the global numpy RNG in every run
    (``mgca/datasets/detection_dataset.py:53-57``, ``segmentation_dataset.py:184-188``), which no file
    fixes. They are vlpbench's nested stratified subsets (:func:`vlpbench.data.splits.nested_subsets`,
    seed 0) of MGCA's train part, with MGCA's sizes (1,601 and 160).
    """
    ids = sorted(label)
    train, held_out = train_test_split_ids(ids, MGCA_HOLDOUT, MGCA_RANDOM_STATE)
    test, val = train_test_split_ids(held_out, 0.5, MGCA_RANDOM_STATE)
    train_10, train_1 = nested_subsets(train, dict(label), SEED)
    return {"train": train, "val": val, "test": test, "train_1pct": train_1, "train_10pct": train_10}


def generate_split_mgca(out_dir: str | Path) -> dict:
    """Write RSNA split ``mgca`` (MGCA's detection/segmentation split, :func:`mgca_parts`) from the real
    stage-2 label file shipped in torchxrayvision; files as :func:`generate_split_v1`, byte-identical on
    regeneration.

    Returns:
        The manifest (also written to ``MANIFEST.json``).
    """
    return _write_reference_split(out_dir, "mgca", mgca_parts, "generate_split_mgca", {
        "repository": "HKU-MedAI/MGCA",
        "commit": MGCA_COMMIT,
        "file": "mgca/preprocess/rsna.py",
        "lines": "98-113",
        "rule": ("one row per patientId, sorted (groupby); train_test_split(df, test_size=5337*2, "
                 "random_state=0); train_test_split(held_out, test_size=0.5, random_state=0) -> test, val"),
        "identical": ["train", "val", "test"],
        "differs": {
            "train_10pct": "vlpbench nested stratified subset (seed 0) of MGCA's train part; MGCA draws "
                           "np.random.choice under the global numpy RNG in every run "
                           "(mgca/datasets/detection_dataset.py:53-57, segmentation_dataset.py:184-188), "
                           "which is not reproducible",
            "train_1pct": "drawn from train_10pct, stratified (seed 0); see train_10pct",
        },
    })


def mgca_cls_parts(label: Mapping[str, int]) -> dict[str, list[str]]:
    """MGCA's RSNA linear-classification split of the stage-2 patients ``label`` (``{patientId: Target}``),
    with MGCA's own 1 % and 10 % training subsets.

    MGCA (``mgca/preprocess/rsna.py`` @ 680fe4a, ``preprocess_rsna_data(test_fac=0.15)``, lines 22-64) reads
    ``stage_2_train_labels.csv`` (24), groups it by ``patientId`` (37-40: one row per patient, patientIds
    sorted as strings), sets Target 1 where the patient has a box (43), calls ``train_test_split(df,
    test_size=test_fac * 2, random_state=0)`` (50-51: ``ceil(0.3 * 26,684)`` = 8,006 held out) and splits
    the held-out rows, in sklearn's order, with ``train_test_split(test_val_df, test_size=0.5,
    random_state=0)`` (52-53), naming the results ``test_df, valid_df``. It writes the three with
    ``to_csv(index=False)`` (62-64), so MGCA's train.csv lists the train rows in sklearn's order. On the
    stage-2 file: 18,678 / 4,003 / 4,003 patients.

    ``RSNAImageDataset`` (``mgca/datasets/classification_dataset.py:150-151``, phase ``classification``:
    no row filter) reads that train.csv and, for ``data_pct`` != 1, keeps ``df.sample(frac=data_pct,
    random_state=42)`` (165-166); ``train_10pct`` and ``train_1pct`` are those rows
    (:func:`vlpbench.data.splits.mgca_fraction_subsets`). The two are separate draws, but of the same
    ``RandomState(42).permutation(18,678)``, so 1 % (187) ⊂ 10 % (1,868).
    """
    ids = sorted(label)
    train, held_out = train_test_split_ids(ids, MGCA_CLS_TEST_FAC * 2, MGCA_RANDOM_STATE)
    test, val = train_test_split_ids(held_out, 0.5, MGCA_RANDOM_STATE)
    return {"train": train, "val": val, "test": test, **mgca_fraction_subsets(train)}


def generate_split_mgca_cls(out_dir: str | Path) -> dict:
    """Write RSNA split ``mgca_cls`` (MGCA's linear-classification split and subsets, :func:`mgca_cls_parts`)
    from the real stage-2 label file shipped in torchxrayvision; files as :func:`generate_split_v1`,
    byte-identical on regeneration.

    Returns:
        The manifest (also written to ``MANIFEST.json``).
    """
    return _write_reference_split(out_dir, "mgca_cls", mgca_cls_parts, "generate_split_mgca_cls", {
        "repository": "HKU-MedAI/MGCA",
        "commit": MGCA_COMMIT,
        "file": "mgca/preprocess/rsna.py",
        "lines": "22-64",
        "rule": ("preprocess_rsna_data(test_fac=0.15): one row per patientId, sorted (groupby); "
                 "train_test_split(df, test_size=0.15*2, random_state=0); train_test_split(held_out, "
                 "test_size=0.5, random_state=0) -> test, val"),
        "subsets": ("mgca/datasets/classification_dataset.py:150-151,165-166: df.sample(frac=0.1 / 0.01, "
                    "random_state=42) over train.csv, whose rows are MGCA's train part in sklearn's order "
                    "(rsna.py:62); separate draws of the same RandomState(42).permutation, so 1 % is inside 10 %"),
        "identical": ["train", "val", "test", "train_10pct", "train_1pct"],
        "differs": {},
    })


def generate_split_medklip(out_dir: str | Path) -> dict:
    """Write RSNA split ``medklip``: test is MedKLIP's public RSNA zero-shot grounding test list.

    test: the 5,337 patients of MedKLIP's ``Sample_Zero-Shot_Grounding_RSNA/data_sample/test.csv``
    (MediaBrain-SJTU/MedKLIP @ 8e60b03; its ``ID`` column, committed as ``splits/rsna/sources/
    medklip_test_ids.csv``), 1,218 positive, labels from the stage-2 label file. MedKLIP releases no val
    or train list (its grounding test uses a fixed threshold, its zero-shot test tunes the F1 cut on the
    test set), so val is vlpbench's: 5,337
    of the other 21,347 stage-2 patients, stratified on Target with seed 0 (the val size of v1 and MGCA),
    for the validation-tuned thresholds of zero-shot classification and grounding; train is the remaining
    16,010 with vlpbench's nested stratified 10 % / 1 % subsets, so that every RSNA task can run on it.

    Returns:
        The manifest (also written to ``MANIFEST.json``).

    Raises:
        DataError: a listed patient is not in the stage-2 label file.
    """
    _, label, source = _stage2_labels()
    test = read_id_list(MEDKLIP_TEST_IDS)
    unknown = [i for i in test if i not in label]
    if unknown:
        raise DataError(f"{MEDKLIP_TEST_IDS}: {len(unknown)} patients not in the stage-2 label file, e.g. {unknown[0]}")
    listed = set(test)
    pool = [i for i in label if i not in listed]
    parts = holdout_parts(pool, test, label, MEDKLIP_VAL_SIZE, SEED)
    n = len(label)
    return write_split(
        out_dir,
        dataset="rsna",
        version="medklip",
        parts=parts,
        labels={patient: {SPLIT_LABEL: y} for patient, y in label.items()},
        columns=[SPLIT_LABEL],
        generator="vlpbench.data.rsna:generate_split_medklip",
        seed=SEED,
        fractions={"train": len(parts["train"]) / n, "val": len(parts["val"]) / n, "test": len(parts["test"]) / n,
                   "train_10pct": 0.1, "train_1pct": 0.01},
        source={**source, "test_ids": {
            "file": f"splits/rsna/sources/{MEDKLIP_TEST_IDS.name}",
            "sha256": hashlib.sha256(MEDKLIP_TEST_IDS.read_bytes()).hexdigest(),
            "n_images": len(test)}},
        reference={
            "repository": "MediaBrain-SJTU/MedKLIP",
            "commit": MEDKLIP_COMMIT,
            "file": MEDKLIP_TEST_FILE,
            "sha256": MEDKLIP_TEST_SHA256,
            "rule": "test = the ID column of the file (5,337 rows; its classes column equals stage-2 Target)",
            "identical": ["test"],
            "differs": {
                "val": "not released by MedKLIP (its grounding test.py:40 uses a fixed threshold; its zero-shot "
                       "test.py:126-138 tunes the F1 cut on the test set); vlpbench draws 5,337 of the other "
                       "stage-2 patients, stratified, seed 0",
                "train": "not released; the remaining 16,010 stage-2 patients",
                "train_10pct": "vlpbench nested stratified subset of train (seed 0)",
                "train_1pct": "drawn from train_10pct, stratified (seed 0)",
            },
        },
    )
