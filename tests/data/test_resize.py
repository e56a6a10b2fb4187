"""The resize rules of the reference pipelines against OpenCV itself (a test-only dependency)."""

import numpy as np
import pytest

from vlpbench.data.cache import cached_images
from vlpbench.data.resize import resize_area, resize_linear, resize_method, resize_pad_area
from vlpbench.errors import ConfigError

cv2 = pytest.importorskip("cv2")

SHAPES = [(1024, 1024, 224, 224), (390, 320, 256, 210), (100, 80, 256, 204), (2000, 2500, 224, 224),
          (300, 300, 224, 224), (50, 60, 256, 307)]


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (h, w), dtype=np.uint8)
    ramp = np.add.outer(np.arange(h), np.arange(w)) % 256
    return np.where(rng.random((h, w)) < 0.5, noise, ramp).astype(np.uint8)


@pytest.mark.parametrize("h,w,oh,ow", SHAPES)
def test_linear_equals_opencv_inter_linear_to_one_grey_level(h, w, oh, ow):
    image = _image(h, w)
    ours = resize_linear(image, (oh, ow)).astype(int)
    theirs = cv2.resize(image, (ow, oh), interpolation=cv2.INTER_LINEAR).astype(int)
    assert np.abs(ours - theirs).max() <= 1


@pytest.mark.parametrize("h,w,oh,ow", SHAPES)
def test_area_equals_opencv_inter_area_to_one_grey_level(h, w, oh, ow):
    image = _image(h, w, seed=1)
    ours = resize_area(image, oh, ow).astype(int)
    theirs = cv2.resize(image, (ow, oh), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(ours - theirs).max() <= 1


def _mgca_resize_img(img, scale):
    """MGCA's resize_img (HKU-MedAI/MGCA mgca/datasets/utils.py:28-74), written out with OpenCV."""
    size = img.shape
    max_ind = size.index(max(size))
    if max_ind == 0:
        desired = (scale, int(float(size[1]) * (scale / float(size[0]))))
    else:
        desired = (int(float(size[0]) * (scale / float(size[1]))), scale)
    resized = cv2.resize(img, desired[::-1], interpolation=cv2.INTER_AREA)
    if max_ind == 0:
        pad = scale - resized.shape[1]
        widths = [(0, 0), (int(np.floor(pad / 2)), int(np.ceil(pad / 2)))]
    else:
        pad = scale - resized.shape[0]
        widths = [(int(np.floor(pad / 2)), int(np.ceil(pad / 2))), (0, 0)]
    return np.pad(resized, widths, "constant", constant_values=0)


@pytest.mark.parametrize("h,w", [(390, 320), (320, 390), (256, 256), (1024, 1024), (120, 97)])
def test_pad_area_equals_mgca_resize_img(h, w):
    image = _image(h, w, seed=2)
    ours = resize_pad_area(image, 256).astype(int)
    theirs = _mgca_resize_img(image, 256).astype(int)
    assert ours.shape == theirs.shape == (256, 256)
    assert np.abs(ours - theirs).max() <= 1


def test_pad_area_keeps_the_aspect_ratio_and_pads_with_zeros():
    image = np.full((400, 200), 200, dtype=np.uint8)
    out = resize_pad_area(image, 256)
    assert out[:, :64].max() == 0 and out[:, 192:].max() == 0
    assert (out[:, 64:192] == 200).all()


def test_unknown_method_names_the_option():
    with pytest.raises(ConfigError, match="resize='cubic'.*antialias, linear, pad_area"):
        resize_method("cubic")


class _Reader:
    synthetic = True

    def __init__(self, images):
        self.images = images

    def fingerprint(self):
        return "resize-test"

    def image(self, image_id):
        return self.images[image_id]


def test_cache_stores_each_method_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path))
    reader = _Reader({"a": _image(390, 320, 3)})
    linear = np.array(cached_images(reader, "resize_test", ["a"], 64, method="linear", workers=1, progress=False))
    padded = np.array(cached_images(reader, "resize_test", ["a"], 64, method="pad_area", workers=1, progress=False))
    smooth = np.array(cached_images(reader, "resize_test", ["a"], 64, workers=1, progress=False))
    assert np.array_equal(linear[0], resize_linear(reader.images["a"], 64))
    assert np.array_equal(padded[0], resize_pad_area(reader.images["a"], 64))
    assert not np.array_equal(linear, smooth) and not np.array_equal(padded, smooth)
    with pytest.raises(ConfigError):
        cached_images(reader, "resize_test", ["a"], 64, method="nearest", workers=1, progress=False)
