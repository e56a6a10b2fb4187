"""NIH ChestX-ray14 reader: ``Data_Entry_2017[_v2020].csv``, ``BBox_List_2017.csv``, the official
list files and the PNG folders, plus split v1 derived from the user's official lists.

Formats (docs/datasets.md, "ChestX-ray14"):

- ``Data_Entry_2017_v2020.csv`` (else the original ``Data_Entry_2017.csv``): the header has 9 names
  but 11 comma-separated fields, because ``OriginalImage[Width,Height]`` and
  ``OriginalImagePixelSpacing[x,y]`` contain commas; rows have 11 fields and are parsed by
  position. The original 2017 file ends the header and every row with a trailing comma and has
  ages above 100 and, in some copies, ages such as ``058Y``; both are accepted.
  ``Finding Labels`` is ``|``-separated (not always sorted) or exactly ``No Finding``.
- ``BBox_List_2017.csv``: the header splits into 9 fields, rows have 6 (``Image Index``, label,
  x, y, w, h as floats in the 1024 x 1024 pixel space of the PNGs, x/y the top-left corner). It
  spells Infiltration ``Infiltrate``; :meth:`Cxr14Source.boxes` returns the canonical name.
- ``train_val_list.txt`` / ``test_list.txt``: one ``Image Index`` per line, patient-disjoint.
- PNGs: the Kaggle layout ``images_001/images/*.png`` … ``images_012/images/*.png``, the NIH box
  archives extracted into one ``images/`` folder, or any folders below the root: PNGs are indexed
  recursively by file name (``Image Index``).

Split v1 (:func:`split_v1`, derived from the user's files because the official lists do not ship
in any package): test is ``test_list.txt`` (25,596 images in the real data). ``train_val_list.txt``
(86,524) is split by patient into train and val: patients are taken in a seeded order (seed 0),
first one patient for each finding not yet in val (rarest finding first), then whole patients
while they fit, until val holds ``round(0.1 × len(train_val))`` images exactly. With the real
lists this gives 77,872 / 8,652 / 25,596, the sizes of the KAD split that G2D uses (its
Table 3); KAD's own lists do not ship, so the members differ from KAD's while the sizes and the
patient-disjointness agree. The training subsets are nested random draws by image
(``train_10pct`` = round(10 % of train) = 7,787, ``train_1pct`` ⊂ ``train_10pct`` = round(1 % of
train) = 779) that keep at least one positive of every finding (:func:`~vlpbench.data.splits.multilabel_subset`).
Every part has the 14 label columns of :data:`LABELS`.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpbench.data import is_synthetic
from vlpbench.data.base import DatasetReader, box_problem, check_classes
from vlpbench.data.images import read_image
from vlpbench.data.splits import Split, derived_split, multilabel_subset, write_split
from vlpbench.errors import DataError

# The 14 findings in the order of the NIH paper (Wang et al. 2017), CheXNet, KAD and MedKLIP.
LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
# The bounding-box file's spelling of a finding, where it differs from Finding Labels.
BBOX_ALIASES = {"Infiltrate": "Infiltration"}

DATA_ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # in order of preference
BBOX_FILE = "BBox_List_2017.csv"
TRAIN_VAL_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"

# The header's 9 names split at every comma: the last two names hold commas themselves.
DATA_ENTRY_HEADER = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
)
BBOX_HEADER = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
BBOX_HEADER_FIELDS = 9  # the 6 names above and three empty fields
SEXES, VIEWS = ("M", "F"), ("PA", "AP")

SEED = 0
VAL_FRACTION = 0.1  # of the train_val images, taken as whole patients
SUBSETS = {"train_10pct": 0.1, "train_1pct": 0.01}  # of train, nested
# Split v1's part sizes on the official release (Data_Entry_2017's 112,120 images, test_list.txt's 25,596 and
# train_val_list.txt's 86,524), as build_split_v1 draws them: what `vlpbench sweep --plan` counts where the data
# folder is absent. tests/data/test_cxr14.py derives them from the Data_Entry file torchxrayvision ships and
# MedKLIP's copy of the official test list where a clone of it is at hand.
RELEASE_SIZES = {"v1": {"train": 77872, "val": 8652, "test": 25596, "train_10pct": 7787, "train_1pct": 779}}

_IMAGE_INDEX = re.compile(r"[0-9]{8}_[0-9]{3}\.png")
_AGE = re.compile(r"([0-9]+)([YMD]?)")
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "D": 1 / 365}


@dataclass(frozen=True)
class Cxr14Entry:
    """One row of Data_Entry.

    ``findings`` are the Finding Labels in file order (empty for ``No Finding``); ``age_years`` is
    the age as written, converted from months or days where the value carries ``M`` or ``D``
    (impossible ages of the 2017 file are kept as they are); ``original_size`` is (width, height)
    and ``pixel_spacing`` (x, y) in mm of the image before NIH resized it to 1024 x 1024.
    """

    image_id: str
    findings: tuple[str, ...]
    follow_up: int
    patient_id: int
    age_years: float
    sex: str
    view_position: str
    original_size: tuple[int, int]
    pixel_spacing: tuple[float, float]


def _read_lines(path: Path, what: str) -> list[str]:
    """The file's lines (gunzipped for ``.gz``, BOM and CR dropped); DataError naming the file if it cannot be read."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8-sig").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: {what} not found") from exc
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})") from exc


