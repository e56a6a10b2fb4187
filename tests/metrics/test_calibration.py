"""Calibration metrics against loops written here from the definitions, scikit-learn's Brier score, planted
(mis)calibration, and the weights form against the expanded sample."""

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss

from vlpbench.errors import DataError
from vlpbench.metrics.calibration import (
    CalibrationProblem,
    brier_score,
    check_calibration_entry,
    expected_calibration_error,
    multiclass_brier_score,
    not_probabilities,
    top_label,
)
from vlpbench.protocols.calibration import calibration_parts

M = 15


def loop_ece_width(p, y, n_bins=M):
    """Guo et al.'s ECE: bins (lo, hi] of linspace(0, 1, M + 1), 0 in the first bin, empty bins add nothing."""
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for m in range(n_bins):
        members = [i for i in range(len(p)) if edges[m] < p[i] <= edges[m + 1] or (m == 0 and p[i] == 0)]
        if members:
            acc = sum(y[i] for i in members) / len(members)
            conf = sum(p[i] for i in members) / len(members)
            total += len(members) / len(p) * abs(acc - conf)
    return total


def chunked_ece_mass(p, y, n_bins=M):
    """Equal-mass ECE by brute force: every item repeated n_bins times, so that n_bins equal chunks of the
    sorted sample hold exactly len(p) copies each, then the mean over chunks of |frequency - confidence|."""
    order = np.argsort(p, kind="stable")
    p_rep, y_rep = np.repeat(p[order], n_bins), np.repeat(y[order], n_bins)
    chunks = zip(np.array_split(p_rep, n_bins), np.array_split(y_rep, n_bins))
    return float(np.mean([abs(cy.mean() - cp.mean()) for cp, cy in chunks]))


@pytest.fixture(scope="module")
def random_problem():
    rng = np.random.default_rng(7)
    p = rng.uniform(size=203)
    p[:6] = [0.0, 1.0, 1 / 15, 2 / 15, 0.2, 14 / 15]  # on bin edges: each belongs to the bin below it
    y = rng.integers(0, 2, size=p.size).astype(float)
    return p, y


def test_equal_width_ece_equals_the_loop_over_bins(random_problem):
    p, y = random_problem
    assert expected_calibration_error(p, y) == pytest.approx(loop_ece_width(p, y), abs=1e-12)
    assert expected_calibration_error(p, y, n_bins=4) == pytest.approx(loop_ece_width(p, y, 4), abs=1e-12)


def test_equal_mass_ece_equals_equal_chunks_of_the_sorted_sample(random_problem):
    p, y = random_problem  # 203 items: 15 does not divide it, so items straddle bin edges
    assert expected_calibration_error(p, y, binning="mass") == pytest.approx(chunked_ece_mass(p, y), abs=1e-12)
    # Where M divides N the bins are the plain consecutive chunks of N / M sorted items.
    q, z = p[:195], y[:195]
    order = np.argsort(q)
    plain = np.mean([abs(cz.mean() - cq.mean())
                     for cq, cz in zip(np.split(q[order], M), np.split(z[order], M))])
    assert expected_calibration_error(q, z, binning="mass") == pytest.approx(plain, abs=1e-12)


def test_equal_mass_ece_does_not_depend_on_the_order_of_tied_confidences():
    rng = np.random.default_rng(3)
    p = rng.choice([0.1, 0.35, 0.6, 0.9], size=97)
    y = (rng.uniform(size=p.size) < p).astype(float)
    values = set()
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(p.size)
        values.add(round(expected_calibration_error(p[order], y[order], binning="mass"), 12))
    assert len(values) == 1


def test_brier_equals_scikit_learn_binary_and_multiclass():
    rng = np.random.default_rng(11)
    p = rng.uniform(size=300)
    y = rng.integers(0, 2, size=300)
    w = rng.integers(0, 4, size=300).astype(float)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert brier_score(y, p, sample_weight=w) == pytest.approx(brier_score_loss(y, p, sample_weight=w), abs=1e-12)
    probs = rng.dirichlet(np.ones(4), size=300)
    labels = rng.integers(0, 4, size=300)
    # scikit-learn keeps the multi-class score in Brier's [0, 2] range unless told to halve it.
    expected = brier_score_loss(labels, probs, labels=[0, 1, 2, 3], scale_by_half=False)
    assert multiclass_brier_score(labels, probs) == pytest.approx(expected, abs=1e-12)
    assert multiclass_brier_score(labels, probs, sample_weight=w) == pytest.approx(
        brier_score_loss(labels, probs, labels=[0, 1, 2, 3], sample_weight=w, scale_by_half=False), abs=1e-12)


def test_a_calibrated_predictor_scores_near_zero_and_an_overconfident_one_high():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200_000)
    y = (rng.uniform(size=p.size) < p).astype(float)  # labels drawn as Bernoulli(p): calibrated by construction
    # Sampling noise alone: about sqrt(2 / pi) * sqrt(0.17 / (N / 15)) ≈ 0.003 per bin, so 0.01 is generous.
    assert expected_calibration_error(p, y) < 0.01
    assert expected_calibration_error(p, y, binning="mass") < 0.01
    logit = np.log(p / (1 - p))
    overconfident = 1 / (1 + np.exp(-4 * logit))  # the same ranking, pushed towards 0 and 1
    assert expected_calibration_error(overconfident, y) > 0.1
    assert expected_calibration_error(overconfident, y, binning="mass") > 0.1
    assert brier_score(y, overconfident) > brier_score(y, p) + 0.02


