"""COVIDx reader: space-separated label lines without header, images in train/ and test/.

Format (docs/datasets.md, "COVIDx"): one line per image, ``patient_id filename class data_source``
(single spaces, LF). Quirks handled here:

- patient ids with spaces (``COVID 70 COVID(70).png COVID-19 sirm`` in v7/v8): lines are parsed
  from the right;
- lines without the data source (``<patient> <file> normal``: the v1–v2 test files, and the rsna
  lines of test_COVIDx7A/7B, mixed with 4-field lines in one file);
- two class vocabularies: ``normal`` / ``pneumonia`` / ``COVID-19`` (COVIDx ≤ 5, 7A, 8A, 9A, CXR-3A)
  and ``negative`` / ``positive`` (6, 7B, 8B, 9B, the Kaggle CXR-2/3/4 ``train.txt``); case matters;
- the data source as written, typos included (``rnsa``).

Label files (in the dataset folder or a direct subfolder such as ``labels/``): ``train_COVIDx<V>.txt``
and ``test_COVIDx<V>.txt`` of the GitHub releases (version V: ``9A``, ``9B``, ``CXR-3A`` from
``train_COVIDx_CXR-3A.txt``, ...), or the Kaggle ``train.txt``, ``test.txt`` and, where present,
``val.txt`` (version ``kaggle``). Images (PNG / JPG / JPEG, any letter case,
some RGB) sit in ``train/``, ``test/`` and ``val/``, in the dataset folder or a direct subfolder
(``data/train``).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpbench.data import attributes, is_synthetic
from vlpbench.data.base import DatasetReader, check_classes
from vlpbench.data.images import read_image
from vlpbench.data.splits import (Split, derived_split, holdout_parts, mgca_fraction_subsets, train_size_split_ids,
                                  write_split)
from vlpbench.errors import DataError

THREE_CLASS, BINARY = "3-class", "binary"
# Class names in label order: the index is the integer label.
SCHEMES = {THREE_CLASS: ("normal", "pneumonia", "COVID-19"), BINARY: ("negative", "positive")}
CLASS_SCHEME = {name: scheme for scheme, names in SCHEMES.items() for name in names}
PARTS = ("train", "val", "test")
KAGGLE = "kaggle"  # the version name of the unversioned Kaggle train.txt / val.txt / test.txt
PREFERRED = ("9A", KAGGLE)  # chosen in this order when several versions are present; 9A is MGCA's

_GITHUB_NAME = re.compile(r"(train|val|test)_COVIDx_?(.+)\.txt")
_KAGGLE_NAME = re.compile(r"(train|val|test)\.txt")

SEED = 0
VAL_FRACTION = 0.2  # of the train file (MGCA: train_test_split(train_size=0.8, random_state=0))
LABEL_COLUMN = "class"
# MGCA's split (HKU-MedAI/MGCA @ 680fe4a, mgca/preprocess/covidx.py:18-46): train_test_split of the rows of
# train_COVIDx9A.txt, train_size=0.8, random_state=0 -> train / val; test = test_COVIDx9A.txt.
MGCA_COMMIT = "680fe4a6ee0cc454ab58fd1a8b28fee81c03d742"
MGCA_TRAIN_SIZE = 0.8
MGCA_RANDOM_STATE = 0
MGCA_FILES = {"train": "train_COVIDx9A.txt", "test": "test_COVIDx9A.txt"}  # mgca/constants.py:228,230


def parse_line(line: str, where: str = "") -> tuple[str, str, str, str | None]:
    """Split one label line into ``(patient_id, filename, class, data_source)``, from the right.

    ``data_source`` is None on a 3-field line. The patient id is everything left of the file name,
    rejoined with single spaces.

    Raises:
        DataError: starting with ``where``, when neither of the last two fields is a class name or
            the patient id is missing.
    """
    prefix = f"{where}: " if where else ""
    tokens = line.split()
    # The class is the last field, or the one before the data source.
    if tokens and tokens[-1] in CLASS_SCHEME:
        tail, source = 2, None
    elif len(tokens) >= 2 and tokens[-2] in CLASS_SCHEME:
        tail, source = 3, tokens[-1]
    else:
        raise DataError(f"{prefix}no class name in the last two fields of {line[:80]!r}; expected one of "
                        f"{', '.join(CLASS_SCHEME)} (case matters)")
    if len(tokens) <= tail:
        raise DataError(f"{prefix}expected 'patient_id filename class [data_source]', found {len(tokens)} "
                        f"field(s): {line[:80]!r}")
    return " ".join(tokens[:-tail]), tokens[-tail], tokens[1 - tail], source


def read_labels(path: str | Path) -> list[tuple[int, str, str, str, str | None]]:
    """Read one COVIDx label file into ``[(line number, patient_id, filename, class, source), ...]``.

    Raises:
        DataError: naming the file and line, for an unreadable or empty file or a malformed line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the label file ({type(exc).__name__}: {exc})") from exc
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            raise DataError(f"{path} line {number}: empty line; expected 'patient_id filename class [data_source]'")
        rows.append((number, *parse_line(line, f"{path} line {number}")))
    if not rows:
        raise DataError(f"{path}: empty label file; expected lines 'patient_id filename class data_source'")
    return rows


