"""MS-CXR reader and split v1 on synthetic data (never the real data)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from vlpbench.data.ms_cxr import CATEGORIES, MsCxrSource, build_split_v1, label_file_name, split_v1
from vlpbench.errors import DataError
from vlpbench.synthetic.ms_cxr import MIMIC, synth_ms_cxr


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms_cxr") / "ms-cxr"
    return root, synth_ms_cxr(root, n=30, seed=1, size=96, progress=False)


def _expected(phrase):
    category, text, boxes = phrase
    return category, text, [[x, y, x + w, y + h] for x, y, w, h in boxes]


def _as_lists(phrases):
    return [(c, t, b.tolist()) for c, t, b in phrases]


def test_reader_matches_what_was_written(synth):
    root, facts = synth
    source = MsCxrSource(root)
    assert source.image_ids == list(facts["images"]) and source.synthetic and source.has_split
    assert source.mimic_root == root / MIMIC and source.missing(source.image_ids) == []
    texts = []
    for image_id, image in facts["images"].items():
        assert _as_lists(source.phrases(image_id)) == [_expected(p) for p in image["phrases"]]
        assert source.image_size(image_id) == image["size"] == source.image(image_id).shape
        assert source.split(image_id) == image["split"]
        assert source.subject_id(image_id) == image["path"].split("/")[2][1:]
        for k, (_, text, boxes) in enumerate(image["phrases"]):
            texts.append(text)
            mask = source.mask(image_id, k)
            assert mask.shape == image["size"] and mask.any()
            for x, y, w, h in boxes:  # every box pixel is in the mask, and the mask lies in the boxes
                assert mask[y : y + h, x : x + w].all()
            assert mask.sum() <= sum(w * h for _, _, w, h in boxes)
    assert any("," in text for text in texts)  # quoted in the CSV
    assert any(len(p[2]) > 1 for image in facts["images"].values() for p in image["phrases"])  # repeated rows


def test_findings_are_drawn_in_their_boxes(synth):
    root, facts = synth
    source = MsCxrSource(root)
    contrasts: dict[str, list[float]] = {}
    for image_id in source.image_ids:
        pixels = source.image(image_id).astype(float)
        for k, (category, _, _) in enumerate(source.phrases(image_id)):
            inside = source.mask(image_id, k).astype(bool)
            contrasts.setdefault(category, []).append(pixels[inside].mean() - pixels[~inside].mean())
    # A box also holds body and heart, so single boxes vary; per finding the sign is clear.
    for category, values in contrasts.items():
        assert np.mean(values) < -10 if category == "Pneumothorax" else np.mean(values) > 10, (category, values)
    assert len(contrasts) >= 5


def test_json_only_and_mimic_root_option(synth, tmp_path):
    root, facts = synth
    copy = tmp_path / "labels"
    copy.mkdir()
    shutil.copy(root / label_file_name("1.1.0", ".json"), copy)
    source, original = MsCxrSource(copy), MsCxrSource(root)
    assert source.mimic_root is None and source.missing(source.image_ids) == source.image_ids
    with pytest.raises(DataError, match="pass mimic_root"):
        source.path(source.image_ids[0])
    source = MsCxrSource(copy, mimic_root=root / MIMIC)
    assert source.image_ids == original.image_ids and not source.has_split
    for image_id in source.image_ids:
        assert _as_lists(source.phrases(image_id)) == _as_lists(original.phrases(image_id))
        assert source.image_size(image_id) == original.image_size(image_id)
    with pytest.raises(DataError, match="expected the MIMIC-CXR-JPG release folder"):
        MsCxrSource(copy, mimic_root=tmp_path)


def test_split_v1_from_column_and_patient_wise(synth, tmp_path):
    root, facts = synth
    split = split_v1(MsCxrSource(root))
    for part in ("train", "val", "test"):
        assert split.ids(part) == sorted(i for i, image in facts["images"].items() if image["split"] == part)
    assert split.columns == CATEGORIES

    old = tmp_path / "v100"
    synth_ms_cxr(old, n=30, seed=1, size=96, version="1.0.0", progress=False)
    source = MsCxrSource(old)
    assert not source.has_split
    split = split_v1(source)
    assert split.parts == ("val", "test")
    val, test = split.ids("val"), split.ids("test")
    assert sorted(val + test) == sorted(source.image_ids)
    subjects = [{source.subject_id(i) for i in ids} for ids in (val, test)]
    assert not subjects[0] & subjects[1]
    assert len(subjects[0]) == round((len(subjects[0]) + len(subjects[1])) / 2)
    for image_id, row in split.label_table("val").items():
        assert row == {c: int(any(p[0] == c for p in source.phrases(image_id))) for c in CATEGORIES}
    build_split_v1(source, tmp_path / "a")
    build_split_v1(source, tmp_path / "b")
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()


@pytest.mark.parametrize("line, edit, message", [
    (0, lambda row: row.replace("label_text", "text"), "line 1: header"),
    (2, lambda row: row.replace(row.split(",")[1], "Nodule", 1), "line 3: category_name 'Nodule'"),
    (3, lambda row: row.replace("files/p1", "files/q1"), "line 4: path"),
    (1, lambda row: ",".join(row.split(",")[:6] + ["0"] + row.split(",")[7:]), "line 2: w is '0'"),
    (1, lambda row: row + ",x", "line 2: expected 11 fields"),
])
def test_malformed_csv(synth, tmp_path, line, edit, message):
    root, _ = synth
    name = label_file_name("1.1.0")
    rows = (root / name).read_text().split("\n")
    rows[line] = edit(rows[line])
    (tmp_path / name).write_text("\n".join(rows))
    with pytest.raises(DataError, match=f"{name} {message}"):
        MsCxrSource(tmp_path)


def test_missing_file_and_corrupt_image(synth, tmp_path):
    with pytest.raises(DataError, match="expected MS_CXR_Local_Alignment_v1.1.0.csv"):
        MsCxrSource(tmp_path)
    root = tmp_path / "copy"
    shutil.copytree(synth[0], root)
    source = MsCxrSource(root)
    broken = source.image_ids[0]
    source.path(broken).write_bytes(b"junk")
    with pytest.raises(DataError, match=broken):
        source.image(broken)


def test_synth_is_deterministic(synth, tmp_path):
    synth_ms_cxr(tmp_path / "again", n=30, seed=1, size=96, progress=False)
    for suffix in (".csv", ".json"):
        name = label_file_name("1.1.0", suffix)
        assert (tmp_path / "again" / name).read_bytes() == (synth[0] / name).read_bytes()
    image_id = next(iter(synth[1]["images"]))
    assert np.array_equal(MsCxrSource(tmp_path / "again").image(image_id), MsCxrSource(synth[0]).image(image_id))
