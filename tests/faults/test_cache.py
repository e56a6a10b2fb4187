"""Fault injection, cache integrity: bytes changed in the image cache or the feature cache while the file
size stays the same are detected by the checksum, warned about by file name and rebuilt, and what a run
computes from them equals a clean run's; image caches written before checksums, and feature shards without one,
are rebuilt with a warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from vlpbench.adapters import build_adapter
from vlpbench.data.cache import CRC_BYTES, cache_root, cached_images
from vlpbench.protocols.features import Preprocessing, cached_features

SIZE = 24
PRE = Preprocessing(resize=SIZE, crop=20, mean=0.5, std=0.5)


class TinySource:
    """An in-memory reader of deterministic random grey images; records what it decodes."""

    def __init__(self, n: int = 5):
        self.ids = [f"img{k:02d}" for k in range(n)]
        self.decoded: list[str] = []

    def fingerprint(self) -> str:
        return "tiny-faults"

    def image(self, image_id: str) -> np.ndarray:
        self.decoded.append(image_id)
        rng = np.random.default_rng(int(image_id[3:]))
        return rng.integers(1, 256, size=(40, 36), dtype=np.uint8)


class CountingEncoders:
    """Wraps an adapter, counting the encoders it hands out (one per feature-cache miss)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.encoders = 0

    def __getattr__(self, name):
        return getattr(self.adapter, name)

    def encoder(self):
        self.encoders += 1
        return self.adapter.encoder()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture
def adapter(checkpoint):
    return CountingEncoders(build_adapter("generic", checkpoint, arch="resnet18"))


def images(source: TinySource) -> np.ndarray:
    return np.array(cached_images(source, "tiny", source.ids, SIZE, workers=1, progress=False))


def features(adapter, source: TinySource):
    return cached_features(adapter, source, source.ids, PRE, batch_size=8, device=torch.device("cpu"))


def run_file() -> Path:
    (path,) = cache_root().glob("*/*/runs/*.npy")  # one dataset in each test's cache
    return path


def entries() -> list[Path]:
    return sorted(cache_root().glob("*/*/entries/*/*.u8"))


def overwrite(path: Path, start: int, stop: int, data: bytes) -> None:
    """Replace bytes ``start:stop`` of ``path`` with ``data``, keeping its size."""
    content = bytearray(path.read_bytes())
    content[start:stop] = data
    assert len(content) == path.stat().st_size
    path.write_bytes(bytes(content))


def zero_pixels(run: Path, pixels: int) -> None:
    """Zero the last ``pixels`` bytes of a run file: its pixel data, the .npy header kept."""
    size = run.stat().st_size
    overwrite(run, size - pixels, size, bytes(pixels))


def test_zeroed_pixels_in_a_run_file_are_detected_warned_and_rebuilt_from_the_entries(caplog):
    source = TinySource()
    clean = images(source)
    run = run_file()
    written, entry_times = run.read_bytes(), {p: p.stat().st_mtime_ns for p in entries()}
    zero_pixels(run, clean.nbytes)

    source.decoded.clear()
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        again = images(source)
    assert f"image cache: {run} does not match its checksum" in caplog.text
    assert "its pixels changed after it was written; rebuilding it" in caplog.text
    assert np.array_equal(again, clean)  # not the black images of the damaged file
    assert run.read_bytes() == written and source.decoded == []  # rebuilt from the intact entries
    assert {p: p.stat().st_mtime_ns for p in entries()} == entry_times
    assert not list(run.parent.parent.glob("tmp/*"))


@pytest.mark.parametrize("where", ["first pixel", "last pixel", "checksum"])
def test_one_changed_byte_of_an_entry_is_decoded_again(where, caplog):
    source = TinySource()
    clean = images(source)
    entry = entries()[2]
    entry_bytes, others = entry.read_bytes(), {p: p.read_bytes() for p in entries() if p != entry}
    offset = {"first pixel": 0, "last pixel": SIZE * SIZE - 1, "checksum": SIZE * SIZE}[where]
    overwrite(entry, offset, offset + 1, bytes([entry_bytes[offset] ^ 0x01]))
    run_file().unlink()  # entries are read when a run file is assembled

    source.decoded.clear()
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        again = images(source)
    assert f"image cache: entry {entry} (image " in caplog.text
    assert "is truncated or does not match its checksum; decoding it again" in caplog.text
    assert len(source.decoded) == 1 and np.array_equal(again, clean)
    assert entry.read_bytes() == entry_bytes and {p: p.read_bytes() for p in others} == others


