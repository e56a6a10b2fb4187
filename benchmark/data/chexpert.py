"""CheXpert reader (train.csv / valid.csv and the JPEG tree), the 5x200 zero-shot set, split v1,
and the radiologist-labelled test set.

Formats (docs/datasets.md, "CheXpert"): the download unpacks to ``CheXpert-v1.0-small/`` (or the full
``CheXpert-v1.0/``) holding ``train.csv``, ``valid.csv`` and ``train/`` / ``valid/`` trees of
``patientNNNNN/studyN/viewN_{frontal,lateral}.jpg``. Both CSVs have the same 19 columns; ``Path``
is relative to the *parent* of the dataset folder (it starts with the release folder's name), and
the 14 observations are ``1.0``, ``0.0``, ``-1.0`` (uncertain) or empty (not mentioned). The image
id is the ``Path`` string exactly as the CSV writes it.

Regenerate the committed splits (byte-identical)::

    python -m vlpbench.data.splits chexpert5x200
    python -m vlpbench.data.splits chexpert
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlpbench.data import attributes, is_synthetic
from vlpbench.data.base import DatasetReader, check_classes
from vlpbench.data.images import read_image
from vlpbench.data.splits import (Split, derived_split, mgca_fraction_subsets, multilabel_subset, stratified_sample,
                                  write_split)
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.errors import ConfigError, DataError

# The real CheXpert-v1.0-small train.csv: 223,414 rows (191,027 frontal), LF, final newline.
CHEXPERT_TRAIN = "chexpert_train.csv.gz"

RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
COLUMNS = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA",
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
OBSERVATIONS = COLUMNS[5:]
COMPETITION_5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# CheXpert paper / MGCA ``CHEXPERT_UNCERTAIN_MAPPINGS``: U-ones where it helped, U-zeros elsewhere.
MGCA_UNCERTAIN = {"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1, "Pleural Effusion": 1}
POLICIES = ("mgca", "ones", "zeros", "ignore")
SPLITS = ("train", "valid")

# The 5x200 rule (GLoRIA / MGCA): one-hot over the 13 pathology columns; No Finding is free.
PATHOLOGIES = tuple(c for c in OBSERVATIONS if c != "No Finding")
PER_CLASS = 200
FIVE_X_200_SEED = 0  # MGCA's df.sample(n=200, random_state=0)

SEED = 0
VAL_SIZE = 5000
SUBSETS = {"train_10pct": 0.1, "train_1pct": 0.01}

# MGCA's split (HKU-MedAI/MGCA @ 680fe4a, mgca/preprocess/chexpert.py:39-61): the rows of train.csv minus the
# 5x200 set; val = np.random.choice(len, 5000, replace=False) under np.random.seed(0) (line 5), rows taken by
# position; train = df.drop(those numbers), by index label. See mgca_parts.
MGCA_COMMIT = "680fe4a6ee0cc454ab58fd1a8b28fee81c03d742"
MGCA_SEED = 0
MGCA_VAL_NUM = 5000  # CHEXPERT_VALID_NUM, mgca/constants.py:29

TEST_FILES = ("groundtruth.csv", "test_labels.csv")  # study-level (Study) / image-level (Path)
TEST_ALIASES = {"Airspace Opacity": "Lung Opacity"}  # CheXlocalize's name

_VALUES = {"1.0": 1.0, "0.0": 0.0, "-1.0": -1.0, "": math.nan}
SEX_SPELLINGS = {"Female": "F", "Male": "M", "Unknown": attributes.UNKNOWN}
AP_PA = ("AP", "PA", "LL", "RL", "")
_VIEW = re.compile(r"view([0-9]+)_frontal\.jpg")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        return (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: label file not found") from exc
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the label file ({type(exc).__name__}: {exc})") from exc


def _check_header(path: Path, header: list[str], required: Sequence[str], *, exact: bool) -> None:
    """Raise unless ``header`` holds every name in ``required`` once (and, if ``exact``, nothing else)."""
    missing = [name for name in required if name not in header]
    extra = [name for name in header if name not in required] if exact else []
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if missing or extra or duplicated:
        problems = [f"{label} {', '.join(map(repr, names))}" for label, names in
                    (("lacks", missing), ("has unexpected", extra), ("repeats", duplicated)) if names]
        raise DataError(f"{path} line 1: header {'; '.join(problems)}; expected the columns {','.join(required)}")


def _label(text: str, where: str, column: str) -> float:
    value = _VALUES.get(text)
    if value is None:
        try:
            value = float(text)
        except ValueError:
            value = math.nan  # not in the accepted set
        if value not in (1.0, 0.0, -1.0):
            raise DataError(f"{where}: column {column!r} is {text!r}; expected 1.0, 0.0, -1.0 or empty")
    return value


@dataclass(frozen=True)
class LabelTable:
    """One parsed train.csv / valid.csv: ``paths`` in file order, ``frontal`` flags, and the 14
    observations as float32 (``values[i, j]`` for OBSERVATIONS[j]; NaN = empty). ``demographics`` holds
    each row's ``Sex``, ``Age`` and ``AP/PA`` as written and ``lines`` its line number, so that
    :meth:`ChexpertSource.attributes` can name the line of a value it cannot read."""

    file: Path
    paths: tuple[str, ...]
    frontal: np.ndarray
    values: np.ndarray
    demographics: tuple[tuple[str, str, str], ...] = ()
    lines: tuple[int, ...] = ()


def read_label_table(path: str | Path) -> LabelTable:
    """Read a CheXpert ``train.csv`` / ``valid.csv`` (or a ``.csv.gz`` copy).

    The header must hold the 19 CheXpert columns (any order, read by name). ``Path`` must be
    unique and start with a folder name (the release folder), ``Frontal/Lateral`` be ``Frontal``
    or ``Lateral``, and each observation ``1.0``, ``0.0``, ``-1.0`` or empty (integers are accepted).

    Raises:
        DataError: naming the file (and line and column) for a wrong header, a row with the wrong
            number of fields, an empty or duplicated Path, or a value outside those listed.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty label file; expected the header {','.join(COLUMNS)}")
    _check_header(path, header, COLUMNS, exact=True)
    at = {name: header.index(name) for name in COLUMNS}
    observation_at = [at[name] for name in OBSERVATIONS]
    paths: list[str] = []
    frontal: list[bool] = []
    values: list[list[float]] = []
    demographics: list[tuple[str, str, str]] = []
    lines: list[int] = []
    first_line: dict[str, int] = {}
    for fields in reader:
        where = f"{path} line {reader.line_num}"
        if len(fields) != len(COLUMNS):
            raise DataError(f"{where}: expected {len(COLUMNS)} fields, found {len(fields)}")
        image_id = fields[at["Path"]]
        if "/" not in image_id.strip("/"):
            raise DataError(f"{where}: Path {image_id!r} is not '<release folder>/<train|valid>/patient.../...jpg'")
        if image_id in first_line:
            raise DataError(f"{where}: Path {image_id} repeats line {first_line[image_id]}")
        first_line[image_id] = reader.line_num
        view = fields[at["Frontal/Lateral"]]
        if view not in ("Frontal", "Lateral"):
            raise DataError(f"{where}: column 'Frontal/Lateral' is {view!r}; expected Frontal or Lateral")
        paths.append(image_id)
        frontal.append(view == "Frontal")
        demographics.append((fields[at["Sex"]], fields[at["Age"]], fields[at["AP/PA"]]))
        lines.append(reader.line_num)
        row = [_VALUES.get(fields[j]) for j in observation_at]
        if None in row:  # a spelling other than the real file's: check and convert each value
            row = [_label(fields[j], where, header[j]) for j in observation_at]
        values.append(row)
    return LabelTable(path, tuple(paths), np.array(frontal, dtype=bool),
                      np.array(values, dtype=np.float32).reshape(len(paths), len(OBSERVATIONS)),
                      tuple(demographics), tuple(lines))


