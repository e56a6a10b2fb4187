"""SIIM-ACR reader: relative RLE, label files (stage 1 and 2), the DICOM tree, the shipped files."""

from __future__ import annotations

import gzip
import importlib.util
import json

import numpy as np
import pytest

from vlpbench.data.dicom import write_dicom
from vlpbench.data.siim import SiimSource, decode_rle, encode_rle, read_labels
from vlpbench.data.xrv_files import SIIM_RLE, xrv_data_file
from vlpbench.errors import DataError

# The first positive image of the stage-2 file (docs/datasets.md, "SIIM relative RLE", gives its
# decoded extent).
FIRST_POSITIVE = "1.2.276.0.7230010.3.1.4.8323329.13666.1517875247.117800"


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[str]]:
    """The real stage-2 labels shipped in torchxrayvision."""
    return read_labels(xrv_data_file(SIIM_RLE))


def test_shipped_label_file_counts(shipped):
    assert len(shipped) == 12047
    assert sum(len(rows) for rows in shipped.values()) == 12954
    assert sum(rows[0] != "-1" for rows in shipped.values()) == 2669
    assert max(len(rows) for rows in shipped.values()) == 10


def test_decode_real_rows_round_trip_through_encode(shipped):
    rows = [rle for rows in shipped.values() if rows[0] != "-1" for rle in rows][:60]
    for rle in rows:
        mask = decode_rle(rle)
        assert mask.shape == (1024, 1024) and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 1}
        assert encode_rle(mask) == rle


def test_decode_first_positive_row_matches_reference_numbers(shipped):
    mask = decode_rle(shipped[FIRST_POSITIVE][0])
    rows, cols = np.nonzero(mask)
    assert mask.sum() == 30859
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (125, 390, 544, 795)


def test_decode_hand_made_against_direct_computation():
    height, width = 6, 4
    # pos 2: set 3 pixels (2, 3, 4) -> pos 5; pos 10: set 1 pixel -> pos 11; pos 13: set 2 (13, 14).
    rle = " 2 3 5 1 2 2 "
    flat = np.zeros(height * width, dtype=np.uint8)
    flat[[2, 3, 4, 10, 13, 14]] = 1
    expected = np.zeros((height, width), dtype=np.uint8)
    for k in range(height * width):
        expected[k % height, k // height] = flat[k]
    mask = decode_rle(rle, height, width)
    np.testing.assert_array_equal(mask, expected)
    assert mask[2, 0] == 1 and mask[4, 1] == 1 and mask[1, 2] == 1 and mask[2, 2] == 1
    assert encode_rle(mask) == "2 3 5 1 2 2"


def test_encode_closes_a_run_on_the_last_pixel_and_empty_is_minus_one():
    mask = np.zeros((5, 3), dtype=np.uint8)
    mask[3:, 2] = 1  # flat 13 and 14: the last two pixels
    assert encode_rle(mask) == "13 2"
    np.testing.assert_array_equal(decode_rle("13 2", 5, 3), mask)
    assert encode_rle(np.zeros((5, 3))) == "-1"
    assert not decode_rle(" -1", 5, 3).any()


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 3", "odd number of values (3)"),
        ("1 2 x 4", "token 'x' is not an integer"),
        ("1 2.5", "token '2.5' is not an integer"),
        ("1 -2", "value -2 is negative"),
        ("20 3 1 1", "past the end"),
        ("", "empty RLE"),
    ],
)
def test_decode_malformed_rle_names_where(rle, message):
    with pytest.raises(DataError) as info:
        decode_rle(rle, 4, 6, where="stage_2_train.csv line 17")
    assert str(info.value).startswith("stage_2_train.csv line 17: ")
    assert message in str(info.value)


ROWS = [
    ("1.2.3.1", "-1"),
    ("1.2.3.2", "5 3 10 2"),
    ("1.2.3.3", "-1"),
    ("1.2.3.2", "40 4"),
]


def _write(path, header, rows, space=""):
    path.write_text(header + "\n" + "".join(f"{i},{space}{rle}\n" for i, rle in rows))
    return path


def test_stage1_and_stage2_headers_read_to_the_same_labels(tmp_path):
    stage2 = read_labels(_write(tmp_path / "stage_2_train.csv", "ImageId,EncodedPixels", ROWS))
    stage1 = read_labels(_write(tmp_path / "train-rle.csv", "ImageId, EncodedPixels", ROWS, space=" "))
    gz = tmp_path / "labels.csv.gz"
    gz.write_bytes(gzip.compress((tmp_path / "stage_2_train.csv").read_bytes()))
    expected = {"1.2.3.1": ["-1"], "1.2.3.2": ["5 3 10 2", "40 4"], "1.2.3.3": ["-1"]}
    assert stage2 == stage1 == read_labels(gz) == expected
    assert list(stage2) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]


