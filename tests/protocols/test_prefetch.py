"""Batches prepared ahead of the loop: the same batches as the serial loop, errors and early exits handled."""

from __future__ import annotations

import contextlib
import threading
import traceback

import numpy as np
import pytest
import torch

from vlpbench.errors import ConfigError
from vlpbench.protocols import finetune, segmentation
from vlpbench.protocols.features import Preprocessing, extract_features
from vlpbench.protocols.linear import FEATURE_BATCH, feature_batch
from vlpbench.protocols.prefetch import ENVIRONMENT, prefetch, prefetch_depth
from vlpbench.tasks import load_task
from vlpbench.tasks.domains import OutOfDomain, check_option

CPU = torch.device("cpu")


def _prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "vlpbench-prefetch"]


class Part:
    """A segmentation split part in memory (what the training loop reads of ``segmentation.Images``); ``full``:
    also at full size, memory-mapped as ``pipeline: mgca`` reads it."""

    def __init__(self, n: int, size: int, full: np.ndarray | None = None):
        generator = torch.Generator().manual_seed(n)
        self.images = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=generator)
        self.masks = torch.rand(n, size, size, generator=generator)
        self.full_images = full
        self.full = None if full is None else full.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.full_images[index.numpy()]))


def _epochs(batches, depth: int, monkeypatch, epochs: int = 2) -> tuple[list, torch.Tensor]:
    """Every item of ``batches(generator)`` over ``epochs`` epochs at prefetch ``depth``, and the generator's
    state after them."""
    monkeypatch.setenv(ENVIRONMENT, str(depth))
    generator = torch.Generator().manual_seed(7)
    items = [item for _ in range(epochs) for item in batches(generator)]
    return items, generator.get_state()


def _flat(item) -> list:
    if isinstance(item, (tuple, list)):
        return [leaf for part in item for leaf in _flat(part)]
    return [item]


def _same(first: list, second: list) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        leaves_a, leaves_b = _flat(a), _flat(b)
        assert len(leaves_a) == len(leaves_b)
        for x, y in zip(leaves_a, leaves_b):
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y)
            elif isinstance(x, np.ndarray):
                assert np.array_equal(x, y)
            else:
                assert x == y


@pytest.mark.parametrize("pipeline", ["cached", "mgca"])
def test_segmentation_batches_and_draws_are_those_of_the_serial_loop(pipeline, monkeypatch, tmp_path):
    full = None
    if pipeline == "mgca":
        full = np.lib.format.open_memmap(tmp_path / "full.npy", mode="w+", dtype=np.uint8, shape=(10, 24, 24))
        full[:] = np.random.default_rng(0).integers(0, 256, full.shape)
    part = Part(10, 12, full)
    config = {"batch_size": 3, "augment": True, "augmentation": "shift_scale_rotate"}

    def batches(generator):
        return segmentation.train_batches(part, config, generator, CPU)

    serial, serial_state = _epochs(batches, 0, monkeypatch)
    ahead, ahead_state = _epochs(batches, 3, monkeypatch)
    _same(serial, ahead)
    assert torch.equal(serial_state, ahead_state)
    assert [start for start, _, _ in serial] == [0, 3, 6] * 2  # the last incomplete batch dropped
    assert not all(torch.equal(theta, torch.eye(2, 3).expand_as(theta)) for _, _, theta in serial)  # augmented
    if pipeline == "mgca":
        assert serial[0][1][0].shape == (3, 1, 24, 24)  # read at full size from the memory map


def test_finetune_batches_and_augmented_images_are_those_of_the_serial_loop(monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (9, 16, 16), dtype=np.uint8)

    def batches(generator):
        return [(index, finetune.augmented(pixels.unsqueeze(1).float() / 255, *draws))
                for index, pixels, draws in finetune.train_batches(images, 4, True, generator, CPU)]

    serial, serial_state = _epochs(batches, 0, monkeypatch)
    ahead, ahead_state = _epochs(batches, 2, monkeypatch)
    _same(serial, ahead)
    assert torch.equal(serial_state, ahead_state)
    # The same images as the augmentation drawn in one go from the same generator state (the serial rule).
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(9, generator=generator).numpy()
    index = np.sort(order[:4])
    expected = finetune.augment(torch.from_numpy(images[index]).unsqueeze(1).float() / 255, generator)
    assert np.array_equal(serial[0][0], index)
    assert torch.equal(serial[0][1], expected)


