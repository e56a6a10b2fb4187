"""Versioned, immutable split files: stratified draws, the SIIM v1 generator and the loader.

A split version lives in ``splits/<dataset>/<version>/``: one CSV per part (``train``, ``val``,
``test`` and the nested training subsets ``train_1pct`` ⊂ ``train_10pct`` ⊂ ``train``) plus a
``MANIFEST.json`` with the sha256 of every file, the seed and the generator. Files are never
edited in place: :func:`load_split` refuses a file whose hash does not match its manifest, and a
change of split makes a new version.

Regenerate SIIM v1 (byte-identical), or another committed version::

    python -m vlpbench.data.splits siim
    python -m vlpbench.data.splits rsna --version mgca
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlpbench.data.siim import EMPTY, SIIM_CLASS, read_labels
from vlpbench.data.xrv_files import SIIM_RLE, xrv_data_file
from vlpbench.config import cache_dir
from vlpbench.errors import ConfigError, DataError
from vlpbench.files import staged_folder
from vlpbench.splits import SPLITS_DIR

SEED = 0
FRACTIONS = (0.70, 0.15, 0.15)  # train, val, test
SUBSET_FRACTIONS = {0.01: "train_1pct", 0.1: "train_10pct", 1.0: "train"}
PARTS = ("train", "val", "test", "train_1pct", "train_10pct")
MANIFEST = "MANIFEST.json"
COMPRESS_ABOVE = 1 << 20  # bytes of CSV above which a part is stored as .csv.gz
SIIM_LABEL = SIIM_CLASS


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def apportion(total: int, weights: Sequence[float], capacity: Sequence[int] | None = None) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder, ties by order).

    With ``capacity``, no part gets more than its capacity; the excess goes to the first parts
    with room.
    """
    if total == 0:
        return [0] * len(weights)
    if sum(weights) <= 0:
        raise ValueError(f"cannot apportion {total} over weights {list(weights)}")
    quotas = [total * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    if capacity is not None:
        if total > sum(capacity):
            raise ValueError(f"cannot fit {total} into capacities {list(capacity)}")
        for i in range(len(counts)):
            for j in range(len(counts)):
                moved = max(0, min(counts[i] - capacity[i], capacity[j] - counts[j]))
                counts[i] -= moved
                counts[j] += moved
    return counts


def _by_class(ids: Sequence[str], labels: Sequence[int]) -> dict[int, list[str]]:
    """Ids grouped by label, classes and ids sorted, so a draw depends only on the set of pairs."""
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} ids but {len(labels)} labels")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
    groups: dict[int, list[str]] = {}
    for image_id, label in zip(ids, labels):
        groups.setdefault(int(label), []).append(image_id)
    return {label: sorted(groups[label]) for label in sorted(groups)}


def stratified_sample(ids: Sequence[str], labels: Sequence[int], size: int, seed: int) -> list[str]:
    """Draw ``size`` ids without replacement, keeping the label proportions (largest remainder).

    Deterministic given the (id, label) pairs and ``seed``; the result is in draw order.
    """
    groups = _by_class(ids, labels)
    if not 0 <= size <= len(ids):
        raise ValueError(f"cannot draw {size} of {len(ids)} ids")
    rng = np.random.default_rng(seed)
    counts = apportion(size, [len(members) for members in groups.values()])
    drawn: list[str] = []
    for members, count in zip(groups.values(), counts):
        drawn.extend(members[i] for i in rng.permutation(len(members))[:count])
    return drawn


def stratified_subset(ids: Sequence[str], labels: Sequence[int], fraction: float, seed: int) -> list[str]:
    """Draw ``round(len(ids) * fraction)`` ids, stratified by label (8,433 ids: 1 % → 84, 10 % → 843)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return stratified_sample(ids, labels, round(len(ids) * fraction), seed)


def nested_subsets(train: Sequence[str], labels: dict[str, int], seed: int) -> tuple[list[str], list[str]]:
    """The 10 % and 1 % training subsets, both stratified on ``labels``: 10 % of ``train``, and
    round(1 % of train) drawn from inside the 10 % one, so that 1 % ⊂ 10 % ⊂ train."""
    train_10 = stratified_subset(train, [labels[i] for i in train], 0.1, seed)
    train_1 = stratified_sample(train_10, [labels[i] for i in train_10], round(len(train) * 0.01), seed)
    return train_10, train_1


def read_id_list(path: str | Path) -> list[str]:
    """The ids of a committed one-column id list (header ``image_id``, LF), in file order.

    Raises:
        DataError: the file is missing, has another header, an empty or repeated id.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the id list ({exc})") from exc
    if not lines or lines[0] != "image_id":
        raise DataError(f"{path}: expected the header 'image_id'")
    ids = lines[1:]
    if not all(ids) or len(set(ids)) != len(ids):
        raise DataError(f"{path}: empty or repeated ids")
    return ids


