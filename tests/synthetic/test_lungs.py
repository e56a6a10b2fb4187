"""Lung masks: decoded from a zip of mask images once, then read back from the cache file named by the archive."""

import io
import logging
import zipfile

import numpy as np
import pytest
from PIL import Image

from vlpbench.synthetic import lungs
from vlpbench.synthetic.lungs import cache_file, read_lung_masks

SIZE = 8


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def archive(tmp_path, monkeypatch):
    """A zip like torchxrayvision's: a folder, two masks (16 x 16), a blank image and a file that is no image."""
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    left, top = np.zeros((16, 16)), np.zeros((16, 16))
    left[:, :8] = 255
    top[:8, :] = 200  # grey, like some of the real masks: still lung
    path = tmp_path / "masks.zip"
    with zipfile.ZipFile(path, "w") as opened:
        opened.writestr("masks/", b"")
        opened.writestr("masks/left.png", _png(left))
        opened.writestr("masks/blank.png", _png(np.zeros((16, 16))))
        opened.writestr("masks/notes.txt", b"not an image")
        opened.writestr("masks/top.jpg", _png(top))  # a PNG, whatever its extension
    return path


def _expected():
    left, top = np.zeros((SIZE, SIZE), np.uint8), np.zeros((SIZE, SIZE), np.uint8)
    left[:, : SIZE // 2] = 1
    top[: SIZE // 2, :] = 1
    return [left, top]


def test_masks_are_decoded_once_then_read_back_from_the_cache_file(archive, monkeypatch):
    masks = read_lung_masks(archive, SIZE)
    assert [m.tolist() for m in masks] == [m.tolist() for m in _expected()]
    assert all(m.dtype == np.uint8 and not m.flags.writeable for m in masks)
    kept = cache_file(archive.read_bytes(), SIZE)
    assert kept.is_file() and kept.parent.name == "lungs" and f"-{SIZE}px-" in kept.name

    monkeypatch.setattr(lungs, "_decode_archive", lambda *args: pytest.fail("decoded although a cache file is kept"))
    again = read_lung_masks(archive, SIZE)
    assert [m.tolist() for m in again] == [m.tolist() for m in masks]
    assert all(m.dtype == np.uint8 and m.shape == (SIZE, SIZE) and not m.flags.writeable for m in again)


def test_another_archive_or_size_has_its_own_cache_file(archive):
    other = archive.read_bytes() + b"\0"
    assert len({cache_file(archive.read_bytes(), SIZE), cache_file(archive.read_bytes(), 16),
                cache_file(other, SIZE)}) == 3


@pytest.mark.parametrize("damage", [b"", b"not numpy", "wrong size"])
def test_an_unreadable_cache_file_is_decoded_again_and_replaced(archive, damage):
    kept = cache_file(archive.read_bytes(), SIZE)
    kept.parent.mkdir(parents=True)
    if damage == "wrong size":
        np.save(kept, np.zeros((2, 3), np.uint8))
    else:
        kept.write_bytes(damage)
    assert [m.tolist() for m in read_lung_masks(archive, SIZE)] == [m.tolist() for m in _expected()]
    assert np.load(kept).shape == (2, SIZE * SIZE // 8)


def test_a_cache_that_cannot_be_written_only_warns(archive, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    monkeypatch.setenv("VLPBENCH_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        masks = read_lung_masks(archive, SIZE)
    assert [m.tolist() for m in masks] == [m.tolist() for m in _expected()]
    assert "cannot keep the decoded lung masks" in caplog.text and str(blocker) in caplog.text
    assert list(tmp_path.glob("**/*.tmp")) == []
