"""Metric specs: every name a protocol reports resolves to one spec, and unknown names are refused."""

from __future__ import annotations

import numpy as np
import pytest

from vlpbench import results
from vlpbench.errors import ConfigError
from vlpbench.metrics import MetricSpec, metric_spec, register_metric
from vlpbench.metrics.grounding import METRIC_NAMES as GROUNDING_METRICS
from vlpbench.metrics.specs import CI_METHODS, PER_IMAGE_MEAN, RECOMPUTED, former_names
from vlpbench.registry import METRICS
from vlpbench.tasks import load_task, task_names


def test_each_registered_spec_is_complete_and_registered_under_its_name():
    retrieval = {f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "p1", "p5", "p10", "p50", "p100",
                                                              "medr", "meanr")}
    assert set(METRICS.names()) == {"dice", "dice_positive", "empty_correct", "all_empty_baseline", "map", "map_mgca",
                                    "auc", "acc", "f1", "mcc", "pointing_game", "recall", "iou", "cnr",
                                    "miou", "hit_rate", "ece", "adaptive_ece", "brier", *retrieval}
    for name in METRICS:
        spec = METRICS.get(name)
        assert spec.name == name and spec.display and spec.ci in CI_METHODS
        assert spec.description and "\n" not in spec.description


def test_display_names_directions_and_ci_methods():
    shown = {name: metric_spec(name).display for name in ("dice", "map", "auc", "acc", "f1", "mcc", "iou", "cnr")}
    assert shown == {"dice": "Dice", "map": "mAP", "auc": "AUC", "acc": "ACC", "f1": "F1", "mcc": "MCC",
                     "iou": "IoU", "cnr": "CNR"}
    ranks = {f"{d}_{m}" for d in ("i2t", "t2i") for m in ("medr", "meanr")}  # retrieval ranks: lower is better
    calibration = {"ece", "adaptive_ece", "brier"}
    assert {name for name in METRICS if not METRICS.get(name).higher_is_better} == ranks | calibration
    assert {name for name in METRICS if not METRICS.get(name).percent} == ranks
    assert {name for name in METRICS if METRICS.get(name).ci == RECOMPUTED} == {"map", "map_mgca", "auc", "f1", "mcc",
                                                                                "i2t_medr", "t2i_medr", "miou", "hit_rate",
                                                                                *calibration}
    assert metric_spec("dice").ci == metric_spec("acc").ci == PER_IMAGE_MEAN


def test_derived_names_take_their_base_metric_and_exact_names_come_first():
    per_class = metric_spec("auc_pleural_effusion")
    assert (per_class.name, per_class.display, per_class.ci, per_class.higher_is_better) == (
        "auc_pleural_effusion", "AUC (pleural_effusion)", RECOMPUTED, True)
    assert metric_spec("acc_covid_19").display == "ACC (covid_19)"
    assert metric_spec("mcc_no_finding").function is metric_spec("mcc").function
    ap = metric_spec("ap50")
    assert (ap.display, ap.ci) == ("AP50", RECOMPUTED) and "IoU 0.50" in ap.description
    # map and dice are not reported per class: these are metrics of their own.
    assert metric_spec("map_mgca").display == "mAP (MGCA)"
    assert metric_spec("dice_positive").display == "Dice (positives)"


def test_the_former_name_of_accuracy_resolves_to_acc():
    assert former_names() == {"accuracy": "acc"}
    assert metric_spec("accuracy") is metric_spec("acc")


@pytest.mark.parametrize("name", ["acuracy", "map_foo", "dice_positives", "auc_", "auc_Pleural", "ap5", "", None])
def test_unknown_names_are_refused_with_the_known_ones(name):
    with pytest.raises(ConfigError, match=r"unknown metric .*Known: acc, adaptive_ece, all_empty_baseline, auc.*"
                                          r"per class: <metric>_<class slug> of acc, adaptive_ece, auc, brier, ece, "
                                          r"f1, hit_rate, mcc, miou"):
        metric_spec(name)


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ConfigError, match="Did you mean 'auc', 'acc'"):
        metric_spec("acuracy")


