"""ChestX-ray14: the reader (Data_Entry quirks, boxes, lists, layouts, errors), the synthetic
dataset built from the shipped files, and split v1 derived from the official lists."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlpbench.data.cxr14 import LABELS, Cxr14Source, build_split_v1, read_bboxes, read_data_entry, split_v1
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.data.rsna import MEDKLIP_COMMIT
from vlpbench.errors import DataError
from vlpbench.testing.clones import file_at_commit
from vlpbench.synthetic.chest import lungs, pick_lung
from vlpbench.synthetic.cxr14 import FINDINGS, synth_cxr14

N, SIZE, SEED = 24, 256, 0
ENTRY, BBOX = "Data_Entry_2017_v2020.csv", "BBox_List_2017.csv"
ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
# MedKLIP's copy of the official ChestX-ray14 test list (its zero-shot test.csv, Image Index column).
MEDKLIP_CXR14_TEST_FILE = "Sample_zero-shot_Classification_CXR14/data_sample/test.csv"


@pytest.fixture(scope="module")
def shipped_lines():
    """The shipped Data_Entry and BBox files as lines (header first)."""
    return tuple(gzip.decompress(xrv_data_file(name).read_bytes()).decode().splitlines()
                 for name in ("Data_Entry_2017_v2020.csv.gz", "BBox_List_2017.csv.gz"))


@pytest.fixture(scope="module")
def shipped():
    """The shipped Data_Entry and BBox files, parsed."""
    return (read_data_entry(xrv_data_file("Data_Entry_2017_v2020.csv.gz")),
            read_bboxes(xrv_data_file("BBox_List_2017.csv.gz")))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A 24-image synthetic dataset at 256 px, and the generator's summary."""
    out = tmp_path_factory.mktemp("synth") / "cxr14"
    return out, synth_cxr14(out, N, SEED, size=SIZE, progress=False)


def _labels_only(tmp_path, synth, name="root"):
    """A copy of the synth label and list files without images, to be broken by a test."""
    root = tmp_path / name
    root.mkdir()
    for path in synth[0].iterdir():
        if path.is_file():
            shutil.copy(path, root / path.name)
    return root


def _edit(path, line, text):
    """Replace line ``line`` (1-based) of a file."""
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


# --- the shipped files -----------------------------------------------------------------------------

def test_shipped_files_parse_with_the_documented_counts(shipped):
    entries, boxes = shipped
    assert len(entries) == 112120 and len({e.patient_id for e in entries.values()}) == 30805
    counts = {label: sum(label in e.findings for e in entries.values()) for label in LABELS}
    assert sum(not e.findings for e in entries.values()) == 60361
    assert (counts["Infiltration"], counts["Effusion"], counts["Hernia"]) == (19894, 13317, 227)
    assert sum(e.view_position == "PA" for e in entries.values()) == 67310
    first = entries["00000001_000.png"]
    assert (first.findings, first.follow_up, first.patient_id, first.age_years, first.sex) == (
        ("Cardiomegaly",), 0, 1, 57.0, "M")
    assert first.original_size == (2682, 2749) and first.pixel_spacing == (0.14300000000000002,) * 2
    assert sum(map(len, boxes.values())) == 984 and len(boxes) == 880
    box_counts = {}
    for rows in boxes.values():
        for label, _ in rows:
            box_counts[label] = box_counts.get(label, 0) + 1
    assert box_counts == {"Atelectasis": 180, "Cardiomegaly": 146, "Effusion": 153, "Infiltration": 123,
                          "Mass": 85, "Nodule": 79, "Pneumonia": 120, "Pneumothorax": 98}
    assert boxes["00013118_008.png"][0] == ("Atelectasis", [225.084745762712, 547.019216763771,
                                                            86.7796610169491, 79.1864406779661])


# --- the synthetic dataset -------------------------------------------------------------------------

