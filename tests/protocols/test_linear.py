"""Linear classification: MGCA's augmentations, the metrics it reports, and learning end to end
from the CLI on synthetic RSNA, COVIDx and CheXpert (cached features and MGCA's per-epoch mode)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from vlpbench import api
from vlpbench.cli import main
from vlpbench.protocols.classification import evaluate_classification
from vlpbench.protocols.linear import gaussian_blur, moco2, random_crop

# Tiny images and a livelier head so that a CPU learns the synthetic findings in seconds; everything
# else is the task's canonical protocol.
FAST = {"resize_size": 64, "image_size": 56, "max_epochs": 30, "patience": 10, "lr": 0.01, "bootstrap_resamples": 200}


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """A random-init torchvision ResNet-18 state dict, for adapter ``generic`` with ``arch=resnet18``."""
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic RSNA, COVIDx and CheXpert folders of 120 images at 64 pixels."""
    root = tmp_path_factory.mktemp("data")
    for dataset in ("rsna", "covidx", "chexpert"):
        api.synth(dataset, root / dataset, n=120, size=64, progress=False)
    return root


def _cli_run(task: str, resnet18: Path, data_root: Path, results: Path, *extra: str) -> dict:
    overrides = [item for key, value in FAST.items() for item in ("--set", f"{key}={value}")]
    code = main(["-q", "run", "--model", "generic", "--checkpoint", str(resnet18), "--model-option", "arch=resnet18",
                 "--task", task, "--frac", "1.0", "--data-root", str(data_root), "--results", str(results),
                 "--device", "cpu", *overrides, *extra])
    assert code == 0
    (path,) = results.glob(f"runs/**/{task}.v1/*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def rsna_record(resnet18, data, tmp_path_factory):
    return _cli_run("rsna_cls", resnet18, data / "rsna", tmp_path_factory.mktemp("results"))


def test_rsna_cached_linear_probe_learns_from_the_cli(rsna_record):
    metrics = rsna_record["metrics"]
    assert metrics["auc"] > 0.8  # chance: 0.5
    ci = rsna_record["ci"]["auc"]
    assert ci["low"] <= metrics["auc"] <= ci["high"] and ci["n_resamples"] == 200
    training = rsna_record["config"]["training"]
    assert rsna_record["config"]["linear_mode"] == "cached" and training["mode"] == "cached"
    assert training["feature_cache"] == {"train": "miss", "val": "miss", "test": "miss"}
    assert 1 <= training["best_epoch"] <= training["epochs"] <= FAST["max_epochs"]
    n = rsna_record["n"]
    assert (n["train"], n["val"], n["test"]) == (72, 24, 24) and 0 < n["test_per_class"]["pneumonia"] < 24


def test_a_second_run_reads_every_part_from_the_feature_cache(rsna_record, resnet18, data, tmp_path):
    record, _ = api.run("generic", "rsna_cls", 1.0, seed=1, checkpoint=resnet18, model_options={"arch": "resnet18"},
                        data_root=data / "rsna", results=tmp_path, overrides=FAST, device="cpu", progress=False)
    assert record["config"]["training"]["feature_cache"] == {"train": "hit", "val": "hit", "test": "hit"}
    assert record["metrics"]["auc"] > 0.8


def test_lbfgs_and_sgd_heads_never_share_a_table_row(rsna_record, resnet18, data, tmp_path):
    quick = {**FAST, "max_epochs": 3}
    records = {solver: api.run("generic", "rsna_cls", 1.0, checkpoint=resnet18, model_options={"arch": "resnet18"},
                               data_root=data / "rsna", results=tmp_path, device="cpu", progress=False,
                               overrides=quick if solver == "sgd" else {**quick, "head_solver": solver})[0]
               for solver in ("sgd", "lbfgs")}
    lbfgs = records["lbfgs"]
    assert lbfgs["config"]["head_solver"] == "lbfgs" and lbfgs["config"]["overrides"]["head_solver"] == "lbfgs"
    assert lbfgs["config"]["training"]["l2"] in [row["l2"] for row in lbfgs["config"]["training"]["l2_grid"]]
    assert lbfgs["metrics"]["auc"] > 0.8
    sgd = records["sgd"]["config"]
    assert sgd["head_solver"] == "sgd" and "head_solver" not in sgd["overrides"]
    rows = list(csv.DictReader(io.StringIO(api.table(tmp_path, fmt="csv"))))
    assert len(rows) == 2  # one row per solver, each the mean of its own single run
    by_solver = {"lbfgs" if "head_solver=lbfgs" in row["model"] else "sgd": row for row in rows}
    assert set(by_solver) == {"sgd", "lbfgs"}
    for solver, record in records.items():
        assert by_solver[solver]["n_seeds"] == "1"
        assert float(by_solver[solver]["mean"]) == pytest.approx(record["metrics"]["auc"], abs=1e-6)


def test_mgca_mode_trains_through_the_encoder_on_augmented_images(rsna_record, resnet18, data, tmp_path):
    overrides = {**FAST, "linear_mode": "mgca", "train_transform": "moco2", "max_epochs": 4}
    record, _ = api.run("generic", "rsna_cls", 1.0, checkpoint=resnet18, model_options={"arch": "resnet18"},
                        data_root=data / "rsna", results=tmp_path, overrides=overrides, device="cpu", progress=False)
    training = record["config"]["training"]
    assert training["mode"] == "mgca" and training["epochs"] == 4
    # Validation and test images take the deterministic pipeline of the cached mode: cache hits.
    assert training["feature_cache"]["val"] == training["feature_cache"]["test"] == "hit"
    assert training["feature_cache"]["train"].startswith("not used")
    assert record["metrics"]["auc"] > 0.6


def test_covidx_accuracy_from_the_cli(resnet18, data, tmp_path):
    record = _cli_run("covidx_cls", resnet18, data / "covidx", tmp_path)
    metrics = record["metrics"]
    # Chance is 1/3; always answering the commonest class (COVID-19) scores 0.5 here.
    assert record["n"]["test_per_class"] == {"normal": 6, "pneumonia": 6, "COVID-19": 12}
    assert metrics["acc"] > 0.65 and record["primary_metric"] == "acc"
    assert record["per_image"] and np.isclose(np.mean(list(record["per_image"].values())), metrics["acc"])
    assert set(metrics) == {"acc", "auc", "auc_normal", "auc_pneumonia", "auc_covid_19",
                            "ece", "adaptive_ece", "brier"}  # calibration of the top label
    ci = record["ci"]["acc"]
    assert ci["low"] <= metrics["acc"] <= ci["high"]


def test_chexpert_test_set_is_valid_csv_and_the_probe_learns(resnet18, data, tmp_path):
    record = _cli_run("chexpert_cls", resnet18, data / "chexpert", tmp_path)
    metrics = record["metrics"]
    # The synthetic test set: the frontal rows of valid.csv, from the split the reader derives.
    assert record["n"]["test"] == 16 and "test_sha256" in record["split"]
    # Edema (a wide perihilar haze) is learnt from 64-pixel images of a random-init ResNet-18, thin
    # atelectasis bands are not; the macro AUC over the 5 findings sits clearly above 0.5 all the same.
    assert metrics["auc_edema"] > 0.85
    assert metrics["auc"] > 0.58
    per_class = [metrics[f"auc_{name}"] for name in ("atelectasis", "cardiomegaly", "consolidation", "edema",
                                                      "pleural_effusion")]
    assert np.isclose(metrics["auc"], np.mean([v for v in per_class if v is not None]))


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    multilabel = rng.integers(0, 2, size=(60, 3))
    scores = np.clip(multilabel * 0.3 + rng.random((60, 3)), 0, 1).round(1)  # ties included
    ids = [str(i) for i in range(60)]
    result = evaluate_classification("multilabel", ["A", "B c", "D"], ids, multilabel, scores, ["auc"], thresholds=None,
                                     n_resamples=200, seed=0)
    metrics = result["metrics"]
    assert np.isclose(metrics["auc"], roc_auc_score(multilabel, scores, average="macro"))
    assert np.isclose(metrics["auc_b_c"], roc_auc_score(multilabel[:, 1], scores[:, 1]))
    ci = result["ci"]["auc"]
    assert ci["low"] < metrics["auc"] < ci["high"] and ci["skipped"] == 0 and result["per_image"] == {}

    classes = rng.integers(0, 3, size=60)
    probs = rng.dirichlet([1, 1, 1], size=60) + np.eye(3)[classes] * 0.3
    probs /= probs.sum(axis=1, keepdims=True)
    result = evaluate_classification("multiclass", ["x", "y", "z"], ids, classes, probs, ["acc", "auc"],
                                     thresholds=None, n_resamples=50, seed=0)
    metrics = result["metrics"]
    assert np.isclose(metrics["acc"], (probs.argmax(axis=1) == classes).mean())
    assert list(result["per_image"].values()) == (probs.argmax(axis=1) == classes).astype(float).tolist()
    assert np.isclose(metrics["auc"], roc_auc_score(classes, probs, multi_class="ovr", average="macro"))


def test_random_crop_takes_windows_of_each_image():
    images = torch.arange(2 * 10 * 10, dtype=torch.float32).view(2, 1, 10, 10)
    crops = random_crop(images, 6, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 1, 6, 6)
    for image, crop in zip(images, crops):
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 10)
        assert torch.equal(crop, image[:, top:top + 6, left:left + 6])