def _drop_trailing_empty(fields: list[str], count: int) -> list[str]:
    """Fields without the trailing empty one that the 2017 Data_Entry adds after the last value."""
    return fields[:count] if len(fields) == count + 1 and not fields[count].strip() else fields


def _integer(text: str, where: str, name: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise DataError(f"{where}: {name} {text!r} is not a non-negative integer")
    return int(text)


def _number(text: str, where: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{where}: {name} {text!r} is not a finite number")
    return value


def _findings(text: str, where: str) -> tuple[str, ...]:
    """The findings of a Finding Labels value: () for No Finding, else the names in file order."""
    if text == NO_FINDING:
        return ()
    names = text.split("|")
    for name in names:
        if name == NO_FINDING:
            raise DataError(f"{where}: 'No Finding' combined with other labels in {text!r}")
        if name not in LABELS:
            raise DataError(f"{where}: unknown finding {name!r} in {text!r}; expected '|'-separated names "
                            f"from {', '.join(LABELS)}, or 'No Finding'")
    if len(set(names)) != len(names):
        raise DataError(f"{where}: a finding is repeated in {text!r}")
    return tuple(names)


def _age_years(text: str, where: str) -> float:
    match = _AGE.fullmatch(text)
    if not match:
        raise DataError(f"{where}: Patient Age {text!r} is not an integer or NNN followed by Y, M or D")
    return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)]