def test_layout_marker_and_summary(synth):
    out, summary = synth
    assert summary == {"n": N, "boxes": 9, "test": 5, "rgba": 1, "path": str(out)}
    names = {p.name for p in out.iterdir() if not p.name.startswith("images_0")}
    assert names == {BBOX, ENTRY, "VLPBENCH_SYNTHETIC.json", "test_list.txt", "train_val_list.txt"}
    marker = json.loads((out / "VLPBENCH_SYNTHETIC.json").read_text())
    assert marker["dataset"] == "cxr14" and marker["seed"] == SEED and "not the official lists" in marker["note"]
    pngs = sorted(out.glob("images_0*/images/*.png"))
    assert len(pngs) == N and {p.parent.parent.name for p in pngs} <= {f"images_{k:03d}" for k in range(1, 13)}


def test_pngs_sit_in_the_folder_of_the_real_archives(synth, shipped):
    ordered = sorted(shipped[0])
    bounds = np.cumsum((4999,) + (10000,) * 10 + (7121,))
    assert ordered[4998] == "00001335_006.png" and bounds[-1] == len(ordered)
    for path in synth[0].glob("images_0*/images/*.png"):
        position = ordered.index(path.name)
        assert path.parent.parent.name == f"images_{int(np.searchsorted(bounds, position, side='right')) + 1:03d}"


def test_label_files_hold_the_shipped_rows(synth, shipped_lines):
    out, _ = synth
    entry_lines, box_lines = shipped_lines
    data = (out / ENTRY).read_bytes()
    assert data.endswith(b"\n") and b"\r" not in data
    header, *rows = data.decode().splitlines()
    assert header == ENTRY_HEADER == entry_lines[0]
    ids = {row.split(",")[0] for row in rows}
    assert len(ids) == N and rows == [row for row in entry_lines[1:] if row.split(",")[0] in ids]
    assert all(len(row.split(",")) == 11 for row in rows)  # 9 header names, 11 fields
    box_header, *written = (out / BBOX).read_text().splitlines()
    assert box_header == BBOX_HEADER == box_lines[0] and len(box_header.split(",")) == 9
    real = [row.split(",") for row in box_lines[1:] if row.split(",")[0] in ids]
    assert [row.split(",")[:2] for row in written] == [row[:2] for row in real]
    for row, original in zip(written, real):
        assert len(row.split(",")) == 6
        assert np.allclose([float(v) for v in row.split(",")[2:]], [float(v) * SIZE / 1024 for v in original[2:]],
                           rtol=1e-13)


def test_reader_returns_what_the_generator_wrote(synth, shipped):
    out, _ = synth
    entries, boxes = shipped
    source = Cxr14Source(out)
    assert source.synthetic and source.label_file.name == ENTRY
    rows = (out / ENTRY).read_text().splitlines()[1:]
    assert source.image_ids == [row.split(",")[0] for row in rows]
    for image_id in source.image_ids:
        assert source.entry(image_id) == entries[image_id]
        assert source.labels(image_id) == {label: int(label in entries[image_id].findings) for label in LABELS}
        assert source.patient_id(image_id) == int(image_id[:8])
        expected = [(label, [v * SIZE / 1024 for v in box]) for label, box in boxes.get(image_id, [])]
        got = source.boxes(image_id)
        assert [label for label, _ in got] == [label for label, _ in expected]
        assert all(np.allclose(a, b, rtol=1e-13) for (_, a), (_, b) in zip(got, expected))
        image = source.image(image_id)
        assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8
    assert source.missing(source.image_ids + ["00000000_000.png"]) == ["00000000_000.png"]


