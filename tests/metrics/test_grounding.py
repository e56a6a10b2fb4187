"""Grounding metrics against scikit-learn, direct numpy formulas and hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score, recall_score

from vlpbench.errors import DataError
from vlpbench.metrics.grounding import (
    candidate_thresholds,
    choose_threshold,
    cnr,
    dice,
    dice_curve,
    grounding_scores,
    iou,
    pointing_game,
    recall,
)


@pytest.fixture
def pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """20 random 16x20 maps with rectangular truths (never empty), the maps brighter on the truth."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(20):
        truth = np.zeros((16, 20), dtype=np.uint8)
        y, x = rng.integers(0, 12), rng.integers(0, 16)
        truth[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = 1
        out.append((rng.random((16, 20)) + rng.uniform(0, 1) * truth, truth))
    return out


def test_thresholded_metrics_match_sklearn_on_flattened_masks(pairs):
    for heat, truth in pairs:
        for threshold in (0.3, 0.7, 1.2):
            predicted = (heat > threshold).ravel().astype(int)
            expected = truth.ravel()
            if predicted.any():
                assert iou(heat, truth, threshold) == pytest.approx(jaccard_score(expected, predicted))
            assert dice(heat, truth, threshold) == pytest.approx(f1_score(expected, predicted, zero_division=0.0))
            assert recall(heat, truth, threshold) == pytest.approx(recall_score(expected, predicted))


def test_pointing_game_and_cnr_match_direct_computation(pairs):
    for heat, truth in pairs:
        row, col = np.unravel_index(np.argmax(heat), heat.shape)  # random floats: a unique maximum
        assert pointing_game(heat, truth) == float(truth[row, col])
        inside, outside = heat[truth == 1], heat[truth == 0]
        expected = abs(np.mean(inside) - np.mean(outside)) / math.sqrt(np.var(inside) + np.var(outside))
        assert cnr(heat, truth) == pytest.approx(expected)
        scores = grounding_scores(heat, truth, 0.8)
        assert scores == pytest.approx({"pointing_game": pointing_game(heat, truth), "recall": recall(heat, truth, 0.8),
                                        "iou": iou(heat, truth, 0.8), "dice": dice(heat, truth, 0.8),
                                        "cnr": cnr(heat, truth)})


def test_pointing_game_on_the_border_and_with_ties():
    heat = np.zeros((4, 5))
    heat[3, 4] = 2.0  # the maximum in the bottom-right corner
    corner = np.zeros((4, 5), dtype=bool)
    corner[3, 4] = True
    assert pointing_game(heat, corner) == 1.0
    assert pointing_game(heat, ~corner) == 0.0
    heat[0, 0] = 2.0  # a tie: one maximum inside the truth is enough (MedKLIP)
    assert pointing_game(heat, corner) == 1.0
    top_left = np.zeros((4, 5), dtype=bool)
    top_left[0, 0] = True
    assert pointing_game(heat, top_left) == 1.0
    assert pointing_game(np.full((4, 5), 0.3), top_left) == 1.0  # a constant map always hits (documented)


def test_empty_truth_conventions():
    heat = np.array([[0.9, 0.1], [0.2, 0.4]])
    empty = np.zeros((2, 2))
    with pytest.raises(DataError, match="empty ground truth"):
        pointing_game(heat, empty)
    with pytest.raises(DataError, match="empty ground truth"):
        recall(heat, empty, 0.5)
    with pytest.raises(DataError, match="empty ground truth"):
        grounding_scores(heat, empty, 0.5)
    assert iou(heat, empty, 0.95) == 1.0 and dice(heat, empty, 0.95) == 1.0  # empty vs empty
    assert iou(heat, empty, 0.5) == 0.0 and dice(heat, empty, 0.5) == 0.0
    assert math.isnan(cnr(heat, empty)) and math.isnan(cnr(heat, np.ones((2, 2))))


def test_hand_worked_values():
    heat = np.array([[1.0, 3.0, 0.0], [0.0, 1.0, 1.0]])
    truth = np.array([[1, 1, 0], [0, 0, 0]])
    # inside {1, 3}: mean 2, var 1; outside {0, 0, 1, 1}: mean 0.5, var 0.25
    assert cnr(heat, truth) == pytest.approx(1.5 / math.sqrt(1.25))
    assert cnr(2.0 * heat - 7.0, truth) == pytest.approx(1.5 / math.sqrt(1.25))  # affine invariant
    # P = heat > 0.5 = {(0,0), (0,1), (1,1), (1,2)}: 2 of 2 truth pixels, union 4
    assert (recall(heat, truth, 0.5), iou(heat, truth, 0.5), dice(heat, truth, 0.5)) == (1.0, 0.5, 2 * 2 / 6)
    assert pointing_game(heat, truth) == 1.0
    assert math.isnan(cnr(truth * 5.0, truth))  # constant inside and outside: no noise, undefined


def test_bad_input_names_the_problem():
    with pytest.raises(DataError, match="shape"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)), 0.5)
    with pytest.raises(DataError, match="2-D"):
        iou(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)), 0.5)
    with pytest.raises(DataError, match="NaN"):
        pointing_game(np.array([[np.nan, 1.0]]), np.array([[1, 0]]))


def test_dice_curve_and_threshold_search_equal_brute_force(pairs):
    thresholds = candidate_thresholds(np.concatenate([h.ravel() for h, _ in pairs]), 50)
    assert np.all(np.diff(thresholds) > 0) and len(thresholds) == 51
    pooled = np.concatenate([h.ravel() for h, _ in pairs])
    assert thresholds[0] == pooled.min() and thresholds[-1] == pooled.max()
    assert thresholds[25] == pytest.approx(np.median(pooled))
    brute = np.array([[dice(h, t, th) for th in thresholds] for h, t in pairs])
    curves = np.array([dice_curve(h, t, thresholds) for h, t in pairs])
    np.testing.assert_allclose(curves, brute)
    best, best_dice = choose_threshold(iter(pairs), thresholds)
    assert best == thresholds[np.argmax(brute.mean(axis=0))]
    assert best_dice == pytest.approx(brute.mean(axis=0).max())
    with pytest.raises(DataError, match="no heat maps"):
        choose_threshold([], thresholds)
