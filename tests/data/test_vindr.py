"""VinDr-CXR: the label files and their checks, box fusion, the reader on a synthetic copy, split v1, data check,
and vindr_cls / vindr_det from the command line."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest

from vlpbench import api
from vlpbench.cli import main
from vlpbench.data.check import check_dataset
from vlpbench.data.splits import load_split
from vlpbench.data.vindr import (
    FINDINGS,
    KAGGLE_TRAIN,
    LABELS,
    VindrSource,
    fuse_boxes,
    generate_split_v1,
    read_annotations,
    read_image_labels,
    read_kaggle_train,
)
from vlpbench.data.xrv_files import xrv_data_file
from vlpbench.errors import ConfigError, DataError
from vlpbench.splits import SPLITS_DIR
from vlpbench.synthetic.vindr import synth_vindr

ANNOTATION_HEADER = "image_id,rad_id,class_name,x_min,y_min,x_max,y_max"
A, B = "0" * 31 + "a", "0" * 31 + "b"


def _shipped_rows() -> dict[str, list[dict[str, str]]]:
    text = gzip.decompress(xrv_data_file(KAGGLE_TRAIN).read_bytes()).decode()
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in csv.DictReader(io.StringIO(text)):
        rows[row["image_id"]].append(row)
    return rows


@pytest.fixture(scope="module")
def shipped():
    """The Kaggle release's train rows that torchxrayvision ships, per image."""
    return _shipped_rows()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("vindr") / "vindr"
    synth_vindr(root, n=36, seed=0, size=96, progress=False)
    return root


# --- the shipped label file and split v1 ----------------------------------------------------------------------


def test_shipped_train_labels_hold_the_15000_train_images_read_by_three_radiologists(shipped):
    marked = read_kaggle_train(xrv_data_file(KAGGLE_TRAIN))
    assert len(marked) == len(shipped) == 15000
    assert sum(bool(names) for names in marked.values()) == 4394  # any finding by any radiologist
    assert Counter(len({r["rad_id"] for r in rows}) for rows in shipped.values()) == {3: 15000}
    assert {r["class_name"] for rows in shipped.values() for r in rows} == {*FINDINGS, "No finding"}


def test_split_v1_sizes_nesting_and_byte_identical_regeneration(tmp_path):
    split = load_split("vindr", "v1")
    sizes = {part: len(split.ids(part)) for part in split.parts}
    assert sizes == {"train": 12000, "val": 3000, "train_1pct": 120, "train_10pct": 1200}
    train, val = set(split.ids("train")), set(split.ids("val"))
    assert not train & val and len(train | val) == 15000
    assert set(split.ids("train_1pct")) < set(split.ids("train_10pct")) < train
    # val stratified on any finding: 29.3 % abnormal in both parts.
    abnormal = {part: sum(split.labels(part, "abnormal").values()) for part in ("train", "val")}
    assert abnormal == {"train": 3515, "val": 879}
    for part in ("train_1pct", "train_10pct"):  # every finding keeps a positive
        table = split.label_table(part)
        assert all(sum(row[c] for row in table.values()) > 0 for c in split.columns)
    manifest = generate_split_v1(tmp_path)
    for name in manifest["files"]:
        assert (tmp_path / name).read_bytes() == (SPLITS_DIR / "vindr" / "v1" / name).read_bytes()
    assert json.loads((SPLITS_DIR / "vindr" / "v1" / "MANIFEST.json").read_text()) == manifest


# --- label files ------------------------------------------------------------------------------------------------


def _write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def _label_row(image_id, *marked, radiologist=None):
    values = ["1" if name in marked else "0" for name in LABELS]
    return ",".join([image_id, *([radiologist] if radiologist else []), *values])


