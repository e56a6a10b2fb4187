"""VinDr-CXR reader (PhysioNet ``vindr-cxr`` 1.0.0): box and label files per split, DICOM images.

Format (docs/datasets.md, "VinDr-CXR"): the download holds ``train/<image_id>.dicom`` (15,000 images),
``test/<image_id>.dicom`` (3,000) and ``annotations/`` with four CSVs per split:

* ``annotations_train.csv`` / ``annotations_test.csv``: one row per box, columns ``image_id``, ``rad_id``,
  ``class_name``, ``x_min``, ``y_min``, ``x_max``, ``y_max`` (pixels of the image); a ``No finding`` row has
  the four box fields empty. Train images are read by three radiologists each (one set of rows per
  ``rad_id``), test images carry the consensus of five.
* ``image_labels_train.csv``: ``image_id``, the radiologist column and the 28 labels (22 local findings,
  6 global ones), 0/1, one row per radiologist; ``image_labels_test.csv``: ``image_id`` and the 28 labels,
  one row per image.

Columns are read by name. Two header spellings differ between the sources read (docs/datasets.md): the
radiologist column of ``image_labels_train.csv`` (``rad_ID`` or ``rad_id``) and the last global label of
the test file (``Other diseases`` or ``Other disease``); either is accepted.

Labels per image (:meth:`VindrSource.class_labels`): on train a label is positive when any of the three
radiologists marks it (jlianglab/Ark ``Ark_Plus/Finetuning/dataloader.py:315-321``: the sum of the three
rows > 0); on test the consensus row. Boxes per image (:meth:`VindrSource.detection_boxes`): the test
consensus boxes as written; on train the three radiologists' boxes of a class are fused by weighted box
fusion at IoU 0.5 (``box_fusion: wbf``, :func:`fuse_boxes`), the rule BenchX's VinDr script sets out to
apply (yangzhou12/BenchX ``preprocess/datasets/VinDr_CXR/preprocess_vindr.py:84-109``) and
Madave94/gtiod's VinDr-CXR ``WeightedBoxesFusion`` (``configs/vindrcxr/dataset/base/vindrcxr_train_wbf.py``),
or kept one per radiologist (``box_fusion: none``).

Split v1 (:func:`generate_split_v1`) is drawn from the real train labels that torchxrayvision ships
(``vinbigdata-train.csv.gz``, the Kaggle release's ``train.csv``: the same 15,000 train images and the 14
findings of the challenge); its test part is the official test set, read from the user's files
(:func:`test_split`).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from vlpbench.data import is_synthetic
from vlpbench.data.base import DatasetReader, box_problem, check_classes
from vlpbench.data.dicom import read_dicom
from vlpbench.data.splits import Split, derived_split, multilabel_subset, stratified_sample, write_split
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.errors import ConfigError, DataError

# The 22 local and 6 global labels, in the column order of image_labels_*.csv (jlianglab/Ark
# Ark_Plus/Finetuning/main_classification.py:193, whose reader indexes the file's columns by this list).
LOCAL_LABELS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion",
)
GLOBAL_LABELS = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
LABELS = LOCAL_LABELS + GLOBAL_LABELS
NO_FINDING = "No finding"
# The 14 findings of the VinBigData challenge, in its class_id order 0-13 (openai/mle-bench
# mlebench/competitions/vinbigdata-chest-xray-abnormalities-detection/description.md, "Dataset information"):
# the classes of vindr_det, and the 14 labels BenchX classifies (unifier/datasets/datasets.py, VinDr_Dataset,
# which spells Pleural effusion "Effusion", Other lesion "Lesion", Pleural thickening "Pleural_Thickening").
FINDINGS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD", "Infiltration",
    "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis",
)

ANNOTATION_COLUMNS = ("image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max")
BOX_COLUMNS = ANNOTATION_COLUMNS[3:]
RADIOLOGIST_COLUMNS = ("rad_ID", "rad_id")  # image_labels_train.csv; sources spell it both ways
LABEL_SPELLINGS = {"Other disease": "Other diseases"}  # image_labels_test.csv as some sources read it
SPLITS = ("train", "test")
IMAGE_SUFFIX = ".dicom"
IMAGE_ID = re.compile(r"[0-9a-f]{32}")  # every id of the shipped train labels and of the test lists
FUSIONS = ("wbf", "none")
WBF_IOU = 0.5  # BenchX preprocess_vindr.py:105; gtiod vindrcxr_train_wbf.py iou_threshold

# Shipped in torchxrayvision: the Kaggle release's train.csv (image_id, class_name, class_id, rad_id, x_min,
# y_min, x_max, y_max), 67,914 rows for the 15,000 train images.
KAGGLE_TRAIN = "vinbigdata-train.csv.gz"
KAGGLE_HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"
SEED = 0
VAL_SIZE = 3000  # the test set's size, as BenchX draws its val (preprocess_vindr.py:168)
SPLIT_COLUMN = "abnormal"  # stratification label: any of the 14 findings marked by any radiologist


def annotation_file(split: str) -> str:
    """``annotations_<split>.csv``."""
    return f"annotations_{split}.csv"


def image_label_file(split: str) -> str:
    """``image_labels_<split>.csv``."""
    return f"image_labels_{split}.csv"


@dataclass(frozen=True)
class Annotation:
    """One row of an annotations file: who marked what where (``box`` None for ``No finding``)."""

    line: int
    radiologist: str
    class_name: str
    box: tuple[float, float, float, float] | None


def _read_rows(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the ``(line, fields)`` rows of a CSV whose header holds ``required``."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: label file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read the label file ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: the label file is not UTF-8 text ({exc})") from exc
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise DataError(f"{path}: empty label file; expected a header with {', '.join(required)}")
    header = [name.strip() for name in rows[0]]
    if missing := [name for name in required if name not in header]:
        raise DataError(f"{path} line 1: header {','.join(header)!r} lacks {', '.join(map(repr, missing))}")
    body = []
    for number, fields in enumerate(rows[1:], start=2):
        if not fields:
            continue
        if len(fields) != len(header):
            raise DataError(f"{path} line {number}: expected {len(header)} fields, found {len(fields)}: "
                            f"{','.join(fields)!r}")
        body.append((number, [field.strip() for field in fields]))
    return header, body


def _image_id(value: str, where: str) -> str:
    if not IMAGE_ID.fullmatch(value):
        raise DataError(f"{where}: image_id {value!r} is not a VinDr-CXR id (32 lowercase hex digits)")
    return value


def read_annotations(path: str | Path) -> dict[str, list[Annotation]]:
    """Read ``annotations_train.csv`` / ``annotations_test.csv`` into ``{image_id: [Annotation, ...]}``, in
    file order.

    Raises:
        DataError: naming the file and line for a header without the columns of :data:`ANNOTATION_COLUMNS`,
            a row of the wrong length, an image_id that is not 32 lowercase hex digits, a class that is
            neither a local label nor ``No finding``, a ``No finding`` row with a box or a finding without
            one, or a coordinate that is not a finite number.
    """
    path = Path(path)
    header, rows = _read_rows(path, ANNOTATION_COLUMNS)
    column = {name: header.index(name) for name in ANNOTATION_COLUMNS}
    images: dict[str, list[Annotation]] = {}
    for number, fields in rows:
        where = f"{path} line {number}"
        image_id = _image_id(fields[column["image_id"]], where)
        name = fields[column["class_name"]]
        coords = [fields[column[key]] for key in BOX_COLUMNS]
        if name == NO_FINDING:
            if any(coords):
                raise DataError(f"{where}: a {NO_FINDING!r} row must leave {', '.join(BOX_COLUMNS)} empty")
            box = None
        elif name in LOCAL_LABELS:
            box = tuple(_coordinate(text, key, where) for text, key in zip(coords, BOX_COLUMNS))
        else:
            raise DataError(f"{where}: class_name {name!r} is neither {NO_FINDING!r} nor one of the 22 local "
                            f"labels ({', '.join(LOCAL_LABELS)})")
        images.setdefault(image_id, []).append(Annotation(number, fields[column["rad_id"]], name, box))
    return images


def _coordinate(text: str, key: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: {key} {text!r} is not a number (pixels)") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: {key} {text!r} must be a finite number (pixels)")
    return value


def read_image_labels(path: str | Path, *, per_radiologist: bool) -> dict[str, dict[str, int]]:
    """Read ``image_labels_train.csv`` (``per_radiologist``: one row per radiologist, a label positive when any
    row marks it) or ``image_labels_test.csv`` (one consensus row per image) into ``{image_id: {label: 0/1}}``
    over the 28 :data:`LABELS`, in file order.

    Raises:
        DataError: naming the file and line for a header without ``image_id`` and the 28 labels (and, per
            radiologist, ``rad_ID`` or ``rad_id``), a bad image_id, a value other than 0 or 1, or a test image
            with two rows.
    """
    path = Path(path)
    header, rows = _read_rows(path, ("image_id",))
    header = [LABEL_SPELLINGS.get(name, name) for name in header]
    if missing := [name for name in LABELS if name not in header]:
        raise DataError(f"{path} line 1: header lacks the label column(s) {', '.join(map(repr, missing))}")
    if per_radiologist and not any(name in header for name in RADIOLOGIST_COLUMNS):
        raise DataError(f"{path} line 1: header lacks the radiologist column ({' or '.join(RADIOLOGIST_COLUMNS)})")
    id_column = header.index("image_id")
    label_columns = [header.index(name) for name in LABELS]
    images: dict[str, dict[str, int]] = {}
    for number, fields in rows:
        where = f"{path} line {number}"
        image_id = _image_id(fields[id_column], where)
        values = []
        for name, index in zip(LABELS, label_columns):
            if fields[index] not in ("0", "1"):
                raise DataError(f"{where}: {name} is {fields[index]!r}; expected 0 or 1")
            values.append(int(fields[index]))
        if image_id in images:
            if not per_radiologist:
                raise DataError(f"{where}: image {image_id} has a second row; the test file has one per image")
            previous = images[image_id]
            images[image_id] = {name: max(previous[name], value) for name, value in zip(LABELS, values)}
        else:
            images[image_id] = dict(zip(LABELS, values))
    return images


def box_iou(box: Sequence[float], others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each row of ``others`` (K, 4), plain areas, 0 where disjoint."""
    width = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = width * height
    union = (box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return np.divide(inter, union - inter, out=np.zeros(len(others)), where=union - inter > 0)


def fuse_boxes(boxes: np.ndarray, iou_threshold: float = WBF_IOU) -> np.ndarray:
    """Weighted box fusion of one class's boxes (K, 4) xyxy, every box of weight 1 (one radiologist's mark).

    The boxes are taken in order; each joins the cluster whose fused box it overlaps most, if that IoU
    exceeds ``iou_threshold``, else starts a cluster; a cluster's fused box is the mean of its members'
    coordinates, updated as members join (Solovyev et al., "Weighted boxes fusion", 2021: with equal
    scores the confidence-weighted mean is the plain mean). Returns the fused boxes (C, 4) in cluster order.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    members: list[list[np.ndarray]] = []
    fused = np.zeros((0, 4))
    for box in boxes:
        overlap = box_iou(box, fused) if len(fused) else np.zeros(0)
        if len(overlap) and overlap.max() > iou_threshold:
            best = int(overlap.argmax())
            members[best].append(box)
            fused[best] = np.mean(members[best], axis=0)
        else:
            members.append([box])
            fused = np.vstack([fused, box])
    return fused


def _find_annotations(root: Path) -> Path:
    """The ``annotations/`` folder in ``root`` or one direct subfolder of it."""
    name = "annotations"
    if (root / name / annotation_file("train")).is_file():
        return root / name
    hits = [p.parent for p in sorted(root.glob(f"*/{name}/{annotation_file('train')}"))]
    if len(hits) > 1:
        raise DataError(f"{root}: several VinDr-CXR folders {', '.join(map(str, hits))}; keep one")
    if not hits:
        raise DataError(f"{root}: no VinDr-CXR label files; expected {name}/{annotation_file('train')} "
                        "in this folder or a direct subfolder")
    return hits[0]


class VindrSource(DatasetReader):
    """A VinDr-CXR dataset on disk: the four label files of ``annotations/`` and the ``train/`` and ``test/``
    image folders beside it.

    Args:
        root: the dataset folder as the PhysioNet download unpacks (``.../vindr-cxr/1.0.0``) or the folder
            above it. Without the image folders, labels and boxes still work; :meth:`path` raises.

    Raises:
        DataError: no or several label folders, a malformed label file (naming file and line), an image in
            both splits, or an image that one of a split's two files lists and the other does not.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: VinDr-CXR dataset folder not found")
        self.annotation_dir = _find_annotations(self.root)
        self.folder = self.annotation_dir.parent
        self.label_files = {split: self.annotation_dir / annotation_file(split) for split in SPLITS}
        self._annotations: dict[str, list[Annotation]] = {}
        self._labels: dict[str, dict[str, int]] = {}
        self._split: dict[str, str] = {}
        for split in SPLITS:
            boxes = read_annotations(self.label_files[split])
            labels_path = self.annotation_dir / image_label_file(split)
            labels = read_image_labels(labels_path, per_radiologist=split == "train")
            for first, second, what in ((boxes, labels, labels_path), (labels, boxes, self.label_files[split])):
                if orphans := [i for i in first if i not in second]:
                    raise DataError(f"{what}: no row for {len(orphans)} image(s) of the other {split} file, "
                                    f"e.g. {orphans[0]}")
            if both := [i for i in labels if i in self._split]:
                raise DataError(f"{labels_path}: image {both[0]} is also a {self._split[both[0]]} image "
                                f"({len(both)} such)")
            self._annotations.update(boxes)
            self._labels.update(labels)
            self._split.update(dict.fromkeys(labels, split))
        self.image_dirs = {split: self.folder / split for split in SPLITS}

    @property
    def image_ids(self) -> list[str]:
        """Every image id of the train files, then of the test files, in file order."""
        return list(self._split)

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.vindr.synth_vindr`."""
        return is_synthetic(self.root, self.folder)

    def split_of(self, image_id: str) -> str:
        """``train`` or ``test``: the official part the image belongs to."""
        try:
            return self._split[image_id]
        except KeyError:
            raise DataError(f"image {image_id} is not in the VinDr-CXR label files under "
                            f"{self.annotation_dir}") from None

    def ids_of(self, split: str) -> list[str]:
        """The image ids of the official ``train`` or ``test`` part, in file order."""
        return [i for i, s in self._split.items() if s == split]

    def labels(self, image_id: str) -> dict[str, int]:
        """The 28 labels of the image (train: any radiologist; test: the consensus)."""
        self.split_of(image_id)
        return dict(self._labels[image_id])

    @property
    def classes(self) -> tuple[str, ...]:
        """The 28 labels of ``image_labels_*.csv`` (22 local findings, then the 6 global labels)."""
        return LABELS

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping[str, Any]) -> list[int]:
        """The image's 0/1 value of each of ``classes`` (:meth:`labels`)."""
        check_classes(self, classes)
        labels = self.labels(image_id)
        return [labels[name] for name in classes]

    def annotations(self, image_id: str) -> list[Annotation]:
        """The image's rows of its annotations file, in file order."""
        self.split_of(image_id)
        return list(self._annotations[image_id])

    def detection_boxes(self, image_id: str, classes: Sequence[str], box_fusion: str = "wbf"
                        ) -> tuple[np.ndarray, np.ndarray]:
        """The image's boxes of ``classes``: ``(boxes (K, 4) float64 xyxy pixels, labels (K,) int64)``, a label
        being the index into ``classes``; class by class in the order of ``classes``.

        Test boxes are the consensus rows as written. Train boxes are fused across the radiologists with
        ``box_fusion`` ``wbf`` (:func:`fuse_boxes`, per class) or kept one per row with ``none``.

        Raises:
            ConfigError: an unknown ``box_fusion``, or a class that is not a local label.
        """
        if box_fusion not in FUSIONS:
            raise ConfigError(f"box_fusion must be one of {', '.join(map(repr, FUSIONS))}, got {box_fusion!r}")
        if unknown := [c for c in classes if c not in LOCAL_LABELS]:
            raise ConfigError(f"detection class(es) {', '.join(map(repr, unknown))} are not VinDr-CXR local labels "
                              f"({', '.join(LOCAL_LABELS)})")
        rows = self.annotations(image_id)
        fuse = box_fusion == "wbf" and self._split[image_id] == "train"
        boxes, labels = [], []
        for index, name in enumerate(classes):
            own = np.array([row.box for row in rows if row.class_name == name], dtype=np.float64).reshape(-1, 4)
            own = fuse_boxes(own) if fuse else own
            boxes.append(own)
            labels.append(np.full(len(own), index, dtype=np.int64))
        return np.concatenate(boxes), np.concatenate(labels)

    def boxes(self, image_id: str) -> np.ndarray:
        """Every local-label box of the image, one per row of its annotations file, (K, 4) xyxy pixels."""
        return np.array([row.box for row in self.annotations(image_id) if row.box is not None],
                        dtype=np.float64).reshape(-1, 4)

    def label(self, image_id: str) -> int:
        """1 if the image has a box of any local label, else 0."""
        return int(len(self.boxes(image_id)) > 0)

    def geometry_problems(self, image_id: str, height: int, width: int) -> list[str]:
        """Each box of the image's rows that has no area or reaches outside its image, naming file and line."""
        path = self.label_files[self.split_of(image_id)]
        return [f"{path} line {row.line}: image {image_id}: {problem}" for row in self.annotations(image_id)
                if row.box is not None and (problem := box_problem(*row.box, height, width))]

    def path(self, image_id: str) -> Path:
        """The image file ``<split>/<image_id>.dicom`` (the file need not exist)."""
        return self.image_dirs[self.split_of(image_id)] / f"{image_id}{IMAGE_SUFFIX}"

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image, uint8 (H, W), as :func:`vlpbench.data.dicom.read_dicom` (scaled by 255 / max,
        MONOCHROME1 inverted)."""
        return read_dicom(self.path(image_id))

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) from the DICOM header (Rows, Columns), without decoding pixels.

        Raises:
            DataError: the file is missing or its header unreadable or without a size.
        """
        path = self.path(image_id)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        except FileNotFoundError as exc:
            raise DataError(f"{path}: DICOM file not found") from exc
        except Exception as exc:  # pydicom reports damaged headers with many exception types
            raise DataError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc})") from exc
        if "Rows" not in ds or "Columns" not in ds:
            raise DataError(f"{path}: DICOM header has no Rows/Columns")
        return int(ds.Rows), int(ds.Columns)

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` in neither split's label files, in order."""
        return [i for i in ids if i not in self._split]

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without label rows or without an image file, in order."""
        return [i for i in ids if i not in self._split or not self.path(i).is_file()]


# --- split v1 -------------------------------------------------------------------------------------------------


def split_columns() -> list[str]:
    """The label columns of the VinDr-CXR split files: ``abnormal``, then a slug per finding of :data:`FINDINGS`."""
    from vlpbench.protocols.labels import class_slug

    return [SPLIT_COLUMN, *(class_slug(name) for name in FINDINGS)]


def _split_labels(marked: Mapping[str, set[str]]) -> dict[str, dict[str, int]]:
    """The split-file labels of images given the set of findings marked on each."""
    columns = split_columns()
    return {image_id: dict(zip(columns, [int(bool(names & set(FINDINGS))), *(int(n in names) for n in FINDINGS)]))
            for image_id, names in marked.items()}


def read_kaggle_train(path: str | Path) -> dict[str, set[str]]:
    """The shipped Kaggle ``train.csv`` (gzipped) as ``{image_id: the findings any radiologist marked}``, images
    in file order.

    Raises:
        DataError: another header, a row of the wrong length, a bad image_id or an unknown class.
    """
    path = Path(path)
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the label file ({type(exc).__name__}: {exc})") from exc
    if not lines or lines[0] != KAGGLE_HEADER:
        raise DataError(f"{path} line 1: expected the header {KAGGLE_HEADER!r}")
    marked: dict[str, set[str]] = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split(",")
        where = f"{path} line {number}"
        if len(fields) != 8:
            raise DataError(f"{where}: expected 8 fields ({KAGGLE_HEADER}), found {len(fields)}")
        names = marked.setdefault(_image_id(fields[0], where), set())
        if fields[1] in FINDINGS:
            names.add(fields[1])
        elif fields[1] != NO_FINDING:
            raise DataError(f"{where}: class_name {fields[1]!r} is not one of the 14 findings or {NO_FINDING!r}")
    return marked


def generate_split_v1(out_dir: str | Path) -> dict:
    """Write VinDr-CXR split v1 from the real train labels shipped in torchxrayvision.

    val: 3,000 of the 15,000 train images (the test set's size, as BenchX's val), stratified on ``abnormal``
    (any of the 14 findings marked by any radiologist; BenchX stratifies on the same, ``has_masks``,
    preprocess_vindr.py:158-168) with seed :data:`SEED`; train: the other 12,000, with nested random 10 %
    (1,200) and 1 % (120) subsets that keep a positive of every finding
    (:func:`~vlpbench.data.splits.multilabel_subset`, as ChestX-ray14's). There is no test file: the test
    part is the official test set, read from the user's files (:func:`test_split`). Writes ``train.csv``,
    ``val.csv``, ``train_10pct.csv``, ``train_1pct.csv`` (``image_id``, ``abnormal`` and a 0/1 column per
    finding, any radiologist) and ``MANIFEST.json``; regeneration is byte-identical.

    Returns:
        The manifest (also written to ``MANIFEST.json``).
    """
    source = xrv_data_file(KAGGLE_TRAIN)
    marked = read_kaggle_train(source)
    labels = _split_labels(marked)
    ids = list(marked)
    abnormal = {i: labels[i][SPLIT_COLUMN] for i in ids}
    held_out = set(stratified_sample(ids, [abnormal[i] for i in ids], VAL_SIZE, SEED))
    train = [i for i in ids if i not in held_out]
    findings = split_columns()[1:]
    train_10 = multilabel_subset(train, labels, findings, round(len(train) * 0.1), SEED)
    train_1 = multilabel_subset(train_10, labels, findings, round(len(train) * 0.01), SEED)
    data = gzip.decompress(source.read_bytes())
    n = len(ids)
    return write_split(
        out_dir,
        dataset="vindr",
        version="v1",
        parts={"train": train, "val": [i for i in ids if i in held_out], "train_1pct": train_1,
               "train_10pct": train_10},
        labels=labels,
        columns=split_columns(),
        generator="vlpbench.data.vindr:generate_split_v1",
        seed=SEED,
        fractions={"train": len(train) / n, "val": VAL_SIZE / n, "train_10pct": 0.1, "train_1pct": 0.01},
        source={"package": "torchxrayvision", "file": source.name, "sha256": hashlib.sha256(data).hexdigest(),
                "n_rows": len(data.splitlines()) - 1, "n_images": n,
                "test": "the official test set: every image of the user's annotations/image_labels_test.csv"},
    )


def test_split(source: VindrSource) -> Split:
    """The test part: every image of the user's test files (the official 3,000), labels as the split files
    have them (``abnormal`` and the 14 findings, from the consensus boxes); cached by the files' sha256."""
    ids = source.ids_of("test")
    if not ids:
        raise DataError(f"{source.label_files['test']}: no test images listed")
    files = [source.label_files["test"], source.annotation_dir / image_label_file("test")]

    def build(out_dir: Path, version: str) -> dict:
        marked = {i: {row.class_name for row in source.annotations(i) if row.box is not None} for i in ids}
        return write_split(out_dir, dataset="vindr", version=version, parts={"test": ids},
                           labels=_split_labels(marked), columns=split_columns(),
                           generator="vlpbench.data.vindr:test_split", seed=SEED, fractions={"test": 1.0},
                           source={"files": [f.name for f in files]})

    return derived_split("vindr", "v1", sources=files, build=build)


test_split.__test__ = False  # not a pytest test, wherever a test module imports it
