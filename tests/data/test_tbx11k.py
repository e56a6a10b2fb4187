"""TBX11K: XML parsing and its named errors, the reader on the synthetic copy, split v1 regeneration, and
tbx11k_cls / tbx11k_seg run from the CLI on the synthetic copy."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlpbench import api
from vlpbench.cli import main
from vlpbench.data.splits import load_split
from vlpbench.data.tbx11k import Tbx11kSource, boxes_to_mask, generate_split_v1, parse_xml
from vlpbench.errors import DataError
from vlpbench.synthetic.tbx11k import format_xml, synth_tbx11k


def _xml(objects: str, size: str = "<size><width>512</width><height>512</height></size>") -> str:
    return f"<annotation>{size}{objects}</annotation>"


def _object(name="ActiveTuberculosis", box=(10, 20, 110, 220)):
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def test_parse_xml_reads_size_and_boxes():
    size, boxes = parse_xml(_xml(_object() + _object("ObsoletePulmonaryTuberculosis", (0, 0, 512, 512))), "a.xml")
    assert size == (512, 512)
    assert boxes == [("ActiveTuberculosis", 10, 20, 110, 220), ("ObsoletePulmonaryTuberculosis", 0, 0, 512, 512)]


def test_format_xml_round_trips():
    boxes = [("PulmonaryTuberculosis", 1, 2, 30, 40)]
    assert parse_xml(format_xml("tb0001", boxes), "x") == ((512, 512), boxes)


@pytest.mark.parametrize("text, message", [
    ("<annotation><size>", "b.xml: malformed XML"),
    (_xml(_object("Tuberculosis")), "b.xml object 1: class 'Tuberculosis'"),
    (_xml(_object(box=(10, 20, 600, 220))), "b.xml object 1: box x 10..600, y 20..220 reaches outside the 512x512"),
    (_xml(_object(box=(10, 20, 10, 220))), "has no area"),
    (_xml(_object().replace("<xmin>10</xmin>", "<xmin>ten</xmin>")), "b.xml object 1: <xmin> 'ten' is not a number"),
    ("<voc></voc>", "root element <voc>"),
])
def test_parse_xml_names_the_file_and_problem(text, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_xml(text, "b.xml")


def test_boxes_to_mask_truncates_xywh_as_benchx():
    mask = boxes_to_mask(np.array([[1.7, 2.2, 4.9, 5.1]]), 8, 8)
    # x 1, y 2, w int(3.2) = 3, h int(2.9) = 2
    expected = np.zeros((8, 8), np.uint8)
    expected[2:4, 1:4] = 1
    assert np.array_equal(mask, expected)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tbx11k")
    synth_tbx11k(out, n=12, seed=1, progress=False)
    return out


def test_reader_on_synthetic_copy(synth):
    source = Tbx11kSource(synth)
    split = load_split("tbx11k", "v1")
    assert source.synthetic and len(source.image_ids) == 12
    assert set(source.image_ids) <= set().union(*(split.ids(p) for p in ("train", "val", "test")))
    for image_id in source.image_ids:
        name = {"h": "healthy", "s": "sick_but_no_tb", "t": "tb"}[image_id[0]]
        assert source.class_labels(image_id, source.classes, {}) == [int(c == name) for c in source.classes]
        assert source.image(image_id).shape == (512, 512)
        size, boxes = parse_xml((synth / "annotations" / "xml" / f"{image_id}.xml").read_text(), "x") \
            if name == "tb" else ((512, 512), [])
        assert source.boxes(image_id).tolist() == [list(b[1:]) for b in boxes]
        assert source.mask(image_id).sum() == boxes_to_mask(source.boxes(image_id), 512, 512).sum()
        assert (source.mask(image_id).sum() > 0) == (name == "tb")
        assert source.geometry_problems(image_id, 512, 512) == []
    assert source.missing(source.image_ids) == [] and source.unlabelled(["h9999"]) == ["h9999"]


def test_reader_scales_boxes_from_the_annotated_size_and_names_bad_xml(synth, tmp_path):
    source = Tbx11kSource(synth)
    tb = next(i for i in source.image_ids if i.startswith("tb"))
    xml = synth / "annotations" / "xml" / f"{tb}.xml"
    original = xml.read_text()
    try:
        xml.write_text(_xml(_object(box=(0, 100, 1000, 2000)),
                            "<size><width>2000</width><height>2000</height></size>"))
        assert Tbx11kSource(synth).boxes(tb).tolist() == [[0, 25.6, 256, 512]]
        xml.write_text("<annotation>")
        with pytest.raises(DataError, match=f"{tb}.xml: malformed XML"):
            Tbx11kSource(synth).boxes(tb)
    finally:
        xml.write_text(original)


def test_split_v1_regenerates_byte_identical(tmp_path):
    manifest = generate_split_v1(tmp_path)
    committed = Path(load_split("tbx11k", "v1").manifest and __file__).parents[2] / "splits" / "tbx11k" / "v1"
    for name in manifest["files"]:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes()
    split = load_split("tbx11k", "v1")
    assert [len(split.ids(p)) for p in ("train", "val", "test", "train_10pct", "train_1pct")] == [5879, 1260, 1260, 587, 58]
    assert set(split.ids("train_1pct")) <= set(split.ids("train_10pct")) <= set(split.ids("train"))
    assert sum(split.labels("test").values()) == 120


def _present(split, source, part):
    return [i for i in split.ids(part) if i in set(source.image_ids)]


def _cli_record(task: str, synth, results, checkpoint, *options: str) -> dict:
    """The record of ``task`` run from the CLI on the synthetic copy with the tiny ResNet-18, after checking that
    each part holds every split id the copy has."""
    sets = [arg for option in ("max_epochs=1", "batch_size=4", "bootstrap_resamples=20", *options)
            for arg in ("--set", option)]
    assert main(["-q", "run", "--model", "generic", "--checkpoint", str(checkpoint), "--model-option",
                 "arch=resnet18", "--task", task, "--frac", "1.0", "--data-root", str(synth), "--results",
                 str(results), "--device", "cpu", *sets]) == 0
    (path,) = (results / "runs").rglob("*.json")
    record = json.loads(path.read_text())
    source, split = Tbx11kSource(synth), load_split("tbx11k", "v1")
    for part in ("train", "val", "test"):
        assert record["n"][part] == len(_present(split, source, part)) > 0
    return record


def test_tbx11k_cls_runs_from_the_cli(synth, tmp_path, resnet18_checkpoint):
    record = _cli_record("tbx11k_cls", synth, tmp_path / "results", resnet18_checkpoint, "image_size=32",
                         "resize_size=32")
    source, split = Tbx11kSource(synth), load_split("tbx11k", "v1")
    assert record["primary_metric"] == "acc" and record["split"]["dataset"] == "tbx11k"
    test = _present(split, source, "test")
    assert record["metrics"]["acc"] * len(test) == pytest.approx(sum(record["per_image"][i] for i in test))
    assert record["ci"]["acc"]["low"] <= record["metrics"]["acc"] <= record["ci"]["acc"]["high"]


def test_tbx11k_seg_runs_from_the_cli_and_scores_true_masks_as_dice_1(synth, tmp_path, resnet18_checkpoint):
    results = tmp_path / "results"
    record = _cli_record("tbx11k_seg", synth, results, resnet18_checkpoint, "image_size=64", "augment=false")
    source, split = Tbx11kSource(synth), load_split("tbx11k", "v1")
    test = _present(split, source, "test")
    assert record["primary_metric"] == "dice"
    assert 0.0 <= record["metrics"]["dice"] <= 1.0
    truth = tmp_path / "truth"
    truth.mkdir()
    for image_id in test:
        Image.fromarray(source.mask(image_id) * 255).save(truth / f"{image_id}.png")
    scored = api.score("tbx11k_seg", truth, data_root=synth)
    assert scored["metrics"]["dice"] == 1.0 and scored["n"]["test"] == len(test)
    assert main(["score", "--task", "tbx11k_seg", "--predictions", str(truth), "--data-root", str(synth)]) == 0