def row_attributes(table: LabelTable, row: int) -> dict[str, Any]:
    """``sex``, ``age`` and ``view`` of one row (:mod:`vlpbench.data.attributes`): ``Sex`` Male / Female /
    Unknown; ``Age`` in years, ``0`` being unknown (the real train.csv's three rows without an age); ``view``
    the ``AP/PA`` value (AP, PA, LL, RL) of a frontal row, ``FRONTAL`` where it is empty, ``LATERAL`` for a
    lateral row with an empty AP/PA (else its LL / RL).

    Raises:
        DataError: naming the file and line for a value in none of these forms.
    """
    sex, age, position = table.demographics[row]
    where = f"{table.file} line {table.lines[row]}"
    if position not in AP_PA:
        raise DataError(f"{where}: column 'AP/PA' is {position!r}; expected {', '.join(AP_PA[:-1])} or empty")
    view = position or ("FRONTAL" if table.frontal[row] else "LATERAL")
    return {"sex": attributes.sex(sex, where, SEX_SPELLINGS),
            "age": attributes.age_years(age, where, zero_is_unknown=True),
            "view": view}


def _check_classes(classes: Sequence[str], policy: str) -> list[int]:
    if policy not in POLICIES:
        raise ValueError(f"unknown uncertainty policy {policy!r}; choose one of {', '.join(POLICIES)}")
    unknown = [c for c in classes if c not in OBSERVATIONS]
    if unknown:
        raise ValueError(f"unknown CheXpert class(es) {unknown}; choose from {', '.join(OBSERVATIONS)}")
    if policy == "mgca" and any(c not in MGCA_UNCERTAIN for c in classes):
        raise ValueError(f"policy 'mgca' maps uncertain labels for {', '.join(MGCA_UNCERTAIN)} only; "
                         "use 'ones', 'zeros' or 'ignore' for other classes")
    return [OBSERVATIONS.index(c) for c in classes]


