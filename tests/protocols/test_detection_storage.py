"""Frozen detection features: where each part lives (memory, a float16 file, every batch), what the float16
file changes in the predictions, and that the file lasts only as long as its run."""

import types

import numpy as np
import pytest
import torch

from vlpbench.metrics.detection import detection_map
from vlpbench.protocols import SplitIds, detection
from vlpbench.protocols.detection import (
    Detector,
    PartFeatures,
    _predict,
    deepest_stages,
    head_layout,
    feature_storage,
    run_detection,
    scaled_anchors,
)
from vlpbench.tasks import load_task

class _Part(types.SimpleNamespace):
    def __len__(self):
        return len(self.truths)


SHAPES = [(2, 4, 4), (4, 2, 2)]  # 32 + 16 = 48 values per image: 192 bytes in float32, 96 in float16


def test_storage_fills_memory_then_disk_then_recomputes_and_never_keeps_a_drifting_encoder():
    sizes = {"train": 100, "val": 10}
    gib = 2**30
    assert feature_storage(SHAPES, sizes, 1.0, frozen=True) == {"train": "memory", "val": "memory"}
    # 100 * 192 = 19200 bytes: train fits 20000 bytes of memory, val (1920 more) does not.
    assert feature_storage(SHAPES, sizes, 20000 / gib, frozen=True) == {"train": "memory", "val": "memmap"}
    assert feature_storage(SHAPES, sizes, 0.0, frozen=True) == {"train": "memmap", "val": "memmap"}
    # 100 * 96 = 9600 bytes of disk for train; val's 960 more exceed 10000.
    assert feature_storage(SHAPES, sizes, 0.0, frozen=True, disk_bytes=10000) == {"train": "memmap", "val": "batch"}
    assert feature_storage(SHAPES, sizes, 1.0, frozen=False) == {"train": "batch", "val": "batch"}


def _tiny_part(n=12, size=64, seed=0):
    """A detection part of random images with one box each (what PartFeatures and _predict read)."""
    rng = np.random.default_rng(seed)
    truths = [np.array([[8.0, 8.0, 40.0, 48.0]]) + rng.integers(0, 16, 4) for _ in range(n)]
    return _Part(
        images=torch.from_numpy(rng.integers(0, 256, (n, size, size), dtype=np.uint8)), truths=truths,
        truth_labels=[np.zeros(1, np.int64) for _ in truths], scales=np.ones((n, 2)),
        targets=[torch.from_numpy(t).float() for t in truths], target_labels=[torch.zeros(1, dtype=torch.long)] * n)


@pytest.fixture(scope="module")
def tiny_model():
    from segmentation_models_pytorch.encoders import get_encoder

    torch.manual_seed(0)
    encoder = get_encoder("resnet18", weights=None, depth=4)
    model = Detector(encoder, deepest_stages(encoder, 64), 16)
    return model.eval()


def test_the_float16_file_holds_the_float32_features_to_float16_rounding_and_keeps_the_map(tiny_model, tmp_path):
    part = _tiny_part()
    config = {**load_task("rsna_det").config, "image_size": 64, "conf_threshold": 0.0, "max_detections": 20}
    common = dict(batch_size=5, progress=False, desc="train", folder=tmp_path)
    memory = PartFeatures(tiny_model, part, config, torch.device("cpu"), storage="memory", **common)
    memmap = PartFeatures(tiny_model, part, config, torch.device("cpu"), storage="memmap", **common)
    assert memmap.describe() == {"storage": "memmap", "dtype": "float16"}
    assert [p.name for p in tmp_path.iterdir()] == ["train-rank0.f16"]
    index = [7, 2, 11, 0]  # unsorted: rows come back in the order asked for
    for exact, stored in zip(memory(index), memmap(index)):
        assert stored.dtype == torch.float32 and stored.shape == exact.shape
        # float16 keeps 11 significant bits: relative error at most 2^-11 (plus subnormals near 0).
        assert torch.all((stored - exact).abs() <= exact.abs() * 2.0**-11 + 2.0**-24)
        assert not torch.equal(stored, exact)  # the file really holds float16
    anchors = scaled_anchors(64)
    (loss32, det32), (loss16, det16) = [_predict(tiny_model, part, features, anchors, config, 5)
                                        for features in (memory, memmap)]
    assert abs(loss32 - loss16) <= 1e-4 * abs(loss32)
    # Truths near each image's best float32 box, its sides moved by up to 15 % of its size so that IoUs spread
    # over the thresholds: the mAP then depends on the scores' ranking and the boxes' positions.
    rng = np.random.default_rng(2)
    truths = [d[0][:1] + rng.uniform(-0.15, 0.15, (1, 4)) * np.tile(d[0][:1, 2:] - d[0][:1, :2], 2) for d in det32]
    maps = [detection_map(truths, [d[0] for d in det], [d[1] for d in det])["map"] for det in (det32, det16)]
    assert 0.2 < maps[0] < 1.0
    # Measured on this model: equal to 1e-7 (the float16 rounding moves scores by about 1e-4).
    assert abs(maps[0] - maps[1]) <= 1e-3
    assert [len(d[1]) for d in det32] == [len(d[1]) for d in det16]
    # Measured here: the same mAP, scores apart by 2.4e-7 at most.
    assert max(np.abs(a[1] - b[1]).max() for a, b in zip(det32, det16)) < 1e-5