def test_the_next_batch_is_prepared_while_the_loop_works_on_this_one():
    started = [threading.Event() for _ in range(3)]

    def prepare(key: int) -> int:
        started[key].set()
        return key

    seen = []
    for key in prefetch(prepare, range(3), CPU, depth=1):
        if key == 0:  # the loop still holds batch 0: batch 1 is prepared meanwhile
            assert started[1].wait(timeout=5)
        seen.append(key)
    assert seen == [0, 1, 2]
    assert not _prefetch_threads()


def test_an_error_while_preparing_is_raised_in_the_loop_with_its_traceback():
    def prepare(key: int) -> int:
        if key == 2:
            raise ValueError(f"image {key} is unreadable")
        return key

    seen = []
    with pytest.raises(ValueError, match="image 2 is unreadable") as raised:
        for key in prefetch(prepare, range(5), CPU, depth=2):
            seen.append(key)
    assert seen == [0, 1]
    assert "prepare" in [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
    assert not _prefetch_threads()


@pytest.mark.parametrize("how", ["break", "error"])
def test_a_loop_that_ends_early_stops_the_thread(how):
    prepared = []

    def prepare(key: int) -> int:
        prepared.append(key)
        return key

    def loop() -> None:  # as the protocols write it: the iterator unnamed
        for key in prefetch(prepare, range(1000), CPU, depth=2):
            if key == 1:
                if how == "error":
                    raise RuntimeError("the model failed")
                break

    with pytest.raises(RuntimeError) if how == "error" else contextlib.nullcontext():
        loop()
    assert not _prefetch_threads()  # joined before the loop's function returned or raised
    assert len(prepared) <= 2 + 2 + 1  # the two consumed, the depth ahead, one being prepared


def test_depth_zero_is_the_serial_loop_in_this_thread():
    threads = []
    assert list(prefetch(lambda key: threads.append(threading.current_thread()) or key, range(3), CPU, 0)) == [0, 1, 2]
    assert threads == [threading.current_thread()] * 3


def test_the_depth_comes_from_the_environment_and_is_checked():
    assert prefetch_depth({}) == 2
    assert prefetch_depth({ENVIRONMENT: "0"}) == 0
    assert prefetch_depth({ENVIRONMENT: " 5 "}) == 5
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(ConfigError, match=f"{ENVIRONMENT}="):
            prefetch_depth({ENVIRONMENT: bad})
    with pytest.raises(ConfigError, match="depth -1"):
        prefetch(lambda key: key, range(2), CPU, depth=-1)


class TinyEncoder(torch.nn.Module):
    """Two conv stages with BatchNorm (in eval mode: each image's feature is independent of its batch)."""

    out_channels = (3, 8, 16)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stage1 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.stage2 = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        for norm in (self.stage1[1], self.stage2[1]):
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        first = self.stage1(x)
        return [x, first, self.stage2(first)]


def test_features_are_the_same_whatever_the_batch_size_and_the_prefetch_depth():
    images = np.random.default_rng(3).integers(0, 256, (11, 40, 40), dtype=np.uint8)
    pre = Preprocessing(resize=40, crop=32, mean=0.5, std=0.5)
    encoder = TinyEncoder()

    def features(batch_size: int, depth: int) -> np.ndarray:
        return extract_features(encoder, images, pre, batch_size=batch_size, device=CPU, depth=depth)

    reference = features(1, 0)
    assert reference.shape == (11, 16) and np.isfinite(reference).all() and reference.std() > 0
    for batch_size in (4, 11, 128):
        np.testing.assert_allclose(features(batch_size, 0), reference, rtol=1e-5, atol=1e-6)
        assert np.array_equal(features(batch_size, 2), features(batch_size, 0))  # prefetching changes no bit


def test_the_feature_batch_is_a_checked_option_of_the_linear_tasks():
    assert load_task("rsna_cls").resolve()["feature_batch_size"] == "auto"
    assert feature_batch(load_task("rsna_cls").resolve()) == FEATURE_BATCH == 128  # auto on a CPU
    assert load_task("rsna_cls").resolve({"feature_batch_size": 16})["feature_batch_size"] == 16
    assert feature_batch({}) == FEATURE_BATCH
    for bad in (0, "big"):
        with pytest.raises(OutOfDomain, match="an integer >= 1 or 'auto'"):
            check_option("linear", "feature_batch_size", bad)
    for bad in (0, 2.5, True, "big"):
        with pytest.raises(ConfigError, match="feature_batch_size"):
            feature_batch({"feature_batch_size": bad})
