"""Paired significance of calibration and retrieval metrics from evidence sidecars: the evidence rebuilds the
record's values, a planted difference is found, identical predictions give the null answer, and what the
evidence cannot test (retrieval's text→image metrics) is named, with the reason."""

from __future__ import annotations

import numpy as np
import pytest

from vlpbench.evidence import write_evidence
from vlpbench.metrics.subgroups import subgroup_report
from vlpbench.protocols.classification import evaluate_classification
from vlpbench.protocols.retrieval import evaluate_retrieval
from vlpbench.protocols.retrieval_sets import RetrievalSet
from vlpbench.report.significance import significance_report
from vlpbench.results import record_path

N = 300


def _records(make, tmp_path, task, primary, outcomes):
    """Records of ``outcomes`` (model -> evaluation) with their evidence sidecars under ``tmp_path``."""
    records = []
    for model, evaluated in outcomes.items():
        metrics = {k: round(v, 6) for k, v in evaluated["metrics"].items() if v is not None}
        record = make(model, metrics, task=task, frac=1.0, primary=primary)
        record["evidence"] = write_evidence(evaluated["evidence"], record, record_path(tmp_path, record))
        records.append(record)
    return records


def _brier(labels, probs):
    return float(np.mean((probs - labels) ** 2, axis=0).mean())


def test_calibration_metrics_are_tested_and_a_planted_miscalibration_is_found(make, tmp_path):
    rng = np.random.default_rng(30)
    truth = rng.random((N, 2))
    labels = (rng.random((N, 2)) < truth).astype(int)  # truth is the calibrated probability
    overconfident = 1 / (1 + (1 / truth - 1) ** 3)  # the same ranking, pushed towards 0 and 1
    ids = [f"i{k}" for k in range(N)]

    def evaluate(probs):
        return evaluate_classification("multilabel", ["a", "b"], ids, labels, probs, ["auc"], thresholds=None,
                                       n_resamples=5, seed=0)

    outcomes = {"calibrated": evaluate(truth), "overconfident": evaluate(overconfident), "twin": evaluate(truth)}
    records = _records(make, tmp_path, "toy_cls", "auc", outcomes)
    report = significance_report(records, task="toy_cls", frac=1.0, models=list(outcomes), results_dir=tmp_path,
                                 metrics=["ece", "adaptive_ece", "brier", "brier_a", "auc"], n_resamples=300)
    tests = {(t.metric, t.a, t.b): t for metric in report.tests for t in report.tests[metric]}
    brier = tests[("brier", "calibrated", "overconfident")]
    assert brier.reason is None and brier.test == "paired bootstrap"
    assert brier.result["diff"] == pytest.approx(_brier(labels, truth) - _brier(labels, overconfident), abs=1e-9)
    for metric in ("ece", "adaptive_ece", "brier"):
        planted = tests[(metric, "calibrated", "overconfident")]
        assert planted.result["diff"] < 0 and planted.result["high"] < 0 and planted.p_holm < 0.05, metric
        null = tests[(metric, "calibrated", "twin")]
        assert null.result["diff"] == 0 and null.result["p_value"] == 1.0, metric
    # The same ranking: AUC differs by nothing, and is not found different.
    assert tests[("auc", "calibrated", "overconfident")].result["diff"] == pytest.approx(0, abs=1e-12)
    assert tests[("brier_a", "calibrated", "overconfident")].result["diff"] == pytest.approx(
        np.mean((truth[:, 0] - labels[:, 0]) ** 2) - np.mean((overconfident[:, 0] - labels[:, 0]) ** 2), abs=1e-9)


def _retrieval_set(rng, n_images=80, n_texts=20, n_classes=4):
    image_keys, text_keys = rng.integers(0, n_classes, n_images), np.arange(n_texts) % n_classes
    return RetrievalSet([f"img{k}" for k in range(n_images)], image_keys, [f"text {k}" for k in range(n_texts)],
                        text_keys, "synthetic")


CONFIG = {"directions": ["i2t", "t2i"], "recall_at": [1, 5], "precision_at": [5], "per_image_metric": "i2t_r5",
          "bootstrap_resamples": 20}


def _ranks(similarity, relevant):
    """Brute force: per query, 1 + the irrelevant candidates scoring at least its best relevant one."""
    return np.array([1 + sum(s >= row[flags].max() for s, f in zip(row, flags) if not f)
                     for row, flags in zip(similarity, relevant)])


def test_retrieval_significance_on_two_records_and_subgroups_of_the_query_images(make, tmp_path):
    rng = np.random.default_rng(31)
    rset = _retrieval_set(rng)
    relevant = rset.image_keys[:, None] == rset.text_keys[None, :]
    aligned = relevant + rng.normal(0, 0.6, relevant.shape)
    noise = rng.normal(0, 1, relevant.shape)
    outcomes = {"aligned": evaluate_retrieval(aligned, rset, CONFIG, seed=0),
                "noise": evaluate_retrieval(noise, rset, CONFIG, seed=0),
                "copy": evaluate_retrieval(noise.copy(), rset, CONFIG, seed=0)}
    records = _records(make, tmp_path, "toy_ret", "i2t_r5", outcomes)
    metrics = ["i2t_r1", "i2t_r5", "i2t_p5", "i2t_meanr", "i2t_medr", "t2i_r1"]
    report = significance_report(records, task="toy_ret", frac=1.0, models=list(outcomes), results_dir=tmp_path,
                                 metrics=metrics, n_resamples=300)
    tests = {(t.metric, t.a, t.b): t for metric in report.tests for t in report.tests[metric]}
    ranks = {"aligned": _ranks(aligned, relevant), "noise": _ranks(noise, relevant)}
    for k in (1, 5):
        t = tests[(f"i2t_r{k}", "aligned", "noise")]
        assert t.result["diff"] == pytest.approx(np.mean(ranks["aligned"] <= k) - np.mean(ranks["noise"] <= k))
    planted = tests[("i2t_r5", "aligned", "noise")]
    assert planted.p_holm < 0.05 and planted.result["low"] > 0
    meanr = tests[("i2t_meanr", "aligned", "noise")]
    assert meanr.result["diff"] == pytest.approx(ranks["aligned"].mean() - ranks["noise"].mean())
    medr = tests[("i2t_medr", "aligned", "noise")]  # a weighted median, rebuilt exactly
    assert medr.reason is None and medr.result["diff"] == np.median(ranks["aligned"]) - np.median(ranks["noise"])
    for metric in ("i2t_r5", "i2t_medr"):
        null = tests[(metric, "noise", "copy")]
        assert null.result["diff"] == 0 and null.result["p_value"] == 1.0
    untested = tests[("t2i_r1", "aligned", "noise")]
    assert untested.result is None and "queries are the candidate texts" in untested.reason

    # Subgroups of the query images: each value the brute-force metric of the subgroup's images.
    evidence = outcomes["aligned"]["evidence"]
    view = {image: {"view": "AP" if k % 3 else "PA"} for k, image in enumerate(rset.image_ids)}
    report = subgroup_report(evidence, view, ["view"], "i2t_medr", n_resamples=20)
    for row in report["view"]["groups"]:
        members = np.array([view[i]["view"] == row["group"] for i in rset.image_ids])
        assert row["value"] == np.median(ranks["aligned"][members])
