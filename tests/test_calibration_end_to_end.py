"""Calibration from the CLI on synthetic data: a linear-probe run and zero-shot runs record ECE, Brier and the
reliability bins (recomputed here from the saved predictions), zero-shot scores that are no probabilities
are left out with the reason, and `plot` and `leaderboard` show them."""

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss

from vlpbench import api
from vlpbench.adapters.base import Adapter
from vlpbench.cli import main
from vlpbench.data.rsna import RsnaSource
from vlpbench.data.splits import load_split
from vlpbench.registry import ADAPTERS
from vlpbench.errors import DataError
from vlpbench.results import load_record, load_records
from vlpbench.testing.weightless import BrightnessPair

FAST = {"image_size": 32, "resize_size": 36, "max_epochs": 2, "patience": 2, "batch_size": 8,
        "bootstrap_resamples": 40}


class PromptPair(BrightnessPair):
    """Brightness against a "<finding>" and a "no <finding>" text direction: the default zero-shot score, a
    softmax over two prompt similarities."""

    name = "calibration-test-prompt-pair"
    description = "test model: brightness embeddings"


class TrainedHead(PromptPair):
    """The same scores, declared as probabilities a present/absent head was trained to output."""

    name = "calibration-test-trained-head"
    zero_shot_probabilities = True


for _model in (PromptPair, TrainedHead):
    ADAPTERS.register(_model.name, _model)


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration") / "rsna"
    api.synth("rsna", root, n=60, size=32, progress=False)
    return root


def saved_probabilities(folder):
    with open(folder / "predictions.csv", newline="") as f:
        return {row["image_id"]: float(row["pneumonia"]) for row in csv.DictReader(f)}


def loop_ece(p, y, bins=15):
    """Guo et al.'s ECE written out: (lo, hi] bins of linspace(0, 1, bins + 1), 0 in the first."""
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for m in range(bins):
        inside = (p > edges[m]) & (p <= edges[m + 1]) | ((m == 0) & (p == 0))
        if inside.any():
            total += inside.sum() / len(p) * abs(y[inside].mean() - p[inside].mean())
    return total


def check_calibration(record, p, y):
    """The record's ECE and Brier against the loop and scikit-learn, its CIs and its 15 reliability bins."""
    assert record["metrics"]["ece"] == pytest.approx(loop_ece(p, y), abs=1e-6)
    assert record["metrics"]["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-6)
    # A percentile CI of ECE need not hold the estimate (ECE is biased upwards on resamples): present, ordered.
    assert all(record["ci"][name]["low"] <= record["ci"][name]["high"] for name in ("ece", "adaptive_ece", "brier"))
    bins = record["calibration"]["curves"]["pneumonia"]
    assert sum(bins["count"]) == len(p) and len(bins["count"]) == record["calibration"]["n_bins"] == 15


def split_rows(folder, root):
    """The test images' probabilities and labels among a predictions CSV's rows, in split order."""
    probabilities = saved_probabilities(folder)
    ids = [i for i in load_split("rsna").ids("test") if i in probabilities]
    source = RsnaSource(root)
    return np.array([probabilities[i] for i in ids]), np.array([source.label(i) for i in ids], dtype=float)


def test_linear_probe_records_calibration_and_plot_draws_the_reliability_diagram(rsna_root, resnet18_checkpoint,
                                                                                    tmp_path, capsys):
    results = tmp_path / "results"
    record, _ = api.run("generic", "rsna_cls", 1.0, checkpoint=resnet18_checkpoint, model_options={"arch": "resnet18"},
                        data_root=rsna_root, results=results, overrides=FAST, device="cpu", progress=False,
                        save_predictions=tmp_path / "linear")
    p, y = split_rows(tmp_path / "linear", rsna_root)
    assert len(p) == record["n"]["test"]
    check_calibration(record, p, y)
    assert record["calibration"]["confidence"] == "each class's probability of presence against its label"

    assert main(["plot", "--results", str(results), "--out", str(tmp_path / "plots"), "--format", "png"]) == 0
    written = capsys.readouterr().out.split()
    assert any(path.endswith(".frac1.reliability.png") for path in written)
    assert main(["leaderboard", "--results", str(results), "--out", str(tmp_path / "site")]) == 0
    page = (tmp_path / "site" / "index.html").read_text()
    assert "Calibration: ECE and Brier score" in page and "ECE (equal mass)" in page and "Brier" in page


def test_zero_shot_calibration_only_for_declared_probabilities(rsna_root, tmp_path, capsys):
    results = tmp_path / "results"
    ranked, path = api.run(PromptPair.name, "rsna_zs", 1.0, data_root=rsna_root, results=results,
                           overrides={"bootstrap_resamples": 40}, device="cpu", progress=False)
    assert not {"ece", "adaptive_ece", "brier"} & set(ranked["metrics"])
    assert "softmax over the similarities of a positive and a negative prompt" in ranked["calibration"]["left_out"]
    written = json.loads(path.read_text())
    assert written["calibration"] == ranked["calibration"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**written, "calibration": {"left_out": 3}}))
    with pytest.raises(DataError, match="invalid key 'calibration'"):
        load_record(broken)

    trained, _ = api.run(TrainedHead.name, "rsna_zs", 1.0, data_root=rsna_root, results=results,
                         overrides={"bootstrap_resamples": 40}, device="cpu", progress=False,
                         save_predictions=tmp_path / "zs")
    p, y = split_rows(tmp_path / "zs", rsna_root)  # the CSV holds the threshold (val) rows too
    assert len(p) == trained["n"]["test"]
    check_calibration(trained, p, y)
    # The same scores: calibration does not depend on who declares them, only whether it is reported.
    assert trained["metrics"]["auc"] == ranked["metrics"]["auc"]
    # Both records load (the calibration entry is validated) and the plot draws the declared one only.
    assert {bool(r.get("calibration", {}).get("curves")) for r in load_records(results)} == {True, False}

    # A CSV does not say how its scores were made: `score` leaves calibration out and says why.
    assert main(["score", "--task", "rsna_zs", "--predictions", str(tmp_path / "zs"), "--data-root",
                 str(rsna_root)]) == 0
    assert "note: calibration (ECE, Brier) left out: a zero-shot predictions CSV" in capsys.readouterr().out
    assert main(["score", "--task", "rsna_zs", "--predictions", str(tmp_path / "zs"), "--data-root",
                 str(rsna_root), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert "ece" not in scored["metrics"] and scored["metrics"]["auc"] == trained["metrics"]["auc"]


def test_only_trained_present_absent_heads_declare_zero_shot_probabilities():
    """KAD, MedKLIP and MAVL (its default `feature` rule; its `text` rule turns it off per instance) score with a
    2-logit head trained with cross-entropy on presence labels; every other zero-shot procedure is a softmax over
    prompt similarities (CheXzero's and its variants) or SigLIP's sigmoid of one."""
    declared = set()
    for name in ADAPTERS.names():
        model = ADAPTERS.get(name)
        if isinstance(model, type) and issubclass(model, Adapter) and model.__module__.startswith("vlpbench.adapters"):
            if model.zero_shot_probabilities:
                declared.add(name)
    assert declared == {"kad", "mavl", "medklip"}
