"""MGCA's linear-classification splits with MGCA's own 1 % / 10 % subsets: RSNA ``mgca_cls`` and CheXpert
``mgca`` (committed, from the label files torchxrayvision ships) and COVIDx ``mgca`` (derived from the user's
files).

The references are pandas and scikit-learn doing what MGCA's preprocessing (HKU-MedAI/MGCA @ 680fe4a,
mgca/preprocess/{rsna,covidx,chexpert}.py) and its datasets (mgca/datasets/classification_dataset.py) do, written
out here; vlpbench itself uses neither. The tests that need them skip where they are not installed.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from vlpbench.data.chexpert import COMPETITION_5, CHEXPERT_TRAIN, generate_split_mgca, mgca_parts, shipped_table
from vlpbench.data.covidx import CovidxSource, build_split_mgca, split_mgca
from vlpbench.data.rsna import RSNA_LABELS, _read_bytes, generate_split_mgca_cls, read_labels
from vlpbench.data.splits import (dataset_split, load_split, main, mgca_fraction_subsets, train_size_split,
                                  train_size_split_ids)
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.protocols.linear import mgca_fraction
from vlpbench.registry import DATASETS
from vlpbench.splits import SPLITS_DIR

PARTS = ("train", "val", "test", "train_1pct", "train_10pct")


def _sizes(split):
    return {part: len(split.ids(part)) for part in split.parts}


def _assert_regenerates(generate, dataset, version, tmp_path):
    manifest = generate(tmp_path)
    committed = SPLITS_DIR / dataset / version
    assert sorted(p.name for p in committed.iterdir()) == sorted(p.name for p in tmp_path.iterdir())
    for path in sorted(committed.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    return manifest


def _resampled(frame, pd, tmp_path, name):
    """MGCA's dataset side: the train CSV written by the preprocessing and read back (a fresh RangeIndex),
    then ``df.sample(frac, random_state=42)`` for 10 % and 1 % (classification_dataset.py:52-53, 165-166, 208-209)."""
    path = tmp_path / f"{name}.csv"
    frame.to_csv(path, index=False)
    again = pd.read_csv(path, keep_default_na=False)
    return again, {frac: again.sample(frac=frac, random_state=42) for frac in (0.1, 0.01)}


# --- sklearn's train_size rule and MGCA's df.sample subsets ----------------------------------------------------

@pytest.mark.parametrize("n, train_size, seed", [(10, 0.8, 0), (30130, 0.8, 0), (7, 0.5, 1), (101, 0.33, 7),
                                                 (10, 6, 0), (2, 0.8, 3), (1999, 0.8, 0)])
def test_train_size_split_matches_sklearn(n, train_size, seed):
    model_selection = pytest.importorskip("sklearn.model_selection")
    train, test = train_size_split(n, train_size, seed)
    want_train, want_test = model_selection.train_test_split(np.arange(n), train_size=train_size, random_state=seed)
    assert train == want_train.tolist() and test == want_test.tolist()


def test_train_size_split_rule_without_sklearn():
    train, test = train_size_split(10, 0.75, 0)  # floor(7.5) = 7 train rows, 3 test
    permutation = np.random.RandomState(0).permutation(10).tolist()
    assert test == permutation[:3] and train == permutation[3:]
    ids = list("abcdefghij")
    assert train_size_split_ids(ids, 0.75, 0) == ([ids[i] for i in permutation[3:]], [ids[i] for i in permutation[:3]])
    assert len(train_size_split(30130, 0.8, 0)[1]) == 6026
    for bad in (0, 10, 1.0, 0.0, True, "3", 0.05):  # 0.05 of 10 leaves train empty
        with pytest.raises(ValueError):
            train_size_split(10, bad, 0)


def test_mgca_subsets_are_pandas_sample_and_nested():
    ids = [f"r{k}" for k in np.random.default_rng(1).permutation(24104)]
    subsets = mgca_fraction_subsets(ids)
    assert subsets == {"train_10pct": mgca_fraction(ids, 0.1), "train_1pct": mgca_fraction(ids, 0.01)}
    assert (len(subsets["train_10pct"]), len(subsets["train_1pct"])) == (2410, 241)
    # Two separate draws, but prefixes of the same RandomState(42).permutation(n): nested.
    assert subsets["train_1pct"] == subsets["train_10pct"][:241]
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"id": ids})
    for part, frac in (("train_10pct", 0.1), ("train_1pct", 0.01)):
        assert frame.sample(frac=frac, random_state=42)["id"].tolist() == subsets[part]


# --- RSNA mgca_cls --------------------------------------------------------------------------------------------

RSNA_SIZES = {"train": 18678, "val": 4003, "test": 4003, "train_1pct": 187, "train_10pct": 1868}
RSNA_POSITIVES = {"train": 4162, "val": 928, "test": 922, "train_1pct": 36, "train_10pct": 414}


@pytest.fixture(scope="module")
def stage2():
    return {patient: int(bool(boxes)) for patient, boxes in read_labels(xrv_data_file(RSNA_LABELS)).items()}


def test_rsna_mgca_cls_sizes_positives_and_parts(stage2):
    split = load_split("rsna", "mgca_cls")
    assert _sizes(split) == RSNA_SIZES
    assert {p: sum(split.labels(p).values()) for p in PARTS} == RSNA_POSITIVES
    train, val, test = (set(split.ids(p)) for p in ("train", "val", "test"))
    assert not (train & val or train & test or val & test) and train | val | test == set(stage2)
    assert set(split.ids("train_1pct")) < set(split.ids("train_10pct")) < train
    assert all(stage2[i] == y for p in PARTS for i, y in split.labels(p).items())
    reference = split.manifest["reference"]
    assert (reference["file"], reference["lines"], reference["differs"]) == ("mgca/preprocess/rsna.py", "22-64", {})
    assert set(reference["identical"]) == set(PARTS)
    # Not the detection split (mgca) nor v1: another draw with other sizes.
    assert len(set(split.ids("test")) & set(load_split("rsna", "mgca").ids("test"))) < 4003


def test_rsna_mgca_cls_regenerates_byte_identically(tmp_path):
    manifest = _assert_regenerates(generate_split_mgca_cls, "rsna", "mgca_cls", tmp_path)
    assert manifest["generator"] == "vlpbench.data.rsna:generate_split_mgca_cls"


def test_rsna_mgca_cls_is_mgcas_preprocessing_and_sample(tmp_path):
    """preprocess_rsna_data (mgca/preprocess/rsna.py:22-64) and RSNAImageDataset (classification_dataset.py:
    142-166) rebuilt with pandas and sklearn on the shipped stage-2 file."""
    pd = pytest.importorskip("pandas")
    model_selection = pytest.importorskip("sklearn.model_selection")
    df = pd.read_csv(io.BytesIO(_read_bytes(xrv_data_file(RSNA_LABELS))))
    df["bbox"] = df.apply(lambda row: 0 if row["Target"] == 0 else [row["x"], row["y"]], axis=1)
    df = df[["patientId", "bbox"]].groupby("patientId").agg(list).reset_index()
    df["Target"] = df["bbox"].apply(lambda boxes: 0 if boxes == [0] else 1)
    df = df[["patientId", "Target"]]
    train_df, test_val_df = model_selection.train_test_split(df, test_size=0.15 * 2, random_state=0)
    test_df, valid_df = model_selection.train_test_split(test_val_df, test_size=0.5, random_state=0)
    _, sampled = _resampled(train_df, pd, tmp_path, "rsna_train")
    split = load_split("rsna", "mgca_cls")
    frames = {"train": train_df, "val": valid_df, "test": test_df,
              "train_10pct": sampled[0.1], "train_1pct": sampled[0.01]}
    for part, frame in frames.items():
        assert sorted(frame["patientId"]) == split.ids(part), part
        assert dict(zip(frame["patientId"], frame["Target"].astype(int))) == split.labels(part), part


def test_rsna_mgca_cls_registered_and_regenerable_from_the_command_line(tmp_path, capsys):
    assert DATASETS.get("rsna").split_generators["mgca_cls"] == "vlpbench.data.rsna:generate_split_mgca_cls"
    main(["rsna", "--version", "mgca_cls", "--out", str(tmp_path)])
    assert "train_1pct.csv: 187 rows, positives 36," in capsys.readouterr().out
    committed = SPLITS_DIR / "rsna" / "mgca_cls" / "MANIFEST.json"
    assert (tmp_path / "MANIFEST.json").read_bytes() == committed.read_bytes()
    assert dataset_split("rsna", None, "mgca_cls").manifest_sha256 == load_split("rsna", "mgca_cls").manifest_sha256


# --- COVIDx mgca ----------------------------------------------------------------------------------------------

COVIDX_CLASSES = ("normal", "pneumonia", "COVID-19")


def _covidx_folder(path, n_train, n_test, *, version="9A", seed=5):
    """Label files only: classes mixed in a shuffled line order (the split follows the file's line order)."""
    rng = np.random.default_rng(seed)
    classes = rng.choice(3, n_train + n_test, p=[0.27, 0.18, 0.55])
    lines = [f"p{k} img{k:05d}.png {COVIDX_CLASSES[c]} rsna\n" for k, c in zip(rng.permutation(n_train), classes)]
    test = [f"t{k} test{k:04d}.png {COVIDX_CLASSES[c]} ricord\n" for k, c in enumerate(classes[n_train:])]
    path.mkdir(parents=True)
    (path / f"train_COVIDx{version}.txt").write_text("".join(lines))
    (path / f"test_COVIDx{version}.txt").write_text("".join(test))
    return path


def test_covidx_mgca_is_mgcas_preprocessing_and_sample(tmp_path, monkeypatch):
    """preprocess_covidx (mgca/preprocess/covidx.py:18-46) and COVIDXImageDataset (classification_dataset.py:
    185-209) rebuilt with pandas and sklearn on a 2,000-line train file."""
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    source = CovidxSource(_covidx_folder(tmp_path / "COVIDx", 2000, 60))
    split = split_mgca(source)
    assert split.version.startswith("mgca-") and split.columns == ("class",)
    assert _sizes(split) == {"train": 1600, "val": 400, "test": 60, "train_1pct": 16, "train_10pct": 160}
    assert set(split.ids("train_1pct")) < set(split.ids("train_10pct")) < set(split.ids("train"))
    assert not set(split.ids("train")) & set(split.ids("val"))
    assert split.manifest["reference"]["differs"] == {}
    pd = pytest.importorskip("pandas")
    model_selection = pytest.importorskip("sklearn.model_selection")

    def frame(name):
        df = pd.read_csv(source.label_files[name], sep=" ", header=None)
        df.columns = ["patient id", "filename", "class", "data source"]
        df = df.drop(["patient id", "data source"], axis=1)
        df["labels"] = df["class"].apply(lambda x: 0 if x == "normal" else 1 if x == "pneumonia" else 2)
        return df

    train_df, valid_df = model_selection.train_test_split(frame("train"), train_size=0.8, random_state=0)
    _, sampled = _resampled(train_df, pd, tmp_path, "covidx_train")
    frames = {"train": train_df, "val": valid_df, "test": frame("test"),
              "train_10pct": sampled[0.1], "train_1pct": sampled[0.01]}
    for part, expected in frames.items():
        assert sorted(expected["filename"]) == split.ids(part), part
        assert dict(zip(expected["filename"], expected["labels"].astype(int))) == split.labels(part), part


def test_covidx_mgca_full_size_9a(tmp_path, monkeypatch):
    """30,130 train lines and 400 test lines (the 9A sizes) give 24,104 / 6,026 / 400, 2,410 and 241."""
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    source = CovidxSource(_covidx_folder(tmp_path / "COVIDx", 30130, 400))
    split = dataset_split("covidx", source, "mgca")
    assert _sizes(split) == {"train": 24104, "val": 6026, "test": 400, "train_1pct": 241, "train_10pct": 2410}
    pool = [i for i in source.image_ids if source.part(i) == "train"]
    permutation = np.random.RandomState(0).permutation(30130)
    assert split.ids("val") == sorted(pool[k] for k in permutation[:6026])
    train = [pool[k] for k in permutation[6026:]]  # MGCA's train.csv rows, in order
    assert split.ids("train_10pct") == sorted(train[k] for k in np.random.RandomState(42).permutation(24104)[:2410])
    assert split.ids("train_1pct") == sorted(train[k] for k in np.random.RandomState(42).permutation(24104)[:241])
    # Unstratified, unlike v1.
    assert split.ids("val") != dataset_split("covidx", source, "v1").ids("val")


def test_covidx_mgca_on_synthetic_dataset_is_cached_and_regenerates(tmp_path, monkeypatch):
    from vlpbench.synthetic.covidx import synth_covidx

    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    synth_covidx(tmp_path / "synth", 60, 1, size=64, progress=False)
    source = CovidxSource(tmp_path / "synth")
    split = dataset_split("covidx", source, "mgca")
    pool = [i for i in source.image_ids if source.part(i) == "train"]
    n_val = len(pool) - math.floor(0.8 * len(pool))
    assert (len(split.ids("train")), len(split.ids("val"))) == (len(pool) - n_val, n_val)
    assert sorted(split.ids("test")) == sorted(i for i in source.image_ids if source.part(i) == "test")
    assert all(y == source.label(i) for p in split.parts for i, y in split.labels(p).items())
    assert not source.missing(split.ids("train") + split.ids("val") + split.ids("test"))
    assert split_mgca(CovidxSource(tmp_path / "synth")).manifest_sha256 == split.manifest_sha256
    build_split_mgca(source, tmp_path / "again", split.version)
    for path in sorted((tmp_path / "cache" / "splits" / "covidx" / split.version).iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes()
    assert DATASETS.get("covidx").derived_splits["mgca"] == "vlpbench.data.covidx:split_mgca"


def test_covidx_mgca_on_other_files_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    split = split_mgca(CovidxSource(_covidx_folder(tmp_path / "COVIDx", 50, 10, version="8A")))
    assert split.manifest["source"]["covidx_version"] == "8A"
    assert "train_COVIDx8A.txt" in split.manifest["reference"]["differs"]["source"]


# --- CheXpert mgca --------------------------------------------------------------------------------------------

CHEXPERT_SIZES = {"train": 185771, "val": 4284, "train_1pct": 1858, "train_10pct": 18577}


def test_chexpert_mgca_sizes_overlap_and_labels():
    split = load_split("chexpert", "mgca")
    assert _sizes(split) == CHEXPERT_SIZES and split.columns == COMPETITION_5
    train, val = set(split.ids("train")), set(split.ids("val"))
    # MGCA's bug, kept: 4,203 of the 4,284 frontal val images are training images too.
    assert len(train & val) == 4203 == split.manifest["reference"]["overlap"]["val_in_train"]
    assert set(split.ids("train_1pct")) < set(split.ids("train_10pct")) < train
    five_by_200 = set(load_split("chexpert5x200", "v1").ids("test"))
    assert not (train | val) & five_by_200
    v1 = load_split("chexpert", "v1")
    pool = set(v1.ids("train")) | set(v1.ids("val"))  # the frontal images minus the 5x200 set: 190,027
    # The bug's other side: the 4,175 images whose row number (not row) was drawn are in neither part.
    overlap = split.manifest["reference"]["overlap"]
    assert train | val < pool and len(pool - (train | val)) == 4175 == overlap["in_neither"]
    v1_labels = {**v1.labels("train", "Edema"), **v1.labels("val", "Edema")}
    assert all(v1_labels[i] == y for p in split.parts for i, y in split.labels(p, "Edema").items())
    assert "test" not in split.parts and DATASETS.get("chexpert").test_split  # test: the user's valid.csv


def test_chexpert_mgca_regenerates_byte_identically(tmp_path):
    manifest = _assert_regenerates(generate_split_mgca, "chexpert", "mgca", tmp_path)
    assert manifest["generator"] == "vlpbench.data.chexpert:generate_split_mgca"
    assert DATASETS.get("chexpert").split_generators["mgca"] == "vlpbench.data.chexpert:generate_split_mgca"


def test_chexpert_mgca_is_mgcas_preprocessing_and_sample(tmp_path):
    """preprocess_chexpert_data (mgca/preprocess/chexpert.py:5-61) and CheXpertImageDataset
    (classification_dataset.py:27-53) rebuilt with pandas on the shipped train.csv."""
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(xrv_data_file(CHEXPERT_TRAIN))
    # preprocess_chexpert_5x200_data (chexpert.py:8-36): fillna(0), frontal, one-hot over the 13 pathologies.
    others = ["Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia", "Pneumothorax",
              "Pleural Other", "Fracture", "Support Devices"]
    filled = df.copy()  # fillna(0) on the label columns (the text columns do not take part)
    filled[[*COMPETITION_5, *others]] = filled[[*COMPETITION_5, *others]].fillna(0)
    filled = filled[filled["Frontal/Lateral"] == "Frontal"]
    tasks = []
    for task in COMPETITION_5:
        mask = np.ones(len(filled), dtype=bool)
        for column in (*COMPETITION_5, *others):
            mask &= (filled[column] == (1 if column == task else 0)).to_numpy()
        tasks.append(filled[mask].sample(n=200, random_state=0))
    df_200 = pd.concat(tasks)
    df = df[~df["Path"].isin(df_200["Path"])]
    state = np.random.get_state()
    try:
        np.random.seed(0)  # chexpert.py:5, at import
        valid_ids = np.random.choice(len(df), size=5000, replace=False)
    finally:
        np.random.set_state(state)
    valid_df = df.iloc[valid_ids]
    train_df = df.drop(valid_ids, errors="ignore")
    assert (len(train_df), len(valid_df)) == (217433, 5000)
    # The dataset: frontal rows only, then the df.sample subsets of train (classification_dataset.py:48-53).
    train_df = train_df[train_df["Frontal/Lateral"] == "Frontal"]
    valid_df = valid_df[valid_df["Frontal/Lateral"] == "Frontal"]
    split = load_split("chexpert", "mgca")
    frames = {"train": train_df, "val": valid_df, "train_10pct": train_df.sample(frac=0.1, random_state=42),
              "train_1pct": train_df.sample(frac=0.01, random_state=42)}
    mapping = {"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1, "Pleural Effusion": 1}
    for part, frame in frames.items():
        assert sorted(frame["Path"]) == split.ids(part), part
        labels = frame[list(COMPETITION_5)].fillna(0)
        for column in COMPETITION_5:  # CHEXPERT_UNCERTAIN_MAPPINGS (constants.py:60-66)
            labels[column] = labels[column].replace(-1, mapping[column]).astype(int)
        assert dict(zip(frame["Path"], labels["Edema"])) == split.labels(part, "Edema"), part
        assert dict(zip(frame["Path"], labels["Cardiomegaly"])) == split.labels(part, "Cardiomegaly"), part


def test_chexpert_mgca_parts_in_mgca_order():
    parts = mgca_parts(shipped_table())
    table = shipped_table()
    order = {path: row for row, path in enumerate(table.paths)}
    assert [order[i] for i in parts["train"]] == sorted(order[i] for i in parts["train"])  # train.csv order
    assert parts["train_10pct"] == mgca_fraction(parts["train"], 0.1)
    assert parts["train_1pct"] == parts["train_10pct"][:1858]