def holdout_parts(pool: Sequence[str], test: Sequence[str], labels: dict[str, int], n_val: int,
                  seed: int) -> dict[str, list[str]]:
    """The parts of a split whose test set is given: ``n_val`` ids of ``pool`` held out as val
    (stratified on ``labels``), the rest train, and its nested 10 % and 1 % subsets; pool order kept."""
    held_out = set(stratified_sample(pool, [labels[i] for i in pool], n_val, seed))
    train = [i for i in pool if i not in held_out]
    train_10, train_1 = nested_subsets(train, labels, seed)
    return {"train": train, "val": [i for i in pool if i in held_out], "test": list(test),
            "train_1pct": train_1, "train_10pct": train_10}


def _at_least_one(counts: list[int]) -> list[int]:
    """Give every empty part one item taken from the largest part, where the total allows."""
    counts = list(counts)
    if sum(counts) >= len(counts):
        for i, count in enumerate(counts):
            if count == 0:
                counts[i] = 1
                counts[counts.index(max(counts))] -= 1
    return counts


def sample_split(split: Split, n: int, seed: int, *, top_weights: Sequence[float] | None = None) -> list[str]:
    """Draw ``n`` ids of a binary-label split for a synthetic dataset.

    The ids come from test / val / train in proportion to ``top_weights`` (default: the parts' sizes),
    and within train from ``train_1pct``, the rest of ``train_10pct`` and the rest of train as 1:9:90,
    every part getting at least one id where ``n`` allows; the positives are apportioned over all
    parts at once, like the split's positive rates (per-part rounding would lose most of them in a
    small sample). Deterministic given ``seed``.
    """
    train, sub10, sub1 = (split.labels(p) for p in ("train", "train_10pct", "train_1pct"))
    pools = [
        split.labels("test"),
        split.labels("val"),
        sub1,
        {i: y for i, y in sub10.items() if i not in sub1},
        {i: y for i, y in train.items() if i not in sub10},
    ]
    sizes = [len(pool) for pool in pools]
    if not 1 <= n <= sum(sizes):
        raise ValueError(f"n must be between 1 and {sum(sizes)} (the ids of split "
                         f"{split.dataset}/{split.version}), got {n}")
    top = [sizes[0], sizes[1], len(train)]
    n_test, n_val, n_train = _at_least_one(apportion(n, top_weights or top, top))
    counts = [n_test, n_val, *_at_least_one(apportion(n_train, (1, 9, 90), sizes[2:]))]
    n_pos = [sum(pool.values()) for pool in pools]
    expected = [count * pos / size for count, pos, size in zip(counts, n_pos, sizes)]
    positives = apportion(round(sum(expected)), expected, [min(c, p) for c, p in zip(counts, n_pos)])
    # A part short of negatives for its share takes more positives.
    positives = [max(p, c - (size - pos)) for p, c, size, pos in zip(positives, counts, sizes, n_pos)]

    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for pool, count, k in zip(pools, counts, positives):
        for label, wanted in ((1, k), (0, count - k)):
            members = sorted(i for i, y in pool.items() if y == label)
            chosen.extend(members[j] for j in rng.permutation(len(members))[:wanted])
    return chosen


