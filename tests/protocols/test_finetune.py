"""Full fine-tuning: the augmentation, epoch selection, learning on synthetic COVIDx, and cxr14_ft end
to end from the CLI on synthetic ChestX-ray14."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlpbench import api
from vlpbench.adapters.base import Adapter, LoadReport, Weights
from vlpbench.cli import main
from vlpbench.data.cxr14 import LABELS
from vlpbench.data.splits import dataset_split
from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics import metric_spec
from vlpbench.protocols import SplitIds
from vlpbench.protocols.finetune import augment, run_finetune_task
from vlpbench.protocols.segmentation import random_affine
from vlpbench.registry import ADAPTERS
from vlpbench.tasks import load_task


class TinyEncoder(torch.nn.Module):
    """Three stride-2 conv stages: an smp-style encoder (feature list, ``out_channels``) that a CPU
    fine-tunes in a second."""

    out_channels = (3, 16, 32, 64)

    def __init__(self) -> None:
        super().__init__()
        self.stages = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(a, b, 3, stride=2, padding=1), torch.nn.BatchNorm2d(b), torch.nn.ReLU())
            for a, b in zip(self.out_channels[:-1], self.out_channels[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        for stage in self.stages:
            features.append(stage(features[-1]))
        return features


class TinyAdapter(Adapter):
    """A checkpoint-free adapter around :class:`TinyEncoder`, initialised from option ``seed``."""

    name = "tiny-finetune-test"
    description = "test adapter: a 3-stage CNN"
    takes_checkpoint = False
    default_options = {"seed": 0}
    encoder_name = "tiny"

    @classmethod
    def map_weights(cls, checkpoint, options) -> Weights:
        return Weights(LoadReport("tiny"), {})

    def encoder(self) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.options["seed"])
            return TinyEncoder()


ADAPTERS.register(TinyAdapter.name, TinyAdapter)

FAST = {"image_size": 64, "max_epochs": 10, "patience": 10, "lr": 3e-3, "batch_size": 16, "bootstrap_resamples": 200}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic ChestX-ray14 and COVIDx folders of 120 images at 64 pixels."""
    root = tmp_path_factory.mktemp("data")
    for dataset in ("cxr14", "covidx"):
        api.synth(dataset, root / dataset, n=120, size=64, progress=False)
    return root


def test_cxr14_ft_from_the_cli_fits_and_reports_the_14_findings(data, tmp_path):
    overrides = [item for key, value in FAST.items() for item in ("--set", f"{key}={value}")]
    assert main(["-q", "run", "--model", TinyAdapter.name, "--task", "cxr14_ft", "--frac", "1.0", "--data-root",
                 str(data / "cxr14"), "--results", str(tmp_path), "--device", "cpu", *overrides]) == 0
    (path,) = tmp_path.glob("runs/**/cxr14_ft.v1/*.json")
    record = json.loads(path.read_text())
    n, metrics = record["n"], record["metrics"]
    assert (n["train"], n["val"], n["test"]) == (84, 9, 27) and set(n["test_per_class"]) == set(LABELS)
    # Every parameter trains: the network fits its training images.
    history = record["config"]["training"]["history"]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    # The epoch kept is the one with the best validation macro AUC.
    best = max(history, key=lambda h: h["val_auc"])
    assert record["config"]["training"]["best_epoch"] == best["epoch"]
    # 27 test images hold 0-5 positives of each finding: a class without positives has no AUC and the
    # macro AUC averages the others. (So few positives make the test AUC too noisy to assert on; the
    # COVIDx test below checks that fine-tuning generalises.)
    per_class = {name: metrics[f"auc_{name.lower()}"] for name in LABELS}
    assert [name for name, value in per_class.items() if value is None] == [
        name for name in LABELS if n["test_per_class"][name] == 0]
    assert np.isclose(metrics["auc"], np.mean([v for v in per_class.values() if v is not None]))
    ci = record["ci"]["auc"]
    assert ci["low"] <= metrics["auc"] <= ci["high"]


def test_finetuning_learns_covidx_and_select_on_loss_keeps_the_lowest_validation_loss(data):
    spec = load_task("covidx_cls")
    source = api.open_dataset(spec, data / "covidx")
    split = dataset_split("covidx", source, "v1")
    ids = SplitIds(*(api.split_ids(split, part, source)[0] for part in ("train", "val", "test")))
    config = {**load_task("cxr14_ft").resolve(FAST), "classes": spec.config["classes"], "label_kind": "multiclass",
              "select_on": "loss"}
    outcome = run_finetune_task(TinyAdapter(), source, ids, config, seed=0, device=torch.device("cpu"),
                                progress=False)
    # One-vs-rest macro AUC of the three classes; chance is 0.5.
    assert outcome["metrics"]["auc"] > 0.65
    assert set(outcome["metrics"]) == {"acc", "auc", "auc_normal", "auc_pneumonia", "auc_covid_19",
                                       "ece", "adaptive_ece", "brier"}  # calibration of the top label
    assert all(metric_spec(name).name == name for name in (*outcome["metrics"], *outcome["ci"]))
    history = outcome["training"]["history"]
    assert outcome["training"]["best_epoch"] == min(history, key=lambda h: h["val_loss"])["epoch"]
    assert outcome["training"]["best_val"] == min(h["val_loss"] for h in history)


def test_augment_flips_then_applies_the_drawn_affine():
    images = torch.rand(64, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    out = augment(images, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    flip = torch.rand(64, generator=replay) < 0.5
    theta = random_affine(64, 0.1, 10.0, 0.5, replay)
    identity = (theta == torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])).all(dim=(1, 2))
    expected = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    assert 0 < identity.sum() < 64 and 0 < flip.sum() < 64
    torch.testing.assert_close(out[identity], expected[identity])
    assert not torch.allclose(out[~identity], expected[~identity])


def test_bad_options_fail_before_any_work():
    config = {**load_task("cxr14_ft").config}
    split = SplitIds(["a", "b"], ["c"], ["d"])
    with pytest.raises(ConfigError, match="select_on='best'"):
        run_finetune_task(TinyAdapter(), None, split, {**config, "select_on": "best"}, seed=0,
                          device=torch.device("cpu"), progress=False)
    with pytest.raises(DataError, match="only 2 training images for batch size 64"):
        run_finetune_task(TinyAdapter(), None, split, config, seed=0, device=torch.device("cpu"), progress=False)
