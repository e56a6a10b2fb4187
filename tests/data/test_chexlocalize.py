"""CheXlocalize: the COCO RLE codec against pycocotools, the reader on a synthetic copy, bad entries named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from vlpbench import api
from vlpbench.data import coco_rle
from vlpbench.data.chexlocalize import PATHOLOGIES, ChexlocalizeSource, read_masks
from vlpbench.data.splits import dataset_split
from vlpbench.errors import DataError

SIZE = 64


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexlocalize")
    return root, api.synth("chexlocalize", root, n=10, size=SIZE, progress=False)


def test_rle_decode_and_encode_agree_with_pycocotools_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if rng.random() < 0.3:  # long runs, whose differences need several 5-bit groups and the sign bit
            mask[:] = 0
            mask[rng.integers(h):, rng.integers(w):] = 1
        reference = coco_mask.encode(np.asfortranarray(mask))
        text = reference["counts"].decode()
        assert coco_rle.encode(mask) == {"size": [h, w], "counts": text}
        np.testing.assert_array_equal(coco_rle.decode({"size": [h, w], "counts": text}), mask)
    large = np.zeros((2320, 2828), dtype=np.uint8)
    large[900:1700, 400:2400] = 1
    text = coco_mask.encode(np.asfortranarray(large))["counts"].decode()
    np.testing.assert_array_equal(coco_rle.decode({"size": [2320, 2828], "counts": text}), large)


@pytest.mark.parametrize("entry, message", [
    ({"size": [4, 4], "counts": "0"}, "cover 0 pixels"),
    ({"size": [4, 4], "counts": "4~"}, "outside the format"),
    ({"size": [4, 4], "counts": "R"}, "ends inside a number"),
    ({"size": [4, 0], "counts": "0"}, "two positive integers"),
    ({"size": [4, 4]}, "expected {'size'"),
])
def test_bad_rle_entries_are_named(entry, message):
    with pytest.raises(DataError, match=message):
        coco_rle.decode(entry, "file.json 'x'")


def test_reader_reads_the_synthetic_copy(synth):
    root, written = synth
    source = ChexlocalizeSource(root)
    assert source.image_ids == list(written["images"]) and source.synthetic
    assert source.missing(source.image_ids) == []
    for image_id, info in written["images"].items():
        assert source.part(image_id) == info["part"]
        assert source.pathologies(image_id) == info["pathologies"]
        assert source.image(image_id).shape == (SIZE, SIZE)
        assert source.chexpert_path(image_id) == (f"{info['part']}/" + image_id.replace("_study", "/study")
                                                 .replace("_view", "/view") + ".jpg")
    # The masks equal what pycocotools decodes from the same file.
    raw = json.loads((root / "CheXlocalize" / "gt_segmentations_test.json").read_text())
    for image_id, entry in raw.items():
        for name in PATHOLOGIES:
            expected = coco_mask.decode({"size": entry[name]["size"], "counts": entry[name]["counts"].encode()})
            np.testing.assert_array_equal(source.mask(image_id, name), expected)
            assert bool(expected.any()) == (name in source.pathologies(image_id))
    split = dataset_split("chexlocalize", source, "v1")
    assert split.ids("val") == [i for i, info in written["images"].items() if info["part"] == "val"]
    assert split.ids("test") == [i for i, info in written["images"].items() if info["part"] == "test"]


def _write(tmp_path, edit):
    entry = {name: coco_rle.encode(np.zeros((4, 5))) for name in PATHOLOGIES}
    data = {"patient64541_study1_view1_frontal": entry}
    edit(data, entry)
    path = tmp_path / "gt_segmentations_val.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d, e: e.update({"Lung Opacity": e["Edema"]}), "unknown pathology 'Lung Opacity'"),
    (lambda d, e: e.pop("Edema"), "lacks pathology 'Edema'"),
    (lambda d, e: e.update({"Edema": coco_rle.encode(np.zeros((5, 5)))}), "'Edema' has size"),
    (lambda d, e: e.update({"Edema": {"size": [4, 5], "counts": "2"}}), "'Edema': RLE runs cover 2"),
    (lambda d, e: e.update({"img_size": [5, 4]}), "img_size"),
    (lambda d, e: d.update({"patient64541/study1": e}), "expected patient<N>_study<N>"),
])
def test_bad_json_entries_are_named(tmp_path, edit, message):
    path = _write(tmp_path, edit)
    with pytest.raises(DataError, match=message) as caught:
        read_masks(path)
    assert str(path) in str(caught.value)


def test_an_image_of_another_size_than_its_masks_is_refused(synth, tmp_path):
    root, written = synth
    source = ChexlocalizeSource(root)
    image_id = source.image_ids[0]
    source._masks[image_id] = ((SIZE, SIZE + 1), source._masks[image_id][1])
    with pytest.raises(DataError, match="masks are 65x64"):
        source.image(image_id)