def stratified_split(
    ids: Sequence[str],
    labels: Sequence[int],
    fractions: tuple[float, float, float] = FRACTIONS,
    *,
    seed: int,
) -> tuple[list[str], list[str], list[str]]:
    """Split ids into (train, val, test), stratified by label and deterministic given ``seed``.

    val and test get ``floor(N * fraction)`` ids each (12,047 → 1,807 and 1,807) and train the
    rest (8,433). Within each part the classes are apportioned by largest remainder.
    """
    if len(fractions) != 3 or min(fractions) <= 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    groups = _by_class(ids, labels)
    sizes = [len(members) for members in groups.values()]
    # The epsilon keeps float error from losing an id: 100 * 0.29 is 28.999999999999996.
    n_val, n_test = (math.floor(len(ids) * f + 1e-9) for f in fractions[1:])
    val_counts = apportion(n_val, sizes)
    # A tiny class could win the rounding for both val and test: test takes what val left.
    test_counts = apportion(n_test, sizes, [size - n_v for size, n_v in zip(sizes, val_counts)])
    rng = np.random.default_rng(seed)
    train: list[str] = []
    val: list[str] = []
    test: list[str] = []
    for members, n_v, n_t in zip(groups.values(), val_counts, test_counts):
        shuffled = [members[i] for i in rng.permutation(len(members))]
        val.extend(shuffled[:n_v])
        test.extend(shuffled[n_v : n_v + n_t])
        train.extend(shuffled[n_v + n_t :])
    return train, val, test


