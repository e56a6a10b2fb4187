"""Image–report pairs for CLIP fine-tuning: a MIMIC-CXR-JPG folder with reports, or a CSV file.

- MIMIC-CXR-JPG (:func:`mimic_pairs`, read with :class:`vlpbench.data.mimic_cxr.MimicCxrSource`): the
  frontal images (ViewPosition PA or AP) of the chosen official split parts (default ``train``) that the
  folder holds (``MimicCxrSource.missing``: JPEG and label row present). The text of an image is its
  study's FINDINGS then IMPRESSION section (``MimicCxrSource.sections``). Images whose report has neither
  section, or whose study has no report file, are left out and counted.
- CSV (:func:`csv_pairs`): a header with the columns ``image_path`` and ``report`` (others are ignored),
  one image per row; a relative path is read from the CSV's folder. The report text is used as written.

Either way the result is a :class:`Pairs`: the image ids, their texts, and a reader the image cache
(:func:`vlpbench.data.cache.cached_images`) decodes the images with.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlpbench.data.images import read_image
from vlpbench.errors import ConfigError, DataError
from vlpbench.tools.clip_finetune.sentences import report_text

CSV_COLUMNS = ("image_path", "report")
MIMIC_PARTS = ("train", "validate", "test")


@dataclass(frozen=True)
class Pairs:
    """Images and the report text paired with each.

    Attributes:
        reader: serves ``image(id) -> uint8 (H, W)`` to the image cache.
        dataset: the image cache's folder name for these images.
        ids: image ids, one per pair.
        texts: the report text of each image (findings and impression for MIMIC-CXR).
        description: where the pairs come from and what was left out (recorded in the metadata).
    """

    reader: Any
    dataset: str
    ids: list[str]
    texts: list[str]
    description: dict[str, Any] = field(default_factory=dict)

    def sha256(self) -> str:
        """sha256 of the (image id, text) list in order: two pair sets agree when this does.

        The image pixels are not hashed (that would mean decoding every image); the reader's files are
        covered by the image cache's own key.
        """
        payload = json.dumps(list(zip(self.ids, self.texts)), ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CsvImages:
    """The images a pairs CSV names: ids are the ``image_path`` values as written.

    Attributes:
        root: the CSV's folder (relative paths start there); label_file: the CSV (the image cache's key).
    """

    synthetic = False

    def __init__(self, csv_file: Path) -> None:
        self.label_file = Path(csv_file)
        self.root = self.label_file.parent

    def path(self, image_id: str) -> Path:
        """The image file of ``image_id`` (a path relative to the CSV's folder, or absolute)."""
        return self.root / image_id

    def image(self, image_id: str) -> np.ndarray:
        """The decoded image, uint8 (H, W).

        Raises:
            DataError: the file is missing or cannot be decoded (naming it).
        """
        return read_image(self.path(image_id))


def csv_pairs(path: str | Path) -> Pairs:
    """Read a pairs CSV (module docstring).

    Raises:
        DataError: naming the file and line: unreadable file, a missing column, an empty image path or
            report, an image path that repeats or names no file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the pairs CSV ({type(exc).__name__}: {exc})") from exc
    rows = csv.DictReader(io.StringIO(text, newline=""))  # keeps line breaks inside quoted reports
    missing = [c for c in CSV_COLUMNS if c not in (rows.fieldnames or [])]
    if missing:
        raise DataError(f"{path} line 1: header lacks {', '.join(missing)}; expected the columns "
                        f"{','.join(CSV_COLUMNS)}")
    reader = CsvImages(path)
    ids: list[str] = []
    texts: list[str] = []
    seen: dict[str, int] = {}
    for row in rows:
        where = f"{path} line {rows.line_num}"
        image_id, report = (row.get("image_path") or "").strip(), " ".join((row.get("report") or "").split())
        if not image_id:
            raise DataError(f"{where}: empty image_path")
        if not report:
            raise DataError(f"{where}: empty report for {image_id}")
        if image_id in seen:
            raise DataError(f"{where}: image_path {image_id} repeats (first on line {seen[image_id]})")
        if not reader.path(image_id).is_file():
            raise DataError(f"{where}: image file not found: {reader.path(image_id)}")
        seen[image_id] = rows.line_num
        ids.append(image_id)
        texts.append(report)
    if not ids:
        raise DataError(f"{path}: no pairs (only a header)")
    return Pairs(reader, "clip_pairs_csv", ids, texts, {"kind": "csv", "path": str(path), "pairs": len(ids)})


def mimic_pairs(root: str | Path, parts: Sequence[str] = ("train",)) -> Pairs:
    """The frontal image–report pairs of a MIMIC-CXR-JPG folder (module docstring).

    Raises:
        ConfigError: ``parts`` empty or naming a part other than train, validate, test.
        DataError: the reader's errors for a malformed release, or no pair at all (for
            example when no report is found: the reader's message says where reports are looked for).
    """
    from vlpbench.data.mimic_cxr import MimicCxrSource

    unknown = [p for p in parts if p not in MIMIC_PARTS]
    if unknown or not parts:
        raise ConfigError(f"MIMIC-CXR split parts {list(parts)}: expected some of {', '.join(MIMIC_PARTS)}")
    source = MimicCxrSource(root)
    frontal = [i for i in source.frontal_ids() if source.official_split(i) in parts]
    absent = set(source.missing(frontal))
    sections: dict[str, str | DataError] = {}  # study id -> text, or why there is none
    ids, texts = [], []
    no_text = no_report = 0
    for image_id in frontal:
        if image_id in absent:
            continue
        study = source.study_id(image_id)
        if study not in sections:
            try:
                parsed = source.sections(image_id)
                sections[study] = report_text(parsed["FINDINGS"], parsed["IMPRESSION"])
            except DataError as exc:
                sections[study] = exc
        text = sections[study]
        if isinstance(text, DataError):
            no_report += 1
        elif not text:
            no_text += 1
        else:
            ids.append(image_id)
            texts.append(text)
    if not ids:
        reason = next((t for t in sections.values() if isinstance(t, DataError)), None)
        raise DataError(f"{root}: no frontal image of the parts {', '.join(parts)} has a report with findings "
                        f"or impression" + (f" ({reason})" if reason else ""))
    return Pairs(source, "mimic_cxr", ids, texts, {
        "kind": "mimic_cxr", "path": str(source.folder), "parts": list(parts), "pairs": len(ids),
        "left_out": {"not_in_folder": len(absent), "no_report": no_report, "no_findings_or_impression": no_text},
    })


def load_pairs(data: str | Path, parts: Sequence[str] = ("train",)) -> Pairs:
    """A ``.csv`` file as :func:`csv_pairs`, a folder as :func:`mimic_pairs` (``parts`` applies there).

    Raises:
        DataError: ``data`` is neither, or as the readers.
    """
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        return csv_pairs(data)
    if data.is_dir():
        return mimic_pairs(data, parts)
    raise DataError(f"{data}: expected a pairs CSV file (columns {','.join(CSV_COLUMNS)}) or a MIMIC-CXR-JPG "
                    "folder with reports")
