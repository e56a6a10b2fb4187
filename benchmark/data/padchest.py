"""PadChest reader (BIMCV, Bustos et al. 2020): ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``
and the 16-bit PNGs under numbered folders ``<ImageDir>/<ImageID>``, plus the committed split v1.

Format (docs/datasets.md, "PadChest"; checked against the copy torchxrayvision ships, which
``PC_Dataset`` reads with pandas, mlmed/torchxrayvision torchxrayvision/datasets.py ``PC_Dataset``):

- A quoted CSV (the ``Report`` and list columns hold commas) of 160,861 rows whose columns include
  ImageID, ImageDir (an integer folder, 0-50 and 54), StudyID, PatientID, PatientBirth,
  PatientSex_DICOM, Projection (PA, L, AP, AP_horizontal, COSTAL, EXCLUDE, UNK), MethodLabel
  (``Physician`` for 39,053 rows, ``RNN_model`` for the rest) and Labels. The first header name may
  be empty (a pandas index column, as in the shipped copy); extra columns are ignored.
- Labels is a Python-list-like string, ``['pleural effusion', 'cardiomegaly']``, with stray leading
  spaces (``' pneumonia'``), empty entries (``['']``, ``['cardiomegaly', '', 'unchanged']``),
  upper case (``'COPD signs'``) and the non-finding labels ``normal``, ``exclude``,
  ``suboptimal study`` and ``unchanged``; 103 cells are empty (``nan`` in the shipped copy). :func:`parse_labels` reads it with a
  strict grammar (never ``eval``) and normalises each entry (strip, lower).

Rows kept (:data:`FRONTAL`, :meth:`PadchestSource.test_ids`): frontal projections (PA, AP,
AP_horizontal) labelled by a physician (MethodLabel ``Physician``), with a non-empty Labels cell that
is not ``exclude``. CARZero evaluates on the manually annotated samples (laihaoran/CARZero issue #11);
MAVL's test list ships without the rule that made it (hieuvmphan/CVPR2024_MAVL issue #2), so the
physician-labelled frontal subset is vlpbench's documented choice. With the shipped CSV this is
26,373 images and 136 findings.

Split v1 (:func:`generate_split_v1`, committed from the shipped CSV): one part, ``test``, holding
those images with one 0/1 column per finding that has at least :data:`MIN_POSITIVES` positive
images among them (no source found that fixes N for the physician-labelled set; 20 is vlpbench's
choice). ``normal``, ``exclude``, ``suboptimal study`` and ``unchanged`` are not findings.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlpbench.data import is_synthetic
from vlpbench.data.base import DatasetReader
from vlpbench.data.images import read_image
from vlpbench.data.splits import write_split
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.errors import ConfigError, DataError

LABEL_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
LABEL_FILES = (LABEL_FILE, LABEL_FILE + ".gz")  # in order of preference
XRV_LABEL_FILE = LABEL_FILE + ".gz"  # the copy torchxrayvision ships in its data/ folder
REQUIRED = ("ImageID", "ImageDir", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM", "Projection",
            "MethodLabel", "Labels")
FRONTAL = ("PA", "AP", "AP_horizontal")  # AP_horizontal: supine AP (torchxrayvision renames it "AP Supine")
PHYSICIAN = "Physician"
METHODS = (PHYSICIAN, "RNN_model")
NON_FINDINGS = ("normal", "exclude", "suboptimal study", "unchanged")
EXCLUDE = "exclude"
MIN_POSITIVES = 20
SEED = 0

EMPTY_CELLS = ("", "nan")  # the shipped copy spells its 103 empty cells "nan" (pandas' NaN written out)
_ITEM = re.compile(r"'([^'\\]*)'")
_SEPARATOR = re.compile(r"\s*,\s*")


def parse_labels(text: str, where: str) -> tuple[str, ...] | None:
    """The normalised entries of a Labels cell: None for an empty cell (or ``nan``), else the entries stripped and
    lower-cased, empty ones dropped, each once, in cell order.

    The grammar is ``[`` then zero or more ``'...'`` items (no quote or backslash inside) separated by
    commas with optional spaces, then ``]``; nothing is evaluated.

    Raises:
        DataError: naming ``where`` (file and line) and the position for anything else.
    """
    text = text.strip()
    if text in EMPTY_CELLS:
        return None
    if not (text.startswith("[") and text.endswith("]")):
        raise DataError(f"{where}: Labels {text[:80]!r} is not a list such as ['pleural effusion', 'cardiomegaly']")
    body, position, items = text[1:-1].strip(), 0, []
    while position < len(body):
        if items:
            separator = _SEPARATOR.match(body, position)
            if not separator:
                raise DataError(f"{where}: Labels {text[:80]!r}: expected ',' at character {position + 2}")
            position = separator.end()
        item = _ITEM.match(body, position)
        if not item:
            raise DataError(f"{where}: Labels {text[:80]!r}: expected a quoted label at character {position + 2}")
        items.append(item.group(1))
        position = item.end()
    normalised = [item.strip().lower() for item in items]
    return tuple(dict.fromkeys(item for item in normalised if item))


@dataclass(frozen=True)
class PadchestEntry:
    """One row of the label CSV; ``labels`` as :func:`parse_labels` gives them (None: empty cell)."""

    image_id: str
    image_dir: str
    study_id: str
    patient_id: str
    sex: str
    birth: str
    projection: str
    method: str
    labels: tuple[str, ...] | None
    line: int


def _text(path: Path) -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: PadChest label CSV not found") from exc
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the label CSV ({type(exc).__name__}: {exc})") from exc


def read_label_csv(path: str | Path) -> dict[str, PadchestEntry]:
    """Read the PadChest label CSV (or a ``.gz`` copy) into ``{ImageID: entry}`` in file order.

    Raises:
        DataError: naming the file and line for a missing column, a row with the wrong number of
            fields, a repeated or empty ImageID, a non-integer ImageDir, an unknown MethodLabel, or a
            malformed Labels cell.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    header = next(reader, [])
    if missing := [name for name in REQUIRED if name not in header]:
        raise DataError(f"{path} line 1: no column(s) {', '.join(missing)}; expected the PadChest header with "
                        f"{', '.join(REQUIRED)}")
    index = {name: header.index(name) for name in REQUIRED}
    entries: dict[str, PadchestEntry] = {}
    for row in reader:
        where = f"{path} line {reader.line_num}"
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
        value = {name: row[i].strip() for name, i in index.items()}
        image_id = value["ImageID"]
        if not image_id.endswith(".png"):
            raise DataError(f"{where}: ImageID {image_id!r} is not a .png file name")
        if image_id in entries:
            raise DataError(f"{where}: ImageID {image_id} appears twice")
        if not (value["ImageDir"].isascii() and value["ImageDir"].isdigit()):
            raise DataError(f"{where}: ImageDir {value['ImageDir']!r} is not a folder number")
        if value["MethodLabel"] not in METHODS:
            raise DataError(f"{where}: MethodLabel {value['MethodLabel']!r}, expected {' or '.join(METHODS)}")
        entries[image_id] = PadchestEntry(
            image_id=image_id, image_dir=value["ImageDir"], study_id=value["StudyID"],
            patient_id=value["PatientID"], sex=value["PatientSex_DICOM"], birth=value["PatientBirth"],
            projection=value["Projection"], method=value["MethodLabel"],
            labels=parse_labels(value["Labels"], where), line=reader.line_num)
    return entries