def read_data_entry(path: str | Path) -> dict[str, Cxr14Entry]:
    """Read ``Data_Entry_2017_v2020.csv`` or ``Data_Entry_2017.csv`` (or a ``.gz`` copy) into
    ``{Image Index: entry}`` in file order.

    Fields are taken by position: 11 per row (the header's 9 names hold two commas), or 12 with an
    empty last one (the 2017 file's trailing comma). Blank lines are skipped.

    Raises:
        DataError: naming the file and line for a wrong header, a wrong number of fields, an
            Image Index that is not ``NNNNNNNN_NNN.png`` or is repeated, an unknown finding or
            ``No Finding`` combined with others, or a value that does not parse (integers for
            follow-up, patient, size; ``NNN[Y|M|D]`` for age; M/F; PA/AP; numbers for spacing).
    """
    path = Path(path)
    lines = _read_lines(path, "Data_Entry file")
    count = len(DATA_ENTRY_HEADER)
    header = tuple(field.strip() for field in _drop_trailing_empty(lines[0].split(","), count)) if lines else ()
    if header != DATA_ENTRY_HEADER:
        raise DataError(f"{path} line 1: header {lines[0] if lines else ''!r}, expected "
                        f"{','.join(DATA_ENTRY_HEADER)!r} (9 names, 11 comma-separated fields)")
    entries: dict[str, Cxr14Entry] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        fields = [field.strip() for field in _drop_trailing_empty(line.split(","), count)]
        if len(fields) != count:
            raise DataError(f"{where}: expected {count} fields (Image Index, Finding Labels, Follow-up #, Patient ID, "
                            f"Patient Age, Patient Gender, View Position, width, height, spacing x, spacing y), "
                            f"found {len(fields)}: {line[:120]!r}")
        image_id, labels, follow_up, patient, age, sex, view, width, height, spacing_x, spacing_y = fields
        if not _IMAGE_INDEX.fullmatch(image_id):
            raise DataError(f"{where}: Image Index {image_id!r} is not of the form NNNNNNNN_NNN.png")
        if image_id in entries:
            raise DataError(f"{where}: Image Index {image_id} appears twice")
        if sex not in SEXES:
            raise DataError(f"{where}: Patient Gender {sex!r}, expected M or F")
        if view not in VIEWS:
            raise DataError(f"{where}: View Position {view!r}, expected PA or AP")
        entries[image_id] = Cxr14Entry(
            image_id=image_id,
            findings=_findings(labels, where),
            follow_up=_integer(follow_up, where, "Follow-up #"),
            patient_id=_integer(patient, where, "Patient ID"),
            age_years=_age_years(age, where),
            sex=sex,
            view_position=view,
            original_size=(_integer(width, where, "OriginalImage width"),
                           _integer(height, where, "OriginalImage height")),
            pixel_spacing=(_number(spacing_x, where, "pixel spacing x"), _number(spacing_y, where, "pixel spacing y")),
        )
    return entries


def read_bboxes(path: str | Path,
                lines_out: dict[str, list[int]] | None = None) -> dict[str, list[tuple[str, list[float]]]]:
    """Read ``BBox_List_2017.csv`` (or a ``.gz`` copy) into ``{Image Index: [(finding, [x, y, w, h]), ...]}``
    in file order. ``lines_out``, when given, receives each box's line number, per image, in the same order.

    The header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` (9 fields); rows have 6 fields
    (empty fields after them are ignored). ``Infiltrate`` is returned as ``Infiltration``.

    Raises:
        DataError: naming the file and line for a wrong header, a wrong number of fields, an
            unknown finding, or a coordinate that is not a finite number (or a width/height <= 0).
    """
    path = Path(path)
    lines = _read_lines(path, "bounding-box file")
    header = [field.strip() for field in lines[0].split(",")] if lines else []
    if tuple(header[:6]) != BBOX_HEADER or any(header[6:]):
        raise DataError(f"{path} line 1: header {lines[0] if lines else ''!r}, expected "
                        f"'Image Index,Finding Label,Bbox [x,y,w,h],,,'")
    boxes: dict[str, list[tuple[str, list[float]]]] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        fields = [field.strip() for field in line.split(",")]
        if len(fields) < 6 or any(fields[6:]):
            raise DataError(f"{where}: expected 6 fields (Image Index, Finding Label, x, y, w, h), "
                            f"found {len(fields)}: {line[:120]!r}")
        image_id, label = fields[0], BBOX_ALIASES.get(fields[1], fields[1])
        if not _IMAGE_INDEX.fullmatch(image_id):
            raise DataError(f"{where}: Image Index {image_id!r} is not of the form NNNNNNNN_NNN.png")
        if label not in LABELS:
            raise DataError(f"{where}: unknown Finding Label {fields[1]!r}; expected one of "
                            f"{', '.join(LABELS)} (or Infiltrate)")
        box = [_number(text, where, name) for text, name in zip(fields[2:6], "xywh")]
        if box[2] <= 0 or box[3] <= 0:
            raise DataError(f"{where}: box width and height must be positive, found w={fields[4]}, h={fields[5]}")
        boxes.setdefault(image_id, []).append((label, box))
        if lines_out is not None:
            lines_out.setdefault(image_id, []).append(number)
    return boxes