def shuffle_split(n: int, test_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """The (train, test) positions of scikit-learn's ``train_test_split(..., test_size, random_state=seed)``
    without ``stratify`` (its ``ShuffleSplit`` rule), reimplemented so that no split depends on sklearn.

    The rule (``sklearn/model_selection/_split.py``, ``_validate_shuffle_split`` and
    ``ShuffleSplit._iter_indices``, read in scikit-learn 1.9.1): an integer ``test_size`` is the
    test count, a float one ``ceil(test_size * n)``; train is the other ``n - n_test``. One permutation
    ``numpy.random.RandomState(seed).permutation(n)`` is drawn; test is its first ``n_test`` positions
    and train the rest, both in permutation order (the order sklearn returns the rows in).

    Raises:
        ValueError: ``test_size`` is not a count in 1..n-1 or a fraction in (0, 1), or leaves train empty.
    """
    n_test = _part_count(test_size, n, "test_size", math.ceil)
    if isinstance(test_size, (int, np.integer)) and not 0 < n_test < n:
        raise ValueError(f"an int test_size must be in 1..{n - 1} for {n} samples, got {n_test}")
    if n - n_test <= 0:
        raise ValueError(f"test_size {test_size} of {n} samples leaves train empty")
    permutation = np.random.RandomState(seed).permutation(n)
    return [int(i) for i in permutation[n_test:]], [int(i) for i in permutation[:n_test]]


def _part_count(size: int | float, n: int, name: str, rounding) -> int:
    """How many of ``n`` rows sklearn gives a part sized ``size``: an int is the count, a float in (0, 1)
    the fraction ``rounding(size * n)`` (``ceil`` for test_size, ``floor`` for train_size)."""
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be an int or a float, got {size!r}")
    if isinstance(size, (float, np.floating)):
        if not 0 < size < 1:
            raise ValueError(f"a float {name} must be in (0, 1), got {size}")
        return rounding(size * n)
    return int(size)


def train_test_split_ids(ids: Sequence[str], test_size: int | float, seed: int) -> tuple[list[str], list[str]]:
    """``train_test_split(ids, test_size=test_size, random_state=seed)`` of scikit-learn (no stratify):
    ``(train, test)`` in sklearn's order; see :func:`shuffle_split`. The result depends on the order of
    ``ids``, which must be the order of the rows the reference code split."""
    train, test = shuffle_split(len(ids), test_size, seed)
    return [ids[i] for i in train], [ids[i] for i in test]


def train_size_split(n: int, train_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """The (train, test) positions of scikit-learn's ``train_test_split(..., train_size=train_size,
    random_state=seed)`` with no ``test_size`` and no ``stratify`` (MGCA's COVIDx call).

    sklearn's rule (``_validate_shuffle_split``, read in scikit-learn 1.9.1; the same since 0.21): a float
    ``train_size`` gives ``floor(train_size * n)`` train rows, an integer one that count, and test is the
    other ``n - n_train``; then :func:`shuffle_split` with that integer test count (test = the first
    ``n_test`` positions of ``RandomState(seed).permutation(n)``, train the rest, in permutation order).

    Raises:
        ValueError: ``train_size`` is not a count in 1..n-1 or a fraction in (0, 1) leaving both parts non-empty.
    """
    n_train = _part_count(train_size, n, "train_size", math.floor)
    if not 0 < n_train < n:
        raise ValueError(f"train_size {train_size} of {n} samples gives {n_train} train rows; need 1..{n - 1}")
    return shuffle_split(n, n - n_train, seed)


def train_size_split_ids(ids: Sequence[str], train_size: int | float, seed: int) -> tuple[list[str], list[str]]:
    """``train_test_split(ids, train_size=train_size, random_state=seed)``: ``(train, test)`` in sklearn's
    order; see :func:`train_size_split`. The ids must be in the row order the reference code split."""
    train, test = train_size_split(len(ids), train_size, seed)
    return [ids[i] for i in train], [ids[i] for i in test]


def mgca_fraction_subsets(train: Sequence[str]) -> dict[str, list[str]]:
    """``{"train_10pct": ..., "train_1pct": ...}``: MGCA's linear-classification training subsets of
    ``train``, ``df.sample(frac=0.1 / 0.01, random_state=42)`` over the rows of MGCA's training CSV
    (HKU-MedAI/MGCA mgca/datasets/classification_dataset.py:52-53, 165-166, 208-209), computed by
    :func:`vlpbench.protocols.linear.mgca_fraction`. ``train`` must be in that CSV's row order.

    The two are separate draws (one per run, ``--data_pct``), but both take the first
    ``round(frac * n)`` positions of the same ``RandomState(42).permutation(n)``, so 1 % ⊂ 10 % holds.
    """
    # Imported here: the protocol module pulls in torch, which the split readers otherwise do without.
    from vlpbench.protocols.linear import mgca_fraction

    ids = list(train)
    return {"train_10pct": mgca_fraction(ids, 0.1), "train_1pct": mgca_fraction(ids, 0.01)}


def _split_csv(part_ids: Sequence[str], labels: dict[str, dict[str, int]], columns: Sequence[str]) -> bytes:
    rows = "".join(
        ",".join([image_id, *(str(int(labels[image_id][c])) for c in columns)]) + "\n" for image_id in sorted(part_ids)
    )
    return (",".join(["image_id", *columns]) + "\n" + rows).encode()


def write_split(
    out_dir: str | Path,
    *,
    dataset: str,
    version: str,
    parts: dict[str, Sequence[str]],
    labels: dict[str, dict[str, int]],
    columns: Sequence[str],
    generator: str,
    seed: int,
    fractions: dict[str, float],
    source: dict,
    reference: dict | None = None,
) -> dict:
    """Write one CSV per part (``image_id`` + one integer column per label, sorted by id, LF) and
    ``MANIFEST.json``; return the manifest.

    ``labels[image_id][column]`` is an integer (0/1 for binary or multi-label tasks, a class index for
    multi-class ones). Nothing written depends on time or installed versions, so the same inputs
    always give byte-identical files. ``reference`` (a split version that reproduces a published
    reference split: its repository, commit, file, rule and what differs) is written to the manifest
    under ``"reference"`` where given.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for part, part_ids in parts.items():
        data = _split_csv(part_ids, labels, columns)
        name = f"{part}.csv"
        if len(data) > COMPRESS_ABOVE:
            # Large parts (CheXpert train: 185k paths) are stored gzipped; mtime 0 keeps the bytes
            # reproducible, and the manifest hashes the CSV content, not the compressed stream.
            name += ".gz"
            (out_dir / name).write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
        else:
            (out_dir / name).write_bytes(data)
        positives = {c: sum(int(labels[i][c] == 1) for i in part_ids) for c in columns}
        files[name] = {
            "sha256": _sha256(data),
            "rows": len(part_ids),
            # One label column: a plain count (as SIIM v1 has always had); several: per column.
            "positives": positives[columns[0]] if len(columns) == 1 else positives,
        }
    manifest = {
        "dataset": dataset,
        "version": version,
        "generator": generator,
        "seed": seed,
        "fractions": fractions,
        "source": source,
        "files": files,
    }
    if reference is not None:
        manifest["reference"] = reference
    (out_dir / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n", newline="\n")
    return manifest


def multilabel_subset(ids: Sequence[str], labels: dict[str, dict[str, int]], columns: Sequence[str],
                      size: int, seed: int) -> list[str]:
    """A seeded random subset of ``size`` ids in which every class keeps at least one positive where
    ``size`` allows (rarest class first), the rest drawn uniformly. Returned in ``ids`` order."""
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    chosen: set[str] = set()
    counts = {c: sum(int(labels[i][c] == 1) for i in ids) for c in columns}
    for column in sorted(columns, key=lambda c: (counts[c], c)):
        if len(chosen) >= size:
            break
        if counts[column] and not any(labels[i][column] == 1 for i in chosen):
            chosen.add(next(i for i in order if labels[i][column] == 1))
    for image_id in order:
        if len(chosen) >= size:
            break
        chosen.add(image_id)
    return [i for i in ids if i in chosen]


def generate_siim_v1(out_dir: str | Path) -> dict:
    """Write SIIM split v1 from the real stage-2 label file shipped in torchxrayvision.

    Labels are per image (pneumothorax = any mask row), never per CSV row. The 12,047 images are
    split 70/15/15 (8,433 / 1,807 / 1,807) stratified with seed :data:`SEED`; then 10 % of train
    (843) is drawn, stratified, and the 1 % subset (84) is drawn from the 10 % subset. Writes
    ``train.csv``, ``val.csv``, ``test.csv``, ``train_1pct.csv``, ``train_10pct.csv`` (columns
    ``image_id,pneumothorax``, sorted by image_id, LF) and ``MANIFEST.json``. Nothing in the
    output depends on time or installed versions, so regeneration is byte-identical.

    Returns:
        The manifest (also written to ``MANIFEST.json``).
    """
    source = xrv_data_file(SIIM_RLE)
    rows = read_labels(source)
    label = {image_id: int(masks[0] != EMPTY) for image_id, masks in rows.items()}
    ids = list(label)
    train, val, test = stratified_split(ids, [label[i] for i in ids], FRACTIONS, seed=SEED)
    train_10, train_1 = nested_subsets(train, label, SEED)
    return write_split(
        out_dir,
        dataset="siim",
        version="v1",
        parts={"train": train, "val": val, "test": test, "train_1pct": train_1, "train_10pct": train_10},
        labels={image_id: {SIIM_LABEL: y} for image_id, y in label.items()},
        columns=[SIIM_LABEL],
        generator="vlpbench.data.splits:generate_siim_v1",
        seed=SEED,
        fractions={"train": FRACTIONS[0], "val": FRACTIONS[1], "test": FRACTIONS[2],
                   "train_10pct": 0.1, "train_1pct": 0.01},
        source={
            "package": "torchxrayvision",
            "file": source.name,
            "sha256": _sha256(gzip.decompress(source.read_bytes())),
            "n_rows": sum(len(masks) for masks in rows.values()),
            "n_images": len(rows),
        },
    )


@dataclass(frozen=True)
class Split:
    """A loaded, hash-verified split version. Build it with :func:`load_split`."""

    dataset: str
    version: str
    manifest: dict = field(repr=False)
    manifest_sha256: str
    columns: tuple[str, ...]
    _labels: dict[str, dict[str, tuple[int, ...]]] = field(repr=False)
    _sha256: dict[str, str] = field(repr=False)

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts this version has (usually train, val, test, train_1pct, train_10pct)."""
        return tuple(self._labels)

    def _part(self, part: str) -> dict[str, tuple[int, ...]]:
        if part not in self._labels:
            raise ConfigError(f"split {self.dataset}/{self.version} has no part {part!r}; "
                              f"choose one of {', '.join(self._labels)}")
        return self._labels[part]

    def ids(self, part: str) -> list[str]:
        """The image ids of ``part`` (train, val, test, train_1pct, train_10pct), in file order."""
        return list(self._part(part))

    def labels(self, part: str, column: str | None = None) -> dict[str, int]:
        """``{image_id: label}`` for ``part`` and one label column (default: the first)."""
        index = self.columns.index(column) if column is not None else 0
        return {image_id: values[index] for image_id, values in self._part(part).items()}

    def label_table(self, part: str) -> dict[str, dict[str, int]]:
        """``{image_id: {column: label}}`` for ``part``, every label column."""
        return {i: dict(zip(self.columns, values)) for i, values in self._part(part).items()}

    def sha256(self, part: str) -> str:
        """The sha256 of the part's CSV file, as verified against the manifest."""
        self._part(part)
        return self._sha256[part]

    @staticmethod
    def part_for_fraction(fraction: float) -> str:
        """The training part for a data fraction: 0.01 → train_1pct, 0.1 → train_10pct, 1.0 → train."""
        for allowed, part in SUBSET_FRACTIONS.items():
            if math.isclose(fraction, allowed):
                return part
        raise ConfigError(f"data fraction {fraction} has no split; allowed: {', '.join(map(str, SUBSET_FRACTIONS))}")


def _read_part(path: Path, data: bytes) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    lines = data.decode("utf-8").splitlines()
    header = lines[0].split(",") if lines else []
    if len(header) < 2 or header[0] != "image_id":
        raise DataError(f"{path}: expected a header 'image_id,<label>[,<label>...]'")
    labels = {}
    for number, line in enumerate(lines[1:], start=2):
        # Ids may contain commas (CheXpert paths do not, COVIDx names might): labels are parsed from the right.
        fields = line.rsplit(",", len(header) - 1)
        try:
            values = tuple(int(v) for v in fields[1:])
        except ValueError:
            values = ()
        if len(fields) != len(header) or not fields[0] or len(values) != len(header) - 1:
            raise DataError(f"{path} line {number}: expected '<image_id>' and {len(header) - 1} integer "
                            f"label(s), found {line!r}")
        labels[fields[0]] = values
    return tuple(header[1:]), labels


def load_split(dataset: str, version: str = "v1", *, root: str | Path | None = None) -> Split:
    """Load ``<root>/<dataset>/<version>/`` (root defaults to the package's ``splits/`` folder).

    Every part file is checked against the sha256 in ``MANIFEST.json``.

    Raises:
        ConfigError: no such dataset or version (the message lists what exists).
        DataError: the manifest or a part file is missing or malformed, or a file was edited.
    """
    root = Path(root) if root is not None else SPLITS_DIR
    folder = root / dataset / version
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        available = sorted(str(p.parent.relative_to(root)) for p in root.glob(f"*/*/{MANIFEST}"))
        raise ConfigError(f"no split {dataset}/{version} in {root}; available: {', '.join(available) or 'none'}")
    manifest_bytes = manifest_path.read_bytes()
    try:
        manifest = json.loads(manifest_bytes)
        listed = {name.removesuffix(".gz").removesuffix(".csv"): (name, info["sha256"])
                  for name, info in manifest["files"].items()}
        # Canonical part order first (train, val, test, subsets), then any other part.
        expected = {part: listed[part] for part in (*PARTS, *sorted(listed)) if part in listed}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest_path}: malformed manifest ({type(exc).__name__}: {exc})") from exc
    if (manifest.get("dataset"), manifest.get("version")) != (dataset, version):
        raise DataError(
            f"{manifest_path} describes {manifest.get('dataset')}/{manifest.get('version')}, not {dataset}/{version}"
        )

    labels = {}
    columns: tuple[str, ...] = ()
    for part, (name, sha256) in expected.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"split file {path} is missing (listed in {manifest_path})")
        data = path.read_bytes()
        if name.endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as exc:
                raise DataError(f"split file {path} is not a readable gzip file: {exc}") from exc
        if _sha256(data) != sha256:
            raise DataError(
                f"split file {path} was edited: its sha256 {_sha256(data)} differs from {sha256} in "
                f"{manifest_path}; split files are immutable, restore it (git checkout) or make a new version"
            )
        columns, labels[part] = _read_part(path, data)
    return Split(dataset, version, manifest, _sha256(manifest_bytes), columns, labels,
                 {part: sha256 for part, (_, sha256) in expected.items()})


