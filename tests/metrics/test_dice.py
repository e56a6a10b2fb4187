"""Dice against a direct per-image computation and against sklearn's F1 on flattened masks."""

from __future__ import annotations

import importlib
import tracemalloc

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from vlpbench.errors import DataError
from vlpbench.metrics import dice, dice_per_image

dice_module = importlib.import_module("vlpbench.metrics.dice")  # the package exports the function `dice`


def _reference(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The definition, one image at a time, written independently of the vectorised code."""
    scores = []
    for p, t in zip(pred > threshold, truth > threshold):
        if t.sum() == 0:
            scores.append(1.0 if p.sum() == 0 else 0.0)
        else:
            scores.append(2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    return np.array(scores)


@pytest.fixture
def masks() -> tuple[np.ndarray, np.ndarray]:
    """30 images of 24x24: probabilities and blob-like truths, a third of them empty."""
    rng = np.random.default_rng(0)
    truth = (rng.random((30, 24, 24)) < rng.uniform(0.05, 0.5, (30, 1, 1))).astype(np.uint8)
    truth[::3] = 0
    pred = np.clip(0.6 * truth + rng.random(truth.shape) * 0.7, 0, 1)
    pred[1::6] = 0.0  # some empty predictions, on empty and on non-empty truths
    return pred, truth


def test_matches_direct_per_image_computation(masks):
    pred, truth = masks
    scores = dice_per_image(pred, truth)
    assert scores.dtype == np.float64 and scores.shape == (30,)
    # Same integer counts, one division: the results must agree to the last bit.
    np.testing.assert_array_equal(scores, _reference(pred, truth))
    assert dice(pred, truth) == pytest.approx(_reference(pred, truth).mean(), abs=1e-15)


def test_matches_sklearn_f1_on_non_empty_truths(masks):
    pred, truth = masks
    scores = dice_per_image(pred, truth)
    non_empty = [i for i in range(len(truth)) if truth[i].any()]
    assert len(non_empty) == 20
    for i in non_empty:
        expected = f1_score(truth[i].ravel(), (pred[i] > 0.5).ravel(), zero_division=0.0)
        assert scores[i] == pytest.approx(expected, abs=1e-12)


def test_empty_cases():
    empty = np.zeros((1, 4, 4))
    blob = np.zeros((1, 4, 4))
    blob[0, 1:3, 1:3] = 1.0
    speck = np.zeros((1, 4, 4))
    speck[0, 0, 0] = 0.9
    assert dice_per_image(empty, empty).tolist() == [1.0]  # nothing there, nothing predicted
    assert dice_per_image(speck, empty).tolist() == [0.0]  # one false-positive pixel on an empty truth
    assert dice_per_image(empty, blob).tolist() == [0.0]   # lesion missed entirely
    assert dice_per_image(speck + blob, blob).tolist() == [pytest.approx(2 * 4 / (5 + 4))]


def test_threshold_is_strict_and_the_truth_is_always_cut_at_one_half():
    pred = np.array([[[0.5, 0.51, 0.2, 0.8]]])
    truth = np.array([[[1.0, 1.0, 0.0, 0.5]]])  # the 0.5 truth pixel is negative (truth > 0.5, as MGCA)
    # P = {1, 3}, T = {0, 1}: |P∩T| = 1 → 2/4
    assert dice_per_image(pred, truth).tolist() == [0.5]
    # At 0.3: P = {0, 1, 3}, T stays {0, 1} → 2·2/5
    assert dice_per_image(pred, truth, threshold=0.3).tolist() == [pytest.approx(0.8)]
    # At 0.6: P = {3}, T = {0, 1} → 0
    assert dice_per_image(pred, truth, threshold=0.6).tolist() == [0.0]
    # 0/255 PNG-style truths and boolean predictions work at the default threshold.
    assert dice_per_image(pred > 0.5, (truth > 0.5).astype(np.uint8) * 255).tolist() == [0.5]


def test_four_dimensional_and_mixed_inputs(masks):
    pred, truth = masks
    expected = _reference(pred, truth)
    np.testing.assert_array_equal(dice_per_image(pred[:, None], truth[:, None]), expected)
    np.testing.assert_array_equal(dice_per_image(pred[:, None], truth), expected)
    np.testing.assert_array_equal(dice_per_image(torch.from_numpy(pred)[:, None], truth), expected)
    np.testing.assert_array_equal(
        dice_per_image(torch.from_numpy(pred).float(), torch.from_numpy(truth).bool()), expected)
    # bfloat16 has no numpy view, so it takes the torch counting path (the one CUDA tensors use).
    pred_bf16 = torch.from_numpy(pred).bfloat16()
    np.testing.assert_array_equal(dice_per_image(pred_bf16, truth),
                                  _reference(pred_bf16.float().numpy(), truth))


def test_rejects_bad_shapes():
    with pytest.raises(DataError, match=r"\(N, H, W\) or \(N, 1, H, W\), got \(2, 3, 4, 4\)"):
        dice_per_image(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4)))
    with pytest.raises(DataError, match=r"pred has shape \(2, 4, 4\) but truth has \(2, 4, 5\)"):
        dice_per_image(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(DataError, match="no images"):
        dice(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))


def test_mean_over_images_is_not_mean_of_batch_means():
    # Scores 1, 0, 0. MGCA with batch size 2 averages the batch means 0.5 and 0 → 0.25; every image
    # weighing the same gives 1/3.
    truth = np.zeros((3, 2, 2))
    truth[1:, 0, 0] = 1
    pred = np.zeros((3, 2, 2))
    scores = dice_per_image(pred, truth)
    assert scores.tolist() == [1.0, 0.0, 0.0]
    batch_means = np.mean([scores[:2].mean(), scores[2:].mean()])
    assert batch_means == 0.25
    assert dice(pred, truth) == pytest.approx(1 / 3, abs=1e-15)


def test_chunking_is_exact_and_bounds_memory(monkeypatch):
    rng = np.random.default_rng(1)
    pred = rng.random((64, 512, 512)) < 0.3
    truth = rng.random((64, 512, 512)) < 0.3
    whole = dice_per_image(pred, truth)
    # Four 512² images per chunk: each boolean temporary is 1 MB instead of the 16 MB of the whole set.
    monkeypatch.setattr(dice_module, "_CHUNK_PIXELS", 1 << 20)
    tracemalloc.start()
    chunked = dice_per_image(pred, truth)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(chunked, whole)
    # Unchunked, `pred > t`, `truth > t` and `p & t` would each take 16 MB; chunked they take 1 MB each.
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MB"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_numpy(masks):
    pred, truth = masks
    scores = dice_per_image(torch.from_numpy(pred).cuda(), torch.from_numpy(truth).cuda())
    np.testing.assert_array_equal(scores, _reference(pred, truth))
