"""The README's "Adding a dataset" and "Adding a task" recipes, followed end to end on synthetic data.

A new dataset format (a folder of PNGs and a ``labels.csv``) gets one reader, one synthesizer, one derived
split and one ``DatasetSpec`` registration; a new task is one YAML file. Then the real pipeline runs on it:
``synth``, ``data check``, ``run`` with saved predictions, and ``score`` on a copy holding the label file
only, which gives the run's metrics exactly.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vlpbench.tasks
from vlpbench import api
from vlpbench.data import SYNTHETIC_MARKER, is_synthetic
from vlpbench.data.base import DatasetReader, check_classes
from vlpbench.data.splits import derived_split, holdout_parts, write_split
from vlpbench.errors import DataError
from vlpbench.registry import DATASETS, DatasetSpec

NAME = "pngfolder"
CLASS = "finding"


class PngFolderSource(DatasetReader):
    """``labels.csv`` (``image_id,finding``) and ``images/<image_id>.png``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.label_file = self.root / "labels.csv"
        if not self.label_file.is_file():
            raise DataError(f"{self.label_file} not found")
        with open(self.label_file, newline="") as f:
            self._labels = {row["image_id"]: int(row[CLASS]) for row in csv.DictReader(f)}
        self._images = {p.stem for p in (self.root / "images").glob("*.png")}

    @property
    def image_ids(self) -> list[str]:
        return list(self._labels)

    @property
    def synthetic(self) -> bool:
        return is_synthetic(self.root)

    def image(self, image_id: str) -> np.ndarray:
        return np.asarray(Image.open(self.root / "images" / f"{image_id}.png").convert("L"))

    def unlabelled(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if i not in self._labels]

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if i not in self._labels or i not in self._images]

    @property
    def classes(self) -> tuple[str, ...]:
        return (CLASS,)

    def class_labels(self, image_id: str, classes: Sequence[str], config: Mapping[str, Any]) -> list[int]:
        check_classes(self, classes)
        return [self._labels[image_id]]


def synth_pngfolder(out: Path, *, n: int, seed: int, progress: bool = True, size: int = 48) -> dict:
    """Positives carry a bright square, negatives none."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / SYNTHETIC_MARKER).write_text("{}\n")
    rows = []
    for k in range(n):
        label = int(k % 2)
        pixels = rng.integers(40, 90, size=(size, size), dtype=np.uint8)
        if label:
            top, left = rng.integers(4, size - 20, size=2)
            pixels[top:top + 16, left:left + 16] = 230
        Image.fromarray(pixels).save(out / "images" / f"img{k:03d}.png")
        rows.append(f"img{k:03d},{label}")
    (out / "labels.csv").write_text("\n".join([f"image_id,{CLASS}", *rows]) + "\n")
    return {"dataset": NAME, "n": n}


def split_v1(source: PngFolderSource):
    """Every fifth image is a test image; the rest split into train and val, stratified."""
    ids = source.image_ids
    labels = {i: source.class_labels(i, [CLASS], {})[0] for i in ids}
    test = ids[::5]

    def build(out_dir: Path, version: str) -> dict:
        parts = holdout_parts([i for i in ids if i not in set(test)], test, labels, n_val=len(ids) // 5, seed=0)
        return write_split(out_dir, dataset=NAME, version=version, parts=parts,
                           labels={i: {CLASS: v} for i, v in labels.items()}, columns=[CLASS],
                           generator="tests/test_extending.py:split_v1", seed=0,
                           fractions={"train": 0.6, "val": 0.2, "test": 0.2}, source={"file": "labels.csv"})

    return derived_split(NAME, "v1", sources=[source.label_file], build=build)


TASK_YAML = f"""\
name: {NAME}_cls
version: 1
description: Linear probe on the PNG-folder dataset of the extension recipe.
dataset: {NAME}
split: v1
protocol: linear
primary_metric: auc
fractions: [1.0]
config:
  classes: [{CLASS}]
  label_kind: binary
  linear_mode: cached
  train_transform: crop
  resize_size: 36
  image_size: 32
  upsample_299: false
  mean: 0.5
  std: 0.5
  batch_size: 8
  lr: 1.0e-3
  weight_decay: 1.0e-6
  betas: [0.9, 0.999]
  max_epochs: 3
  patience: 3
  bootstrap_resamples: 50
sources:
  protocol: the linear probe of rsna_cls
"""


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """The dataset's one registration and the task's one file (in a copy of the task folder)."""
    monkeypatch.setitem(DATASETS._targets, NAME, DatasetSpec(reader=PngFolderSource, synthesizer=synth_pngfolder,
                                                              derived_splits={"v1": split_v1}))
    tasks = tmp_path / "tasks"
    shutil.copytree(vlpbench.tasks.TASKS_DIR, tasks)
    (tasks / f"{NAME}_cls.yaml").write_text(TASK_YAML)
    monkeypatch.setattr(vlpbench.tasks, "TASKS_DIR", tasks)


def test_a_new_dataset_and_task_run_through_the_whole_pipeline(registered, tmp_path):
    import torchvision

    root = tmp_path / NAME
    api.synth(NAME, root, n=60, progress=False)
    report = api.data_check(NAME, root, progress=False)
    assert not report.errors, report.errors
    assert f"{NAME}_cls" in vlpbench.tasks.task_names()

    checkpoint = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)
    record, path = api.run("generic", f"{NAME}_cls", 1.0, checkpoint=checkpoint, model_options={"arch": "resnet18"},
                           data_root=root, results=tmp_path / "results", device="cpu", progress=False,
                           save_predictions=tmp_path / "predictions")
    assert path.is_file() and record["split"]["dataset"] == NAME
    assert record["n"] == {"train": 36, "val": 12, "test": 12, "test_per_class": {CLASS: 6}}
    assert 0.0 <= record["metrics"]["auc"] <= 1.0

    labels_only = tmp_path / "labels-only"
    labels_only.mkdir()
    for name in ("labels.csv", SYNTHETIC_MARKER):
        shutil.copy(root / name, labels_only / name)
    scored = api.score(f"{NAME}_cls", tmp_path / "predictions", data_root=labels_only)
    assert scored["metrics"] == record["metrics"] and scored["ci"] == record["ci"]