def test_official_lists_are_patient_disjoint_and_cover_every_image(synth):
    out, summary = synth
    source = Cxr14Source(out)
    lists = {part: (out / f"{part}_list.txt").read_text().splitlines() for part in ("train_val", "test")}
    assert sorted(lists["train_val"] + lists["test"]) == sorted(source.image_ids)
    assert all(lines == sorted(lines) for lines in lists.values()) and len(lists["test"]) == summary["test"]
    for part, ids in lists.items():
        assert all(source.official_split(i) == part for i in ids)
    patients = {part: {source.patient_id(i) for i in ids} for part, ids in lists.items()}
    assert not patients["train_val"] & patients["test"]


def test_every_quirk_is_in_the_sample(synth):
    out, _ = synth
    source = Cxr14Source(out)
    findings = [source.entry(i).findings for i in source.image_ids]
    assert set(LABELS) <= {f for row in findings for f in row} and () in findings
    assert any(list(row) != sorted(row) for row in findings)  # Finding Labels not always sorted
    assert any(len(source.boxes(i)) > 1 for i in source.image_ids)
    assert ",Infiltrate," in (out / BBOX).read_text()
    assert any(label == "Infiltration" for i in source.image_ids for label, _ in source.boxes(i))
    per_patient = {}
    for image_id in source.image_ids:
        per_patient[source.patient_id(image_id)] = per_patient.get(source.patient_id(image_id), 0) + 1
    assert max(per_patient.values()) > 1
    rgba = [p for p in out.glob("images_0*/images/*.png") if Image.open(p).mode == "RGBA"]
    grey = [p for p in out.glob("images_0*/images/*.png") if p not in rgba]
    assert len(rgba) == 1 and all(Image.open(p).mode == "L" for p in grey)
    raw = np.asarray(Image.open(rgba[0]))
    assert (raw[..., 3] == 255).all() and (raw[..., 0] == raw[..., 1]).all()
    np.testing.assert_array_equal(source.image(rgba[0].name), raw[..., 0])


def test_boxed_findings_are_drawn_in_their_boxes(synth):
    source = Cxr14Source(synth[0])
    contrasts = []
    for image_id in source.image_ids:
        image = source.image(image_id).astype(np.float64)
        for label, (x, y, w, h) in source.boxes(image_id):
            # The middle half of the box against a ring one box-size wide around it.
            inner = image[int(y + h / 4):int(y + 3 * h / 4) + 1, int(x + w / 4):int(x + 3 * w / 4) + 1].mean()
            ring = np.zeros(image.shape, bool)
            ring[max(int(y - h), 0):int(y + 2 * h), max(int(x - w), 0):int(x + 2 * w)] = True
            ring[int(y):int(y + h) + 1, int(x):int(x + w) + 1] = False
            contrast = inner - image[ring].mean()
            # An opacity over the chest wall stands out less than one over the lung.
            assert (contrast < -50) if label == "Pneumothorax" else (contrast > 5), (image_id, label, contrast)
            contrasts.append(abs(contrast))
    assert len(contrasts) == 9 and np.median(contrasts) > 25


@pytest.mark.parametrize("finding", LABELS)
def test_every_finding_has_a_field_where_it_occurs(finding):
    rng = np.random.default_rng([3, LABELS.index(finding)])
    lung = pick_lung(rng, lungs(), None)
    kind, field = FINDINGS[finding](rng, lung)
    assert kind == ("pneumothorax" if finding in ("Pneumothorax", "Emphysema") else "opacity")
    assert field.shape == lung.shape and 0 <= field.min() and field.max() <= 1 and field.sum() > 5
    rows, _ = np.nonzero(lung)
    low = np.nonzero(field > 0.05)[0].mean() > (rows.min() + rows.max()) / 2
    if finding in ("Cardiomegaly", "Hernia", "Effusion"):
        assert low  # in the lower chest
    else:
        assert (field * lung).sum() / field.sum() > 0.8  # inside the lungs


