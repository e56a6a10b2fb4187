"""Segmentation protocol: a U-Net decoder trained on a frozen encoder, scored by per-image Dice.

This is MGCA's downstream segmentation (which G2D follows): smp U-Net on ResNet-50 features, the
encoder frozen, loss ``10 * focal - log(soft Dice)``, AdamW, early stopping on validation loss, and
the test set scored with the best-validation weights. Where MGCA's code has a quirk (BatchNorm
statistics drifting in the "frozen" encoder, Dice averaged over batch means, Dice on resized masks)
the canonical choice here differs and the quirk is a config option (see the task YAML).

Under torchrun (:mod:`vlpbench.distributed`) the run is shared so that it computes what one process
computes: every rank draws the same permutation and augmentation of each global batch of
``batch_size`` images and trains on its contiguous ``batch_size / world_size`` of it (the effective
batch stays ``batch_size``); the decoder is wrapped in DistributedDataParallel; the loss's sums and
the BatchNorm statistics are taken over the whole global batch (:func:`vlpbench.distributed.
differentiable_sum`, :class:`~vlpbench.distributed.GlobalBatchNorm2d`), so the gradient is the
single-process one; the validation batches are split among ranks and their loss totals summed, so
every rank early-stops on the same epoch; each rank scores its block of test batches and the
per-image Dice is gathered in test order before the mean and the CI. What remains different is the
order of floating-point sums, whose rounding AdamW amplifies over training: the losses agree to about
1e-6 at the first step and drift apart (about 1e-3 relative after one epoch on a tiny synthetic set).
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from vlpbench import distributed
from vlpbench.data.cache import cached_images
from vlpbench.errors import ConfigError, VlpbenchError
from vlpbench.protocols import SplitIds
from vlpbench.protocols.runtime import (
    LOWEST_VAL_LOSS,
    check_finite,
    fit,
    precision_of,
    prepare_model,
    state_copy,
    to_device,
)
from vlpbench.metrics.bootstrap import bootstrap_ci
from vlpbench.metrics.dice import dice_per_image
from vlpbench.predictions import find_masks, read_prediction_mask, write_mask
from vlpbench.protocols import base

log = logging.getLogger("vlpbench")


class SegmentationSource(Protocol):
    """What the protocol needs from a dataset reader."""

    def image(self, image_id: str) -> np.ndarray: ...  # uint8 (H, W)
    def mask(self, image_id: str) -> np.ndarray: ...  # 0/1 (H, W), same size as the image
    def label(self, image_id: str) -> int: ...


class Images:
    """Images and soft masks of one split part at the protocol's input size.

    The images come from the image cache (decoded once per dataset, id and size, then memory-mapped);
    the masks are decoded and resized here.
    """

    def __init__(self, source: SegmentationSource, ids: list[str], size: int, desc: str, progress: bool):
        self.ids = list(ids)
        # Readers live in vlpbench.data.<dataset>, so the module's name is the cache's dataset name.
        dataset = type(source).__module__.rpartition(".")[2]
        cached = cached_images(source, dataset, self.ids, size, progress=progress)
        self.images = torch.from_numpy(np.array(cached))  # a private writable copy in memory
        self.masks = torch.empty((len(ids), size, size), dtype=torch.float32)

        def load(index: int) -> None:
            self.masks[index] = torch.from_numpy(resize_mask(source.mask(self.ids[index]), size))

        # Pillow's resize releases the GIL, so threads overlap part of the work.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(tqdm(pool.map(load, range(len(ids))), total=len(ids), desc=f"masks {desc}",
                      disable=not progress, leave=False, unit="img"))

    def __len__(self) -> int:
        return len(self.ids)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """0/1 mask → soft ``size``² mask by area averaging (as MGCA's INTER_AREA resize; not re-binarised)."""
    image = Image.fromarray(mask.astype(np.float32))
    return np.asarray(image.resize((size, size), Image.BOX), dtype=np.float32).clip(0.0, 1.0)


def mixed_loss(logits: torch.Tensor, target: torch.Tensor, focal_weight: float, gamma: float, *,
               across_ranks: bool = False) -> torch.Tensor:
    """MGCA's MixedLoss: ``focal_weight * focal(gamma) - log(soft Dice over the whole batch)``.

    ``across_ranks``: the batch is split among the ranks of a distributed run; the focal mean and the
    soft Dice are taken over all ranks' parts (the same value on every rank, differentiable).
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    # (1 - p_t)^gamma written through logsigmoid so that it stays finite and accepts soft targets.
    modulation = torch.exp(gamma * F.logsigmoid(-logits * (2.0 * target - 1.0)))
    probs = torch.sigmoid(logits)
    if not across_ranks:
        focal = (modulation * bce).mean()
        soft_dice = (2.0 * (probs * target).sum() + 1.0) / (probs.sum() + target.sum() + 1.0)
        return focal_weight * focal - torch.log(soft_dice)
    sums = distributed.differentiable_sum(torch.stack([
        (modulation * bce).sum(), (probs * target).sum(), probs.sum(), target.sum(),
        torch.tensor(float(logits.numel()), device=logits.device)]))
    soft_dice = (2.0 * sums[1] + 1.0) / (sums[2] + sums[3] + 1.0)
    return focal_weight * sums[0] / sums[4] - torch.log(soft_dice)


def random_affine(batch: int, scale_limit: float, rotate_deg: float, p: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Affine matrices for albumentations-style ShiftScaleRotate(shift 0); identity with prob 1 - p."""
    apply = torch.rand(batch, generator=generator) < p
    scale = 1.0 + (torch.rand(batch, generator=generator) * 2 - 1) * scale_limit
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(rotate_deg)
    scale = torch.where(apply, scale, torch.ones_like(scale))
    angle = torch.where(apply, angle, torch.zeros_like(angle))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # grid maps output → input
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    return theta


# smp's default U-Net decoder widths, deepest first (MGCA and G2D use the 5-stage default).
_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class UNet(torch.nn.Module):
    """smp U-Net (1 class) around the adapter's encoder; ``encoder_name`` is the adapter's smp encoder name."""

    def __init__(self, encoder: torch.nn.Module, encoder_name: str = "resnet50"):
        super().__init__()
        import segmentation_models_pytorch as smp

        # Build with the same key layout as G2D's published *_encoder_decoder.pth (for "resnet50"), then swap
        # in the adapter's encoder (weights already loaded strictly by the adapter). An encoder that declares
        # fewer stages (MedKLIP ends at layer3, stride 16) gets a decoder with one up-block per stage it has.
        depth = len(encoder.out_channels) - 1
        unet = smp.Unet(encoder_name, encoder_weights=None, in_channels=3, classes=1, activation=None,
                        encoder_depth=depth, decoder_channels=_DECODER_CHANNELS[:depth])
        if tuple(encoder.out_channels) != tuple(unet.encoder.out_channels):
            raise VlpbenchError(f"encoder channels {tuple(encoder.out_channels)} do not match the "
                                f"{encoder_name} U-Net's {tuple(unet.encoder.out_channels)}")
        unet.encoder = encoder
        self.unet = unet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)