def test_annotation_rows_are_read_by_name_with_their_lines(tmp_path):
    path = _write(tmp_path, "annotations_train.csv", "\n".join([
        "rad_id,image_id,class_name,x_min,y_min,x_max,y_max",  # columns in another order: read by name
        f"R1,{A},No finding,,,,",
        f"R2,{A},Nodule/Mass,10.0,20.5,30.0,40.0",
        f"R3,{B},Rib fracture,1,2,3,4"]) + "\n")
    rows = read_annotations(path)
    assert [(r.line, r.radiologist, r.class_name, r.box) for r in rows[A]] == [
        (2, "R1", "No finding", None), (3, "R2", "Nodule/Mass", (10.0, 20.5, 30.0, 40.0))]
    assert rows[B][0].box == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize("row,message", [
    (f"{A},R1,Nodule/Mass,10,20,,40", "y_min '' is not a number|x_max '' is not a number"),
    (f"{A},R1,No finding,1,2,3,4", "must leave x_min, y_min, x_max, y_max empty"),
    (f"{A},R1,Pneumonia,1,2,3,4", "class_name 'Pneumonia' is neither"),
    (f"{A[:-1]}G,R1,No finding,,,,", "is not a VinDr-CXR id"),
    (f"{A},R1,Nodule/Mass,1,2,inf,4", "must be a finite number"),
    (f"{A},R1,No finding,,,", "expected 7 fields, found 6"),
])
def test_bad_annotation_rows_name_file_and_line(tmp_path, row, message):
    path = _write(tmp_path, "annotations_test.csv", f"{ANNOTATION_HEADER}\n{A},R1,No finding,,,,\n{row}\n")
    with pytest.raises(DataError, match=rf"annotations_test.csv line 3: .*({message})"):
        read_annotations(path)
    header = _write(tmp_path, "bad.csv", "image_id,rad_id,class_name,x_min,y_min,x_max\n")
    with pytest.raises(DataError, match="bad.csv line 1: .* lacks 'y_max'"):
        read_annotations(header)


def test_train_labels_are_positive_when_any_radiologist_marks_them(tmp_path):
    header = ",".join(["image_id", "rad_ID", *LABELS])
    path = _write(tmp_path, "image_labels_train.csv", "\n".join([
        header, _label_row(A, "Cardiomegaly", radiologist="R8"), _label_row(A, "No finding", radiologist="R9"),
        _label_row(A, "Cardiomegaly", "COPD", radiologist="R10"), _label_row(B, "No finding", radiologist="R8")]) + "\n")
    labels = read_image_labels(path, per_radiologist=True)
    assert {k for k, v in labels[A].items() if v} == {"Cardiomegaly", "COPD", "No finding"}
    assert {k for k, v in labels[B].items() if v} == {"No finding"}
    # The radiologist column as rad_id, the test file's "Other disease": both spellings read.
    lower = _write(tmp_path, "lower.csv", header.replace("rad_ID", "rad_id") + "\n" + _label_row(A, radiologist="R1") + "\n")
    assert read_image_labels(lower, per_radiologist=True)[A]["Other diseases"] == 0
    test_header = ",".join(["image_id", *LABELS]).replace("Other diseases", "Other disease")
    test = _write(tmp_path, "image_labels_test.csv", test_header + "\n" + _label_row(A, "Other diseases") + "\n")
    assert read_image_labels(test, per_radiologist=False)[A]["Other diseases"] == 1


def test_bad_label_files_are_refused(tmp_path):
    header = ",".join(["image_id", *LABELS])
    twice = _write(tmp_path, "image_labels_test.csv", "\n".join([header, _label_row(A), _label_row(A)]) + "\n")
    with pytest.raises(DataError, match="line 3: image 0+a has a second row"):
        read_image_labels(twice, per_radiologist=False)
    two = _write(tmp_path, "two.csv", header + "\n" + _label_row(A).replace(",0", ",2", 1) + "\n")
    with pytest.raises(DataError, match="two.csv line 2: Aortic enlargement is '2'; expected 0 or 1"):
        read_image_labels(two, per_radiologist=False)
    with pytest.raises(DataError, match="lacks the radiologist column"):
        read_image_labels(two, per_radiologist=True)
    short = _write(tmp_path, "short.csv", header.replace(",COPD", "") + "\n")
    with pytest.raises(DataError, match="lacks the label column.*'COPD'"):
        read_image_labels(short, per_radiologist=False)


# --- box fusion -------------------------------------------------------------------------------------------------


def test_weighted_box_fusion_averages_each_overlapping_cluster():
    boxes = np.array([[0.0, 0, 10, 10], [1, 1, 11, 11], [100, 100, 120, 130], [0, 0, 10, 12], [101, 99, 121, 131]])
    fused = fuse_boxes(boxes)
    # First cluster: boxes 0, 1 (IoU 81/119 = 0.68) and 3 (IoU with the fused box > 0.5); second: 2 and 4.
    np.testing.assert_allclose(fused, [[1 / 3, 1 / 3, 31 / 3, 11], [100.5, 99.5, 120.5, 130.5]])
    # At IoU exactly at the threshold a box stays apart (WBF joins above it): 50 / 150 = 1/3.
    apart = fuse_boxes(np.array([[0.0, 0, 10, 10], [5, 0, 15, 10]]), iou_threshold=1 / 3)
    assert len(apart) == 2
    assert fuse_boxes(np.zeros((0, 4))).shape == (0, 4)