def test_default_size_is_native_with_shipped_box_rows(tmp_path, shipped_lines):
    out = tmp_path / "native"
    summary = synth_cxr14(out, 2, 5, progress=False)
    source = Cxr14Source(out)
    ids = set(source.image_ids)
    assert summary["rgba"] == 1 and len(ids) == 2 and summary["boxes"] >= 2  # the image with several boxes
    assert (out / BBOX).read_text().splitlines() == [shipped_lines[1][0]] + [
        row for row in shipped_lines[1][1:] if row.split(",")[0] in ids]
    for image_id in ids:
        assert source.image(image_id).shape == (1024, 1024)


def test_deterministic_replaceable_and_safe(tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synth_cxr14(first, 6, 1, size=64, progress=False)
    synth_cxr14(second, 6, 1, size=64, progress=False)
    assert files(first) == files(second)
    synth_cxr14(other, 6, 2, size=64, progress=False)
    assert Cxr14Source(other).image_ids != Cxr14Source(first).image_ids
    synth_cxr14(first, 6, 2, size=64, progress=False)  # a previous synth output is replaced
    assert files(first) == files(other)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to write"):
        synth_cxr14(foreign, 2, progress=False)
    with pytest.raises(ValueError, match="size"):
        synth_cxr14(tmp_path / "tiny", 2, size=16, progress=False)


# --- reader variants and errors ----------------------------------------------------------------------

def test_original_2017_file_with_trailing_commas_and_odd_ages(tmp_path, synth):
    root = _labels_only(tmp_path, synth)
    header, *rows = (root / ENTRY).read_text().splitlines()
    ages = ["058Y", "411", "006M", "010D"]
    edited = []
    for k, row in enumerate(rows):
        fields = row.split(",")
        if k < len(ages):
            fields[4] = ages[k]
        edited.append(",".join(fields) + ",")
    (root / "Data_Entry_2017.csv").write_text("\r\n".join([header + ","] + edited) + "\r\n")
    (root / ENTRY).unlink()
    source = Cxr14Source(root)
    reference = Cxr14Source(synth[0])
    assert source.label_file.name == "Data_Entry_2017.csv" and source.image_ids == reference.image_ids
    assert [source.entry(i).age_years for i in source.image_ids[:4]] == [58.0, 411.0, 0.5, 10 / 365]
    assert all(source.labels(i) == reference.labels(i) for i in source.image_ids)
    shutil.copy(synth[0] / ENTRY, root / ENTRY)  # both present: v2020 wins
    assert Cxr14Source(root).label_file.name == ENTRY


def test_flat_images_folder(tmp_path, synth):
    root = _labels_only(tmp_path, synth)
    (root / "images").mkdir()
    for path in synth[0].glob("images_0*/images/*.png"):
        shutil.copy(path, root / "images" / path.name)
    source = Cxr14Source(root)
    assert source.missing(source.image_ids) == []
    assert all(source.path(i).parent == root / "images" for i in source.image_ids)
    shutil.copy(root / "images" / source.image_ids[0], root / source.image_ids[0])
    with pytest.raises(DataError, match=f"two PNGs for image {source.image_ids[0]}"):
        Cxr14Source(root)


def test_missing_and_corrupt_images(tmp_path, synth):
    root = _labels_only(tmp_path, synth)
    source = Cxr14Source(root)
    first = source.image_ids[0]
    assert source.missing(source.image_ids) == source.image_ids
    with pytest.raises(DataError, match=f"no PNG for image {first}"):
        source.path(first)
    (root / "images").mkdir()
    (root / "images" / first).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=f"cannot decode image .*{first}"):
        Cxr14Source(root).image(first)


