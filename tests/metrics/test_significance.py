"""Paired tests (vlpbench.metrics.significance) against independent computations, and the evidence they read.

DeLong is checked against a brute-force implementation of the published formula (structural components
V10 / V01 from the kernel ψ over all positive–negative pairs, DeLong et al. 1988), its AUCs against
scikit-learn and its variance against a bootstrap estimate; the paired bootstrap against a direct numpy
computation with the same seed; Holm against the textbook loop. Planted differences are found and
identical predictions give p = 1 with a CI of [0, 0].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score

from vlpbench.errors import DataError
from vlpbench.evidence import (
    classification_evidence,
    detection_evidence,
    per_item_evidence,
    read_evidence,
    write_evidence,
)
from vlpbench.metrics.detection import IOU_THRESHOLDS, detection_map
from vlpbench.metrics.significance import (
    delong,
    holm,
    midranks,
    paired_bootstrap,
    paired_bootstrap_means,
)
from vlpbench.protocols.classification import evaluate_classification


def _delong_by_definition(labels, a, b):
    """DeLong et al. (1988): V10(X_i) = mean_j ψ(X_i, Y_j), V01(Y_j) = mean_i ψ(X_i, Y_j), ψ = 1 / ½ / 0;
    S10, S01 their sample covariances across the two models; var(δ) = (S10 + S01 contrasts)."""
    pos, neg = labels == 1, labels == 0
    v10, v01, aucs = [], [], []
    for scores in (a, b):
        x, y = scores[pos][:, None], scores[neg][None, :]
        psi = (x > y) + 0.5 * (x == y)
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    m, n = pos.sum(), neg.sum()
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    contrast = np.array([1.0, -1.0])
    variance = contrast @ s10 @ contrast / m + contrast @ s01 @ contrast / n
    z = (aucs[0] - aucs[1]) / math.sqrt(variance)
    return aucs, math.sqrt(variance), 2 * norm.sf(abs(z))


def _auc(labels, scores):
    """Mann-Whitney AUC from scipy's average ranks (fast enough for bootstrap loops; sklearn's equal)."""
    ranks = rankdata(scores)
    m = labels.sum()
    return (ranks[labels == 1].sum() - m * (m + 1) / 2) / (m * (len(labels) - m))


def test_delong_matches_the_published_formula_and_sklearn():
    rng = np.random.default_rng(3)
    for n, ties in ((60, False), (200, True)):
        labels = (rng.random(n) < 0.4).astype(int)
        a = labels + rng.normal(0, 1.2, n)
        b = 0.5 * labels + rng.normal(0, 1.0, n)
        if ties:  # coarse scores: many ties within and across classes
            a, b = np.round(a, 0), np.round(b * 2, 0) / 2
        result = delong(labels, a, b)
        (auc_a, auc_b), se, p = _delong_by_definition(labels, a, b)
        assert result["auc_a"] == pytest.approx(roc_auc_score(labels, a), abs=1e-12) == pytest.approx(auc_a)
        assert result["auc_b"] == pytest.approx(roc_auc_score(labels, b), abs=1e-12) == pytest.approx(auc_b)
        assert result["se"] == pytest.approx(se, rel=1e-9)
        assert result["p_value"] == pytest.approx(p, rel=1e-9)
        assert result["low"] == pytest.approx(result["diff"] - norm.ppf(0.975) * se, rel=1e-9)


def test_delong_variance_agrees_loosely_with_a_bootstrap_estimate():
    rng = np.random.default_rng(5)
    n = 300
    labels = (rng.random(n) < 0.5).astype(int)
    a, b = labels + rng.normal(0, 1.5, n), labels + rng.normal(0, 2.0, n)
    assert _auc(labels, a) == pytest.approx(roc_auc_score(labels, a))
    diffs = []
    for _ in range(400):
        idx = rng.integers(0, n, n)
        diffs.append(_auc(labels[idx], a[idx]) - _auc(labels[idx], b[idx]))
    assert delong(labels, a, b)["se"] == pytest.approx(np.std(diffs, ddof=1), rel=0.25)


def test_midranks_are_scipy_average_ranks():
    x = np.random.default_rng(0).integers(0, 7, 50).astype(float)
    assert np.array_equal(midranks(x), rankdata(x, method="average"))


def test_delong_null_and_planted():
    rng = np.random.default_rng(1)
    labels = (rng.random(150) < 0.5).astype(int)
    good, noise = labels + rng.normal(0, 0.5, 150), rng.normal(0, 1, 150)
    same = delong(labels, good, good)
    assert same["p_value"] == 1.0 and same["diff"] == same["low"] == same["high"] == 0.0
    assert delong(labels, good, noise)["p_value"] < 1e-6
    with pytest.raises(DataError, match="two positives"):
        delong(np.zeros(10, dtype=int), good[:10], noise[:10])


def _direct_p(observed, differences):
    return (1 + np.sum(np.abs(differences - observed) >= abs(observed) - 1e-10)) / (len(differences) + 1)


def test_paired_bootstrap_of_means_is_the_direct_numpy_computation():
    rng = np.random.default_rng(2)
    a, b = rng.random(40), rng.random(40)
    result = paired_bootstrap_means(a, b, n_resamples=300, seed=7)
    # bootstrap_ci's draw for a small n: one (resamples, n) matrix from default_rng(seed).
    idx = np.random.default_rng(7).integers(0, 40, size=(300, 40))
    differences = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    assert result["diff"] == pytest.approx(a.mean() - b.mean())
    assert result["low"] == pytest.approx(np.percentile(differences, 2.5), abs=1e-12)
    assert result["high"] == pytest.approx(np.percentile(differences, 97.5), abs=1e-12)
    assert result["p_value"] == pytest.approx(_direct_p(a.mean() - b.mean(), differences))
    assert result["skipped"] == 0 and result["n_resamples"] == 300

    # NaN: the item does not count for that model's mean (an undefined CNR).
    a[[1, 5]], b[[2]] = np.nan, np.nan
    result = paired_bootstrap_means(a, b, n_resamples=300, seed=7)
    direct = np.array([np.nanmean(a[i]) - np.nanmean(b[i]) for i in idx])
    assert result["diff"] == pytest.approx(np.nanmean(a) - np.nanmean(b))
    assert result["low"] == pytest.approx(np.percentile(direct, 2.5), abs=1e-12)
    assert result["p_value"] == pytest.approx(_direct_p(np.nanmean(a) - np.nanmean(b), direct))


def test_paired_bootstrap_of_a_statistic_is_the_direct_computation_and_skips_undefined_resamples():
    rng = np.random.default_rng(4)
    n = 12  # two positives: about one resample in nine holds none
    labels = np.array([1, 1] + [0] * 10)
    a, b = rng.random(n) + 0.3 * labels, rng.random(n)

    def auc_of(scores):
        def statistic(w):  # the resample as repeated items
            items = np.repeat(np.arange(n), w.astype(int))
            return _auc(labels[items], scores[items]) if 0 < labels[items].sum() < len(items) else math.nan
        return statistic

    result = paired_bootstrap(auc_of(a), auc_of(b), n, n_resamples=200, seed=3)
    direct = []
    for idx in np.random.default_rng(3).integers(0, n, size=(200, n)):
        if 0 < labels[idx].sum() < n:
            direct.append(roc_auc_score(labels[idx], a[idx]) - roc_auc_score(labels[idx], b[idx]))
    observed = roc_auc_score(labels, a) - roc_auc_score(labels, b)
    assert result["skipped"] == 200 - len(direct) > 0
    assert result["low"] == pytest.approx(np.percentile(direct, 2.5))
    assert result["p_value"] == pytest.approx(_direct_p(observed, np.array(direct)))
    # The statistic form of a mean is the vectorised form.
    means = paired_bootstrap(lambda w: w @ a / w.sum(), lambda w: w @ b / w.sum(), n, n_resamples=200, seed=3)
    vectorised = paired_bootstrap_means(a, b, n_resamples=200, seed=3)
    assert means["low"] == pytest.approx(vectorised["low"]) and means["p_value"] == vectorised["p_value"]


def test_planted_difference_is_found_and_identical_predictions_give_p_one():
    rng = np.random.default_rng(8)
    better, worse = rng.random(200) * 0.5 + 0.45, rng.random(200) * 0.5 + 0.35
    planted = paired_bootstrap_means(better, worse, n_resamples=500)
    assert planted["p_value"] == 1 / 501 and planted["low"] > 0
    null = paired_bootstrap_means(better, better.copy(), n_resamples=500)
    assert null["p_value"] == 1.0 and null["low"] == null["high"] == null["diff"] == 0.0


def test_holm_is_the_textbook_step_down():
    rng = np.random.default_rng(6)
    for m in (1, 3, 8):
        p = rng.random(m) ** 3
        order = np.argsort(p)
        direct = np.empty(m)
        running = 0.0
        for i, k in enumerate(order):
            running = max(running, min(1.0, (m - i) * p[k]))
            direct[k] = running
        assert np.allclose(holm(p), direct)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    with pytest.raises(DataError):
        holm([0.5, 1.5])


# --- evidence: statistics rebuild the protocols' metrics; the sidecar round-trips ---------------------------


def test_classification_evidence_reproduces_the_evaluation_on_any_weights():
    rng = np.random.default_rng(9)
    n = 80
    labels = (rng.random((n, 3)) < 0.4).astype(int)
    probs = np.clip(labels * 0.3 + rng.random((n, 3)) * 0.7, 0, 1)
    ids = [f"i{k}" for k in range(n)]
    thresholds = [0.5, None, 0.6]
    evaluated = evaluate_classification("multilabel", ["a", "b c", "d"], ids, labels, probs, ["auc", "f1", "acc"],
                                        thresholds=thresholds, n_resamples=10, seed=0, acc_rule="gt")
    statistics = evaluated["evidence"].statistics()
    for name, value in evaluated["metrics"].items():
        assert statistics[name](np.ones(n)) == pytest.approx(value), name
    subset = np.zeros(n)
    subset[:50] = 1  # an indicator vector is the metric of that subset
    assert statistics["auc_b_c"](subset) == pytest.approx(roc_auc_score(labels[:50, 1], probs[:50, 1]))
    curves = evaluated["evidence"].auc_curves()
    assert set(curves) == {"auc_a", "auc_b_c", "auc_d"} and np.array_equal(curves["auc_d"][1], probs[:, 2])

    multiclass = evaluate_classification("multiclass", ["x", "y", "z"], ids, labels.argmax(1), probs, ["acc", "auc"],
                                         thresholds=None, n_resamples=10, seed=0)
    accuracy = multiclass["evidence"].item_values("acc")
    assert accuracy.mean() == pytest.approx(multiclass["metrics"]["acc"])
    assert np.array_equal(accuracy, [multiclass["per_image"][i] for i in ids])


def _random_detections(rng, n):
    truths, detections = [], []
    for _ in range(n):
        truth = rng.random((rng.integers(0, 3), 2)) * 50
        truths.append(np.hstack([truth, truth + 20]))
        boxes = rng.random((rng.integers(0, 4), 2)) * 50
        detections.append((np.hstack([boxes, boxes + 20]), rng.random(len(boxes))))
    return truths, detections


def test_detection_evidence_reproduces_map_and_its_variants_on_subsets():
    rng = np.random.default_rng(10)
    truths, detections = _random_detections(rng, 30)
    evidence = detection_evidence([f"d{i}" for i in range(30)], truths, detections, iou_thresholds=IOU_THRESHOLDS,
                                  max_detections=100)
    statistics = evidence.statistics()
    keep = np.arange(30) < 20
    for weights, chosen in ((np.ones(30), slice(None)), (keep.astype(float), slice(0, 20))):
        boxes, scores = [b for b, _ in detections][chosen], [s for _, s in detections][chosen]
        coco = detection_map(truths[chosen], boxes, scores)
        mgca = detection_map(truths[chosen], boxes, scores, protocol="mgca")
        assert statistics["map"](weights) == pytest.approx(coco["map"])
        assert statistics["ap50"](weights) == pytest.approx(coco["ap50"])
        assert statistics["map_mgca"](weights) == pytest.approx(mgca["map"])


def _stub_record(name="m", created="2026-01-01T00:00:00+00:00"):
    return {"model": {"name": name, "checkpoint": None}, "task": {"name": "t", "version": 1}, "frac": 1.0,
            "seed": 0, "split": {"sha256": "s" * 64}, "created": created}


def test_sidecar_round_trip_is_checked_against_its_record(tmp_path):
    evidence = per_item_evidence(["a", "b", "c"], {"dice": np.array([0.1, np.nan, 0.5])}, labels=np.array([1, 0, 1]),
                                 untestable=["iou: a reason"])
    record_file = tmp_path / "frac1.0-seed0.json"
    entry = write_evidence(evidence, _stub_record(), record_file)
    assert entry["file"] == "frac1.0-seed0.evidence.npz" and len(entry["sha256"]) == 64
    record = {**_stub_record(), "evidence": entry}
    back = read_evidence(record, record_file)
    assert back.ids == ["a", "b", "c"] and back.untestable == ["iou: a reason"]
    assert np.array_equal(back.arrays["values"], evidence.arrays["values"], equal_nan=True)
    assert back.statistics()["dice"](np.array([1.0, 1.0, 3.0])) == pytest.approx((0.1 + 1.5) / 4)

    with pytest.raises(DataError, match="another record"):
        read_evidence({**_stub_record(created="2027-01-01T00:00:00+00:00"), "evidence": entry}, record_file)
    (tmp_path / entry["file"]).write_bytes((tmp_path / entry["file"]).read_bytes() + b"x")
    with pytest.raises(DataError, match="sha256"):
        read_evidence(record, record_file)
    (tmp_path / entry["file"]).unlink()
    with pytest.raises(DataError, match="cannot read the evidence"):
        read_evidence(record, record_file)


def test_classification_evidence_has_no_object_arrays():
    evidence = classification_evidence("binary", ["p"], ["x", "y"], np.array([[1], [0]]), np.array([[0.7], [0.2]]),
                                       ["auc", "f1"], [0.5], "ge")
    assert all(array.dtype != object for array in evidence.arrays.values())
