"""Segmentation protocol: a U-Net decoder trained on a frozen encoder, scored by per-image Dice.

This is MGCA's downstream segmentation (which G2D follows): smp U-Net on ResNet-50 features, the
encoder frozen, loss ``10 * focal - log(soft Dice)``, AdamW, early stopping on validation loss, and
the test set scored with the best-validation weights. Where MGCA's code has a quirk (BatchNorm
statistics drifting in the "frozen" encoder, Dice averaged over batch means, Dice on resized masks)
the canonical choice here differs and the quirk is a config option (see the task YAML).

The options that select MGCA's behaviour (the task's ``paper`` profile sets them; canonical first):

``pipeline``      ``cached``: images resized once (Pillow antialiased bilinear) into the image cache at
                  ``image_size`` and augmented there. ``mgca``: as MGCA's albumentations pipeline
                  (HKU-MedAI/MGCA mgca/datasets/segmentation_dataset.py:136-159), training images are
                  augmented at full size (ShiftScaleRotate about albumentations 0.5.2's centre
                  ``(w/2, h/2)``, bilinear, zero border), rounded to uint8, then resized to ``image_size``
                  the OpenCV ``INTER_LINEAR`` way (two taps, no antialiasing; in torch, equal to cv2 to one
                  grey level); validation and test images get that resize alone (cached, ``linear`` method).
``augment_mask``  the interpolation of the training masks under the augmentation: ``bilinear`` or
                  ``nearest`` (albumentations' mask rule, cv2 ``INTER_NEAREST``). Masks are in both
                  pipelines resized first, by area, to ``image_size`` and augmented there, as MGCA does
                  (``resize_img`` at :83/:226 before ``seg_transform`` at :85/:227; its ``Resize(224)`` then
                  leaves the 224 mask unchanged).
``dice_average``  ``image``: the test Dice is the mean over images. ``batch``: the mean of the means of the
                  test batches of ``batch_size`` in test order (MGCA ssl_segmenter.py:81-88, 99-121),
                  with its CI from resampling batches.
``train_subset``  ``split``: the split's committed part for the fraction, then ``balance_negatives``.
                  ``mgca``: MGCA's rule on the whole training part (segmentation_dataset.py:43-61,
                  184-188), see :func:`mgca_train_subset`.
``dice_resolution``  ``native`` (1024² truth) or ``input`` (MGCA: Dice on the resized masks).
``eval_batch_size``  images per validation and test forward pass: ``auto`` (default) fills the device
                  (:mod:`vlpbench.protocols.batch_fill`; a multiple of ``batch_size``, which it is on a CPU),
                  or an integer that is a multiple of ``batch_size``. Memory and speed only: the validation
                  loss is still taken per ``batch_size`` images, the Dice per image.

The encoder fine-tuning options (``train_encoder``, ``decoder``, ``loss``, ``augmentation``,
``decay_bias_and_norm``; MedKLIP's original setting, G2D Table 7) are described in
:mod:`vlpbench.protocols.segmentation_finetune`; off by default, they leave the frozen-encoder protocol as it is.

The truth is positive above 0.5 whatever ``threshold`` is (MGCA ssl_segmenter.py:107;
:mod:`vlpbench.metrics.dice`).

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
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from vlpbench import distributed
from vlpbench.data.cache import cached_images
from vlpbench.errors import ConfigError, VlpbenchError
from vlpbench.evidence import per_item_evidence
from vlpbench.protocols import SplitIds
from vlpbench.protocols.batch_fill import inference_batch, probing, protocol_chunks
from vlpbench.protocols.prefetch import pinned, prefetch
from vlpbench.protocols.runtime import (
    LOWEST_VAL_LOSS,
    EpochLosses,
    eval_backbone,
    fit,
    freeze_backbone,
    head_name,
    neck_of,
    precision_of,
    prepare_model,
    state_copy,
    to_device,
)
from vlpbench.metrics.bootstrap import bootstrap_ci
from vlpbench.metrics.dice import batch_means, dice_per_image
from vlpbench.predictions import find_masks, fit_mask, read_mask_values, write_mask
from vlpbench.protocols import base
from vlpbench.protocols.features import channel_values, normalize as normalize_channels
from vlpbench.protocols.segmentation_finetune import (
    MedKLIPResUNet,
    check_finetune_options,
    dice_bce_loss,
    parameter_groups,
    random_crop_flip,
    unfreeze_encoder,
)

log = logging.getLogger("vlpbench")


class SegmentationSource(Protocol):
    """What the protocol needs from a dataset reader."""

    def image(self, image_id: str) -> np.ndarray: ...  # uint8 (H, W)
    def mask(self, image_id: str) -> np.ndarray: ...  # 0/1 (H, W), same size as the image
    def label(self, image_id: str) -> int: ...


class Images:
    """Images and soft masks of one split part at the protocol's input size.

    The images come from the image cache (decoded once per dataset, id and size, then memory-mapped);
    the masks are decoded and resized here. ``method``: the cache's resize rule (``antialias`` is the
    canonical one, ``linear`` OpenCV's INTER_LINEAR). ``full_size``: keep the images at full size
    instead (the largest side among the native masks, every image resized square to it by ``method``,
    an identity for SIIM's and RSNA's 1024² DICOMs), memory-mapped rather than copied, for augmentation
    before the resize (``pipeline: mgca``); :attr:`full` is that size, or None.
    """

    def __init__(self, source: SegmentationSource, ids: list[str], size: int, desc: str, progress: bool, *,
                 method: str = "antialias", full_size: bool = False):
        self.ids = list(ids)
        self.masks = torch.empty((len(ids), size, size), dtype=torch.float32)
        sides = np.zeros(len(ids), dtype=np.int64)

        def load(index: int) -> None:
            mask = source.mask(self.ids[index])
            sides[index] = max(mask.shape)
            self.masks[index] = torch.from_numpy(resize_mask(mask, size))

        # Readers live in vlpbench.data.<dataset>, so the module's name is the cache's dataset name.
        dataset = type(source).__module__.rpartition(".")[2]
        if not full_size:
            cached = cached_images(source, dataset, self.ids, size, method=method, progress=progress)
            self.images = torch.from_numpy(np.array(cached))  # a private writable copy in memory
            self.full = None
        # Pillow's resize releases the GIL, so threads overlap part of the work.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(tqdm(pool.map(load, range(len(ids))), total=len(ids), desc=f"masks {desc}",
                      disable=not progress, leave=False, unit="img"))
        if full_size:
            self.full = int(sides.max()) if len(ids) else size
            # Memory-mapped (SIIM's training set at 1024² is gigabytes); each batch reads its images.
            self.images = cached_images(source, dataset, self.ids, self.full, method=method, progress=progress)

    def __len__(self) -> int:
        return len(self.ids)

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 images ``index`` (N, H, W), a copy where the images are memory-mapped."""
        if isinstance(self.images, torch.Tensor):
            return self.images[index]
        return torch.from_numpy(np.ascontiguousarray(self.images[index.numpy()]))


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
    return affine_theta(scale, angle)


