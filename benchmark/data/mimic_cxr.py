"""MIMIC-CXR-JPG reader (metadata, official split, CheXpert/NegBio labels, JPEG tree) with the
free-text reports of MIMIC-CXR, and split v1 derived from the user's official split file.

Formats (docs/datasets.md, "MIMIC-CXR-JPG"): a release folder (``mimic-cxr-jpg/2.0.0/`` or ``2.1.0/``)
holds ``mimic-cxr-2.0.0-metadata.csv.gz``, ``-split.csv.gz``, ``-chexpert.csv.gz`` and
``-negbio.csv.gz`` (gunzipped ``.csv`` copies are accepted, and any ``mimic-cxr-<version>-`` prefix),
and the images at ``files/p<first two digits of subject>/p<subject_id>/s<study_id>/<dicom_id>.jpg``. The
image id is the ``dicom_id``. Labels are study-level (joined on subject_id and study_id), the 14 columns
in alphabetical order, valued ``1.0`` / ``0.0`` / ``-1.0`` / empty as in CheXpert.

Reports come from the separate MIMIC-CXR download: ``mimic-cxr-reports.zip`` (members
``files/pXX/pSUBJECT/sSTUDY.txt``) in the release folder or its parent, or the same ``.txt`` files
unpacked into the release folder's ``files/`` tree (or ``mimic-cxr-reports/files/`` beside it).

Section rule (:func:`parse_sections`, after MIT-LCP's ``section_parser.py``; docs/datasets.md,
"MIMIC-CXR reports"): a header is a line that starts with one space, then upper-case words, then a
colon; its content runs to the next header. Addenda sit above the final report behind a line of
underscores, so only the text after the last such line is parsed. ``FINDINGS`` (or ``FINDING``) gives
FINDINGS, ``IMPRESSION`` (or ``IMPRESSIONS``, ``CONCLUSION``, ``CONCLUSIONS``) gives IMPRESSION; a
repeated header keeps its last occurrence; content is whitespace-collapsed; an absent section is ``""``.

Split v1 (:func:`split_v1`): train / val / test are the official ``train`` / ``validate`` / ``test``
images that have a label row (no drawing); ``train_10pct`` and ``train_1pct`` (nested) are seeded
:func:`~vlpbench.data.splits.multilabel_subset` draws of round(10 % / 1 %) of train over the 14 labels
under U-zeros (1 only for ``1.0``).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlpbench.data import attributes, is_synthetic
from vlpbench.data.base import DatasetReader
from vlpbench.data.images import read_image
from vlpbench.data.splits import Split, derived_split, multilabel_subset, write_split
from vlpbench.errors import DataError

METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
# The 14 labeler columns, alphabetical as in the MIMIC files (unlike CheXpert's order).
LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
LABEL_COLUMNS = ("subject_id", "study_id", *LABELS)
LABELERS = ("chexpert", "negbio")
OFFICIAL_SPLITS = ("train", "validate", "test")
FRONTAL_VIEWS = ("PA", "AP")  # MGCA keeps these two
RELEASES = ("2.0.0", "2.1.0")
REPORTS_ZIP = "mimic-cxr-reports.zip"

SEED = 0
SUBSETS = {"train_10pct": 0.1, "train_1pct": 0.01}

_VALUES = {"1.0": 1.0, "0.0": 0.0, "-1.0": -1.0, "": math.nan}
_SUBJECT = re.compile(r"1[0-9]{7}")
_STUDY = re.compile(r"5[0-9]{7}")
_DICOM = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")
_HEADER = re.compile(r"^ ([A-Z][A-Z0-9 ,/&()'-]*?) ?:(.*)$")
_RULE = re.compile(r"^ *_{8,} *$")
_SECTION_NAMES = {"FINDINGS": "FINDINGS", "FINDING": "FINDINGS", "IMPRESSION": "IMPRESSION",
                  "IMPRESSIONS": "IMPRESSION", "CONCLUSION": "IMPRESSION", "CONCLUSIONS": "IMPRESSION"}


def _read_csv(path: Path, columns: tuple[str, ...], what: str) -> tuple[csv.reader, dict[str, int]]:
    """A csv reader positioned after the header, and the column positions (selected by name)."""
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8-sig")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the {what} file ({type(exc).__name__}: {exc})") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty {what} file; expected the header {','.join(columns)}")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path} line 1: header lacks {', '.join(map(repr, missing))}; "
                        f"expected the columns {','.join(columns)}")
    return reader, {c: header.index(c) for c in header}


def _fields(reader: csv.reader, fields: list[str], width: int, path: Path) -> str:
    where = f"{path} line {reader.line_num}"
    if len(fields) != width:
        raise DataError(f"{where}: expected {width} fields, found {len(fields)}")
    return where


def _check(pattern: re.Pattern, text: str, where: str, name: str, expected: str) -> str:
    if not pattern.fullmatch(text):
        raise DataError(f"{where}: {name} {text!r} is not {expected}")
    return text


@dataclass(frozen=True)
class MimicImage:
    """One metadata row: ids, view and size (``rows`` x ``columns`` pixels)."""

    dicom_id: str
    subject_id: str
    study_id: str
    view_position: str
    rows: int
    columns: int


def read_metadata(path: str | Path) -> dict[str, MimicImage]:
    """Read ``mimic-cxr-*-metadata.csv(.gz)`` into ``{dicom_id: MimicImage}`` in file order.

    Raises:
        DataError: naming the file and line for a missing column, a wrong field count, a malformed
            or repeated dicom_id, a subject/study id that is not 8 digits, or a non-integer size.
    """
    path = Path(path)
    reader, at = _read_csv(path, METADATA_COLUMNS, "metadata")
    images: dict[str, MimicImage] = {}
    for fields in reader:
        where = _fields(reader, fields, len(at), path)
        dicom = _check(_DICOM, fields[at["dicom_id"]], where, "dicom_id", "five dash-separated 8-hex groups")
        if dicom in images:
            raise DataError(f"{where}: dicom_id {dicom} repeats")
        subject = _check(_SUBJECT, fields[at["subject_id"]], where, "subject_id", "8 digits 10000000-19999999")
        study = _check(_STUDY, fields[at["study_id"]], where, "study_id", "8 digits 50000000-59999999")
        try:
            rows, columns = int(fields[at["Rows"]]), int(fields[at["Columns"]])
        except ValueError:
            raise DataError(f"{where}: Rows/Columns {fields[at['Rows']]!r}/{fields[at['Columns']]!r} "
                            "are not integers") from None
        images[dicom] = MimicImage(dicom, subject, study, fields[at["ViewPosition"]], rows, columns)
    return images


def read_official_split(path: str | Path) -> dict[str, str]:
    """Read ``mimic-cxr-*-split.csv(.gz)`` into ``{dicom_id: "train" | "validate" | "test"}``.

    Raises:
        DataError: naming the file and line for a missing column, a wrong field count, a repeated
            dicom_id, or a split value other than train / validate / test.
    """
    path = Path(path)
    reader, at = _read_csv(path, SPLIT_COLUMNS, "split")
    split: dict[str, str] = {}
    for fields in reader:
        where = _fields(reader, fields, len(at), path)
        dicom, value = fields[at["dicom_id"]], fields[at["split"]]
        if value not in OFFICIAL_SPLITS:
            raise DataError(f"{where}: split {value!r}; expected train, validate or test")
        if dicom in split:
            raise DataError(f"{where}: dicom_id {dicom} repeats")
        split[dicom] = value
    return split


def read_study_labels(path: str | Path) -> dict[tuple[str, str], tuple[float, ...]]:
    """Read ``mimic-cxr-*-chexpert.csv(.gz)`` / ``-negbio`` into ``{(subject_id, study_id): values}``,
    the 14 values in :data:`LABELS` order (NaN = empty).

    Raises:
        DataError: naming the file, line and column for a missing column, a wrong field count, a
            repeated study, or a value other than 1.0, 0.0, -1.0 or empty.
    """
    path = Path(path)
    reader, at = _read_csv(path, LABEL_COLUMNS, "label")
    labels: dict[tuple[str, str], tuple[float, ...]] = {}
    for fields in reader:
        where = _fields(reader, fields, len(at), path)
        key = (fields[at["subject_id"]], fields[at["study_id"]])
        if key in labels:
            raise DataError(f"{where}: study {key[1]} of subject {key[0]} repeats")
        values = []
        for name in LABELS:
            value = _VALUES.get(fields[at[name]])
            if value is None:
                raise DataError(f"{where}: column {name!r} is {fields[at[name]]!r}; expected 1.0, 0.0, -1.0 or empty")
            values.append(value)
        labels[key] = tuple(values)
    return labels


def parse_sections(text: str) -> dict[str, str]:
    """``{"FINDINGS": ..., "IMPRESSION": ...}`` of one report by the rule in the module docstring."""
    lines = text.splitlines()
    rules = [k for k, line in enumerate(lines) if _RULE.fullmatch(line)]
    if rules:
        lines = lines[rules[-1] + 1 :]
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        match = _HEADER.match(line)
        if match:
            name = _SECTION_NAMES.get(match.group(1).strip())
            current = sections.setdefault(name, []) if name else None
            if current is not None:
                current.clear()  # a repeated header keeps its last occurrence
                current.append(match.group(2))
        elif current is not None:
            current.append(line)
    return {name: " ".join(" ".join(sections.get(name, [])).split()) for name in ("FINDINGS", "IMPRESSION")}


def _find_file(folder: Path, kind: str, required: bool = True) -> Path | None:
    """``mimic-cxr-<version>-<kind>.csv`` or ``.csv.gz`` in ``folder`` (exactly one)."""
    hits = sorted(p for p in folder.glob(f"mimic-cxr-*-{kind}.csv*") if p.name.endswith((".csv", ".csv.gz")))
    if len(hits) > 1:
        raise DataError(f"{folder}: several {kind} files {[h.name for h in hits]}; keep one")
    if not hits and required:
        raise DataError(f"expected mimic-cxr-2.0.0-{kind}.csv.gz (or .csv) in {folder}")
    return hits[0] if hits else None


def _release_dir(root: Path) -> Path:
    """The folder holding the CSVs: ``root`` itself, or ``[physionet.org/files/]mimic-cxr-jpg/<version>/`` in it."""
    if not root.is_dir():
        raise DataError(f"{root}: MIMIC-CXR-JPG folder not found")
    candidates = [root]
    for prefix in ("", "mimic-cxr-jpg/", "physionet.org/files/mimic-cxr-jpg/"):
        candidates += [root / f"{prefix}{version}" for version in RELEASES]
    hits = [c for c in candidates if c.is_dir() and any(c.glob("mimic-cxr-*-metadata.csv*"))]
    if not hits:
        raise DataError(f"expected mimic-cxr-2.0.0-metadata.csv.gz (or .csv) in {root} "
                        f"or in its mimic-cxr-jpg/<{'|'.join(RELEASES)}>/ subfolder")
    return hits[0]


class MimicCxrSource(DatasetReader):
    """A MIMIC-CXR-JPG release on disk, with the reports where present.

    Args:
        root: the release folder (holding the CSVs and ``files/``) or a folder above it
            (``mimic-cxr-jpg/<version>/`` or ``physionet.org/files/mimic-cxr-jpg/<version>/`` below it).
        labeler: ``"chexpert"`` (default) or ``"negbio"``: which label file :meth:`labels` reads.

    Attributes:
        root, folder (the release folder), metadata_file, split_file, label_file, reports_zip
        (or None).

    Raises:
        DataError: a missing or malformed CSV, a metadata row whose ids disagree with the split file.
    """

    def __init__(self, root: str | Path, *, labeler: str = "chexpert") -> None:
        if labeler not in LABELERS:
            raise ValueError(f"labeler must be one of {', '.join(LABELERS)}, got {labeler!r}")
        self.root = Path(root)
        self.folder = _release_dir(self.root)
        self.metadata_file = _find_file(self.folder, "metadata")
        self.split_file = _find_file(self.folder, "split")
        self.label_file = _find_file(self.folder, labeler)
        self._images = read_metadata(self.metadata_file)
        self._split = read_official_split(self.split_file)
        self._labels = read_study_labels(self.label_file)
        self._jpgs, self._reports = self._scan()
        zips = [p / REPORTS_ZIP for p in (self.folder, self.folder.parent, self.root) if (p / REPORTS_ZIP).is_file()]
        self.reports_zip = zips[0] if zips else None
        self._zip_members: dict[str, str] = {}
        # One open handle for every report read: reopening re-reads the ~227k-entry central directory.
        self._archive: zipfile.ZipFile | None = None
        if self.reports_zip is not None:
            try:
                self._archive = zipfile.ZipFile(self.reports_zip)
            except (OSError, zipfile.BadZipFile) as exc:
                raise DataError(f"{self.reports_zip}: not a readable zip ({exc})") from exc
            self._zip_members = {Path(n).stem: n for n in self._archive.namelist() if n.endswith(".txt")}

    def __getstate__(self) -> dict:
        # An open zip cannot cross to worker processes; each process reopens it on first use.
        return {**self.__dict__, "_archive": None}

    def _reports_archive(self) -> zipfile.ZipFile:
        if self._archive is None:
            self._archive = zipfile.ZipFile(self.reports_zip)
        return self._archive

    def _scan(self) -> tuple[set[str], dict[str, Path]]:
        """dicom_ids with a JPEG at the recipe path, and ``{sSTUDY: path}`` of unpacked reports."""
        jpgs: set[str] = set()
        reports: dict[str, Path] = {}
        trees = [self.folder / "files", self.folder / "mimic-cxr-reports" / "files",
                 self.folder.parent / "mimic-cxr-reports" / "files"]
        for tree in trees:
            pending = [tree]
            while pending:
                try:
                    entries = list(os.scandir(pending.pop()))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for entry in entries:
                    if entry.is_dir():
                        pending.append(Path(entry.path))
                    elif entry.name.endswith(".jpg"):
                        jpgs.add(entry.path)
                    elif entry.name.endswith(".txt"):
                        reports.setdefault(entry.name[:-4], Path(entry.path))
        return {Path(p).stem for p in jpgs if Path(p) == self._recipe(Path(p).stem)}, reports

    def _recipe(self, image_id: str) -> Path | None:
        image = self._images.get(image_id)
        if image is None:
            return None
        sid = image.subject_id
        return self.folder / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{image.study_id}" / f"{image_id}.jpg"

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.mimic_cxr.synth_mimic_cxr`."""
        return is_synthetic(self.root, self.folder)

    @property
    def image_ids(self) -> list[str]:
        """Every dicom_id of the metadata file, in file order."""
        return list(self._images)

    def _image(self, image_id: str) -> MimicImage:
        try:
            return self._images[image_id]
        except KeyError:
            raise DataError(f"image {image_id} is not in {self.metadata_file}") from None

    def subject_id(self, image_id: str) -> str:
        """The 8-digit subject id (as written)."""
        return self._image(image_id).subject_id

    def study_id(self, image_id: str) -> str:
        """The 8-digit study id (as written, without the ``s``)."""
        return self._image(image_id).study_id

    def view_position(self, image_id: str) -> str:
        """``ViewPosition`` as written: PA, AP, LATERAL, LL, ... or ``""``."""
        return self._image(image_id).view_position

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) from the metadata ``Rows`` and ``Columns``."""
        image = self._image(image_id)
        return image.rows, image.columns

    def frontal_ids(self) -> list[str]:
        """The images with ViewPosition PA or AP, in metadata order."""
        return [i for i, image in self._images.items() if image.view_position in FRONTAL_VIEWS]

    def official_split(self, image_id: str) -> str:
        """``train``, ``validate`` or ``test`` from the split file."""
        try:
            return self._split[image_id]
        except KeyError:
            raise DataError(f"image {image_id} is not in {self.split_file}") from None

    def labels(self, image_id: str) -> dict[str, float | None]:
        """The study's 14 labels as written: 1.0, 0.0, -1.0, or None where empty.

        Raises:
            DataError: the study has no row in the label file.
        """
        image = self._image(image_id)
        values = self._labels.get((image.subject_id, image.study_id))
        if values is None:
            raise DataError(f"study {image.study_id} (subject {image.subject_id}, image {image_id}) "
                            f"has no row in {self.label_file}")
        return {name: None if math.isnan(v) else v for name, v in zip(LABELS, values)}

    def report(self, image_id: str) -> str:
        """The full text of the study's report (``s<study_id>.txt``).

        Raises:
            DataError: no report for the study, unpacked or in ``mimic-cxr-reports.zip``.
        """
        name = f"s{self.study_id(image_id)}"
        try:
            if name in self._reports:
                return self._reports[name].read_text(encoding="utf-8")
            if name in self._zip_members:
                return self._reports_archive().read(self._zip_members[name]).decode("utf-8")
        except (OSError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read the report {name}.txt of image {image_id} ({exc})") from exc
        raise DataError(f"no report {name}.txt for image {image_id}: expected {REPORTS_ZIP} in {self.folder} "
                        f"or its parent, or files/p../p{self.subject_id(image_id)}/{name}.txt in {self.folder}")

    def sections(self, image_id: str) -> dict[str, str]:
        """FINDINGS and IMPRESSION of the report (module docstring rule; ``""`` where absent)."""
        return parse_sections(self.report(image_id))

    def path(self, image_id: str) -> Path:
        """The JPEG at ``files/p<sid[:2]>/p<sid>/s<study>/<dicom_id>.jpg`` (whether present or not)."""
        self._image(image_id)
        return self._recipe(image_id)

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image: uint8 (H, W).

        Raises:
            DataError: the JPEG is missing or undecodable.
        """
        if image_id not in self._jpgs:
            raise DataError(f"no JPEG for image {image_id}: expected {self.path(image_id)}")
        return read_image(self.path(image_id))

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """``view`` only: the metadata file has ViewPosition; sex and age are in MIMIC-IV, not here."""
        return ("view",)

    def attributes(self, image_id: str) -> dict[str, Any]:
        """The image's ``view``: the metadata ViewPosition (PA, AP, LATERAL, LL, ...; empty is ``unknown``)."""
        return {"view": attributes.view(self.view_position(image_id),
                                        f"{self.metadata_file} dicom_id {image_id}: ViewPosition")}

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without a label row, in order (images are not looked at)."""
        return [i for i in ids if i not in self._images
                or (self._images[i].subject_id, self._images[i].study_id) not in self._labels]

    def missing(self, ids: list[str]) -> list[str]:
        """The ids among ``ids`` lacking a JPEG or a label row for their study, in order."""
        return [i for i in ids if i not in self._jpgs or i not in self._images
                or (self._images[i].subject_id, self._images[i].study_id) not in self._labels]


def build_split_v1(source: MimicCxrSource, out_dir: str | Path, version: str = "v1") -> dict:
    """Write split v1 of ``source`` (module docstring) to ``out_dir``; return the manifest."""
    parts: dict[str, list[str]] = {"train": [], "validate": [], "test": []}
    labels: dict[str, dict[str, int]] = {}
    for image_id, image in source._images.items():
        values = source._labels.get((image.subject_id, image.study_id))
        official = source._split.get(image_id)
        if values is None or official is None:
            continue
        labels[image_id] = {name: int(v == 1.0) for name, v in zip(LABELS, values)}  # U-zeros
        parts[official].append(image_id)
    train = parts["train"]
    train_10 = multilabel_subset(train, labels, LABELS, round(len(train) * SUBSETS["train_10pct"]), SEED)
    train_1 = multilabel_subset(train_10, labels, LABELS, round(len(train) * SUBSETS["train_1pct"]), SEED)
    files = [source.split_file, source.label_file, source.metadata_file]
    return write_split(
        out_dir,
        dataset="mimic_cxr",
        version=version,
        parts={"train": train, "val": parts["validate"], "test": parts["test"],
               "train_1pct": train_1, "train_10pct": train_10},
        labels=labels,
        columns=LABELS,
        generator="vlpbench.data.mimic_cxr:split_v1",
        seed=SEED,
        fractions=SUBSETS,
        source={
            "files": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files},
            "train": "official split 'train'", "val": "official split 'validate'", "test": "official split 'test'",
            "labels": "14 labeler columns, U-zeros (1.0 -> 1, else 0); images without a label row left out",
        },
    )


def split_v1(source: MimicCxrSource) -> Split:
    """Split v1 derived from the user's split, label and metadata files (module docstring), built
    once per distinct content of those files and cached (:func:`~vlpbench.data.splits.derived_split`)."""
    return derived_split(
        "mimic_cxr", "v1",
        sources=[source.split_file, source.label_file, source.metadata_file],
        build=lambda out_dir, version: build_split_v1(source, out_dir, version),
    )
