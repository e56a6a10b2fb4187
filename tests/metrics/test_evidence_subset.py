"""Evidence.subset: a subgroup's statistics over its own items equal the full evidence's statistics on the same
weights with 0 on every other item, for every evidence kind and metric (classification with thresholds and
calibration, multi-class, per-item means with NaN, a weighted median, detection); subgroup metrics from the
subset evidence equal those computed on full-length weights; calibration and retrieval statistics are
rebuilt from evidence and match the evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vlpbench.evidence import detection_evidence, per_item_evidence
from vlpbench.metrics.detection import IOU_THRESHOLDS
from vlpbench.metrics.subgroups import subgroup_metrics
from vlpbench.protocols.classification import evaluate_classification

N = 90


def _pairs(evidence, rng, draws=6):
    """(subset statistics, full statistics, subset weights, full weights) on random members and resamples."""
    members = np.sort(rng.choice(evidence.n, size=evidence.n // 2, replace=False))
    part = evidence.subset(members)
    out = []
    for _ in range(draws):
        counts = np.bincount(rng.integers(0, len(members), len(members)), minlength=len(members)).astype(float)
        full = np.zeros(evidence.n)
        full[members] = counts
        out.append((counts, full))
    out.append((np.ones(len(members)), np.isin(np.arange(evidence.n), members).astype(float)))
    return part.statistics(), evidence.statistics(), out


def _assert_same(part, full, weights, exact=()):
    assert set(part) == set(full)
    for name in full:
        for w_part, w_full in weights:
            a, b = part[name](w_part), full[name](w_full)
            if name in exact:
                assert a == b or (np.isnan(a) and np.isnan(b)), name
            else:  # a mean over other items' zeros may round its last bit differently
                assert a == pytest.approx(b, rel=1e-12, abs=1e-15, nan_ok=True), name


def _multilabel(rng, n=N):
    labels = (rng.random((n, 3)) < 0.35).astype(int)
    labels[:, 2] = 0
    labels[0, 2] = 1  # class 2: one positive in all, so most subsets lack it
    probs = np.clip(labels * 0.3 + rng.random((n, 3)) * 0.7, 0, 1)
    return labels, probs


def test_classification_subset_equals_full_weights_for_every_metric():
    rng = np.random.default_rng(20)
    labels, probs = _multilabel(rng)
    ids = [f"i{k}" for k in range(N)]
    evaluated = evaluate_classification("multilabel", ["a", "b", "c"], ids, labels, probs, ["auc", "f1", "acc", "mcc"],
                                        thresholds=[0.5, 0.6, 0.4], n_resamples=5, seed=0)
    evidence = evaluated["evidence"]
    assert {"ece", "adaptive_ece", "brier", "ece_a", "brier_c"} <= set(evidence.statistics())
    part, full, weights = _pairs(evidence, rng)
    # AUCs, threshold metrics and equal-width ECE are sums in a fixed order: equal to the bit.
    _assert_same(part, full, weights, exact={"auc", "auc_a", "auc_b", "auc_c", "f1", "acc", "mcc", "f1_a", "acc_b"})
    # The macro AUC keeps the test set's classes: a subset without class c's positive is undefined, not a
    # macro over a and b.
    without = np.flatnonzero(labels[:, 2] == 0)
    assert np.isnan(evidence.subset(without).statistics()["auc"](np.ones(len(without))))

    multiclass = evaluate_classification("multiclass", ["x", "y", "z"], ids, rng.integers(0, 3, N),
                                         probs / probs.sum(axis=1, keepdims=True), ["acc", "auc", "f1"],
                                         thresholds=None, n_resamples=5, seed=0)["evidence"]
    part, full, weights = _pairs(multiclass, rng)
    _assert_same(part, full, weights, exact={"acc", "auc", "f1", "auc_x"})


def test_per_item_and_detection_subsets_equal_full_weights():
    rng = np.random.default_rng(21)
    values = rng.random(N)
    values[rng.random(N) < 0.2] = np.nan
    ranks = rng.integers(1, 30, N).astype(float)
    evidence = per_item_evidence([f"q{k}" for k in range(N)], {"cnr": values, "medr": ranks}, medians=["medr"],
                                 images=[f"img{k // 2}" for k in range(N)], labels=(rng.random(N) < 0.5).astype(int))
    part, full, weights = _pairs(evidence, rng)
    _assert_same(part, full, weights, exact={"medr"})
    members = np.arange(10, 30)
    assert evidence.subset(members).images == [f"img{k // 2}" for k in members]
    assert evidence.subset(members).statistics()["medr"](np.ones(20)) == np.median(ranks[members])

    truths, detections = [], []
    for _ in range(40):
        corner = rng.random((rng.integers(0, 3), 2)) * 50
        truths.append(np.hstack([corner, corner + 20]))
        boxes = np.vstack([truths[-1] + rng.normal(0, 2, truths[-1].shape), rng.random((rng.integers(0, 3), 4)) * 60])
        detections.append((boxes, rng.random(len(boxes))))
    detection = detection_evidence([f"d{k}" for k in range(40)], truths, detections, iou_thresholds=IOU_THRESHOLDS,
                                   max_detections=100)
    part, full, weights = _pairs(detection, rng, draws=3)
    _assert_same(part, full, weights)
    members = np.array([3, 1, 7, 20, 35])
    holds = detection.subset(members).positives()[0][:, 0]
    assert holds.tolist() == [int(len(truths[k]) > 0) for k in members]


def test_subgroup_metrics_from_subsets_equal_those_on_full_length_weights():
    """The documented resampling, computed here on full-length weights of the whole evidence (the way
    subgroups ran before subsets), gives the same values and CIs."""
    rng = np.random.default_rng(22)
    labels, probs = _multilabel(rng, n=200)
    labels[:, 2] = (rng.random(200) < 0.4).astype(int)
    evidence = evaluate_classification("multilabel", ["a", "b", "c"], [str(k) for k in range(200)], labels, probs,
                                       ["auc"], thresholds=None, n_resamples=5, seed=0)["evidence"]
    groups = np.where(rng.random(200) < 0.5, "F", "M")
    result = subgroup_metrics(evidence, list(groups), "auc", n_resamples=30, seed=4, order=["F", "M"])
    statistic, draw = evidence.statistics()["auc"], np.random.default_rng(4)
    for row in result["groups"]:
        members = np.flatnonzero(groups == row["group"])
        assert row["value"] == statistic(np.isin(np.arange(200), members).astype(float))
        assert row["value"] == pytest.approx(np.mean([roc_auc_score(labels[members, k], probs[members, k])
                                                      for k in range(3)]), abs=1e-12)
        resampled = [statistic(np.bincount(members[draw.integers(0, len(members), len(members))], minlength=200)
                               .astype(float)) for _ in range(30)]
        assert [row["ci"]["low"], row["ci"]["high"]] == list(np.percentile(resampled, [2.5, 97.5]))