@pytest.mark.parametrize("line, text, message", [
    (1, "Image Index,Finding Labels,Follow-up #,Patient ID", "line 1: header"),
    (3, "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143", "line 3: expected 11 fields"),
    (3, "00000001_000.png,Infiltrate,0,1,57,M,PA,2682,2749,0.143,0.143", "line 3: unknown finding 'Infiltrate'"),
    (3, "00000001_000.png,No Finding|Mass,0,1,57,M,PA,2682,2749,0.143,0.143", "line 3: 'No Finding' combined"),
    (3, "00000001_000.png,Mass|Mass,0,1,57,M,PA,2682,2749,0.143,0.143", "line 3: a finding is repeated"),
    (3, "00000001_000.png,Mass,0,1,old,M,PA,2682,2749,0.143,0.143", "line 3: Patient Age 'old'"),
    (3, "00000001_000.png,Mass,0,x,57,M,PA,2682,2749,0.143,0.143", "line 3: Patient ID 'x'"),
    (3, "00000001_000.png,Mass,0,1,57,X,PA,2682,2749,0.143,0.143", "line 3: Patient Gender 'X'"),
    (3, "00000001_000.png,Mass,0,1,57,M,LL,2682,2749,0.143,0.143", "line 3: View Position 'LL'"),
    (3, "00000001_000.png,Mass,0,1,57,M,PA,2682,2749,nan,0.143", "line 3: pixel spacing x 'nan'"),
    (3, "1_000.png,Mass,0,1,57,M,PA,2682,2749,0.143,0.143", "line 3: Image Index '1_000.png'"),
])
def test_malformed_data_entry(tmp_path, synth, line, text, message):
    root = _labels_only(tmp_path, synth)
    (root / "BBox_List_2017.csv").unlink()
    for name in ("train_val_list.txt", "test_list.txt"):
        (root / name).unlink()
    _edit(root / ENTRY, line, text)
    with pytest.raises(DataError, match=f"{ENTRY} {message}"):
        Cxr14Source(root)


def test_duplicate_and_missing_data_entry(tmp_path, synth):
    root = _labels_only(tmp_path, synth)
    rows = (root / ENTRY).read_text().splitlines()
    (root / ENTRY).write_text("\n".join(rows + [rows[1]]) + "\n")
    with pytest.raises(DataError, match=f"line {len(rows) + 1}: Image Index {rows[1].split(',')[0]} appears twice"):
        Cxr14Source(root)
    (root / ENTRY).unlink()
    with pytest.raises(DataError, match="expected Data_Entry_2017_v2020.csv or Data_Entry_2017.csv in this folder"):
        Cxr14Source(root)


@pytest.mark.parametrize("text, message", [
    ("Image Index,Label,x,y,w,h,,,", None),
    ("00013118_008.png,Atelectasis,225.0,547.0,86.7", "line 2: expected 6 fields"),
    ("00013118_008.png,Atelectasis,225.0,547.0,86.7,7,3", "line 2: expected 6 fields"),
    ("00013118_008.png,Infiltrates,225.0,547.0,86.7,79.1", "line 2: unknown Finding Label 'Infiltrates'"),
    ("00013118_008.png,Mass,225.0,five,86.7,79.1", "line 2: y 'five' is not a finite number"),
    ("00013118_008.png,Mass,225.0,547.0,0,79.1", "line 2: box width and height must be positive"),
])
def test_malformed_bbox_file(tmp_path, synth, text, message):
    root = _labels_only(tmp_path, synth)
    if message is None:
        _edit(root / BBOX, 1, text)
        message = "line 1: header"
    else:
        _edit(root / BBOX, 2, text)
    with pytest.raises(DataError, match=f"{BBOX} {message}"):
        Cxr14Source(root)


def test_bbox_rows_with_trailing_empty_fields_and_unknown_images(tmp_path, synth):
    root = _labels_only(tmp_path, synth)
    lines = (root / BBOX).read_text().splitlines()
    (root / BBOX).write_text("\n".join([lines[0], lines[1] + ",,,"] + lines[2:]) + "\n")
    image_id = lines[1].split(",")[0]
    assert Cxr14Source(root).boxes(image_id) == Cxr14Source(synth[0]).boxes(image_id)
    (root / BBOX).write_text(lines[0] + "\n00000000_000.png,Mass,1,2,3,4\n")
    with pytest.raises(DataError, match="image 00000000_000.png has boxes but no row"):
        Cxr14Source(root)
    (root / BBOX).unlink()
    source = Cxr14Source(root)
    with pytest.raises(DataError, match="no BBox_List_2017.csv"):
        source.boxes(image_id)