def test_gaussian_blur_equals_scipy():
    image = torch.rand(1, 20, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.5, 1.0, 2.0):  # 3 sigma whole or half: scipy's truncation radius equals ours
        expected = gaussian_filter(image[0].numpy(), sigma, mode="nearest", truncate=3.0)  # edge repeated (Pillow)
        np.testing.assert_allclose(gaussian_blur(image, sigma)[0].numpy(), expected, atol=1e-12)


def test_moco2_on_grey_images_jitters_brightness_within_mgca_range():
    flat = torch.full((400, 1, 8, 8), 0.5)
    out = moco2(flat, torch.Generator().manual_seed(0))
    # Contrast, blur and flip leave a flat image flat; brightness scales it by 1 +- 0.4 with p 0.8.
    values = out[:, 0, 0, 0]
    assert torch.allclose(out, values.view(-1, 1, 1, 1).expand_as(out))
    assert values.min() >= 0.5 * 0.6 - 1e-6 and values.max() <= 0.5 * 1.4 + 1e-6
    assert 0.12 < (values == 0.5).float().mean() < 0.28  # the 20 % not jittered

    halves = torch.zeros(400, 1, 8, 8)
    halves[..., :4] = 1.0
    out = moco2(halves, torch.Generator().manual_seed(1))
    flipped = out[..., 4:].mean(dim=(1, 2, 3)) > out[..., :4].mean(dim=(1, 2, 3))
    assert 0.4 < flipped.float().mean() < 0.6  # horizontal flip with p 0.5


def test_a_non_finite_head_loss_stops_training_naming_its_epoch_and_step():
    from vlpbench.protocols import linear as lin
    from vlpbench.protocols.runtime import NonFiniteLossError
    from vlpbench.tasks import load_task

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 8, generator=generator)
    targets = (torch.rand(64, 1, generator=generator) < 0.5).float()
    calls = []

    def batches(index):  # the third training batch carries a NaN feature
        calls.append(len(index))
        return features[index] * (float("nan") if len(calls) == 3 else 1.0)

    config = {**load_task("rsna_cls").config, "max_epochs": 2, "patience": 2}
    with pytest.raises(NonFiniteLossError, match="training loss became nan at epoch 1, step 3;"):
        lin._fit(lin.seeded_head(8, 1, 0), batches, targets, features[:8], targets[:8], lin.loss_function("binary"),
                 config, 0, False)