def derived_split(dataset: str, version: str, *, sources: Sequence[str | Path],
                  build: Callable[[Path, str], dict]) -> Split:
    """A split derived from the user's own files (where no label file ships to commit one from).

    ``build(out_dir, version)`` writes the split with :func:`write_split`, under the version name it is
    given (``<version>-<hash>``), which the loader checks against the folder. It runs once per distinct content
    of ``sources`` (the user's label/list files): the result lives in
    ``<cache>/splits/<dataset>/<version>-<sha256 of the sources, 12 hex>/`` and is reused, so the same
    user files always give the same split, and changed files give a new folder, never an edit.
    """
    digest = hashlib.sha256()
    for source in sources:
        digest.update(Path(source).name.encode() + b"\0" + _sha256(Path(source).read_bytes()).encode())
    key = f"{version}-{digest.hexdigest()[:12]}"
    root = cache_dir() / "splits"
    folder = root / dataset / key
    if not (folder / MANIFEST).is_file():
        # Built beside the target and renamed, so a crash or a concurrent run never leaves half a split;
        # where another process finished first, its split is identical and kept.
        with staged_folder(folder) as staging:
            build(staging, key)
    return load_split(dataset, key, root=root)


def evaluation_split(dataset: str, source, version: str = "v1") -> Split:
    """The split of an evaluation-only dataset: one part, ``test``, holding ``source.image_ids`` with
    the label columns of ``source.labels(id)``; cached by the sha256 of ``source.label_file``."""
    ids = list(source.image_ids)
    if not ids:
        raise DataError(f"{source.label_file}: no images listed")

    def build(out_dir: Path, key: str) -> dict:
        labels = {image_id: source.labels(image_id) for image_id in ids}
        return write_split(out_dir, dataset=dataset, version=key, parts={"test": ids}, labels=labels,
                           columns=list(labels[ids[0]]), generator="vlpbench.data.splits:evaluation_split",
                           seed=SEED, fractions={"test": 1.0}, source={"file": Path(source.label_file).name})

    return derived_split(dataset, version, sources=[source.label_file], build=build)


