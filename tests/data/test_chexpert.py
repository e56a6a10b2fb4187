"""CheXpert: the reader on synthetic and hand-made files, the 5x200 set, split v1, the radiologist
test set, and the synthetic generator."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
from PIL import Image

from vlpbench.data import chexpert
from vlpbench.data.check import check_dataset
from vlpbench.data.chexpert import (
    CHEXPERT_TRAIN,
    COLUMNS,
    COMPETITION_5,
    OBSERVATIONS,
    ChexpertSource,
    ChexpertTestSet,
    apply_policy,
    build_5x200,
    read_label_table,
)
from vlpbench.data.splits import load_split, main
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.errors import DataError
from vlpbench.splits import SPLITS_DIR
from vlpbench.synthetic.chest import blur, lungs, pick_lung, resize_field
from vlpbench.synthetic.chexpert import FINDINGS, draw, finding_fields, synth_chexpert

HEADER = ",".join(COLUMNS)
N, SIZE, SEED = 40, 64, 0


@pytest.fixture(scope="module")
def shipped_lines() -> list[str]:
    """The lines of the real train.csv shipped in torchxrayvision (header first)."""
    return gzip.decompress(xrv_data_file(CHEXPERT_TRAIN).read_bytes()).decode().split("\n")


@pytest.fixture(scope="module")
def table():
    """The shipped train.csv, parsed."""
    return read_label_table(xrv_data_file(CHEXPERT_TRAIN))


@pytest.fixture(scope="module")
def pairs():
    """The 5x200 set built from the shipped train.csv."""
    return build_5x200(xrv_data_file(CHEXPERT_TRAIN))


@pytest.fixture(scope="module")
def split():
    """The committed split chexpert/v1."""
    return load_split("chexpert")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A 40-image synthetic CheXpert-v1.0-small at 64 px, and the generator's summary."""
    out = tmp_path_factory.mktemp("synth") / "chexpert"
    return out, synth_chexpert(out, N, SEED, size=SIZE, progress=False)


def _row(path: str, view: str = "Frontal", **values: str) -> str:
    """A train.csv line with the given observations (others empty)."""
    fields = [path, "Female", "60", view, "AP" if view == "Frontal" else "", *([""] * len(OBSERVATIONS))]
    for name, value in values.items():
        fields[COLUMNS.index(name.replace("_", " "))] = value
    return ",".join(fields)


def _tree(root, rows: list[str], valid: list[str] | None = None, images: bool = True):
    """A hand-made CheXpert-v1.0-small below ``root`` with 8x8 JPEGs for every row."""
    folder = root / "CheXpert-v1.0-small"
    folder.mkdir(parents=True)
    valid = valid if valid is not None else [_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg")]
    for name, lines in (("train.csv", rows), ("valid.csv", valid)):
        (folder / name).write_text(HEADER + "\n" + "".join(f"{line}\n" for line in lines))
        for line in lines if images else []:
            target = folder / line.split(",")[0].split("/", 1)[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), 100, dtype=np.uint8)).save(target, format="JPEG")
    return folder


# ------------------------------------------------------------------ the shipped file and derived sets


def test_shipped_train_csv_is_the_real_one(shipped_lines, table):
    assert shipped_lines[0] == HEADER and shipped_lines[-1] == ""  # LF and a final newline
    assert len(table.paths) == 223414 and int(table.frontal.sum()) == 191027
    effusion = table.values[:, OBSERVATIONS.index("Pleural Effusion")]
    counts = [int((effusion == v).sum()) for v in (1, 0, -1)] + [int(np.isnan(effusion).sum())]
    assert counts == [86187, 35396, 11628, 90203]
    assert table.paths[0] == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"


def test_5x200_reproduces_the_published_instance(shipped_lines, pairs):
    assert len(pairs) == 1000 and len({p for p, _ in pairs}) == 1000
    assert [sum(c == name for _, c in pairs) for name in COMPETITION_5] == [200] * 5
    assert pairs[0] == ("CheXpert-v1.0-small/train/patient38614/study1/view1_frontal.jpg", "Atelectasis")
    rows = {line.split(",")[0]: line.split(",") for line in shipped_lines[1:-1]}
    views = [rows[p][4] for p, _ in pairs]
    assert (views.count("AP"), views.count("PA"), views.count("LL")) == (764, 235, 1)
    for path, name in pairs:
        fields = rows[path]
        assert fields[3] == "Frontal"
        assert {c: fields[COLUMNS.index(c)] or "0.0" for c in chexpert.PATHOLOGIES} == {
            c: "1.0" if c == name else "0.0" for c in chexpert.PATHOLOGIES}


