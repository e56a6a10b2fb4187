"""Split files: the committed SIIM v1, its byte-identical regeneration, hashing, stratified draws."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from vlpbench.data.siim import read_labels
from vlpbench.data.splits import (
    PARTS,
    apportion,
    load_split,
    main,
    stratified_split,
    stratified_subset,
)
from vlpbench.data.xrv_files import SIIM_RLE, xrv_data_file
from vlpbench.errors import ConfigError, DataError
from vlpbench.splits import SPLITS_DIR

COMMITTED = SPLITS_DIR / "siim" / "v1"


@pytest.fixture(scope="module")
def split():
    """The committed SIIM split v1."""
    return load_split("siim")


def _positives(split, part):
    return sum(split.labels(part).values())


def test_sizes(split):
    sizes = {part: len(split.ids(part)) for part in PARTS}
    assert sizes == {"train": 8433, "val": 1807, "test": 1807, "train_1pct": 84, "train_10pct": 843}
    assert split.dataset == "siim" and split.version == "v1"


def test_parts_are_disjoint_cover_every_image_and_match_the_labels(split):
    train, val, test = (set(split.ids(p)) for p in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    shipped = read_labels(xrv_data_file(SIIM_RLE))
    assert train | val | test == set(shipped)
    for part in ("train", "val", "test"):
        for image_id, label in split.labels(part).items():
            assert label == int(shipped[image_id][0] != "-1")


def test_subsets_are_nested(split):
    train, sub10, sub1 = (set(split.ids(p)) for p in ("train", "train_10pct", "train_1pct"))
    assert sub1 < sub10 < train


def test_stratification_within_one_positive(split):
    all_labels = {**split.labels("train"), **split.labels("val"), **split.labels("test")}
    rate = sum(all_labels.values()) / len(all_labels)
    assert rate == pytest.approx(2669 / 12047)
    for part in ("val", "test"):
        assert abs(_positives(split, part) - len(split.ids(part)) * rate) <= 1
    train_rate = _positives(split, "train") / len(split.ids("train"))
    for part in ("train_10pct", "train_1pct"):
        assert abs(_positives(split, part) - len(split.ids(part)) * train_rate) <= 1
    assert [_positives(split, p) for p in ("val", "test", "train_10pct", "train_1pct")] == [400, 400, 187, 19]


def test_files_are_sorted_with_lf_endings():
    for part in PARTS:
        data = (COMMITTED / f"{part}.csv").read_bytes()
        assert data.startswith(b"image_id,pneumothorax\n") and data.endswith(b"\n") and b"\r" not in data
        ids = [line.split(",")[0] for line in data.decode().splitlines()[1:]]
        assert ids == sorted(ids)


def test_regeneration_is_byte_identical(tmp_path, capsys):
    main(["siim", "--out", str(tmp_path)])
    assert "train_1pct.csv: 84 rows, positives 19," in capsys.readouterr().out
    committed = sorted(p.name for p in COMMITTED.iterdir())
    assert committed == sorted(p.name for p in tmp_path.iterdir())
    for name in committed:
        assert (tmp_path / name).read_bytes() == (COMMITTED / name).read_bytes(), name


def test_manifest_records_hashes_and_source(split):
    manifest = split.manifest
    assert manifest["seed"] == 0 and manifest["generator"] == "vlpbench.data.splits:generate_siim_v1"
    assert manifest["source"]["n_rows"] == 12954 and manifest["source"]["n_images"] == 12047
    for part in PARTS:
        data = (COMMITTED / f"{part}.csv").read_bytes()
        assert split.sha256(part) == hashlib.sha256(data).hexdigest()
        assert manifest["files"][f"{part}.csv"]["rows"] == len(split.ids(part))
    assert split.manifest_sha256 == hashlib.sha256((COMMITTED / "MANIFEST.json").read_bytes()).hexdigest()


def test_edited_file_is_detected(tmp_path):
    shutil.copytree(COMMITTED, tmp_path / "siim" / "v1")
    assert load_split("siim", root=tmp_path).ids("val") == load_split("siim").ids("val")
    path = tmp_path / "siim" / "v1" / "val.csv"
    lines = path.read_text().splitlines(keepends=True)
    image_id, label = lines[1].strip().split(",")
    lines[1] = f"{image_id},{1 - int(label)}\n"
    path.write_text("".join(lines))
    with pytest.raises(DataError, match="split file .*val.csv was edited"):
        load_split("siim", root=tmp_path)


def test_unknown_version_part_and_fraction(split):
    with pytest.raises(ConfigError, match="siim/v1"):
        load_split("siim", "v9")
    with pytest.raises(ConfigError, match="train_1pct"):
        split.ids("holdout")
    assert [split.part_for_fraction(f) for f in (0.01, 0.1, 1.0)] == ["train_1pct", "train_10pct", "train"]
    with pytest.raises(ConfigError, match="allowed: 0.01, 0.1, 1.0"):
        split.part_for_fraction(0.05)


def test_stratified_split_on_small_data():
    ids = [f"id{i:03d}" for i in range(100)]
    labels = [int(i % 5 == 0) for i in range(100)]  # 20 positives
    train, val, test = stratified_split(ids, labels, seed=3)
    assert (len(train), len(val), len(test)) == (70, 15, 15)
    assert sorted(train + val + test) == ids
    positive = set(ids[::5])
    assert [len(positive & set(part)) for part in (train, val, test)] == [14, 3, 3]
    assert stratified_split(list(reversed(ids)), list(reversed(labels)), seed=3) == (train, val, test)
    assert stratified_split(ids, labels, seed=4) != (train, val, test)
    subset = stratified_subset(train, [int(i in positive) for i in train], 0.1, 3)
    assert len(subset) == 7 and len(positive & set(subset)) == 1


def test_apportion():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # remainders .5 < .75 = .75
    assert apportion(1, [1, 1]) == [1, 0]  # ties go to the earlier part
    assert apportion(0, [0, 0]) == [0, 0]
    assert apportion(10, [1, 1], capacity=[2, 20]) == [2, 8]
