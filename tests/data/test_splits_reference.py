"""Split versions that reproduce published reference splits: RSNA ``mgca`` and ``medklip``, Object-CXR ``mgca``.

The committed RSNA versions must regenerate byte-identically from the stage-2 label file shipped in
torchxrayvision, and MGCA's must equal what scikit-learn's ``train_test_split`` gives on MGCA's rows (where
scikit-learn and pandas are installed: they are the independent reference, never used by vlpbench itself).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pytest

from vlpbench.data.object_cxr import ObjectCxrSource, build_split_mgca, split_mgca
from vlpbench.data.rsna import (
    MEDKLIP_COMMIT,
    MEDKLIP_TEST_FILE,
    MEDKLIP_TEST_IDS,
    MEDKLIP_TEST_SHA256,
    RSNA_LABELS,
    _read_bytes,
    generate_split_medklip,
    generate_split_mgca,
    read_labels,
)
from vlpbench.data.splits import (PARTS, dataset_split, load_split, main, read_id_list, shuffle_split,
                                  train_test_split_ids)
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.errors import DataError
from vlpbench.registry import DATASETS
from vlpbench.splits import SPLITS_DIR
from vlpbench.testing.clones import file_at_commit

SIZES = {"train": 16010, "val": 5337, "test": 5337, "train_1pct": 160, "train_10pct": 1601}


@pytest.fixture(scope="module")
def stage2():
    """``{patientId: Target}`` of the shipped stage-2 label file."""
    return {patient: int(bool(boxes)) for patient, boxes in read_labels(xrv_data_file(RSNA_LABELS)).items()}


def _positives(split, part):
    return sum(split.labels(part).values())


def _assert_regenerates(generate, version, tmp_path):
    manifest = generate(tmp_path)
    committed = SPLITS_DIR / "rsna" / version
    assert sorted(p.name for p in committed.iterdir()) == sorted(p.name for p in tmp_path.iterdir())
    for path in sorted(committed.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    return manifest


def _assert_well_formed(split, stage2):
    train, val, test = (set(split.ids(p)) for p in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(stage2)
    assert set(split.ids("train_1pct")) < set(split.ids("train_10pct")) < train
    for part in PARTS:
        assert all(stage2[i] == y for i, y in split.labels(part).items())


# --- sklearn's ShuffleSplit rule -----------------------------------------------------------------------------

@pytest.mark.parametrize("n, test_size, seed", [(10, 3, 0), (10, 0.25, 1), (26684, 10674, 0), (10674, 0.5, 0),
                                                (8000, 0.1, 0), (7, 0.5, 42), (101, 0.33, 7)])
def test_shuffle_split_matches_sklearn(n, test_size, seed):
    model_selection = pytest.importorskip("sklearn.model_selection")
    train, test = shuffle_split(n, test_size, seed)
    want_train, want_test = model_selection.train_test_split(np.arange(n), test_size=test_size, random_state=seed)
    assert train == want_train.tolist() and test == want_test.tolist()


def test_shuffle_split_rule_without_sklearn():
    train, test = shuffle_split(10, 0.25, 0)
    permutation = np.random.RandomState(0).permutation(10).tolist()
    assert test == permutation[:3] and train == permutation[3:]  # ceil(2.5) = 3 test rows
    assert train_test_split_ids(list("abcdefghij"), 3, 0) == ([list("abcdefghij")[i] for i in permutation[3:]],
                                                            [list("abcdefghij")[i] for i in permutation[:3]])
    for bad in (0, 10, 1.0, 0.0, True, "3"):
        with pytest.raises(ValueError):
            shuffle_split(10, bad, 0)


# --- RSNA mgca ----------------------------------------------------------------------------------------------

def test_rsna_mgca_sizes_positives_and_parts(stage2):
    split = load_split("rsna", "mgca")
    assert {p: len(split.ids(p)) for p in PARTS} == SIZES
    assert {p: _positives(split, p) for p in PARTS} == {"train": 3579, "val": 1182, "test": 1251,
                                                         "train_1pct": 36, "train_10pct": 358}
    _assert_well_formed(split, stage2)
    reference = split.manifest["reference"]
    assert reference["repository"] == "HKU-MedAI/MGCA" and reference["identical"] == ["train", "val", "test"]
    assert set(reference["differs"]) == {"train_10pct", "train_1pct"}


def test_rsna_mgca_regenerates_byte_identically(tmp_path):
    manifest = _assert_regenerates(generate_split_mgca, "mgca", tmp_path)
    assert manifest["generator"] == "vlpbench.data.rsna:generate_split_mgca"


def test_rsna_mgca_is_sklearn_train_test_split_of_mgca_rows():
    """MGCA's prepare_detection_data (mgca/preprocess/rsna.py:98-113) rebuilt with pandas and sklearn."""
    pd = pytest.importorskip("pandas")
    model_selection = pytest.importorskip("sklearn.model_selection")
    df = pd.read_csv(io.BytesIO(_read_bytes(xrv_data_file(RSNA_LABELS))))
    # One row per patient in pandas' group order; Target 1 where any row has a box.
    df = df.groupby("patientId")["Target"].max().reset_index()
    train_df, test_val_df = model_selection.train_test_split(df, test_size=5337 * 2, random_state=0)
    test_df, valid_df = model_selection.train_test_split(test_val_df, test_size=0.5, random_state=0)
    split = load_split("rsna", "mgca")
    for part, frame in (("train", train_df), ("val", valid_df), ("test", test_df)):
        assert sorted(frame["patientId"]) == split.ids(part), part
        assert int(frame["Target"].sum()) == _positives(split, part)
    assert int(test_df["Target"].sum()) == 1251