def test_a_damaged_run_checksum_file_rebuilds_the_run_file(caplog):
    source = TinySource()
    clean = images(source)
    run_file().with_suffix(".sum").write_text("crc32:00000000\n")
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        assert np.array_equal(images(source), clean)
    assert f"{run_file()} does not match its checksum (stored crc32:00000000, found crc32:" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        images(source)
    assert caplog.text == ""  # the rebuilt pair agrees


def test_flipped_byte_in_a_feature_cache_entry_is_detected_warned_and_recomputed(adapter, caplog):
    source = TinySource()
    clean = features(adapter, source)
    (path,) = clean.paths
    written = path.read_bytes()
    # The low byte of the last float32: the value stays finite, so only the checksum can tell.
    overwrite(path, len(written) - 4, len(written) - 3, bytes([written[-4] ^ 0x01]))
    assert np.isfinite(np.load(path)).all() and not np.array_equal(np.load(path), clean.values)

    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        again = features(adapter, source)
    assert f"feature cache: {path} does not match the checksum in {path.stem}.json" in caplog.text
    assert "its values changed after they were written; recomputing its images" in caplog.text
    assert not again.hit and adapter.encoders == 2
    np.testing.assert_array_equal(again.values, clean.values)
    assert path.read_bytes() == written
    assert features(adapter, source).hit


def test_features_of_a_zeroed_image_run_file_equal_a_clean_runs(adapter, caplog):
    """The issue's case: a run that reads a zeroed run file computes from the real pixels, not black ones."""
    source = TinySource()
    clean = features(adapter, source)
    zero_pixels(run_file(), len(source.ids) * SIZE * SIZE)
    (path,) = clean.paths
    for stale in path.parent.glob(f"{path.stem}.*"):
        stale.unlink()  # so the features are computed again, from the image cache

    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        again = features(adapter, source)
    assert f"image cache: {run_file()} does not match its checksum" in caplog.text
    assert not again.hit
    np.testing.assert_array_equal(again.values, clean.values)


def test_an_image_cache_from_before_checksums_is_decoded_again_with_a_warning(caplog):
    source = TinySource()
    clean = images(source)
    for entry in entries():  # the old format: pixels only, and no .sum beside the run file
        entry.write_bytes(entry.read_bytes()[:-CRC_BYTES])
    run_file().with_suffix(".sum").unlink()

    source.decoded.clear()
    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        again = images(source)
    assert f"image cache: {run_file()} has no checksum file {run_file().stem}.sum" in caplog.text
    assert "5 entries in " in caplog.text and "have no checksum (written before vlpbench" in caplog.text
    assert source.decoded == source.ids and np.array_equal(again, clean)
    assert {p.stat().st_size for p in entries()} == {SIZE * SIZE + CRC_BYTES}
    assert run_file().with_suffix(".sum").read_text().startswith("crc32:")


def test_a_feature_shard_without_its_checksum_is_recomputed_with_a_warning(adapter, caplog):
    source = TinySource()
    clean = features(adapter, source)
    (path,) = clean.paths
    key_file = path.with_suffix(".json")
    key = json.loads(key_file.read_text())
    del key["checksum"]
    key_file.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")

    with caplog.at_level(logging.WARNING, logger="vlpbench"):
        again = features(adapter, source)
    assert f"feature cache: {key_file} lacks its image list or checksum; recomputing its images" in caplog.text
    assert not again.hit and adapter.encoders == 2
    np.testing.assert_array_equal(again.values, clean.values)
    assert json.loads(key_file.read_text())["checksum"].startswith("crc32:")
    assert features(adapter, source).hit