def affine_theta(scale: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """``affine_grid`` matrices (N, 2, 3), output → input about the image centre, of a zoom by ``scale`` and
    a rotation by ``angle`` radians: the inverse of ``cv2.getRotationMatrix2D(centre, degrees(angle), scale)``
    (positive angles turn the picture counter-clockwise as displayed)."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # grid maps output → input
    theta = torch.zeros(len(scale), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    return theta


def about_albumentations_centre(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``theta`` (about the exact centre) moved to turn about albumentations 0.5.2's centre instead:
    ``(width / 2, height / 2)`` in OpenCV's pixel coordinates (pixel centres at integers), half a pixel
    right of and below the exact centre of a ``height`` x ``width`` image (MGCA pins albumentations==0.5.2,
    HKU-MedAI/MGCA requirements.txt:1; its ``shift_scale_rotate`` builds ``cv2.getRotationMatrix2D``
    about that point, for the image and, at the mask's own size, for the mask)."""
    # In affine_grid's normalised coordinates (align_corners=False) that point is (1/width, 1/height).
    centre = torch.tensor([1.0 / width, 1.0 / height], dtype=theta.dtype, device=theta.device)
    moved = theta.clone()
    moved[:, :, 2] = theta[:, :, 2] + centre - theta[:, :, :2] @ centre
    return moved


def warp(batch: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """``batch`` (N, C, H, W) resampled through ``theta`` with ``mode`` interpolation and zeros outside
    (OpenCV's BORDER_CONSTANT with value 0)."""
    grid = F.affine_grid(theta.to(batch.device, batch.dtype), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode=mode, padding_mode="zeros", align_corners=False)


def resize_like_cv2(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8-valued float images (N, C, H, W) → ``size``² as ``cv2.resize(..., INTER_LINEAR)`` on uint8:
    half-pixel centres, two taps, no antialiasing, borders replicated, rounded to whole grey levels
    (OpenCV's fixed point agrees to one grey level; tests/protocols/test_segmentation_paper.py)."""
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return resized.round_().clamp_(0.0, 255.0)


def mgca_images(pixels: torch.Tensor, theta: torch.Tensor | None, size: int) -> torch.Tensor:
    """MGCA's training images: uint8-valued float images (N, 1, H, W) at full size, turned by ``theta``
    (about albumentations' centre; None: not augmented) with bilinear interpolation and a zero border and
    rounded to uint8 as ``cv2.warpAffine`` returns them, then resized to ``size`` by
    :func:`resize_like_cv2`; scaled to [0, 1] (HKU-MedAI/MGCA mgca/datasets/segmentation_dataset.py:138-155).

    Not bit-identical to OpenCV: ``cv2.warpAffine`` quantises sample positions to 1/32 pixel and its
    weights to 15 bits, so an edge pixel may differ by a grey level or two; the draws of angle and scale
    come from torch's generator, not Python's ``random`` as in albumentations (same distribution).
    """
    if theta is not None:
        turned = about_albumentations_centre(theta, pixels.shape[-2], pixels.shape[-1])
        pixels = warp(pixels, turned, "bilinear").round_().clamp_(0.0, 255.0)
    return resize_like_cv2(pixels, size).div_(255.0)


def augment_masks(masks: torch.Tensor, theta: torch.Tensor, mode: str, albumentations_centre: bool) -> torch.Tensor:
    """Training masks (N, 1, s, s) turned by ``theta`` with ``mode`` (``bilinear`` or ``nearest``)
    interpolation, zeros outside; about albumentations' centre at the masks' own size where
    ``albumentations_centre`` (MGCA augments its 224 mask with the image's angle and scale)."""
    if albumentations_centre:
        theta = about_albumentations_centre(theta, masks.shape[-2], masks.shape[-1])
    return warp(masks, theta, mode)


# smp's default U-Net decoder widths, deepest first (MGCA and G2D use the 5-stage default).
_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class UNet(torch.nn.Module):
    """smp U-Net (1 class) around the adapter's encoder; ``encoder_name`` is the adapter's smp encoder name.
    ``decoder="medklip"``: MedKLIP's network instead (:class:`~vlpbench.protocols.segmentation_finetune.
    MedKLIPResUNet`); either way the encoder is ``self.unet.encoder``."""

    def __init__(self, encoder: torch.nn.Module, encoder_name: str = "resnet50", decoder: str = "smp"):
        super().__init__()
        if decoder == "medklip":
            self.unet = MedKLIPResUNet(encoder)
            return
        import segmentation_models_pytorch as smp

        # Build with the same key layout as G2D's published *_encoder_decoder.pth (for "resnet50"), then swap
        # in the adapter's encoder (weights already loaded strictly by the adapter). An encoder that declares
        # fewer stages (MedKLIP ends at layer3, stride 16) gets a decoder with one up-block per stage it has.
        depth = len(encoder.out_channels) - 1
        if neck_of(encoder) is not None:  # not an smp encoder: the same decoder, built for its out_channels
            self.unet = _unet_for(encoder, _DECODER_CHANNELS[:depth])
            return
        unet = smp.Unet(encoder_name, encoder_weights=None, in_channels=3, classes=1, activation=None,
                        encoder_depth=depth, decoder_channels=_DECODER_CHANNELS[:depth])
        if tuple(encoder.out_channels) != tuple(unet.encoder.out_channels):
            raise VlpbenchError(f"encoder channels {tuple(encoder.out_channels)} do not match the "
                                f"{encoder_name} U-Net's {tuple(unet.encoder.out_channels)}")
        unet.encoder = encoder
        self.unet = unet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)


class _PyramidUnet(torch.nn.Module):
    """smp's U-Net (decoder and head as ``smp.Unet`` builds and initialises them) around an encoder smp cannot
    build by name (a ViT with a neck); state-dict keys as ``smp.Unet``'s (``encoder.``, ``decoder.``,
    ``segmentation_head.``)."""

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.encoder, self.decoder, self.segmentation_head = encoder, decoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.encoder(x)))


def _unet_for(encoder: torch.nn.Module, decoder_channels: tuple[int, ...]) -> _PyramidUnet:
    """``smp.Unet``'s default decoder (batch norm, nearest upsampling, no attention) and 3x3 head for
    ``encoder.out_channels``."""
    from segmentation_models_pytorch.base import SegmentationHead, initialization
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

    decoder = UnetDecoder(encoder_channels=encoder.out_channels, decoder_channels=decoder_channels,
                          n_blocks=len(decoder_channels))
    head = SegmentationHead(in_channels=decoder_channels[-1], out_channels=1, activation=None, kernel_size=3)
    initialization.initialize_decoder(decoder)
    initialization.initialize_head(head)
    return _PyramidUnet(encoder, decoder, head)


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
    check_options(config)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    size = int(config["image_size"])
    mgca_pipeline = option(config, "pipeline") == "mgca"

    if option(config, "train_subset") == "mgca":
        train_ids = mgca_train_subset(_whole_train(split), source.label, split.fraction,
                                      bool(config["balance_negatives"]), seed)
    else:
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
    method = "linear" if mgca_pipeline else "antialias"
    with distributed.main_first():  # rank 0 fills the image cache, the others then read it
        train = Images(source, train_ids, size, "train", progress, method=method,
                       full_size=mgca_pipeline and bool(config["augment"]))
        val = Images(source, split.val, size, "val", progress, method=method)
        test = Images(source, split.test, size, "test", progress, method=method)
    t_data = time.perf_counter()

    model = UNet(encoder, encoder_name, option(config, "decoder"))
    if decoder_state is not None:
        model.unet.load_state_dict({**model.unet.encoder.state_dict(prefix="encoder."), **decoder_state})
    freeze_backbone(model.unet.encoder)  # a ViT's neck trains with the decoder
    unfreeze_encoder(model.unet.encoder, config)
    prepare_model(model, device, precision_of(config))
    stepped = model
    if distributed.is_active():
        distributed.global_batchnorm(model)
        # Buffers need no broadcast: global BatchNorm keeps them equal on every rank.
        stepped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
            find_unused_parameters=option(config, "decoder") == "medklip")  # stages past stride 16 stay unused
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config["lr"], betas=tuple(config["betas"]),
                                  weight_decay=config["weight_decay"])
    normalize = _normalizer(config["mean"], config["std"])
    loss_fn = _loss(config)
    train_loss_fn = _loss(config, across_ranks=distributed.is_active())

    # Validation and test batches sized to fill the device (vlpbench.protocols.batch_fill); the validation loss
    # is still computed per protocol batch.
    eval_batch = inference_batch(config, "eval_batch_size", device=device, fallback=config["batch_size"],
                                 limit=max(len(val), len(test)), multiple_of=config["batch_size"],
                                 probe=lambda count: _probe(model, normalize, count, size, device))

    # Early stopping on the validation loss: the first epoch, then any strictly lower one.
    fitted = fit(
        lambda epoch: _train_epoch(model, stepped, train, optimizer, train_loss_fn, normalize, config, generator,
                                   device, epoch),
        lambda epoch: {"val_loss": eval_batch.run(lambda size: _evaluate_loss(
            model, val, loss_fn, normalize, size, device, protocol_batch=config["batch_size"]))},
        max_epochs=int(config["max_epochs"]), patience=int(config["patience"]), select=LOWEST_VAL_LOSS,
        snapshot=lambda: state_copy(model.state_dict()), restore=model.load_state_dict, progress=progress)
    t_train = time.perf_counter()

    scores = distributed.gather_arrays(eval_batch.run(lambda size: _test_dice(
        model, test, source, normalize, config, device, progress, predictions, batch_size=size)))
    t_test = time.perf_counter()
    return {
        **evaluate_segmentation(source, test.ids, scores, n_resamples=int(config["bootstrap_resamples"]), seed=seed,
                                batch_size=_dice_batch(config)),
        "n": {"train": len(train_ids), "val": len(val), "test": len(test)},
        "training": {"head": head_name(model.unet.encoder, "unet"), "epochs": fitted.epochs,
                     "best_epoch": fitted.best_epoch,
                     "best_val_loss": fitted.best_value, "history": fitted.history, "world_size": ranks,
                     "batch_per_process": config["batch_size"] // ranks, "effective_batch": config["batch_size"],
                     "inference_batch": eval_batch.describe()},
        "timing": {"data_s": t_data - t0, "train_s": t_train - t_data, "test_s": t_test - t_train,
                   "total_s": t_test - t0},
    }