def test_rsna_mgca_differs_from_v1():
    mgca, v1 = load_split("rsna", "mgca"), load_split("rsna", "v1")
    assert len(set(mgca.ids("test")) & set(v1.ids("test"))) == 1073  # chance overlap (audit: 1,073)


# --- RSNA medklip -------------------------------------------------------------------------------------------

def test_rsna_medklip_sizes_positives_and_parts(stage2):
    split = load_split("rsna", "medklip")
    assert {p: len(split.ids(p)) for p in PARTS} == SIZES
    assert _positives(split, "test") == 1218 and _positives(split, "val") == 1199
    _assert_well_formed(split, stage2)
    listed = read_id_list(MEDKLIP_TEST_IDS)
    assert len(listed) == 5337 and sorted(listed) == split.ids("test")
    # val is stratified: its positive rate is the rate of the patients outside the list, within one.
    listed_set = set(listed)
    pool = {i: y for i, y in stage2.items() if i not in listed_set}
    assert abs(_positives(split, "val") - 5337 * sum(pool.values()) / len(pool)) <= 1
    reference = split.manifest["reference"]
    assert (reference["commit"], reference["file"], reference["sha256"]) == (
        MEDKLIP_COMMIT, MEDKLIP_TEST_FILE, MEDKLIP_TEST_SHA256)
    assert split.manifest["source"]["test_ids"]["sha256"] == hashlib.sha256(MEDKLIP_TEST_IDS.read_bytes()).hexdigest()


def test_rsna_medklip_regenerates_byte_identically(tmp_path):
    manifest = _assert_regenerates(generate_split_medklip, "medklip", tmp_path)
    assert manifest["generator"] == "vlpbench.data.rsna:generate_split_medklip"


def test_rsna_medklip_list_is_medklips_file(stage2):
    """Where a clone of MedKLIP is at hand: the committed ids are its test.csv ID column, row for row, and
    its classes column is the stage-2 Target (boxes too)."""
    data = file_at_commit("VLPBENCH_MEDKLIP_REPO", MEDKLIP_COMMIT, MEDKLIP_TEST_FILE)
    if data is None:
        pytest.skip("no MedKLIP clone (set VLPBENCH_MEDKLIP_REPO)")
    assert hashlib.sha256(data).hexdigest() == MEDKLIP_TEST_SHA256
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    assert [row["ID"] for row in rows] == read_id_list(MEDKLIP_TEST_IDS)
    assert all(int(row["classes"]) == stage2[row["ID"]] for row in rows)
    boxes = read_labels(xrv_data_file(RSNA_LABELS))
    for row in rows:
        if row["classes"] == "1":
            listed = sorted(tuple(float(v) for v in box.split(";")) for box in row["boxes"].split("|"))
            assert listed == sorted(boxes[row["ID"]])