def test_5x200_rule_on_hand_made_rows(tmp_path):
    lines, candidates = [], {name: [] for name in COMPETITION_5}
    for k, name in enumerate(COMPETITION_5):
        key = name.replace(" ", "_")
        for j in range(205):
            path = f"CheXpert-v1.0-small/train/patient{k}{j:04d}/study1/view1_frontal.jpg"
            extra = {"No_Finding": "1.0"} if j % 3 == 0 else {"Pneumonia": "0.0"} if j % 3 == 1 else {}
            lines.append(_row(path, **{key: "1.0"}, **extra))  # empty counts as 0; No Finding is free
            candidates[name].append(path)
        decoy = f"CheXpert-v1.0-small/train/patient9{k}00"
        decoys = [_row(f"{decoy}1/study1/view2_lateral.jpg", "Lateral", **{key: "1.0"}),
                  _row(f"{decoy}2/study1/view1_frontal.jpg", **{key: "1.0", "Fracture": "-1.0"}),
                  _row(f"{decoy}3/study1/view1_frontal.jpg", **{key: "-1.0"}),
                  _row(f"{decoy}4/study1/view1_frontal.jpg", **{key: "1.0", "Support_Devices": "1.0"})]
        lines[len(lines) - 100 : len(lines) - 100] = decoys  # interleaved with the candidates
    path = tmp_path / "train.csv"
    path.write_text(HEADER + "\n" + "\n".join(lines) + "\n")
    pairs = build_5x200(path)
    expected = [(candidates[name][i], name) for name in COMPETITION_5
                for i in np.random.RandomState(0).permutation(205)[:200]]
    assert pairs == expected

    path.write_text(HEADER + "\n" + "\n".join(lines[:300]) + "\n")
    with pytest.raises(DataError, match=r"train\.csv: only 91 frontal rows have Cardiomegaly"):
        build_5x200(path)


def test_5x200_split_matches_the_rule(pairs):
    five = load_split("chexpert5x200")
    assert five.parts == ("test",) and five.columns == ("class",)
    assert five.labels("test") == {p: COMPETITION_5.index(c) for p, c in pairs}
    assert five.manifest["generator"] == "vlpbench.data.chexpert:generate_5x200_v1"


def test_split_v1_sizes_disjointness_and_labels(split, table):
    sizes = {part: len(split.ids(part)) for part in split.parts}
    assert sizes == {"train": 185027, "val": 5000, "train_1pct": 1850, "train_10pct": 18503}
    assert split.columns == COMPETITION_5
    train, val = set(split.ids("train")), set(split.ids("val"))
    sub10, sub1 = set(split.ids("train_10pct")), set(split.ids("train_1pct"))
    five = set(load_split("chexpert5x200").ids("test"))
    assert not train & val and sub1 < sub10 < train and not (train | val) & five
    frontal = {table.paths[i] for i in np.flatnonzero(table.frontal)}
    assert train | val == frontal - five
    # Labels are the mgca mapping of the shipped values.
    rows = {p: i for i, p in enumerate(table.paths)}
    sample = sorted(val)[::50]
    mapped = apply_policy(table.values[[rows[p] for p in sample]])
    assert [[split.labels("val", c)[p] for c in COMPETITION_5] for p in sample] == mapped.tolist()


def test_split_v1_stratification_and_subsets_keep_every_class(split):
    for column in COMPETITION_5:
        rates = {part: np.mean(list(split.labels(part, column).values())) for part in split.parts}
        overall = (rates["train"] * 185027 + rates["val"] * 5000) / 190027
        assert abs(rates["val"] - overall) < 0.001  # stratified by label combination
        assert abs(rates["train_10pct"] - rates["train"]) < 0.02
        assert abs(rates["train_1pct"] - rates["train"]) < 0.05 and rates["train_1pct"] > 0