def run_segmentation(
    encoder: torch.nn.Module,
    source: SegmentationSource,
    split: SplitIds,
    config: dict[str, Any],
    *,
    seed: int,
    device: torch.device,
    decoder_state: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    encoder_name: str = "resnet50",
    predictions: Path | None = None,
) -> dict[str, Any]:
    """Train the decoder on ``split.train``, early-stop on ``split.val``, score ``split.test``.

    ``encoder_name`` is the smp name of ``encoder``'s architecture; the U-Net decoder is built for it.
    ``predictions``: a folder to save each test image's thresholded mask in (see :mod:`vlpbench.predictions`).

    Returns ``metrics``, ``ci``, ``per_image`` (Dice per test image), ``n``, ``timing`` and
    ``training`` (epochs run, best epoch, loss curves).
    """
    if config["dice_resolution"] not in ("native", "input"):
        raise VlpbenchError(f"dice_resolution must be 'native' or 'input', got {config['dice_resolution']!r}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    size = int(config["image_size"])

    train_ids = list(split.train)
    if config["balance_negatives"]:
        train_ids = balance_negatives(train_ids, source.label, rng)
    if len(train_ids) < config["batch_size"]:
        raise VlpbenchError(f"only {len(train_ids)} training images for batch size {config['batch_size']} "
                            "(training drops the last incomplete batch, as MGCA does)")
    ranks = distributed.world_size()
    if config["batch_size"] % ranks:
        raise ConfigError(f"batch_size={config['batch_size']} does not split evenly among {ranks} processes: "
                          f"use a multiple of {ranks} (each process trains on batch_size / {ranks} images)")
    log.info("segmentation: %d train (%s), %d val, %d test images at %dpx",
             len(train_ids), "balanced" if config["balance_negatives"] else "all",
             len(split.val), len(split.test), size)
    with distributed.main_first():  # rank 0 fills the image cache, the others then read it
        train = Images(source, train_ids, size, "train", progress)
        val = Images(source, split.val, size, "val", progress)
        test = Images(source, split.test, size, "test", progress)
    t_data = time.perf_counter()

    model = UNet(encoder, encoder_name)
    if decoder_state is not None:
        model.unet.load_state_dict({**model.unet.encoder.state_dict(prefix="encoder."), **decoder_state})
    for parameter in model.unet.encoder.parameters():
        parameter.requires_grad_(False)
    prepare_model(model, device, precision_of(config))
    stepped = model
    if distributed.is_active():
        distributed.global_batchnorm(model)
        # Buffers need no broadcast: global BatchNorm keeps them equal on every rank.
        stepped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config["lr"], betas=tuple(config["betas"]),
                                  weight_decay=config["weight_decay"])
    normalize = _normalizer(config["mean"], config["std"])
    loss_fn = _loss(config)
    train_loss_fn = _loss(config, across_ranks=distributed.is_active())

    # Early stopping on the validation loss: the first epoch, then any strictly lower one.
    fitted = fit(
        lambda epoch: _train_epoch(model, stepped, train, optimizer, train_loss_fn, normalize, config, generator,
                                   device, epoch),
        lambda epoch: {"val_loss": _evaluate_loss(model, val, loss_fn, normalize, config["batch_size"], device)},
        max_epochs=int(config["max_epochs"]), patience=int(config["patience"]), select=LOWEST_VAL_LOSS,
        snapshot=lambda: state_copy(model.state_dict()), restore=model.load_state_dict, progress=progress)
    t_train = time.perf_counter()

    scores = distributed.gather_arrays(_test_dice(model, test, source, normalize, config, device, progress,
                                                  predictions))
    t_test = time.perf_counter()
    return {
        **evaluate_segmentation(source, test.ids, scores, n_resamples=int(config["bootstrap_resamples"]), seed=seed),
        "n": {"train": len(train_ids), "val": len(val), "test": len(test)},
        "training": {"epochs": fitted.epochs, "best_epoch": fitted.best_epoch,
                     "best_val_loss": fitted.best_value, "history": fitted.history, "world_size": ranks,
                     "batch_per_process": config["batch_size"] // ranks, "effective_batch": config["batch_size"]},
        "timing": {"data_s": t_data - t0, "train_s": t_train - t_data, "test_s": t_test - t_train,
                   "total_s": t_test - t0},
    }


def evaluate_segmentation(source: SegmentationSource, ids: list[str], scores: np.ndarray, *, n_resamples: int,
                          seed: int) -> dict[str, Any]:
    """``metrics``, ``ci`` and ``per_image`` of the per-image Dice ``scores`` of test images ``ids``: the mean
    Dice with its bootstrap CI, and its two halves (positive images; negatives left empty) beside what an
    all-empty prediction would score, so that a reader can tell "finds pneumothorax" from "predicts nothing
    on a mostly negative test set"."""
    positive = np.array([bool(source.label(i)) for i in ids], dtype=bool)
    return {
        "metrics": {
            "dice": float(scores.mean()),
            "dice_positive": float(scores[positive].mean()) if positive.any() else None,
            "empty_correct": float(scores[~positive].mean()) if (~positive).any() else None,
            "all_empty_baseline": float((~positive).mean()),
        },
        "ci": {"dice": bootstrap_ci(scores, n_resamples=n_resamples, seed=seed)},
        "per_image": {image_id: float(s) for image_id, s in zip(ids, scores)},
    }


class SegmentationProtocol(base.Protocol):
    """U-Net decoder on the frozen encoder, per-image Dice (module docstring)."""

    name = "segmentation"
    table_group = "seg"
    prediction_files = "one <image_id>.png per test image (0/255 at the image's resolution) or .npy probabilities"

    def run(self, adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int, device: torch.device,
            progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
        """The adapter's encoder (and decoder if ``init_decoder``) through :func:`run_segmentation`."""
        decoder_state = None
        if config["init_decoder"]:
            decoder_state = adapter.decoder_state_dict()
            if decoder_state is None:
                raise VlpbenchError(f"init_decoder=true needs a checkpoint with a U-Net decoder (G2D's "
                                    f"*_encoder_decoder.pth); {adapter.name} loaded layout {adapter.report.layout!r}")
        return run_segmentation(adapter.encoder(), source, split, config, seed=seed, device=device,
                                decoder_state=decoder_state, progress=progress, encoder_name=adapter.encoder_name,
                                predictions=predictions)

    def score(self, predictions: Path, source, split: SplitIds, config: dict[str, Any], *,
              seed: int = 0) -> dict[str, Any]:
        """Per-image Dice of each saved mask against the full-resolution ground truth of ``split.test``, at
        the task's ``threshold``; evaluated by :func:`evaluate_segmentation` as ``run`` does."""
        threshold = config["threshold"]
        ids = list(split.test)
        found = find_masks(Path(predictions), ids)
        scores = np.empty(len(ids))
        for index, image_id in enumerate(ids):
            truth = source.mask(image_id)
            prediction = read_prediction_mask(found[image_id], truth.shape)
            scores[index] = dice_per_image(prediction[None], torch.from_numpy(truth)[None], threshold)[0]
        outcome = evaluate_segmentation(source, ids, scores, n_resamples=int(config["bootstrap_resamples"]), seed=seed)
        notes = []
        if config["dice_resolution"] != "native":
            notes.append("Dice at the images' native resolution: the run scored resized masks "
                         f"(dice_resolution={config['dice_resolution']}), so its Dice differs")
        return {**outcome, "n": {"train": 0, "val": 0, "test": len(ids)},
                "scoring": {"threshold": threshold, "notes": notes}}


PROTOCOL = SegmentationProtocol()


def balance_negatives(ids: list[str], label: Callable[[str], int], rng: np.random.Generator) -> list[str]:
    """MGCA's training set: every positive image plus as many randomly chosen negatives."""
    positives = [i for i in ids if label(i)]
    negatives = [i for i in ids if not label(i)]
    keep = min(len(positives), len(negatives))
    chosen = set(rng.choice(len(negatives), size=keep, replace=False).tolist()) if keep else set()
    kept = set(positives) | {negatives[index] for index in chosen}
    return [i for i in ids if i in kept]


def _normalizer(mean: float, std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def normalize(images01: torch.Tensor) -> torch.Tensor:
        # Grey to the 3 channels the encoder expects, then the task's mean/std.
        return ((images01 - mean) / std).expand(-1, 3, -1, -1)

    return normalize


def _loss(config: dict[str, Any], across_ranks: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mixed_loss(logits, target, config["focal_weight"], config["focal_gamma"], across_ranks=across_ranks)

    return loss


def _batch(data: Images, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = to_device(data.images[index].unsqueeze(1), device).float().div_(255.0)
    masks = to_device(data.masks[index].unsqueeze(1), device)
    return images, masks


def _train_epoch(model, stepped, data: Images, optimizer, loss_fn, normalize, config, generator, device,
                 epoch: int) -> float:
    """One epoch; ``stepped`` is ``model`` or its DistributedDataParallel wrapper. Every rank draws the
    whole global batch's order and augmentation (so the generators stay in step) and keeps its block."""
    model.train()
    if config["freeze_bn"]:
        model.unet.encoder.eval()  # frozen means frozen: BatchNorm statistics do not drift
    batch_size = config["batch_size"]
    order = torch.randperm(len(data), generator=generator)
    total, count = 0.0, 0
    for start in range(0, len(data) - batch_size + 1, batch_size):  # drop_last, as MGCA
        images, masks = _batch(data, distributed.shard(order[start:start + batch_size]), device)
        if config["augment"]:
            theta = distributed.shard(random_affine(batch_size, 0.1, 10.0, 0.5, generator)).to(device)
            grid = F.affine_grid(theta, list(images.shape), align_corners=False)
            images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        loss = loss_fn(stepped(normalize(images)), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += check_finite(loss, epoch, start // batch_size + 1) * batch_size
        count += batch_size
    return total / count


def rank_batches(n: int, batch_size: int) -> range:
    """Start indices of this rank's block of the batches of ``range(n)``: the batches are those of a
    single process (so each image meets the same batch mates), split contiguously among ranks."""
    return distributed.shard(range(0, n, batch_size))


@torch.inference_mode()
def _evaluate_loss(model, data: Images, loss_fn, normalize, batch_size: int, device) -> float:
    """Mean over images of the per-batch loss; under torchrun each rank evaluates its batches and the
    totals are summed, so every rank gets the same value."""
    model.eval()
    total = 0.0
    for start in rank_batches(len(data), batch_size):
        images, masks = _batch(data, torch.arange(start, min(start + batch_size, len(data))), device)
        total += loss_fn(model(normalize(images)), masks).item() * len(images)
    return distributed.all_reduce_sum([total])[0] / len(data)


@torch.inference_mode()
def predict_probabilities(model, data: Images, normalize, batch_size: int, device, starts: range | None = None):
    """Yield ``(index, probabilities)`` batches at the input size, on ``device``; ``starts``: the batches'
    first indices (default: every batch)."""
    model.eval()
    for start in range(0, len(data), batch_size) if starts is None else starts:
        index = torch.arange(start, min(start + batch_size, len(data)))
        images, _ = _batch(data, index, device)
        yield index, torch.sigmoid(model(normalize(images)))


def _test_dice(model, data: Images, source: SegmentationSource, normalize, config, device, progress,
               predictions: Path | None = None) -> np.ndarray:
    """Dice of this rank's block of test images (all of them in a single process), in test order."""
    threshold = config["threshold"]
    starts = rank_batches(len(data), config["batch_size"])
    first = starts[0] if starts else 0
    scores = np.empty(min(starts[-1] + config["batch_size"], len(data)) - first if starts else 0)
    bar = tqdm(total=len(scores), desc="test", disable=not progress, leave=False, unit="img")
    for index, probs in predict_probabilities(model, data, normalize, config["batch_size"], device, starts):
        if config["dice_resolution"] == "native":
            # Upsample the probabilities to each image's own resolution and compare with its full mask.
            for i, probs_i in zip(index.tolist(), probs):
                truth = source.mask(data.ids[i])
                upsampled = F.interpolate(probs_i[None], size=truth.shape, mode="bilinear", align_corners=False)
                scores[i - first] = dice_per_image(upsampled[0].cpu(), torch.from_numpy(truth)[None], threshold)[0]
                if predictions is not None:
                    write_mask(predictions, data.ids[i], upsampled[0, 0], truth.shape, threshold)
        else:
            scores[index.numpy() - first] = dice_per_image(probs.cpu(), data.masks[index].unsqueeze(1), threshold)
            if predictions is not None:  # saved at native resolution, where `vlpbench score` compares
                for i, probs_i in zip(index.tolist(), probs):
                    write_mask(predictions, data.ids[i], probs_i[0], source.mask(data.ids[i]).shape, threshold)
        bar.update(len(index))
    bar.close()
    return scores
