"""MIMIC-5x200: the 1,000 MIMIC-CXR images, 200 per class, that BenchX retrieves reports for.

BenchX (yangzhou12/BenchX, NeurIPS 2024 Datasets & Benchmarks) published the set as
``unifier/datasets/data/mimic_5x200.csv.zip`` (present at commit 6fa71fe, deleted later); its CSV has the
columns ``Path,dicom_id,subject_id,study_id,Report,split`` and the 14 CheXpert label columns, one row per
image, and exactly one of Atelectasis / Cardiomegaly / Consolidation / Edema / Pleural Effusion is ``1.0``
per row (200 each). The ``Report`` column is credentialed MIMIC-CXR text, so vlpbench ships only the ids and
the class: ``splits/mimic5x200/sources/benchx_mimic_5x200_ids.csv`` (header ``dicom_id,subject_id,study_id,
class``, BenchX's row order), written by :func:`write_source_ids` from the BenchX file, and from it the split
``mimic5x200/v1`` (one part, ``test``, column ``class``: the index into :data:`CLASSES`) by
:func:`generate_split_v1`. The report texts come from the user's own MIMIC-CXR folder.

975 of the 1,000 images are in MIMIC-CXR's official ``train`` split (14 ``validate``, 11 ``test``): a model
pre-trained on MIMIC-CXR's training split has seen most of these images and their reports.

Rebuild the committed files from the BenchX file (``git show 6fa71fe:unifier/datasets/data/
mimic_5x200.csv.zip`` in a clone of yangzhou12/BenchX)::

    python -m vlpbench.data.mimic_5x200 mimic_5x200.csv.zip
    python -m vlpbench.data.splits mimic5x200
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from vlpbench.data.base import check_classes
from vlpbench.data.mimic_cxr import _DICOM, _STUDY, _SUBJECT, MimicCxrSource
from vlpbench.data.splits import SEED, load_split, write_split
from vlpbench.errors import DataError
from vlpbench.splits import SPLITS_DIR

# The five CheXpert competition classes, in BenchX's target order (unifier/blocks/zeroshot/zeroshot_dataset.py:18-24).
CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
PER_CLASS = 200
BENCHX_REPOSITORY = "yangzhou12/BenchX"
BENCHX_COMMIT = "6fa71fe772d3b78067326d896d13e604db023009"
BENCHX_FILE = "unifier/datasets/data/mimic_5x200.csv.zip"
BENCHX_MEMBER = "mimic_5x200.csv"
BENCHX_ZIP_SHA256 = "e8407b3a1cd736859e3e24d602f781aabec8dd512ee37060a19092f99a5511a1"
BENCHX_CSV_SHA256 = "06b1423495ab88c4b3757667fd2b4ec2302ca117d72351992334e4f739a614d4"
ID_COLUMNS = ("dicom_id", "subject_id", "study_id")
SOURCE_HEADER = (*ID_COLUMNS, "class")
SOURCE_FILE = SPLITS_DIR / "mimic5x200" / "sources" / "benchx_mimic_5x200_ids.csv"


def _benchx_csv(path: Path) -> bytes:
    """The CSV bytes of BenchX's file: ``path`` itself, or its member ``mimic_5x200.csv`` when a zip."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return archive.read(BENCHX_MEMBER)
        return path.read_bytes()
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read BenchX's {BENCHX_MEMBER} ({exc})") from exc


def read_benchx_rows(path: str | Path) -> list[tuple[str, str, str, str]]:
    """``(dicom_id, subject_id, study_id, class)`` of every row of BenchX's ``mimic_5x200.csv`` (or its
    ``.csv.zip``), in file order; the Report column is not kept.

    Raises:
        DataError: naming the file: not BenchX's published content (its sha256), a missing column, or a row
            (by line) whose ids are malformed or repeated or whose five class columns are not one-hot.
    """
    path = Path(path)
    data = _benchx_csv(path)
    if (digest := hashlib.sha256(data).hexdigest()) != BENCHX_CSV_SHA256:
        raise DataError(f"{path}: the CSV's sha256 is {digest}; expected {BENCHX_CSV_SHA256}, BenchX's "
                        f"{BENCHX_FILE} at {BENCHX_COMMIT[:7]}")
    reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
    if missing := [c for c in (*ID_COLUMNS, *CLASSES) if c not in (reader.fieldnames or ())]:
        raise DataError(f"{path} line 1: no column {', '.join(map(repr, missing))}")
    rows, seen = [], set()
    for row in reader:
        where = f"{path} line {reader.line_num}"
        ids = tuple(row[c] for c in ID_COLUMNS)
        if not (_DICOM.fullmatch(ids[0]) and _SUBJECT.fullmatch(ids[1]) and _STUDY.fullmatch(ids[2])):
            raise DataError(f"{where}: ids {ids} are not a MIMIC-CXR dicom_id, subject_id and study_id")
        if ids[0] in seen:
            raise DataError(f"{where}: dicom_id {ids[0]} repeats")
        positive = [c for c in CLASSES if row[c] == "1.0"]
        if len(positive) != 1 or any(row[c] != "0.0" for c in CLASSES if c not in positive):
            raise DataError(f"{where}: expected exactly one of {', '.join(CLASSES)} 1.0 and the others 0.0")
        seen.add(ids[0])
        rows.append((*ids, positive[0]))
    return rows