@pytest.mark.parametrize("dataset", ["chexpert", "chexpert5x200"])
def test_regeneration_is_byte_identical(dataset, tmp_path, capsys):
    main([dataset, "--out", str(tmp_path)])
    committed = SPLITS_DIR / dataset / "v1"
    names = sorted(p.name for p in committed.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
    manifest = json.loads((committed / "MANIFEST.json").read_text())
    assert manifest["source"]["n_rows"] == 223414 and manifest["source"]["n_frontal"] == 191027
    assert "wrote" in capsys.readouterr().out


# ------------------------------------------------------------------ the reader


def test_reader_parses_what_the_generator_wrote(synth, shipped_lines):
    out, _ = synth
    folder = out / "CheXpert-v1.0-small"
    source = ChexpertSource(out)
    assert source.folder == folder and source.synthetic and ChexpertSource(folder).image_ids == source.image_ids
    train = (folder / "train.csv").read_text().splitlines()[1:]
    valid = (folder / "valid.csv").read_text().splitlines()[1:]
    assert source.image_ids == [line.split(",")[0] for line in train + valid]
    shipped = {line.split(",")[0]: line for line in shipped_lines[1:-1]}
    for line in train + valid:
        fields = line.split(",")
        expected = {c: float(v) if v else None for c, v in zip(OBSERVATIONS, fields[5:])}
        assert source.observations(fields[0]) == expected
        if "/train/" in fields[0]:
            assert shipped[fields[0]] == line
    assert source.frontal_ids("train") == [line.split(",")[0] for line in train if ",Frontal," in line]
    assert source.frontal_ids("valid") == [line.split(",")[0] for line in valid if ",Frontal," in line]
    assert chexpert.test_ids(source) == source.frontal_ids("valid")
    assert not source.missing(source.image_ids)


def test_labels_under_each_policy(tmp_path):
    row = _row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
               Atelectasis="-1.0", Cardiomegaly="-1.0", Edema="1.0", Pleural_Effusion="0.0", Pneumonia="-1.0")
    source = ChexpertSource(_tree(tmp_path, [row]).parent)
    image_id = source.image_ids[0]
    expected = {"mgca": [1, 0, 0, 1, 0], "ones": [1, 1, 0, 1, 0], "zeros": [0, 0, 0, 1, 0], "ignore": [-1, -1, 0, 1, 0]}
    for policy, values in expected.items():
        assert source.labels(image_id, policy=policy) == dict(zip(COMPETITION_5, values))
    assert source.labels(image_id, ["Pneumonia", "No Finding"], "ignore") == {"Pneumonia": -1, "No Finding": 0}
    with pytest.raises(ValueError, match="'mgca' maps uncertain labels for Atelectasis"):
        source.labels(image_id, ["Pneumonia"])
    with pytest.raises(ValueError, match="unknown uncertainty policy 'u-ones'"):
        source.labels(image_id, policy="u-ones")
    with pytest.raises(ValueError, match="unknown CheXpert class"):
        source.labels(image_id, ["Effusion"], "ones")


def test_images_paths_and_release_prefixes(synth, tmp_path):
    out, _ = synth
    source = ChexpertSource(out)
    image_id = source.frontal_ids("train")[0]
    assert source.path(image_id) == out / image_id
    pixels = source.image(image_id)
    assert pixels.dtype == np.uint8 and min(pixels.shape) == SIZE and max(pixels.shape) <= SIZE * 1.3 + 1
    # Split files name the small release; the full release has the same rows below its folder.
    full = "CheXpert-v1.0/" + image_id.split("/", 1)[1]
    assert source.path(full) == source.path(image_id) and source.labels(full) == source.labels(image_id)
    foreign = "elsewhere/" + image_id.split("/", 1)[1]
    assert source.missing([full, foreign, "CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg"]) == [
        foreign, "CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg"]
    with pytest.raises(DataError, match="is not in .*train.csv"):
        source.path(foreign)


