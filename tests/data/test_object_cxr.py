"""Object-CXR: annotation grammar, the reader on synthetic data, layouts, MGCA's polygon box, split v1."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vlpbench.data.object_cxr import (
    BOX,
    ELLIPSE,
    POLYGON,
    ObjectCxrSource,
    build_split_v1,
    format_annotation,
    object_box,
    parse_annotation,
    rasterize,
    read_annotations,
    split_v1,
)
from vlpbench.data.splits import load_split
from vlpbench.errors import DataError
from vlpbench.synthetic.object_cxr import synth_object_cxr

N, SEED, SIZE = 18, 0, 160


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic Object-CXR folder (16 train + 2 dev images at about 160 px) and the summary."""
    out = tmp_path_factory.mktemp("object_cxr") / "object-CXR"
    return out, synth_object_cxr(out, N, SEED, size=SIZE, progress=False)


@pytest.fixture
def copy(synth, tmp_path):
    """A writable copy of the synthetic folder."""
    target = tmp_path / "object-CXR"
    shutil.copytree(synth[0], target)
    return target


def _rows(path):
    """The label file's rows split by hand: {image_name: annotation text}."""
    lines = path.read_text().splitlines()
    return dict(line.split(",", 1) for line in lines[1:])


def test_layout_headers_and_marker(synth):
    out, summary = synth
    assert sorted(p.name for p in out.iterdir()) == ["VLPBENCH_SYNTHETIC.json", "dev", "dev.csv", "train", "train.csv"]
    assert json.loads((out / "VLPBENCH_SYNTHETIC.json").read_text())["dataset"] == "object_cxr"
    for name in ("train.csv", "dev.csv"):
        data = (out / name).read_bytes()
        assert data.startswith(b"image_name,annotation\n") and data.endswith(b"\n") and b"\r" not in data
    train, dev = _rows(out / "train.csv"), _rows(out / "dev.csv")
    assert list(train) == [f"{i:05d}.jpg" for i in range(1, 17)]
    assert list(dev) == ["08001.jpg", "08002.jpg"]
    assert sorted(p.name for p in (out / "train").iterdir()) == list(train)
    assert sorted(p.name for p in (out / "dev").iterdir()) == list(dev)
    rows = {**train, **dev}
    # Negatives keep their comma with an empty annotation; half of each part is positive.
    assert sum(text == "" for text in rows.values()) == N - summary["positives"] == 9
    assert sum(text != "" for text in train.values()) == 8 and sum(text != "" for text in dev.values()) == 1
    raw = (out / "train.csv").read_bytes() + (out / "dev.csv").read_bytes()
    assert all(f"\n{name},\n".encode() in raw for name, text in rows.items() if not text)
    # Objects of every type, separated by ';' without spaces, integer coordinates, single spaces.
    assert min(summary["objects"].values()) >= 1
    assert any(";" in text for text in rows.values())
    for text in filter(None, rows.values()):
        for item in text.split(";"):
            tokens = item.split(" ")
            assert tokens[0] in "012" and all(t.isdigit() for t in tokens[1:])
            if tokens[0] == "2":
                assert len(tokens[1:]) >= 6 and tokens[1:3] != tokens[-2:]  # no repeat of the first vertex


def test_images_are_greyscale_baseline_jpegs_of_varying_size(synth):
    out, _ = synth
    sizes = set()
    for path in sorted(out.rglob("*.jpg")):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "L"
            assert "progressive" not in image.info and image.info.get("jfif_version") == (1, 1)
            sizes.add(image.size)
            width, height = image.size
            assert 0.8 * SIZE - 1 <= width <= SIZE and 0.9 * SIZE - 1 <= height <= 1.1 * SIZE
    assert len(sizes) > N // 2


def test_reader_returns_what_the_generator_wrote(synth):
    out, summary = synth
    source = ObjectCxrSource(out)
    rows = {**_rows(out / "train.csv"), **_rows(out / "dev.csv")}
    assert source.synthetic and source.folder == out
    assert source.image_ids == list(rows)
    assert source.missing(source.image_ids) == []
    counts = {BOX: 0, ELLIPSE: 0, POLYGON: 0}
    for image_id, text in rows.items():
        expected = [(int(item.split()[0]), np.array(item.split()[1:], dtype=int).reshape(-1, 2))
                    for item in text.split(";")] if text else []
        objects = source.objects(image_id)
        assert [k for k, _ in objects] == [k for k, _ in expected]
        for (_, points), (_, truth) in zip(objects, expected):
            np.testing.assert_array_equal(points, truth)
            assert points.dtype == np.int64
        for kind, _ in objects:
            counts[kind] += 1
        assert source.label(image_id) == int(bool(text))
        assert source.part(image_id) == ("dev" if image_id >= "08001" else "train")
        assert format_annotation(objects) == text
        boxes = source.boxes(image_id)
        assert boxes.shape == (len(expected), 4) and boxes.dtype == np.float64
        for box, (_, truth) in zip(boxes, expected):
            np.testing.assert_array_equal(box, [*truth.min(0), *truth.max(0)])
    assert summary["objects"] == {"box": counts[BOX], "ellipse": counts[ELLIPSE], "polygon": counts[POLYGON]}


