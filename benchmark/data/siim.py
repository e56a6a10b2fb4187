"""SIIM-ACR Pneumothorax Segmentation reader: relative RLE masks, label files and DICOM trees.

Formats (docs/datasets.md, "SIIM-ACR Pneumothorax"): the label file is ``stage_2_train.csv`` (header
``ImageId,EncodedPixels``) or the stage-1 ``train-rle.csv`` (header and values carry a leading
space); one row per mask instance, ``-1`` for an image without pneumothorax. Masks use the
*relative* column-major RLE of the competition. DICOMs live anywhere below the dataset root and
are found by file name: ImageId = SOPInstanceUID = file stem.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpbench.data.dicom import read_dicom, read_dicom_attributes
from vlpbench.data import is_synthetic
from vlpbench.data.base import DatasetReader, check_classes
from vlpbench.errors import DataError

HEIGHT = WIDTH = 1024
EMPTY = "-1"
HEADER = ("ImageId", "EncodedPixels")
LABEL_FILES = ("stage_2_train.csv", "train-rle.csv")  # in order of preference

_RLE_SYNTAX = re.compile(r"[0-9]+(?:\s+[0-9]+)*")
_INTEGER = re.compile(r"-?[0-9]+")
SIIM_CLASS = "pneumothorax"  # the one class of split files and tasks: an image with a mask row


def _fail(where: str, message: str) -> DataError:
    return DataError(f"{where}: {message}" if where else message)


def _check_syntax(text: str, where: str) -> None:
    """Raise unless ``text`` (stripped, not ``-1``) is an even number of non-negative integers."""
    tokens = text.split()
    if _RLE_SYNTAX.fullmatch(text) and len(tokens) % 2 == 0:
        return
    if not tokens:
        raise _fail(where, "empty RLE (a mask without pneumothorax is written -1)")
    for token in tokens:
        if not _INTEGER.fullmatch(token):
            raise _fail(where, f"RLE token {token[:20]!r} is not an integer")
        if token.startswith("-"):
            raise _fail(where, f"RLE value {token} is negative")
    raise _fail(where, f"RLE has an odd number of values ({len(tokens)}); expected offset/length pairs")


def _check_within(end: int, height: int, width: int, where: str) -> None:
    if end > height * width:
        raise _fail(where, f"RLE run ends at pixel {end}, past the end of a {height}x{width} image")


def decode_rle(rle: str, height: int = HEIGHT, width: int = WIDTH, *, where: str = "") -> np.ndarray:
    """Decode one relative column-major RLE string into a uint8 0/1 mask of shape (height, width).

    The string holds pairs (offset, length): the position advances by ``offset``, ``length``
    pixels are set, and the position advances past them. Flat index k is row ``k % height``,
    column ``k // height``. ``"-1"`` is an empty mask.

    Args:
        rle: the EncodedPixels value (surrounding whitespace is ignored).
        height, width: the mask size.
        where: context that starts every error message, e.g. ``"stage_2_train.csv line 17"``.

    Raises:
        DataError: an odd number of values, a token that is not an integer, a negative value, or
            a run past the end of the image.
    """
    text = rle.strip()
    flat = np.zeros(height * width, dtype=np.uint8)
    if text != EMPTY:
        _check_syntax(text, where)
        values = np.array(text.split(), dtype=np.int64)
        lengths = values[1::2]
        # Offsets count from the end of the previous run, so run i ends at the sum of all
        # offsets and lengths up to and including its own.
        ends = np.cumsum(values[0::2] + lengths)
        _check_within(int(ends[-1]), height, width, where)
        for start, end in zip((ends - lengths).tolist(), ends.tolist()):
            flat[start:end] = 1
    # Column-major: consecutive pixels run down a column.
    return np.ascontiguousarray(flat.reshape(width, height).T)


def encode_rle(mask: np.ndarray) -> str:
    """Encode a 2-D mask (non-zero = foreground) as a relative column-major RLE string.

    The inverse of :func:`decode_rle`: each run is written as its start minus the end of the
    previous run, then its length. A run that reaches the last pixel is closed too (Kaggle's
    reference encoder drops it). An empty mask is ``"-1"``.
    """
    flat = np.asarray(mask).T.ravel() != 0
    steps = np.diff(np.concatenate(([0], flat.astype(np.int8), [0])))
    starts = np.flatnonzero(steps == 1)
    ends = np.flatnonzero(steps == -1)
    if starts.size == 0:
        return EMPTY
    offsets = starts - np.concatenate(([0], ends[:-1]))
    pairs = np.column_stack((offsets, ends - starts)).ravel()
    return " ".join(map(str, pairs.tolist()))


def _read_text(path: Path) -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: label file not found") from exc
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the label file ({type(exc).__name__}: {exc})") from exc


def read_labels(path: str | Path) -> dict[str, list[str]]:
    """Read a SIIM label file into ``{ImageId: [RLE, ...]}`` in file order.

    Accepts the stage-2 ``stage_2_train.csv`` (header ``ImageId,EncodedPixels``), the stage-1
    ``train-rle.csv`` (header ``ImageId, EncodedPixels`` and values with a leading space), and
    gzip-compressed copies (``.csv.gz``). Values are stripped; an image without pneumothorax maps
    to ``["-1"]``, a positive image to one RLE string per mask instance.

    Raises:
        DataError: naming the file (and line) for a wrong header, a row without exactly two
            fields or with an empty ImageId, an RLE string that is not ``-1`` or non-negative
            integer pairs or that runs past the end of the 1024 x 1024 image, or an image that
            mixes ``-1`` with masks.
    """
    path = Path(path)
    lines = _read_text(path).splitlines()
    if not lines:
        raise DataError(f"{path}: empty label file; expected the header 'ImageId,EncodedPixels'")
    header = tuple(field.strip() for field in lines[0].split(","))
    if header != HEADER:
        raise DataError(
            f"{path} line 1: header {lines[0]!r}, expected 'ImageId,EncodedPixels' (stage 2) "
            "or 'ImageId, EncodedPixels' (stage 1)"
        )

    labels: dict[str, list[str]] = {}
    for number, line in enumerate(lines[1:], start=2):
        where = f"{path} line {number}"
        fields = line.split(",")
        if len(fields) != 2:
            raise DataError(f"{where}: expected 2 fields (ImageId, EncodedPixels), found {len(fields)}: {line!r}")
        image_id, rle = fields[0].strip(), fields[1].strip()
        if not image_id:
            raise DataError(f"{where}: empty ImageId")
        if rle != EMPTY:
            _check_syntax(rle, where)
            # The geometry too, as decode_rle checks it, so a run past the image fails here and not mid-run: the
            # last run ends at the sum of every offset and length (Python ints: no overflow on absurd values).
            _check_within(sum(int(value) for value in rle.split()), HEIGHT, WIDTH, where)
        previous = labels.setdefault(image_id, [])
        if previous and (EMPTY in previous) != (rle == EMPTY):
            raise DataError(f"{where}: image {image_id} mixes -1 (no pneumothorax) with mask rows")
        previous.append(rle)
    return labels


def _find_label_file(root: Path) -> Path:
    for name in LABEL_FILES:
        hits = [root / name] if (root / name).is_file() else sorted(root.glob(f"*/{name}"))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DataError(f"{root}: several label files {[str(h) for h in hits]}; keep one")
    raise DataError(
        f"{root}: no SIIM label file; looked for {' or '.join(LABEL_FILES)} in this folder and its direct subfolders"
    )


class SiimSource(DatasetReader):
    """A SIIM-ACR dataset on disk: the label file plus every ``*.dcm`` below ``root``.

    Args:
        root: the dataset folder. The label file (``stage_2_train.csv``, else ``train-rle.csv``)
            is looked for in it and its direct subfolders; DICOMs anywhere below it.

    Raises:
        DataError: no label file, several candidates, a malformed label file, or two DICOMs with
            the same file name.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: SIIM dataset folder not found")
        self.label_file = _find_label_file(self.root)
        self._labels = read_labels(self.label_file)
        self._paths: dict[str, Path] = {}
        for path in sorted(self.root.rglob("*.dcm")):
            if path.stem in self._paths:
                raise DataError(f"two DICOMs for image {path.stem}: {self._paths[path.stem]} and {path}")
            self._paths[path.stem] = path

    @property
    def image_ids(self) -> list[str]:
        """Every ImageId of the label file, in file order."""
        return list(self._labels)

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.siim.synth_siim`."""
        return is_synthetic(self.root)

    def _rows(self, image_id: str) -> list[str]:
        try:
            return self._labels[image_id]
        except KeyError:
            raise DataError(f"image {image_id} is not in {self.label_file}") from None

    def label(self, image_id: str) -> int:
        """1 if the image has a pneumothorax mask, else 0."""
        return int(self._rows(image_id)[0] != EMPTY)

    def mask(self, image_id: str) -> np.ndarray:
        """The union of the image's mask rows: uint8 0/1, 1024 x 1024."""
        union = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        for rle in self._rows(image_id):
            union |= decode_rle(rle, where=f"{self.label_file} image {image_id}")
        return union

    def path(self, image_id: str) -> Path:
        """The DICOM file of the image.

        Raises:
            DataError: no ``<image_id>.dcm`` below the root.
        """
        try:
            return self._paths[image_id]
        except KeyError:
            raise DataError(f"no DICOM for image {image_id} below {self.root} (looked for {image_id}.dcm)") from None

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image: uint8 (H, W), see :func:`vlpbench.data.dicom.read_dicom`."""
        return read_dicom(self.path(image_id))

    @property
    def classes(self) -> tuple[str, ...]:
        """One class, ``pneumothorax`` (an image with a mask row)."""
        return (SIIM_CLASS,)

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping[str, Any]) -> list[int]:
        """:meth:`label` for the one class."""
        check_classes(self, classes)
        return [self.label(image_id)]

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """``sex``, ``age`` and ``view``, from the DICOM header (PatientSex, PatientAge, ViewPosition)."""
        return ("sex", "age", "view")

    def attributes(self, image_id: str) -> dict[str, Any]:
        """The image's ``sex``, ``age`` and ``view`` from its DICOM header
        (:func:`~vlpbench.data.dicom.read_dicom_attributes`); {} without a DICOM."""
        path = self._paths.get(image_id)
        if path is None:
            return {}
        return read_dicom_attributes(path)

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without a label row, in order (images are not looked at)."""
        return [i for i in ids if i not in self._labels]

    def missing(self, ids: list[str]) -> list[str]:
        """The ids among ``ids`` that lack a DICOM below the root or a row in the label file, in order.

        Split v1 covers the 12,047 stage-2 images; a stage-1 ``train-rle.csv`` has no labels for the
        1,377 stage-1 test images even where their DICOMs are present.
        """
        return [i for i in ids if i not in self._paths or i not in self._labels]