def apply_policy(values: np.ndarray, classes: Sequence[str] = COMPETITION_5, policy: str = "mgca") -> np.ndarray:
    """Map observation values (N x 14 in OBSERVATIONS order, NaN = empty) to int8 labels (N x len(classes)).

    Empty becomes 0 under every policy. Uncertain (-1) becomes: ``mgca`` 1 for Atelectasis, Edema
    and Pleural Effusion and 0 for Cardiomegaly and Consolidation; ``ones`` 1; ``zeros`` 0;
    ``ignore`` stays -1 (to be masked out of a loss or metric).

    Raises:
        ValueError: an unknown class or policy, or ``mgca`` with a class it has no mapping for.
    """
    columns = _check_classes(classes, policy)
    picked = np.nan_to_num(np.asarray(values, dtype=np.float32)[:, columns], nan=0.0)
    if policy == "mgca":
        uncertain = np.array([MGCA_UNCERTAIN[c] for c in classes], dtype=np.float32)
    else:
        uncertain = np.float32({"ones": 1, "zeros": 0, "ignore": -1}[policy])
    return np.where(picked == -1, uncertain, picked).astype(np.int8)


def _scan(folder: Path, prefix: str) -> set[str]:
    """Relative posix paths (``prefix/...``) of every file below ``folder`` (empty if it is absent)."""
    found: set[str] = set()
    pending = [(folder, prefix)]
    while pending:
        directory, relative = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            name = f"{relative}/{entry.name}"
            if entry.is_dir():
                pending.append((Path(entry.path), name))
            else:
                found.add(name)
    return found


def _dataset_dir(root: Path) -> Path:
    """The folder that holds train.csv and valid.csv: ``root`` itself or its release subfolder."""
    if not root.is_dir():
        raise DataError(f"{root}: CheXpert dataset folder not found")
    if any((root / f"{split}.csv").exists() for split in SPLITS):
        folder = root
    else:
        hits = [root / name for name in RELEASES if (root / name).is_dir()]
        if len(hits) > 1:
            raise DataError(f"{root} holds both {hits[0].name}/ and {hits[1].name}/; pass one of them as the root")
        if not hits:
            raise DataError(f"{root}: expected train.csv and valid.csv in it, or a subfolder "
                            f"{' or '.join(name + '/' for name in RELEASES)} holding them")
        folder = hits[0]
    for split in SPLITS:
        if not (folder / f"{split}.csv").is_file():
            raise DataError(f"expected {split}.csv in {folder}")
    return folder