def test_objects_are_rendered_near_white_where_the_mask_says(synth):
    out, _ = synth
    source = ObjectCxrSource(out)
    inside, outside = [], []
    for image_id in source.image_ids:
        pixels = source.image(image_id)
        height, width = source.image_size(image_id)
        assert pixels.shape == (height, width) and pixels.dtype == np.uint8
        mask = source.mask(image_id)
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        assert mask.any() == bool(source.label(image_id))
        if mask.any():
            # Leave out a 2-px ring around the objects, which the JPEG edge blurs.
            ring = np.asarray(Image.fromarray(mask * 255).filter(ImageFilter.MaxFilter(5))) > 0
            inside.append(pixels[mask == 1].mean())
            outside.append((pixels[~ring] > 225).mean())
    assert min(inside) > 230 and max(outside) < 0.02


def test_rasterize_shapes():
    objects = parse_annotation("0 1 1 3 2;1 10 2 16 6;2 2 8 6 8 4 12")
    mask = rasterize(objects, 20, 15)
    assert mask[1:3, 1:4].all() and mask[1:3, 1:4].sum() == 6  # box corners inclusive
    ellipse = mask[2:7, 10:17]
    # ((x-13)/3)^2 + ((y-4)/2)^2 <= 1 on integer positions: the tips and the centre, not the corners.
    assert ellipse[2, 0] and ellipse[2, 6] and ellipse[0, 3] and ellipse[4, 3] and not ellipse[0, 0]
    inside = [((x - 13) / 3) ** 2 + ((y - 4) / 2) ** 2 <= 1 for y in range(2, 7) for x in range(10, 17)]
    assert ellipse.sum() == sum(inside)
    assert mask[8, 2] and mask[8, 6] and mask[12, 4] and mask[9, 4]  # polygon vertices and interior
    assert mask.sum() == 6 + ellipse.sum() + mask[8:13, 2:7].sum()
    # Parts off the image are clipped; a zero-width ellipse is a line.
    clipped = rasterize([(BOX, np.array([[-5, -5], [1, 1]])), (ELLIPSE, np.array([[8, 2], [8, 6]]))], 10, 10)
    assert clipped[:2, :2].all() and clipped[:, 8].sum() == 5 and clipped.sum() == 9


def test_parse_annotation_grammar_and_empty():
    assert parse_annotation("") == [] and parse_annotation("  ") == []
    objects = parse_annotation("0 1203 1580 1391 1702;2 1500 1200 1540 1180 1580 1230")
    assert [k for k, _ in objects] == [BOX, POLYGON]
    np.testing.assert_array_equal(objects[1][1], [[1500, 1200], [1540, 1180], [1580, 1230]])


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ("3 1 2 3 4", "type '3'"),
        ("0 1 2 3", "has 3 coordinates; expected 4"),
        ("1 1 2 3 4 5 6", "has 6 coordinates; expected 4"),
        ("0 1 2.5 3 4", "coordinate '2.5' is not an integer"),
        ("0 5 2 3 4", "out of order"),
        ("2 1 2 3 4", "at least 3 vertices"),
        ("2 1 2 3 4 5 6 7", "at least 3 vertices"),
        ("0 1 2 3 4;", "object 2 is empty"),
        ("0 1 2 3 4;;1 1 2 3 4", "object 2 is empty"),
    ],
)
def test_malformed_annotation(annotation, message):
    with pytest.raises(DataError, match="train.csv line 7: .*" + message.replace(".", r"\.").replace("(", r"\(")):
        parse_annotation(annotation, "train.csv line 7")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image_name;annotation\n00001.jpg,\n", "line 1: expected the header 'image_name,annotation'"),
        ("", "line 1: expected the header 'image_name,annotation', found an empty file"),
        ("image_name,annotation\n00001.jpg,\n00002.jpg\n", "line 3: expected 2 fields"),
        ("image_name,annotation\n00001.jpg,0 1 2 3 4,x\n", "line 2: expected 2 fields"),
        ("image_name,annotation\n,0 1 2 3 4\n", "line 2: empty image_name"),
        ("image_name,annotation\n00001.jpg,\n00001.jpg,0 1 2 3 4\n",
         "line 3: image 00001.jpg already has a row \\(line 2\\)"),
        ("image_name,annotation\n00001.jpg,0 1 2 x 4\n", "line 2: object 1: coordinate 'x'"),
    ],
)
def test_malformed_label_file(tmp_path, content, message):
    path = tmp_path / "train.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=f"{path} {message}"):
        read_annotations(path)


