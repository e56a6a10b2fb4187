"""Zero-shot classification with a tiny aligned model whose image embedding reads the synthetic lesions."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

from vlpbench import api
from vlpbench.adapters.base import CapabilityError
from vlpbench.cli import main
from vlpbench.data.cache import resize_image
from vlpbench.data.rsna import RsnaSource
from vlpbench.data.splits import load_split
from vlpbench.errors import ConfigError
from vlpbench.metrics import metric_spec
from vlpbench.protocols import SplitIds
from vlpbench.protocols.zero_shot import run_zero_shot_task
from vlpbench.registry import ADAPTERS
from vlpbench.tasks import load_task
from vlpbench.testing.weightless import BrightnessPair

ADAPTER_NAME = "zero-shot-test-brightness"


class BrightnessModel(BrightnessPair):
    """An aligned image-text model in two dimensions: a bright image (lung opacity, effusion ...)
    points towards "<finding>", a dark one towards "no <finding>"."""

    name = ADAPTER_NAME
    description = "test model: image brightness as the finding's evidence"


class ImageOnlyModel(BrightnessModel):
    name = "zero-shot-test-image-only"
    capabilities = frozenset({"embed_image"})
    capability_hints = {"embed_text": "pass --model-option text_encoder=DIR"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("zero_shot")
    sizes = {"rsna": 120, "siim": 30, "cxr14": 30, "chexpert": 60}
    for dataset, n in sizes.items():
        api.synth(dataset, base / dataset, n=n, size=32, progress=False)
    return {dataset: base / dataset for dataset in sizes}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(ADAPTERS._targets, ADAPTER_NAME, BrightnessModel)  # removed again after the test
    return ADAPTER_NAME


def rsna_split(source):
    split = load_split("rsna")
    present = set(source.image_ids)
    return SplitIds(train=[], val=[i for i in split.ids("val") if i in present],
                    test=[i for i in split.ids("test") if i in present])


def direct_scores(model, source, ids):
    """The model's probabilities computed image by image, outside the protocol's batching and cache."""
    pixels = torch.from_numpy(np.stack([resize_image(source.image(i), model.image_size) for i in ids]))
    return model.zero_shot_scores(model.preprocess(pixels[:, None]), ["pneumonia"]).numpy()[:, 0].astype(np.float64)


def highest_best_f1_cut(labels, scores):
    value = {t: f1_score(labels, (scores >= t).astype(int)) for t in np.unique(scores)}
    best = max(value.values())
    return max(t for t, v in value.items() if v >= best - 1e-12)


@pytest.mark.parametrize("threshold_source", ["val", "test_oracle"])
def test_rsna_zero_shot_beats_chance_with_thresholds_from_validation(roots, threshold_source):
    source, model = RsnaSource(roots["rsna"]), BrightnessModel()
    split = rsna_split(source)
    config = {**load_task("rsna_zs").config, "bootstrap_resamples": 200, "threshold_source": threshold_source}
    outcome = run_zero_shot_task(model, source, split, config, seed=0, device=torch.device("cpu"), progress=False)

    y_test = np.array([source.label(i) for i in split.test])
    s_test = direct_scores(model, source, split.test)
    y_val = np.array([source.label(i) for i in split.val])
    s_val = direct_scores(model, source, split.val)
    metrics = outcome["metrics"]
    assert metrics["auc"] == pytest.approx(roc_auc_score(y_test, s_test), abs=1e-6)
    assert metrics["auc"] > 0.8  # chance is 0.5; the lesions make the images brighter
    threshold = outcome["training"]["thresholds"]["pneumonia"]
    tuned_on = (y_val, s_val) if threshold_source == "val" else (y_test, s_test)
    assert threshold == pytest.approx(highest_best_f1_cut(*tuned_on), abs=1e-6)
    assert outcome["training"]["optimistic"] is (threshold_source == "test_oracle")
    predicted = (s_test >= threshold - 1e-9).astype(int)
    assert metrics["f1"] == pytest.approx(f1_score(y_test, predicted), abs=1e-6)
    assert metrics["acc"] == pytest.approx(accuracy_score(y_test, predicted), abs=1e-6)
    assert metrics["mcc"] == pytest.approx(matthews_corrcoef(y_test, predicted), abs=1e-6)
    assert outcome["n"] == {"train": 0, "val": len(split.val) if threshold_source == "val" else len(split.test),
                            "test": len(split.test), "test_positives": {"pneumonia": int(y_test.sum())}}
    for name in ("auc", "f1", "acc", "mcc"):
        assert outcome["ci"][name]["low"] <= metrics[name] <= outcome["ci"][name]["high"]
    assert outcome["per_image"] == {}
    assert all(metric_spec(name).name == name for name in metrics)


def test_missing_text_side_fails_before_any_work_and_says_what_to_pass(roots):
    with pytest.raises(CapabilityError, match="embed_text .pass --model-option text_encoder=DIR"):
        run_zero_shot_task(ImageOnlyModel(), None, SplitIds([], [], []), {}, seed=0, device=torch.device("cpu"))


def test_task_options_are_checked(roots):
    source, model = RsnaSource(roots["rsna"]), BrightnessModel()
    split = rsna_split(source)
    config = load_task("rsna_zs").config
    for bad, message in [({"prompts": {"pneumonia": "x", "edema": "y"}}, "not a class: edema"),
                         ({"templates": ["{}", "no"]}, "templates must be"),
                         ({"threshold_source": "test"}, "threshold_source is 'test'"),
                         ({"metrics": ["auc", "dice"]}, "config key metrics")]:
        with pytest.raises(ConfigError, match=message):
            run_zero_shot_task(model, source, split, {**config, **bad}, seed=0, device=torch.device("cpu"),
                               progress=False)


@pytest.mark.parametrize("task, dataset", [("rsna_zs", "rsna"), ("siim_zs", "siim"), ("cxr14_zs", "cxr14"),
                                           ("chexpert_zs", "chexpert"), ("chexpert5x200_zs", "chexpert")])
def test_every_zero_shot_task_runs_from_the_cli(roots, registered, tmp_path, task, dataset):
    code = main(["-q", "run", "--model", registered, "--task", task, "--frac", "1.0", "--data-root",
                 str(roots[dataset]), "--results", str(tmp_path), "--device", "cpu",
                 "--set", "bootstrap_resamples=50"])
    assert code == 0
    (path,) = tmp_path.rglob(f"{task}.v1/*.json")
    record = json.loads(path.read_text())
    spec = load_task(task)
    metrics, training = record["metrics"], record["config"]["training"]
    assert {"auc", "f1", "acc", "mcc"} <= set(metrics) and record["primary_metric"] == spec.primary_metric
    assert record["metrics"][spec.primary_metric] is not None and record["n"]["train"] == 0
    assert set(record["ci"]) == {name for name, value in metrics.items() if value is not None}
    if len(spec.config["classes"]) > 1:
        assert {f"auc_{c.lower().replace(' ', '_')}" for c in spec.config["classes"]} <= set(metrics)
    if task == "chexpert5x200_zs":
        assert training["thresholds"] is None and training["decision"] == "argmax over classes"
        assert np.isclose(np.mean(list(record["per_image"].values())), metrics["acc"])
        assert record["n"]["test"] == len(record["per_image"]) >= 5
    else:
        assert set(training["thresholds"]) == set(spec.config["classes"]) and training["threshold_source"] == "val"
        assert record["n"]["val"] > 0 and record["n"]["test"] > 0
        assert training["optimistic"] is False
    if task == "chexpert_zs":
        assert "valid.csv" in training["threshold_images"]


def test_the_inference_batch_changes_no_score_and_auto_on_a_cpu_is_64(roots):
    source, model = RsnaSource(roots["rsna"]), BrightnessModel()
    split = rsna_split(source)
    config = {**load_task("rsna_zs").config, "bootstrap_resamples": 50}
    assert config["batch_size"] == "auto"
    automatic = run_zero_shot_task(model, source, split, config, seed=0, device=torch.device("cpu"), progress=False)
    small = run_zero_shot_task(model, source, split, {**config, "batch_size": 7}, seed=0, device=torch.device("cpu"),
                               progress=False)
    assert automatic["training"]["inference_batch"] == {"size": 64, "requested": "auto", "lowered_from": [],
                                                        "how": "cpu: the protocol's fallback"}
    assert small["training"]["inference_batch"]["size"] == 7
    assert small["metrics"] == pytest.approx(automatic["metrics"], abs=1e-9)
    assert small["training"]["thresholds"] == pytest.approx(automatic["training"]["thresholds"], abs=1e-9)