def find_label_files(root: Path) -> dict[str, dict[str, Path]]:
    """``{version: {part: path}}`` of the label files in ``root`` and its direct subfolders."""
    versions: dict[str, dict[str, Path]] = {}
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    for folder in folders:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            github, kaggle = _GITHUB_NAME.fullmatch(entry.name), _KAGGLE_NAME.fullmatch(entry.name)
            if not entry.is_file() or not (github or kaggle):
                continue
            part, version = (github.group(1), github.group(2)) if github else (kaggle.group(1), KAGGLE)
            files = versions.setdefault(version, {})
            if part in files:
                raise DataError(f"two {entry.name} label files: {files[part]} and {entry.path}; keep one")
            files[part] = Path(entry.path)
    return versions


def _choose_version(root: Path, versions: dict[str, dict[str, Path]], version: str | None) -> str:
    complete = sorted(v for v, files in versions.items() if "train" in files and "test" in files)
    if version is not None:
        if version not in complete:
            raise DataError(f"{root}: no COVIDx version {version!r} (train and test label files); found "
                            f"{', '.join(complete) or 'none'}")
        return version
    for preferred in PREFERRED:
        if preferred in complete:
            return preferred
    if len(complete) == 1:
        return complete[0]
    if not complete:
        raise DataError(f"{root}: expected COVIDx label files train_COVIDx9A.txt and test_COVIDx9A.txt (or train.txt "
                        "and test.txt) in this folder or a direct subfolder such as labels/")
    raise DataError(f"{root}: several COVIDx versions {', '.join(complete)}; choose one with version=")


def _image_folder(root: Path, part: str) -> Path | None:
    """The folder of the part's images: ``root/<part>`` or the one ``root/*/<part>``."""
    if (root / part).is_dir():
        return root / part
    hits = sorted(p / part for p in root.iterdir() if (p / part).is_dir())
    if len(hits) > 1:
        raise DataError(f"{root}: several {part}/ image folders {[str(h) for h in hits]}; keep one")
    return hits[0] if hits else None


