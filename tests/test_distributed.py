"""One run shared by two processes under torchrun (gloo, CPU) computes what one process computes.

One torchrun launch of this file (two ranks, one thread each) checks the collectives and the
gradient of a global-batch loss, then runs ``vlpbench run`` for siim_seg and rsna_cls; the test
process runs the same two tasks alone (one thread) and compares. Tolerances:

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
from vlpbench.protocols.segmentation import mixed_loss

SEG = {"image_size": 32, "batch_size": 4, "max_epochs": 2, "patience": 2, "balance_negatives": False,
       "dice_resolution": "input", "bootstrap_resamples": 20, "lr": 0.0}
CLS = {"image_size": 32, "resize_size": 32, "batch_size": 4, "max_epochs": 2, "bootstrap_resamples": 20}


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


def test_an_unconverted_protocol_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"'zero_shot'.*linear, segmentation"):
        api.run("random", "rsna_zs", 1.0, device="cpu")


# --- the torchrun launch -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import torchvision

    root = tmp_path_factory.mktemp("ddp")
    api.synth("siim", root / "siim", n=48, seed=2, size=64, progress=False)
    api.synth("rsna", root / "rsna", n=80, seed=2, size=32, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), root / "resnet18.pth")
    return root


def _cli_runs(data, results):
    common = ["--model", "generic", "--checkpoint", str(data / "resnet18.pth"), "--model-option", "arch=resnet18",
              "--frac", "1.0", "--device", "cpu", "--results", str(results), "--no-progress"]
    return [["run", "--task", "siim_seg", "--data-root", str(data / "siim"), *common, *_settings(SEG)],
            ["run", "--task", "rsna_cls", "--data-root", str(data / "rsna"), *common, *_settings(CLS)]]


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank has: the same kernels, so the same features
    try:
        for arguments in _cli_runs(data, out / "results"):
            assert main(arguments) == 0
    finally:
        torch.set_num_threads(threads)
        patch.undo()
    return out


def _record(results, task):
    records = sorted((results / "runs").rglob(f"{task}.v1/*.json"))
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
        assert tuple(got["sums"]) == (3.0, 2.0)
        # The shared loss and its gradient equal the single-process loss over the whole batch.
        assert got["loss"] == pytest.approx(float(got["reference_loss"]), abs=1e-6)
        np.testing.assert_allclose(got["grads"], got["reference_grads"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["running"], got["reference_running"], rtol=1e-6, atol=1e-7)
    assert np.array_equal(ranks[0]["grads"], ranks[1]["grads"])


def test_exactly_one_record_per_run_is_written(launched):
    out, stdout = launched
    for task in ("siim_seg", "rsna_cls"):
        records, record = _record(out / "results", task)
        assert len(records) == 1
        assert record["config"]["training"]["world_size"] == 2
    assert stdout.count("record: ") == 2  # rank 0 prints, rank 1 stays silent


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


# --- what each rank runs -----------------------------------------------------------------------------


def _collectives(out: Path) -> None:
    """Each rank's view of the collectives, and the gradient of the shared segmentation loss."""
    rank = distributed.rank()
    rows = np.arange(33.0).reshape(11, 3)
    block = distributed.shard(rows)
    results = {"gathered": distributed.gather_arrays(block), "block_rows": len(block),
               "batch_block": distributed.batch_block(11, 4),
               "broadcast": distributed.broadcast_object({"rank": rank})["rank"],
               "all_true": [distributed.all_true(rank == 0), distributed.all_true(True)],
               "sums": distributed.all_reduce_sum([rank + 1, 1])}

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