def test_registration_refuses_a_name_taken_by_another_metric_or_alias_and_a_bad_ci_method():
    with pytest.raises(ConfigError, match="'accuracy' already names metric 'acc'"):
        register_metric(MetricSpec("accuracy", "Accuracy", True, PER_IMAGE_MEAN, "top-1 accuracy"))
    with pytest.raises(ConfigError, match="'dice' already names metric 'dice'"):
        register_metric(MetricSpec("overlap", "Overlap", True, PER_IMAGE_MEAN, "Dice", aliases=("dice",)))
    with pytest.raises(ConfigError, match="ci 'bootstrap'; expected one of per-image mean, recomputed"):
        MetricSpec("x", "X", True, "bootstrap", "x")
    assert "overlap" not in METRICS


def test_task_directions_come_from_their_primary_metric():
    for name in task_names():
        task = load_task(name)
        assert metric_spec(task.primary_metric).name == task.primary_metric  # current names only
        assert task.higher_is_better is metric_spec(task.primary_metric).higher_is_better
        for metric in task.config.get("metrics", []):
            assert metric_spec(metric).name == metric
    assert load_task("covidx_cls").primary_metric == load_task("chexpert5x200_zs").primary_metric == "acc"


def _names_of_classification_outcomes() -> set[str]:
    """Every metric name the linear / fine-tuning protocols and zero-shot (protocol and scorer) can report."""
    from vlpbench.protocols.classification import evaluate_classification
    from vlpbench.protocols.linear import default_metrics
    from vlpbench.protocols.zero_shot import METRICS as ZERO_SHOT_METRICS

    rng = np.random.default_rng(0)
    classes = ["Normal", "Pleural Effusion", "COVID-19"]
    scores = rng.random((30, 3))
    multiclass = np.arange(30) % 3
    multilabel = (rng.random((30, 3)) < 0.5).astype(int)
    ids = [str(i) for i in range(30)]
    names: set[str] = set()
    for kind, labels in (("multiclass", multiclass), ("multilabel", multilabel), ("binary", multilabel[:, :1])):
        probs = scores if kind != "binary" else scores[:, :1]
        result = evaluate_classification(kind, classes[:probs.shape[1]], ids, labels, probs, default_metrics(kind),
                                         thresholds=None, n_resamples=5, seed=0)
        names |= set(result["metrics"]) | set(result["ci"])
    for kind, labels, thresholds in (("multiclass", multiclass, None), ("multilabel", multilabel, [0.5] * 3)):
        result = evaluate_classification(kind, classes, ids, labels, scores, list(ZERO_SHOT_METRICS),
                                         thresholds=thresholds, n_resamples=5, seed=0)
        names |= set(result["metrics"]) | set(result["ci"])
    return names


def test_every_metric_a_protocol_reports_resolves_to_a_spec():
    from vlpbench.metrics.detection import IOU_THRESHOLDS

    classification = _names_of_classification_outcomes()
    assert {"acc", "auc", "f1", "mcc", "auc_pleural_effusion", "acc_covid_19", "mcc_normal"} <= classification
    assert "accuracy" not in classification
    detection = {"map", "map_mgca", *(f"ap{round(t * 100)}" for t in IOU_THRESHOLDS)}
    segmentation = {"dice", "dice_positive", "empty_correct", "all_empty_baseline"}
    for name in classification | detection | segmentation | set(GROUNDING_METRICS):
        assert metric_spec(name).name == name


def test_a_new_record_must_name_its_metrics_as_their_specs_do(monkeypatch):
    monkeypatch.setattr(results, "environment", lambda: {"vlpbench": "test"})
    fields = dict(model={"name": "m", "checkpoint": None}, task={"name": "covidx_cls", "version": 1}, frac=1.0, seed=0,
                  split={"dataset": "covidx", "version": "v1", "sha256": "a" * 64}, n={}, config={}, timing={})
    assert results.make_record(metrics={"acc": 0.9, "auc_covid_19": 0.8}, primary_metric="acc", **fields)
    with pytest.raises(ConfigError, match="invalid key 'metrics.accuracy': 'accuracy' is the former name of 'acc'"):
        results.make_record(metrics={"accuracy": 0.9}, primary_metric="accuracy", **fields)
    with pytest.raises(ConfigError, match="invalid key 'ci.top1': unknown metric 'top1'"):
        results.make_record(metrics={"acc": 0.9}, primary_metric="acc", ci={"top1": {}}, **fields)