def test_medklip_id_list_errors(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("image_id\na\nb\na\n")
    with pytest.raises(DataError, match="repeated"):
        read_id_list(path)
    path.write_text("ID\na\n")
    with pytest.raises(DataError, match="header"):
        read_id_list(path)


# --- registry and command line ------------------------------------------------------------------------------

def test_registered_and_regenerable_from_the_command_line(tmp_path, capsys):
    spec = DATASETS.get("rsna")
    assert {"v1", "mgca", "medklip"} <= set(spec.split_generators)
    assert "mgca" in DATASETS.get("object_cxr").derived_splits
    main(["rsna", "--version", "mgca", "--out", str(tmp_path)])
    assert "test.csv: 5337 rows, positives 1251," in capsys.readouterr().out
    assert (tmp_path / "MANIFEST.json").read_bytes() == (SPLITS_DIR / "rsna" / "mgca" / "MANIFEST.json").read_bytes()
    with pytest.raises(SystemExit):
        main(["rsna", "--version", "nope", "--out", str(tmp_path / "x")])
    assert dataset_split("rsna", None, "medklip").manifest_sha256 == load_split("rsna", "medklip").manifest_sha256


# --- Object-CXR mgca ----------------------------------------------------------------------------------------

def _object_cxr_folder(path: Path, n_train: int, n_dev: int) -> Path:
    """Label files only: train.csv rows in shuffled id order (the split follows file order), half positive."""
    rng = np.random.default_rng(3)
    order = rng.permutation(n_train) + 1
    train = "".join(f"{i:05d}.jpg,{'0 1 2 3 4' if i % 2 else ''}\n" for i in order)
    dev = "".join(f"{i:05d}.jpg,{'1 1 2 3 4' if i % 2 else ''}\n" for i in range(n_train + 1, n_train + n_dev + 1))
    path.mkdir(parents=True)
    (path / "train.csv").write_text("image_name,annotation\n" + train)
    (path / "dev.csv").write_text("image_name,annotation\n" + dev)
    return path


def test_object_cxr_mgca_full_size(tmp_path, monkeypatch):
    """8,000 train rows and 1,000 dev rows give MGCA's 7,200 / 800 / 1,000, and sklearn's rows."""
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    source = ObjectCxrSource(_object_cxr_folder(tmp_path / "object-CXR", 8000, 1000))
    split = split_mgca(source)
    assert split.version.startswith("mgca-") and split.columns == ("object",)
    assert {p: len(split.ids(p)) for p in split.parts} == {"train": 7200, "val": 800, "test": 1000,
                                                            "train_1pct": 72, "train_10pct": 720}
    rows = [i for i in source.image_ids if source.part(i) == "train"]
    permutation = np.random.RandomState(0).permutation(8000)
    assert split.ids("val") == sorted(rows[i] for i in permutation[:800])
    assert split.ids("train") == sorted(rows[i] for i in permutation[800:])
    assert set(split.ids("train_1pct")) < set(split.ids("train_10pct")) < set(split.ids("train"))
    assert all(y == source.label(i) for p in split.parts for i, y in split.labels(p).items())
    assert split.manifest["reference"]["file"] == "mgca/preprocess/object_cxr.py"
    pd = pytest.importorskip("pandas")
    model_selection = pytest.importorskip("sklearn.model_selection")
    frame = pd.read_csv(source.label_files["train"])
    train_df, val_df = model_selection.train_test_split(frame, test_size=0.1, random_state=0)
    assert sorted(train_df["image_name"]) == split.ids("train") and sorted(val_df["image_name"]) == split.ids("val")


def test_object_cxr_mgca_is_cached_and_regenerates(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    source = ObjectCxrSource(_object_cxr_folder(tmp_path / "object-CXR", 40, 6))
    split = dataset_split("object_cxr", source, "mgca")
    assert (len(split.ids("train")), len(split.ids("val")), len(split.ids("test"))) == (36, 4, 6)
    assert math.ceil(0.1 * 40) == 4
    assert split_mgca(ObjectCxrSource(tmp_path / "object-CXR")).manifest_sha256 == split.manifest_sha256
    build_split_mgca(source, tmp_path / "again", split.version)
    folder = tmp_path / "cache" / "splits" / "object_cxr" / split.version
    for path in sorted(folder.iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes()
    assert split.ids("train") != dataset_split("object_cxr", source, "v1").ids("train")
