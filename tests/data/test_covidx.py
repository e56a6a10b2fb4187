"""COVIDx: label lines parsed from the right, versions and schemes, the reader on synthetic data, split v1."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from vlpbench.data.covidx import CovidxSource, build_split_v1, parse_line, read_labels, split_v1
from vlpbench.data.splits import load_split
from vlpbench.errors import DataError
from vlpbench.synthetic.covidx import _finding, synth_covidx

SIZE = 96


@pytest.fixture(scope="module")
def synth9a(tmp_path_factory):
    out = tmp_path_factory.mktemp("covidx") / "9a"
    return out, synth_covidx(out, 40, 0, size=SIZE, progress=False)


@pytest.fixture(scope="module")
def synth7a(tmp_path_factory):
    out = tmp_path_factory.mktemp("covidx") / "7a"
    return out, synth_covidx(out, 30, 1, size=SIZE, progress=False, version="7A")


@pytest.fixture(scope="module")
def synth4(tmp_path_factory):
    out = tmp_path_factory.mktemp("covidx") / "cxr4"
    return out, synth_covidx(out, 20, 2, size=SIZE, progress=False, version="CXR-4")


def _lines(path):
    data = path.read_bytes()
    assert data.endswith(b"\n") and b"\r" not in data and b"  " not in data
    return data.decode().splitlines()


def test_parse_line_from_the_right():
    assert parse_line("419639-003251 MIDRC-RICORD-1C-419639-003251-46647-0.png positive ricord") == (
        "419639-003251", "MIDRC-RICORD-1C-419639-003251-46647-0.png", "positive", "ricord")
    assert parse_line("COVID 70 COVID(70).png COVID-19 sirm") == ("COVID 70", "COVID(70).png", "COVID-19", "sirm")
    assert parse_line("47c78742 47c78742.png normal") == ("47c78742", "47c78742.png", "normal", None)
    assert parse_line("COVID 70 COVID(70).png COVID-19") == ("COVID 70", "COVID(70).png", "COVID-19", None)
    assert parse_line("3 SARS-Fig8a-day0.jpeg pneumonia rnsa")[3] == "rnsa"


def test_read_labels_mixes_line_shapes_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "test_COVIDx7A.txt"
    path.write_text("COVID 70 COVID(70).png COVID-19 sirm\n47c7 47c7.png normal\n3 SARS-Fig8a.jpeg pneumonia cohen\n")
    assert read_labels(path) == [(1, "COVID 70", "COVID(70).png", "COVID-19", "sirm"),
                                 (2, "47c7", "47c7.png", "normal", None),
                                 (3, "3", "SARS-Fig8a.jpeg", "pneumonia", "cohen")]
    with pytest.raises(DataError, match="label file not found"):
        read_labels(tmp_path / "train_COVIDx7A.txt")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a.png normal", "found 2 field"),
        ("a.png COVID-19 sirm", "found 3 field"),
        ("p a.png covid-19 sirm", "no class name in the last two fields .*case matters"),
        ("p a.png Normal", "no class name"),
        ("p a.png", "no class name"),
    ],
)
def test_parse_line_errors(line, message):
    with pytest.raises(DataError, match="test.txt line 4: .*" + message):
        parse_line(line, "test.txt line 4")


def test_9a_layout_and_lines(synth9a):
    out, summary = synth9a
    assert sorted(p.name for p in out.iterdir()) == [
        "VLPBENCH_SYNTHETIC.json", "test", "test_COVIDx9A.txt", "train", "train_COVIDx9A.txt"]
    assert json.loads((out / "VLPBENCH_SYNTHETIC.json").read_text())["dataset"] == "covidx"
    assert summary["classes"] == {"train": {"normal": 9, "pneumonia": 6, "COVID-19": 17},
                                  "test": {"normal": 2, "pneumonia": 2, "COVID-19": 4}}
    sources = set()
    for part in ("train", "test"):
        lines = _lines(out / f"{part}_COVIDx9A.txt")
        assert all(len(line.split(" ")) == 4 for line in lines)  # 9A: no spaces in ids
        assert sorted(p.name for p in (out / part).iterdir()) == sorted(line.split(" ")[1] for line in lines)
        sources |= {line.split(" ")[3] for line in lines}
    assert {"rsna", "rnsa", "cohen", "sirm", "ricord"} <= sources
    assert any(line.startswith("COVID_") for line in _lines(out / "train_COVIDx9A.txt"))


def test_images_mix_formats_extensions_and_rgb(synth9a):
    out, _ = synth9a
    kinds = set()
    sizes = set()
    for path in sorted(out.glob("t*/*")):
        with Image.open(path) as image:
            kinds.add((path.suffix, image.format, image.mode))
            sizes.add(image.size)
            assert all(0.8 * SIZE - 1 <= side <= 1.2 * SIZE for side in image.size)
    assert {(".png", "PNG", "L"), (".jpg", "JPEG", "RGB"), (".jpeg", "JPEG", "RGB"), (".JPG", "JPEG", "RGB"),
            (".png", "PNG", "RGB")} <= kinds
    assert len(sizes) > 20


def test_reader_returns_what_the_generator_wrote(synth9a):
    out, _ = synth9a
    source = CovidxSource(out)
    assert source.synthetic and source.version == "9A" and source.scheme == "3-class"
    assert source.classes == ("normal", "pneumonia", "COVID-19")
    expected = [(part, line.split(" ")) for part in ("train", "test") for line in _lines(out / f"{part}_COVIDx9A.txt")]
    assert source.image_ids == [fields[1] for _, fields in expected]
    assert source.missing(source.image_ids) == []
    for part, (patient, filename, name, data_source) in expected:
        assert source.patient_id(filename) == patient and source.source_name(filename) == data_source
        assert source.class_name(filename) == name and source.part(filename) == part
        assert source.label(filename) == {"normal": 0, "pneumonia": 1, "COVID-19": 2}[name]
        assert source.path(filename) == out / part / filename
        pixels = source.image(filename)
        with Image.open(out / part / filename) as image:
            assert pixels.shape == image.size[::-1] and pixels.dtype == np.uint8
            np.testing.assert_array_equal(pixels, np.asarray(image.convert("L")))


def test_7a_quirks_spaced_ids_and_lines_without_source(synth7a):
    out, _ = synth7a
    train, test = _lines(out / "train_COVIDx7A.txt"), _lines(out / "test_COVIDx7A.txt")
    spaced = [line for line in train + test if line.startswith("COVID ")]
    assert spaced and all(len(line.split(" ")) == 5 for line in spaced)
    short = [line for line in test if len(line.split(" ")) == 3]
    assert short and len(short) < len(test)  # mixed with 4-field lines in the same file
    source = CovidxSource(out)
    assert source.version == "7A"
    for line in spaced:
        filename = line.split(" ")[2]
        assert source.patient_id(filename) == " ".join(line.split(" ")[:2])
        assert source.source_name(filename) == "sirm" and source.label(filename) == 2
    for line in short:
        assert source.source_name(line.split(" ")[1]) is None
    assert source.missing(source.image_ids) == []


def test_kaggle_binary_scheme_with_val(synth4):
    out, summary = synth4
    assert sorted(p.name for p in out.iterdir()) == [
        "VLPBENCH_SYNTHETIC.json", "test", "test.txt", "train", "train.txt", "val", "val.txt"]
    source = CovidxSource(out)
    assert source.version == "kaggle" and source.scheme == "binary" and source.classes == ("negative", "positive")
    counts = {part: {name: 0 for name in source.classes} for part in ("train", "val", "test")}
    for image_id in source.image_ids:
        counts[source.part(image_id)][source.class_name(image_id)] += 1
        assert source.label(image_id) == source.classes.index(source.class_name(image_id))
    assert counts == summary["classes"]
    assert source.missing(source.image_ids) == []


def test_class_signal_per_finding():
    lung = np.zeros((256, 256), dtype=np.uint8)
    lung[40:200, 50:115] = 1
    lung[40:200, 141:206] = 1
    rng = np.random.default_rng(0)
    assert _finding(rng, lung, "normal") is None and _finding(rng, lung, "negative") is None
    for seed in range(6):
        pneumonia = _finding(np.random.default_rng(seed), lung, "pneumonia")
        left, right = pneumonia[:, :128].sum(), pneumonia[:, 128:].sum()
        assert max(left, right) > 1000 and min(left, right) == 0 and pneumonia.max() == 1
        covid = _finding(np.random.default_rng(seed), lung, "COVID-19")
        assert covid[:, :128].sum() > 100 and covid[:, 128:].sum() > 100 and 0.3 < covid.max() <= 0.8
        # Peripheral and lower: more at the outer edges than next to the midline, more low than high.
        assert covid[:, 50:70].sum() > 3 * covid[:, 95:115].sum()
        assert covid[150:200].sum() > 3 * covid[40:90].sum()
        assert not (covid * (1 - lung)).any() and not (pneumonia * (1 - lung)).any()


def test_class_means_differ_on_rendered_images(synth9a):
    source = CovidxSource(synth9a[0])
    means = {c: [] for c in range(3)}
    for image_id in source.image_ids:
        means[source.label(image_id)].append(source.image(image_id).mean())
    normal, pneumonia, covid = (np.mean(means[c]) for c in range(3))
    # Opacities brighten the lungs: about +5 (one lobe) and +11 (both lower rims) on average here.
    assert pneumonia > normal + 3 and covid > normal + 6


@pytest.fixture
def copy(synth9a, tmp_path):
    target = tmp_path / "covidx"
    shutil.copytree(synth9a[0], target)
    return target


def test_github_layout_labels_and_data_folders(copy):
    (copy / "labels").mkdir()
    (copy / "data").mkdir()
    for name in ("train_COVIDx9A.txt", "test_COVIDx9A.txt"):
        (copy / name).rename(copy / "labels" / name)
    for part in ("train", "test"):
        (copy / part).rename(copy / "data" / part)
    source = CovidxSource(copy)
    assert source.label_files["train"] == copy / "labels" / "train_COVIDx9A.txt"
    assert source.missing(source.image_ids) == []
    assert source.path(source.image_ids[0]).parent == copy / "data" / "train"


def test_version_choice(copy, synth7a):
    for name in ("train_COVIDx7A.txt", "test_COVIDx7A.txt"):
        shutil.copy(synth7a[0] / name, copy / name)
    assert CovidxSource(copy).version == "9A"  # MGCA's version wins
    assert CovidxSource(copy, version="7A").version == "7A"
    with pytest.raises(DataError, match="no COVIDx version '9B'.* found 7A, 9A"):
        CovidxSource(copy, version="9B")
    for name in ("train_COVIDx9A.txt", "test_COVIDx9A.txt"):
        (copy / name).rename(copy / name.replace("9A", "9C"))
    with pytest.raises(DataError, match="several COVIDx versions 7A, 9C; choose one with version="):
        CovidxSource(copy)
    (copy / "test_COVIDx7A.txt").unlink()
    assert CovidxSource(copy).version == "9C"  # 7A lacks its test file


def test_no_label_files(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        CovidxSource(tmp_path / "nowhere")
    (tmp_path / "train_COVIDx9A.txt").write_text("p a.png normal rsna\n")
    with pytest.raises(DataError, match=r"expected COVIDx label files train_COVIDx9A\.txt and test_COVIDx9A\.txt"):
        CovidxSource(tmp_path)


@pytest.mark.parametrize(
    ("test_file", "message"),
    [
        ("p a.png normal rsna\nq b.png positive ricord\n", "line 2: class 'positive' is not of the 3-class scheme"),
        ("p a.png normal rsna\n\nq b.png normal rsna\n", "line 2: empty line"),
        ("", "empty label file"),
        ("p a.png normal rsna\nq a.png pneumonia rsna\n", r"line 2: a\.png is already listed at .*line 1"),
        ("p a.png Covid-19 sirm\n", "line 1: no class name"),
    ],
)
def test_malformed_label_files(tmp_path, test_file, message):
    (tmp_path / "train_COVIDx9A.txt").write_text("r c.png normal rsna\n")
    (tmp_path / "test_COVIDx9A.txt").write_text(test_file)
    with pytest.raises(DataError, match=f"{tmp_path / 'test_COVIDx9A.txt'}.*{message}"):
        CovidxSource(tmp_path)


def test_missing_and_corrupt_images(copy):
    source = CovidxSource(copy)
    first, second = source.image_ids[:2]
    (copy / "train" / first).unlink()
    (copy / "train" / second).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    source = CovidxSource(copy)
    assert source.missing([first, second, "nope.png"]) == [first, "nope.png"]
    with pytest.raises(DataError, match=f"no image file train/{first}"):
        source.image(first)
    with pytest.raises(DataError, match=f"cannot decode image .*train/{second}"):
        source.image(second)
    with pytest.raises(DataError, match=r"image nope\.png is not in .*train_COVIDx9A\.txt"):
        source.label("nope.png")
    shutil.rmtree(copy / "test")
    source = CovidxSource(copy)
    assert set(source.missing(source.image_ids)) == {first} | {i for i in source.image_ids if source.part(i) == "test"}


def test_split_v1_on_synthetic_data(synth9a, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    source = CovidxSource(synth9a[0])
    split = split_v1(source)
    assert split.dataset == "covidx" and split.columns == ("class",)
    train, val, test = (split.ids(p) for p in ("train", "val", "test"))
    pool = [i for i in source.image_ids if source.part(i) == "train"]
    # MGCA's train_test_split(train_size=0.8) rounds train down: 32 -> 25 / 7.
    assert (len(train), len(val), len(test)) == (25, 7, 8) and sorted(train + val) == sorted(pool)
    assert sorted(test) == sorted(i for i in source.image_ids if source.part(i) == "test")
    # Stratified: val holds each class in proportion (7 of 32 with 9 / 6 / 17 -> 2 / 1 / 4).
    assert sorted(split.labels("val").values()) == [0, 0, 1, 2, 2, 2, 2]
    assert set(split.ids("train_1pct")) <= set(split.ids("train_10pct")) <= set(train)
    assert all(split.labels(p)[i] == source.label(i) for p in split.parts for i in split.ids(p))
    assert split.manifest["source"]["covidx_version"] == "9A"
    assert split_v1(CovidxSource(synth9a[0])).manifest_sha256 == split.manifest_sha256
    build_split_v1(source, tmp_path / "again", split.version)
    for path in sorted((tmp_path / "cache" / "splits" / "covidx" / split.version).iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes()


def test_split_v1_sizes_on_full_size_9a_files(tmp_path, monkeypatch):
    """30,130 train lines (8,085 / 5,555 / 16,490) and 400 test lines give 24,104 / 6,026 / 400, 2,410 and 241."""
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    names = ["normal"] * 8085 + ["pneumonia"] * 5555 + ["COVID-19"] * 16490
    (tmp_path / "train_COVIDx9A.txt").write_text("".join(f"p{i} f{i}.png {c} rsna\n" for i, c in enumerate(names)))
    test = ["normal"] * 100 + ["pneumonia"] * 100 + ["COVID-19"] * 200
    (tmp_path / "test_COVIDx9A.txt").write_text("".join(f"t{i} g{i}.png {c} ricord\n" for i, c in enumerate(test)))
    split = split_v1(CovidxSource(tmp_path))
    sizes = {p: len(split.ids(p)) for p in split.parts}
    assert sizes == {"train": 24104, "val": 6026, "test": 400, "train_1pct": 241, "train_10pct": 2410}
    per_class = {p: np.bincount(list(split.labels(p).values()), minlength=3).tolist() for p in split.parts}
    assert per_class["val"] == [1617, 1111, 3298] and per_class["test"] == [100, 100, 200]
    assert per_class["train_10pct"] == [647, 444, 1319] and sum(per_class["train_1pct"]) == 241
    assert set(split.ids("train_1pct")) <= set(split.ids("train_10pct")) <= set(split.ids("train"))
    assert not set(split.ids("train")) & set(split.ids("val"))
    again = load_split("covidx", split.version, root=tmp_path / "cache" / "splits")
    assert again.ids("train") == split.ids("train")


def test_synth_is_deterministic_and_refuses_foreign_folders(synth7a, tmp_path):
    again = tmp_path / "again"
    synth_covidx(again, 30, 1, size=SIZE, progress=False, version="7A")
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(synth7a[0]) for p in synth7a[0].rglob("*") if p.is_file())
    assert all((again / f).read_bytes() == (synth7a[0] / f).read_bytes() for f in files)
    synth_covidx(again, 4, 5, size=64, progress=False)  # a previous output is replaced, here by 9A
    assert sorted(p.name for p in again.glob("*.txt")) == ["test_COVIDx9A.txt", "train_COVIDx9A.txt"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to write"):
        synth_covidx(foreign, 4, progress=False)
    with pytest.raises(ValueError, match="version must be one of"):
        synth_covidx(tmp_path / "x", 4, progress=False, version="9B")