def read_list(path: str | Path) -> list[str]:
    """Read an official list file (one Image Index per line, blank lines skipped) in file order.

    Raises:
        DataError: naming the file and line for an entry that is not ``NNNNNNNN_NNN.png`` or is repeated.
    """
    path = Path(path)
    ids: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(_read_lines(path, "list file"), start=1):
        image_id = line.strip()
        if not image_id:
            continue
        if not _IMAGE_INDEX.fullmatch(image_id):
            raise DataError(f"{path} line {number}: {image_id[:60]!r} is not an Image Index (NNNNNNNN_NNN.png)")
        if image_id in seen:
            raise DataError(f"{path} line {number}: {image_id} is listed twice")
        seen.add(image_id)
        ids.append(image_id)
    return ids


def _index_pngs(root: Path) -> dict[str, Path]:
    """Every ``*.png`` below ``root`` by file name; DataError for two files with one name."""
    paths: dict[str, Path] = {}
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(files):
            if not name.lower().endswith(".png"):
                continue
            path = Path(folder) / name
            if name in paths:
                raise DataError(f"two PNGs for image {name}: {paths[name]} and {path}; keep one")
            paths[name] = path
    return paths


class Cxr14Source(DatasetReader):
    """A ChestX-ray14 dataset on disk.

    Args:
        root: the dataset folder, holding ``Data_Entry_2017_v2020.csv`` (or ``Data_Entry_2017.csv``),
            optionally ``BBox_List_2017.csv``, ``train_val_list.txt`` and ``test_list.txt``, and the
            PNGs anywhere below it (``images_0NN/images/`` or ``images/``).

    Raises:
        DataError: no Data_Entry file; a malformed label, box or list file; a box or list entry
            for an image that Data_Entry lacks; one list file without the other, or an image in
            both; two PNGs with the same name.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: ChestX-ray14 dataset folder not found")
        found = [self.root / name for name in DATA_ENTRY_FILES if (self.root / name).is_file()]
        if not found:
            raise DataError(f"{self.root}: expected {' or '.join(DATA_ENTRY_FILES)} in this folder")
        self.label_file = found[0]
        self._entries = read_data_entry(self.label_file)

        self.bbox_file: Path | None = self.root / BBOX_FILE if (self.root / BBOX_FILE).is_file() else None
        self._box_lines: dict[str, list[int]] = {}
        self._boxes = read_bboxes(self.bbox_file, self._box_lines) if self.bbox_file else {}
        for image_id in self._boxes:
            if image_id not in self._entries:
                raise DataError(f"{self.bbox_file}: image {image_id} has boxes but no row in {self.label_file}")

        self._official: dict[str, str] = {}
        lists = {part: self.root / name for part, name in (("train_val", TRAIN_VAL_LIST), ("test", TEST_LIST))}
        present = [path for path in lists.values() if path.is_file()]
        if len(present) == 1:
            absent = next(path for path in lists.values() if not path.is_file())
            raise DataError(f"{self.root}: found {present[0].name} but not {absent.name}; "
                            "keep both official lists or neither")
        if present:
            for part, path in lists.items():
                for image_id in read_list(path):
                    if image_id not in self._entries:
                        raise DataError(f"{path}: {image_id} has no row in {self.label_file}")
                    if image_id in self._official:
                        raise DataError(f"{path}: {image_id} is also in {TRAIN_VAL_LIST}; the lists must be disjoint")
                    self._official[image_id] = part
        self.list_files = tuple(lists.values()) if present else ()
        self._paths = _index_pngs(self.root)

    @property
    def image_ids(self) -> list[str]:
        """Every Image Index of Data_Entry, in file order."""
        return list(self._entries)

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.cxr14.synth_cxr14`."""
        return is_synthetic(self.root)

    def entry(self, image_id: str) -> Cxr14Entry:
        """The image's Data_Entry row.

        Raises:
            DataError: the image is not in Data_Entry.
        """
        try:
            return self._entries[image_id]
        except KeyError:
            raise DataError(f"image {image_id} is not in {self.label_file}") from None

    def labels(self, image_id: str) -> dict[str, int]:
        """``{finding: 0/1}`` over :data:`LABELS` (all 0 for No Finding)."""
        findings = self.entry(image_id).findings
        return {label: int(label in findings) for label in LABELS}

    def boxes(self, image_id: str) -> list[tuple[str, list[float]]]:
        """The image's boxes ``[(finding, [x, y, w, h]), ...]`` in PNG pixels (x, y the top-left
        corner), in file order; ``[]`` for an image without box rows.

        Raises:
            DataError: the image is not in Data_Entry, or the root has no ``BBox_List_2017.csv``.
        """
        self.entry(image_id)
        if self.bbox_file is None:
            raise DataError(f"{self.root}: no {BBOX_FILE}; boxes need it")
        return [(label, list(box)) for label, box in self._boxes.get(image_id, [])]

    def geometry_problems(self, image_id: str, height: int, width: int) -> list[str]:
        """Each of the image's boxes that has no area or reaches outside the PNG, naming the box file's line."""
        problems = []
        for (label, (x, y, w, h)), line in zip(self._boxes.get(image_id, []), self._box_lines.get(image_id, [])):
            if problem := box_problem(x, y, x + w, y + h, height, width):
                problems.append(f"{self.bbox_file} line {line}: {image_id} {label}: {problem}")
        return problems

    def patient_id(self, image_id: str) -> int:
        """The image's Patient ID."""
        return self.entry(image_id).patient_id

    def official_split(self, image_id: str) -> str:
        """``"train_val"`` or ``"test"``: the official list that holds the image.

        Raises:
            DataError: the list files are absent, or neither lists the image.
        """
        self.entry(image_id)
        if not self.list_files:
            raise DataError(f"{self.root}: no {TRAIN_VAL_LIST} / {TEST_LIST}; the official split needs them")
        try:
            return self._official[image_id]
        except KeyError:
            raise DataError(f"image {image_id} is in neither {TRAIN_VAL_LIST} nor {TEST_LIST}") from None

    def path(self, image_id: str) -> Path:
        """The PNG of the image.

        Raises:
            DataError: no ``<image_id>`` PNG below the root.
        """
        try:
            return self._paths[image_id]
        except KeyError:
            raise DataError(f"no PNG for image {image_id} below {self.root} "
                            f"(looked for {image_id} in every folder, e.g. images_0NN/images/ or images/)") from None

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image: uint8 (H, W); RGBA files are converted to grey."""
        return read_image(self.path(image_id))

    @property
    def classes(self) -> tuple[str, ...]:
        """The 14 findings of Data_Entry (``No Finding`` is their absence, not a class)."""
        return LABELS

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping[str, Any]) -> list[int]:
        """:meth:`labels` of ``classes``."""
        check_classes(self, classes)
        labels = self.labels(image_id)
        return [labels[c] for c in classes]

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """``sex``, ``age`` and ``view``, from Data_Entry's Patient Gender, Patient Age and View Position."""
        return ("sex", "age", "view")

    def attributes(self, image_id: str) -> dict[str, Any]:
        """The Data_Entry row's ``sex`` (M / F), ``age`` in years and ``view`` (PA / AP); :func:`read_data_entry`
        has checked every value when the reader opened."""
        entry = self.entry(image_id)
        return {"sex": entry.sex, "age": entry.age_years, "view": entry.view_position}

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without a label row, in order (images are not looked at)."""
        return [i for i in ids if i not in self._entries]

    def missing(self, ids: list[str]) -> list[str]:
        """The ids among ``ids`` that lack a PNG below the root or a row in Data_Entry, in order."""
        return [i for i in ids if i not in self._paths or i not in self._entries]


def _val_patients(train_val: list[str], source: Cxr14Source, seed: int) -> set[int]:
    """Whole patients of ``train_val`` for val, ``round(VAL_FRACTION × len(train_val))`` images in all.

    Patients come in a seeded order. First, rarest finding first, the first patient with a finding
    that val still lacks joins, if the finding has another patient left for train; then every
    patient that still fits, so val reaches its size exactly where single-image patients allow.
    """
    images: dict[int, list[str]] = {}
    for image_id in train_val:
        images.setdefault(source.patient_id(image_id), []).append(image_id)
    patients = sorted(images)
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    findings = {p: {f for i in images[p] for f in source.entry(i).findings} for p in patients}
    target = round(len(train_val) * VAL_FRACTION)
    val: set[int] = set()
    size = 0
    by_rarity = sorted(LABELS, key=lambda f: (sum(f in findings[p] for p in patients), f))
    for finding in by_rarity:
        having = [p for p in order if finding in findings[p]]
        if len(having) < 2 or any(p in val for p in having):
            continue
        patient = having[0]
        if size + len(images[patient]) <= target:
            val.add(patient)
            size += len(images[patient])
    for patient in order:
        if size >= target:
            break
        if patient not in val and size + len(images[patient]) <= target:
            val.add(patient)
            size += len(images[patient])
    return val


def _require_lists(source: Cxr14Source) -> None:
    if not source.list_files:
        raise DataError(f"{source.root}: split v1 needs the official {TRAIN_VAL_LIST} and {TEST_LIST} "
                        "(they come with the NIH and Kaggle downloads)")


def build_split_v1(source: Cxr14Source, out_dir: str | Path, version: str = "v1") -> dict:
    """Write split v1 of ``source`` (see the module docstring) to ``out_dir``; return the manifest.

    Raises:
        DataError: the source has no official list files.
    """
    _require_lists(source)
    ids = source.image_ids
    train_val = [i for i in ids if source._official.get(i) == "train_val"]
    test = [i for i in ids if source._official.get(i) == "test"]
    val_patients = _val_patients(train_val, source, SEED)
    train = [i for i in train_val if source.patient_id(i) not in val_patients]
    val = [i for i in train_val if source.patient_id(i) in val_patients]
    labels = {i: source.labels(i) for i in ids if i in source._official}
    train_10 = multilabel_subset(train, labels, LABELS, round(len(train) * SUBSETS["train_10pct"]), SEED)
    train_1 = multilabel_subset(train_10, labels, LABELS, round(len(train) * SUBSETS["train_1pct"]), SEED)
    files = [source.label_file, *source.list_files]
    return write_split(
        out_dir,
        dataset="cxr14",
        version=version,
        parts={"train": train, "val": val, "test": test, "train_1pct": train_1, "train_10pct": train_10},
        labels=labels,
        columns=LABELS,
        generator="vlpbench.data.cxr14:split_v1",
        seed=SEED,
        fractions={"val": VAL_FRACTION, **SUBSETS},
        source={
            "files": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files},
            "n_train_val": len(train_val),
            "n_test": len(test),
            "val": "whole patients of train_val_list.txt, round(0.1 x its images), seeded",
            "test": "test_list.txt",
        },
    )


def split_v1(source: Cxr14Source) -> Split:
    """Split v1 derived from the user's ``Data_Entry`` and official list files (module docstring),
    built once per distinct content of those files and cached (:func:`~vlpbench.data.splits.derived_split`).

    Raises:
        DataError: the source has no official list files.
    """
    _require_lists(source)
    return derived_split(
        "cxr14", "v1",
        sources=[source.label_file, *source.list_files],
        build=lambda out_dir, version: build_split_v1(source, out_dir, version),
    )
