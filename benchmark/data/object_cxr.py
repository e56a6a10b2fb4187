"""Object-CXR reader: foreign objects drawn as boxes, ellipses and polygons on chest X-rays.

Format (docs/datasets.md, "Object-CXR"): ``train.csv`` and ``dev.csv`` with the header
``image_name,annotation`` and one row per image; a negative image keeps its comma and has an
empty annotation (``08002.jpg,``). An annotation is ``object(;object)*``, an object is its type
(``0`` box, ``1`` ellipse, ``2`` polygon) and integer pixel coordinates, all separated by single
spaces: ``x1 y1 x2 y2`` (the corners of the box or of the ellipse's bounding box) or the polygon's
vertices ``x1 y1 … xn yn``. Images are 8-bit greyscale JPEGs of varying size in ``train/`` and
``dev/`` (ids ``00001.jpg`` … ``09000.jpg``).

Layouts found (docs/datasets.md, "Object-CXR layout and images"): the unpacked release (``train.csv``,
``dev.csv``, ``train/``, ``dev/``), the release's ``train.zip`` / ``dev.zip`` left packed (images are
read from the archives, as torchxrayvision does), the same inside a direct subfolder (``object-CXR/``),
and the Kaggle mirror with a labelled ``test.csv`` whose first column is ``image_path``
(``test/09001.jpg``).
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from vlpbench.data import is_synthetic
from vlpbench.data.base import DatasetReader, box_problem
from vlpbench.data.images import read_image
from vlpbench.data.splits import Split, derived_split, holdout_parts, nested_subsets, train_test_split_ids, write_split
from vlpbench.errors import DataError

BOX, ELLIPSE, POLYGON = 0, 1, 2
TYPE_NAMES = {BOX: "box", ELLIPSE: "ellipse", POLYGON: "polygon"}
# Label file -> (part, header). test.csv exists only in the Kaggle mirror.
LABEL_FILES = {
    "train.csv": ("train", "image_name,annotation"),
    "dev.csv": ("dev", "image_name,annotation"),
    "test.csv": ("test", "image_path,annotation"),
}
REQUIRED = ("train.csv", "dev.csv")
POLYGON_RULES = ("bounds", "mgca")
# MGCA's polygon box (mgca/preprocess/object_cxr.py): polylabel of the outline buffered by 100 px,
# tolerance 10 px.
MGCA_BUFFER, MGCA_TOLERANCE = 100.0, 10.0

SEED = 0
VAL_FRACTION = 0.2  # of train.csv: 6,400 / 1,600 (G2D Table 6; MGCA's code holds out 0.1)
LABEL_COLUMN = "object"
# MGCA's split (HKU-MedAI/MGCA @ 680fe4a, mgca/preprocess/object_cxr.py:92-105): train_test_split of the rows of
# train.csv, test_size=0.1, random_state=0 -> train / val (7,200 / 800); test = dev.csv.
MGCA_COMMIT = "680fe4a6ee0cc454ab58fd1a8b28fee81c03d742"
MGCA_VAL_FRACTION = 0.1
MGCA_RANDOM_STATE = 0
# The images of each part of the derived splits on the official release (train.csv 8,000 rows, dev.csv 1,000;
# docs/datasets.md "Object-CXR split sizes on the release"), as split_v1 / split_mgca draw them:
# v1 floor(0.2 * 8,000) = 1,600 val, mgca ceil(0.1 * 8,000) = 800 val, the subsets round(0.1 / 0.01 * train).
# What `vlpbench sweep --plan` counts where the data folder is absent; tests/test_sweep_plan.py derives
# both splits from label files of the release's row counts and checks these.
RELEASE_SIZES = {
    "v1": {"train": 6400, "val": 1600, "test": 1000, "train_10pct": 640, "train_1pct": 64},
    "mgca": {"train": 7200, "val": 800, "test": 1000, "train_10pct": 720, "train_1pct": 72},
}

Object = tuple[int, np.ndarray]


def parse_annotation(text: str, where: str = "") -> list[Object]:
    """Parse one ``annotation`` field into ``[(type, points), ...]``; points are int64 (n, 2) x, y.

    An empty field is an image without objects. Boxes and ellipses have 2 points (upper-left and
    lower-right corner), polygons 3 or more.

    Raises:
        DataError: starting with ``where``, for an empty object, an unknown type, a coordinate
            that is not an integer, a wrong number of coordinates, or corners out of order.
    """
    prefix = f"{where}: " if where else ""
    if not text.strip():
        return []
    objects = []
    for number, item in enumerate(text.split(";"), start=1):
        tokens = item.split()
        if not tokens:
            raise DataError(f"{prefix}object {number} is empty (objects are separated by ';' with nothing around it)")
        if tokens[0] not in ("0", "1", "2"):
            raise DataError(f"{prefix}object {number} has type {tokens[0][:20]!r}; expected 0 (box), 1 (ellipse) "
                            "or 2 (polygon)")
        kind = int(tokens[0])
        try:
            values = [int(token) for token in tokens[1:]]
        except ValueError:
            bad = next(t for t in tokens[1:] if not t.lstrip("-").isdigit())
            raise DataError(f"{prefix}object {number}: coordinate {bad[:20]!r} is not an integer") from None
        if kind in (BOX, ELLIPSE):
            if len(values) != 4:
                raise DataError(f"{prefix}object {number} ({TYPE_NAMES[kind]}) has {len(values)} coordinates; "
                                "expected 4 (x1 y1 x2 y2)")
            if values[0] > values[2] or values[1] > values[3]:
                raise DataError(f"{prefix}object {number} ({TYPE_NAMES[kind]}) corners {values} are out of order; "
                                "expected x1 <= x2 and y1 <= y2")
        elif len(values) < 6 or len(values) % 2:
            raise DataError(f"{prefix}object {number} (polygon) has {len(values)} coordinates; expected x y pairs "
                            "of at least 3 vertices")
        objects.append((kind, np.array(values, dtype=np.int64).reshape(-1, 2)))
    return objects


def format_annotation(objects: list[Object]) -> str:
    """The ``annotation`` field for ``objects``, as the real files write it (inverse of :func:`parse_annotation`)."""
    return ";".join(" ".join(map(str, [kind, *np.asarray(points).ravel().tolist()])) for kind, points in objects)


def read_annotations(path: str | Path, lines_out: dict[str, int] | None = None) -> dict[str, list[Object]]:
    """Read ``train.csv`` / ``dev.csv`` (or the Kaggle ``test.csv``) into ``{image_name: objects}`` in file order.
    ``lines_out``, when given, receives each image's line number.

    ``test.csv`` names images by ``image_path`` (``test/09001.jpg``); its ids are the file names.

    Raises:
        DataError: naming the file and line, for a wrong header, a row without exactly two
            fields, an empty or repeated image name, or a malformed annotation.
    """
    path = Path(path)
    header = LABEL_FILES.get(path.name, LABEL_FILES["train.csv"])[1]
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: label file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the label file ({type(exc).__name__}: {exc})") from exc
    if not lines or lines[0].strip() != header:
        found = repr(lines[0][:60]) if lines else "an empty file"
        raise DataError(f"{path} line 1: expected the header {header!r}, found {found}")
    annotations: dict[str, list[Object]] = {}
    first_line: dict[str, int] = {} if lines_out is None else lines_out
    for number, row in enumerate(csv.reader(lines[1:]), start=2):
        where = f"{path} line {number}"
        if len(row) != 2:
            raise DataError(f"{where}: expected 2 fields ({header}), found {len(row)}: {lines[number - 1][:80]!r}")
        image_id = row[0].strip().rsplit("/", 1)[-1]
        if not image_id:
            raise DataError(f"{where}: empty {header.split(',')[0]}")
        if image_id in annotations:
            raise DataError(f"{where}: image {image_id} already has a row (line {first_line[image_id]}); "
                            "expected one row per image")
        annotations[image_id] = parse_annotation(row[1], where)
        first_line[image_id] = number
    return annotations


def rasterize(objects: list[Object], width: int, height: int) -> np.ndarray:
    """uint8 0/1 mask (height, width) of the objects, pixel (x, y) tested at its integer position.

    Boxes are filled from corner to corner inclusive; ellipses hold the pixels with
    ``((x-cx)/ax)^2 + ((y-cy)/ay)^2 <= 1`` (the official froc.py test); polygons are filled,
    edges included. Parts outside the image are clipped.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    polygons = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(polygons)
    for kind, points in objects:
        if kind == POLYGON:
            draw.polygon([tuple(p) for p in points.tolist()], fill=1, outline=1)
            continue
        (x1, y1), (x2, y2) = points.tolist()
        left, top, right, bottom = max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)
        if left > right or top > bottom:
            continue
        if kind == BOX:
            mask[top : bottom + 1, left : right + 1] = 1
        else:
            cx, cy, ax, ay = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            y = np.arange(top, bottom + 1, dtype=np.float64)[:, None]
            x = np.arange(left, right + 1, dtype=np.float64)[None, :]
            # Multiplied out, so that a zero-width ellipse is a line rather than a division by zero.
            inside = ((x - cx) * ay) ** 2 + ((y - cy) * ax) ** 2 <= (ax * ay) ** 2
            mask[top : bottom + 1, left : right + 1] |= inside.astype(np.uint8)
    return mask | np.asarray(polygons, dtype=np.uint8)