def test_malformed_and_partial_list_files(tmp_path, synth):
    root = _labels_only(tmp_path, synth)
    train_val = (root / "train_val_list.txt").read_text().splitlines()
    test = (root / "test_list.txt").read_text().splitlines()
    (root / "test_list.txt").write_text("\n".join(test + [train_val[0]]) + "\n")
    with pytest.raises(DataError, match="test_list.txt: .* is also in train_val_list.txt"):
        Cxr14Source(root)
    (root / "test_list.txt").write_text("\n".join(test + ["00000000_000.png"]) + "\n")
    with pytest.raises(DataError, match="test_list.txt: 00000000_000.png has no row"):
        Cxr14Source(root)
    (root / "test_list.txt").write_text("\n".join(test + ["not an id"]) + "\n")
    with pytest.raises(DataError, match=f"test_list.txt line {len(test) + 1}: 'not an id' is not an Image Index"):
        Cxr14Source(root)
    (root / "test_list.txt").write_text("\n".join(test + [test[0]]) + "\n")
    with pytest.raises(DataError, match=f"test_list.txt line {len(test) + 1}: {test[0]} is listed twice"):
        Cxr14Source(root)
    (root / "test_list.txt").unlink()
    with pytest.raises(DataError, match="found train_val_list.txt but not test_list.txt"):
        Cxr14Source(root)
    (root / "train_val_list.txt").unlink()
    source = Cxr14Source(root)
    with pytest.raises(DataError, match="official split needs them"):
        source.official_split(train_val[0])
    with pytest.raises(DataError, match="split v1 needs the official"):
        split_v1(source)


# --- split v1 --------------------------------------------------------------------------------------

def _label_root(tmp_path, shipped_lines, patients, test_images):
    """A Data_Entry of the shipped rows of the first ``patients`` patients and official lists that put
    whole patients, in id order, into test until it holds ``test_images`` images; no PNGs."""
    header, *rows = shipped_lines[0]
    pid = {row.split(",")[0]: int(row.split(",")[3]) for row in rows}
    keep = sorted({*pid.values()})[:patients]
    kept = set(keep)
    rows = [row for row in rows if pid[row.split(",")[0]] in kept]
    ids = sorted(row.split(",")[0] for row in rows)
    sizes = Counter(pid[i] for i in ids)
    test_patients, size = set(), 0
    for p in keep[::-1]:
        if size + sizes[p] <= test_images:
            test_patients.add(p)
            size += sizes[p]
    root = tmp_path / f"labels{patients}"
    root.mkdir()
    (root / ENTRY).write_text("\n".join([header, *rows]) + "\n")
    (root / "test_list.txt").write_text("".join(f"{i}\n" for i in ids if pid[i] in test_patients))
    (root / "train_val_list.txt").write_text("".join(f"{i}\n" for i in ids if pid[i] not in test_patients))
    return root


def test_split_v1_at_full_scale_has_the_kad_sizes(tmp_path, monkeypatch, shipped_lines):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    split = split_v1(Cxr14Source(_label_root(tmp_path, shipped_lines, 30805, 25596)))
    sizes = {part: len(split.ids(part)) for part in split.parts}
    assert sizes == {"train": 77872, "val": 8652, "test": 25596, "train_1pct": 779, "train_10pct": 7787}
    assert split.columns == LABELS
    assert all(split.manifest["files"]["val.csv"]["positives"][label] > 0 for label in LABELS)


