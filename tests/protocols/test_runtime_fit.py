"""The epoch loop shared by the training protocols (``runtime.fit``): which epochs run, which epoch is
selected, what is restored, and when a diverged loss stops the run.

Before ``fit`` each protocol had its own loop. Their selection and stopping rules, transcribed below as
``old_*`` from that code, are what ``fit`` must reproduce:

- segmentation, linear (``_fit``) and finetune with ``select_on: loss``: ``val_loss < best`` starting
  from +inf (finetune wrote it ``-val_loss > best`` from -inf): the lowest validation loss, a tie keeps
  the earlier epoch.
- finetune with ``select_on: auc``: ``val_auc > best`` from -inf: the highest validation AUC, a tie keeps
  the earlier epoch.
- detection: ``score > best or no state yet``, an undefined mAP (None) scored -inf: the first epoch is
  always taken, then a strictly higher mAP.
- all four: after epoch ``e`` (1-based), stop when ``e - best_epoch >= patience``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from vlpbench.errors import ConfigError
from vlpbench.protocols.runtime import (
    LOWEST_VAL_LOSS,
    EpochLosses,
    FitResult,
    NonFiniteLossError,
    Selection,
    check_finite,
    fit,
    state_copy,
)

HIGHEST_AUC = Selection("val_auc", "max")


def _fit(values: list, *, select: Selection = LOWEST_VAL_LOSS, patience: int, max_epochs: int | None = None,
         train_losses: list | None = None) -> tuple[FitResult, list[int]]:
    """``fit`` on fixed per-epoch values of ``select.key`` (and ``val_loss`` 0.5 when that is not the key).

    The "weights" are the number of the epoch that last trained; returns the result and what was restored.
    """
    weights = {"epoch": 0}
    restored: list[int] = []
    train_losses = train_losses or [1.0] * len(values)

    def train_epoch(epoch: int) -> float:
        weights["epoch"] = epoch
        return train_losses[epoch - 1]

    def validate(epoch: int) -> dict:
        return {"val_loss": 0.5, select.key: values[epoch - 1]}

    result = fit(train_epoch, validate, max_epochs=max_epochs or len(values), patience=patience, select=select,
                 snapshot=lambda: weights["epoch"], restore=restored.append, progress=False)
    return result, restored


# --- the old loops, transcribed (see the module docstring) ------------------------------------------------


def old_lowest_loss(losses: list[float], max_epochs: int, patience: int) -> tuple[int, int, float]:
    """segmentation.run_segmentation and linear._fit: (epochs run, best epoch, best loss)."""
    best_loss, best_epoch = math.inf, -1
    for epoch in range(max_epochs):
        if losses[epoch] < best_loss:
            best_loss, best_epoch = losses[epoch], epoch + 1
        if epoch + 1 - best_epoch >= patience:
            break
    return epoch + 1, best_epoch, best_loss


def old_finetune(values: list[float], max_epochs: int, patience: int, select_on: str) -> tuple[int, int, float]:
    """finetune.run_finetune_task: ``values`` are AUCs (select_on auc) or losses (select_on loss)."""
    best_score, best_epoch = -math.inf, -1
    for epoch in range(max_epochs):
        score = values[epoch] if select_on == "auc" else -values[epoch]
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
        if epoch + 1 - best_epoch >= patience:
            break
    return epoch + 1, best_epoch, best_score if select_on == "auc" else -best_score


def old_detection(maps: list[float | None], max_epochs: int, patience: int) -> tuple[int, int, float]:
    """detection.run_detection: ``maps`` are the validation mAPs, None where undefined."""
    best_score, best_epoch, state = -math.inf, -1, None
    for epoch in range(max_epochs):
        score = -math.inf if maps[epoch] is None else maps[epoch]
        if score > best_score or state is None:
            best_score, best_epoch, state = score, epoch + 1, "snapshot"
        if epoch + 1 - best_epoch >= patience:
            break
    return epoch + 1, best_epoch, best_score


# --- fixed sequences ---------------------------------------------------------------------------------------


def test_lowest_loss_keeps_the_earlier_epoch_on_a_tie_and_counts_patience_from_it():
    # Segmentation / linear / finetune select_on loss. Epoch 3 ties epoch 2, so epoch 2 stays the best and
    # epoch 4 is the second epoch without improvement: with patience 2 the run stops there.
    losses = [0.9, 0.7, 0.7, 0.8, 0.6, 0.5]
    result, restored = _fit(losses, patience=2)
    assert (result.epochs, result.best_epoch, result.best_value) == (4, 2, 0.7)
    assert restored == [2]
    assert old_lowest_loss(losses, 6, 2) == (4, 2, 0.7) == old_finetune(losses, 6, 2, "loss")


def test_lowest_loss_runs_to_max_epochs_while_it_keeps_improving_within_patience():
    losses = [0.9, 0.7, 0.7, 0.8, 0.6, 0.65, 0.66]
    result, restored = _fit(losses, patience=3)
    assert (result.epochs, result.best_epoch, result.best_value, restored) == (7, 5, 0.6, [5])
    assert old_lowest_loss(losses, 7, 3) == (7, 5, 0.6)


def test_patience_one_stops_after_the_first_epoch_without_improvement():
    result, restored = _fit([0.5, 0.6, 0.4], patience=1)
    assert (result.epochs, result.best_epoch, restored) == (2, 1, [1])
    assert old_lowest_loss([0.5, 0.6, 0.4], 3, 1) == (2, 1, 0.5)


def test_highest_auc_keeps_the_earlier_epoch_on_a_tie():
    # Finetune select_on auc.
    aucs = [0.60, 0.70, 0.70, 0.65, 0.72, 0.71, 0.70]
    result, restored = _fit(aucs, select=HIGHEST_AUC, patience=2)
    assert (result.epochs, result.best_epoch, result.best_value, restored) == (4, 2, 0.70, [2])
    result, restored = _fit(aucs, select=HIGHEST_AUC, patience=3)
    assert (result.epochs, result.best_epoch, result.best_value, restored) == (7, 5, 0.72, [5])
    assert old_finetune(aucs, 7, 2, "auc") == (4, 2, 0.70)
    assert old_finetune(aucs, 7, 3, "auc") == (7, 5, 0.72)


def test_detection_takes_the_first_epoch_even_with_an_undefined_map_then_a_strictly_higher_one():
    maps = [None, None, 0.2, 0.2, 0.1, None]
    select = Selection("val_map", "max")
    result, restored = _fit(maps, select=select, patience=2)
    assert (result.epochs, result.best_epoch, result.best_value, restored) == (5, 3, 0.2, [3])
    assert old_detection(maps, 6, 2) == (5, 3, 0.2)
    result, restored = _fit([None, None, None], select=select, patience=5)
    assert (result.epochs, result.best_epoch, result.best_value, restored) == (3, 1, -math.inf, [1])
    assert old_detection([None, None, None], 3, 5) == (3, 1, -math.inf)


def test_a_nan_metric_counts_as_the_worst_value():
    result, _ = _fit([math.nan, 0.6, math.nan, 0.5], select=HIGHEST_AUC, patience=3)
    assert (result.epochs, result.best_epoch, result.best_value) == (4, 2, 0.6)
    result, _ = _fit([0.5, math.nan, 0.6], select=HIGHEST_AUC, patience=3)
    assert result.best_epoch == 3


@pytest.mark.parametrize("rule", ["lowest loss", "finetune auc", "finetune loss", "detection"])
def test_fit_matches_the_old_loop_on_random_sequences_with_ties(rule):
    rng = random.Random(rule)
    for _ in range(300):
        max_epochs, patience = rng.randint(1, 12), rng.randint(1, 4)
        # Few distinct values, so that ties are frequent.
        values = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(max_epochs)]
        if rule == "lowest loss":
            expected = old_lowest_loss(values, max_epochs, patience)
            select = LOWEST_VAL_LOSS
        elif rule == "finetune loss":
            expected = old_finetune(values, max_epochs, patience, "loss")
            select = LOWEST_VAL_LOSS
        elif rule == "finetune auc":
            expected = old_finetune(values, max_epochs, patience, "auc")
            select = HIGHEST_AUC
        else:
            values = [None if rng.random() < 0.3 else v for v in values]
            expected = old_detection(values, max_epochs, patience)
            select = Selection("val_map", "max")
        result, restored = _fit(values, select=select, patience=patience)
        assert (result.epochs, result.best_epoch, result.best_value) == expected, (values, patience)
        assert restored == [result.best_epoch]


# --- history, snapshot, divergence --------------------------------------------------------------------------


def test_history_holds_epoch_train_loss_and_the_validation_values_in_order():
    aucs = [0.6, 0.7]
    result, _ = _fit(aucs, select=HIGHEST_AUC, patience=5, train_losses=[0.9, 0.8])
    assert result.history == [{"epoch": 1, "train_loss": 0.9, "val_loss": 0.5, "val_auc": 0.6},
                              {"epoch": 2, "train_loss": 0.8, "val_loss": 0.5, "val_auc": 0.7}]
    assert [list(entry) for entry in result.history] == [["epoch", "train_loss", "val_loss", "val_auc"]] * 2


def test_the_module_ends_with_the_best_epochs_weights():
    model = torch.nn.Linear(2, 1)
    losses = [0.5, 0.3, 0.4, 0.6]

    def train_epoch(epoch: int) -> float:
        with torch.no_grad():
            model.weight.fill_(float(epoch))  # in place: a snapshot that shared storage would change too
        return 1.0

    result = fit(train_epoch, lambda epoch: {"val_loss": losses[epoch - 1]}, max_epochs=4, patience=2,
                 snapshot=lambda: state_copy(model.state_dict()), restore=model.load_state_dict, progress=False)
    assert (result.epochs, result.best_epoch) == (4, 2)
    assert torch.equal(model.weight, torch.full((1, 2), 2.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_training_loss_stops_the_run_before_validation(bad):
    validated: list[int] = []

    def validate(epoch: int) -> dict:
        validated.append(epoch)
        return {"val_loss": 0.5}

    losses = [1.0, 0.9, bad, 0.8]
    with pytest.raises(NonFiniteLossError, match=rf"training loss became {bad} at epoch 3;.*--set lr=\.\.\."):
        fit(lambda epoch: losses[epoch - 1], validate, max_epochs=4, patience=5, snapshot=lambda: None,
            restore=lambda state: None, progress=False)
    assert validated == [1, 2]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_validation_loss_stops_the_run_naming_the_epoch_and_the_options(bad):
    restored: list = []
    with pytest.raises(NonFiniteLossError,
                       match=rf"validation loss became {bad} at epoch 2;.*--set lr=\.\.\. / lr_1pct=\.\.\."):
        fit(lambda epoch: 1.0, lambda epoch: {"val_loss": [0.5, bad][epoch - 1]}, max_epochs=3, patience=5,
            snapshot=lambda: "weights", restore=restored.append, lr_options=("lr", "lr_1pct"), progress=False)
    assert restored == []


def test_an_unchecked_validation_value_may_be_undefined():
    # Detection's mAP is None on a validation part without a detection; only the loss is checked.
    result, _ = _fit([None, 0.1], select=Selection("val_map", "max"), patience=5)
    assert [entry["val_map"] for entry in result.history] == [None, 0.1]


def test_max_epochs_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="max_epochs=0"):
        _fit([], patience=1, max_epochs=0)


def test_selection_mode_must_be_min_or_max():
    with pytest.raises(ValueError, match="'lowest'"):
        Selection("val_loss", "lowest")


def test_an_epochs_losses_read_once_give_the_step_by_step_total_and_name_the_first_bad_step():
    rng = np.random.default_rng(0)
    losses = torch.from_numpy(rng.random(2001).astype(np.float32))
    weights = rng.integers(1, 17, len(losses))
    step_by_step, kept = 0.0, EpochLosses()
    for step, (loss, weight) in enumerate(zip(losses, weights), 1):  # what a loop summing check_finite computes
        step_by_step += check_finite(loss, 1, step) * int(weight)
        kept.add(loss, int(weight))
    assert len(kept) == 2001 and kept.total(1) == step_by_step  # bit for bit
    bad = EpochLosses()
    for value in (0.5, 0.25, float("inf"), 1.0, float("nan")):
        bad.add(torch.tensor(value))
    with pytest.raises(NonFiniteLossError, match="training loss became inf at epoch 4, step 3;"):
        bad.total(4)
    assert EpochLosses().total(1) == 0.0
