"""DICOM scaling through a lookup table of the stored values: byte-identical to the float64 path."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from vlpbench.data.dicom import MAX_LUT_ENTRIES, read_dicom, scale_float64, scale_to_uint8, stored_value_lut
from vlpbench.testing.dicom import write_native_dicom

# (dtype, bits stored): the value ranges of CR/DX files; 256² pixels, so that even a 2^16-entry table is used.
DEPTHS = {"12-bit unsigned": (np.uint16, 12), "16-bit signed": (np.int16, 16), "10-bit signed": (np.int16, 10),
          "8-bit unsigned": (np.uint16, 8)}


def _stored(dtype, bits, seed=0, shape=(256, 256)):
    """Random stored values over the whole range of ``bits``, both extremes included."""
    info = np.iinfo(dtype)
    low = max(info.min, -(1 << (bits - 1))) if info.min < 0 else 0
    high = (1 << (bits - 1)) - 1 if info.min < 0 else (1 << bits) - 1
    values = np.random.default_rng(seed).integers(low, high, size=shape, endpoint=True).astype(dtype)
    values.flat[:2] = low, high
    return values


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("rescale, window", [(None, None), ((0.5, -1024.0), (40.0, 400.0))],
                         ids=["plain", "rescale+window"])
def test_read_dicom_through_the_table_equals_the_float_path(tmp_path, depth, photometric, rescale, window):
    dtype, bits = DEPTHS[depth]
    path = write_native_dicom(tmp_path / "x.dcm", _stored(dtype, bits), bits_stored=bits, photometric=photometric,
                              rescale=rescale, window=window)
    stored = pydicom.dcmread(path).pixel_array
    invert = photometric == "MONOCHROME1"
    assert stored_value_lut(stored, invert) is not None  # the table path is the one taken
    expected = scale_float64(stored, invert)
    image = read_dicom(path)
    assert image.dtype == np.uint8 and image.shape == (256, 256)
    np.testing.assert_array_equal(image, expected)
    assert (image.min(), image.max()) == (0, 255)  # the extremes of the stored range land on 0 and 255


@pytest.mark.parametrize("values", [
    np.array([[-3000, -1], [-2, -2999]], np.int16),  # every value negative: nothing scales, all clip to 0
    np.array([[0, 0], [0, 0]], np.uint16),  # all zero stays zero
    np.array([[7, 7], [7, 7]], np.int16),
    np.array([[1, 3], [0, 2]], np.uint8),
    np.arange(-4, 12, dtype=np.int32).reshape(4, 4),  # wider dtypes with a small range use the table too
    np.array([[65535, 0], [1, 32768]], np.uint16),
], ids=["all-negative", "all-zero", "constant", "uint8", "int32", "uint16-extremes"])
def test_table_matches_the_float_path_on_edge_values(values):
    for invert in (False, True):
        lut = stored_value_lut(np.tile(values, (128, 128)), invert)
        assert lut is not None
        np.testing.assert_array_equal(lut[values], scale_float64(values, invert))


def test_float_and_wide_pixels_stay_on_the_float_path():
    floats = np.random.default_rng(0).random((64, 64)).astype(np.float32) * 4000
    assert stored_value_lut(floats) is None
    np.testing.assert_array_equal(scale_to_uint8(floats), scale_float64(floats))
    wide = np.array([[0, MAX_LUT_ENTRIES]] * 40000, np.int32)  # 2^16 + 1 values: more than a table holds
    assert stored_value_lut(wide) is None
    np.testing.assert_array_equal(scale_to_uint8(wide), scale_float64(wide))
    small = _stored(np.uint16, 12, shape=(16, 16))  # fewer pixels than table entries: no table
    assert stored_value_lut(small) is None


def test_the_scaling_itself_against_hand_values():
    stored = np.tile(np.array([[0, 1, 2, 3], [1000, 2000, 3000, 4095]], np.uint16), (1024, 1))
    assert stored_value_lut(stored) is not None
    expected = np.array([[0, 0, 0, 0], [62, 125, 187, 255]])  # rint(v * 255 / 4095)
    np.testing.assert_array_equal(scale_to_uint8(stored)[:2], expected)
    np.testing.assert_array_equal(scale_to_uint8(stored, invert=True)[:2], 255 - expected)
