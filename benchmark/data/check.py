"""``vlpbench data check`` and ``vlpbench splits verify``: is a user's dataset folder usable, and
does it agree with the split files?"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from vlpbench.data.splits import dataset_split, load_split
from vlpbench.errors import ConfigError, DataError
from vlpbench.registry import DATASETS

_SHOWN = 5  # ids named per problem; the count is always given


@dataclass
class CheckReport:
    """What a check found: facts (``info``) and problems (``errors``), each one line."""

    title: str
    info: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no error was found."""
        return not self.errors

    def format(self) -> str:
        """The report as a person reads it: facts, then problems, then a verdict."""
        lines = [self.title, *(f"  {line}" for line in self.info)]
        lines += [f"  ERROR {line}" for line in self.errors]
        lines.append("OK" if self.ok else f"FAILED: {len(self.errors)} problem(s)")
        return "\n".join(lines)


def _named(ids: list[str]) -> str:
    more = f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return ", ".join(ids[:_SHOWN]) + more


def check_dataset(dataset: str, root: str | Path, *, decode: bool = True, progress: bool = True) -> CheckReport:
    """Validate layout, label files and images of ``dataset`` at ``root``.

    Reports the counts per split part, and names every missing and every unreadable image file. With
    ``decode``, each label box (RSNA, Object-CXR, ChestX-ray14) is checked against its decoded image: a
    positive size within the image bounds, else an error naming the label file and line. (SIIM RLE masks
    that run past the image fail as the dataset opens, as they do in ``run``.)
    """
    report = CheckReport(f"data check: {dataset} at {root}")
    try:
        source = DATASETS.get(dataset).open(Path(root))
    except DataError as exc:
        report.errors.append(str(exc))
        return report
    ids = list(source.image_ids)
    report.info.append(f"{len(ids)} images in the label files" + (" (synthetic dataset)" if source.synthetic else ""))
    missing = source.missing(ids)
    no_file = [i for i in missing if not _has_file(source, i)]
    if no_file:
        report.errors.append(f"{len(no_file)} indexed images have no image file: {_named(no_file)}")
    if unlabelled := [i for i in missing if i not in set(no_file)]:
        # A fact of some releases (MIMIC-CXR studies without labeler rows), not a fault of the folder.
        report.info.append(f"{len(unlabelled)} images have no label row and are left out: {_named(unlabelled)}")

    try:
        split = dataset_split(dataset, source)
    except (ConfigError, DataError) as exc:
        report.errors.append(f"split: {exc}")
    else:
        for part in split.parts:
            part_ids = split.ids(part)
            absent = source.missing(part_ids)
            line = f"split {split.dataset}/{split.version} {part}: {len(part_ids) - len(absent)} of {len(part_ids)} present"
            if absent and not source.synthetic:
                report.errors.append(f"{line}; missing {_named(absent)}")
            else:
                report.info.append(line)

    if decode:
        absent = set(missing)
        present = [i for i in ids if i not in absent]
        unreadable, geometry = _decode_all(source, present, progress)
        report.info.append(f"decoded {len(present) - len(unreadable)} of {len(present)} image files")
        for image_id, message in unreadable[:_SHOWN]:
            report.errors.append(f"unreadable image {image_id}: {message}")
        if len(unreadable) > _SHOWN:
            report.errors.append(f"... and {len(unreadable) - _SHOWN} more unreadable images")
        report.errors += geometry[:_SHOWN]
        if len(geometry) > _SHOWN:
            report.errors.append(f"... and {len(geometry) - _SHOWN} more label rows with boxes off their image")
    else:
        report.info.append("label geometry not checked against the images (--no-decode)")
    return report


def _has_file(source, image_id: str) -> bool:
    try:
        return source.path(image_id).exists()
    except DataError:
        return False


def _decode_all(source, ids: list[str], progress: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """Decode every image of ``ids``: ``([(id, why) of each unreadable one], [label geometry problems])``, the
    geometry (boxes within the image, ``DatasetReader.geometry_problems``) checked against each decoded size."""
    def attempt(image_id: str) -> tuple[tuple[str, str] | None, list[str]]:
        try:
            height, width = source.image(image_id).shape[:2]
        except DataError as exc:
            return (image_id, str(exc)), []
        return None, source.geometry_problems(image_id, height, width)

    # Decoders release the GIL, so threads overlap the work.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(tqdm(pool.map(attempt, ids), total=len(ids), desc="decode", unit="img",
                            disable=not progress, leave=False))
    return [r for r, _ in results if r is not None], [problem for _, problems in results for problem in problems]


def verify_split(dataset: str, root: str | Path | None = None) -> CheckReport:
    """Check the split files against their manifest and, with ``root``, against the user's data:
    every id present, and no id in two of train / val / test."""
    report = CheckReport(f"splits verify: {dataset}" + (f" against {root}" if root else ""))
    source = None
    try:
        if root is not None:
            source = DATASETS.get(dataset).open(Path(root))
            split = dataset_split(dataset, source)
        else:
            split = load_split(dataset, "v1")
    except (ConfigError, DataError) as exc:
        report.errors.append(str(exc))
        return report
    report.info.append(f"{split.dataset}/{split.version}: manifest sha256 {split.manifest_sha256[:12]}, "
                       f"every file matches it")
    parts = {part: set(split.ids(part)) for part in split.parts}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if a in parts and b in parts and (overlap := sorted(parts[a] & parts[b])):
            report.errors.append(f"{len(overlap)} ids are in both {a} and {b}: {_named(overlap)}")
    for subset, parent in (("train_1pct", "train_10pct"), ("train_10pct", "train")):
        if subset in parts and parent in parts and (outside := sorted(parts[subset] - parts[parent])):
            report.errors.append(f"{len(outside)} ids of {subset} are not in {parent}: {_named(outside)}")
    for part, members in parts.items():
        line = f"{part}: {len(members)} ids"
        if source is not None:
            absent = source.missing(sorted(members))
            line += f", {len(members) - len(absent)} present in the data folder"
            if absent and not source.synthetic:
                report.errors.append(f"{part}: {len(absent)} ids have no image or label in {root}: {_named(absent)}")
        report.info.append(line)
    return report