class ChexpertSource(DatasetReader):
    """A CheXpert release on disk: ``train.csv``, ``valid.csv`` and the JPEG trees.

    Args:
        root: the dataset folder (``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/``) or its parent.

    Image ids are the ``Path`` values as the CSVs write them, e.g.
    ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``. Because both releases have
    the same rows below the release folder, an id may be given with either release prefix: split
    files (built from the small release) work on the full release too.

    Attributes:
        root: the folder given; folder: the release folder holding the CSVs; tables: the parsed
            ``{"train": LabelTable, "valid": LabelTable}``.

    Raises:
        DataError: no dataset folder, a missing or malformed CSV.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.folder = _dataset_dir(self.root)
        self.tables = {split: read_label_table(self.folder / f"{split}.csv") for split in SPLITS}
        # Rows keyed by the path below the release folder, which is where the file lives.
        self._rows: dict[str, tuple[str, int]] = {}
        self._written: dict[str, str] = {}
        for split, table in self.tables.items():
            for row, image_id in enumerate(table.paths):
                relative = image_id.strip("/").split("/", 1)[1]
                if relative in self._rows:
                    raise DataError(f"{table.file}: {image_id} names the same file as {self._written[relative]} "
                                    f"in {self._rows[relative][0]}.csv")
                self._rows[relative] = (split, row)
                self._written[relative] = image_id
        self._files = set().union(*(_scan(self.folder / split, split) for split in SPLITS))

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.chexpert.synth_chexpert`."""
        return is_synthetic(self.root, self.folder.parent)

    @property
    def image_ids(self) -> list[str]:
        """Every Path of train.csv, then of valid.csv, in file order."""
        return [image_id for table in self.tables.values() for image_id in table.paths]

    def frontal_ids(self, split: str = "train") -> list[str]:
        """The frontal images of ``train`` or ``valid`` (``Frontal/Lateral == Frontal``), in file order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        table = self.tables[split]
        return [table.paths[i] for i in np.flatnonzero(table.frontal)]

    def _relative(self, image_id: str) -> str | None:
        release, _, relative = image_id.strip("/").partition("/")
        if relative in self._rows and (release in RELEASES or self._written[relative] == image_id):
            return relative
        return None

    def _row(self, image_id: str) -> tuple[LabelTable, int]:
        relative = self._relative(image_id)
        if relative is None:
            raise DataError(f"image {image_id} is not in {self.folder / 'train.csv'} or {self.folder / 'valid.csv'}")
        split, row = self._rows[relative]
        return self.tables[split], row

    def observations(self, image_id: str) -> dict[str, float | None]:
        """The 14 observations as written: 1.0, 0.0, -1.0, or None where the CSV leaves it empty."""
        table, row = self._row(image_id)
        return {c: None if math.isnan(v) else float(v) for c, v in zip(OBSERVATIONS, table.values[row].tolist())}

    def labels(self, image_id: str, classes: Sequence[str] = COMPETITION_5, policy: str = "mgca") -> dict[str, int]:
        """``{class: label}`` under an uncertainty policy (see :func:`apply_policy`)."""
        table, row = self._row(image_id)
        mapped = apply_policy(table.values[row : row + 1], classes, policy)[0]
        return dict(zip(classes, map(int, mapped)))

    def path(self, image_id: str) -> Path:
        """The JPEG of the image: its Path below the dataset folder (the release folder dropped)."""
        relative = self._relative(image_id)
        if relative is None:
            raise DataError(f"image {image_id} is not in {self.folder / 'train.csv'} or {self.folder / 'valid.csv'}")
        return self.folder / relative

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image: uint8 (H, W)."""
        return read_image(self.path(image_id))

    @property
    def classes(self) -> tuple[str, ...]:
        """The 14 CheXpert observations."""
        return OBSERVATIONS

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping[str, Any]) -> list[int]:
        """:meth:`labels` under the task's ``label_policy`` (uncertain and blank labels mapped by it)."""
        check_classes(self, classes)
        policy = config.get("label_policy")
        if policy not in POLICIES:
            raise ConfigError(f"CheXpert labels need config key label_policy, one of {', '.join(POLICIES)}; "
                              f"got {policy!r}")
        try:
            labels = self.labels(image_id, classes, policy)
        except ValueError as e:  # 'mgca' with a class it has no mapping for
            raise ConfigError(f"label_policy={policy!r}: {e}") from e
        return [labels[c] for c in classes]

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """``sex``, ``age`` and ``view``, from the CSV columns Sex, Age, Frontal/Lateral and AP/PA."""
        return ("sex", "age", "view")

    def attributes(self, image_id: str) -> dict[str, Any]:
        """The row's ``sex``, ``age`` and ``view`` (:func:`row_attributes`)."""
        return row_attributes(*self._row(image_id))

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without a label row, in order (images are not looked at)."""
        return [i for i in ids if self._relative(i) is None]

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` that lack a row in train.csv / valid.csv or a JPEG, in order."""
        return [i for i in ids if (relative := self._relative(i)) is None or relative not in self._files]


# ---------------------------------------------------------------------------------------------
# Derived sets and splits


@functools.lru_cache(maxsize=1)
def shipped_table() -> LabelTable:
    """The real CheXpert-v1.0-small train.csv shipped in torchxrayvision, parsed once per process."""
    return read_label_table(xrv_data_file(CHEXPERT_TRAIN))


def _five_by_200(table: LabelTable) -> list[tuple[str, str]]:
    pathology = np.nan_to_num(table.values[:, [OBSERVATIONS.index(c) for c in PATHOLOGIES]], nan=0.0)
    chosen = []
    for name in COMPETITION_5:
        one_hot = np.array([c == name for c in PATHOLOGIES], dtype=np.float32)
        rows = np.flatnonzero(table.frontal & (pathology == one_hot).all(axis=1))
        if len(rows) < PER_CLASS:
            raise DataError(f"{table.file}: only {len(rows)} frontal rows have {name} = 1.0 and the other "
                            f"{len(PATHOLOGIES) - 1} pathologies 0.0 or empty; the 5x200 set needs {PER_CLASS}")
        # pandas' DataFrame.sample(n, random_state=0) is RandomState(0).permutation(len)[:n].
        draw = np.random.RandomState(FIVE_X_200_SEED).permutation(len(rows))[:PER_CLASS]
        chosen.extend((table.paths[rows[i]], name) for i in draw)
    return chosen


