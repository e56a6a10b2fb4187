"""A linear-probe sweep passes each image through the encoder once: two training fractions x two seeds, in
either order, on a tiny encoder that counts what it sees; and the lbfgs head, which takes no seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlpbench.data.base import DatasetReader
from vlpbench.protocols import SplitIds
from vlpbench.protocols.linear import run_linear_task
from vlpbench.tasks import load_task

SIZE = 16
N_TRAIN, N_VAL, N_TEST = 32, 12, 12


class Films(DatasetReader):
    """In-memory binary "pneumonia" images: the positives are brighter."""

    root = Path("films")
    synthetic = True
    classes = ("pneumonia",)

    def __init__(self, n: int):
        self.ids = [f"film{k:03d}" for k in range(n)]

    @property
    def image_ids(self) -> list[str]:
        return self.ids

    def fingerprint(self) -> str:
        return "films-v1"

    def positive(self, image_id: str) -> bool:
        return int(image_id[4:]) % 3 == 0

    def image(self, image_id: str) -> np.ndarray:
        rng = np.random.default_rng(int(image_id[4:]))
        return rng.integers(0, 160, size=(SIZE, SIZE), dtype=np.uint8) + (90 if self.positive(image_id) else 0)

    def class_labels(self, image_id, classes, config) -> list[int]:
        return [int(self.positive(image_id))]

    def unlabelled(self, ids):
        return []

    def missing(self, ids):
        return []


class TinyEncoder(torch.nn.Module):
    """One strided convolution; counts its forward calls and the images they carry."""

    out_channels = (6,)

    def __init__(self, seen: list[int]):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 6, 4, stride=4)
        self.seen = seen

    def forward(self, x):
        self.seen.append(len(x))
        return [torch.relu(self.conv(x))]


class TinyAdapter:
    name, checkpoint_sha256, options, encoder_name = "tiny", "1" * 64, {}, "tiny-conv"

    def __init__(self):
        self.seen: list[int] = []  # images per forward call, over every encoder handed out
        self.built = 0  # encoders handed out

    def encoder(self) -> TinyEncoder:
        self.built += 1
        return TinyEncoder(self.seen)


def _config(**changes):
    return load_task("rsna_cls").resolve({"resize_size": SIZE, "image_size": SIZE, "batch_size": 4, "max_epochs": 2,
                                          "patience": 2, "lr": 0.01, "bootstrap_resamples": 20, **changes})


@pytest.fixture
def films(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPBENCH_CACHE", str(tmp_path / "cache"))  # an empty feature cache
    source = Films(N_TRAIN + N_VAL + N_TEST)
    ids = source.ids
    train, val, test = ids[:N_TRAIN], ids[N_TRAIN:N_TRAIN + N_VAL], ids[N_TRAIN + N_VAL:]
    fractions = {1.0: train, 0.25: train[5:13]}
    return source, fractions, val, test


def _run(adapter, source, fractions, val, test, fraction, seed, **config):
    split = SplitIds(fractions[fraction], val, test, fraction=fraction, train_all=fractions[1.0])
    return run_linear_task(adapter, source, split, _config(**config), seed=seed, device=torch.device("cpu"),
                           progress=False)


@pytest.mark.parametrize("order", [(1.0, 0.25), (0.25, 1.0)], ids=["whole first", "subset first"])
def test_two_fractions_and_two_seeds_encode_each_image_once(films, order):
    source, fractions, val, test = films
    adapter = TinyAdapter()
    states = []
    for fraction in order:
        for seed in (0, 1):
            outcome = _run(adapter, source, fractions, val, test, fraction, seed)
            states.append(outcome["training"]["feature_cache"])
    # Every image of the sweep went through the encoder exactly once: each extraction encodes only the images
    # the store lacks, in one forward call here (fewer than 32 images).
    assert sum(adapter.seen) == N_TRAIN + N_VAL + N_TEST
    if order[0] == 1.0:
        assert adapter.seen == [N_VAL, N_TEST, N_TRAIN]  # one forward call per part, then none
        assert states[0] == {"val": "miss", "test": "miss", "train": "miss"}
        assert all(state == {"val": "hit", "test": "hit", "train": "hit"} for state in states[1:])
    else:
        assert adapter.seen == [N_VAL, N_TEST, 8, N_TRAIN - 8]  # the 1.0 run encodes the 24 images the 0.25 run lacked
        assert states[2]["train"] == f"partial ({N_TRAIN - 8} of {N_TRAIN} encoded)"
        assert states[1] == states[3] == {"val": "hit", "test": "hit", "train": "hit"}


@pytest.mark.parametrize("mode", ["cached", "mgca"])
def test_a_run_builds_its_encoder_once_for_every_part(films, mode):
    source, fractions, val, test = films
    adapter = TinyAdapter()
    _run(adapter, source, fractions, val, test, 1.0, 0, linear_mode=mode, max_epochs=1)
    assert adapter.built == 1
    assert sum(adapter.seen) >= N_VAL + N_TEST + (N_TRAIN if mode == "cached" else 4)  # it encoded every part
    _run(adapter, source, fractions, val, test, 1.0, 1, linear_mode=mode, max_epochs=1)
    # The next run finds the stored features: it builds no encoder, unless it augments the training images.
    assert adapter.built == (1 if mode == "cached" else 2)


def test_the_lbfgs_head_takes_no_seed_and_records_its_penalty(films):
    source, fractions, val, test = films
    adapter = TinyAdapter()
    first, second = (_run(adapter, source, fractions, val, test, 1.0, seed, head_solver="lbfgs") for seed in (0, 3))
    training = first["training"]
    assert training["head_solver"] == "lbfgs" and "epochs" not in training
    grid = training["l2_grid"]
    assert len(grid) == 9 and training["l2"] in [row["l2"] for row in grid]
    assert training["best_val_loss"] == min(row["val_loss"] for row in grid)
    assert second["training"]["l2_grid"] == grid and second["metrics"]["auc"] == first["metrics"]["auc"]
    assert first["metrics"]["auc"] > 0.9  # brightness is one direction of the pooled features
