"""TBX11K reader (Liu et al., CVPR 2020): image lists, Pascal-VOC XML boxes, 512 x 512 PNGs.

Format (docs/datasets.md, "TBX11K"): ``imgs/{health,sick,tb,test,extra}/<name>.png``,
``lists/TBX11K_{train,val,trainval}.txt`` (one path relative to ``imgs/`` a line, ``tb/tb0003.png``),
and ``annotations/xml/<name>.xml`` (Pascal VOC: ``<size>`` and one ``<object>`` per TB box, ``<name>``
one of :data:`BOX_CLASSES`, ``<bndbox>`` xmin, ymin, xmax, ymax). The image-level class is the folder:
``health`` healthy, ``sick`` sick but not TB, ``tb`` TB. The test set's labels are not public.

Split v1 is BenchX's TBX11K split (yangzhou12/BenchX @ b874fa6, preprocess/datasets/TBX11K/*.txt): the
train + val images, 70 / 15 / 15, committed from those lists (:func:`generate_split_v1`).
"""

from __future__ import annotations

import hashlib
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpbench.data import is_synthetic
from vlpbench.data.base import DatasetReader, box_problem, check_classes
from vlpbench.data.images import read_image
from vlpbench.data.splits import write_split
from vlpbench.errors import DataError
from vlpbench.splits import SPLITS_DIR

IMAGE_SIZE = 512  # every TBX11K image is 512 x 512
LISTS = ("TBX11K_train.txt", "TBX11K_val.txt")
TRAINVAL = "TBX11K_trainval.txt"
# Box classes of the XML files: active, latent ("obsolete") and uncertain TB.
BOX_CLASSES = ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis")
# Image folder -> class; names as BenchX's TBX11K_Dataset (unifier/datasets/datasets.py:2143-2144, sorted).
FOLDER_CLASSES = {"health": "healthy", "sick": "sick_but_no_tb", "tb": "tb"}
CLASSES = ("healthy", "sick_but_no_tb", "tb")
SPLIT_LABEL = "tb"

BENCHX_COMMIT = "b874fa6"
BENCHX_SOURCES = SPLITS_DIR / "tbx11k" / "sources"
# BenchX list -> vlpbench part (BenchX's train_1 ⊂ train_10 ⊂ train).
BENCHX_PARTS = {"train": "train", "val": "val", "test": "test", "train_1": "train_1pct", "train_10": "train_10pct"}

Box = tuple[str, float, float, float, float]