class CovidxSource(DatasetReader):
    """A COVIDx dataset on disk: one version's label files and the ``train/`` / ``val/`` / ``test/`` images.

    Args:
        root: the dataset folder (label files in it or in a direct subfolder, image folders likewise).
        version: which label files to read where several versions are present (``"9A"``, ``"9B"``,
            ``"CXR-3A"``, ``"kaggle"`` for train.txt / test.txt); default: 9A, else the Kaggle files,
            else the only version present.

    Raises:
        DataError: no complete version (train and test file), several without a choice, a malformed
            line, a file name listed twice, classes of both schemes, or two image folders for a part.
    """

    def __init__(self, root: str | Path, version: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: COVIDx dataset folder not found")
        versions = find_label_files(self.root)
        self.version = _choose_version(self.root, versions, version)
        self.label_files = {part: versions[self.version][part] for part in PARTS if part in versions[self.version]}
        self._rows: dict[str, tuple[str, str, str | None, str]] = {}  # filename -> patient, class, source, part
        where: dict[str, str] = {}
        self.scheme = ""
        for part, path in self.label_files.items():
            for number, patient, filename, name, source in read_labels(path):
                here = f"{path} line {number}"
                if not self.scheme:
                    self.scheme, scheme_line = CLASS_SCHEME[name], here
                elif CLASS_SCHEME[name] != self.scheme:
                    raise DataError(f"{here}: class {name!r} is not of the {self.scheme} scheme "
                                    f"({', '.join(SCHEMES[self.scheme])}) set by {scheme_line}")
                if filename in self._rows:
                    raise DataError(f"{here}: {filename} is already listed at {where[filename]}")
                self._rows[filename] = (patient, name, source, part)
                where[filename] = here

        self._files: dict[str, dict[str, Path]] = {}
        for part in self.label_files:
            folder = _image_folder(self.root, part)
            self._files[part] = {} if folder is None else {
                e.name: Path(e.path) for e in os.scandir(folder) if e.is_file()}

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names in label order: normal, pneumonia, COVID-19, or negative, positive."""
        return SCHEMES[self.scheme]

    @property
    def image_ids(self) -> list[str]:
        """Every file name of the train, val and test label files, in file order."""
        return list(self._rows)

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.covidx.synth_covidx`."""
        return is_synthetic(self.root)

    def _row(self, image_id: str) -> tuple[str, str, str | None, str]:
        try:
            return self._rows[image_id]
        except KeyError:
            files = ", ".join(map(str, self.label_files.values()))
            raise DataError(f"image {image_id} is not in {files}") from None

    def label(self, image_id: str) -> int:
        """The class index: normal 0, pneumonia 1, COVID-19 2 (3-class), or negative 0, positive 1 (binary)."""
        return SCHEMES[self.scheme].index(self._row(image_id)[1])

    def class_name(self, image_id: str) -> str:
        """The class as the label file writes it."""
        return self._row(image_id)[1]

    def patient_id(self, image_id: str) -> str:
        """The patient id (may contain spaces)."""
        return self._row(image_id)[0]

    def source_name(self, image_id: str) -> str | None:
        """The data source as written (``rsna``, ``rnsa``, ``sirm``, ...); None on a 3-field line."""
        return self._row(image_id)[2]

    def part(self, image_id: str) -> str:
        """The label file the image comes from: ``"train"``, ``"val"`` or ``"test"``."""
        return self._row(image_id)[3]

    def path(self, image_id: str) -> Path:
        """The image file, ``<part>/<filename>``.

        Raises:
            DataError: the file is not in the part's image folder.
        """
        part = self.part(image_id)
        try:
            return self._files[part][image_id]
        except KeyError:
            raise DataError(f"no image file {part}/{image_id} below {self.root}") from None

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image: uint8 (H, W); RGB files are converted to luminance."""
        return read_image(self.path(image_id))

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping[str, Any]) -> list[int]:
        """1 for the image's one class, 0 for the others."""
        check_classes(self, classes)
        name = self.class_name(image_id)
        return [int(name == c) for c in classes]

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """``site``: the label line's data source."""
        return ("site",)

    def attributes(self, image_id: str) -> dict[str, Any]:
        """The image's ``site``: its data source as written (``rsna``, ``rnsa``, ``sirm``, ...), ``unknown`` on a
        line without one."""
        return {"site": attributes.site(self.source_name(image_id))}

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without a label row, in order (images are not looked at)."""
        return [i for i in ids if i not in self._rows]

    def missing(self, ids: list[str]) -> list[str]:
        """The ids among ``ids`` that lack a label line or an image file in their part's folder, in order."""
        return [i for i in ids if i not in self._rows or i not in self._files[self._rows[i][3]]]


def _split_inputs(source: CovidxSource) -> tuple[dict[str, int], list[str], list[str], dict]:
    """What every COVIDx split is built from: the labels, the train file's lines (file order, as
    pd.read_csv(sep=" ", header=None) gives them), the test file's lines and the manifest's ``source`` block."""
    labels = {image_id: source.label(image_id) for image_id in source.image_ids}
    pool = [i for i in source.image_ids if source.part(i) == "train"]
    test = [i for i in source.image_ids if source.part(i) == "test"]
    files = {part: source.label_files[part] for part in ("train", "test")}
    info = {"covidx_version": source.version, "scheme": source.scheme, "classes": list(source.classes),
            "test": files["test"].name,
            "files": {path.name: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                  "n_images": len(pool) if part == "train" else len(test)}
                      for part, path in files.items()}}
    return labels, pool, test, info


def build_split_v1(source: CovidxSource, out_dir: str | Path, version: str = "v1") -> dict:
    """Write COVIDx split v1 of ``source`` to ``out_dir`` (see :func:`split_v1`); return the manifest."""
    labels, pool, test, info = _split_inputs(source)
    # MGCA's train_test_split(train_size=0.8) rounds the train part down and gives val the rest.
    n_val = len(pool) - math.floor(len(pool) * (1 - VAL_FRACTION) + 1e-9)
    return write_split(
        out_dir,
        dataset="covidx",
        version=version,
        parts=holdout_parts(pool, test, labels, n_val, SEED),
        labels={image_id: {LABEL_COLUMN: y} for image_id, y in labels.items()},
        columns=[LABEL_COLUMN],
        generator="vlpbench.data.covidx:split_v1",
        seed=SEED,
        fractions={"train": 1 - VAL_FRACTION, "val": VAL_FRACTION, "train_10pct": 0.1, "train_1pct": 0.01},
        source=info,
    )


