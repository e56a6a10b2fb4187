"""One run shared by two processes under torchrun (gloo, CPU) computes what one process computes.

One torchrun launch of this file (two ranks, one thread each) checks the collectives and the
gradient of a global-batch loss, then runs ``vlpbench run`` for siim_seg, rsna_cls, rsna_zs,
rsna_ground, cxr14_ft and rsna_det; the test process runs the same tasks alone (one thread) and
compares. Tolerances:

- zero-shot and grounding (inference only): each rank scores whole batches of the single process
  and the scores / maps are gathered in order, so thresholds, metrics and per-query scores are
  equal to 1e-6, and the saved heat maps bit for bit;
- linear probe: the features are bit for bit equal (each rank encodes whole batches of the single
  process), so the AUC is equal to 1e-6;
- segmentation: the loss and its gradient are the single-process ones (sums and BatchNorm statistics
  over the global batch), up to the order of floating-point sums: checked to 1e-6 (loss) and 1e-5
  relative (gradient) on a conv + BatchNorm network. Over training, AdamW amplifies that rounding
  noise (its first steps are close to ``lr * sign(gradient)``): with ``lr=1e-3`` the two runs' mean
  training loss differs by about 1e-3 relative after one epoch, as much as two single-process runs
  whose sums are ordered differently would. The end-to-end comparison therefore runs with ``lr=0``:
  every forward pass, the BatchNorm running statistics (updated from the global batch), the
  sharded validation loss and the gathered per-image Dice must then agree to 1e-5, which checks
  all the sharing without the optimizer's chaos.
- fine-tuning: likewise with ``lr=0`` (and augmentation on, which moves the BatchNorm running
  statistics): the per-rank losses' mean, the global BatchNorm statistics, the gathered validation
  logits and the test AUC agree with the single process to 1e-5.
- detection: likewise with ``lr=0`` (the head's BatchNorm statistics move; the frozen encoder's
  features are computed in blocks and gathered): losses to 1e-5, the gathered detections' count and
  mAP to 1e-6. An untrained head finds no lesion (mAP 0), so the gathering of detections is also
  checked on hand-made detections of uneven counts, empty images included.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpbench import api, distributed
from vlpbench.cli import main
from vlpbench.errors import ConfigError
from vlpbench.protocols.detection import _gathered_detections
from vlpbench.protocols.segmentation import mixed_loss
from vlpbench.registry import ADAPTERS, PROTOCOLS
from vlpbench.testing.weightless import WeightlessAdapter

SEG = {"image_size": 32, "batch_size": 4, "max_epochs": 2, "patience": 2, "balance_negatives": False,
       "dice_resolution": "input", "bootstrap_resamples": 20, "lr": 0.0}
CLS = {"image_size": 32, "resize_size": 32, "batch_size": 4, "max_epochs": 2, "bootstrap_resamples": 20}
# Batches of 4 over the 80-image synthetic RSNA: several batches per rank, the last one partial.
ZS = {"batch_size": 4, "bootstrap_resamples": 20}
GROUND = {"batch_size": 4, "eval_size": 32, "threshold_grid": 50, "bootstrap_resamples": 20}
DET = {"image_size": 32, "batch_size": 4, "neck_width": 16, "max_epochs": 2, "patience": 2, "lr": 0.0,
       "conf_threshold": 0.3, "bootstrap_resamples": 20}
FT = {"image_size": 32, "batch_size": 4, "max_epochs": 2, "patience": 2, "lr": 0.0, "select_on": "loss",
      "bootstrap_resamples": 20}


class AlignedModel(WeightlessAdapter):
    """A weightless aligned image-text model: brightness (where the synthetic lesions are) points
    towards "<finding>", darkness towards "no <finding>", for the whole image and per location."""

    name = "distributed-test-aligned"
    description = "test model: image brightness as the finding's evidence"
    capabilities = frozenset({"embed_image", "embed_text", "dense_embed"})
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    @staticmethod
    def _direction(level: torch.Tensor) -> torch.Tensor:
        angle = torch.pi / 2 * torch.sigmoid(4 * level)
        return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)

    def embed_image(self, images):
        return self._direction(images.mean(dim=(1, 2, 3)))

    def dense_embed(self, images):
        return self._direction(torch.nn.functional.avg_pool2d(images.mean(1), 4))

    def embed_text(self, texts):
        return torch.tensor([[1.0, 0.0] if t.startswith("no ") else [0.0, 1.0] for t in texts])


ADAPTERS.register(AlignedModel.name, AlignedModel)


def _settings(overrides):
    return [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]


# --- sharding without a process group ----------------------------------------------------------------


@pytest.mark.parametrize("n,parts", [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_shard_blocks_are_disjoint_contiguous_and_give_the_list_back_in_order(n, parts):
    items = [f"id{i}" for i in range(n)]
    blocks = [distributed.shard(items, parts, index) for index in range(parts)]
    assert sum(blocks, []) == items
    sizes = [len(block) for block in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_outside_a_process_group_the_helpers_are_the_single_process():
    array = np.arange(6.0).reshape(3, 2)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(list("abc")) == list("abc")
    assert np.array_equal(distributed.gather_arrays(array), array)
    assert distributed.batch_block(10, 4) == (0, 10)
    assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]


def test_a_protocol_that_cannot_share_a_run_is_refused_under_torchrun(monkeypatch):
    from vlpbench.protocols.base import Protocol

    class Unshared(Protocol):
        name = "unshared"
        table_group = "cls"
        distributed = False
        prediction_files = "none"

        def run(self, *args, **kwargs):
            return {}

        def score(self, *args, **kwargs):
            return {}

    monkeypatch.setitem(PROTOCOLS._targets, "unshared", Unshared())  # removed after the test
    with pytest.raises(ConfigError, match=r"'unshared'.*: detection, finetune, grounding, linear, segmentation, "
                                          r"zero_shot\."):
        api.check_distributed("unshared")


# --- the torchrun launch -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import torchvision

    root = tmp_path_factory.mktemp("ddp")
    api.synth("siim", root / "siim", n=48, seed=2, size=64, progress=False)
    api.synth("rsna", root / "rsna", n=80, seed=2, size=32, progress=False)
    api.synth("cxr14", root / "cxr14", n=48, seed=2, size=32, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), root / "resnet18.pth")
    return root


def _cli_runs(data, results):
    run = ["--frac", "1.0", "--device", "cpu", "--results", str(results), "--no-progress"]
    common = ["--model", "generic", "--checkpoint", str(data / "resnet18.pth"), "--model-option", "arch=resnet18",
              *run]
    aligned = ["--model", AlignedModel.name, "--data-root", str(data / "rsna"), *run]
    return [["run", "--task", "siim_seg", "--data-root", str(data / "siim"), *common, *_settings(SEG)],
            ["run", "--task", "rsna_cls", "--data-root", str(data / "rsna"), *common, *_settings(CLS)],
            ["run", "--task", "rsna_zs", *aligned, *_settings(ZS)],
            ["run", "--task", "rsna_ground", *aligned, "--save-predictions", str(results / "maps"),
             *_settings(GROUND)],
            ["run", "--task", "cxr14_ft", "--data-root", str(data / "cxr14"), *common, *_settings(FT)],
            ["run", "--task", "rsna_det", "--data-root", str(data / "rsna"), *common, *_settings(DET)]]


@pytest.fixture(scope="module")
def launched(data, tmp_path_factory):
    """Two ranks over gloo: this file's ``__main__`` (collectives, then both runs), with a cache of their own."""
    out = tmp_path_factory.mktemp("ddp-out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLPBENCH_CACHE": str(out / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               __file__, str(data), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


@pytest.fixture(scope="module")
def alone(data, tmp_path_factory):
    """The same two runs in this process, one thread, with a feature cache of its own."""
    out = tmp_path_factory.mktemp("single")
    patch = pytest.MonkeyPatch()
    patch.setenv("VLPBENCH_CACHE", str(out / "cache"))
    try:
        for arguments in _cli_runs(data, out / "results"):
            # One thread, as each rank has (torchrun sets OMP_NUM_THREADS=1): the same kernels, the same features.
            assert main([*arguments, "--threads", "1"]) == 0
    finally:
        patch.undo()
    return out


def _record(results, task):
    records = sorted((results / "runs").rglob(f"{task}.v*/*.json"))  # any task version
    return records, json.loads(records[0].read_text()) if records else None


def test_collectives_gather_in_order_and_the_global_loss_gives_the_single_process_gradient(launched):
    out, _ = launched
    ranks = [np.load(out / f"rank{r}.npz") for r in (0, 1)]
    for r, got in enumerate(ranks):
        # 11 rows over 2 ranks: blocks of 6 and 5; gathered back in order on both ranks.
        assert np.array_equal(got["gathered"], np.arange(33.0).reshape(11, 3))
        assert got["block_rows"] == [6, 5][r]
        # 11 rows in batches of 4 → batches at 0, 4, 8: rank 0 gets two whole batches, rank 1 one.
        assert tuple(got["batch_block"]) == [(0, 8), (8, 11)][r]
        assert got["broadcast"] == 0 and tuple(got["all_true"]) == (False, True)
        # Five images' detections (2, 0, 1 | 0, 3 boxes) from blocks of 3 and 2 images: back per image.
        assert tuple(got["detection_counts"]) == (2, 0, 1, 0, 3)
        assert np.array_equal(got["detection_rows"], _hand_detections(np.arange(5)))
        assert got["detection_labels"].tolist() == (_hand_detections(np.arange(5))[:, 0].astype(int) % 3).tolist()
        assert tuple(got["sums"]) == (3.0, 2.0)
        # The shared loss and its gradient equal the single-process loss over the whole batch.
        assert got["loss"] == pytest.approx(float(got["reference_loss"]), abs=1e-6)
        np.testing.assert_allclose(got["grads"], got["reference_grads"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["running"], got["reference_running"], rtol=1e-6, atol=1e-7)
    assert np.array_equal(ranks[0]["grads"], ranks[1]["grads"])


def test_exactly_one_record_per_run_is_written(launched):
    out, stdout = launched
    for task in ("siim_seg", "rsna_cls", "rsna_zs", "rsna_ground", "cxr14_ft", "rsna_det"):
        records, record = _record(out / "results", task)
        assert len(records) == 1
        assert record["config"]["training"]["world_size"] == 2
    assert stdout.count("record: ") == 6  # rank 0 prints, rank 1 stays silent


def test_linear_probe_features_are_identical_and_the_auc_equal(launched, alone):
    out, _ = launched
    shared = {path.name: np.load(path) for path in (out / "cache" / "features").rglob("*.npy")}
    single = {path.name: np.load(path) for path in (alone / "cache" / "features").rglob("*.npy")}
    assert shared.keys() == single.keys() and len(shared) == 3  # train, val, test
    for name, values in shared.items():
        assert np.array_equal(values, single[name])
    (_, two), (_, one) = _record(out / "results", "rsna_cls"), _record(alone / "results", "rsna_cls")
    assert two["metrics"]["auc"] == pytest.approx(one["metrics"]["auc"], abs=1e-6)
    assert two["config"]["training"]["history"] == one["config"]["training"]["history"]


def test_segmentation_matches_the_single_process_run(launched, alone):
    out, _ = launched
    (_, two), (_, one) = _record(out / "results", "siim_seg"), _record(alone / "results", "siim_seg")
    assert two["config"]["training"]["effective_batch"] == one["config"]["training"]["effective_batch"] == 4
    assert two["config"]["training"]["batch_per_process"] == 2
    assert two["config"]["training"]["best_epoch"] == one["config"]["training"]["best_epoch"]
    for shared, single in zip(two["config"]["training"]["history"], one["config"]["training"]["history"]):
        assert shared["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
        assert shared["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    # The second epoch's validation loss moves only through the BatchNorm running statistics.
    assert one["config"]["training"]["history"][1]["val_loss"] != one["config"]["training"]["history"][0]["val_loss"]
    assert list(two["per_image"]) == list(one["per_image"])  # every test image, in test order
    np.testing.assert_allclose(list(two["per_image"].values()), list(one["per_image"].values()), atol=1e-5)
    assert 0 < one["metrics"]["dice"] and two["metrics"]["dice"] == pytest.approx(one["metrics"]["dice"], abs=1e-5)
    assert two["n"] == one["n"]


def test_zero_shot_gathers_the_single_process_scores(launched, alone):
    out, _ = launched
    (_, two), (_, one) = _record(out / "results", "rsna_zs"), _record(alone / "results", "rsna_zs")
    threshold = one["config"]["training"]["thresholds"]["pneumonia"]
    assert two["config"]["training"]["thresholds"]["pneumonia"] == pytest.approx(threshold, abs=1e-6)
    assert one["metrics"]["auc"] > 0.7  # chance 0.5: the scores are the images' own, not a shuffle
    assert two["metrics"].keys() == one["metrics"].keys()
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, abs=1e-6), name
        assert two["ci"][name]["low"] == pytest.approx(one["ci"][name]["low"], abs=1e-6)
    assert two["n"] == one["n"]


def test_grounding_gathers_the_single_process_maps_in_query_order(launched, alone):
    out, _ = launched
    (_, two), (_, one) = _record(out / "results", "rsna_ground"), _record(alone / "results", "rsna_ground")
    assert two["config"]["training"]["threshold"] == pytest.approx(one["config"]["training"]["threshold"], abs=1e-6)
    assert list(two["per_image"]) == list(one["per_image"])  # every test query, in query order
    np.testing.assert_allclose(list(two["per_image"].values()), list(one["per_image"].values()), atol=1e-6)
    assert one["metrics"]["dice"] > 0
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert two["n"] == one["n"] and one["n"]["val"] > 0
    # Rank 0 saves the gathered maps of validation and test queries: the single process's file.
    shared, single = (np.load(next((folder / "results" / "maps").rglob("*.npz")))
                      for folder in (out, alone))
    assert sorted(shared.files) == sorted(single.files) and len(shared.files) == one["n"]["val"] + one["n"]["test"]
    for key in single.files:
        assert np.array_equal(shared[key], single[key])


def test_finetuning_matches_the_single_process_run(launched, alone):
    out, _ = launched
    (_, two), (_, one) = _record(out / "results", "cxr14_ft"), _record(alone / "results", "cxr14_ft")
    shared, single = two["config"]["training"], one["config"]["training"]
    assert (shared["effective_batch"], shared["batch_per_process"]) == (single["effective_batch"], 2) == (4, 2)
    assert shared["best_epoch"] == single["best_epoch"]
    # The second epoch's validation loss moves only through the BatchNorm running statistics, which the
    # augmented global batches update: equal values mean equal batches, draws and statistics.
    assert single["history"][1]["val_loss"] != single["history"][0]["val_loss"]
    for two_epoch, one_epoch in zip(shared["history"], single["history"]):
        for key in ("train_loss", "val_loss"):
            assert two_epoch[key] == pytest.approx(one_epoch[key], rel=1e-5), key
    assert one["metrics"]["auc"] is not None
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, abs=1e-5), name
    assert two["n"] == one["n"]


def test_detection_matches_the_single_process_run(launched, alone):
    out, _ = launched
    (_, two), (_, one) = _record(out / "results", "rsna_det"), _record(alone / "results", "rsna_det")
    shared, single = two["config"]["training"], one["config"]["training"]
    assert (shared["effective_batch"], shared["batch_per_process"]) == (single["batch_size"], 2) == (4, 2)
    assert shared["best_epoch"] == single["best_epoch"]
    # The second epoch's validation loss moves only through the BatchNorm running statistics.
    assert single["history"][1]["val_loss"] != single["history"][0]["val_loss"]
    for two_epoch, one_epoch in zip(shared["history"], single["history"]):
        for key in ("train_loss", "val_loss"):
            assert two_epoch[key] == pytest.approx(one_epoch[key], rel=1e-5), key
        assert two_epoch["val_map"] == pytest.approx(one_epoch["val_map"], abs=1e-6)
    assert one["n"]["test_detections"] > 0 and two["n"] == one["n"]
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, abs=1e-6), name


# --- what each rank runs -----------------------------------------------------------------------------


def _hand_detections(images) -> np.ndarray:
    """Detections of ``images`` (image i has ``[2, 0, 1, 0, 3][i]`` boxes) as rows (box, score)."""
    counts = [2, 0, 1, 0, 3]
    return np.array([[i, i + k, 10 + i, 10 + k, 1 - 0.1 * k] for i in images for k in range(counts[i])],
                    dtype=np.float64).reshape(-1, 5)


def _collectives(out: Path) -> None:
    """Each rank's view of the collectives, and the gradient of the shared segmentation loss."""
    rank = distributed.rank()
    first, stop = distributed.shard_bounds(5)
    local = [(rows[:, :4], rows[:, 4], rows[:, 0].astype(np.int64) % 3)
             for rows in (_hand_detections([i]) for i in range(first, stop))]
    detections = _gathered_detections(local, first, 5)
    rows = np.arange(33.0).reshape(11, 3)
    block = distributed.shard(rows)
    results = {"gathered": distributed.gather_arrays(block), "block_rows": len(block),
               "batch_block": distributed.batch_block(11, 4),
               "broadcast": distributed.broadcast_object({"rank": rank})["rank"],
               "all_true": [distributed.all_true(rank == 0), distributed.all_true(True)],
               "sums": distributed.all_reduce_sum([rank + 1, 1]),
               "detection_counts": [len(scores) for _, scores, _ in detections],
               "detection_rows": np.concatenate([np.column_stack([boxes, scores]) for boxes, scores, _ in detections]),
               "detection_labels": np.concatenate([labels for _, _, labels in detections])}

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                  torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
    reference = copy.deepcopy(network)
    images = torch.randn(8, 1, 8, 8)
    masks = (torch.rand(8, 1, 8, 8) > 0.7).float()
    reference_loss = mixed_loss(reference(images), masks, 10.0, 2.0)
    reference_loss.backward()
    wrapped = torch.nn.parallel.DistributedDataParallel(distributed.global_batchnorm(network),
                                                        forward_sync_buffers=False)
    loss = mixed_loss(wrapped(distributed.shard(images)), distributed.shard(masks), 10.0, 2.0, across_ranks=True)
    loss.backward()

    def flat(model, what):
        if what == "grads":
            return torch.cat([p.grad.flatten() for p in model.parameters()]).numpy()
        return torch.cat([model[1].running_mean, model[1].running_var]).numpy()

    np.savez(out / f"rank{rank}.npz", **results, loss=loss.item(), reference_loss=reference_loss.item(),
             grads=flat(network, "grads"), reference_grads=flat(reference, "grads"),
             running=flat(network, "running"), reference_running=flat(reference, "running"))


if __name__ == "__main__":
    data_root, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    # One process group for everything (torchrun's store serves one group per launch); each
    # `vlpbench run` then uses the group it finds instead of joining one of its own.
    with distributed.session(torch.device("cpu")):
        _collectives(out_dir)
        for arguments in _cli_runs(data_root, out_dir / "results"):
            if main(arguments) != 0:
                sys.exit(1)