def build_5x200(train_csv: str | Path) -> list[tuple[str, str]]:
    """The CheXpert 5x200 zero-shot set (GLoRIA / MGCA): 1,000 ``(Path, class)`` pairs.

    The rule of docs/datasets.md, "CheXpert 5x200": empty values count as 0; frontal rows only; for each
    of Atelectasis, Cardiomegaly, Consolidation, Edema and Pleural Effusion, the rows where that class
    is 1.0 and the other 12 pathologies are 0 (a -1 anywhere excludes the row; No Finding is not
    constrained); 200 drawn per class exactly as MGCA's ``df.sample(n=200, random_state=0)`` does. On
    the real train.csv this reproduces the published instance (first row ``patient38614/study1``; AP
    764, PA 235, LL 1). Returned class by class, in draw order.

    Raises:
        DataError: a malformed train.csv, or a class with fewer than 200 candidate rows.
    """
    return _five_by_200(read_label_table(train_csv))


def _source_info(table: LabelTable) -> dict:
    raw = gzip.decompress(table.file.read_bytes())
    return {"package": "torchxrayvision", "file": table.file.name, "sha256": hashlib.sha256(raw).hexdigest(),
            "n_rows": len(table.paths), "n_frontal": int(table.frontal.sum())}


def generate_5x200_v1(out_dir: str | Path) -> dict:
    """Write split ``chexpert5x200/v1``: one part ``test`` (1,000 rows) with column ``class``, the
    index of the image's class in :data:`COMPETITION_5`; built by :func:`build_5x200` from the
    shipped train.csv. Returns the manifest."""
    table = shipped_table()
    pairs = _five_by_200(table)
    return write_split(
        out_dir,
        dataset="chexpert5x200",
        version="v1",
        parts={"test": [path for path, _ in pairs]},
        labels={path: {"class": COMPETITION_5.index(name)} for path, name in pairs},
        columns=["class"],
        generator="vlpbench.data.chexpert:generate_5x200_v1",
        seed=FIVE_X_200_SEED,
        fractions={"test": 1.0},
        source={**_source_info(table), "classes": list(COMPETITION_5), "per_class": PER_CLASS,
                "rule": "GLoRIA/MGCA: fillna(0), frontal, class = 1 and the other 12 pathologies = 0, "
                        "RandomState(0).permutation[:200] per class (pandas sample(random_state=0))"},
    )


def _combination(labels: np.ndarray) -> list[int]:
    """Each row's label combination as one integer (bit k = class k), to stratify multi-label draws."""
    return (labels.astype(np.int64) << np.arange(labels.shape[1])).sum(axis=1).tolist()


def generate_split_v1(out_dir: str | Path) -> dict:
    """Write split ``chexpert/v1`` from the shipped train.csv; return the manifest.

    The frontal images (191,027) minus the 5x200 zero-shot set (1,000): val = 5,000 images drawn
    with seed :data:`SEED`, stratified by the combination of the 5 labels; train = the rest
    (185,027); train_10pct ⊃ train_1pct drawn with :func:`multilabel_subset` (18,503 and 1,850).
    Label columns: :data:`COMPETITION_5` under the ``mgca`` policy. There is no ``test`` part: the
    test set is the official valid.csv (202 frontal images), taken from the user's copy at run time
    by :func:`test_ids` / :func:`test_split`.
    """
    table = shipped_table()
    excluded = {path for path, _ in _five_by_200(table)}
    rows = [i for i in np.flatnonzero(table.frontal) if table.paths[i] not in excluded]
    ids = [table.paths[i] for i in rows]
    mapped = apply_policy(table.values[rows], COMPETITION_5, "mgca")
    labels = _competition_labels(ids, mapped)
    val = set(stratified_sample(ids, _combination(mapped), VAL_SIZE, SEED))
    train = [i for i in ids if i not in val]
    train_10 = multilabel_subset(train, labels, COMPETITION_5, round(len(train) * SUBSETS["train_10pct"]), SEED)
    train_1 = multilabel_subset(train_10, labels, COMPETITION_5, round(len(train) * SUBSETS["train_1pct"]), SEED)
    return write_split(
        out_dir,
        dataset="chexpert",
        version="v1",
        parts={"train": train, "val": sorted(val), "train_1pct": train_1, "train_10pct": train_10},
        labels=labels,
        columns=list(COMPETITION_5),
        generator="vlpbench.data.chexpert:generate_split_v1",
        seed=SEED,
        fractions=dict(SUBSETS),
        source=_split_source(table, VAL_SIZE, len(excluded)),
    )


