"""CheXlocalize reader: radiologists' pixel masks of 10 pathologies on the CheXpert validation and test images,
and its split v1.

Format (rajpurkarlab/cheXlocalize README.md:65-79, :288-312; sample/gt_segmentations_val.json): the Stanford AIMI
download holds ``CheXlocalize/gt_segmentations_val.json`` and ``gt_segmentations_test.json`` beside the images
``CheXpert/val/`` and ``CheXpert/test/`` (``<patient>/<study>/<view>.jpg``). Each JSON is
``{cxr_id: {pathology: {"size": [h, w], "counts": "<COCO compressed RLE>"}}}``; the cxr id is the image's path
with ``_`` for ``/`` and no ``.jpg`` (``patient64541_study1_view1_frontal``). Only images with at least one
positive label are keys, and each carries all ten pathologies (eval.py:79 reads every one), a negative one as an
all-zero mask (README.md:308-310). The ten names are eval_constants.py:1-10 (``Airspace Opacity``, not CheXpert's
``Lung Opacity``). The annotation JSONs carry ``img_size`` [h, w]; it is accepted here too and must agree.

Image ids are the cxr ids. Masks are kept as run lengths and decoded per request (:mod:`vlpbench.data.coco_rle`).

Split v1 (:func:`split_v1`): val = the keys of ``gt_segmentations_val.json``, test = those of
``gt_segmentations_test.json``, in file order; label columns = the ten pathologies, 1 where the mask is non-empty.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlpbench.data import is_synthetic
from vlpbench.data.base import DatasetReader
from vlpbench.data.coco_rle import check_rle, runs_to_mask
from vlpbench.data.images import read_image
from vlpbench.data.splits import Split, derived_split, write_split
from vlpbench.errors import DataError

# rajpurkarlab/cheXlocalize eval_constants.py:1-10, in that order.
PATHOLOGIES = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Airspace Opacity", "Edema",
               "Consolidation", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Support Devices")
PARTS = ("val", "test")
MASK_FILES = {part: f"gt_segmentations_{part}.json" for part in PARTS}
# Image folders per part: CheXlocalize's download (CheXpert/val, CheXpert/test), or a CheXpert release's valid/.
IMAGE_FOLDERS = {"val": ("val", "valid"), "test": ("test",)}
IMAGE_SIZE_KEY = "img_size"
SEED = 0
_ID = re.compile(r"(patient[0-9]+)_(study[0-9]+)_(view[0-9]+_(?:frontal|lateral))")


def relative_path(image_id: str) -> str:
    """``<patient>/<study>/<view>.jpg`` of a cxr id (``patient64541_study1_view1_frontal``).

    Raises:
        DataError: the id is not in that form.
    """
    match = _ID.fullmatch(image_id)
    if not match:
        raise DataError(f"image id {image_id!r}; expected patient<N>_study<N>_view<N>_<frontal|lateral>")
    return "/".join(match.groups()) + ".jpg"


def read_masks(path: str | Path) -> dict[str, tuple[tuple[int, int], dict[str, np.ndarray]]]:
    """Read one ``gt_segmentations_*.json``: ``{cxr_id: ((h, w), {pathology: run lengths})}`` in file order.

    Raises:
        DataError: naming the file, cxr id and pathology for invalid JSON, an id not in the cxr-id form, an
            unknown or missing pathology, a bad RLE entry, or sizes that disagree within an image.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise DataError(f"{path}: CheXlocalize mask file not found") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{cxr_id: {{pathology: RLE}}}}, found {type(data).__name__}")
    images: dict[str, tuple[tuple[int, int], dict[str, np.ndarray]]] = {}
    for image_id, entry in data.items():
        where = f"{path} {image_id!r}"
        try:
            relative_path(image_id)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected {{pathology: RLE}}, found {type(entry).__name__}")
        unknown = [key for key in entry if key not in PATHOLOGIES and key != IMAGE_SIZE_KEY]
        if unknown:
            raise DataError(f"{where}: unknown pathology {', '.join(map(repr, unknown))}; expected the ten of "
                            f"CheXlocalize: {', '.join(PATHOLOGIES)}")
        if missing := [name for name in PATHOLOGIES if name not in entry]:
            raise DataError(f"{where}: lacks pathology {', '.join(map(repr, missing))}; every image carries all "
                            "ten (an all-zero mask for a negative one)")
        runs, sizes = {}, {}
        for name in PATHOLOGIES:
            sizes[name], runs[name] = check_rle(entry[name], f"{where} {name!r}")
        shape = sizes[PATHOLOGIES[0]]
        if odd := [name for name in PATHOLOGIES if sizes[name] != shape]:
            raise DataError(f"{where}: {odd[0]!r} has size {list(sizes[odd[0]])} but {PATHOLOGIES[0]!r} "
                            f"{list(shape)}; one image has one size")
        if IMAGE_SIZE_KEY in entry and entry[IMAGE_SIZE_KEY] != list(shape):
            raise DataError(f"{where}: img_size {entry[IMAGE_SIZE_KEY]!r} differs from the masks' size {list(shape)}")
        images[image_id] = (shape, runs)
    return images