def test_missing_and_corrupt_images(tmp_path):
    rows = [_row(f"CheXpert-v1.0-small/train/patient0000{k}/study1/view1_frontal.jpg") for k in (1, 2, 3)]
    folder = _tree(tmp_path, rows)
    (folder / "train/patient00002/study1/view1_frontal.jpg").unlink()
    (folder / "train/patient00003/study1/view1_frontal.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    source = ChexpertSource(folder)
    ids = source.image_ids
    assert source.missing(ids) == [ids[1]]
    assert source.image(ids[0]).shape == (8, 8)
    with pytest.raises(DataError, match=r"image file not found: .*patient00002/study1/view1_frontal\.jpg"):
        source.image(ids[1])
    with pytest.raises(DataError, match=r"cannot decode image .*patient00003/study1/view1_frontal\.jpg"):
        source.image(ids[2])


GOOD = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"train\.csv: empty label file"),
        (HEADER.replace("Pleural Effusion", "Pleural_Effusion") + "\n",
         r"train\.csv line 1: header lacks 'Pleural Effusion'; has unexpected 'Pleural_Effusion'"),
        (HEADER + ",Report\n", r"train\.csv line 1: header has unexpected 'Report'"),
        (HEADER + "\n" + GOOD + "\n" + GOOD[:-4] + "\n", r"train\.csv line 3: expected 19 fields, found 18"),
        (HEADER + "\n" + GOOD.replace(",0.0,", ",2.0,") + "\n",
         r"train\.csv line 2: column 'Pneumothorax' is '2.0'; expected 1.0, 0.0, -1.0 or empty"),
        (HEADER + "\n" + GOOD.replace(",Frontal,", ",PA,") + "\n",
         r"train\.csv line 2: column 'Frontal/Lateral' is 'PA'; expected Frontal or Lateral"),
        (HEADER + "\n" + GOOD + "\n" + GOOD + "\n", r"train\.csv line 3: Path .* repeats line 2"),
        (HEADER + "\n" + GOOD.replace("CheXpert-v1.0-small/train/patient00001/study1/", "") + "\n",
         r"train\.csv line 2: Path 'view1_frontal\.jpg' is not"),
    ],
)
def test_malformed_label_files_name_file_and_line(tmp_path, text, message):
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    (folder / "train.csv").write_text(text)
    (folder / "valid.csv").write_text(HEADER + "\n")
    with pytest.raises(DataError, match=message):
        ChexpertSource(tmp_path)


def test_integer_spellings_and_crlf_are_read(tmp_path):
    path = tmp_path / "train.csv"
    row = _row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", No_Finding="1", Edema="-1")
    path.write_bytes((HEADER + "\r\n" + row + "\r\n").encode())
    table = read_label_table(path)
    assert table.values[0, 0] == 1 and table.values[0, OBSERVATIONS.index("Edema")] == -1
    assert math.isnan(table.values[0, 1]) and table.paths == (row.split(",")[0],)


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        ChexpertSource(tmp_path / "absent")
    with pytest.raises(DataError, match=r"expected train\.csv and valid\.csv in it, or a subfolder CheXpert-v1\.0-sm"):
        ChexpertSource(tmp_path)
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    (folder / "train.csv").write_text(HEADER + "\n")
    with pytest.raises(DataError, match=r"expected valid\.csv in .*CheXpert-v1\.0-small"):
        ChexpertSource(tmp_path)
    (tmp_path / "CheXpert-v1.0").mkdir()
    with pytest.raises(DataError, match="holds both CheXpert-v1.0-small/ and CheXpert-v1.0/"):
        ChexpertSource(tmp_path)


def test_test_split_is_derived_from_valid_csv_and_cached(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path))
    source = ChexpertSource(synth[0])
    split = chexpert.test_split(source)
    assert split.parts == ("test",) and split.columns == COMPETITION_5
    assert set(split.ids("test")) == set(chexpert.test_ids(source))
    assert split.label_table("test") == {i: source.labels(i) for i in chexpert.test_ids(source)}
    again = chexpert.test_split(source)
    assert again.version == split.version and len(list((tmp_path / "splits/chexpert").iterdir())) == 1


# ------------------------------------------------------------------ the radiologist-labelled test set

GT_HEADER = ("Study,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Lesion,Lung Opacity,Edema,Consolidation,"
             "Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices")


def _jpeg(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 10), value, dtype=np.uint8)).save(path, format="JPEG")