def evaluate_segmentation(source: SegmentationSource, ids: list[str], scores: np.ndarray, *, n_resamples: int,
                          seed: int, batch_size: int | None = None) -> dict[str, Any]:
    """``metrics``, ``ci`` and ``per_image`` of the per-image Dice ``scores`` of test images ``ids``: the mean
    Dice with its bootstrap CI, and its two halves (positive images; negatives left empty) beside what an
    all-empty prediction would score, so that a reader can tell "finds pneumothorax" from "predicts nothing
    on a mostly negative test set".

    ``batch_size``: ``dice`` is instead MGCA's mean of the means of consecutive batches of that many images
    in test order (``dice_average: batch``), its CI from resampling those batch means (the mean over images
    stays derivable from ``per_image``; ``dice_positive`` and ``empty_correct`` stay means over images).
    """
    positive = np.array([bool(source.label(i)) for i in ids], dtype=bool)
    metrics = {
        "dice": float(scores.mean()),
        "dice_positive": float(scores[positive].mean()) if positive.any() else None,
        "empty_correct": float(scores[~positive].mean()) if (~positive).any() else None,
        "all_empty_baseline": float((~positive).mean()),
    }
    averaged = scores
    # Each metric as a mean over the images it counts (NaN: not counted), for paired tests (vlpbench.evidence)
    # and subgroup metrics.
    columns = {"dice": scores, "dice_positive": np.where(positive, scores, np.nan),
               "empty_correct": np.where(positive, np.nan, scores), "all_empty_baseline": (~positive).astype(float)}
    untestable = []
    if batch_size is not None:
        averaged = batch_means(scores, batch_size)
        metrics["dice"] = float(averaged.mean())
        # The dice column stays the per-image Dice: subgroup metrics use it, with this reason as their note.
        untestable.append("dice: MGCA's mean of the means of consecutive test batches (dice_average: batch) "
                          "depends on the test order, so no weighting of the images reproduces it")
    return {
        "metrics": metrics,
        "ci": {"dice": bootstrap_ci(averaged, n_resamples=n_resamples, seed=seed)},
        "per_image": {image_id: float(s) for image_id, s in zip(ids, scores)},
        "evidence": per_item_evidence(ids, columns, labels=positive.astype(np.int8),
                                      label_name=(tuple(getattr(source, "classes", ())) or ("positive",))[0],
                                      untestable=untestable),
    }


