"""MS-CXR reader (phrase grounding boxes over MIMIC-CXR-JPG images) and its split v1.

Formats (docs/datasets.md, "MS-CXR"): PhysioNet ``ms-cxr/0.1/`` ships
``MS_CXR_Local_Alignment_v1.0.0.csv`` (+ ``.json``, COCO), v1.1.0 ships
``MS_CXR_Local_Alignment_v1.1.0.csv`` (+ ``.json``), whose CSV adds a ``split`` column. One CSV
row per box: ``dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height[,split]``,
the box as the integer top-left corner and size in **original image pixels** and
``image_width``/``image_height`` the original JPEG size; rows of one (image, phrase) pair are
merged into one phrase with several boxes. ``path`` (``files/pXX/p<subject>/s<study>/<dicom_id>.jpg``)
is relative to a MIMIC-CXR-JPG release folder. Where no CSV is present the COCO JSON is read
(``images[]`` with ``file_name``/``path``/``width``/``height``, ``annotations[]`` with ``bbox`` and
``label_text``, ``categories[]``); it has no split. Where several versions are present, the newest wins.

Split v1 (:func:`split_v1`): the file's ``split`` column where it has one (parts train / val / test
as written; the users' note that it differs from other projects' splits stands). Without it
(v1.0.0, or the JSON), grounding has no training: the subjects (from ``path``) are put in a seeded
order and the first half of them (rounded) holds the val images, the rest test. Label columns: one
0/1 per category, 1 where the image has a phrase of that category.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlpbench.data import is_synthetic
from vlpbench.data.base import DatasetReader
from vlpbench.data.images import read_image
from vlpbench.data.splits import Split, derived_split, write_split
from vlpbench.errors import DataError

CATEGORIES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Opacity", "Pleural Effusion",
              "Pneumonia", "Pneumothorax")
COLUMNS = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")
COLUMNS_SPLIT = (*COLUMNS, "split")  # v1.1.0
SPLITS = ("train", "val", "test")
VERSIONS = ("1.1.0", "1.0.0")  # newest first
MIMIC_RELEASES = ("2.0.0", "2.1.0")
SEED = 0

_PATH = re.compile(r"files/p(1[0-9])/p(1[0-9]{7})/s5[0-9]{7}/([0-9a-f]{8}(?:-[0-9a-f]{8}){4})\.jpg")


def label_file_name(version: str, suffix: str = ".csv") -> str:
    """``MS_CXR_Local_Alignment_v<version><suffix>``."""
    return f"MS_CXR_Local_Alignment_v{version}{suffix}"


@dataclass
class MsCxrImage:
    """One image: its MIMIC path, original size, split (or None) and phrases ``{text: (category, boxes)}``."""

    path: str
    width: int
    height: int
    split: str | None
    phrases: dict[str, tuple[str, list[list[float]]]] = field(default_factory=dict)


def _number(text: str, where: str, name: str, *, positive: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= (1 if positive else 0):
        raise DataError(f"{where}: {name} is {text!r}; expected a {'positive' if positive else 'non-negative'} number")
    return value


def _add(images: dict[str, MsCxrImage], where: str, dicom: str, category: str, text: str, path: str,
         box: list[float], width: int, height: int, split: str | None) -> None:
    """Check one box row and merge it into ``images``."""
    match = _PATH.fullmatch(path)
    if not match or match.group(3) != dicom or match.group(2)[:2] != match.group(1):
        raise DataError(f"{where}: path {path!r} is not files/pXX/p<subject>/s<study>/{dicom}.jpg")
    if category not in CATEGORIES:
        raise DataError(f"{where}: category_name {category!r}; expected one of {', '.join(CATEGORIES)}")
    if not text.strip():
        raise DataError(f"{where}: empty label_text")
    if split is not None and split not in SPLITS:
        raise DataError(f"{where}: split {split!r}; expected train, val or test")
    image = images.setdefault(dicom, MsCxrImage(path, width, height, split))
    if (image.path, image.width, image.height, image.split) != (path, width, height, split):
        raise DataError(f"{where}: image {dicom} has path/size/split {path}, {width}x{height}, {split} here but "
                        f"{image.path}, {image.width}x{image.height}, {image.split} on an earlier row")
    known, boxes = image.phrases.setdefault(text, (category, []))
    if known != category:
        raise DataError(f"{where}: phrase {text!r} of image {dicom} is {category} here but {known} on an earlier row")
    boxes.append(box)


def read_csv(path: str | Path) -> dict[str, MsCxrImage]:
    """Read an MS-CXR CSV (v1.0.0 or v1.1.0 columns) into ``{dicom_id: MsCxrImage}`` in file order.

    Raises:
        DataError: naming the file, line and column for a wrong header, a wrong field count, a bad
            path, category, number or split, or rows of one image / phrase that disagree.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the MS-CXR file ({type(exc).__name__}: {exc})") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = tuple(next(reader, []))
    if header not in (COLUMNS, COLUMNS_SPLIT):
        raise DataError(f"{path} line 1: header {','.join(header)!r}; expected {','.join(COLUMNS)} "
                        "(v1.0.0), optionally followed by ',split' (v1.1.0)")
    images: dict[str, MsCxrImage] = {}
    for fields in reader:
        where = f"{path} line {reader.line_num}"
        if len(fields) != len(header):
            raise DataError(f"{where}: expected {len(header)} fields, found {len(fields)}")
        row = dict(zip(header, fields))
        x, y = (_number(row[k], where, k) for k in ("x", "y"))
        w, h, width, height = (_number(row[k], where, k, positive=True) for k in ("w", "h", "image_width", "image_height"))
        _add(images, where, row["dicom_id"], row["category_name"], row["label_text"], row["path"],
             [x, y, x + w, y + h], int(width), int(height), row.get("split"))
    return images