def dataset_split(dataset: str, source, version: str = "v1") -> Split:
    """The split ``version`` of ``dataset`` (as registered in :data:`vlpbench.registry.DATASETS`): the committed
    one, or, where no label file ships to commit one from, the one derived from the user's files (the spec's
    ``derived_splits``), or, for an evaluation-only dataset, :func:`evaluation_split`."""
    from vlpbench.registry import DATASETS, load_target

    spec = DATASETS.get(dataset)
    try:
        return load_split(dataset, version)
    except ConfigError:
        if spec.evaluation_only:
            return evaluation_split(dataset, source, version)
        if version not in spec.derived_splits:
            raise ConfigError(f"dataset {dataset!r} has no split {version} (neither committed nor derivable "
                              "from its files)") from None
        return load_target(spec.derived_splits[version])(source)


def test_part_split(dataset: str, source) -> Split | None:
    """The split holding the test part that ``dataset``'s spec derives from the user's files where its split
    has none (CheXpert: the frontal images of valid.csv), or None where it derives none."""
    from vlpbench.registry import DATASETS, load_target

    spec = DATASETS.get(dataset)
    return load_target(spec.test_split)(source) if spec.test_split else None


test_part_split.__test__ = False  # not a pytest test, wherever a test module imports it


def generators(version: str = "v1") -> dict[str, Callable[[Path], dict]]:
    """``{dataset: regenerate its committed split version}`` for every registered dataset that commits
    ``version`` (default v1; e.g. ``mgca`` and ``medklip`` for RSNA)."""
    from vlpbench.registry import DATASETS, load_target

    return {name: load_target(DATASETS.get(name).split_generators[version]) for name in DATASETS
            if version in DATASETS.get(name).split_generators}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: regenerate a dataset's split files (``python -m vlpbench.data.splits siim``,
    ``python -m vlpbench.data.splits rsna --version mgca``)."""
    from vlpbench.registry import DATASETS

    parser = argparse.ArgumentParser(
        prog="python -m vlpbench.data.splits",
        description="Regenerate committed split files from the real label files (byte-identical).",
    )
    committed = sorted(name for name in DATASETS if DATASETS.get(name).split_generators)
    parser.add_argument("dataset", choices=committed)
    parser.add_argument("--version", default="v1", help="the split version to regenerate (default: v1)")
    parser.add_argument("--out", type=Path, help="output folder (default: splits/<dataset>/<version> in the package)")
    args = parser.parse_args(argv)
    regenerate = generators(args.version)
    if args.dataset not in regenerate:
        known = ", ".join(sorted(DATASETS.get(args.dataset).split_generators))
        parser.error(f"dataset {args.dataset} commits no split {args.version!r}; it commits: {known}")
    out = args.out or SPLITS_DIR / args.dataset / args.version
    manifest = regenerate[args.dataset](out)
    for name, info in sorted(manifest["files"].items()):
        print(f"wrote {out / name}: {info['rows']} rows, positives {info['positives']}, sha256 {info['sha256'][:12]}")
    print(f"wrote {out / MANIFEST}")


if __name__ == "__main__":
    main()