def test_split_v1_is_patient_disjoint_nested_stratified_and_deterministic(tmp_path, monkeypatch, shipped_lines):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    root = _label_root(tmp_path, shipped_lines, 2000, 1600)
    source = Cxr14Source(root)
    split = split_v1(source)
    train, val, test = (set(split.ids(p)) for p in ("train", "val", "test"))
    train_val = set((root / "train_val_list.txt").read_text().split())
    assert test == set((root / "test_list.txt").read_text().split()) and train | val == train_val
    patients = [{source.patient_id(i) for i in part} for part in (train, val, test)]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
    assert len(val) == round(0.1 * len(train_val))
    sub1, sub10 = set(split.ids("train_1pct")), set(split.ids("train_10pct"))
    assert sub1 < sub10 < train
    assert (len(sub10), len(sub1)) == (round(0.1 * len(train)), round(0.01 * len(train)))
    table = split.label_table("train")
    for label in LABELS:  # every finding of train has a positive in val and in the 1 % subset
        assert any(table[i][label] for i in sub1) and any(split.labels("val", label).values())
    assert split.label_table("test") == {i: source.labels(i) for i in test}

    again = split_v1(Cxr14Source(root))  # cached: the same folder
    assert again.version == split.version and again.manifest_sha256 == split.manifest_sha256
    build_split_v1(source, tmp_path / "rebuilt", split.version)
    folder = tmp_path / "cache" / "splits" / "cxr14" / split.version
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "rebuilt").iterdir()}


def test_split_v1_on_synth(tmp_path, monkeypatch, synth):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    source = Cxr14Source(synth[0])
    split = split_v1(source)
    assert set(split.ids("test")) == {i for i in source.image_ids if source.official_split(i) == "test"}
    assert len(split.ids("train")) + len(split.ids("val")) == N - len(split.ids("test"))
    assert source.missing(split.ids("train") + split.ids("val") + split.ids("test")) == []


def test_release_sizes_follow_the_split_rule():
    """The declared sizes of split v1 on the release obey its rule: train + val are the 86,524 train_val images,
    val about a tenth of them in whole patients, the subsets round(0.1 / 0.01 x train)."""
    from vlpbench.data.cxr14 import RELEASE_SIZES, SUBSETS

    sizes = RELEASE_SIZES["v1"]
    assert sizes["train"] + sizes["val"] == 86524 and sizes["test"] == 25596
    assert abs(sizes["val"] - round(0.1 * 86524)) < 20  # whole patients: close to, not exactly, a tenth
    assert sizes["train_10pct"] == round(sizes["train"] * SUBSETS["train_10pct"])
    assert sizes["train_1pct"] == round(sizes["train"] * SUBSETS["train_1pct"])


def test_release_sizes_are_what_the_rule_draws_on_the_release(tmp_path, shipped_lines):
    """Where a MedKLIP clone gives the official test list: split v1 built from the shipped Data_Entry and the two
    lists has exactly the declared sizes."""
    from vlpbench.data.cxr14 import RELEASE_SIZES

    data = file_at_commit("VLPBENCH_MEDKLIP_REPO", MEDKLIP_COMMIT, MEDKLIP_CXR14_TEST_FILE)
    if data is None:
        pytest.skip("no MedKLIP clone (set VLPBENCH_MEDKLIP_REPO) for the official test list")
    test = [row["Image Index"] for row in csv.DictReader(io.StringIO(data.decode()))]
    entry = shipped_lines[0]
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text("\n".join(entry) + "\n")
    listed = set(test)
    (tmp_path / "test_list.txt").write_text("\n".join(test) + "\n")
    (tmp_path / "train_val_list.txt").write_text(
        "\n".join(line.split(",", 1)[0] for line in entry[1:] if line.split(",", 1)[0] not in listed) + "\n")
    manifest = build_split_v1(Cxr14Source(tmp_path), tmp_path / "out")
    counts = {name.split(".")[0]: written["rows"] for name, written in manifest["files"].items()}
    assert counts == RELEASE_SIZES["v1"]