def read_coco(path: str | Path) -> dict[str, MsCxrImage]:
    """Read the MS-CXR COCO JSON into ``{dicom_id: MsCxrImage}`` (no split), annotations in file order.

    Raises:
        DataError: naming the file and the entry for invalid JSON, a missing key, an unknown image or
            category id, or the checks of :func:`read_csv`.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
        categories = {c["id"]: c["name"] for c in data["categories"]}
        entries = {i["id"]: i for i in data["images"]}
        annotations = data["annotations"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the MS-CXR COCO file ({type(exc).__name__}: {exc})") from exc
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: expected COCO 'images', 'annotations' and 'categories' with ids ({exc})") from None
    images: dict[str, MsCxrImage] = {}
    for k, annotation in enumerate(annotations):
        where = f"{path} annotations[{k}]"
        try:
            entry = entries[annotation["image_id"]]
            category = categories[annotation["category_id"]]
            x, y, w, h = (float(v) for v in annotation["bbox"])
            dicom, text = Path(entry["file_name"]).stem, annotation["label_text"]
            width, height, file = int(entry["width"]), int(entry["height"]), entry["path"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: expected image_id, category_id, bbox [x, y, w, h] and label_text that "
                            f"refer to an image (file_name, path, width, height) and a category ({exc!r})") from None
        if w <= 0 or h <= 0 or x < 0 or y < 0:
            raise DataError(f"{where}: bbox {annotation['bbox']}; expected x, y >= 0 and w, h > 0")
        _add(images, where, dicom, category, text, file, [x, y, x + w, y + h], width, height, None)
    return images


def _label_file(root: Path) -> Path:
    for version in VERSIONS:
        for suffix in (".csv", ".json"):
            hits = [root / label_file_name(version, suffix)] + sorted(root.glob(f"*/{label_file_name(version, suffix)}"))
            hits = [h for h in hits if h.is_file()]
            if hits:
                return hits[0]
    raise DataError(f"expected {label_file_name(VERSIONS[0])} or {label_file_name(VERSIONS[1])} (or their .json) "
                    f"in {root} or a direct subfolder")


def _mimic_root(root: Path, given: str | Path | None) -> Path | None:
    """The MIMIC-CXR-JPG release folder: ``given``, else one beside the MS-CXR files holding ``files/``."""
    if given is not None:
        given = Path(given)
        if not (given / "files").is_dir():
            raise DataError(f"mimic_root {given}: expected the MIMIC-CXR-JPG release folder holding files/")
        return given
    bases = [root, root.parent]
    candidates = [*bases] + [base / f"{prefix}{version}" for base in bases for version in MIMIC_RELEASES
                             for prefix in ("mimic-cxr-jpg/", "physionet.org/files/mimic-cxr-jpg/")]
    return next((c for c in candidates if (c / "files").is_dir()), None)


class MsCxrSource(DatasetReader):
    """MS-CXR phrases and boxes, with the images resolved in a MIMIC-CXR-JPG release.

    Args:
        root: the folder holding the MS-CXR CSV (or JSON), or its parent.
        mimic_root: the MIMIC-CXR-JPG release folder (holding ``files/``); by default ``root``, its
            parent, or ``[physionet.org/files/]mimic-cxr-jpg/<2.0.0|2.1.0>/`` in either, the first
            that holds ``files/``.

    Image ids are the ``dicom_id`` values, in file order.

    Raises:
        DataError: no MS-CXR file, a malformed one, or a ``mimic_root`` without ``files/``.
    """

    def __init__(self, root: str | Path, *, mimic_root: str | Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: MS-CXR folder not found")
        self.label_file = _label_file(self.root)
        self._images = read_csv(self.label_file) if self.label_file.suffix == ".csv" else read_coco(self.label_file)
        self.mimic_root = _mimic_root(self.label_file.parent, mimic_root)
        # Only about a thousand images: one stat each, once.
        self._present = {i for i, image in self._images.items()
                         if self.mimic_root is not None and (self.mimic_root / image.path).is_file()}

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.ms_cxr.synth_ms_cxr`."""
        return is_synthetic(self.root, self.label_file.parent)

    @property
    def image_ids(self) -> list[str]:
        """Every dicom_id of the file, in order of first appearance."""
        return list(self._images)

    @property
    def has_split(self) -> bool:
        """Whether the file carries a ``split`` column (v1.1.0)."""
        return any(image.split is not None for image in self._images.values())

    def _image(self, image_id: str) -> MsCxrImage:
        try:
            return self._images[image_id]
        except KeyError:
            raise DataError(f"image {image_id} is not in {self.label_file}") from None

    def phrases(self, image_id: str) -> list[tuple[str, str, np.ndarray]]:
        """``[(category, phrase, boxes)]`` in file order; boxes float64 (K, 4) x0, y0, x1, y1 in original pixels."""
        return [(category, text, np.array(boxes, dtype=np.float64))
                for text, (category, boxes) in self._image(image_id).phrases.items()]

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the original image, from ``image_height`` / ``image_width``."""
        image = self._image(image_id)
        return image.height, image.width

    def subject_id(self, image_id: str) -> str:
        """The subject id, from ``path`` (the file has no subject column)."""
        return self._image(image_id).path.split("/")[2][1:]

    def split(self, image_id: str) -> str | None:
        """The file's ``split`` value, or None without that column."""
        return self._image(image_id).split

    def mask(self, image_id: str, phrase_index: int) -> np.ndarray:
        """uint8 0/1 (H, W): the union of the phrase's boxes, pixels [y0, y1) x [x0, x1)."""
        height, width = self.image_size(image_id)
        phrases = self.phrases(image_id)
        if not 0 <= phrase_index < len(phrases):
            raise IndexError(f"image {image_id} has {len(phrases)} phrases; no phrase {phrase_index}")
        mask = np.zeros((height, width), dtype=np.uint8)
        for x0, y0, x1, y1 in np.rint(phrases[phrase_index][2]).astype(int).tolist():
            mask[max(y0, 0) : y1, max(x0, 0) : x1] = 1
        return mask

    def path(self, image_id: str) -> Path:
        """The JPEG: ``path`` below the MIMIC-CXR-JPG release folder.

        Raises:
            DataError: no MIMIC-CXR-JPG folder was found.
        """
        image = self._image(image_id)
        if self.mimic_root is None:
            raise DataError(f"no MIMIC-CXR-JPG folder (holding files/) beside {self.label_file}; "
                            "pass mimic_root=<mimic-cxr-jpg/2.0.0 folder>")
        return self.mimic_root / image.path

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image: uint8 (H, W).

        Raises:
            DataError: missing or undecodable, or its size differs from image_width x image_height (the
                boxes would not fit it).
        """
        pixels = read_image(self.path(image_id))
        if pixels.shape != self.image_size(image_id):
            raise DataError(f"{self.path(image_id)}: image is {pixels.shape[1]}x{pixels.shape[0]} but "
                            f"{self.label_file} gives {self._images[image_id].width}x{self._images[image_id].height}")
        return pixels

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without a label row, in order (images are not looked at)."""
        return [i for i in ids if i not in self._images]

    def missing(self, ids: list[str]) -> list[str]:
        """The ids among ``ids`` lacking a JPEG below the MIMIC folder or a row in the file, in order."""
        return [i for i in ids if i not in self._present]