# --- the reader on a synthetic copy -------------------------------------------------------------------------------


def test_synthetic_copy_holds_real_train_rows_in_the_real_layout(synthetic, shipped):
    source = VindrSource(synthetic)
    assert source.synthetic and source.folder == synthetic
    train, test = source.ids_of("train"), source.ids_of("test")
    assert len(train) == 30 and len(test) == 6
    v1 = load_split("vindr", "v1")
    assert set(train) <= set().union(*(v1.ids(p) for p in v1.parts)) and not set(test) & set(shipped)
    for part in v1.parts:  # every part of the split has images in the copy
        assert set(v1.ids(part)) & set(train)
    for image_id in train:
        rows, real = source.annotations(image_id), shipped[image_id]
        assert [(r.radiologist, r.class_name) for r in rows] == [(r["rad_id"], r["class_name"]) for r in real]
        boxes = np.array([r.box for r in rows if r.box is not None]).reshape(-1, 4)
        real_boxes = np.array([[float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max")] for r in real
                               if r["class_name"] != "No finding"]).reshape(-1, 4)
        if len(boxes):  # the real boxes, scaled by one factor to the smaller film (written with one decimal)
            scale = np.sum(boxes * real_boxes) / np.sum(real_boxes**2)
            np.testing.assert_allclose(boxes, real_boxes * scale, atol=0.06)
        height, width = source.image_size(image_id)
        assert source.image(image_id).shape == (height, width) and max(height, width) == 96
        assert not source.geometry_problems(image_id, height, width)


def test_train_labels_follow_any_radiologist_and_test_labels_the_consensus(synthetic, shipped):
    source = VindrSource(synthetic)
    single = 0
    for image_id in source.ids_of("train"):
        marked = defaultdict(set)
        for row in shipped[image_id]:
            marked[row["class_name"]].add(row["rad_id"])
        single += sum(len(rads) == 1 for name, rads in marked.items() if name != "No finding")
        assert source.class_labels(image_id, FINDINGS, {}) == [int(name in marked) for name in FINDINGS]
        assert source.labels(image_id)["No finding"] == int("No finding" in marked)
    assert single > 0  # the sample holds findings that one radiologist of three marked: positive all the same
    for image_id in source.ids_of("test"):
        boxed = {row.class_name for row in source.annotations(image_id) if row.box is not None}
        assert source.class_labels(image_id, FINDINGS, {}) == [int(name in boxed) for name in FINDINGS]
    with pytest.raises(ConfigError, match="not in dataset reader VindrSource"):
        source.class_labels(source.image_ids[0], ["Effusion"], {})


def test_detection_boxes_fuse_the_radiologists_on_train_and_keep_the_consensus_on_test(synthetic):
    source = VindrSource(synthetic)
    classes = list(FINDINGS)
    checked = 0
    for image_id in source.ids_of("train"):
        boxes, labels = source.detection_boxes(image_id, classes)
        every, every_labels = source.detection_boxes(image_id, classes, box_fusion="none")
        assert len(every) == len(source.boxes(image_id)) and len(boxes) <= len(every)
        for c in set(every_labels.tolist()):
            np.testing.assert_allclose(boxes[labels == c], fuse_boxes(every[every_labels == c]))
            checked += int(np.sum(every_labels == c) > np.sum(labels == c))
    assert checked > 0  # some radiologists' boxes were merged
    image_id = next(i for i in source.ids_of("test") if len(source.boxes(i)))
    boxes, labels = source.detection_boxes(image_id, classes, box_fusion="wbf")
    np.testing.assert_array_equal(boxes, source.detection_boxes(image_id, classes, box_fusion="none")[0])
    assert [classes[k] for k in labels] == [r.class_name for r in source.annotations(image_id) if r.box is not None]
    with pytest.raises(ConfigError, match="box_fusion must be one of"):
        source.detection_boxes(image_id, classes, box_fusion="mean")
    with pytest.raises(ConfigError, match="'COPD' are not VinDr-CXR local labels"):
        source.detection_boxes(image_id, ["COPD"])


def test_findings_are_drawn_where_the_boxes_are(synthetic):
    source = VindrSource(synthetic)
    inside, outside = [], []
    for image_id in source.ids_of("train"):
        boxes = source.boxes(image_id)
        if not len(boxes):
            continue
        image = source.image(image_id).astype(float)
        mask = np.zeros(image.shape, dtype=bool)
        for x1, y1, x2, y2 in boxes.astype(int):
            mask[y1:y2, x1:x2] = True
        inside.append(image[mask].mean())
        outside.append(image[~mask].mean())
    assert np.mean(inside) > np.mean(outside) + 20


def test_the_test_part_is_every_image_of_the_users_test_files(synthetic):
    from vlpbench.data.splits import test_part_split

    source = VindrSource(synthetic)
    split = test_part_split("vindr", source)
    assert split.ids("test") == sorted(source.ids_of("test")) and split.parts == ("test",)
    abnormal = split.labels("test", "abnormal")
    assert abnormal == {i: int(bool(len(source.boxes(i)))) for i in source.ids_of("test")}


def test_inconsistent_files_are_refused(synthetic, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synthetic / "annotations", root / "annotations")
    labels = root / "annotations" / "image_labels_test.csv"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[:-1]) + "\n")  # the last test image loses its label row
    with pytest.raises(DataError, match=r"image_labels_test.csv: no row for 1 image\(s\) of the other test file"):
        VindrSource(root)
    with pytest.raises(DataError, match="no VinDr-CXR label files; expected annotations/annotations_train.csv"):
        VindrSource(tmp_path / "copy" / "annotations")