def _competition_labels(ids: list[str], mapped: np.ndarray) -> dict[str, dict[str, int]]:
    """``{image id: {finding: 0/1}}`` of the five competition findings, from the policy-mapped rows."""
    return {image_id: dict(zip(COMPETITION_5, map(int, row))) for image_id, row in zip(ids, mapped.tolist())}


def _split_source(table: LabelTable, val_size: int, n_excluded: int) -> dict:
    """The ``source`` block of a committed CheXpert split's manifest."""
    return {**_source_info(table), "policy": "mgca", "val_size": val_size,
            "excluded": f"chexpert5x200/v1 ({n_excluded} images)",
            "test": "the frontal images of the user's valid.csv (vlpbench.data.chexpert:test_split)"}


def mgca_parts(table: LabelTable) -> dict[str, list[str]]:
    """MGCA's CheXpert linear-classification split of a train.csv ``table``, with MGCA's 1 % / 10 % subsets.

    MGCA (``mgca/preprocess/chexpert.py`` @ 680fe4a, ``preprocess_chexpert_data``): the rows of train.csv
    (all views, line 41) without the 1,000 rows of the 5x200 set (48-49; :func:`build_5x200`, the same
    draw); the surviving rows keep their original index labels (row numbers of train.csv, with 1,000
    gaps). ``valid_ids = np.random.choice(len(df), 5000, replace=False)`` (50-51) under the global RNG seeded
    0 at import (line 5; no other global draw precedes it), which is ``RandomState(0).permutation(len(df))
    [:5000]``; ``valid_df = df.iloc[valid_ids]`` (52) takes those *positions*; ``train_df =
    df.drop(valid_ids, errors="ignore")`` (53) drops the rows whose *index label* is one of those numbers.
    Labels and positions differ after the first 5x200 row (row 94 of the real file), so val and train
    overlap: the bug. ``CheXpertImageDataset`` (``mgca/datasets/classification_dataset.py:38-53``) reads
    the written train / valid CSVs, keeps the frontal rows (48-49; every split) and, for train with
    ``data_pct`` != 1, ``df.sample(frac=data_pct, random_state=42)`` (52-53) over the frontal train rows in
    file order: ``train_10pct`` and ``train_1pct`` (:func:`vlpbench.data.splits.mgca_fraction_subsets`).

    Returns the frontal images of each part: ``train`` in train.csv order, ``val`` in MGCA's draw order,
    and the subsets in sample order. On the shipped file: train 185,771, val 4,284 (4,203 of them also in
    train), train_10pct 18,577, train_1pct 1,858 (1 % ⊂ 10 %); 4,175 frontal images of the pool (those whose
    row number was drawn, but not their row) are in neither part. The test part (valid.csv, frontal) comes
    from the user's copy, as for v1 (:func:`test_split`).
    """
    excluded = {path for path, _ in _five_by_200(table)}
    kept = [row for row, path in enumerate(table.paths) if path not in excluded]  # index labels, in order
    valid_positions = np.random.RandomState(MGCA_SEED).permutation(len(kept))[:MGCA_VAL_NUM]
    dropped = {int(position) for position in valid_positions}  # df.drop reads the numbers as labels
    val_rows = [kept[position] for position in valid_positions]
    train_rows = [row for row in kept if row not in dropped]
    train = [table.paths[row] for row in train_rows if table.frontal[row]]
    val = [table.paths[row] for row in val_rows if table.frontal[row]]
    return {"train": train, "val": val, **mgca_fraction_subsets(train)}