def test_test_set_reads_columns_by_name(tmp_path):
    # The radiologist files' column order (Lung Lesion before Lung Opacity), no final newline.
    (tmp_path / "groundtruth.csv").write_text(
        GT_HEADER + "\n"
        "CheXpert-v1.0/test/patient64741/study1,0,1,1,0,1,0,0,0,0,0,0,0,0,1\n"
        "CheXpert-v1.0/test/patient64742/study1,0,1,0,1,0,0,0,0,1,0,1,0,0,0\n"
        "CheXpert-v1.0/test/patient64743/study1,1,0,0,0,0,0,0,0,0,0,0,0,0,0")
    _jpeg(tmp_path / "CheXpert/test/patient64741/study1/view1_frontal.jpg", 50)
    _jpeg(tmp_path / "CheXpert/test/patient64741/study1/view2_lateral.jpg", 90)
    _jpeg(tmp_path / "CheXpert/test/patient64742/study1/view1_lateral.jpg", 90)
    _jpeg(tmp_path / "CheXpert/test/patient64742/study1/view3_frontal.jpg", 130)
    _jpeg(tmp_path / "CheXpert/test/patient64742/study1/view2_frontal.jpg", 170)
    test = ChexpertTestSet(tmp_path)
    ids = test.image_ids
    assert ids == [f"CheXpert-v1.0/test/patient6474{k}/study1" for k in (1, 2, 3)]
    assert test.labels(ids[0]) == dict(zip(COMPETITION_5, [0, 1, 0, 0, 0]))
    assert test.labels(ids[1], ["Lung Lesion", "Lung Opacity", "Atelectasis"]) == {
        "Lung Lesion": 1, "Lung Opacity": 0, "Atelectasis": 1}
    assert test.path(ids[0]) == tmp_path / "CheXpert/test/patient64741/study1/view1_frontal.jpg"
    assert test.path(ids[1]).name == "view2_frontal.jpg"  # the lowest-numbered frontal view
    assert abs(int(test.image(ids[1]).mean()) - 170) <= 2
    absent = "CheXpert-v1.0/test/patient99999/study1"
    assert test.missing([*ids, absent]) == [ids[2], absent]
    with pytest.raises(DataError, match="no image for CheXpert-v1.0/test/patient64743/study1"):
        test.image(ids[2])
    assert not test.synthetic