def test_weights_equal_the_expanded_sample(random_problem):
    p, y = random_problem
    w = np.random.default_rng(5).integers(0, 4, size=p.size)
    expanded = np.repeat(np.arange(p.size), w)
    shuffled = np.random.default_rng(6).permutation(expanded)  # a resample's order is arbitrary
    problem = CalibrationProblem(p, y)
    assert problem.ece(w.astype(float)) == pytest.approx(expected_calibration_error(p[shuffled], y[shuffled]),
                                                         abs=1e-12)
    assert problem.adaptive_ece(w.astype(float)) == pytest.approx(
        expected_calibration_error(p[shuffled], y[shuffled], binning="mass"), abs=1e-12)
    assert problem.brier(w.astype(float)) == pytest.approx(brier_score(y[shuffled], p[shuffled]), abs=1e-12)
    assert expected_calibration_error(p, y, sample_weight=w) == pytest.approx(problem.ece(w.astype(float)))
    assert np.isnan(problem.ece(np.zeros(p.size))) and np.isnan(problem.adaptive_ece(np.zeros(p.size)))


def test_reliability_bins_equal_the_loop(random_problem):
    p, y = random_problem
    bins = CalibrationProblem(p, y).reliability(np.ones(p.size))
    edges = np.linspace(0, 1, M + 1)
    assert sum(bins["count"]) == p.size
    for m in range(M):
        members = (p > edges[m]) & (p <= edges[m + 1]) | ((m == 0) & (p == 0))
        assert bins["count"][m] == members.sum()
        if members.any():
            assert bins["confidence"][m] == pytest.approx(p[members].mean(), abs=1e-12)
            assert bins["frequency"][m] == pytest.approx(y[members].mean(), abs=1e-12)
        else:
            assert bins["confidence"][m] is None and bins["frequency"][m] is None


def test_top_label_and_multiclass_statistics():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3) * 0.7, size=150)
    labels = rng.integers(0, 3, size=150)
    confidence, correct = top_label(labels, probs)
    assert np.array_equal(confidence, probs.max(axis=1))
    assert np.array_equal(correct, (probs.argmax(axis=1) == labels).astype(float))
    statistics, entry = calibration_parts("multiclass", ["a", "b", "c"], labels, probs)
    assert set(statistics) == {"ece", "adaptive_ece", "brier"}
    full = np.ones(150)
    assert statistics["ece"](full) == pytest.approx(loop_ece_width(confidence, correct), abs=1e-12)
    assert statistics["brier"](full) == pytest.approx(
        brier_score_loss(labels, probs, labels=[0, 1, 2], scale_by_half=False), abs=1e-12)
    assert list(entry["curves"]) == ["top_label"] and check_calibration_entry(entry)


def test_multilabel_statistics_are_per_class_and_macro():
    rng = np.random.default_rng(4)
    probs = rng.uniform(size=(120, 3))
    labels = (rng.uniform(size=(120, 3)) < probs).astype(int)
    classes = ["Pleural Effusion", "Edema", "Mass"]
    statistics, entry = calibration_parts("multilabel", classes, labels, probs)
    full = np.ones(120)
    per_class = [loop_ece_width(probs[:, k], labels[:, k]) for k in range(3)]
    assert statistics["ece_pleural_effusion"](full) == pytest.approx(per_class[0], abs=1e-12)
    assert statistics["ece"](full) == pytest.approx(np.mean(per_class), abs=1e-12)
    assert statistics["brier_mass"](full) == pytest.approx(brier_score_loss(labels[:, 2], probs[:, 2]), abs=1e-12)
    assert statistics["adaptive_ece_edema"](full) == pytest.approx(chunked_ece_mass(probs[:, 1], labels[:, 1]))
    assert list(entry["curves"]) == classes and check_calibration_entry(entry)


def test_scores_that_are_no_probabilities_are_left_out_with_the_reason():
    assert "outside [0, 1]" in not_probabilities("binary", np.array([[0.2], [1.3]]))
    rows = np.array([[0.9, 0.8], [0.1, 0.3]])  # independent presence probabilities per class
    assert "do not sum to 1" in not_probabilities("multiclass", rows)
    assert not_probabilities("multilabel", rows) is None
    statistics, entry = calibration_parts("multiclass", ["a", "b"], np.array([0, 1]), rows)
    assert statistics == {} and "do not sum to 1" in entry["left_out"]
    statistics, entry = calibration_parts("binary", ["a"], np.array([[0], [1]]), np.array([[0.2], [0.7]]),
                                          left_out="a ranking score")
    assert statistics == {} and entry == {"left_out": "a ranking score"}


def test_bad_input_and_entries_are_refused():
    with pytest.raises(DataError, match=r"in \[0, 1\]"):
        expected_calibration_error([0.5, 1.2], [0, 1])
    with pytest.raises(DataError, match="0 or 1"):
        expected_calibration_error([0.5, 0.2], [0, 2])
    with pytest.raises(DataError, match="binning"):
        expected_calibration_error([0.5], [1], binning="quantile")
    assert not check_calibration_entry({"left_out": ""})
    assert not check_calibration_entry({"n_bins": 2, "binning": "w", "confidence": "c",
                                        "curves": {"a": {"lower": [0], "upper": [1], "confidence": [None],
                                                         "frequency": [None], "count": [0]}}})
