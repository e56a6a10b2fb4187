"""Full fine-tuning for classification (KAD's ChestX-ray14 protocol, which G2D's Table 3 follows).

Every parameter trains: the adapter's encoder (BatchNorm in training mode) and a linear layer over
the global average pool of its deepest feature map, with BCE-with-logits over the labels, AdamW
(lr 1e-4, batch 64), 256-pixel input and up to 50 epochs; the test set is scored with the weights of
the best validation epoch. KAD publishes no fine-tuning code: the training augmentation (horizontal
flip, and scale +-10 % / rotation +-10 degrees with probability 0.5), the weight decay and the
early-stopping patience are vlpbench's choices, recorded in the task YAML. The best epoch is the one
with the highest validation macro AUC (``select_on: auc``, KAD keeps its best-AUC model) or the
lowest validation loss (``select_on: loss``).

``eval_batch_size`` sets the images per validation and test forward pass: ``auto`` (default) fills the
device (:mod:`vlpbench.protocols.batch_fill`; on a CPU it is the training batch). Memory and speed only:
the logits are per image, the loss and AUC are taken over all of them.

Under torchrun (:mod:`vlpbench.distributed`) the run computes what one process computes: every rank
draws the same permutation and augmentation of each global batch of ``batch_size`` images and trains
on its contiguous ``batch_size / world_size`` of it (the effective batch stays ``batch_size``); the
model is wrapped in DistributedDataParallel, whose gradient average of the per-rank mean losses is the
gradient of the global batch's mean loss, and BatchNorm normalises with the statistics of the global
batch (:class:`~vlpbench.distributed.GlobalBatchNorm2d`). Each rank predicts its block of whole
validation and test batches and the logits are gathered in image order, so the validation loss and
AUC, hence the selected epoch, and the test metrics are the same on every rank. What remains different
is the order of floating-point sums, whose rounding AdamW amplifies over training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vlpbench import distributed
from vlpbench.errors import ConfigError, DataError
from vlpbench.metrics.classification import macro_auc
from vlpbench.protocols import SplitIds
from vlpbench.protocols.batch_fill import inference_batch, probing
from vlpbench.protocols.features import (
    as_unit_float,
    channel_values,
    load_images,
    normalize,
    pool_description,
    pooled,
    pooled_channels,
    uint8_pixels,
)
from vlpbench.protocols.prefetch import prefetch
from vlpbench.predictions import write_probabilities
from vlpbench.protocols.classification import class_counts, evaluate_classification, metric_names
from vlpbench.protocols.labels import class_names, label_kind, task_labels
from vlpbench.protocols.linear import (
    LinearProtocol,
    check_known,
    check_schedule,
    default_metrics,
    loss_function,
    output_size,
    probabilities,
    seeded_head,
    targets,
)
from vlpbench.protocols.runtime import (
    LOWEST_VAL_LOSS,
    EpochLosses,
    Selection,
    fit,
    neck_of,
    precision_of,
    prepare_model,
    state_copy,
)
from vlpbench.protocols.segmentation import random_affine

log = logging.getLogger("vlpbench")

SELECT_ON = ("auc", "loss")
FLIP_P = 0.5
AFFINE_P, SCALE_LIMIT, ROTATE_DEG = 0.5, 0.1, 10.0


class Classifier(torch.nn.Module):
    """Encoder → its pooled feature (global average of the deepest map; a ViT's class or mean token) → linear."""

    def __init__(self, encoder: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled(self.encoder, x))


def augment_draws(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of :func:`augment` for ``batch`` images: which to flip ``(B,)`` and the affine matrices
    ``(B, 2, 3)``, from ``generator`` in that order."""
    flip = torch.rand(batch, generator=generator) < FLIP_P
    return flip, random_affine(batch, SCALE_LIMIT, ROTATE_DEG, AFFINE_P, generator)


def augmented(images01: torch.Tensor, flip: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``(B, 1, S, S)`` images flipped where ``flip``, then resampled through ``theta`` (zero fill)."""
    images01 = torch.where(flip.view(-1, 1, 1, 1).to(images01.device), images01.flip(-1), images01)
    grid = F.affine_grid(theta.to(images01.device), list(images01.shape), align_corners=False)
    return F.grid_sample(images01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment(images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of ``(B, 1, S, S)`` images: horizontal flip (p 0.5), then scale +-10 %
    and rotation +-10 degrees (p 0.5), zero fill, as the segmentation protocol's affine."""
    return augmented(images01, *augment_draws(len(images01), generator))


def train_batches(images: np.ndarray, batch_size: int, augment_images: bool, generator: torch.Generator,
                  device: torch.device) -> Iterator[tuple[np.ndarray, torch.Tensor, tuple | None]]:
    """One epoch's training batches, prepared on the host ahead of the loop (:mod:`vlpbench.protocols.prefetch`):
    per global batch of ``batch_size`` (the last incomplete one dropped), its image indices (sorted: memory-map
    reads in file order), their uint8 pixels and the augmentation's draws (:func:`augment_draws`; None: not
    augmented), drawn for the global batch so that every rank's generator stays in step."""
    order = torch.randperm(len(images), generator=generator).numpy()

    def prepare(step: int) -> tuple[np.ndarray, torch.Tensor, tuple | None]:
        index = np.sort(order[step * batch_size:(step + 1) * batch_size])
        draws = augment_draws(batch_size, generator) if augment_images else None
        return index, uint8_pixels(images, index, device), draws

    return prefetch(prepare, range(len(images) // batch_size), device)


def train_epoch(model: torch.nn.Module, stepped: torch.nn.Module, images: np.ndarray, train_targets: torch.Tensor,
                *, optimizer: torch.optim.Optimizer, loss_fn, inputs, batch_size: int, augment_images: bool,
                generator: torch.Generator, device: torch.device, epoch: int) -> float:
    """One epoch over :func:`train_batches`, the mean training loss; ``stepped`` is ``model`` or its
    DistributedDataParallel wrapper, which trains on this rank's equal share of each global batch; ``inputs``
    normalises images in [0, 1] for the encoder."""
    model.train()
    ranks, steps = distributed.world_size(), len(images) // batch_size
    losses = EpochLosses()  # read once per epoch: the host queues the next steps meanwhile
    for step, (index, pixels, draws) in enumerate(train_batches(images, batch_size, augment_images, generator,
                                                                device)):
        x = as_unit_float(pixels, device)
        if draws is not None:
            x = augmented(x, *draws)
        mine = distributed.shard(np.arange(batch_size))  # this rank's equal share of the global batch
        loss = loss_fn(stepped(inputs(x[mine])), train_targets[torch.from_numpy(index[mine]).to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.add(loss)
    return distributed.all_reduce_sum([losses.total(epoch)])[0] / ranks / steps  # equal shares: mean of the means


def run_finetune_task(adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int,
                      device: torch.device, progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
    """Fine-tune the adapter's encoder with a linear head on ``split.train``, select the epoch on
    ``split.val``, score ``split.test`` (entry point of protocol ``finetune``).

    Raises:
        ConfigError: an unknown ``select_on`` or ``label_kind``, or a bad ``mean`` / ``std``.
        DataError: fewer training images than one batch, no validation or test images, or (with
            ``select_on: auc``) no class with both labels among the validation images.
    """
    started = time.perf_counter()
    kind = label_kind(config)
    if config["select_on"] not in SELECT_ON:
        raise ConfigError(f"select_on={config['select_on']!r}: expected one of {', '.join(SELECT_ON)}")
    mean, std = channel_values(config["mean"], "mean"), channel_values(config["std"], "std")
    check_schedule(config)
    size, batch_size = int(config["image_size"]), int(config["batch_size"])
    split.require_training(batch_size)
    ranks = distributed.world_size()
    if batch_size % ranks:
        raise ConfigError(f"batch_size={batch_size} does not split evenly among {ranks} processes: use a "
                          f"multiple of {ranks} (each process trains on batch_size / {ranks} images)")
    classes = class_names(config)
    labels = {part: task_labels(source, getattr(split, part), config) for part in ("train", "val", "test")}
    check_known(labels)
    if config["select_on"] == "auc" and not _auc_defined(kind, labels["val"]):
        raise DataError("no class has both labels among the validation images, so the validation AUC that "
                        "selects the epoch is undefined; use more data or --set select_on=loss")
    with distributed.main_first():  # rank 0 fills the image cache, the others then read it
        images = {part: load_images(source, getattr(split, part), size, progress)
                  for part in ("train", "val", "test")}
    log.info("finetune: %d train, %d val, %d test images at %dpx; %s over %d class(es)", len(split.train),
             len(split.val), len(split.test), size, kind, len(classes))
    t_data = time.perf_counter()

    encoder = adapter.encoder()
    if (neck := neck_of(encoder)) is not None:
        neck.requires_grad_(False)  # a ViT's dense-task neck: the pooled classifier never runs it
    model = prepare_model(Classifier(encoder, seeded_head(pooled_channels(encoder),
                                                          output_size(kind, labels["train"], classes), seed)),
                          device, precision_of(config))
    stepped = model
    if distributed.is_active():
        distributed.global_batchnorm(model)
        # DDP starts every rank from rank 0's weights; global BatchNorm keeps the buffers equal after that.
        stepped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    loss_fn = loss_function(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], betas=tuple(config["betas"]),
                                  weight_decay=config["weight_decay"])
    generator = torch.Generator().manual_seed(seed)
    train_targets = targets(kind, labels["train"], device)

    def inputs(x01: torch.Tensor) -> torch.Tensor:
        return normalize(x01, mean, std)

    def one_epoch(epoch: int) -> float:
        return train_epoch(model, stepped, images["train"], train_targets, optimizer=optimizer, loss_fn=loss_fn,
                           inputs=inputs, batch_size=batch_size, augment_images=bool(config["augment"]),
                           generator=generator, device=device, epoch=epoch)

    # Validation and test batches sized to fill the device (vlpbench.protocols.batch_fill).
    eval_batch = inference_batch(config, "eval_batch_size", device=device, fallback=batch_size,
                                 limit=max(len(split.val), len(split.test)),
                                 probe=lambda count: _probe(model, inputs, count, size, device))

    def validate(epoch: int) -> dict[str, float | None]:
        logits = eval_batch.run(lambda count: _predict(model, images["val"], inputs, count, device))
        return {"val_loss": loss_fn(logits, targets(kind, labels["val"], device)).item(),
                "val_auc": _auc(kind, labels["val"], probabilities(kind, logits))}

    # The first epoch, then any with a strictly higher validation AUC or strictly lower validation loss.
    fitted = fit(one_epoch, validate, max_epochs=int(config["max_epochs"]), patience=int(config["patience"]),
                 select=Selection("val_auc", "max") if config["select_on"] == "auc" else LOWEST_VAL_LOSS,
                 snapshot=lambda: state_copy(model.state_dict()), restore=model.load_state_dict, progress=progress)
    t_train = time.perf_counter()

    probs = probabilities(kind, eval_batch.run(lambda count: _predict(model, images["test"], inputs, count, device)))
    if predictions is not None and distributed.is_main():
        write_probabilities(predictions, classes, dict(zip(split.test, probs)))
    evaluated = evaluate_classification(kind, classes, split.test, labels["test"], probs,
                                        metric_names(config, default_metrics(kind)), thresholds=None,
                                        n_resamples=int(config["bootstrap_resamples"]), seed=seed)
    t_test = time.perf_counter()
    return {
        **evaluated,
        "n": {"train": len(split.train), "val": len(split.val), "test": len(split.test),
              "test_per_class": class_counts(kind, labels["test"], classes)},
        "training": {"pool": pool_description(adapter), "epochs": fitted.epochs, "best_epoch": fitted.best_epoch,
                     "select_on": config["select_on"],
                     "best_val": fitted.best_value, "history": fitted.history, "world_size": ranks,
                     "batch_per_process": batch_size // ranks, "effective_batch": batch_size,
                     "inference_batch": eval_batch.describe()},
        "timing": {"data_s": t_data - started, "train_s": t_train - t_data, "test_s": t_test - t_train,
                   "total_s": t_test - started},
    }


class FinetuneProtocol(LinearProtocol):
    """Full fine-tuning with a linear head (module docstring); scored like the linear probe."""

    name = "finetune"

    def run(self, adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int, device: torch.device,
            progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
        """:func:`run_finetune_task`."""
        return run_finetune_task(adapter, source, split, config, seed=seed, device=device, progress=progress,
                                 predictions=predictions)


PROTOCOL = FinetuneProtocol()


def _auc_defined(kind: str, labels: np.ndarray) -> bool:
    """Whether some class has both labels (two classes present, for a multi-class task)."""
    if kind == "multiclass":
        return len(np.unique(labels)) > 1
    return any(len(np.unique(labels[:, k])) == 2 for k in range(labels.shape[1]))


def _auc(kind: str, labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Validation macro AUC (one-vs-rest for a multi-class task), None when no class defines one."""
    if kind == "multiclass":
        labels = np.eye(probs.shape[1], dtype=int)[labels]
    return macro_auc(labels, probs)[0]


def _probe(model: torch.nn.Module, inputs, count: int, side: int, device: torch.device) -> None:
    """The classifier on ``count`` blank ``side``-pixel images (the memory probe of
    :func:`~vlpbench.protocols.batch_fill.inference_batch`)."""
    with probing(model):
        model(inputs(torch.zeros(count, 1, side, side, device=device)))


@torch.inference_mode()
def _predict(model: torch.nn.Module, images: np.ndarray, inputs, batch_size: int,
             device: torch.device) -> torch.Tensor:
    """Logits of every image, in eval mode, on ``device``; under torchrun each rank predicts its block of
    whole batches and the logits of all images are gathered in image order on every rank."""
    model.eval()
    first, stop = distributed.batch_block(len(images), batch_size)
    read = prefetch(lambda start: uint8_pixels(images, np.arange(start, min(start + batch_size, stop)), device),
                    range(first, stop, batch_size), device)
    out = [model(inputs(as_unit_float(pixels, device))).float() for pixels in read]
    if not distributed.is_active():
        return torch.cat(out)
    local = torch.cat(out).cpu().numpy() if out else np.empty((0, model.head.out_features), dtype=np.float32)
    return torch.from_numpy(distributed.gather_arrays(local)).to(device)