def _segment_distance(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Distance from each point (k, 2) to the nearest of the segments starts[i]-ends[i]: (k,)."""
    direction = ends - starts
    length2 = np.maximum((direction**2).sum(1), 1e-12)
    offset = points[:, None, :] - starts[None, :, :]
    t = np.clip((offset * direction[None]).sum(2) / length2[None], 0.0, 1.0)
    nearest = starts[None] + t[..., None] * direction[None]
    return np.sqrt(((points[:, None, :] - nearest) ** 2).sum(2)).min(1)


def pole_of_inaccessibility(points: np.ndarray, buffer: float = MGCA_BUFFER,
                            tolerance: float = MGCA_TOLERANCE) -> np.ndarray:
    """The point of the polygon outline buffered by ``buffer`` that lies farthest inside it.

    Reproduces ``polylabel(LineString(closed outline).buffer(buffer), tolerance)`` (shapely) in
    numpy: the buffered shape is the set of points closer than ``buffer`` to the closed outline (a
    band around it, or a blob for a small polygon). Its boundary is sampled every
    ``tolerance / 5`` px on the offset edges and vertex circles it is made of; the inside distance
    to the boundary is the distance to the nearest sample (within ``tolerance / 10``), the outside
    one is ``distance to outline - buffer``. The search is polylabel's: square cells over the bounding
    box, best-first by the largest distance a cell can hold, split into four until no cell can beat
    the best by more than ``tolerance``; the first candidate is the bounding-box centre.

    Against shapely 1.8.5 (GEOS 3.10) the boxes agree within 1 px, with two exceptions. The pole is
    not unique where the band is equally thick along the outline (a large polygon), and ties may
    resolve to another point than shapely's (which also starts from the area centroid): within
    ``tolerance``. And GEOS leaves a spurious hole inside the buffered ring of a small polygon (under
    about twice the buffer across), which can push shapely's pole off the polygon; the exact buffer
    here has no hole, so such boxes differ from MGCA's, by up to the buffer.
    """
    vertices = np.asarray(points, dtype=np.float64)
    starts, ends = vertices, np.roll(vertices, -1, axis=0)
    step = tolerance / 5
    samples = []
    for a, b in zip(starts, ends):
        length = float(np.hypot(*(b - a)))
        if length > 0:
            normal = np.array([a[1] - b[1], b[0] - a[0]]) / length
            t = np.linspace(0.0, 1.0, max(2, math.ceil(length / step) + 1))[:, None]
            line = a + t * (b - a)
            samples += [line + buffer * normal, line - buffer * normal]
    angles = np.linspace(0.0, 2 * np.pi, max(8, math.ceil(2 * np.pi * buffer / step)), endpoint=False)
    circle = buffer * np.column_stack([np.cos(angles), np.sin(angles)])
    samples += [v + circle for v in vertices]
    candidates = np.concatenate(samples)
    # Only samples that no other part of the outline covers lie on the boundary.
    boundary = candidates[_segment_distance(candidates, starts, ends) >= buffer * (1 - 1e-9)]

    def signed_distance(centres: np.ndarray) -> np.ndarray:
        to_outline = _segment_distance(centres, starts, ends)
        to_boundary = np.sqrt(((centres[:, None, :] - boundary[None]) ** 2).sum(2)).min(1)
        return np.where(to_outline < buffer, to_boundary, buffer - to_outline)

    low, high = vertices.min(0) - buffer, vertices.max(0) + buffer
    width, height = high - low
    cell = min(width, height)
    half = cell / 2
    xs, ys = np.meshgrid(np.arange(low[0], high[0], cell) + half, np.arange(low[1], high[1], cell) + half)
    centres = np.column_stack([xs.ravel(), ys.ravel()])
    best = (low + high) / 2
    best_distance = float(signed_distance(best[None])[0])
    queue: list[tuple[float, int, float, float, float, float]] = []
    counter = 0
    for (x, y), d in zip(centres, signed_distance(centres)):
        heapq.heappush(queue, (-(d + half * math.sqrt(2)), counter, x, y, half, d))
        counter += 1
    while queue:
        neg_max, _, x, y, h, d = heapq.heappop(queue)
        if d > best_distance:
            best, best_distance = np.array([x, y]), d
        if -neg_max - best_distance <= tolerance:
            continue
        h /= 2
        children = np.array([[x - h, y - h], [x + h, y - h], [x - h, y + h], [x + h, y + h]])
        for (cx, cy), cd in zip(children, signed_distance(children)):
            heapq.heappush(queue, (-(cd + h * math.sqrt(2)), counter, cx, cy, h, cd))
            counter += 1
    return best


def object_box(kind: int, points: np.ndarray, polygon_rule: str = "bounds") -> np.ndarray:
    """xyxy float64 box of one object.

    ``"bounds"``: min/max of the points for every type (canonical). ``"mgca"``: the same for
    boxes and ellipses; for a polygon, MGCA's box centred on :func:`pole_of_inaccessibility`, each
    half-side the larger distance from that centre to the polygon's bounds on its axis (so the box is
    symmetric about the centre and at least covers the polygon).
    """
    if polygon_rule not in POLYGON_RULES:
        raise ValueError(f"polygon_rule must be one of {POLYGON_RULES}, got {polygon_rule!r}")
    low, high = points.min(0).astype(np.float64), points.max(0).astype(np.float64)
    if kind != POLYGON or polygon_rule == "bounds":
        return np.concatenate([low, high])
    centre = pole_of_inaccessibility(points)
    half = np.maximum(np.abs(low - centre), np.abs(high - centre))
    return np.concatenate([centre - half, centre + half])


def _find_folder(root: Path) -> Path:
    """The folder holding train.csv and dev.csv: ``root`` or one direct subfolder of it."""
    def complete(folder: Path) -> bool:
        return all((folder / name).is_file() for name in REQUIRED)

    if complete(root):
        return root
    hits = sorted(p for p in root.iterdir() if p.is_dir() and complete(p))
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise DataError(f"{root}: several Object-CXR folders {[str(h) for h in hits]}; point at one of them")
    present = [name for name in REQUIRED if (root / name).is_file()]
    raise DataError(f"{root}: expected {' and '.join(REQUIRED)} (header 'image_name,annotation') in this folder "
                    f"or a direct subfolder (e.g. object-CXR/); found {present or 'neither'}")


class ObjectCxrSource(DatasetReader):
    """An Object-CXR dataset on disk: the label files plus the JPEGs (unpacked or in the zips).

    Args:
        root: the dataset folder (or its parent): ``train.csv`` and ``dev.csv`` are looked for in it
            and its direct subfolders; an optional ``test.csv`` (Kaggle mirror) beside them. Images
            are the ``*.jpg`` files anywhere below that folder, else members of ``train.zip``,
            ``dev.zip`` or ``test.zip`` beside the label files.

    Raises:
        DataError: no label files, a malformed one, an image id in two label files, two image files
            with the same name, or an unreadable zip.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: Object-CXR dataset folder not found")
        self.folder = _find_folder(self.root)
        self.label_files: dict[str, Path] = {}
        self._objects: dict[str, list[Object]] = {}
        self._parts: dict[str, str] = {}
        self._lines: dict[str, int] = {}
        for name, (part, _) in LABEL_FILES.items():
            path = self.folder / name
            if not path.is_file():
                continue
            self.label_files[part] = path
            for image_id, objects in read_annotations(path, self._lines).items():
                if image_id in self._parts:
                    raise DataError(f"{path}: image {image_id} is also in {self.label_files[self._parts[image_id]]}")
                self._objects[image_id] = objects
                self._parts[image_id] = part

        self._files: dict[str, Path] = {}
        for path in sorted(self.folder.rglob("*")):
            if path.suffix.lower() in (".jpg", ".jpeg") and path.is_file():
                if path.name in self._files:
                    raise DataError(f"two image files for {path.name}: {self._files[path.name]} and {path}")
                self._files[path.name] = path
        self._members: dict[str, tuple[Path, str]] = {}
        for part in ("train", "dev", "test"):
            archive_path = self.folder / f"{part}.zip"
            if archive_path.is_file():
                for member in _zip_members(archive_path):
                    name = member.rsplit("/", 1)[-1]
                    if name not in self._files:
                        self._members.setdefault(name, (archive_path, member))

    @property
    def image_ids(self) -> list[str]:
        """Every image_name of train.csv, then dev.csv (then test.csv), in file order."""
        return list(self._objects)

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.object_cxr.synth_object_cxr`."""
        return is_synthetic(self.root, self.folder)

    def _lookup(self, image_id: str) -> list[Object]:
        try:
            return self._objects[image_id]
        except KeyError:
            files = ", ".join(str(p) for p in self.label_files.values())
            raise DataError(f"image {image_id} is not in {files}") from None

    def objects(self, image_id: str) -> list[Object]:
        """The image's objects as ``[(type, points), ...]``: type 0 box, 1 ellipse, 2 polygon;
        points int64 (n, 2) in pixels (x, y) of the image (2 corners, or the polygon's vertices)."""
        return [(kind, points.copy()) for kind, points in self._lookup(image_id)]

    def boxes(self, image_id: str, polygon_rule: str = "bounds") -> np.ndarray:
        """float64 (K, 4) xyxy boxes, one per object, in pixels of the image; see :func:`object_box`
        for ``polygon_rule`` (``"bounds"`` canonical, ``"mgca"`` MGCA's polylabel box for polygons)."""
        boxes = [object_box(kind, points, polygon_rule) for kind, points in self._lookup(image_id)]
        return np.array(boxes, dtype=np.float64).reshape(-1, 4)

    def geometry_problems(self, image_id: str, height: int, width: int) -> list[str]:
        """Each of the image's objects whose bounds have no area or reach outside the image, naming the label
        file's line (a run clips them)."""
        where = f"{self.label_files[self.part(image_id)]} line {self._lines[image_id]}: {image_id}"
        problems = []
        for number, (kind, points) in enumerate(self._lookup(image_id), start=1):
            if problem := box_problem(*object_box(kind, points).tolist(), height, width):
                problems.append(f"{where} object {number} ({TYPE_NAMES[kind]}): {problem}")
        return problems

    def label(self, image_id: str) -> int:
        """1 if the image has a foreign object, else 0."""
        return int(bool(self._lookup(image_id)))

    def part(self, image_id: str) -> str:
        """The label file the image comes from: ``"train"``, ``"dev"`` (or ``"test"``, Kaggle mirror)."""
        self._lookup(image_id)
        return self._parts[image_id]

    def path(self, image_id: str) -> Path | zipfile.Path:
        """The image file; for an image still inside ``train.zip`` / ``dev.zip``, a ``zipfile.Path``.

        Raises:
            DataError: no such image file or zip member.
        """
        if image_id in self._files:
            return self._files[image_id]
        if image_id in self._members:
            archive, member = self._members[image_id]
            return zipfile.Path(archive, at=member)
        raise DataError(f"no image file for {image_id} below {self.folder} (looked for {image_id} and in "
                        "train.zip / dev.zip)")

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image: uint8 (H, W)."""
        if image_id in self._files or image_id not in self._members:
            return read_image(self.path(image_id))
        archive, member = self._members[image_id]
        return np.array(_open_member(archive, member, lambda image: image.convert("L")))

    def image_size(self, image_id: str) -> tuple[int, int]:
        """``(height, width)`` of the image (numpy order, as every reader), read from the JPEG header
        without decoding the pixels."""
        if image_id in self._files or image_id not in self._members:
            path = self.path(image_id)
            try:
                with Image.open(path) as image:
                    return image.size[::-1]
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
                raise DataError(f"cannot read the size of image {path}: {exc}") from exc
        archive, member = self._members[image_id]
        return _open_member(archive, member, lambda image: image.size[::-1])

    def mask(self, image_id: str) -> np.ndarray:
        """uint8 0/1 (H, W) at the image's size: boxes filled, ellipses as ellipses, polygons filled."""
        height, width = self.image_size(image_id)
        return rasterize(self._lookup(image_id), width, height)

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without a label row, in order (images are not looked at)."""
        return [i for i in ids if i not in self._objects]

    def missing(self, ids: list[str]) -> list[str]:
        """The ids among ``ids`` that lack an image (file or zip member) or a label row, in order."""
        return [i for i in ids if i not in self._objects or (i not in self._files and i not in self._members)]


def _zip_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read the zip archive {path}: {exc}") from exc
    # macOS archivers add resource forks under __MACOSX/ with the same file names.
    return [n for n in names if n.lower().endswith((".jpg", ".jpeg")) and not n.startswith("__MACOSX/")]


def _open_member(archive: Path, member: str, use):
    """Apply ``use`` to the zip member opened as a (lazy) PIL image; errors name archive and member."""
    try:
        with zipfile.ZipFile(archive) as opened, opened.open(member) as stream, Image.open(stream) as image:
            return use(image)
    except (OSError, KeyError, zipfile.BadZipFile, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image {archive}:{member}: {exc}") from exc


def _split_inputs(source: ObjectCxrSource) -> tuple[dict[str, int], list[str], list[str], dict]:
    """What every Object-CXR split is built from: the labels, the train.csv rows (file order, as
    pd.read_csv gives them), the dev.csv rows (the test part) and the manifest's ``source`` block."""
    labels = {image_id: source.label(image_id) for image_id in source.image_ids}
    pool = [i for i in source.image_ids if source.part(i) == "train"]
    test = [i for i in source.image_ids if source.part(i) == "dev"]
    files = {name: source.label_files[part] for name, part in (("train.csv", "train"), ("dev.csv", "dev"))}
    info = {"test": "dev.csv",
            "files": {name: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "n_images": count}
                      for (name, path), count in zip(files.items(), (len(pool), len(test)))}}
    return labels, pool, test, info


def build_split_v1(source: ObjectCxrSource, out_dir: str | Path, version: str = "v1") -> dict:
    """Write Object-CXR split v1 of ``source`` to ``out_dir`` (see :func:`split_v1`); return the manifest."""
    labels, pool, test, info = _split_inputs(source)
    # floor, as train_test_split sizes its test part: 8,000 -> 1,600.
    n_val = math.floor(len(pool) * VAL_FRACTION + 1e-9)
    return write_split(
        out_dir,
        dataset="object_cxr",
        version=version,
        parts=holdout_parts(pool, test, labels, n_val, SEED),
        labels={image_id: {LABEL_COLUMN: y} for image_id, y in labels.items()},
        columns=[LABEL_COLUMN],
        generator="vlpbench.data.object_cxr:split_v1",
        seed=SEED,
        fractions={"train": 1 - VAL_FRACTION, "val": VAL_FRACTION, "train_10pct": 0.1, "train_1pct": 0.01},
        source=info,
    )


def split_v1(source: ObjectCxrSource) -> Split:
    """Object-CXR split v1, derived from the user's ``train.csv`` and ``dev.csv`` (cached by their sha256).

    train.csv is split 80/20 into train / val (6,400 / 1,600 on the real file, as in G2D Table 6),
    stratified on having an object with seed 0; test is dev.csv (1,000). ``train_10pct`` (640) is drawn
    from train and ``train_1pct`` (64) from it, both stratified. Label column ``object`` (0/1).
    """
    files = [source.label_files["train"], source.label_files["dev"]]
    return derived_split("object_cxr", "v1", sources=files,
                         build=lambda out_dir, version: build_split_v1(source, out_dir, version))


def build_split_mgca(source: ObjectCxrSource, out_dir: str | Path, version: str = "mgca") -> dict:
    """Write Object-CXR split ``mgca`` of ``source`` to ``out_dir`` (see :func:`split_mgca`); return the manifest."""
    labels, pool, test, info = _split_inputs(source)
    train, val = train_test_split_ids(pool, MGCA_VAL_FRACTION, MGCA_RANDOM_STATE)
    train_10, train_1 = nested_subsets(train, labels, SEED)
    return write_split(
        out_dir,
        dataset="object_cxr",
        version=version,
        parts={"train": train, "val": val, "test": test, "train_1pct": train_1, "train_10pct": train_10},
        labels={image_id: {LABEL_COLUMN: y} for image_id, y in labels.items()},
        columns=[LABEL_COLUMN],
        generator="vlpbench.data.object_cxr:split_mgca",
        seed=MGCA_RANDOM_STATE,
        fractions={"train": 1 - MGCA_VAL_FRACTION, "val": MGCA_VAL_FRACTION, "train_10pct": 0.1, "train_1pct": 0.01},
        source=info,
        reference={
            "repository": "HKU-MedAI/MGCA",
            "commit": MGCA_COMMIT,
            "file": "mgca/preprocess/object_cxr.py",
            "lines": "92-105",
            "rule": "train_test_split(rows of train.csv in file order, test_size=0.1, random_state=0) -> train, "
                    "val; test = dev.csv",
            "identical": ["train", "val", "test"],
            "differs": {
                "train_10pct": "vlpbench nested stratified subset (seed 0) of MGCA's train part; MGCA draws "
                               "np.random.choice under the global numpy RNG in every run "
                               "(mgca/datasets/detection_dataset.py:132-135), which is not reproducible",
                "train_1pct": "drawn from train_10pct, stratified (seed 0); see train_10pct",
            },
        },
    )


def split_mgca(source: ObjectCxrSource) -> Split:
    """Object-CXR split ``mgca``: MGCA's split, derived from the user's ``train.csv`` and ``dev.csv`` (cached
    by their sha256; Object-CXR's label files do not ship with any package, so none is committed).

    MGCA (``mgca/preprocess/object_cxr.py:92-105`` @ 680fe4a) reads train.csv with pandas and calls
    ``train_test_split(ori_train_df, test_size=0.1, random_state=0)``: val is the first ``ceil(0.1 n)`` of
    ``RandomState(0).permutation(n)`` over the rows in file order, train the rest (7,200 / 800 on the
    real 8,000-row file; :func:`vlpbench.data.splits.shuffle_split`); test is dev.csv (1,000). Unlike v1
    it is not stratified. ``train_10pct`` (720) and ``train_1pct`` (72) are vlpbench's nested stratified
    subsets of MGCA's train part (MGCA draws them anew in every run with the global numpy RNG).
    The split depends on the row order of train.csv, which must be the release's.
    """
    files = [source.label_files["train"], source.label_files["dev"]]
    return derived_split("object_cxr", "mgca", sources=files,
                         build=lambda out_dir, version: build_split_mgca(source, out_dir, version))