def _find(root: Path, names: Sequence[str], *, folder: bool) -> Path | None:
    """The first of ``root/name`` or a single ``root/*/name`` over ``names``."""
    kind = Path.is_dir if folder else Path.is_file
    for name in names:
        hits = [root / name] if kind(root / name) else [p for p in sorted(root.glob(f"*/{name}")) if kind(p)]
        if len(hits) > 1:
            raise DataError(f"{root}: several {name}: {', '.join(map(str, hits))}; keep one")
        if hits:
            return hits[0]
    return None


class ChexlocalizeSource(DatasetReader):
    """CheXlocalize's ground-truth masks over the CheXpert validation and test images.

    Args:
        root: a folder holding ``gt_segmentations_val.json`` and ``gt_segmentations_test.json`` and the image
            folders ``val/`` (or ``valid/``) and ``test/``, each directly or in one subfolder (the download's
            ``CheXlocalize/`` and ``CheXpert/``).

    Raises:
        DataError: a mask file missing or malformed (:func:`read_masks`), or a cxr id in both files.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: CheXlocalize folder not found")
        self.mask_files: dict[str, Path] = {}
        for part, name in MASK_FILES.items():
            found = _find(self.root, (name,), folder=False)
            if found is None:
                raise DataError(f"expected {name} in {self.root} or one of its subfolders (CheXlocalize/)")
            self.mask_files[part] = found
        self.image_dirs = {part: _find(self.root, names, folder=True) for part, names in IMAGE_FOLDERS.items()}
        self._masks: dict[str, tuple[tuple[int, int], dict[str, np.ndarray]]] = {}
        self._part: dict[str, str] = {}
        for part, path in self.mask_files.items():
            for image_id, value in read_masks(path).items():
                if image_id in self._part:
                    raise DataError(f"{path}: {image_id} is also in {self.mask_files[self._part[image_id]]}")
                self._masks[image_id], self._part[image_id] = value, part

    @property
    def synthetic(self) -> bool:
        """True for a dataset written by :func:`vlpbench.synthetic.chexlocalize.synth_chexlocalize`."""
        return is_synthetic(self.root, self.mask_files["test"].parent.parent)

    @property
    def image_ids(self) -> list[str]:
        """Every cxr id of the val file, then of the test file, in file order."""
        return list(self._masks)

    def part(self, image_id: str) -> str:
        """``val`` or ``test``: the file that holds the image."""
        self._entry(image_id)
        return self._part[image_id]

    def _entry(self, image_id: str) -> tuple[tuple[int, int], dict[str, np.ndarray]]:
        try:
            return self._masks[image_id]
        except KeyError:
            raise DataError(f"image {image_id} is in neither {self.mask_files['val'].name} nor "
                            f"{self.mask_files['test'].name}") from None

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the masks, which is the original image's size."""
        return self._entry(image_id)[0]

    def pathologies(self, image_id: str) -> list[str]:
        """The pathologies with a non-empty mask on the image, in :data:`PATHOLOGIES` order."""
        runs = self._entry(image_id)[1]
        return [name for name in PATHOLOGIES if runs[name][1::2].any()]

    def mask(self, image_id: str, pathology: str) -> np.ndarray:
        """uint8 0/1 (H, W): the radiologists' mask of ``pathology`` (all zero where negative)."""
        shape, runs = self._entry(image_id)
        if pathology not in runs:
            raise DataError(f"unknown CheXlocalize pathology {pathology!r}; expected one of {', '.join(PATHOLOGIES)}")
        return runs_to_mask(runs[pathology], shape)

    def chexpert_path(self, image_id: str) -> str:
        """The image's path below the CheXpert folder: ``val/<patient>/<study>/<view>.jpg`` or ``test/...``."""
        return f"{self.part(image_id)}/{relative_path(image_id)}"

    def path(self, image_id: str) -> Path:
        """The JPEG below the part's image folder.

        Raises:
            DataError: the part has no image folder.
        """
        folder = self.image_dirs[self.part(image_id)]
        if folder is None:
            names = " or ".join(f"{name}/" for name in IMAGE_FOLDERS[self._part[image_id]])
            raise DataError(f"no image folder {names} in {self.root} or one of its subfolders (CheXpert/)")
        return folder / relative_path(image_id)

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image: uint8 (H, W).

        Raises:
            DataError: missing or undecodable, or its size differs from the masks' (the masks would not fit it).
        """
        pixels = read_image(self.path(image_id))
        problems = self.geometry_problems(image_id, *pixels.shape[:2])
        if problems:
            raise DataError(problems[0])
        return pixels

    def geometry_problems(self, image_id: str, height: int, width: int) -> list[str]:
        """The masks' size against the decoded image's (``vlpbench data check``)."""
        shape = self.image_size(image_id)
        if shape == (height, width):
            return []
        return [f"{self.mask_files[self._part[image_id]]} {image_id}: masks are {shape[1]}x{shape[0]} (w x h) but "
                f"the image {self.path(image_id)} is {width}x{height}; use the full-resolution CheXpert images"]

    @property
    def classes(self) -> tuple[str, ...]:
        """The ten CheXlocalize pathologies."""
        return PATHOLOGIES

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` in neither mask file, in order."""
        return [i for i in ids if i not in self._masks]

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` without masks or without an image file, in order."""
        return [i for i in ids if i not in self._masks or self.image_dirs[self._part[i]] is None
                or not self.path(i).is_file()]


def build_split_v1(source: ChexlocalizeSource, out_dir: str | Path, version: str = "v1") -> dict:
    """Write split v1 of ``source`` (module docstring) to ``out_dir``; return the manifest."""
    ids = source.image_ids
    positive = {i: set(source.pathologies(i)) for i in ids}
    return write_split(
        out_dir, dataset="chexlocalize", version=version,
        parts={part: [i for i in ids if source.part(i) == part] for part in PARTS},
        labels={i: {name: int(name in positive[i]) for name in PATHOLOGIES} for i in ids}, columns=PATHOLOGIES,
        generator="vlpbench.data.chexlocalize:split_v1", seed=SEED, fractions={},
        source={"files": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                          for path in source.mask_files.values()},
                "parts": "the keys of gt_segmentations_val.json (val) and gt_segmentations_test.json (test)"},
    )


def split_v1(source: ChexlocalizeSource) -> Split:
    """Split v1 derived from the user's two mask files (module docstring), cached per file content."""
    return derived_split("chexlocalize", "v1", sources=list(source.mask_files.values()),
                         build=lambda out_dir, version: build_split_v1(source, out_dir, version))