def generate_split_mgca(out_dir: str | Path) -> dict:
    """Write split ``chexpert/mgca`` (MGCA's split and subsets, :func:`mgca_parts`) from the shipped
    train.csv; return the manifest. Parts and labels as :func:`generate_split_v1` (no ``test`` part: the
    frontal images of the user's valid.csv, MGCA's test set too, mgca/constants.py:17-19). The val images
    that are also train images are kept in both parts, as MGCA has them; the manifest counts them."""
    table = shipped_table()
    parts = mgca_parts(table)
    ids = sorted(set(parts["train"]) | set(parts["val"]))
    at = {path: row for row, path in enumerate(table.paths)}
    labels = _competition_labels(ids, apply_policy(table.values[[at[i] for i in ids]], COMPETITION_5, "mgca"))
    leaked = len(set(parts["train"]) & set(parts["val"]))
    n_excluded = len(_five_by_200(table))  # all frontal
    lost = int(table.frontal.sum()) - n_excluded - len(ids)
    return write_split(
        out_dir,
        dataset="chexpert",
        version="mgca",
        parts={part: parts[part] for part in ("train", "val", "train_1pct", "train_10pct")},
        labels=labels,
        columns=list(COMPETITION_5),
        generator="vlpbench.data.chexpert:generate_split_mgca",
        seed=MGCA_SEED,
        fractions=dict(SUBSETS),
        source=_split_source(table, MGCA_VAL_NUM, n_excluded),
        reference={
            "repository": "HKU-MedAI/MGCA",
            "commit": MGCA_COMMIT,
            "file": "mgca/preprocess/chexpert.py",
            "lines": "39-61",
            "rule": ("rows of train.csv minus the 5x200 set; valid_ids = np.random.choice(len(df), 5000, "
                     "replace=False) after np.random.seed(0); val = df.iloc[valid_ids]; train = "
                     "df.drop(valid_ids, errors='ignore') (index labels); frontal rows only "
                     "(classification_dataset.py:48-49)"),
            "subsets": ("mgca/datasets/classification_dataset.py:38-53: df.sample(frac=0.1 / 0.01, random_state=42) "
                        "over the frontal rows of the train CSV in train.csv order; separate draws of the same "
                        "RandomState(42).permutation, so 1 % is inside 10 %"),
            "identical": ["train", "val", "train_10pct", "train_1pct"],
            "differs": {},
            "overlap": {
                "val_in_train": leaked,
                "in_neither": lost,
                "why": ("MGCA's bug kept as MGCA has it: val takes rows by position (df.iloc) but train drops "
                        "rows by index label (df.drop), and the labels skip the 5x200 rows, so most val images "
                        "stay in train (val serves early stopping and checkpoint selection only), and the rows "
                        "whose label was drawn instead are in neither part"),
            },
            "assumes": ("train.csv of CheXpert-v1.0 (MGCA's, constants.py:11-12) has the rows of the shipped "
                        "CheXpert-v1.0-small train.csv in the same order (the ids differ in the release folder only)"),
        },
    )


def test_ids(source: ChexpertSource) -> list[str]:
    """The test images of the CheXpert linear-probe protocol: the frontal rows of the user's valid.csv
    (202 in the official release), in file order."""
    return source.frontal_ids("valid")


test_ids.__test__ = False  # not a pytest test, wherever a test module imports it


def test_split(source: ChexpertSource) -> Split:
    """The test part derived from the user's valid.csv: a split with one part ``test`` (its frontal
    images, labels :data:`COMPETITION_5` under ``mgca``), cached by the file's sha256."""
    table = source.tables["valid"]

    def build(out_dir: Path, version: str) -> dict:
        rows = np.flatnonzero(table.frontal)
        ids = [table.paths[r] for r in rows]
        mapped = apply_policy(table.values[rows], COMPETITION_5, "mgca")
        return write_split(
            out_dir, dataset="chexpert", version=version, parts={"test": ids},
            labels={i: dict(zip(COMPETITION_5, map(int, row))) for i, row in zip(ids, mapped.tolist())},
            columns=list(COMPETITION_5), generator="vlpbench.data.chexpert:test_split", seed=SEED,
            fractions={"test": 1.0}, source={"file": table.file.name, "policy": "mgca"},
        )

    return derived_split("chexpert", "v1", sources=[table.file], build=build)


test_split.__test__ = False  # not a pytest test, wherever a test module imports it


# ---------------------------------------------------------------------------------------------
# The test set with radiologist labels


def _find(root: Path, name: str, *, folder: bool) -> Path | None:
    """``root/name`` or a single ``root/*/name`` (a file or a folder)."""
    kind = Path.is_dir if folder else Path.is_file
    if kind(root / name):
        return root / name
    hits = [p for p in sorted(root.glob(f"*/{name}")) if kind(p)]
    if len(hits) > 1:
        raise DataError(f"{root}: several {name}: {', '.join(map(str, hits))}; keep one")
    return hits[0] if hits else None