def split_v1(source: CovidxSource) -> Split:
    """COVIDx split v1, derived from the user's train and test label files (cached by their sha256).

    The train file is split 80/20 into train / val, stratified by class with seed 0 (MGCA splits
    train_COVIDx9A.txt 80/20 with random_state=0: 24,104 / 6,026 of 30,130); test is the test file
    (400 for 9A). ``train_10pct`` is drawn from train and ``train_1pct`` from it, both stratified. Label
    column ``class``: normal 0, pneumonia 1, COVID-19 2 (binary versions: negative 0, positive 1). A
    Kaggle ``val.txt`` is not used.
    """
    files = [source.label_files["train"], source.label_files["test"]]
    return derived_split("covidx", "v1", sources=files,
                         build=lambda out_dir, version: build_split_v1(source, out_dir, version))


def build_split_mgca(source: CovidxSource, out_dir: str | Path, version: str = "mgca") -> dict:
    """Write COVIDx split ``mgca`` of ``source`` to ``out_dir`` (see :func:`split_mgca`); return the manifest."""
    # MGCA reads the train file's lines in file order (mgca/preprocess/covidx.py:21).
    labels, pool, test, info = _split_inputs(source)
    train, val = train_size_split_ids(pool, MGCA_TRAIN_SIZE, MGCA_RANDOM_STATE)
    names = {part: source.label_files[part].name for part in ("train", "test")}
    return write_split(
        out_dir,
        dataset="covidx",
        version=version,
        parts={"train": train, "val": val, "test": test, **mgca_fraction_subsets(train)},
        labels={image_id: {LABEL_COLUMN: y} for image_id, y in labels.items()},
        columns=[LABEL_COLUMN],
        generator="vlpbench.data.covidx:split_mgca",
        seed=MGCA_RANDOM_STATE,
        fractions={"train": MGCA_TRAIN_SIZE, "val": 1 - MGCA_TRAIN_SIZE, "train_10pct": 0.1, "train_1pct": 0.01},
        source=info,
        reference={
            "repository": "HKU-MedAI/MGCA",
            "commit": MGCA_COMMIT,
            "file": "mgca/preprocess/covidx.py",
            "lines": "18-46",
            "rule": "train_test_split(rows of train_COVIDx9A.txt in file order, train_size=0.8, random_state=0) "
                    "-> train, val; test = test_COVIDx9A.txt",
            "subsets": "mgca/datasets/classification_dataset.py:193-194,208-209: df.sample(frac=0.1 / 0.01, "
                       "random_state=42) over train.csv, whose rows are MGCA's train part in sklearn's order "
                       "(covidx.py:37); separate draws of the same RandomState(42).permutation, so 1 % is inside 10 %",
            "files": MGCA_FILES,
            "identical": ["train", "val", "test", "train_10pct", "train_1pct"],
            "differs": ({} if names == MGCA_FILES else
                        {"source": f"split from {names['train']} / {names['test']}, not MGCA's "
                                   f"{MGCA_FILES['train']} / {MGCA_FILES['test']}: MGCA's rule, other files"}),
        },
    )


def split_mgca(source: CovidxSource) -> Split:
    """COVIDx split ``mgca``: MGCA's split and its 1 % / 10 % subsets, derived from the user's train and test
    label files (cached by their sha256; COVIDx's label files ship with no package, so none is committed).

    MGCA (``mgca/preprocess/covidx.py:18-46`` @ 680fe4a) reads ``train_COVIDx9A.txt`` with
    ``pd.read_csv(sep=" ", header=None)`` (21) and calls ``train_test_split(raw_train_df, train_size=0.8,
    random_state=0)`` (35-36): train is ``floor(0.8 n)`` rows, val the first ``n - floor(0.8 n)`` of
    ``RandomState(0).permutation(n)`` over the file's lines, train the rest in that order
    (:func:`vlpbench.data.splits.train_size_split`); not stratified. 24,104 / 6,026 on the 30,130 lines of
    9A. Test is ``test_COVIDx9A.txt`` (400). ``COVIDXImageDataset`` reads the train CSV MGCA wrote (37) and
    keeps ``df.sample(frac=data_pct, random_state=42)`` of it (``classification_dataset.py:193-194, 208-209``):
    ``train_10pct`` and ``train_1pct`` (:func:`vlpbench.data.splits.mgca_fraction_subsets`; 2,410 and 241 on
    9A, 1 % ⊂ 10 %). Label column ``class`` as in v1 (MGCA's ``set_label``, covidx.py:9-15: normal 0,
    pneumonia 1, COVID-19 2). The split equals MGCA's only for the 9A files in the release's line order; other
    versions get MGCA's rule, and the manifest says so. A Kaggle ``val.txt`` is not used.
    """
    files = [source.label_files["train"], source.label_files["test"]]
    return derived_split("covidx", "mgca", sources=files,
                         build=lambda out_dir, version: build_split_mgca(source, out_dir, version))