def write_source_ids(benchx: str | Path, out: str | Path = SOURCE_FILE) -> Path:
    """Write the committed id list (module docstring) from BenchX's file ``benchx``; its path."""
    rows = read_benchx_rows(benchx)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(",".join(fields) + "\n" for fields in [SOURCE_HEADER, *rows]), newline="\n")
    return out


def read_source_ids(path: str | Path = SOURCE_FILE) -> list[tuple[str, str, str, str]]:
    """The rows ``(dicom_id, subject_id, study_id, class)`` of the committed id list, in file order.

    Raises:
        DataError: naming the file and line: another header, a wrong field count, an unknown class or a
            repeated dicom_id.
    """
    path = Path(path)
    try:
        header, *lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the MIMIC-5x200 id list ({exc})") from exc
    if tuple(header.split(",")) != SOURCE_HEADER:
        raise DataError(f"{path} line 1: expected the header {','.join(SOURCE_HEADER)}")
    rows, seen = [], set()
    for number, line in enumerate(lines, start=2):
        fields = tuple(line.split(","))
        if len(fields) != len(SOURCE_HEADER) or fields[3] not in CLASSES or fields[0] in seen:
            raise DataError(f"{path} line {number}: expected a new dicom_id, subject_id, study_id and one of "
                            f"{', '.join(CLASSES)}, found {line!r}")
        seen.add(fields[0])
        rows.append(fields)
    return rows


def generate_split_v1(out_dir: str | Path) -> dict:
    """Write split ``mimic5x200/v1`` from the committed id list: one part, ``test`` (1,000 images), column
    ``class`` (index into :data:`CLASSES`); the manifest names the BenchX file it reproduces."""
    rows = read_source_ids()
    return write_split(
        out_dir,
        dataset="mimic5x200",
        version="v1",
        parts={"test": [row[0] for row in rows]},
        labels={row[0]: {"class": CLASSES.index(row[3])} for row in rows},
        columns=["class"],
        generator="vlpbench.data.mimic_5x200:generate_split_v1",
        seed=SEED,
        fractions={"test": 1.0},
        source={"file": f"splits/mimic5x200/sources/{SOURCE_FILE.name}",
                "sha256": hashlib.sha256(SOURCE_FILE.read_bytes()).hexdigest(), "n_images": len(rows),
                "classes": list(CLASSES), "per_class": PER_CLASS},
        reference={
            "repository": BENCHX_REPOSITORY,
            "commit": BENCHX_COMMIT,
            "file": BENCHX_FILE,
            "sha256": BENCHX_ZIP_SHA256,
            "csv_sha256": BENCHX_CSV_SHA256,
            "rule": "test = the dicom_ids of the CSV's rows; class = the one of the five competition columns "
                    "that is 1.0 (BenchX's retrieval target, unifier/blocks/zeroshot/zeroshot_dataset.py:69)",
            "identical": ["test"],
            "differs": {},
            "official_split": {"train": 975, "validate": 14, "test": 11},
        },
    )


@functools.lru_cache(maxsize=1)
def committed_classes() -> dict[str, str]:
    """``{dicom_id: class name}`` of the committed split ``mimic5x200/v1`` (hash-checked by the loader)."""
    return {image_id: CLASSES[index] for image_id, index in load_split("mimic5x200", "v1").labels("test").items()}


class Mimic5x200Source(MimicCxrSource):
    """A MIMIC-CXR-JPG folder read for MIMIC-5x200: the images and reports of the user's folder, the class of
    each image from the committed split (BenchX's target), never from the user's label files."""

    @property
    def image_ids(self) -> list[str]:
        """The MIMIC-5x200 images of the metadata file, in file order (its other images are no part of the set)."""
        known = committed_classes()
        return [i for i in self._images if i in known]

    @property
    def classes(self) -> tuple[str, ...]:
        """The five competition classes (:data:`CLASSES`)."""
        return CLASSES

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping) -> list[int]:
        """1 for the image's MIMIC-5x200 class, 0 for the others of ``classes``.

        Raises:
            ConfigError: a class not in :data:`CLASSES`.
            DataError: the image is not in MIMIC-5x200.
        """
        check_classes(self, classes)
        name = committed_classes().get(image_id)
        if name is None:
            raise DataError(f"image {image_id} is not in split mimic5x200/v1")
        return [int(c == name) for c in classes]

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` not in the metadata file or not in MIMIC-5x200, in order."""
        known = committed_classes()
        return [i for i in ids if i not in self._images or i not in known]

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` lacking a JPEG, a metadata row or a MIMIC-5x200 class, in order."""
        unlabelled = set(self.unlabelled(ids))
        return [i for i in ids if i in unlabelled or i not in self._jpgs]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write the committed id list from BenchX's file (module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m vlpbench.data.mimic_5x200",
        description="Write splits/mimic5x200/sources/ from BenchX's mimic_5x200.csv(.zip).")
    parser.add_argument("benchx", type=Path, help=f"BenchX's {BENCHX_FILE} (or the CSV in it)")
    parser.add_argument("--out", type=Path, default=SOURCE_FILE, help=f"output file (default {SOURCE_FILE})")
    args = parser.parse_args(argv)
    print(f"wrote {write_source_ids(args.benchx, args.out)}")


if __name__ == "__main__":
    main()
