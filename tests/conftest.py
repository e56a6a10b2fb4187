"""Shared fixtures: a synthetic SIIM dataset and small splits of it, random-init checkpoints (G2D's encoder layout, a torchvision
ResNet-18), and a lower-is-better metric."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One pytest worker per core: a second intra-op thread per worker only oversubscribes the cores, and
    # subprocesses the tests start (CLI runs, torchrun) inherit the limit.
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory, request):
    """Image caches and derived splits go to a temporary folder, never the user's ~/.cache.

    The decoded lung masks are the exception: their cache file is named by torchxrayvision's archive and the Pillow
    version that made them, so they are kept in pytest's own cache and decoded once, not by every run and worker."""
    folder = tmp_path_factory.mktemp("cache")
    if getattr(request.config, "cache", None) is not None:
        (folder / "lungs").symlink_to(request.config.cache.mkdir("vlpbench-lungs"), target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("VLPBENCH_CACHE", str(folder))
    yield folder
    patch.undo()


@pytest.fixture
def error_metric():
    """The name of a lower-is-better metric, ``error``, registered for one test (a per-image mean, unlike the
    shipped lower-is-better calibration metrics)."""
    from vlpbench.metrics import MetricSpec, register_metric
    from vlpbench.metrics.specs import PER_IMAGE_MEAN
    from vlpbench.registry import METRICS

    register_metric(MetricSpec("error", "Error", False, PER_IMAGE_MEAN, "share of test images got wrong"))
    yield "error"
    METRICS.unregister("error")


@pytest.fixture(scope="session")
def siim_root(tmp_path_factory):
    """A synthetic SIIM-ACR folder (real ImageIds and RLE masks, JPEG-encapsulated DICOMs at 256²)."""
    from vlpbench.synthetic.siim import synth_siim

    root = tmp_path_factory.mktemp("data") / "siim"
    synth_siim(root, n=240, seed=0, size=256, progress=False)
    return root


@pytest.fixture(scope="session")
def siim_parts(siim_root):
    """``(task, train, val, test) -> (source, SplitIds)``: the first images of each part of a SIIM task's split
    of :func:`siim_root` (fraction 1.0)."""
    from vlpbench import api
    from vlpbench.protocols import SplitIds
    from vlpbench.tasks import load_task

    def parts(task_name: str, train: int, val: int, test: int):
        task = load_task(task_name)
        source = api.open_dataset(task, siim_root)
        split, _ = api.task_splits(task, source)
        ids = [api.split_ids(split, part, source)[0] for part in ("train", "val", "test")]
        return source, SplitIds(train=ids[0][:train], val=ids[1][:val], test=ids[2][:test], fraction=1.0)
    return parts


@pytest.fixture(scope="session")
def g2d_encoder_checkpoint(tmp_path_factory):
    """A random-init checkpoint with the key layout of G2D's published ``*_encoder.pth``."""
    from vlpbench.testing import write_g2d_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "g2d_encoder.pth"
    write_g2d_checkpoint(path, layout="encoder", seed=0)
    return path


@pytest.fixture(scope="session")
def resnet18_checkpoint(tmp_path_factory):
    """A torchvision ResNet-18 state dict, initialised with seed 0 (for the ``generic`` adapter)."""
    import torch
    import torchvision

    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


# --- the reproduction ledger ---------------------------------------------------------------------------------------

LEDGER_SPLIT = "5" * 64


@pytest.fixture
def planted_ledger(tmp_path):
    """``planted_ledger(mgca_sha256=None)`` → a ledger folder in tmp_path: MGCA's ResNet-50 (released, the given
    published sha256) and G2D (never released) in checkpoints.json; "Paper P" Table 1 (paper profile) prints MGCA's
    siim_seg Dice 49.7 / 59.3 / 64.2 at 1 / 10 / 100 % and rsna_seg 63.0 at 1 %, and G2D's siim_seg 62.6 at 1 %;
    Table 2 prints siim_seg 100 % as 70.1 and rsna_seg 10 % as 68.0 under a setting no profile reproduces; a thread
    (kind reproduction) gives a user's 0.481 for siim_seg 1 %."""
    import json

    def plant(mgca_sha256: str | None = None):
        folder = tmp_path / "ledger"
        folder.mkdir(exist_ok=True)
        checkpoints = {"schema": 1, "checkpoints": {
            "mgca_r50": {"model": "mgca", "file": "resnet_50.ckpt", "published_by": "MGCA README",
                         "url": "https://example.org/mgca", "released": True, "sha256": mgca_sha256, "size": None},
            "g2d": {"model": "g2d", "file": "{name}_encoder.pth", "published_by": "nobody: no weights",
                    "released": False}}}
        table1 = {"schema": 1, "citation": "Paper P", "table": "Table 1", "url": "https://example.org/p",
                  "profile": "paper", "unit": "percent",
                  "columns": [{"paper": "SIIM 1%", "task": "siim_seg", "frac": 0.01, "metric": "dice"},
                              {"paper": "SIIM 10%", "task": "siim_seg", "frac": 0.1, "metric": "dice"},
                              {"paper": "SIIM 100%", "task": "siim_seg", "frac": 1.0, "metric": "dice"},
                              {"paper": "RSNA 1%", "task": "rsna_seg", "frac": 0.01, "metric": "dice"}],
                  "rows": [{"method": "MGCA", "checkpoint": "mgca_r50", "values": [49.7, 59.3, 64.2, 63.0]},
                           {"method": "G2D", "checkpoint": "g2d", "values": [62.6, None, None, None]},
                           {"method": "Random", "values": [9.0, 28.6, 54.3, 6.9]}]}
        table2 = {"schema": 1, "citation": "Paper P", "table": "Table 2", "profile": "paper", "unit": "percent",
                  "columns": [{"paper": "SIIM 100% (UperNet)", "task": "siim_seg", "frac": 1.0, "metric": "dice"},
                              {"paper": "RSNA 10% (UperNet)", "task": "rsna_seg", "frac": 0.1, "metric": "dice"}],
                  "rows": [{"method": "MGCA", "checkpoint": "mgca_r50", "values": [70.1, 68.0],
                            "not_comparable": {"SIIM 100% (UperNet)": "a 640 px UperNet",
                                               "RSNA 10% (UperNet)": "a 640 px UperNet"}}]}
        thread = {"schema": 1, "kind": "reproduction", "citation": "HKU-MedAI/MGCA issue #3", "table": "first comment",
                  "profile": "paper", "unit": "fraction",
                  "columns": [{"paper": "Dice 1%", "task": "siim_seg", "frac": 0.01, "metric": "dice"}],
                  "rows": [{"method": "a user", "checkpoint": "mgca_r50", "values": [0.481]}]}
        for name, data in (("checkpoints", checkpoints), ("p_table1", table1), ("p_table2", table2),
                           ("thread", thread)):
            (folder / f"{name}.json").write_text(json.dumps(data))
        return folder

    return plant


@pytest.fixture
def ledger_record():
    """``ledger_record(dice, seed, *, task="siim_seg", frac=0.01, half=0.02, sha256="c" * 64, name="mgca",
    adapter="mgca", path="resnet_50.ckpt")`` → a valid record of a paper-profile segmentation run with a Dice
    bootstrap CI of ± ``half``."""
    from vlpbench import results

    def build(dice: float, seed: int, *, task: str = "siim_seg", frac: float = 0.01, half: float = 0.02,
              sha256: str = "c" * 64, name: str = "mgca", adapter: str = "mgca", path: str = "resnet_50.ckpt") -> dict:
        return results.make_record(
            model={"name": name, "adapter": adapter, "checkpoint": {"path": path, "sha256": sha256}},
            task={"name": task, "version": 1, "protocol": "segmentation", "profile": "paper"},
            frac=frac, seed=seed, split={"dataset": task.split("_")[0], "version": "v1", "sha256": LEDGER_SPLIT},
            metrics={"dice": dice}, primary_metric="dice", n={"train": 10, "val": 5, "test": 20},
            config={"overrides": {}}, timing={}, ci={"dice": {"low": dice - half, "high": dice + half}},
            data={"synthetic": False})

    return build
