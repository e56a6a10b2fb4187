"""Subgroup metrics: each subgroup's value is the protocol's metric recomputed on that subset (AUC by
scikit-learn, Dice as a numpy mean, mAP by detection_map on the subset's images); CIs and the gap CI follow the
documented resampling, reproduced here with numpy; a planted gap is found with a CI excluding 0 and no planted
gap gives a CI holding 0; a subgroup with too few items or positives says so."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vlpbench.errors import ConfigError
from vlpbench.metrics.detection import detection_map
from vlpbench.evidence import per_item_evidence
from vlpbench.metrics.bootstrap import weighted_mean
from vlpbench.metrics.subgroups import (age_bins, age_labels, attribute_groups, group_of, record_problem,
                                        subgroup_metrics, subgroup_report)
from vlpbench.protocols.classification import evaluate_classification
from vlpbench.protocols.detection import evaluate_detection
from vlpbench.protocols.segmentation import evaluate_segmentation

R = 200  # bootstrap resamples: few, for speed


def _classification(rng, n=120, classes=("a", "b")):
    labels = (rng.random((n, len(classes))) < 0.4).astype(int)
    scores = np.clip(labels * 0.3 + rng.random((n, len(classes))), 0, 1)
    ids = [f"i{k}" for k in range(n)]
    evaluated = evaluate_classification("multilabel", list(classes), ids, labels, scores, ["auc"], thresholds=None,
                                        n_resamples=10, seed=0)
    return evaluated["evidence"], labels, scores


def test_auc_per_subgroup_is_sklearn_macro_auc_on_the_subset():
    rng = np.random.default_rng(1)
    evidence, labels, scores = _classification(rng)
    groups = rng.choice(["F", "M", "unknown"], size=len(labels), p=[0.45, 0.45, 0.1])
    result = subgroup_metrics(evidence, list(groups), "auc", n_resamples=R, seed=3, min_items=5, min_positives=2,
                              order=["F", "M", "unknown"])
    for row in result["groups"]:
        subset = groups == row["group"]
        expected = np.mean([roc_auc_score(labels[subset, k], scores[subset, k]) for k in range(2)])
        assert row["n"] == subset.sum()
        assert row["positives"] == {"a": int(labels[subset, 0].sum()), "b": int(labels[subset, 1].sum())}
        assert row["value"] == pytest.approx(expected, abs=1e-12)
    assert {result["gap"]["high"], result["gap"]["low"]} == {"F", "M"}  # unknown never enters the gap


class _Masks:
    def __init__(self, positive):
        self.positive = positive

    def label(self, image_id):
        return int(self.positive[int(image_id)])


def test_dice_per_subgroup_is_the_subset_mean_and_its_cis_follow_the_documented_resampling():
    rng = np.random.default_rng(2)
    n = 90
    dice, positive = rng.random(n), rng.random(n) < 0.5
    evaluated = evaluate_segmentation(_Masks(positive), [str(k) for k in range(n)], dice, n_resamples=10, seed=0)
    evidence = evaluated["evidence"]
    groups = np.where(np.arange(n) % 3 == 0, "AP", "PA")
    seed = 7
    result = subgroup_metrics(evidence, list(groups), "dice", n_resamples=R, seed=seed, order=["AP", "PA"])

    # The documented procedure: one default_rng(seed); per subgroup in order, R draws of n_g positions.
    draw = np.random.default_rng(seed)
    resampled = {}
    for row in result["groups"]:
        members = np.flatnonzero(groups == row["group"])
        assert row["value"] == pytest.approx(dice[members].mean(), abs=1e-12)
        resampled[row["group"]] = np.array([dice[members[draw.integers(0, len(members), len(members))]].mean()
                                            for _ in range(R)])
        low, high = np.percentile(resampled[row["group"]], [2.5, 97.5])
        assert (row["ci"]["low"], row["ci"]["high"]) == pytest.approx((low, high), abs=1e-12)
        assert row["ci"]["skipped"] == 0
    gap = result["gap"]
    high, low = sorted(resampled, key=lambda g: dice[groups == g].mean(), reverse=True)
    assert (gap["high"], gap["low"]) == (high, low)
    assert gap["value"] == pytest.approx(dice[groups == high].mean() - dice[groups == low].mean(), abs=1e-12)
    assert (gap["ci"]["low"], gap["ci"]["high"]) == pytest.approx(
        tuple(np.percentile(resampled[high] - resampled[low], [2.5, 97.5])), abs=1e-12)

    positives = subgroup_metrics(evidence, list(groups), "dice_positive", n_resamples=20, seed=0, order=["AP", "PA"])
    for row in positives["groups"]:
        assert row["value"] == pytest.approx(dice[(groups == row["group"]) & positive].mean(), abs=1e-12)
        assert row["positives"] == {"positive": int(positive[groups == row["group"]].sum())}
    assert "note" not in result

    # MGCA's batch-averaged Dice: untestable in paired tests; per subgroup the mean over images, with a note.
    batched = evaluate_segmentation(_Masks(positive), [str(k) for k in range(n)], dice, n_resamples=10, seed=0,
                                    batch_size=16)["evidence"]
    result = subgroup_metrics(batched, list(groups), "dice", n_resamples=20, seed=0, order=["AP", "PA"])
    assert result["note"].startswith("mean over images within each subgroup; the record's dice is not (MGCA's")
    for row in result["groups"]:
        assert row["value"] == pytest.approx(dice[groups == row["group"]].mean(), abs=1e-12)


def _boxes(rng, count):
    corner = rng.uniform(0, 80, (count, 2))
    return np.concatenate([corner, corner + rng.uniform(5, 20, (count, 2))], axis=1)


def test_map_per_subgroup_is_detection_map_on_the_subsets_images():
    rng = np.random.default_rng(3)
    n = 60
    truths = [_boxes(rng, int(rng.integers(0, 3))) for _ in range(n)]
    detections = []
    for truth in truths:
        jitter = truth + rng.normal(0, 2, truth.shape) if len(truth) else np.empty((0, 4))
        boxes = np.concatenate([jitter, _boxes(rng, int(rng.integers(0, 3)))])
        detections.append((boxes, rng.random(len(boxes))))
    ids = [f"p{k}" for k in range(n)]
    evidence = evaluate_detection(truths, detections, n_resamples=5, seed=0, ids=ids)["evidence"]
    groups = rng.choice(["F", "M"], size=n)
    result = subgroup_metrics(evidence, list(groups), "map", n_resamples=20, seed=0, min_positives=3,
                              order=["F", "M"])
    for row in result["groups"]:
        keep = np.flatnonzero(groups == row["group"])
        expected = detection_map([truths[k] for k in keep], [detections[k][0] for k in keep],
                                 [detections[k][1] for k in keep])["map"]
        assert row["value"] == pytest.approx(expected, abs=1e-12)
        assert row["positives"] == {"positive": sum(len(truths[k]) > 0 for k in keep)}


def test_a_planted_gap_is_found_and_no_gap_gives_a_ci_holding_zero():
    rng = np.random.default_rng(4)
    n = 300
    labels = (rng.random((n, 1)) < 0.5).astype(int)
    groups = np.where(np.arange(n) < n // 2, "F", "M")
    # Women: the score separates the classes; men: noise.
    scores = np.where(groups[:, None] == "F", labels * 0.8 + rng.random((n, 1)) * 0.5, rng.random((n, 1)))
    evidence = evaluate_classification("binary", ["y"], [str(k) for k in range(n)], labels, scores, ["auc"],
                                    thresholds=None, n_resamples=5, seed=0)["evidence"]
    planted = subgroup_metrics(evidence, list(groups), "auc", n_resamples=R, seed=0)["gap"]
    assert (planted["high"], planted["low"]) == ("F", "M") and planted["ci"]["low"] > 0.2

    same = np.clip(labels * 0.3 + rng.random((n, 1)), 0, 1)  # one model for everyone
    evidence = evaluate_classification("binary", ["y"], [str(k) for k in range(n)], labels, same, ["auc"],
                                    thresholds=None, n_resamples=5, seed=0)["evidence"]
    null = subgroup_metrics(evidence, list(groups), "auc", n_resamples=R, seed=0)["gap"]
    assert null["ci"]["low"] < 0 < null["ci"]["high"]


def test_a_subgroup_with_too_few_positives_or_items_says_so_instead_of_a_number():
    labels = np.array([[1], [0]] * 20)
    labels[:20] = 0  # group F (items 0..19): no positive
    scores = np.linspace(0, 1, 40)[:, None]
    evidence = evaluate_classification("binary", ["y"], [str(k) for k in range(40)], labels, scores, ["auc"],
                                    thresholds=None, n_resamples=5, seed=0)["evidence"]
    groups = ["F"] * 20 + ["M"] * 17 + ["O"] * 3
    result = subgroup_metrics(evidence, groups, "auc", n_resamples=20, seed=0, order=["F", "M", "O"])
    by = {row["group"]: row for row in result["groups"]}
    assert by["F"]["value"] is None and by["F"]["reason"] == "0 positives of the class, fewer than the 5 needed"
    assert by["O"]["value"] is None and by["O"]["reason"] == "3 images, fewer than the 10 needed"
    assert by["M"]["value"] == pytest.approx(roc_auc_score(labels[20:37, 0], scores[20:37, 0]))
    assert result["gap"] is None and "a gap needs two" in result["gap_reason"]


def test_age_bins_labels_and_unknown_last():
    assert age_bins(None) == (40.0, 60.0, 80.0)
    assert age_labels((40, 60, 80)) == ["<40", "[40,60)", "[60,80)", ">=80"]
    assert [group_of("age", a, (40, 60, 80)) for a in (0.5, 40, 59.9, 80, 155, "unknown")] == [
        "<40", "[40,60)", "[40,60)", ">=80", ">=80", "unknown"]
    labels, order = attribute_groups("age", [70, "unknown", 30, 65], (18, 40, 60, 80))
    assert labels == ["[60,80)", "unknown", "[18,40)", "[60,80)"] and order == ["[18,40)", "[60,80)", "unknown"]
    for bad in ([], [60, 40], ["x"], [float("nan")]):
        with pytest.raises(ConfigError, match="age bins"):
            age_bins(bad)


def test_grounding_means_skip_undefined_queries_and_reports_name_absent_attributes():
    values = np.array([0.2, np.nan, 0.6, 1.0])
    statistic = weighted_mean(values)
    assert statistic(np.array([1.0, 1.0, 1.0, 0.0])) == pytest.approx(0.4)
    assert np.isnan(statistic(np.array([0.0, 1.0, 0.0, 0.0])))
    evidence = per_item_evidence(["a#0", "a#1", "b#0", "c#0"], {"cnr": values}, images=["a", "a", "b", "c"])
    report = subgroup_report(evidence, {"a": {"sex": "F"}, "b": {"sex": "M"}}, ["sex", "view"], "cnr",
                             n_resamples=10, min_items=1)
    assert [(row["group"], row["n"]) for row in report["sex"]["groups"]] == [("F", 2), ("M", 1), ("unknown", 1)]
    assert report["view"] == {"metric": "cnr", "reason": "no test query's files give its view"}
    assert record_problem(report) is None
    assert "unknown attribute" in record_problem({"race": report["sex"]})
    assert "no value and no reason" in record_problem({"sex": {"metric": "x", "groups": [{"group": "F", "n": 1}]}})
