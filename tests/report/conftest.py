"""Result records for report tests, built with ``make_record`` (with a fixed environment, so no git
or torch query runs per record)."""

from __future__ import annotations

import copy

import pytest

from vlpbench import results

SPLIT_A = "a" * 8 + "1" * 56
SPLIT_B = "b" * 8 + "2" * 56
_PROTOCOLS = {"siim_seg": "segmentation", "rsna_seg": "segmentation", "rsna_det": "detection",
              "chexpert_cls": "linear", "cxr14_ft": "finetune", "rsna_zs": "zero_shot", "chexpert_zs": "zero_shot",
              "rsna_ground": "grounding"}


@pytest.fixture(autouse=True)
def fixed_environment(monkeypatch):
    monkeypatch.setattr(results, "environment", lambda: {"vlpbench": "test", "git": None, "python": "3",
                                                         "torch": "2", "cuda": None, "device": "cpu"})


@pytest.fixture
def make():
    """``make(model, metrics, task=..., frac=..., seed=..., ...)`` → a validated result record.

    ``metrics`` is a number (the task's primary metric) or a dict; ``ci`` is a half-width added
    around the primary metric; ``per_image`` a dict of per-image scores.
    """
    def build(model: str, metrics, *, task: str = "siim_seg", frac: float = 0.01, seed: int = 0,
              version: int = 1, split: str = SPLIT_A, primary: str | None = None,
              overrides: dict | None = None, synthetic: bool = False, sha: str | None = "c" * 64,
              ci: float | None = None, per_image: dict | None = None, protocol: str | None = None) -> dict:
        primary = primary or ("map" if task.endswith("_det") else "auc" if task.endswith(("_cls", "_ft", "_zs"))
                              else "dice")
        values = metrics if isinstance(metrics, dict) else {primary: metrics}
        return results.make_record(
            model={"name": model, "adapter": model,
                   "checkpoint": None if sha is None else {"path": f"{model}.pth", "sha256": sha}},
            task={"name": task, "version": version, "protocol": protocol or _PROTOCOLS.get(task, "segmentation")},
            frac=frac, seed=seed, split={"dataset": task.split("_")[0], "version": "v1", "sha256": split},
            metrics=values, primary_metric=primary, n={"train": 10, "val": 5, "test": 20},
            config={"overrides": overrides or {}}, timing={},
            ci=None if ci is None else {primary: {"low": values[primary] - ci, "high": values[primary] + ci}},
            per_image=per_image, data={"synthetic": synthetic})
    return build


def with_former_names(record: dict, renames: dict[str, str]) -> dict:
    """``record`` as an earlier vlpbench wrote it: metric names renamed by ``renames`` (current → former)
    in ``metrics``, ``ci`` and ``primary_metric``, and the task's direction in the record."""
    old = copy.deepcopy(record)
    old["metrics"] = {renames.get(k, k): v for k, v in old["metrics"].items()}
    old["ci"] = None if old["ci"] is None else {renames.get(k, k): v for k, v in old["ci"].items()}
    old["primary_metric"] = renames.get(old["primary_metric"], old["primary_metric"])
    old["task"]["higher_is_better"] = True
    return old
