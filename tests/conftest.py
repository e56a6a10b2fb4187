"""Shared fixtures: a synthetic SIIM dataset, random-init checkpoints (G2D's encoder layout, a torchvision
ResNet-18), and a lower-is-better metric."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One pytest worker per core: a second intra-op thread per worker only oversubscribes the cores, and
    # subprocesses the tests start (CLI runs, torchrun) inherit the limit.
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Image caches and derived splits go to a temporary folder, never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
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
