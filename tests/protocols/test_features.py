"""Frozen-encoder features and their on-disk cache: values, hits, misses, damaged files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torchvision

from vlpbench.adapters import build_adapter
from vlpbench.errors import ConfigError
from vlpbench.protocols.features import (
    Preprocessing,
    cache_root,
    cached_features,
    center_crop,
    channel_values,
    load_images,
)

PRE = Preprocessing(resize=40, crop=32, mean=0.5, std=0.5)


class TinySource:
    """An in-memory dataset reader: deterministic random grey images of varying size."""

    def __init__(self, n: int = 6, tag: str = "a"):
        self.ids = [f"img{k:02d}" for k in range(n)]
        self.tag = tag

    def fingerprint(self) -> str:
        return f"tiny-{self.tag}"

    def image(self, image_id: str) -> np.ndarray:
        rng = np.random.default_rng(int(image_id[3:]))
        return rng.integers(0, 256, size=(48 + int(image_id[3:]), 56), dtype=np.uint8)


def _state(seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resnet18")
    paths = []
    for seed in (0, 1):
        paths.append(folder / f"resnet18_seed{seed}.pth")
        torch.save(_state(seed), paths[-1])
    return paths


class Counting:
    """Wraps an adapter, counting how many encoders it hands out and how many images they see."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.encoders = 0
        self.images = 0

    def __getattr__(self, name):
        return getattr(self.adapter, name)

    def encoder(self):
        self.encoders += 1
        encoder = self.adapter.encoder()
        forward = encoder.forward

        def counted(x):
            self.images += len(x)
            return forward(x)

        encoder.forward = counted
        return encoder


@pytest.fixture
def adapter(checkpoints):
    return Counting(build_adapter("generic", checkpoints[0], arch="resnet18"))


def _features(adapter, source, pre=PRE):
    return cached_features(adapter, source, source.ids, pre, batch_size=8, device=torch.device("cpu"))


def test_features_equal_torchvision_resnet18_pooled_output(adapter):
    source = TinySource()
    features = _features(adapter, source)
    # Independent reference: torchvision's own ResNet-18 up to its average pool, on the same input.
    reference_model = torchvision.models.resnet18(weights=None)
    reference_model.load_state_dict(_state(0))
    reference_model.fc = torch.nn.Identity()
    images = torch.from_numpy(np.array(load_images(source, source.ids, 40, False))).float()[:, None] / 255
    x = ((center_crop(images, 32) - 0.5) / 0.5).repeat(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference_model.eval()(x).numpy()
    assert features.values.shape == (6, 512) and features.values.dtype == np.float32
    np.testing.assert_allclose(features.values, expected, rtol=1e-4, atol=1e-5)
    assert not features.hit


def test_second_call_hits_the_cache_without_running_the_encoder(adapter):
    source = TinySource(tag="second")
    first = _features(adapter, source)
    assert (first.hit, first.computed, adapter.encoders, adapter.images) == (False, 6, 1, 6)
    second = _features(adapter, source)
    assert second.hit and (adapter.encoders, adapter.images) == (1, 6)
    np.testing.assert_array_equal(first.values, second.values)
    assert second.paths == first.paths and len(first.paths) == 1


def test_other_checkpoint_image_size_or_data_miss(adapter, checkpoints):
    source = TinySource(tag="keys")
    _features(adapter, source)
    other = Counting(build_adapter("generic", checkpoints[1], arch="resnet18"))
    assert other.checkpoint_sha256 != adapter.checkpoint_sha256
    assert not _features(other, source).hit
    assert not _features(adapter, source, Preprocessing(resize=40, crop=24, mean=0.5, std=0.5)).hit
    assert not _features(adapter, TinySource(tag="other data")).hit
    assert _features(adapter, source).hit  # the first store is untouched by the others


def _request(adapter, source, ids):
    return cached_features(adapter, source, ids, PRE, batch_size=8, device=torch.device("cpu"))


def test_each_image_is_encoded_once_whatever_lists_ask_for_it(adapter, checkpoints):
    """Subsets, reorderings and overlapping lists of one store's images (a sweep's fractions and parts)
    encode only the images the store lacks; every row equals the whole list's."""
    source = TinySource(n=12, tag="per-image")
    subset = _request(adapter, source, source.ids[2:5])
    assert (subset.computed, adapter.images) == (3, 3)
    overlapping = _request(adapter, source, source.ids[::-1][:10])  # img11 .. img02: 7 new images
    assert (overlapping.computed, adapter.images) == (7, 10)
    assert overlapping.cache_state() == "partial (7 of 10 encoded)" and len(overlapping.paths) == 2
    whole = _request(adapter, source, source.ids)
    assert (whole.computed, adapter.images) == (2, 12)  # img00, img01
    reordered = _request(adapter, source, source.ids[::-1] + source.ids[:1])  # a repeated id too
    assert reordered.hit and reordered.cache_state() == "hit" and adapter.images == 12

    fresh = build_adapter("generic", checkpoints[0], arch="resnet18")
    reference = cached_features(fresh, TinySource(n=12, tag="per-image reference"), source.ids, PRE, batch_size=8,
                                device=torch.device("cpu"))
    assert reference.cache_state() == "miss"
    np.testing.assert_allclose(whole.values, reference.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(reordered.values, np.concatenate([whole.values[::-1], whole.values[:1]]))
    np.testing.assert_array_equal(subset.values, whole.values[2:5])


def test_truncated_or_mislabelled_files_are_recomputed_never_loaded(adapter, caplog):
    source = TinySource(tag="damaged")
    good = _features(adapter, source)
    (path,) = good.paths
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    again = _features(adapter, source)
    assert not again.hit and "unreadable" in caplog.text
    np.testing.assert_array_equal(again.values, good.values)
    assert path.read_bytes() == data  # rewritten whole

    key_file = path.with_suffix(".json")
    key = json.loads(key_file.read_text())
    key["adapter"]["name"] = "someone-else"
    key_file.write_text(json.dumps(key))
    assert not _features(adapter, source).hit
    assert "does not hold the expected key" in caplog.text
    assert _features(adapter, source).hit


def test_cache_files_are_plain_numpy_not_pickles(adapter):
    source = TinySource(tag="format")
    features = _features(adapter, source)
    (path,) = features.paths
    data = path.read_bytes()
    assert data.startswith(b"\x93NUMPY") and b"'descr': '<f4'" in data[:128]
    assert np.load(path, allow_pickle=False).shape == (6, 512)
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(data)
    key = json.loads(path.with_suffix(".json").read_text())
    assert key["adapter"]["checkpoint_sha256"] == adapter.checkpoint_sha256
    assert key["preprocessing"]["crop"] == 32 and key["ids"] == source.ids and key["stamps"] == [""] * 6
    assert path.parent.parent == cache_root() / "test_features"
    assert not list(path.parent.glob(".*.tmp"))


def test_bad_preprocessing_is_a_config_error():
    with pytest.raises(ConfigError, match="image_size=300 must be between 1 and resize_size=256"):
        Preprocessing.from_config({"resize_size": 256, "image_size": 300, "mean": 0.5, "std": 0.5,
                                   "upsample_299": False})
    with pytest.raises(ConfigError, match="std"):
        channel_values([0.2, 0.0, 0.3], "std")
    with pytest.raises(ConfigError, match="three numbers"):
        channel_values([0.5, 0.5], "mean")
    assert channel_values([0.485, 0.456, 0.406], "mean") == (0.485, 0.456, 0.406)