def evaluated(entry: PadchestEntry) -> bool:
    """True for a row of the test set: frontal, physician-labelled, with labels and not ``exclude``."""
    return (entry.projection in FRONTAL and entry.method == PHYSICIAN and bool(entry.labels)
            and EXCLUDE not in entry.labels)


def findings(entries: Mapping[str, PadchestEntry], ids: Sequence[str],
             min_positives: int = MIN_POSITIVES) -> tuple[str, ...]:
    """The finding labels with at least ``min_positives`` positive images among ``ids``, most frequent
    first (ties by name); :data:`NON_FINDINGS` are left out."""
    counts = Counter(label for i in ids for label in entries[i].labels or () if label not in NON_FINDINGS)
    return tuple(label for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_positives)


class PadchestSource(DatasetReader):
    """A PadChest dataset on disk.

    Args:
        root: the folder holding the label CSV (or its ``.gz``) and the numbered image folders
            ``<ImageDir>/<ImageID>``.

    Raises:
        DataError: no label CSV, or a malformed one.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        found = [self.root / name for name in LABEL_FILES if (self.root / name).is_file()]
        if not found:
            raise DataError(f"{self.root}: no {LABEL_FILE} (or .gz); PadChest's label CSV belongs in the root")
        self.label_file = found[0]
        self._entries = read_label_csv(self.label_file)

    @property
    def image_ids(self) -> list[str]:
        """Every ImageID of the label CSV, in file order."""
        return list(self._entries)

    def test_ids(self) -> list[str]:
        """The ImageIDs of the test set (module docstring), in file order."""
        return [i for i, entry in self._entries.items() if evaluated(entry)]

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.padchest.synth_padchest`."""
        return is_synthetic(self.root)

    def entry(self, image_id: str) -> PadchestEntry:
        """The image's CSV row.

        Raises:
            DataError: the image is not in the label CSV.
        """
        try:
            return self._entries[image_id]
        except KeyError:
            raise DataError(f"image {image_id} is not in {self.label_file}") from None

    def labels(self, image_id: str) -> tuple[str, ...]:
        """The image's normalised labels (empty for an empty Labels cell)."""
        return self.entry(image_id).labels or ()

    @property
    def classes(self) -> tuple[str, ...]:
        """The findings with at least :data:`MIN_POSITIVES` positives among this folder's test images."""
        return findings(self._entries, self.test_ids())

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping[str, Any]) -> list[int]:
        """1 where the class is among the image's labels, else 0 (a class absent from a small copy is 0
        everywhere, not an error).

        Raises:
            ConfigError: a class that is not a normalised label (stripped, lower case, not a non-finding).
        """
        if bad := [c for c in classes if c != c.strip().lower() or not c or c in NON_FINDINGS]:
            raise ConfigError(f"PadChest classes are normalised finding labels (stripped, lower case, not "
                              f"{', '.join(NON_FINDINGS)}); found {', '.join(map(repr, bad))}")
        labels = self.labels(image_id)
        return [int(c in labels) for c in classes]

    def path(self, image_id: str) -> Path:
        """``<root>/<ImageDir>/<ImageID>``."""
        return self.root / self.entry(image_id).image_dir / image_id

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image: uint8 (H, W), 16-bit PNGs scaled by their maximum (:func:`read_image`)."""
        return read_image(self.path(image_id))

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without a row in the label CSV, in order."""
        return [i for i in ids if i not in self._entries]

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without a row or without a PNG, in order."""
        return [i for i in ids if i not in self._entries or not self.path(i).is_file()]


def build_split_v1(label_file: str | Path, out_dir: str | Path, version: str = "v1") -> dict:
    """Write split v1 (module docstring) from ``label_file`` to ``out_dir``; return the manifest."""
    label_file = Path(label_file)
    entries = read_label_csv(label_file)
    test = [i for i, entry in entries.items() if evaluated(entry)]
    columns = findings(entries, test)
    labels = {i: {c: int(c in entries[i].labels) for c in columns} for i in test}
    content = gzip.decompress(label_file.read_bytes()) if label_file.suffix == ".gz" else label_file.read_bytes()
    return write_split(
        out_dir, dataset="padchest", version=version, parts={"test": test}, labels=labels, columns=columns,
        generator="vlpbench.data.padchest:generate_split_v1", seed=SEED, fractions={"test": 1.0},
        source={"file": LABEL_FILE, "sha256": hashlib.sha256(content).hexdigest(),
                "test": f"Projection in {', '.join(FRONTAL)}, MethodLabel {PHYSICIAN}, Labels non-empty, not "
                        f"{EXCLUDE!r}",
                "columns": f"findings with >= {MIN_POSITIVES} positive test images, not {', '.join(NON_FINDINGS)}"})


def generate_split_v1(out_dir: str | Path) -> dict:
    """Regenerate the committed split v1 from the label CSV torchxrayvision ships."""
    return build_split_v1(xrv_data_file(XRV_LABEL_FILE), out_dir)