class ChexpertTestSet(DatasetReader):
    """The CheXpert test set with radiologist labels (the 500-study zero-shot set).

    Args:
        root: a folder holding the label file and the ``test/`` image tree (each directly or in one
            subfolder). The label file is ``groundtruth.csv`` (rajpurkarlab/cheXpert-test-set-labels:
            study-level, first column ``Study``, integer 0/1 labels, no final newline) or else
            CheXlocalize's ``test_labels.csv`` (image-level ``Path`` column). Labels are read by
            column name whatever their order (the radiologist files swap Lung Lesion and Lung
            Opacity; CheXlocalize says Airspace Opacity).

    Ids are the ``Study`` (or ``Path``) values as written. A study's image is its lowest-numbered
    frontal view, ``test/<patient>/<study>/view1_frontal.jpg`` where present (CheXzero's choice).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: CheXpert test-set folder not found")
        found = [p for p in (_find(self.root, name, folder=False) for name in TEST_FILES) if p is not None]
        if not found:
            raise DataError(f"expected {' or '.join(TEST_FILES)} in {self.root} or one of its subfolders")
        self.label_file = found[0]
        self.test_dir = _find(self.root, "test", folder=True)
        self._labels = self._read(self.label_file)
        files = _scan(self.test_dir, "test") if self.test_dir is not None else set()
        # Images by <patient>/<study>/<view>.jpg, and each study's lowest-numbered frontal view.
        self._views = {relative.split("/", 1)[1]: relative for relative in files}
        studies: dict[str, tuple[int, str]] = {}
        for relative in files:
            parts, number = relative.split("/"), _view_number(relative)
            if number is not None and len(parts) == 4:
                study = "/".join(parts[1:3])
                studies[study] = min(studies.get(study, (number, relative)), (number, relative))
        self._studies = {study: relative for study, (_, relative) in studies.items()}

    def _read(self, path: Path) -> dict[str, dict[str, int]]:
        reader = csv.reader(io.StringIO(_read_text(path), newline=""))
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty label file; expected a header 'Study,<14 CheXpert observations>'")
        header = [TEST_ALIASES.get(name, name) for name in header]
        key = "Study" if "Study" in header else "Path"
        _check_header(path, header, (key, *OBSERVATIONS), exact=False)
        at = {name: header.index(name) for name in (key, *OBSERVATIONS)}
        labels: dict[str, dict[str, int]] = {}
        for fields in reader:
            where = f"{path} line {reader.line_num}"
            if len(fields) != len(header):
                raise DataError(f"{where}: expected {len(header)} fields, found {len(fields)}")
            image_id = fields[at[key]]
            if not image_id or image_id in labels:
                raise DataError(f"{where}: {key} {image_id!r} is {'repeated' if image_id else 'empty'}")
            row = {}
            for name in OBSERVATIONS:
                text = fields[at[name]]
                if text not in ("0", "1", "0.0", "1.0"):
                    raise DataError(f"{where}: column {name!r} is {text!r}; expected 0 or 1")
                row[name] = int(float(text))
            labels[image_id] = row
        return labels

    @property
    def synthetic(self) -> bool:
        """True for a test set written by :func:`vlpbench.synthetic.chexpert.synth_chexpert`: the
        marker is in ``root`` or, when ``root`` is the release folder, in its parent."""
        return is_synthetic(self.root, self.label_file.parent.parent)

    @property
    def image_ids(self) -> list[str]:
        """Every Study (or Path) of the label file, in file order."""
        return list(self._labels)

    def labels(self, image_id: str, classes: Sequence[str] = COMPETITION_5) -> dict[str, int]:
        """``{class: 0 or 1}``: the radiologists' majority vote."""
        unknown = [c for c in classes if c not in OBSERVATIONS]
        if unknown:
            raise ValueError(f"unknown CheXpert class(es) {unknown}; choose from {', '.join(OBSERVATIONS)}")
        if image_id not in self._labels:
            raise DataError(f"{image_id} is not in {self.label_file}")
        return {c: self._labels[image_id][c] for c in classes}

    def _relative(self, image_id: str) -> str | None:
        # A Path id ends in <patient>/<study>/<view>.jpg, a Study id in <patient>/<study>.
        parts = image_id.strip("/").split("/")
        if image_id.endswith(".jpg"):
            return self._views.get("/".join(parts[-3:]))
        return self._studies.get("/".join(parts[-2:]))

    def path(self, image_id: str) -> Path:
        """The image of a Study id (its first frontal view) or of a Path id."""
        relative = self._relative(image_id)
        if relative is None or self.test_dir is None:
            wanted = "" if image_id.endswith(".jpg") else " (a view<N>_frontal.jpg of the study)"
            raise DataError(f"no image for {image_id} below {self.test_dir or self.root / 'test'}{wanted}")
        return self.test_dir.parent / relative

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image: uint8 (H, W)."""
        return read_image(self.path(image_id))

    @property
    def classes(self) -> tuple[str, ...]:
        """The 14 CheXpert observations."""
        return OBSERVATIONS

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping[str, Any]) -> list[int]:
        """The radiologists' majority vote (never uncertain: no label policy applies)."""
        check_classes(self, classes)
        return list(self.labels(image_id, classes).values())

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without a label row, in order (images are not looked at)."""
        return [i for i in ids if i not in self._labels]

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` that lack a label row or an image, in order."""
        return [i for i in ids if i not in self._labels or self._relative(i) is None]


def _view_number(relative: str) -> int | None:
    match = _VIEW.fullmatch(relative.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None