def test_crlf_line_endings_are_accepted(tmp_path):
    path = tmp_path / "train-rle.csv"
    path.write_bytes(b"ImageId, EncodedPixels\r\n1.2.3.1, -1\r\n1.2.3.2, 5 3\r\n")
    assert read_labels(path) == {"1.2.3.1": ["-1"], "1.2.3.2": ["5 3"]}


def test_bad_header_names_file_and_header(tmp_path):
    path = _write(tmp_path / "stage_2_train.csv", "ImageId,Pixels", ROWS)
    with pytest.raises(DataError) as info:
        read_labels(path)
    message = str(info.value)
    assert str(path) in message and "'ImageId,Pixels'" in message and "ImageId,EncodedPixels" in message


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ("1.2.3.9,5 3,7", "expected 2 fields"),
        ("1.2.3.9", "expected 2 fields"),
        (",5 3", "empty ImageId"),
        ("1.2.3.9,5 x", "token 'x' is not an integer"),
        ("1.2.3.9,5 3 2", "odd number of values"),
        ("1.2.3.2,-1", "mixes -1"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, bad_row, message):
    path = tmp_path / "stage_2_train.csv"
    path.write_text("ImageId,EncodedPixels\n1.2.3.1,-1\n1.2.3.2,5 3\n" + bad_row + "\n")
    with pytest.raises(DataError) as info:
        read_labels(path)
    assert str(info.value).startswith(f"{path} line 4: ")
    assert message in str(info.value)


def test_missing_label_file(tmp_path):
    with pytest.raises(DataError, match="label file not found"):
        read_labels(tmp_path / "stage_2_train.csv")


def _dicom(path, image_id, value):
    pixels = np.full((32, 48), value, dtype=np.uint8)
    pixels[:, :8] = 0
    write_dicom(
        path / f"{image_id}.dcm",
        pixels,
        sop_instance_uid=image_id,
        study_instance_uid=image_id + ".1",
        series_instance_uid=image_id + ".2",
        patient_id="p",
        patient_sex="F",
        patient_age=40,
        view_position="AP",
    )


@pytest.fixture
def tree(tmp_path):
    """A tiny SIIM tree: the label file in a subfolder, two of three DICOMs nested below."""
    (tmp_path / "labels").mkdir()
    _write(tmp_path / "labels" / "stage_2_train.csv", "ImageId,EncodedPixels", ROWS)
    _dicom(tmp_path / "dicom-images-train" / "s1" / "r1", "1.2.3.1", 200)
    _dicom(tmp_path / "dicom-images-train" / "s2" / "r2", "1.2.3.2", 100)
    return tmp_path


def test_siim_source_reads_the_tree(tree):
    source = SiimSource(tree)
    assert source.label_file == tree / "labels" / "stage_2_train.csv"
    assert source.image_ids == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert [source.label(i) for i in source.image_ids] == [0, 1, 0]
    assert source.path("1.2.3.2") == tree / "dicom-images-train" / "s2" / "r2" / "1.2.3.2.dcm"
    image = source.image("1.2.3.2")
    assert image.shape == (32, 48) and image.dtype == np.uint8 and image.max() == 255
    assert source.missing(["1.2.3.3", "1.2.3.1", "9.9"]) == ["1.2.3.3", "9.9"]
    assert source.synthetic is False
    (tree / "VLPBENCH_SYNTHETIC.json").write_text(json.dumps({"generator": "vlpbench synth"}))
    assert source.synthetic is True


def test_siim_source_mask_is_the_union_of_rows(tree):
    source = SiimSource(tree)
    union = source.mask("1.2.3.2")
    expected = decode_rle("5 3 10 2") | decode_rle("40 4")
    np.testing.assert_array_equal(union, expected)
    assert union.sum() == 9 and union.shape == (1024, 1024)
    assert not source.mask("1.2.3.1").any()


def test_siim_source_missing_dicom_names_id_and_root(tree):
    source = SiimSource(tree)
    with pytest.raises(DataError) as info:
        source.image("1.2.3.3")
    assert "1.2.3.3" in str(info.value) and str(tree) in str(info.value)
    with pytest.raises(DataError, match="not in"):
        source.label("9.9")


def test_siim_source_prefers_stage2_and_lists_what_it_looked_for(tmp_path):
    with pytest.raises(DataError) as info:
        SiimSource(tmp_path)
    assert "stage_2_train.csv" in str(info.value) and "train-rle.csv" in str(info.value)
    _write(tmp_path / "train-rle.csv", "ImageId, EncodedPixels", ROWS[:1], space=" ")
    assert SiimSource(tmp_path).label_file.name == "train-rle.csv"
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "stage_2_train.csv", "ImageId,EncodedPixels", ROWS)
    assert SiimSource(tmp_path).label_file == tmp_path / "sub" / "stage_2_train.csv"


def test_xrv_data_file_errors(monkeypatch):
    with pytest.raises(DataError, match="does not ship 'no-such-file.csv'"):
        xrv_data_file("no-such-file.csv")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="'torchxrayvision' is not installed"):
        xrv_data_file(SIIM_RLE)