def _number(element: ET.Element, tag: str, where: str) -> float:
    node = element.find(tag)
    text = node.text.strip() if node is not None and node.text else ""
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: <{tag}> {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: <{tag}> {text!r} is not finite")
    return value


def parse_xml(text: str | bytes, where: str) -> tuple[tuple[int, int], list[Box]]:
    """Parse one TBX11K Pascal-VOC annotation.

    Returns:
        ``((height, width), boxes)``: the ``<size>`` the coordinates refer to (the 512 x 512 image where
        the file has none) and ``[(class, xmin, ymin, xmax, ymax), ...]`` in file order.

    Raises:
        DataError: naming ``where`` for malformed XML, a root other than ``<annotation>``, an object
            without ``<name>`` or ``<bndbox>``, an unknown class, a coordinate that is not a finite
            number, a box without area, or a box outside the annotated size.
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise DataError(f"{where}: malformed XML ({exc})") from None
    if root.tag != "annotation":
        raise DataError(f"{where}: root element <{root.tag}>, expected <annotation>")
    size = root.find("size")
    height = width = IMAGE_SIZE
    if size is not None:
        width, height = (_number(size, tag, f"{where} <size>") for tag in ("width", "height"))
        if width <= 0 or height <= 0 or not width.is_integer() or not height.is_integer():
            raise DataError(f"{where}: <size> {width:g} x {height:g}, expected positive whole pixels")
        width, height = int(width), int(height)
    boxes: list[Box] = []
    for number, obj in enumerate(root.iter("object"), start=1):
        here = f"{where} object {number}"
        name_node, bndbox = obj.find("name"), obj.find("bndbox")
        name = name_node.text.strip() if name_node is not None and name_node.text else ""
        if name not in BOX_CLASSES:
            raise DataError(f"{here}: class {name!r}, expected one of {', '.join(BOX_CLASSES)}")
        if bndbox is None:
            raise DataError(f"{here}: no <bndbox>")
        x1, y1, x2, y2 = (_number(bndbox, tag, here) for tag in ("xmin", "ymin", "xmax", "ymax"))
        if problem := box_problem(x1, y1, x2, y2, height, width):
            raise DataError(f"{here}: {problem}")
        boxes.append((name, x1, y1, x2, y2))
    return (height, width), boxes


def read_xml(path: str | Path) -> tuple[tuple[int, int], list[Box]]:
    """:func:`parse_xml` of the file at ``path`` (errors name the file)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the annotation ({exc})") from exc
    return parse_xml(data, str(path))


def read_list(path: str | Path) -> list[str]:
    """The image paths of a ``lists/TBX11K_*.txt`` file (relative to ``imgs/``), in file order.

    Raises:
        DataError: naming the file and line for a path outside ``health/``, ``sick/`` and ``tb/``, a name
            that is not a ``.png``, or a path listed twice.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the image list ({exc})") from exc
    entries: list[str] = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry:
            continue
        folder, _, name = entry.partition("/")
        if folder not in FOLDER_CLASSES or "/" in name or not name.endswith(".png"):
            raise DataError(f"{path} line {number}: {entry!r}, expected <health|sick|tb>/<name>.png")
        if entry in entries:
            raise DataError(f"{path} line {number}: {entry!r} is listed twice")
        entries.append(entry)
    return entries


def boxes_to_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boxes (K, 4) xyxy -> uint8 0/1 mask as BenchX makes TBX11K masks (preprocess/datasets/TBX11K/
    preprocess_tbx11k.py:47-51): x, y, width and height each truncated to int, ``mask[y:y+h, x:x+w] = 1``."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist():
        x, y, w, h = int(x1), int(y1), int(x2 - x1), int(y2 - y1)
        mask[y:y + h, x:x + w] = 1
    return mask


def _find_folder(root: Path) -> Path:
    """The folder holding ``lists/`` and ``imgs/``: ``root`` or one direct subfolder (``TBX11K/``)."""
    def complete(folder: Path) -> bool:
        return all((folder / "lists" / name).is_file() for name in LISTS)

    if complete(root):
        return root
    hits = sorted(p for p in root.iterdir() if p.is_dir() and complete(p))
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise DataError(f"{root}: several TBX11K folders {[str(h) for h in hits]}; point at one of them")
    raise DataError(f"{root}: expected lists/{' and lists/'.join(LISTS)} in this folder or a direct subfolder")


class Tbx11kSource(DatasetReader):
    """A TBX11K dataset on disk: the train and val lists, their PNGs and the XML boxes of the TB images.

    Args:
        root: the dataset folder (``TBX11K/``) or its parent. Image ids are the file stems (``tb0003``);
            a TB image without an XML file has no box (``tb1199`` in the release).

    Raises:
        DataError: no lists, a malformed list or XML file, an image in both lists, or an XML file with
            boxes for an image that is not in ``tb/``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: TBX11K dataset folder not found")
        self.folder = _find_folder(self.root)
        self.list_files = {name: self.folder / "lists" / name for name in LISTS}
        self._entries: dict[str, str] = {}
        self._parts: dict[str, str] = {}
        for name, path in self.list_files.items():
            for entry in read_list(path):
                image_id = entry.rsplit("/", 1)[1][:-4]
                if image_id in self._entries:
                    raise DataError(f"{path}: image {image_id} is also in {self.list_files[self._parts[image_id]]}")
                self._entries[image_id] = entry
                self._parts[image_id] = name
        self.xml_dir = self.folder / "annotations" / "xml"
        self._xml = set()
        if self.xml_dir.is_dir():
            with os.scandir(self.xml_dir) as found:
                self._xml = {e.name[:-4] for e in found if e.name.endswith(".xml") and e.name[:-4] in self._entries}
        self._boxes: dict[str, tuple[tuple[int, int], list[Box]]] = {}

    @property
    def image_ids(self) -> list[str]:
        """Every image of TBX11K_train.txt, then TBX11K_val.txt, in file order."""
        return list(self._entries)

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.tbx11k.synth_tbx11k`."""
        return is_synthetic(self.root, self.folder)

    def _entry(self, image_id: str) -> str:
        try:
            return self._entries[image_id]
        except KeyError:
            raise DataError(f"image {image_id} is not in {' or '.join(map(str, self.list_files.values()))}") from None

    def class_name(self, image_id: str) -> str:
        """``healthy``, ``sick_but_no_tb`` or ``tb``, from the image's folder."""
        return FOLDER_CLASSES[self._entry(image_id).split("/", 1)[0]]

    def label(self, image_id: str) -> int:
        """1 for a TB image (folder ``tb/``), else 0."""
        return int(self.class_name(image_id) == "tb")

    def xml_path(self, image_id: str) -> Path:
        """``annotations/xml/<id>.xml`` (it exists for TB images only)."""
        return self.xml_dir / f"{image_id}.xml"

    def _annotation(self, image_id: str) -> tuple[tuple[int, int], list[Box]]:
        self._entry(image_id)
        if image_id not in self._boxes:
            parsed = read_xml(self.xml_path(image_id)) if image_id in self._xml else ((IMAGE_SIZE, IMAGE_SIZE), [])
            if parsed[1] and self.label(image_id) == 0:
                raise DataError(f"{self.xml_path(image_id)}: TB boxes for {self._entry(image_id)}, which is not a TB image")
            self._boxes[image_id] = parsed
        return self._boxes[image_id]

    def box_classes(self, image_id: str) -> list[str]:
        """The class of each of the image's boxes, in :meth:`boxes` order."""
        return [box[0] for box in self._annotation(image_id)[1]]

    def boxes(self, image_id: str) -> np.ndarray:
        """float64 (K, 4) xyxy TB boxes in pixels of the 512 x 512 image, scaled from the XML's ``<size>``
        where that differs; (0, 4) for an image without boxes."""
        (height, width), boxes = self._annotation(image_id)
        array = np.array([box[1:] for box in boxes], dtype=np.float64).reshape(-1, 4)
        return array * np.array([IMAGE_SIZE / width, IMAGE_SIZE / height] * 2)

    def mask(self, image_id: str) -> np.ndarray:
        """The TB boxes filled as a uint8 0/1 mask of 512 x 512 (:func:`boxes_to_mask`, BenchX's rule)."""
        return boxes_to_mask(self.boxes(image_id), IMAGE_SIZE, IMAGE_SIZE)

    def geometry_problems(self, image_id: str, height: int, width: int) -> list[str]:
        """Each box outside the decoded image (the XML's own size is checked when it is read)."""
        where = self.xml_path(image_id)
        return [f"{where} object {n}: {problem}" for n, box in enumerate(self.boxes(image_id).tolist(), start=1)
                if (problem := box_problem(*box, height, width))]

    def path(self, image_id: str) -> Path:
        """``imgs/<folder>/<id>.png``.

        Raises:
            DataError: the file does not exist.
        """
        path = self.folder / "imgs" / self._entry(image_id)
        if not path.is_file():
            raise DataError(f"no image file {path}")
        return path

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image: uint8 (H, W); RGB PNGs are converted to luminance."""
        return read_image(self.path(image_id))

    @property
    def classes(self) -> tuple[str, ...]:
        """``healthy``, ``sick_but_no_tb``, ``tb`` (BenchX's names and order)."""
        return CLASSES

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping[str, Any]) -> list[int]:
        """1 for the image's one class, 0 for the others."""
        check_classes(self, classes)
        name = self.class_name(image_id)
        return [int(name == c) for c in classes]

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` in neither list, in order."""
        return [i for i in ids if i not in self._entries]

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` in neither list or without a PNG, in order."""
        return [i for i in ids if i not in self._entries or not (self.folder / "imgs" / self._entries[i]).is_file()]


def benchx_ids(name: str) -> list[str]:
    """The ids of BenchX's list ``name`` (train, val, test, train_1, train_10), committed under
    ``splits/tbx11k/sources/benchx_<name>.txt``.

    Raises:
        DataError: the file is missing, or has an empty or repeated id.
    """
    path = BENCHX_SOURCES / f"benchx_{name}.txt"
    try:
        ids = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the id list ({exc})") from exc
    if not all(ids) or len(set(ids)) != len(ids):
        raise DataError(f"{path}: empty or repeated ids")
    return ids


def generate_split_v1(out_dir: str | Path) -> dict:
    """Write TBX11K split v1, BenchX's split, from the committed BenchX lists; byte-identical on regeneration.

    BenchX (``preprocess/datasets/TBX11K/preprocess_tbx11k.py:71-90``) pools the train and val images of
    the TBX11K Simplified copy (8,399: the official 6,600 + 1,800 less ``tb1199``, which has no box), and
    with ``train_test_split(test_size=0.3, stratify=target, random_state=42)``, then halves the held-out
    images the same way, makes train / val / test 5,879 / 1,260 / 1,260; train_1 (58) and train_10 (587)
    are stratified draws of train (nested). The official test set has no public labels. Label column
    ``tb`` (1 for ``tb*`` images); the classification labels come from the reader.

    Returns:
        The manifest (also written to ``MANIFEST.json``).
    """
    parts = {part: benchx_ids(name) for name, part in BENCHX_PARTS.items()}
    labels = {i: {SPLIT_LABEL: int(i.startswith("tb"))} for ids in parts.values() for i in ids}
    n = len(parts["train"]) + len(parts["val"]) + len(parts["test"])
    files = {f"benchx_{name}.txt": hashlib.sha256((BENCHX_SOURCES / f"benchx_{name}.txt").read_bytes()).hexdigest()
             for name in BENCHX_PARTS}
    return write_split(
        out_dir,
        dataset="tbx11k",
        version="v1",
        parts=parts,
        labels=labels,
        columns=[SPLIT_LABEL],
        generator="vlpbench.data.tbx11k:generate_split_v1",
        seed=42,
        fractions={"train": len(parts["train"]) / n, "val": len(parts["val"]) / n, "test": len(parts["test"]) / n,
                   "train_10pct": 0.1, "train_1pct": 0.01},
        source={"files": {f"splits/tbx11k/sources/{name}": digest for name, digest in files.items()}},
        reference={
            "repository": "yangzhou12/BenchX",
            "commit": BENCHX_COMMIT,
            "file": "preprocess/datasets/TBX11K/{train,val,test,train_1,train_10}.txt",
            "rule": ("preprocess_tbx11k.py:71-90: train_test_split(images, test_size=0.3, stratify=target, "
                     "random_state=42); held-out halved (test_size=0.5, stratified, 42); train_1 / train_10 "
                     "stratified draws of train (test_size 0.99 / 0.90, 42)"),
            "identical": ["train", "val", "test", "train_1pct", "train_10pct"],
            "differs": {},
        },
    )