def test_missing_label_files_and_folder(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        ObjectCxrSource(tmp_path / "nowhere")
    (tmp_path / "train.csv").write_text("image_name,annotation\n")
    with pytest.raises(DataError, match=r"expected train\.csv and dev\.csv .* found \['train\.csv'\]"):
        ObjectCxrSource(tmp_path)


def test_an_id_in_two_label_files_is_refused(copy):
    with (copy / "dev.csv").open("a") as handle:
        handle.write("00001.jpg,\n")
    with pytest.raises(DataError, match=r"dev\.csv: image 00001\.jpg is also in .*train\.csv"):
        ObjectCxrSource(copy)


def test_missing_and_corrupt_images(copy):
    (copy / "train" / "00003.jpg").unlink()
    (copy / "train" / "00004.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    source = ObjectCxrSource(copy)
    assert source.missing(["00002.jpg", "00003.jpg", "09999.jpg"]) == ["00003.jpg", "09999.jpg"]
    with pytest.raises(DataError, match="no image file for 00003.jpg"):
        source.image("00003.jpg")
    with pytest.raises(DataError, match=r"cannot decode image .*train/00004\.jpg"):
        source.image("00004.jpg")
    with pytest.raises(DataError, match=r"cannot read the size of image .*train/00004\.jpg"):
        source.mask("00004.jpg")
    with pytest.raises(DataError, match=r"image 09999\.jpg is not in .*train\.csv"):
        source.label("09999.jpg")
    shutil.copy(copy / "train" / "00005.jpg", copy / "dev" / "00005.jpg")
    with pytest.raises(DataError, match="two image files for 00005.jpg"):
        ObjectCxrSource(copy)


def test_zipped_release_in_a_parent_folder(synth, copy):
    expected = ObjectCxrSource(synth[0])
    for part in ("train", "dev"):
        with zipfile.ZipFile(copy / f"{part}.zip", "w") as archive:
            for path in sorted((copy / part).iterdir()):
                archive.write(path, f"{part}/{path.name}")
        shutil.rmtree(copy / part)
    (copy / "VLPBENCH_SYNTHETIC.json").unlink()
    source = ObjectCxrSource(copy.parent)  # the folder above object-CXR/
    assert source.folder == copy and not source.synthetic
    assert source.missing(source.image_ids) == []
    for image_id in ("00002.jpg", "08001.jpg"):
        np.testing.assert_array_equal(source.image(image_id), expected.image(image_id))
        assert source.image_size(image_id) == expected.image_size(image_id)
        np.testing.assert_array_equal(source.mask(image_id), expected.mask(image_id))
        assert isinstance(source.path(image_id), zipfile.Path) and source.path(image_id).name == image_id
    with zipfile.ZipFile(copy / "dev.zip", "a") as archive:
        archive.writestr("dev/08003.jpg", b"broken")
    with (copy / "dev.csv").open("a") as handle:
        handle.write("08003.jpg,\n")
    with pytest.raises(DataError, match=r"cannot decode image .*dev\.zip:dev/08003\.jpg"):
        ObjectCxrSource(copy).image("08003.jpg")
    (copy / "train.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"cannot read the zip archive .*train\.zip"):
        ObjectCxrSource(copy)


def test_kaggle_test_csv_names_images_by_path(copy):
    (copy / "test").mkdir()
    shutil.copy(copy / "dev" / "08001.jpg", copy / "test" / "09001.jpg")
    (copy / "test.csv").write_text("image_path,annotation\ntest/09001.jpg,1 10 20 30 40\n")
    source = ObjectCxrSource(copy)
    assert source.image_ids[-1] == "09001.jpg" and source.part("09001.jpg") == "test"
    assert source.label("09001.jpg") == 1 and source.missing(["09001.jpg"]) == []
    np.testing.assert_array_equal(source.boxes("09001.jpg"), [[10, 20, 30, 40]])


# Boxes computed by MGCA's polylabel_box with shapely 1.8.5 (GEOS 3.10.3).
SHAPELY_BOXES = [
    ([[1500, 1200], [1540, 1180], [1580, 1230], [1560, 1290], [1510, 1300]], [1499.974, 1180.0, 1580.0, 1300.024]),
    ([[0, 0], [400, 0], [400, 30], [30, 30], [30, 400], [0, 400]], [-337.5, -337.5, 400.0, 400.0]),
    ([[300, 200], [700, 260], [650, 420], [420, 380], [330, 520], [260, 330]], [42.395, 102.582, 700.0, 520.0]),
    ([[1000, 1000], [1012, 1000], [1012, 1050], [1000, 1050]], [1000.0, 1000.0, 1012.0, 1050.0]),
]


@pytest.mark.parametrize(("polygon", "expected"), SHAPELY_BOXES)
def test_mgca_polygon_box_matches_shapely(polygon, expected):
    points = np.array(polygon)
    box = object_box(POLYGON, points, "mgca")
    np.testing.assert_allclose(box, expected, atol=1.0)
    # Symmetric about the pole and covering the polygon.
    assert (box[:2] <= points.min(0)).all() and (box[2:] >= points.max(0)).all()
    np.testing.assert_array_equal(object_box(POLYGON, points), [*points.min(0), *points.max(0)])


def test_mgca_rule_leaves_boxes_and_ellipses_alone(synth):
    source = ObjectCxrSource(synth[0])
    for image_id in source.image_ids:
        canonical, mgca = source.boxes(image_id), source.boxes(image_id, polygon_rule="mgca")
        for (kind, _), a, b in zip(source.objects(image_id), canonical, mgca):
            if kind == POLYGON:
                assert (b[:2] <= a[:2]).all() and (b[2:] >= a[2:]).all()
            else:
                np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="polygon_rule"):
        source.boxes("00001.jpg", polygon_rule="hull")


def test_split_v1_on_synthetic_data(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    source = ObjectCxrSource(synth[0])
    split = split_v1(source)
    assert split.dataset == "object_cxr" and split.version.startswith("v1-") and split.columns == ("object",)
    train, val, test = (split.ids(p) for p in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (13, 3, 2)
    assert not set(train) & set(val)
    assert set(train) | set(val) == {i for i in source.image_ids if source.part(i) == "train"}
    assert sorted(test) == ["08001.jpg", "08002.jpg"]
    assert set(split.ids("train_1pct")) <= set(split.ids("train_10pct")) <= set(train)
    assert all(split.labels(p)[i] == source.label(i) for p in split.parts for i in split.ids(p))
    # Cached by content: a second call reads the same folder.
    assert split_v1(ObjectCxrSource(synth[0])).manifest_sha256 == split.manifest_sha256
    assert len(list((tmp_path / "cache" / "splits" / "object_cxr").iterdir())) == 1
    # Regeneration is byte-identical.
    build_split_v1(source, tmp_path / "again", split.version)
    folder = tmp_path / "cache" / "splits" / "object_cxr" / split.version
    for path in sorted(folder.iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes()


def test_split_v1_sizes_on_a_full_size_label_file(tmp_path, monkeypatch):
    """8,000 train rows (half positive) and 1,000 dev rows give 6,400 / 1,600 / 1,000, 640 and 64."""
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    positive = rng.permutation(np.arange(8000) < 4000)
    train = "".join(f"{i + 1:05d}.jpg,{'0 1 2 3 4' if p else ''}\n" for i, p in enumerate(positive))
    dev = "".join(f"{i:05d}.jpg,{'1 1 2 3 4' if i % 2 else ''}\n" for i in range(8001, 9001))
    (tmp_path / "train.csv").write_text("image_name,annotation\n" + train)
    (tmp_path / "dev.csv").write_text("image_name,annotation\n" + dev)
    split = split_v1(ObjectCxrSource(tmp_path))
    sizes = {p: len(split.ids(p)) for p in split.parts}
    assert sizes == {"train": 6400, "val": 1600, "test": 1000, "train_1pct": 64, "train_10pct": 640}
    positives = {p: sum(split.labels(p).values()) for p in split.parts}
    assert positives == {"train": 3200, "val": 800, "test": 500, "train_1pct": 32, "train_10pct": 320}
    assert set(split.ids("train_1pct")) <= set(split.ids("train_10pct")) <= set(split.ids("train"))
    assert not set(split.ids("train")) & set(split.ids("val"))
    reloaded = load_split("object_cxr", split.version, root=tmp_path / "cache" / "splits")
    assert reloaded.manifest["source"]["files"]["train.csv"]["n_images"] == 8000
    assert reloaded.manifest["generator"] == "vlpbench.data.object_cxr:split_v1"


def test_synth_is_deterministic_and_refuses_foreign_folders(synth, tmp_path):
    again = tmp_path / "again"
    synth_object_cxr(again, N, SEED, size=SIZE, progress=False)
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(synth[0]) for p in synth[0].rglob("*") if p.is_file())
    assert all((again / f).read_bytes() == (synth[0] / f).read_bytes() for f in files)
    synth_object_cxr(again, 4, SEED + 1, size=64, progress=False)  # a previous output is replaced
    assert len(list(again.rglob("*.jpg"))) == 4
    assert (again / "train.csv").read_bytes() != (synth[0] / "train.csv").read_bytes()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to write"):
        synth_object_cxr(foreign, 4, progress=False)
    with pytest.raises(ValueError, match="n must be at least 2"):
        synth_object_cxr(tmp_path / "one", 1, progress=False)