def test_data_check_names_a_box_outside_its_image_with_file_and_line(synthetic, tmp_path):
    root = tmp_path / "vindr"
    shutil.copytree(synthetic, root)
    path = root / "annotations" / "annotations_train.csv"
    lines = path.read_text().splitlines()
    number = next(k for k, line in enumerate(lines) if ",No finding," not in line and k > 0)
    fields = lines[number].split(",")
    fields[5] = "5000.0"  # x_max far outside the 96-pixel film
    lines[number] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    report = check_dataset("vindr", root, progress=False)
    assert not report.ok
    assert any(f"annotations_train.csv line {number + 1}: image {fields[0]}: box x " in e and "reaches outside" in e
               for e in report.errors)
    assert check_dataset("vindr", synthetic, progress=False).ok


# --- the tasks from the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("task,options", [
    ("vindr_det", ["--set", "neck_width=32"]),
    ("vindr_cls", ["--set", "resize_size=64"]),
])
def test_vindr_tasks_run_from_the_cli(synthetic, tmp_path, resnet18_checkpoint, task, options):
    results = tmp_path / "results"
    argv = ["-q", "run", "--model", "generic", "--checkpoint", str(resnet18_checkpoint), "--model-option",
            "arch=resnet18", "--task", task, "--frac", "1.0", "--data-root", str(synthetic), "--results",
            str(results), "--device", "cpu", "--set", "image_size=64", "--set", "max_epochs=1", "--set", "batch_size=8",
            "--set", "bootstrap_resamples=20", *options]
    assert main(argv) == 0
    (path,) = (results / "runs").rglob("*.json")
    record = json.loads(path.read_text())
    source = VindrSource(synthetic)
    assert record["n"]["test"] == len(source.ids_of("test")) == 6 and record["split"]["dataset"] == "vindr"
    primary = record["primary_metric"]
    assert primary == {"vindr_det": "ap40", "vindr_cls": "auc"}[task]
    assert record["ci"][primary]["low"] <= record["metrics"][primary] <= record["ci"][primary]["high"]
    if task == "vindr_det":
        boxes = sum(len(source.detection_boxes(i, FINDINGS)[0]) for i in source.ids_of("test"))
        assert record["n"]["test_boxes"] == boxes


def test_vindr_det_predictions_carry_classes_and_score_as_the_run(synthetic, tmp_path, resnet18_checkpoint):
    overrides = {"image_size": 64, "max_epochs": 1, "neck_width": 32, "batch_size": 8, "conf_threshold": 0.0,
                 "bootstrap_resamples": 20}
    record, _ = api.run("generic", "vindr_det", 1.0, checkpoint=resnet18_checkpoint, model_options={"arch": "resnet18"},
                        data_root=synthetic, results=tmp_path / "results", overrides=overrides, device="cpu",
                        progress=False, save_predictions=tmp_path / "predictions")
    entries = json.loads((tmp_path / "predictions" / "detections.json").read_text())
    assert len(entries) == record["n"]["test_detections"] > 0
    assert {e["category_id"] for e in entries} <= set(range(14))
    labels = tmp_path / "labels"  # score reads the label files only
    shutil.copytree(synthetic, labels, ignore=shutil.ignore_patterns("*.dicom"))
    scored = api.score("vindr_det", tmp_path / "predictions", data_root=labels, overrides=overrides)
    assert scored["metrics"] == record["metrics"] and scored["ci"] == record["ci"]
    assert set(record["ci"]) == {name for name, value in record["metrics"].items() if value is not None}