class SegmentationProtocol(base.Protocol):
    """U-Net decoder on the frozen encoder, per-image Dice (module docstring)."""

    name = "segmentation"
    table_group = "seg"
    prediction_files = ("one <image_id>.png per test image (0/255 at the image's resolution or aspect ratio) or .npy "
                        "probabilities in [0, 1], and no other file")

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
        the task's ``threshold``; evaluated by :func:`evaluate_segmentation` as ``run`` does.

        Each file is checked at the door (:func:`~vlpbench.predictions.find_masks`,
        :func:`~vlpbench.predictions.read_mask_values`, :func:`~vlpbench.predictions.fit_mask`): exactly one
        mask per test image and no other file, finite probabilities in [0, 1], the image's size or aspect ratio.

        Raises:
            DataError: naming the file and what was expected.
        """
        check_options(config)
        threshold = config["threshold"]
        ids = list(split.test)
        found = find_masks(Path(predictions), ids)
        scores = np.empty(len(ids))
        resized = 0
        for index, image_id in enumerate(ids):
            truth = source.mask(image_id)
            values = read_mask_values(found[image_id])
            resized += values.shape != truth.shape
            prediction = fit_mask(found[image_id], values, truth.shape)
            scores[index] = dice_per_image(prediction[None], torch.from_numpy(truth)[None], threshold)[0]
        outcome = evaluate_segmentation(source, ids, scores, n_resamples=int(config["bootstrap_resamples"]), seed=seed,
                                        batch_size=_dice_batch(config))
        notes = []
        if resized:
            notes.append(f"{resized} of {len(ids)} masks were not at their image's size: each was resized to it "
                         "(the same aspect ratio; .png nearest neighbour, .npy bilinear)")
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


def mgca_train_subset(ids: list[str], label: Callable[[str], int], fraction: float, balance: bool,
                      seed: int) -> list[str]:
    """MGCA's training set for ``fraction`` of the whole training part ``ids`` (``train_subset: mgca``).

    The rule (HKU-MedAI/MGCA mgca/datasets/segmentation_dataset.py:43-61 for SIIM, :184-188 for RSNA):
    with ``balance``, keep every positive and draw as many negatives, ``choice(negatives, n_pos,
    replace=False)``; then, unless ``fraction`` is 1, draw ``int(len(kept) * fraction)`` of the kept ids,
    ``choice(kept, n, replace=False)``, the kept list holding the positives, then the negatives, each in
    ``ids`` order (``pd.concat([df_pos, df_neg])``, :53). The draws come from numpy's legacy generator
    seeded with the run's ``seed``, which is what MGCA's global ``np.random`` is after
    ``seed_everything(seed)`` (mgca_segmenter.py:46). MGCA builds its training set twice: once to count
    training steps (mgca_segmenter.py:123 → ssl_segmenter.py:134-136 calls ``train_dataloader()``) and
    again in ``trainer.fit`` (:125), and it trains on the second; so the rule runs twice here and the
    second draw is kept (only datasets touch ``np.random`` in MGCA). The result, in ``ids`` order, is
    MGCA's training set wherever ``ids`` is MGCA's training list in MGCA's order; on vlpbench's own split
    (SIIM's by image) it is the same rule on other images.
    """
    positives = [i for i in ids if label(i)]
    negatives = [i for i in ids if not label(i)]
    generator = np.random.RandomState(seed)  # MGCA's np.random (MT19937), seeded as seed_everything does
    for _ in range(2):  # the step-count construction, then the one trained on
        kept = list(ids)
        if balance:
            n_pos = len(positives)
            if n_pos > len(negatives):  # MGCA's choice(..., replace=False) would fail here
                raise VlpbenchError(f"train_subset=mgca: {n_pos} positive training images but only "
                                    f"{len(negatives)} negatives to balance them with")
            chosen = generator.choice(len(negatives), size=n_pos, replace=False)
            picked = set(chosen.tolist())
            kept = positives + [n for index, n in enumerate(negatives) if index in picked]
        if fraction != 1:
            chosen = generator.choice(len(kept), size=int(len(kept) * fraction), replace=False)
            kept = [kept[index] for index in chosen]
    keep = set(kept)
    return [i for i in ids if i in keep]


# Choices of each segmentation option, the canonical one (the task files' default) first.
CHOICES = {
    "dice_resolution": ("native", "input"),
    "pipeline": ("cached", "mgca"),
    "augment_mask": ("bilinear", "nearest"),
    "dice_average": ("image", "batch"),
    "train_subset": ("split", "mgca"),
    "decoder": ("smp", "medklip"),
    "loss": ("mixed", "dice_bce"),
    "augmentation": ("shift_scale_rotate", "crop_flip"),
}


def option(config: dict[str, Any], key: str) -> str:
    """The value of option ``key``; its canonical choice where ``config`` lacks it (a caller's own dict)."""
    return config.get(key, CHOICES[key][0])


def check_options(config: dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming the option and its choices for a value outside :data:`CHOICES`, or for a
    fine-tuning option the protocol cannot run (:func:`.segmentation_finetune.check_finetune_options`)."""
    for key, choices in CHOICES.items():
        value = option(config, key)
        if value not in choices:
            raise ConfigError(f"segmentation option {key}={value!r}: expected one of {', '.join(choices)}")
    check_finetune_options(config, option)


def _dice_batch(config: dict[str, Any]) -> int | None:
    """The batch size the test Dice is averaged over (``dice_average: batch``), or None (over images)."""
    return int(config["batch_size"]) if option(config, "dice_average") == "batch" else None


def _whole_train(split: SplitIds) -> list[str]:
    if split.train_all is not None:
        return list(split.train_all)
    if split.fraction == 1:
        return list(split.train)
    raise ConfigError(f"train_subset=mgca draws the {split.fraction:g} fraction from the whole training part, "
                      "which the caller did not pass (SplitIds.train_all)")


def _normalizer(mean: float | list, std: float | list) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(mean, (list, tuple)) or isinstance(std, (list, tuple)):  # per channel (R, G, B)
        mean, std = channel_values(mean, "mean"), channel_values(std, "std")
        return lambda images01: normalize_channels(images01, mean, std)

    def normalize(images01: torch.Tensor) -> torch.Tensor:
        # Grey to the 3 channels the encoder expects, then the task's mean/std.
        return ((images01 - mean) / std).expand(-1, 3, -1, -1)

    return normalize


def _loss(config: dict[str, Any], across_ranks: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if option(config, "loss") == "dice_bce":
        return lambda logits, target: dice_bce_loss(logits, target, across_ranks=across_ranks)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mixed_loss(logits, target, config["focal_weight"], config["focal_gamma"], across_ranks=across_ranks)

    return loss


def _host_batch(data: Images, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, S, S) and masks (N, 1, S, S) of ``index`` in host memory, page-locked for CUDA."""
    return pinned(data.images[index].unsqueeze(1), device), pinned(data.masks[index].unsqueeze(1), device)


def _device_batch(host: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_host_batch`'s images in [0, 1] and masks, on ``device``."""
    images, masks = host
    return to_device(images, device).float().div_(255.0), to_device(masks, device)


def train_batches(data: Images, config: dict[str, Any], generator: torch.Generator,
                  device: torch.device) -> Iterator[tuple[int, tuple[torch.Tensor, ...], torch.Tensor | None]]:
    """One epoch's training batches, prepared on the host ahead of the loop (:mod:`vlpbench.protocols.prefetch`):
    ``(start, host tensors, theta)`` per global batch of ``batch_size`` (the last incomplete one dropped, as
    MGCA), where the host tensors are this rank's full-size uint8 pixels and masks (``pipeline: mgca``) or
    :func:`_host_batch`'s, and ``theta`` the augmentation's matrices for this rank (None: not augmented).

    Every rank draws the whole global batch's order and augmentation (so the generators stay in step) and keeps
    its block; the draws come from ``generator`` in the serial loop's order.
    """
    batch_size = config["batch_size"]
    order = torch.randperm(len(data), generator=generator)

    def prepare(start: int) -> tuple[int, tuple[torch.Tensor, ...], torch.Tensor | None]:
        index = distributed.shard(order[start:start + batch_size])
        if data.full is not None:  # pipeline: mgca, augmented at full size, then resized
            theta = distributed.shard(random_affine(batch_size, 0.1, 10.0, 0.5, generator))
            return start, (pinned(data.pixels(index).unsqueeze(1), device),
                           pinned(data.masks[index].unsqueeze(1), device)), theta
        theta = distributed.shard(_augment_theta(config, batch_size, generator)) if config["augment"] else None
        return start, _host_batch(data, index, device), theta

    return prefetch(prepare, range(0, len(data) - batch_size + 1, batch_size), device)


def _train_epoch(model, stepped, data: Images, optimizer, loss_fn, normalize, config, generator, device,
                 epoch: int) -> float:
    """One epoch over :func:`train_batches`; ``stepped`` is ``model`` or its DistributedDataParallel wrapper."""
    model.train()
    if config["freeze_bn"]:
        eval_backbone(model.unet.encoder)  # frozen means frozen: BatchNorm statistics do not drift
    batch_size = config["batch_size"]
    losses = EpochLosses()  # read once per epoch: the host queues the next steps meanwhile
    for start, host, theta in train_batches(data, config, generator, device):
        if data.full is not None:
            theta = theta.to(device)
            images = mgca_images(to_device(host[0], device).float(), theta, int(config["image_size"]))
            masks = augment_masks(to_device(host[1], device), theta, option(config, "augment_mask"),
                                  albumentations_centre=True)
        else:
            images, masks = _device_batch(host, device)
            if theta is not None:
                grid = F.affine_grid(theta.to(device), list(images.shape), align_corners=False)
                images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                masks = F.grid_sample(masks, grid, mode=option(config, "augment_mask"), padding_mode="zeros",
                                      align_corners=False)
        loss = loss_fn(stepped(normalize(images)), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.add(loss, batch_size)
    return losses.total(epoch) / (len(losses) * batch_size)


def _augment_theta(config: dict[str, Any], batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The training augmentation's affine matrices for one global batch: MGCA's ShiftScaleRotate(shift 0,
    scale 0.1, rotate 10, p 0.5), or MedKLIP's random resized crop and flip (``augmentation: crop_flip``)."""
    if option(config, "augmentation") == "crop_flip":
        return random_crop_flip(batch_size, generator)
    return random_affine(batch_size, 0.1, 10.0, 0.5, generator)


def rank_batches(n: int, batch_size: int) -> range:
    """Start indices of this rank's block of the batches of ``range(n)``: the batches are those of a
    single process (so each image meets the same batch mates), split contiguously among ranks."""
    return distributed.shard(range(0, n, batch_size))


@torch.inference_mode()
def _evaluate_loss(model, data: Images, loss_fn, normalize, batch_size: int, device,
                   protocol_batch: int | None = None) -> float:
    """Mean over images of the per-batch loss, the loss taken over consecutive ``protocol_batch`` images
    (default ``batch_size``) of each forward batch of ``batch_size`` (a multiple of it), so the value does not
    depend on the forward batch; under torchrun each rank evaluates its batches and the totals are summed, so
    every rank gets the same value."""
    model.eval()
    protocol_batch = protocol_batch or batch_size
    if batch_size % protocol_batch:
        raise ValueError(f"forward batch {batch_size} is not a multiple of the protocol batch {protocol_batch}")
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per batch
    for host in _eval_batches(data, batch_size, device, rank_batches(len(data), batch_size)):
        images, masks = _device_batch(host[1], device)
        logits = model(normalize(images))
        for chunk in protocol_chunks(len(images), protocol_batch):
            total += loss_fn(logits[chunk], masks[chunk]).double() * (chunk.stop - chunk.start)
    return distributed.all_reduce_sum([float(total)])[0] / len(data)


def _probe(model, normalize, count: int, side: int, device) -> None:
    """One forward pass of ``count`` blank ``side``-pixel images (the memory probe of
    :func:`~vlpbench.protocols.batch_fill.inference_batch`)."""
    with probing(model):
        model(normalize(torch.zeros(count, 1, side, side, device=device)))


@torch.inference_mode()
def predict_probabilities(model, data: Images, normalize, batch_size: int, device, starts: range | None = None):
    """Yield ``(index, probabilities)`` batches at the input size, on ``device``; ``starts``: the batches'
    first indices (default: every batch)."""
    model.eval()
    for index, host in _eval_batches(data, batch_size, device, range(0, len(data), batch_size) if starts is None
                                     else starts):
        images, _ = _device_batch(host, device)
        yield index, torch.sigmoid(model(normalize(images)))


def _eval_batches(data: Images, batch_size: int, device: torch.device,
                  starts: range) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """``(index, host batch)`` of the batches beginning at ``starts``, prepared ahead of the loop."""
    def prepare(start: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        index = torch.arange(start, min(start + batch_size, len(data)))
        return index, _host_batch(data, index, device)

    return prefetch(prepare, starts, device)


def _test_dice(model, data: Images, source: SegmentationSource, normalize, config, device, progress,
               predictions: Path | None = None, *, batch_size: int) -> np.ndarray:
    """Dice of this rank's block of test images (all of them in a single process), in test order, predicted in
    batches of ``batch_size``."""
    threshold = config["threshold"]
    starts = rank_batches(len(data), batch_size)
    first = starts[0] if starts else 0
    scores = np.empty(min(starts[-1] + batch_size, len(data)) - first if starts else 0)
    bar = tqdm(total=len(scores), desc="test", disable=not progress, leave=False, unit="img")
    for index, probs in predict_probabilities(model, data, normalize, batch_size, device, starts):
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