def _tiny_images(source, ids, size, config, desc, progress):
    """DetectionImages' stand-in: random images of ``ids`` with one box each (no reader, no image cache)."""
    part = _tiny_part(len(ids), size, seed={"train": 0, "val": 1, "test": 2}[desc])
    part.ids = list(ids)
    return part


@pytest.fixture
def tiny_run(monkeypatch):
    monkeypatch.setattr(detection, "DetectionImages", _tiny_images)
    ids = [f"img{k}" for k in range(40)]
    return None, SplitIds(ids[:16], ids[16:28], ids[28:], fraction=1.0)


def _config(**changes):
    return load_task("rsna_det").resolve({"image_size": 64, "neck_width": 16, "max_epochs": 1, "batch_size": 8,
                                          "bootstrap_resamples": 10, "feature_cache_gb": 0.0, **changes})


def _encoder():
    from segmentation_models_pytorch.encoders import get_encoder

    torch.manual_seed(0)
    return get_encoder("resnet18", weights=None, depth=4)


def test_a_run_beyond_the_memory_budget_stores_features_in_a_file_removed_at_its_end(tiny_run):
    from vlpbench.config import cache_dir

    source, split = tiny_run
    outcome = run_detection(_encoder(), source, split, _config(), seed=0, device=torch.device("cpu"),
                            progress=False)
    assert outcome["training"]["features"] == {"train": {"storage": "memmap", "dtype": "float16"},
                                               "val": {"storage": "memmap", "dtype": "float16"},
                                               "test": {"storage": "batch", "dtype": "float32"}}
    assert outcome["training"]["frozen_forward"] == {"channels_last": False, "cudnn_benchmark": False}
    assert list((cache_dir() / "detection").iterdir()) == []


def test_a_failed_run_removes_its_feature_file(tiny_run, monkeypatch):
    from vlpbench.config import cache_dir

    seen = []

    def failing_fit(*args, **kwargs):
        seen.extend(p.name for p in (cache_dir() / "detection").rglob("*.f16"))
        raise RuntimeError("stopped in training")

    monkeypatch.setattr(detection, "fit", failing_fit)
    source, split = tiny_run
    with pytest.raises(RuntimeError, match="stopped in training"):
        run_detection(_encoder(), source, split, _config(), seed=0, device=torch.device("cpu"), progress=False)
    assert sorted(seen) == ["train-rank0.f16", "val-rank0.f16"]
    assert list((cache_dir() / "detection").iterdir()) == []


def test_the_head_layout_is_that_of_its_outputs_and_leaves_the_modes_alone(tiny_model):
    config = {**load_task("rsna_det").config, "image_size": 64}
    features = PartFeatures(tiny_model, _tiny_part(), config, torch.device("cpu"), storage="memory", batch_size=5,
                            progress=False, desc="train")
    tiny_model.head.train()
    try:
        grids, n_classes = head_layout(tiny_model, features, 3)
        assert tiny_model.head.training and not tiny_model.encoder.training
    finally:
        tiny_model.eval()
    with torch.no_grad():
        outputs = tiny_model.head(features([1, 2]))
    assert grids == [tuple(raw.shape[-2:]) for raw in outputs] == [(4, 4), (8, 8), (16, 16)] and n_classes == 1


@pytest.mark.parametrize("cache_gb", [1.0, 0.0])
def test_targets_assigned_ahead_of_the_head_change_no_bit_of_training(tiny_run, monkeypatch, cache_gb):
    """Training assigns each batch's targets in the prefetching thread; in the loop's own thread (depth 0) the
    run is the same bit for bit."""
    source, split = tiny_run
    runs = []
    for depth in ("0", "2"):
        monkeypatch.setenv("VLPBENCH_PREFETCH", depth)
        runs.append(run_detection(_encoder(), source, split, _config(max_epochs=2, feature_cache_gb=cache_gb), seed=0,
                                  device=torch.device("cpu"), progress=False))
    assert runs[0]["training"]["history"] == runs[1]["training"]["history"]
    assert runs[0]["metrics"] == runs[1]["metrics"] and runs[0]["per_image"] == runs[1]["per_image"]