def build_split_v1(source: MsCxrSource, out_dir: str | Path, version: str = "v1") -> dict:
    """Write split v1 of ``source`` (module docstring) to ``out_dir``; return the manifest."""
    ids = source.image_ids
    labels = {i: {c: int(any(cat == c for cat, _, _ in source.phrases(i))) for c in CATEGORIES} for i in ids}
    if source.has_split:
        parts = {part: [i for i in ids if source.split(i) == part] for part in SPLITS}
        rule = "the file's split column"
    else:
        subjects = sorted({source.subject_id(i) for i in ids})
        order = [subjects[k] for k in np.random.default_rng(SEED).permutation(len(subjects))]
        val_subjects = set(order[: round(len(order) / 2)])
        parts = {"val": [i for i in ids if source.subject_id(i) in val_subjects],
                 "test": [i for i in ids if source.subject_id(i) not in val_subjects]}
        rule = "subjects in a seeded order, the first half (rounded) val, the rest test"
    return write_split(
        out_dir, dataset="ms_cxr", version=version, parts=parts, labels=labels, columns=CATEGORIES,
        generator="vlpbench.data.ms_cxr:split_v1", seed=SEED, fractions={},
        source={"files": {source.label_file.name: hashlib.sha256(source.label_file.read_bytes()).hexdigest()},
                "parts": rule},
    )


def split_v1(source: MsCxrSource) -> Split:
    """Split v1 derived from the user's MS-CXR file (module docstring), cached per file content."""
    return derived_split("ms_cxr", "v1", sources=[source.label_file],
                         build=lambda out_dir, version: build_split_v1(source, out_dir, version))
