"""DICOM reader and SIIM-style writer: JPEG Baseline round trip, tags, inversion, damaged files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_fragments

from vlpbench.data.dicom import read_dicom, write_dicom
from vlpbench.errors import DataError

SOP = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
STUDY = "1.2.276.0.7230010.3.1.2.8323329.6904.1517875201.850818"
SERIES = "1.2.276.0.7230010.3.1.3.8323329.6904.1517875201.850817"
PATIENT = "16d7f894-55d7-4d95-8957-d18987f0e981"

# Dataset elements of a real SIIM file, in file order (docs/datasets.md, "SIIM DICOM files").
SIIM_TAGS = [
    0x00080005, 0x00080016, 0x00080018, 0x00080020, 0x00080030, 0x00080050, 0x00080060,
    0x00080064, 0x00080090, 0x0008103E, 0x00100010, 0x00100020, 0x00100030, 0x00100040,
    0x00101010, 0x00180015, 0x00185101, 0x0020000D, 0x0020000E, 0x00200010, 0x00200011,
    0x00200013, 0x00200020, 0x00280002, 0x00280004, 0x00280010, 0x00280011, 0x00280030,
    0x00280100, 0x00280101, 0x00280102, 0x00280103, 0x00282110, 0x00282114, 0x7FE00010,
]  # fmt: skip


def _picture(height=96, width=128):
    """Smooth picture spanning 0..255 (so that read_dicom's max scaling is the identity)."""
    y, x = np.mgrid[0:height, 0:width]
    picture = 127.5 + 127.5 * np.sin(x / 9.0) * np.cos(y / 13.0)
    picture[:, :4] = 0
    picture[:4, -4:] = 255
    return np.clip(np.rint(picture), 0, 255).astype(np.uint8)


def _write(path, pixels, **overrides):
    options = dict(
        sop_instance_uid=SOP,
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        patient_id=PATIENT,
        patient_sex="M",
        patient_age=62,
        view_position="PA",
    )
    return write_dicom(path, pixels, **{**options, **overrides})


def test_round_trip_within_jpeg_tolerance(tmp_path):
    pixels = _picture()
    path = _write(tmp_path / "a" / "b" / f"{SOP}.dcm", pixels)
    image = read_dicom(path)
    assert image.shape == (96, 128) and image.dtype == np.uint8
    error = np.abs(image.astype(int) - pixels)
    assert error.mean() < 1.5 and error.max() <= 16


def test_file_layout_and_tags_match_siim(tmp_path):
    path = _write(tmp_path / "x.dcm", _picture(), pixel_spacing=0.168)
    raw = path.read_bytes()
    assert raw[:128] == bytes(128) and raw[128:132] == b"DICM"

    ds = pydicom.dcmread(path)
    meta = ds.file_meta
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert meta.MediaStorageSOPInstanceUID == SOP
    assert meta.ImplementationClassUID == "1.2.276.0.7230010.3.0.3.6.0"
    assert meta.ImplementationVersionName == "OFFIS_DCMTK_360"
    # The group length counts the meta bytes after its own 12-byte element; with these UIDs a
    # real SIIM file says 200.
    dataset_start = raw.index(b"\x08\x00\x05\x00CS")
    assert meta.FileMetaInformationGroupLength == dataset_start - 144 == 200

    assert [element.tag for element in ds] == SIIM_TAGS
    expected = {
        "SpecificCharacterSet": "ISO_IR 100",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7",
        "SOPInstanceUID": SOP,
        "StudyDate": "19010101",
        "StudyTime": "000000.00",
        "AccessionNumber": "",
        "Modality": "CR",
        "ConversionType": "WSD",
        "ReferringPhysicianName": "",
        "SeriesDescription": "view: PA",
        "PatientName": PATIENT,
        "PatientID": PATIENT,
        "PatientBirthDate": "",
        "PatientSex": "M",
        "PatientAge": "62",
        "BodyPartExamined": "CHEST",
        "ViewPosition": "PA",
        "StudyInstanceUID": STUDY,
        "SeriesInstanceUID": SERIES,
        "StudyID": "",
        "SeriesNumber": 1,
        "InstanceNumber": 1,
        "PatientOrientation": "",
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": 96,
        "Columns": 128,
        "PixelSpacing": [0.168, 0.168],
        "BitsAllocated": 8,
        "BitsStored": 8,
        "HighBit": 7,
        "PixelRepresentation": 0,
        "LossyImageCompression": "01",
        "LossyImageCompressionMethod": "ISO_10918_1",
    }
    assert {key: ds[key].value for key in expected} == expected
    # Same bytes as the real file for the tags that DCMTK wrote (bare-number age included).
    assert b"\x10\x00\x10\x10AS\x02\x0062" in raw
    assert b"\x28\x00\x30\x00DS\x0c\x000.168\\0.168 " in raw

    pixel_data = ds["PixelData"]
    assert pixel_data.VR == "OB" and pixel_data.is_undefined_length
    # An empty Basic Offset Table item, then exactly one fragment.
    assert pixel_data.value[:8] == b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    offset_table, jpeg = generate_fragments(pixel_data.value)
    assert offset_table == b""
    # JFIF-less baseline stream: SOI then DQT, an SOF0 for 8-bit, 96 x 128, one component.
    assert jpeg[:4] == b"\xff\xd8\xff\xdb" and b"\xff\xe0" not in jpeg[:20]
    sof = jpeg.index(b"\xff\xc0")
    assert jpeg[sof + 4] == 8
    assert int.from_bytes(jpeg[sof + 5 : sof + 7], "big") == 96
    assert int.from_bytes(jpeg[sof + 7 : sof + 9], "big") == 128
    assert jpeg[sof + 9] == 1
    assert b"\xff\xc2" not in jpeg  # not progressive


def test_monochrome1_stores_inverted_pixels_and_reads_back_the_picture(tmp_path):
    pixels = _picture()
    path = _write(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", view_position="AP")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.SeriesDescription == "view: AP"
    stored = ds.pixel_array.astype(int)
    assert np.abs(stored - (255 - pixels.astype(int))).mean() < 1.5
    assert np.abs(read_dicom(path).astype(int) - pixels).mean() < 1.5


def test_scaling_by_max_and_all_zero(tmp_path):
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[16:48, 16:48] = 100
    image = read_dicom(_write(tmp_path / "dim.dcm", pixels, jpeg_quality=95))
    stored = pydicom.dcmread(tmp_path / "dim.dcm").pixel_array
    expected = np.clip(np.rint(stored * 255.0 / stored.max()), 0, 255)
    np.testing.assert_array_equal(image, expected)
    assert image[32, 32] == 255
    assert not read_dicom(_write(tmp_path / "zero.dcm", np.zeros((16, 16), np.uint8))).any()


def test_non_dicom_and_missing_files(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("not a dicom file")
    with pytest.raises(DataError, match="not a DICOM file") as info:
        read_dicom(text)
    assert str(text) in str(info.value)
    with pytest.raises(DataError, match="not found") as info:
        read_dicom(tmp_path / "absent.dcm")
    assert "absent.dcm" in str(info.value)


def test_truncated_file(tmp_path):
    path = _write(tmp_path / "t.dcm", _picture())
    path.write_bytes(path.read_bytes()[:-400])
    with pytest.raises(DataError) as info:
        read_dicom(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "pixel data" in str(info.value)


def test_corrupt_jpeg_stream(tmp_path):
    path = _write(tmp_path / "c.dcm", _picture())
    raw = bytearray(path.read_bytes())
    soi = raw.index(b"\xff\xd8\xff\xdb")
    raw[soi + 2 : soi + 66] = bytes(64)  # wipe the quantisation table header
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="cannot decode the pixel data") as info:
        read_dicom(path)
    assert str(path) in str(info.value)


def test_dicom_without_pixel_data(tmp_path):
    path = _write(tmp_path / "p.dcm", _picture())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(DataError, match="has no pixel data") as info:
        read_dicom(path)
    assert str(path) in str(info.value)


def test_writer_rejects_non_uint8(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        _write(tmp_path / "f.dcm", np.zeros((8, 8), dtype=np.float32))