def test_test_set_image_level_variant(tmp_path):
    header = GT_HEADER.replace("Study", "Path").replace("Lung Opacity", "Airspace Opacity")
    (tmp_path / "test_labels.csv").write_text(
        header + "\nCheXpert/test/patient64741/study1/view2_lateral.jpg,"
        "0.0,1.0,1.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,1.0\n")
    _jpeg(tmp_path / "test/patient64741/study1/view2_lateral.jpg", 60)
    test = ChexpertTestSet(tmp_path)
    image_id = "CheXpert/test/patient64741/study1/view2_lateral.jpg"
    assert test.image_ids == [image_id] and not test.missing([image_id])
    assert test.labels(image_id, ["Lung Opacity", "Pleural Effusion"]) == {"Lung Opacity": 1, "Pleural Effusion": 1}
    assert test.path(image_id) == tmp_path / "test/patient64741/study1/view2_lateral.jpg"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GT_HEADER.replace(",Edema", "") + "\n", r"groundtruth\.csv line 1: header lacks 'Edema'"),
        (GT_HEADER + "\nCheXpert-v1.0/test/patient64741/study1,0,1,1,0,1,0,0,0,2,0,0,0,0,1",
         r"groundtruth\.csv line 2: column 'Atelectasis' is '2'; expected 0 or 1"),
        (GT_HEADER + "\nCheXpert-v1.0/test/patient64741/study1,0,1,1,0,1,0,0,0,,0,0,0,0,1",
         r"groundtruth\.csv line 2: column 'Atelectasis' is ''"),
        (GT_HEADER + "\nCheXpert-v1.0/test/patient64741/study1,0,1",
         r"groundtruth\.csv line 2: expected 15 fields, found 3"),
    ],
)
def test_test_set_malformed_files(tmp_path, text, message):
    (tmp_path / "groundtruth.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        ChexpertTestSet(tmp_path)


def test_test_set_without_label_file(tmp_path):
    with pytest.raises(DataError, match=r"expected groundtruth\.csv or test_labels\.csv in"):
        ChexpertTestSet(tmp_path)


# ------------------------------------------------------------------ the synthetic generator


def test_synth_layout_and_rows(synth, shipped_lines):
    out, summary = synth
    folder = out / "CheXpert-v1.0-small"
    assert sorted(p.name for p in out.iterdir()) == ["CheXpert-v1.0-small", "VLPBENCH_SYNTHETIC.json"]
    assert json.loads((out / "VLPBENCH_SYNTHETIC.json").read_text())["dataset"] == "chexpert"
    assert sorted(p.name for p in folder.iterdir()) == ["groundtruth.csv", "test", "train", "train.csv", "valid",
                                                        "valid.csv"]
    train = (folder / "train.csv").read_bytes()
    assert train.startswith((HEADER + "\n").encode()) and train.endswith(b"\n") and b"\r" not in train
    rows = train.decode().splitlines()[1:]
    # The shipped rows, byte for byte and in shipped order.
    wanted = {line.split(",")[0] for line in rows}
    assert rows == [line for line in shipped_lines[1:-1] if line.split(",")[0] in wanted]
    fields = [line.split(",") for line in rows]
    assert any(f[3] == "Lateral" and f[4] == "" for f in fields)
    assert any("-1.0" in f[5:] for f in fields) and any("" in f[5:] for f in fields)
    valid = (folder / "valid.csv").read_text().splitlines()
    assert valid[0] == HEADER and len(valid) - 1 == summary["valid"] == 6
    for k, line in enumerate(valid[1:]):
        f = line.split(",")
        assert f[0].startswith("CheXpert-v1.0-small/valid/patient645") and set(f[5:]) <= {"0.0", "1.0"}
        assert (f[3], f[4] == "") in (("Frontal", False), ("Lateral", True))
    assert summary["train"] + summary["valid"] == N
    for path in folder.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "L" and min(image.size) == SIZE


# The real groundtruth.csv header (docs/datasets.md, "CheXpert radiologist test set"): the train.csv
# observation order after Study.
REAL_GT_HEADER = ("Study,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,"
                  "Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
                  "Support Devices")


def test_synth_test_set_file_is_in_the_real_format(synth, table):
    out, summary = synth
    raw = (out / "CheXpert-v1.0-small/groundtruth.csv").read_bytes()
    assert not raw.endswith(b"\n") and b"\r" not in raw  # LF, no final newline
    header, *rows = raw.decode().split("\n")
    assert header == REAL_GT_HEADER and len(rows) == summary["test"] == 5  # 10 % of 40, at least 5
    fields = [row.split(",") for row in rows]
    assert [f[0] for f in fields] == [f"CheXpert-v1.0/test/patient{64741 + k}/study1" for k in range(5)]
    assert all(len(f) == 15 and set(f[1:]) <= {"0", "1"} for f in fields)
    # Each row is a real train.csv row under U-zeros (empty and -1.0 -> 0).
    real = {tuple(row) for row in apply_policy(table.values[table.frontal], OBSERVATIONS, "zeros").tolist()}
    assert all(tuple(map(int, f[1:])) in real for f in fields)
    assert any(set(f[1:]) != {"0"} for f in fields)


@pytest.mark.parametrize("below", ["", "CheXpert-v1.0-small"])
def test_synth_test_set_is_read_by_chexpert_test_set(synth, below):
    out, summary = synth
    test = ChexpertTestSet(out / below)
    assert test.synthetic
    rows = (out / "CheXpert-v1.0-small/groundtruth.csv").read_text().split("\n")[1:]
    written = {row.split(",")[0]: dict(zip(OBSERVATIONS, map(int, row.split(",")[1:]))) for row in rows}
    assert test.image_ids == list(written) and test.missing(test.image_ids) == []
    for image_id, labels in written.items():
        assert test.labels(image_id, OBSERVATIONS) == labels
    for name in FINDINGS:  # the drawn findings are exactly the positive labels
        assert summary["test_positives"][name] == sum(labels[name] for labels in written.values())
    images = sorted(p.relative_to(out / "CheXpert-v1.0-small").as_posix()
                    for p in (out / "CheXpert-v1.0-small/test").rglob("*.jpg"))
    assert [i for i in images if i.endswith("lateral.jpg")] == [
        f"test/patient{64741 + k}/study1/view2_lateral.jpg" for k in range(2)]
    for image_id, labels in written.items():
        study = image_id.split("/", 1)[1]
        path = test.path(image_id)
        assert path == out / "CheXpert-v1.0-small" / study / "view1_frontal.jpg"  # not the lateral view2
        pixels = test.image(image_id)
        assert pixels.dtype == np.uint8 and min(pixels.shape) == SIZE
        # Rendered as the train images are: the generator's picture for the image's index (train and
        # valid first, then the test images in path order), with the study's positive findings.
        k = summary["train"] + summary["valid"] + images.index(f"{study}/view1_frontal.jpg")
        findings = [name for name in FINDINGS if labels[name]]
        error = np.abs(pixels.astype(float) - draw([SEED, k], findings, pixels.shape)).mean()
        assert error < 2.5
        if findings:
            assert np.abs(pixels.astype(float) - draw([SEED, k], [], pixels.shape)).mean() > error + 4


def test_data_check_passes_on_synth_output(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path))
    report = check_dataset("chexpert", synth[0], progress=False)
    assert report.ok, report.format()
    assert f"{N} images in the label files (synthetic dataset)" in report.info
    assert f"decoded {N} of {N} image files" in report.info


