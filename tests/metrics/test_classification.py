import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

from vlpbench.errors import DataError
from vlpbench.metrics.classification import (
    accuracy,
    argmax_metrics,
    auc_by_weights,
    best_threshold,
    macro_auc,
    resample_weights,
    roc_auc,
    threshold_metrics,
    threshold_metrics_by_weights,
)


def tied_problem(rng, n=60, levels=7, rate=0.3):
    """Binary labels and scores on a coarse grid, so that many scores tie (across classes too)."""
    y = (rng.random(n) < rate).astype(int)
    y[:2] = [0, 1]
    scores = np.round(rng.random(n) * (levels - 1) + 0.8 * y) / levels
    return y, scores


@pytest.mark.parametrize("seed", range(8))
def test_roc_auc_equals_sklearn_with_ties_and_weights(seed):
    rng = np.random.default_rng(seed)
    y, scores = tied_problem(rng)
    assert len(np.unique(scores)) < len(scores) / 3  # ties across positives and negatives
    assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    weights = rng.integers(0, 4, size=len(y))
    expected = roc_auc_score(y, scores, sample_weight=weights)
    assert roc_auc(y, scores, sample_weight=weights) == pytest.approx(expected, abs=1e-12)
    # Integer weights are repetitions: the same as scoring the repeated items.
    repeated = np.repeat(np.arange(len(y)), weights)
    assert roc_auc(y[repeated], scores[repeated]) == pytest.approx(expected, abs=1e-12)
    assert auc_by_weights(y, scores)(weights.astype(float)) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_hand_values_and_undefined_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert roc_auc([1, 1, 1], [0.2, 0.3, 0.4]) is None
    assert roc_auc([0, 1, 1], [0.9, 0.1, 0.2], sample_weight=[0, 1, 1]) is None  # weighted away
    with pytest.raises(DataError, match="0 or 1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(DataError, match="finite"):
        roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(DataError, match="3 scores for 2 labels"):
        roc_auc([0, 1], [0.1, 0.2, 0.3])


def test_macro_auc_skips_undefined_classes():
    rng = np.random.default_rng(1)
    y = np.stack([tied_problem(rng, 40)[0], tied_problem(rng, 40)[0], np.zeros(40, int)], axis=1)
    scores = rng.random((40, 3)).round(1)
    mean, per_class = macro_auc(y, scores)
    expected = [roc_auc_score(y[:, k], scores[:, k]) for k in range(2)]
    assert per_class[:2] == pytest.approx(expected, abs=1e-12) and per_class[2] is None
    assert mean == pytest.approx(np.mean(expected), abs=1e-12)
    assert macro_auc(np.zeros((3, 2), int), np.ones((3, 2))) == (None, [None, None])


def test_accuracy_and_argmax_metrics_equal_sklearn():
    rng = np.random.default_rng(2)
    scores = rng.random((80, 5)).round(1)  # ties inside a row go to the lowest index, as argmax
    y = rng.integers(0, 5, size=80)
    agree = rng.random(80) < 0.4
    y[agree] = scores.argmax(axis=1)[agree]
    predicted = scores.argmax(axis=1)
    assert accuracy(y, scores) == pytest.approx(accuracy_score(y, predicted), abs=1e-12)
    metrics = argmax_metrics(y, scores)
    assert metrics["acc"] == pytest.approx(accuracy_score(y, predicted), abs=1e-12)
    assert metrics["f1"] == pytest.approx(f1_score(y, predicted, average="macro"), abs=1e-12)
    assert metrics["mcc"] == pytest.approx(matthews_corrcoef(y, predicted), abs=1e-12)
    weights = rng.integers(0, 3, size=80)
    weighted = argmax_metrics(y, scores, sample_weight=weights)
    assert weighted["mcc"] == pytest.approx(matthews_corrcoef(y, predicted, sample_weight=weights), abs=1e-12)
    assert weighted["f1"] == pytest.approx(f1_score(y, predicted, average="macro", sample_weight=weights), abs=1e-12)
    assert accuracy([0, 1, 2], [[0.9, 0.1, 0], [0.2, 0.8, 0], [0.5, 0.3, 0.2]]) == pytest.approx(2 / 3)
    with pytest.raises(DataError, match="0..2"):
        accuracy([0, 3], [[1, 0, 0], [0, 1, 0]])


@pytest.mark.parametrize("seed", range(6))
def test_threshold_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, scores = tied_problem(rng)
    for threshold in (*np.unique(scores), 2.0):
        predicted = (scores >= threshold).astype(int)
        metrics = threshold_metrics(y, scores, threshold)
        assert metrics["f1"] == pytest.approx(f1_score(y, predicted, zero_division=0), abs=1e-12)
        assert metrics["acc"] == pytest.approx(accuracy_score(y, predicted), abs=1e-12)
        assert metrics["mcc"] == pytest.approx(matthews_corrcoef(y, predicted), abs=1e-12)
    weights = rng.integers(0, 4, size=len(y))
    predicted = (scores >= np.median(scores)).astype(int)
    by_weights = threshold_metrics_by_weights(y, scores, np.median(scores))(weights.astype(float))
    assert by_weights == threshold_metrics(y, scores, np.median(scores), sample_weight=weights)
    assert by_weights["f1"] == pytest.approx(f1_score(y, predicted, sample_weight=weights), abs=1e-12)
    assert by_weights["acc"] == pytest.approx(accuracy_score(y, predicted, sample_weight=weights), abs=1e-12)
    assert by_weights["mcc"] == pytest.approx(matthews_corrcoef(y, predicted, sample_weight=weights), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("criterion", ["f1", "mcc"])
def test_best_threshold_is_the_brute_force_optimum(seed, criterion):
    rng = np.random.default_rng(seed)
    y, scores = tied_problem(rng, n=50)
    metric = f1_score if criterion == "f1" else matthews_corrcoef
    value = {t: metric(y, (scores >= t).astype(int)) for t in np.unique(scores)}
    best = max(value.values())
    threshold = best_threshold(y, scores, criterion)
    assert value[threshold] == pytest.approx(best, abs=1e-12)
    assert threshold == max(t for t, v in value.items() if v >= best - 1e-12)  # the highest optimal cut


def test_best_threshold_hand_value_and_undefined_cases():
    assert best_threshold([0, 1, 0, 1, 1], [0.1, 0.7, 0.6, 0.8, 0.3]) == 0.3
    with pytest.raises(DataError, match="0 positives"):
        best_threshold([0, 0], [0.1, 0.2])
    with pytest.raises(DataError, match="both classes"):
        best_threshold([1, 1], [0.1, 0.2], "mcc")
    with pytest.raises(DataError, match="criterion"):
        best_threshold([0, 1], [0.1, 0.2], "youden")


def test_resample_weights_count_repeats():
    assert resample_weights(np.array([0, 2, 2, 4]), 5).tolist() == [1, 0, 2, 0, 1]