def test_synth_draws_from_every_pool(synth, split):
    source = ChexpertSource(synth[0])
    ids = {i for i in source.image_ids if "/train/" in i}
    five = load_split("chexpert5x200").labels("test")
    sub1, sub10 = set(split.ids("train_1pct")), set(split.ids("train_10pct"))
    pools = [set(split.ids("val")), sub1, sub10 - sub1, set(split.ids("train")) - sub10]
    assert [len(ids & pool) for pool in pools] == [6, 1, 2, 15]
    assert sorted(five[i] for i in ids & set(five)) == [0, 0, 1, 2, 3, 4]
    assert len([i for i in ids if i not in source.frontal_ids("train")]) == 4


def test_synth_positives_follow_the_labels(synth):
    out, summary = synth
    source = ChexpertSource(out)
    frontal = source.frontal_ids("train") + source.frontal_ids("valid")
    for name in COMPETITION_5:
        assert summary["positives"][name] == sum(source.labels(i)[name] for i in frontal)
    for name in FINDINGS[5:]:
        assert summary["positives"][name] == sum(source.observations(i)[name] == 1.0 for i in frontal)


# Where each finding's field lies, as (low, high) bounds on its centroid's height within the lung box.
HEIGHTS = {"Pleural Effusion": (0.6, 1.2), "Cardiomegaly": (0.55, 1.1), "Atelectasis": (0.45, 1.0),
           "Pneumothorax": (-0.1, 0.4), "Support Devices": (-0.5, 0.3), "Consolidation": (0.0, 1.0),
           "Edema": (0.2, 0.8)}


@pytest.mark.parametrize("finding", FINDINGS)
def test_each_finding_is_drawn_where_it_belongs(finding):
    """The same chest with and without the finding differs inside the finding's field (brighter,
    or darker for a pneumothorax) and hardly elsewhere; the field sits where the finding belongs."""
    for k in range(3):
        # draw() takes the findings' generator first, then the lung: replay both.
        rng = np.random.default_rng([5, k])
        finding_rng = np.random.default_rng(rng.integers(2**63))
        lung = pick_lung(rng, lungs(), None)
        field = finding_fields(finding_rng, lung, [finding])[finding]
        diff = draw([5, k], [finding], (128, 128)).astype(float) - draw([5, k], [], (128, 128))
        inside = resize_field(field, 128) > 0.5
        outside = resize_field(blur(field, 4), 128) < 0.01
        sign = -1 if finding == "Pneumothorax" else 1
        assert inside.sum() >= 10 and sign * diff[inside].mean() > 25
        assert np.abs(diff[outside]).mean() < 6
        rows, cols = np.nonzero(lung)
        height = (np.average(np.nonzero(field)[0], weights=field[field > 0]) - rows.min()) / np.ptp(rows)
        low, high = HEIGHTS[finding]
        assert low < height < high, height
        if finding == "Edema":  # bilateral
            middle = (cols.min() + cols.max()) // 2
            assert field[:, :middle].sum() > 0.3 * field.sum() and field[:, middle:].sum() > 0.3 * field.sum()


def test_synth_deterministic_rewrites_its_own_output_and_refuses_others(synth, tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first = tmp_path / "a"
    synth_chexpert(first, 10, 3, size=32, progress=False)
    snapshot = files(first)
    synth_chexpert(first, 10, 3, size=32, progress=False)  # over its own output
    assert files(first) == snapshot
    synth_chexpert(tmp_path / "b", 10, 4, size=32, progress=False)
    assert files(tmp_path / "b") != snapshot
    foreign = tmp_path / "c"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to write into it"):
        synth_chexpert(foreign, 10, 0, size=32, progress=False)
    with pytest.raises(ValueError, match="n must be between 10 and 5000"):
        synth_chexpert(tmp_path / "d", 9, 0, progress=False)
    with pytest.raises(ValueError, match="size must be at least 32"):
        synth_chexpert(tmp_path / "d", 10, 0, size=16, progress=False)
