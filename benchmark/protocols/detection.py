"""Detection protocol: a YOLOv3 head trained on a frozen encoder, scored by COCO-style mAP.

This is MGCA's downstream detection (which G2D follows, RSNA pneumonia and Object-CXR): the encoder's
three deepest feature maps (ResNet-50 ``layer2/3/4``, strides 8/16/32) feed a YOLOv3 head with one
class and three anchors per scale (the standard YOLOv3 anchors scaled from 416 to the input size),
trained with MGCA's YOLO loss by AdamW, early-stopped on validation mAP, and the test set is scored
with the best-validation weights. Predictions pass a confidence threshold and NMS (both 0.5) and are
scored in original image pixels by :mod:`vlpbench.metrics.detection`.

A task with ``classes`` (VinDr-CXR's findings) trains the same head with one class logit per class, as
MGCA's code is written for any number (``utils/yolo_loss.py:104-109,215-254``: a one-hot class target at
each assigned anchor, the class BCE averaged over the classes), and reads its detections as MGCA does
(``utils/detection_utils.py:76-135``, ``models/ssl_detector.py:55-96``): the objectness above the
confidence threshold, the class of the largest class score, NMS within each class, the objectness as the
score. Its mAP is the macro mean over the classes (:class:`vlpbench.metrics.detection.ClassMatches`).

Where MGCA's code has a quirk the canonical choice differs and the quirk is an option or a reported
metric (the ``paper`` profile of the task files sets each to MGCA's): BatchNorm statistics of the
"frozen" encoder drift in MGCA (``freeze_bn``), and its mAP skips images without a detection or
without a box (reported as ``map_mgca``; ``val_metric``). The loss differs from MGCA's in two
details, which together are the whole difference: the anchor-shape IoU that picks a box's anchor and
the anchors ignored by the no-object term is the plain IoU, where MGCA's ``bbox_iou`` adds 1 to every
side length, in grid cells (``anchor_iou``; ``utils/yolo_loss.py:7-38,231-241``); and the cell and
anchor a box is assigned to is left out of the no-object term, where MGCA pushes it towards 0 there
too unless its anchor shape overlaps the box by more than the ignore threshold (``noobj_assigned``;
``yolo_loss.py:156-157,239-244``). Detections are suppressed by torchvision's NMS (IoU above the
threshold), where MGCA suppresses IoU at or above it, with the same "+1" IoU in input pixels
(``nms``; ``utils/detection_utils.py:15-46,76-135``). Images are resized with Pillow's antialiased
bilinear filter, where MGCA uses ``cv2.resize`` INTER_LINEAR, which point-samples when shrinking
(``input_resize``; ``datasets/detection_dataset.py:65-72,153-157``).

``eval_batch_size`` sets the images per forward pass where nothing trains: the frozen features kept for the
training and validation parts, and the validation and test predictions. ``auto`` (default) fills the device
(:mod:`vlpbench.protocols.batch_fill`; on a CPU it is the training batch). Memory and speed only: the
loss and the detections are per image.

Under torchrun (:mod:`vlpbench.distributed`) the run computes what one process computes: every rank
draws the same permutation of the training images and trains on its contiguous ``batch_size /
world_size`` of each global batch; the head is wrapped in DistributedDataParallel, whose gradient
average of the per-rank mean losses is the gradient of the global batch's mean loss, and BatchNorm
normalises with the global batch's statistics (:class:`~vlpbench.distributed.GlobalBatchNorm2d`). Each
rank computes the encoder features and the predictions of its block of whole validation and test
batches (and of training batches, for the kept features); features, loss totals and detections are
gathered in image order, so every rank selects the same epoch and scores the same mAP. What remains
different is the order of floating-point sums, whose rounding AdamW amplifies over training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vlpbench import distributed
from vlpbench.config import cache_dir
from vlpbench.data.cache import cached_images
from vlpbench.errors import ConfigError, DataError, VlpbenchError
from vlpbench.evidence import detection_evidence
from vlpbench.metrics.detection import MAX_DETECTIONS, ClassMatches, detection_cis, map_ci, mgca_kept, summarize
from vlpbench.predictions import DETECTIONS_FILE, read_coco_results, write_detections
from vlpbench.protocols import SplitIds, base
from vlpbench.protocols.batch_fill import inference_batch, probing
from vlpbench.protocols.labels import class_names
from vlpbench.protocols.prefetch import pinned, prefetch
from vlpbench.protocols.runtime import (
    EpochLosses,
    Selection,
    cudnn_benchmark,
    eval_backbone,
    fit,
    freeze_backbone,
    head_name,
    neck_of,
    precision_of,
    prepare_model,
    require_finite,
    state_copy,
    to_device,
)
from vlpbench.threads import single_threaded

log = logging.getLogger("vlpbench")

# YOLOv3's anchors (w, h) in pixels of its 416 input, coarsest scale (stride 32) first, as MGCA's ModelMain.
YOLOV3_ANCHORS = (((116, 90), (156, 198), (373, 326)),
                  ((30, 61), (62, 45), (59, 119)),
                  ((10, 13), (16, 30), (33, 23)))
YOLOV3_INPUT = 416
BOX_ATTRIBUTES = 5  # x, y, w, h, objectness; then one logit per class
# exp() of a raw size above this would overflow float32; no box is 2e4 times its anchor.
_MAX_LOG_SIZE = 10.0
ONE_PERCENT = 0.01
# The choices of the options that select MGCA's rules, canonical first (module docstring).
CHOICES = {
    "anchor_iou": ("plain", "mgca"),
    "noobj_assigned": ("exclude", "mgca"),
    "nms": ("torchvision", "mgca"),
    "input_resize": ("antialias", "linear"),
}
LR_OPTIONS = ("lr", "lr_1pct")  # what a diverged run is told to lower (lr_1pct on 1 % of the data)
# Where a part's frozen features live (PartFeatures) and the dtype they are kept in there.
STORAGE_DTYPES = {"memory": "float32", "memmap": "float16", "batch": "float32"}
STORAGES = tuple(STORAGE_DTYPES)
FLOAT16_MAX = float(np.finfo(np.float16).max)
# Disk the feature files leave free in the cache folder, for the image cache and the results.
DISK_RESERVE_BYTES = 2 * 2**30


class DetectionSource(Protocol):
    """What the protocol needs from a dataset reader."""

    def image(self, image_id: str) -> np.ndarray: ...  # uint8 (H, W)
    def image_size(self, image_id: str) -> tuple[int, int]: ...  # (H, W), from the header
    def boxes(self, image_id: str) -> np.ndarray: ...  # float (K, 4) xyxy in image pixels
    def label(self, image_id: str) -> int: ...


Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # one image's boxes (K, 4), scores (K,), class indices (K,)


def truth_boxes(source: DetectionSource, ids: Sequence[str], config: dict[str, Any]) -> list[np.ndarray]:
    """Ground-truth boxes (K, 4) xyxy in original pixels; ``polygon_rule`` is passed on where the task
    has it (Object-CXR)."""
    options = {"polygon_rule": config["polygon_rule"]} if "polygon_rule" in config else {}
    return [np.asarray(source.boxes(image_id, **options), dtype=np.float64).reshape(-1, 4) for image_id in ids]


def n_classes_of(config: dict[str, Any]) -> int:
    """The number of classes the head predicts: the task's ``classes``, else one."""
    return len(class_names(config)) if "classes" in config else 1


def truth_targets(source, ids: Sequence[str], config: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Ground truth per image: boxes (K, 4) xyxy in original pixels and their class indices (K,) into the
    task's ``classes``, from the reader's ``detection_boxes`` (with the task's ``box_fusion`` where it has one);
    a task without ``classes`` has :func:`truth_boxes`, all of class 0.

    Raises:
        ConfigError: the task names classes but the dataset has no per-class boxes.
    """
    if "classes" not in config:
        boxes = truth_boxes(source, ids, config)
        return boxes, [np.zeros(len(b), dtype=np.int64) for b in boxes]
    if not hasattr(source, "detection_boxes"):
        raise ConfigError(f"the task names detection classes, but dataset reader {type(source).__name__} has no "
                          "per-class boxes")
    classes = class_names(config)
    options = {"box_fusion": config["box_fusion"]} if "box_fusion" in config else {}
    pairs = [source.detection_boxes(image_id, classes, **options) for image_id in ids]
    return ([np.asarray(b, dtype=np.float64).reshape(-1, 4) for b, _ in pairs],
            [np.asarray(labels, dtype=np.int64).reshape(-1) for _, labels in pairs])


def detection_parts(detections: Sequence[np.ndarray]) -> Detections:
    """One image's ``(boxes, scores)`` or ``(boxes, scores, labels)`` as a triple (class 0 where none is given)."""
    boxes, scores, *labels = detections
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels[0], dtype=np.int64).reshape(-1) if labels else np.zeros(len(scores), dtype=np.int64)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), scores, labels


class DetectionImages:
    """One split part at the input size: images from the image cache, boxes in original pixels and at
    the input size, and per image the factors (x, y) from input to original pixels."""

    def __init__(self, source: DetectionSource, ids: Sequence[str], size: int, config: dict[str, Any],
                 desc: str, progress: bool):
        self.ids = list(ids)
        # Readers live in vlpbench.data.<dataset>, so the module's name is the cache's dataset name.
        dataset = type(source).__module__.rpartition(".")[2]
        self.images = torch.from_numpy(np.array(cached_images(source, dataset, self.ids, size,
                                                              method=config["input_resize"], progress=progress)))
        self.truths, self.truth_labels = truth_targets(source, self.ids, config)
        # Header reads (DICOM, JPEG) wait on the disk, so threads overlap them.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            shapes = list(tqdm(pool.map(source.image_size, self.ids), total=len(self.ids), desc=f"sizes {desc}",
                               disable=not progress, leave=False, unit="img"))
        self.scales = np.array([(width / size, height / size) for height, width in shapes], dtype=np.float64)
        self.targets = [torch.from_numpy(truth / np.tile(scale, 2)).float()
                        for truth, scale in zip(self.truths, self.scales)]
        self.target_labels = [torch.from_numpy(labels) for labels in self.truth_labels]

    def __len__(self) -> int:
        return len(self.ids)


def scaled_anchors(size: int) -> torch.Tensor:
    """YOLOv3's anchors in pixels of a ``size`` input, (3 scales, 3 anchors, 2), coarsest scale first
    (MGCA: ``* 224 / 416`` at its 224 input)."""
    return torch.tensor(YOLOV3_ANCHORS, dtype=torch.float32) * size / YOLOV3_INPUT


def _conv_block(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """YOLOv3's conv + BatchNorm + LeakyReLU(0.1)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.1))


class ScaleBlock(nn.Module):
    """One YOLOv3 scale: five alternating 1×1 / 3×3 blocks (``width`` / ``2 width`` channels), whose
    output also feeds the next finer scale, then a 3×3 block and the 1×1 prediction conv."""

    def __init__(self, in_channels: int, width: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_block(in_channels, width, 1), _conv_block(width, 2 * width, 3),
                                  _conv_block(2 * width, width, 1), _conv_block(width, 2 * width, 3),
                                  _conv_block(2 * width, width, 1))
        self.predict = nn.Sequential(_conv_block(width, 2 * width, 3), nn.Conv2d(2 * width, out_channels, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        branch = self.body(x)
        return self.predict(branch), branch


class YoloHead(nn.Module):
    """YOLOv3 head over three feature maps (finest first), as MGCA's ModelMain.

    The coarsest map goes through a scale block of ``width`` channels; its branch is reduced by a 1×1
    block to ``width / 2``, upsampled to the next map's size and concatenated with it, and so on. MGCA
    uses ``width`` 512. Each scale predicts ``anchors × (5 + n_classes)`` channels.
    """

    def __init__(self, in_channels: Sequence[int], width: int = 512, anchors: int = 3, n_classes: int = 1):
        super().__init__()
        fine, mid, coarse = in_channels
        out = anchors * (BOX_ATTRIBUTES + n_classes)
        self.coarse = ScaleBlock(coarse, width, out)
        self.reduce_mid = _conv_block(width, width // 2, 1)
        self.mid = ScaleBlock(mid + width // 2, width // 2, out)
        self.reduce_fine = _conv_block(width // 2, width // 4, 1)
        self.fine = ScaleBlock(fine + width // 4, width // 4, out)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Raw predictions of the three scales, coarsest first (the order of :data:`YOLOV3_ANCHORS`)."""
        fine, mid, coarse = features
        out_coarse, branch = self.coarse(coarse)
        # Nearest upsampling to the finer map's own size (= 2x for inputs divisible by the strides).
        x = F.interpolate(self.reduce_mid(branch), size=mid.shape[-2:], mode="nearest")
        out_mid, branch = self.mid(torch.cat([x, mid], 1))
        x = F.interpolate(self.reduce_fine(branch), size=fine.shape[-2:], mode="nearest")
        out_fine, _ = self.fine(torch.cat([x, fine], 1))
        return [out_coarse, out_mid, out_fine]


@dataclass(frozen=True)
class Stage:
    """An encoder feature map the head uses: its index in the encoder's outputs, stride, and shape at the input size."""

    index: int
    stride: float
    shape: tuple[int, int, int]  # (channels, height, width)

    @property
    def channels(self) -> int:
        return self.shape[0]


def deepest_stages(encoder: nn.Module, size: int) -> list[Stage]:
    """The encoder's last three feature maps (finest first), with their strides and shapes at ``size``.

    For ResNet-50 these are strides 8/16/32 (``layer2/3/4``, MGCA); an encoder that stops earlier (e.g.
    MedKLIP's, at ``layer3``) gives its own last three, strides 4/8/16.

    Raises:
        ConfigError: the encoder has fewer than three feature maps below the input, or one is empty at ``size``.
    """
    channels = list(encoder.out_channels)
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        probe = encoder(torch.zeros(1, 3, size, size, device=next(encoder.parameters()).device))
    encoder.train(was_training)
    if len(probe) != len(channels) or len(probe) < 4:
        raise ConfigError(f"the encoder returns {len(probe)} feature maps for out_channels {tuple(channels)}; "
                          "the detection head needs three maps below the input")
    if min(probe[-1].shape[-2:]) < 1:
        raise ConfigError(f"image_size {size} leaves an empty feature map; use a larger image_size")
    return [Stage(index, size / probe[index].shape[-1], tuple(probe[index].shape[1:]))
            for index in range(len(probe) - 3, len(probe))]


class NeckHead(nn.Module):
    """The trained part over an encoder with a neck: the neck's levels the head reads (shared with the
    encoder's neck), then the YOLOv3 head. Its input is the frozen backbone's taps of those levels."""

    def __init__(self, levels: Sequence[nn.Module], yolo: YoloHead):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.yolo = yolo

    def forward(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.yolo([level(tap) for level, tap in zip(self.levels, taps)])


class Detector(nn.Module):
    """Frozen encoder + YOLOv3 head; ``forward`` returns the head's raw predictions, coarsest first.

    ``features`` is the frozen part, computed without a graph (and cached by :class:`PartFeatures`): the
    three maps the head reads, or for an encoder with a neck (a ViT) the backbone's taps of those levels;
    ``head`` is the trained part: the YOLOv3 head, or a :class:`NeckHead` that runs the neck's levels first.
    """

    def __init__(self, encoder: nn.Module, stages: Sequence[Stage], width: int, n_classes: int = 1):
        super().__init__()
        self.encoder = encoder
        self.stage_indices = [stage.index for stage in stages]
        yolo = YoloHead([stage.channels for stage in stages], width, n_classes=n_classes)
        neck = neck_of(encoder)
        self.tap_indices = None if neck is None else [index - encoder.first_level for index in self.stage_indices]
        self.head = yolo if neck is None else NeckHead([neck.levels[i] for i in self.tap_indices], yolo)
        freeze_backbone(self.encoder)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen input of ``head``, without a graph (BatchNorm still updates in train mode)."""
        with torch.no_grad():
            if self.tap_indices is not None:
                taps = self.encoder(x, output="taps")
                return [taps[index] for index in self.tap_indices]
            features = self.encoder(x)
        return [features[index] for index in self.stage_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.head(self.features(x))


class PartFeatures:
    """The head's input for batches of one split part, by ``storage`` (:func:`feature_storage`):

    - ``memory``: the encoder's features computed once and kept on the device in float32;
    - ``memmap``: computed once into a float16 memory-mapped file in ``folder`` (one row of every map per
      image), read back batch by batch;
    - ``batch``: computed for every batch.

    ``memory`` and ``memmap`` are only valid while the encoder is frozen in eval mode and nothing is
    augmented, as on the detection protocol's frozen path. Under torchrun each rank computes its block of
    whole batches for ``memory`` (gathered), and every image for ``memmap`` (its own file: the batches
    it trains on draw rows from the whole part).
    """

    def __init__(self, model: Detector, data: DetectionImages, config: dict[str, Any], device: torch.device,
                 *, storage: str, batch_size: int, progress: bool, desc: str, folder: Path | None = None):
        self.model, self.data, self.config, self.device = model, data, config, device
        self.storage = storage
        self.kept: list[torch.Tensor] | None = None
        self.rows: np.memmap | None = None
        if storage == "batch":
            return
        eval_backbone(model.encoder)
        if storage == "memory":
            first, stop = distributed.batch_block(len(data), batch_size)  # this rank's whole batches
            chunks = [model.features(self._input(pixels)) for pixels in tqdm(
                self._read(first, stop, batch_size), total=len(range(first, stop, batch_size)),
                desc=f"features {desc}", disable=not progress, leave=False, unit="batch")]
            self.kept = [torch.cat(maps) for maps in zip(*chunks)]
            if distributed.is_active():
                self.kept = _gathered_maps(self.kept, device)
        elif storage == "memmap":
            self._write_rows(folder / f"{desc}-rank{distributed.rank()}.f16", batch_size, progress, desc)
        else:
            raise ValueError(f"feature storage {storage!r}: expected one of {', '.join(STORAGES)}")

    def _write_rows(self, path: Path, batch_size: int, progress: bool, desc: str) -> None:
        """Every image's maps, flattened into one float16 row of a memory-mapped file at ``path``."""
        self.shapes: list[tuple[int, ...]] = []
        start = 0
        for pixels in tqdm(self._read(0, len(self.data), batch_size), total=len(range(0, len(self.data), batch_size)),
                           desc=f"features {desc}", disable=not progress, leave=False, unit="batch"):
            maps = self.model.features(self._input(pixels))
            if self.rows is None:
                self.shapes = [tuple(m.shape[1:]) for m in maps]
                width = sum(int(np.prod(shape)) for shape in self.shapes)
                self.rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                                      shape=(len(self.data), width))
            flat = torch.cat([m.float().flatten(1) for m in maps], 1)
            largest = float(flat.abs().max()) if flat.numel() else 0.0
            if not largest <= FLOAT16_MAX:
                raise VlpbenchError(f"detection features of {desc} reach {largest:g}, beyond float16's range, so "
                                    "they cannot be stored on disk; raise feature_cache_gb to keep them in memory "
                                    "in float32")
            self.rows[start:start + len(maps[0])] = flat.cpu().numpy().astype(np.float16)
            start += len(maps[0])
        self.rows.flush()

    def _read(self, first: int, stop: int, batch_size: int) -> Iterator[torch.Tensor]:
        """The uint8 images of the batches of ``range(first, stop)``, read ahead of the encoder."""
        return prefetch(lambda start: pinned(self.data.images[start:min(start + batch_size, stop)], self.device),
                        range(first, stop, batch_size), self.device)

    def _input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images (host) → the encoder's normalised input on the device."""
        x = _normalize(to_device(pixels, self.device), self.config)
        if self.device.type == "cuda":  # the encoder is channels-last on CUDA (runtime.prepare_model)
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def host(self, index: list[int]) -> torch.Tensor | None:
        """What ``self(index)`` reads on the host, page-locked for CUDA: the images (``batch``) or the float16
        rows widened to float32 (``memmap``), in ``index`` order; None for ``memory``. Safe to call from
        another thread than :meth:`on_device` (:mod:`vlpbench.protocols.prefetch`)."""
        if self.kept is not None:
            return None
        if self.rows is not None:
            order = np.sort(np.asarray(index))  # file order: sequential reads
            flat = torch.from_numpy(self.rows[order].astype(np.float32))
            return pinned(flat[torch.from_numpy(np.searchsorted(order, index))], self.device)
        return pinned(self.data.images[index], self.device)

    def on_device(self, index: list[int], host: torch.Tensor | None) -> list[torch.Tensor]:
        """The head's input for ``index`` from :meth:`host`'s result for it."""
        if self.kept is not None:
            rows = torch.tensor(index, device=self.device)
            return [maps[rows] for maps in self.kept]
        if self.rows is not None:
            flat = to_device(host, self.device)
            sizes = [int(np.prod(shape)) for shape in self.shapes]
            return [part.reshape(-1, *shape) for part, shape in zip(flat.split(sizes, 1), self.shapes)]
        return self.model.features(self._input(host))

    def __call__(self, index: list[int]) -> list[torch.Tensor]:
        return self.on_device(index, self.host(index))

    def describe(self) -> dict[str, str]:
        """Where the features lived and their dtype, as the record states it."""
        return {"storage": self.storage, "dtype": STORAGE_DTYPES[self.storage]}


def _gathered_maps(local: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Every rank's rows of each feature map, in rank (so image) order, on ``device`` of every rank.

    Rank 0 always holds rows (blocks are larger first), so its shapes serve ranks that hold none.
    """
    shapes = distributed.broadcast_object([tuple(maps.shape[1:]) for maps in local])
    arrays = [maps.float().cpu().numpy() for maps in local] or [np.empty((0, *shape), np.float32) for shape in shapes]
    return [torch.from_numpy(distributed.gather_arrays(array)).to(device) for array in arrays]


def feature_storage(shapes: Sequence[Sequence[int]], sizes: dict[str, int], budget_gb: float, *, frozen: bool,
                    disk_bytes: float = math.inf) -> dict[str, str]:
    """Where each part's features (``shapes`` per image) live, parts taken in the order given: ``memory``
    (float32) while the total stays within ``budget_gb``, else ``memmap`` (float16) while the files fit
    ``disk_bytes``, else ``batch`` (computed every batch); all ``batch`` unless the encoder is ``frozen``
    (in eval mode: otherwise BatchNorm statistics move and the features change every batch)."""
    per_image = sum(int(np.prod(shape)) for shape in shapes)
    storage, memory, disk = {}, 0, 0
    for name, count in sizes.items():
        if not frozen:
            storage[name] = "batch"
        elif memory + 4 * count * per_image <= budget_gb * 2**30:
            storage[name], memory = "memory", memory + 4 * count * per_image
        elif disk + 2 * count * per_image <= disk_bytes:
            storage[name], disk = "memmap", disk + 2 * count * per_image
        else:
            storage[name] = "batch"
    return storage


def memory_bytes(shapes: Sequence[Sequence[int]], sizes: dict[str, int], storage: dict[str, str]) -> int:
    """Bytes of the parts' features that :func:`feature_storage` keeps in ``memory`` (float32, on the device)."""
    per_image = sum(int(np.prod(shape)) for shape in shapes)
    return sum(4 * count * per_image for name, count in sizes.items() if storage[name] == "memory")


@dataclass
class ScaleTargets:
    """Training targets of one scale, each (B, anchors, H, W) (``offsets`` and ``log_sizes`` with a last
    axis of 2: x, y and w, h)."""

    positive: torch.Tensor  # the cell and best anchor of each box
    ignore: torch.Tensor  # anchors whose shape overlaps a box in its cell above the ignore threshold
    offsets: torch.Tensor  # box centre within its cell, in [0, 1]
    log_sizes: torch.Tensor  # log(box size / anchor size)
    classes: torch.Tensor  # (B, anchors, H, W, n_classes): 1 for the class of each assigned box

    def pinned(self, device: torch.device) -> ScaleTargets:
        """These host tensors page-locked where bound for CUDA (:func:`~vlpbench.protocols.prefetch.pinned`)."""
        return ScaleTargets(*(pinned(t, device) for t in dataclasses.astuple(self)))

    def on(self, device: torch.device) -> ScaleTargets:
        """These tensors on ``device``, copied without blocking where they are page-locked."""
        return ScaleTargets(*(to_device(t, device) for t in dataclasses.astuple(self)))


def _shape_iou(sizes: torch.Tensor, anchors: torch.Tensor, rule: str = "plain") -> torch.Tensor:
    """IoU (K, A) of box sizes (K, 2) and anchor sizes (A, 2), both centred at the origin.

    ``rule`` ``mgca``: MGCA's ``bbox_iou`` of the corner boxes (0, 0, w, h), which counts every side as
    one longer (its "+1" pixel convention, applied to sizes in grid cells; ``utils/yolo_loss.py:30-36,
    231-237``), so (min w + 1)(min h + 1) / ((w + 1)(h + 1) + (w' + 1)(h' + 1) - that).
    """
    if rule == "mgca":
        sizes, anchors = sizes + 1.0, anchors + 1.0
    inter = (torch.minimum(sizes[:, None, 0], anchors[None, :, 0])
             * torch.minimum(sizes[:, None, 1], anchors[None, :, 1]))
    union = (sizes[:, 0] * sizes[:, 1])[:, None] + (anchors[:, 0] * anchors[:, 1])[None, :] - inter
    return inter / union


# Many small CPU ops per batch, faster on one thread (perf/tiny_ops.py), even where the head runs on a GPU.
@single_threaded()
def assign_targets(boxes: Sequence[torch.Tensor], grid: tuple[int, int], stride: tuple[float, float],
                   anchors: torch.Tensor, ignore_threshold: float, *, anchor_iou: str = "plain",
                   labels: Sequence[torch.Tensor] | None = None, n_classes: int = 1) -> ScaleTargets:
    """YOLOv3 targets of one scale, as MGCA's ``YOLOLoss.get_target``.

    Each box (xyxy, input pixels) goes to the cell holding its centre and to the anchor of this scale
    whose shape fits it best (every scale gets every box, as in MGCA), with a one-hot target of its class
    there (``yolo_loss.py:254``); anchors of that cell whose shape IoU with the box exceeds
    ``ignore_threshold`` are left out of the no-object loss.

    Args:
        boxes: per image, (K, 4) xyxy boxes in input pixels.
        grid: (H, W) of the scale's prediction map.
        stride: (y, x) input pixels per cell.
        anchors: (A, 2) anchor sizes (w, h) in input pixels.
        ignore_threshold: shape IoU above which an anchor is ignored.
        anchor_iou: the shape IoU of both choices, ``plain`` or MGCA's "+1" rule ``mgca`` (:func:`_shape_iou`).
        labels: per image, the class index of each box (K,); None: every box of class 0.
        n_classes: the number of classes the head predicts.
    """
    height, width = grid
    stride_y, stride_x = stride
    n_anchors = len(anchors)
    shape = (len(boxes), n_anchors, height, width)
    positive = torch.zeros(shape, dtype=torch.bool)
    ignore = torch.zeros(shape, dtype=torch.bool)
    offsets = torch.zeros((*shape, 2))
    log_sizes = torch.zeros((*shape, 2))
    classes = torch.zeros((*shape, n_classes))
    counts = [len(b) for b in boxes]
    if sum(counts) == 0:
        return ScaleTargets(positive, ignore, offsets, log_sizes, classes)
    flat = torch.cat([b.reshape(-1, 4).float().cpu() for b in boxes])
    image = torch.repeat_interleave(torch.arange(len(boxes)), torch.tensor(counts))
    cell = torch.tensor([stride_x, stride_y])
    centres = (flat[:, :2] + flat[:, 2:]) / 2 / cell
    # At least one input pixel, so that a degenerate box still has a finite log-size target.
    sizes = (flat[:, 2:] - flat[:, :2]).clamp(min=1.0) / cell
    anchors_grid = anchors.float().cpu() / cell
    iou = _shape_iou(sizes, anchors_grid, anchor_iou)
    gi = centres[:, 0].floor().long().clamp(0, width - 1)
    gj = centres[:, 1].floor().long().clamp(0, height - 1)
    over = iou > ignore_threshold
    for a in range(n_anchors):
        ignore[image[over[:, a]], a, gj[over[:, a]], gi[over[:, a]]] = True
    best = iou.argmax(dim=1)
    positive[image, best, gj, gi] = True
    offsets[image, best, gj, gi] = centres - torch.stack([gi, gj], 1).float()
    log_sizes[image, best, gj, gi] = torch.log(sizes / anchors_grid[best] + 1e-16)
    box_class = (torch.zeros(len(flat), dtype=torch.long) if labels is None
                 else torch.cat([torch.as_tensor(l).reshape(-1).long().cpu() for l in labels]))
    classes[image, best, gj, gi, box_class] = 1.0
    return ScaleTargets(positive, ignore, offsets, log_sizes, classes)


def _split_attributes(raw: torch.Tensor, n_anchors: int) -> torch.Tensor:
    """(B, anchors × attributes, H, W) → (B, anchors, H, W, attributes); attributes = 5 + classes."""
    batch, channels, height, width = raw.shape
    return raw.view(batch, n_anchors, channels // n_anchors, height, width).permute(0, 1, 3, 4, 2)


def yolo_loss(raw: torch.Tensor, targets: ScaleTargets, *, box_weight: float, noobj_weight: float,
              noobj_assigned: str = "exclude") -> torch.Tensor:
    """MGCA's YOLO loss of one scale.

    ``box_weight`` × (BCE of the x, y offsets + squared error of the log sizes) + BCE of objectness at
    the assigned anchors + ``noobj_weight`` × BCE of objectness towards 0 elsewhere (ignored anchors
    excepted) + class BCE; every term is summed over the anchors concerned and divided by the number of
    anchors of the scale (MGCA's mean over the masked map), so it is comparable across batches.

    ``noobj_assigned``: ``exclude`` leaves the assigned anchors out of the no-object term; ``mgca``
    leaves out only the ignored anchors, so an assigned anchor that is not ignored (its shape IoU at or
    below the ignore threshold) is pushed towards 1 and, with ``noobj_weight``, towards 0 (MGCA's
    ``noobj_mask`` is cleared only by the ignore rule: ``utils/yolo_loss.py:156-157,239-244``).
    """
    pred = _split_attributes(raw, targets.positive.shape[1])
    device = raw.device
    positive = targets.positive.to(device)
    if noobj_assigned == "mgca":
        no_object = ~targets.ignore.to(device)
    else:
        no_object = ~positive & ~targets.ignore.to(device)
    cells = positive.numel()
    hit = pred[positive]
    bce = F.binary_cross_entropy_with_logits
    xy = bce(hit[:, 0:2], targets.offsets.to(device)[positive], reduction="sum")
    wh = F.mse_loss(hit[:, 2:4], targets.log_sizes.to(device)[positive], reduction="sum")
    objectness = bce(hit[:, 4], torch.ones_like(hit[:, 4]), reduction="sum")
    background = pred[..., 4][no_object]
    objectness = objectness + noobj_weight * bce(background, torch.zeros_like(background), reduction="sum")
    n_classes = pred.shape[-1] - BOX_ATTRIBUTES
    target_classes = targets.classes.to(device)[positive].to(hit.dtype)
    classes = bce(hit[:, BOX_ATTRIBUTES:], target_classes, reduction="sum") / n_classes
    return (box_weight * (xy + wh) + objectness + classes) / cells


def decode(raw: torch.Tensor, anchors: torch.Tensor, stride: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw predictions of one scale → boxes (B, N, 4) xyxy in input pixels and objectness scores (B, N).

    Centre = (sigmoid(offset) + cell index) × stride, size = exp(raw size) × anchor (YOLOv3); the score
    is the objectness probability, as MGCA scores its detections.
    """
    pred = _split_attributes(raw, len(anchors))
    batch, n_anchors, height, width, _ = pred.shape
    stride_y, stride_x = stride
    gy, gx = torch.meshgrid(torch.arange(height, device=raw.device), torch.arange(width, device=raw.device),
                            indexing="ij")
    cx = (torch.sigmoid(pred[..., 0]) + gx) * stride_x
    cy = (torch.sigmoid(pred[..., 1]) + gy) * stride_y
    anchors = anchors.to(raw.device, raw.dtype).view(1, n_anchors, 1, 1, 2)
    size = torch.exp(pred[..., 2:4].clamp(max=_MAX_LOG_SIZE)) * anchors
    half_w, half_h = size[..., 0] / 2, size[..., 1] / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)
    return boxes.reshape(batch, -1, 4), torch.sigmoid(pred[..., 4]).reshape(batch, -1)


def decode_labels(raw: torch.Tensor, n_anchors: int) -> torch.Tensor:
    """The class of each prediction of one scale, (B, N) in :func:`decode`'s order: the largest class logit
    (MGCA: ``torch.max`` of the class scores, ``utils/detection_utils.py:101-102``); 0 for one class."""
    pred = _split_attributes(raw, n_anchors)
    return pred[..., BOX_ATTRIBUTES:].argmax(dim=-1).reshape(raw.shape[0], -1)


@single_threaded()  # many small ops on a CPU, faster on one thread (perf/tiny_ops.py)
def decode_batch(outputs: Sequence[torch.Tensor], anchors: torch.Tensor,
                 size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every prediction of one batch at a ``size`` input, the scales' raw outputs coarsest first: boxes (B, N, 4)
    (:func:`decode`), scores (B, N) and class indices (B, N) (:func:`decode_labels`), the scales in turn."""
    decoded = [decode(raw, scale_anchors, (size / raw.shape[-2], size / raw.shape[-1]))
               for raw, scale_anchors in zip(outputs, anchors)]
    labels = [decode_labels(raw, len(scale_anchors)) for raw, scale_anchors in zip(outputs, anchors)]
    return torch.cat([b for b, _ in decoded], 1), torch.cat([s for _, s in decoded], 1), torch.cat(labels, 1)


def mgca_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, limit: int | None = None) -> torch.Tensor:
    """Indices of the boxes (N, 4) xyxy that MGCA's greedy NMS keeps, best first: boxes in descending
    score order, each kept unless a kept box overlaps it by an IoU at or above ``threshold``, the IoU
    counting every side one pixel longer (``utils/detection_utils.py:15-46,114-128``). Computed in
    float32 numpy on the CPU, one step per kept box; stops after ``limit`` kept boxes (the greedy
    order never revisits them)."""
    order = np.argsort(-scores.float().cpu().numpy(), kind="stable")
    rest = boxes.float().cpu().numpy()[order]
    areas = (rest[:, 2] - rest[:, 0] + 1) * (rest[:, 3] - rest[:, 1] + 1)
    kept = []
    while len(rest) and (limit is None or len(kept) < limit):
        kept.append(order[0])
        best, best_area = rest[0], areas[0]
        rest, areas, order = rest[1:], areas[1:], order[1:]
        inter = (np.maximum(np.minimum(best[2], rest[:, 2]) - np.maximum(best[0], rest[:, 0]) + 1, 0)
                 * np.maximum(np.minimum(best[3], rest[:, 3]) - np.maximum(best[1], rest[:, 1]) + 1, 0))
        survive = inter / (best_area + areas - inter + np.float32(1e-16)) < threshold
        rest, areas, order = rest[survive], areas[survive], order[survive]
    return torch.as_tensor(np.array(kept, dtype=np.int64), device=boxes.device)


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, *, conf_threshold: float, nms_threshold: float,
                      max_detections: int, nms: str = "torchvision", labels: torch.Tensor | None = None) -> list:
    """Per image: detections scoring at least ``conf_threshold``, greedy NMS at ``nms_threshold``
    (torchvision's, or MGCA's with ``nms`` ``mgca``: :func:`mgca_nms`), the best ``max_detections``;
    (boxes (K, 4), scores (K,)) as float64 numpy, best first. With ``labels`` (B, N) class indices, NMS runs
    within each class (MGCA's ``non_max_suppression``) and each image gives (boxes, scores, labels (K,) int64)."""
    from torchvision.ops import batched_nms
    from torchvision.ops import nms as torchvision_nms

    selected = []
    for index, (image_boxes, image_scores) in enumerate(zip(boxes, scores)):
        keep = image_scores >= conf_threshold
        image_boxes, image_scores = image_boxes[keep], image_scores[keep]
        image_labels = None if labels is None else labels[index][keep]
        if image_labels is None:
            order = (mgca_nms(image_boxes, image_scores, nms_threshold, max_detections) if nms == "mgca" else
                     torchvision_nms(image_boxes.float(), image_scores.float(), nms_threshold)[:max_detections])
        elif nms == "mgca":
            kept = [torch.zeros(0, dtype=torch.long, device=image_boxes.device)]
            for c in torch.unique(image_labels):
                members = torch.nonzero(image_labels == c).reshape(-1)
                kept.append(members[mgca_nms(image_boxes[members], image_scores[members], nms_threshold,
                                             max_detections)])
            kept = torch.cat(kept)
            # Each class's kept boxes merged best first (stable), as one image's detections.
            best = np.argsort(-image_scores[kept].float().cpu().numpy(), kind="stable")[:max_detections]
            order = kept[torch.as_tensor(best, dtype=torch.long, device=kept.device)]
        else:
            order = batched_nms(image_boxes.float(), image_scores.float(), image_labels, nms_threshold)[:max_detections]
        picked = (image_boxes[order].double().cpu().numpy(), image_scores[order].double().cpu().numpy())
        selected.append(picked if image_labels is None else (*picked, image_labels[order].long().cpu().numpy()))
    return selected


def fraction_settings(config: dict[str, Any], fraction: float) -> tuple[float, int]:
    """(learning rate, batch size) of a run: MGCA's run script uses ``lr_1pct`` / ``batch_size_1pct``
    for 1 % of the training data and ``lr`` / ``batch_size`` otherwise."""
    if fraction <= ONE_PERCENT + 1e-12:
        return float(config["lr_1pct"]), int(config["batch_size_1pct"])
    return float(config["lr"]), int(config["batch_size"])


def _check_config(config: dict[str, Any]) -> None:
    for key, choices in CHOICES.items():
        if config[key] not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {config[key]!r}")
    if config["val_metric"] not in ("map", "map_mgca"):
        raise ConfigError(f"val_metric must be 'map' or 'map_mgca', got {config['val_metric']!r}")
    if config["neck_width"] < 4 or config["neck_width"] % 4:
        raise ConfigError(f"neck_width must be a positive multiple of 4, got {config['neck_width']!r}")
    for key in ("conf_threshold", "nms_threshold", "ignore_threshold"):
        if not 0.0 <= config[key] <= 1.0:
            raise ConfigError(f"{key} must lie in [0, 1], got {config[key]!r}")
    if config["feature_cache_gb"] < 0:
        raise ConfigError(f"feature_cache_gb must be >= 0 (0 keeps no feature in memory), "
                          f"got {config['feature_cache_gb']!r}")
    n_classes_of(config)  # the task's classes, where it names them, are a list of distinct names


def run_detection(encoder: nn.Module, source: DetectionSource, split: SplitIds, config: dict[str, Any], *,
                  seed: int, device: torch.device, progress: bool = True,
                  predictions: Path | None = None) -> dict[str, Any]:
    """Train the YOLOv3 head on ``split.train``, early-stop on ``split.val`` mAP, score ``split.test``.

    Returns ``metrics`` (``map`` over every test image, ``ap40`` … ``ap75``, and ``map_mgca`` with
    MGCA's image skipping; macro over the task's ``classes`` where it has several), ``ci`` (of each),
    ``per_image`` ({}: mAP has no per-image part), ``n``
    (images per part, test positives, negatives, boxes and detections), ``training`` (epochs, best
    epoch, learning rate and batch size used, encoder stages used, history) and ``timing``.

    Raises:
        ConfigError: a bad option, or an encoder the head cannot use.
        DataError: the validation or test part holds no box (mAP would be undefined).
        VlpbenchError: too few training images for one batch.
        NonFiniteLossError: the loss diverged (a VlpbenchError).
    """
    _check_config(config)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    size = int(config["image_size"])
    lr, batch_size = fraction_settings(config, split.fraction)
    if len(split.train) < batch_size:
        raise VlpbenchError(f"only {len(split.train)} training images for batch size {batch_size} "
                            "(training drops the last incomplete batch, as MGCA does)")
    ranks = distributed.world_size()
    if batch_size % ranks:
        raise ConfigError(f"batch_size={batch_size} does not split evenly among {ranks} processes: use a "
                          f"multiple of {ranks} (each process trains on batch_size / {ranks} images)")
    log.info("detection: %d train, %d val, %d test images at %dpx; lr %g, batch %d",
             len(split.train), len(split.val), len(split.test), size, lr, batch_size)
    with distributed.main_first():  # rank 0 fills the image cache, the others then read it
        train = DetectionImages(source, split.train, size, config, "train", progress)
        val = DetectionImages(source, split.val, size, config, "val", progress)
        test = DetectionImages(source, split.test, size, config, "test", progress)
    for name, part in (("validation", val), ("test", test)):
        if not any(len(t) for t in part.truths):
            raise DataError(f"the {name} part ({len(part)} images) holds no box, so its mAP is undefined")
    t_data = time.perf_counter()

    encoder = encoder.to(device)
    stages = deepest_stages(encoder, size)
    n_classes = n_classes_of(config)
    model = Detector(encoder, stages, int(config["neck_width"]), n_classes).to(device)
    for part in (model.encoder, model.head):  # the head reads the encoder's maps directly, not model.forward
        prepare_model(part, device, precision_of(config))
    head: nn.Module = model.head
    if distributed.is_active():
        distributed.global_batchnorm(model)
        # DDP starts every rank from rank 0's head; global BatchNorm keeps the buffers equal after that.
        head = torch.nn.parallel.DistributedDataParallel(
            model.head, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    # The feature files live in the cache folder for this run only: removed at its end, failed or not.
    scratch_root = cache_dir() / "detection"
    scratch_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="features-", dir=scratch_root) as scratch, cudnn_benchmark(device):
        trained = _train_and_test(model, head, train, val, test, config, device=device, lr=lr,
                                  batch_size=batch_size, generator=generator, scratch=Path(scratch),
                                  progress=progress)
    fitted, detections, storage = trained["fitted"], trained["detections"], trained["storage"]
    trained_batch = trained["inference_batch"]
    t_train = trained["t_train"]
    if predictions is not None and distributed.is_main():  # every rank holds all detections: one file
        write_detections(predictions, test.ids, detections, multiclass="classes" in config)
    evaluated = evaluate_detection(test.truths, detections, n_resamples=int(config["bootstrap_resamples"]), seed=seed,
                                   ids=test.ids, truth_labels=test.truth_labels, n_classes=n_classes)
    t_test = time.perf_counter()
    return {
        **evaluated,
        "n": {"train": len(train), "val": len(val), **evaluated["n"]},
        "training": {"head": head_name(encoder, "yolov3"), "epochs": fitted.epochs, "best_epoch": fitted.best_epoch,
                     "best_val": fitted.best_value,
                     "val_metric": config["val_metric"], "lr": lr, "batch_size": batch_size, "n_classes": n_classes,
                     "stages_used": [{"index": s.index, "stride": s.stride, "channels": s.channels} for s in stages],
                     "features": storage, "history": fitted.history, "world_size": ranks,
                     "batch_per_process": batch_size // ranks, "effective_batch": batch_size,
                     "inference_batch": trained_batch, "frozen_forward": {"channels_last": device.type == "cuda",
                                        "cudnn_benchmark": device.type == "cuda"}},
        "timing": {"data_s": t_data - t0, "train_s": t_train - t_data, "test_s": t_test - t_train,
                   "total_s": t_test - t0},
    }


def _train_and_test(model: Detector, head: nn.Module, train: DetectionImages, val: DetectionImages,
                    test: DetectionImages, config: dict[str, Any], *, device: torch.device, lr: float,
                    batch_size: int, generator: torch.Generator, scratch: Path, progress: bool) -> dict[str, Any]:
    """Train the head (features stored by :func:`feature_storage`, files under ``scratch``), early-stop on
    validation mAP, predict the test part: ``fitted``, test ``detections``, each part's feature ``storage``
    (:meth:`PartFeatures.describe`) and the end time of training (``t_train``)."""
    size = int(config["image_size"])
    n_classes = n_classes_of(config)
    anchors = scaled_anchors(size)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=lr, betas=tuple(config["betas"]),
                                  weight_decay=config["weight_decay"])
    # A frozen encoder in eval mode on unaugmented images gives the same features every epoch.
    shapes, sizes = _feature_shapes(model, size, device), {"train": len(train), "val": len(val)}
    storage = feature_storage(shapes, sizes, float(config["feature_cache_gb"]), frozen=bool(config["freeze_bn"]),
                              disk_bytes=shutil.disk_usage(scratch).free - DISK_RESERVE_BYTES)
    # Feature extraction and prediction batches sized to fill the device (vlpbench.protocols.batch_fill),
    # leaving room for the features the run keeps on the device.
    eval_batch = inference_batch(config, "eval_batch_size", device=device, fallback=batch_size,
                                 limit=max(len(train), len(val), len(test)),
                                 reserve_bytes=memory_bytes(shapes, sizes, storage),
                                 probe=lambda count: _probe(model, count, size, config, device))
    part_features = {name: eval_batch.run(lambda count, name=name, part=part: PartFeatures(
        model, part, config, device, storage=storage[name], batch_size=count, progress=progress, desc=name,
        folder=scratch)) for name, part in (("train", train), ("val", val))}
    train_features, val_features = part_features["train"], part_features["val"]

    def validate(epoch: int) -> dict[str, float | None]:
        val_loss, val_detections = eval_batch.run(lambda count: _predict(model, val, val_features, anchors, config,
                                                                         count))
        # A diverged head's boxes are not finite, and scoring them would fail on that instead.
        require_finite(val_loss, "validation loss", epoch, LR_OPTIONS)
        val_metrics = _map_metrics(_matches(val.truths, val.truth_labels, val_detections, n_classes))
        return {"val_loss": val_loss, "val_map": val_metrics["map"], "val_map_mgca": val_metrics["map_mgca"]}

    # The first epoch, then any with a strictly higher validation mAP (an undefined mAP counts as the lowest).
    fitted = fit(
        lambda epoch: _train_epoch(model, head, train, train_features, optimizer, anchors, config, batch_size,
                                   generator, epoch),
        validate, max_epochs=int(config["max_epochs"]), patience=int(config["patience"]),
        select=Selection(f"val_{config['val_metric']}", "max"), lr_options=LR_OPTIONS,
        snapshot=lambda: _snapshot(model, config["freeze_bn"]),
        restore=lambda state: model.load_state_dict(state, strict=False), progress=progress)
    t_train = time.perf_counter()
    # Predicted once: computing the test features batch by batch is computing them once.
    test_features = PartFeatures(model, test, config, device, storage="batch", batch_size=batch_size,
                                 progress=progress, desc="test")
    _, detections = eval_batch.run(lambda count: _predict(model, test, test_features, anchors, config, count))
    return {"fitted": fitted, "detections": detections, "t_train": t_train, "inference_batch": eval_batch.describe(),
            "storage": {**{name: f.describe() for name, f in part_features.items()},
                        "test": test_features.describe()}}


def _probe(model: Detector, count: int, side: int, config: dict[str, Any], device: torch.device) -> None:
    """The encoder and the head on ``count`` blank ``side``-pixel images (the memory probe of
    :func:`~vlpbench.protocols.batch_fill.inference_batch`)."""
    x = _normalize(torch.zeros(count, side, side, dtype=torch.uint8, device=device), config)
    if device.type == "cuda":  # as PartFeatures feeds the encoder
        x = x.contiguous(memory_format=torch.channels_last)
    with probing(model):
        model.head(model.features(x))


def evaluate_detection(truths: list[np.ndarray], detections: Sequence[Sequence[np.ndarray]], *,
                       n_resamples: int, seed: int, ids: Sequence[str] | None = None,
                       truth_labels: Sequence[np.ndarray] | None = None, n_classes: int = 1) -> dict[str, Any]:
    """``metrics`` (:func:`_map_metrics`), ``ci`` of each of them (images resampled), ``per_image`` ({}: mAP has no
    per-image part) and the test counts in ``n`` of every test image's detections against its truth boxes;
    given the test ``ids``, also ``evidence`` (:mod:`vlpbench.evidence`: paired tests and subgroup metrics
    recompute the mAPs from it). ``detections`` are per image ``(boxes, scores)`` or, with ``n_classes`` > 1 and
    the truths' ``truth_labels``, ``(boxes, scores, labels)``: the mAPs are then macro over the classes.

    Raises:
        DataError: no test image holds a box, so mAP is undefined.
    """
    matches = _matches(truths, truth_labels, detections, n_classes)
    metrics = _map_metrics(matches)
    if metrics["map"] is None:
        raise DataError(f"the {len(truths)} test images hold no ground-truth box, so their mAP is undefined")
    positives = sum(1 for t in truths if len(t))
    ci = {name: value for name, value in detection_cis(matches, n_resamples=n_resamples, seed=seed).items()
          if metrics[name] is not None}
    if metrics["map_mgca"] is not None:
        # MGCA's mAP is the mAP of the images it keeps, so its CI resamples those images.
        ci["map_mgca"] = map_ci(matches.subset(mgca_kept(matches)), n_resamples=n_resamples, seed=seed)
    evaluated = {"metrics": metrics, "ci": ci, "per_image": {},
                 "n": {"test": len(truths), "test_positive": positives, "test_negative": len(truths) - positives,
                       "test_boxes": int(matches.n_truths.sum()),
                       "test_detections": int(matches.n_detections.sum())}}
    if ids is not None:
        evaluated["evidence"] = detection_evidence(ids, truths, detections, iou_thresholds=matches.iou_thresholds,
                                                   max_detections=MAX_DETECTIONS, truth_labels=truth_labels,
                                                   n_classes=n_classes)
    return evaluated


class DetectionProtocol(base.Protocol):
    """YOLOv3 head on the frozen encoder's deepest stages, COCO mAP over every test image (module docstring)."""

    name = "detection"
    table_group = "det"
    prediction_file = DETECTIONS_FILE
    prediction_files = f"{DETECTIONS_FILE}: COCO results [{{image_id, bbox [x, y, w, h], score}}] in image pixels"

    def run(self, adapter, source, split: SplitIds, config: dict[str, Any], *, seed: int, device: torch.device,
            progress: bool = True, predictions: Path | None = None) -> dict[str, Any]:
        """The adapter's encoder, frozen, under the YOLOv3 head (:func:`run_detection`)."""
        return run_detection(adapter.encoder(), source, split, config, seed=seed, device=device, progress=progress,
                             predictions=predictions)

    def score(self, predictions: Path, source, split: SplitIds, config: dict[str, Any], *,
              seed: int = 0) -> dict[str, Any]:
        """mAP of COCO-results detections (original pixels) on ``split.test``, every image counted; only the
        label files are read, never the images."""
        ids = list(split.test)
        path = self.prediction_path(Path(predictions))
        n_classes = n_classes_of(config)
        detections = read_coco_results(path, ids, n_classes=n_classes if "classes" in config else None)
        truths, truth_labels = truth_targets(source, ids, config)
        evaluated = evaluate_detection(truths, [detections[i] for i in ids],
                                       n_resamples=int(config["bootstrap_resamples"]), seed=seed, ids=ids,
                                       truth_labels=truth_labels, n_classes=n_classes)
        return {**evaluated, "n": {"train": 0, "val": 0, **evaluated["n"]}, "scoring": {"notes": []}}


PROTOCOL = DetectionProtocol()


def _snapshot(model: Detector, freeze_bn: bool) -> dict[str, torch.Tensor]:
    """The weights training changes: the head, and the encoder's BatchNorm statistics when they drift."""
    return state_copy({k: v for k, v in model.state_dict().items() if k.startswith("head.") or not freeze_bn})


def _feature_shapes(model: Detector, size: int, device: torch.device) -> list[tuple[int, ...]]:
    """The per-image shapes of ``model.features`` at ``size`` (what a kept part holds per image)."""
    was_training = model.encoder.training
    eval_backbone(model.encoder)
    shapes = [tuple(f.shape[1:]) for f in model.features(torch.zeros(1, 3, size, size, device=device))]
    model.encoder.train(was_training)
    return shapes


def _normalize(images: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    # uint8 grey → [0, 1] → the task's mean/std, on the 3 channels the encoder expects.
    return ((images.float().div_(255.0) - config["mean"]) / config["std"]).unsqueeze(1).expand(-1, 3, -1, -1)


def batch_targets(targets: list[torch.Tensor], labels: list[torch.Tensor] | None, grids: Sequence[tuple[int, int]],
                  anchors: torch.Tensor, size: int, config: dict[str, Any], n_classes: int) -> list[ScaleTargets]:
    """Each scale's YOLO targets (:func:`assign_targets`, on the host) of one batch's boxes, for prediction maps
    of ``grids`` (coarsest first) at a ``size`` input."""
    return [assign_targets(targets, grid, (size / grid[0], size / grid[1]), scale_anchors,
                           config["ignore_threshold"], anchor_iou=config["anchor_iou"], labels=labels,
                           n_classes=n_classes) for grid, scale_anchors in zip(grids, anchors)]


def _batch_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor], anchors: torch.Tensor, size: int,
                config: dict[str, Any], labels: list[torch.Tensor] | None = None,
                scale_targets: list[ScaleTargets] | None = None) -> torch.Tensor:
    """The YOLO loss of one batch, summed over scales; ``scale_targets``: the batch's targets assigned
    beforehand (:func:`batch_targets`), else assigned here."""
    if scale_targets is None:
        n_classes = outputs[0].shape[1] // len(anchors[0]) - BOX_ATTRIBUTES
        scale_targets = batch_targets(targets, labels, [tuple(raw.shape[-2:]) for raw in outputs], anchors, size,
                                      config, n_classes)
    total = outputs[0].new_zeros(())
    for raw, scale in zip(outputs, scale_targets):
        total = total + yolo_loss(raw, scale, box_weight=config["box_weight"], noobj_weight=config["noobj_weight"],
                                  noobj_assigned=config["noobj_assigned"])
    return total


def head_layout(model: Detector, features: PartFeatures, n_anchors: int) -> tuple[list[tuple[int, int]], int]:
    """The (H, W) of each of the head's prediction maps, coarsest first, and the classes it predicts, from one
    image's forward in eval mode (the training loop assigns targets ahead of the head, so it needs them first)."""
    with probing(model):
        outputs = model.head(features([0]))
    return [tuple(raw.shape[-2:]) for raw in outputs], outputs[0].shape[1] // n_anchors - BOX_ATTRIBUTES


def _train_epoch(model: Detector, head: nn.Module, data: DetectionImages, features: PartFeatures, optimizer,
                 anchors, config, batch_size: int, generator: torch.Generator, epoch: int) -> float:
    """Mean training loss of one epoch; ``head`` is ``model.head`` or its DistributedDataParallel wrapper,
    which trains on this rank's share of each global batch."""
    model.train()
    if config["freeze_bn"]:
        eval_backbone(model.encoder)  # frozen means frozen: BatchNorm statistics do not drift
    size = data.images.shape[-1]
    grids, n_classes = head_layout(model, features, len(anchors[0]))
    device = features.device
    order = torch.randperm(len(data), generator=generator)

    def prepare(start: int) -> tuple[list[int], torch.Tensor | None, list[ScaleTargets]]:
        index = list(distributed.shard(order[start:start + batch_size].tolist()))
        targets = batch_targets([data.targets[i] for i in index], [data.target_labels[i] for i in index], grids,
                                anchors, size, config, n_classes)
        return index, features.host(index), [scale.pinned(device) for scale in targets]

    losses = EpochLosses()  # read once per epoch
    # drop_last, as MGCA. The next batches' features are read and their targets assigned while the head trains
    # (vlpbench.protocols.prefetch); page-locked, they reach the GPU without the host waiting.
    for index, host, targets in prefetch(prepare, range(0, len(data) - batch_size + 1, batch_size), device):
        loss = _batch_loss(head(features.on_device(index, host)), [], anchors, size, config,
                           scale_targets=[scale.on(device) for scale in targets])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.add(loss, len(index))
    # Each rank's loss is the mean over its equal share: the global batch's mean is their mean.
    return distributed.all_reduce_sum([losses.total(epoch)])[0] / (len(losses) * batch_size)


@torch.inference_mode()
def _predict(model: Detector, data: DetectionImages, features: PartFeatures, anchors, config,
             batch_size: int) -> tuple[float, list[Detections]]:
    """Loss and detections (boxes in original pixels, scores, class indices) of every image of ``data``; under
    torchrun each rank predicts its block of whole batches and every rank returns the gathered whole."""
    model.eval()
    size = data.images.shape[-1]
    total = 0.0
    detections: list[Detections] = []
    first, stop = distributed.batch_block(len(data), batch_size)

    def prepare(start: int) -> tuple[list[int], torch.Tensor | None]:
        index = list(range(start, min(start + batch_size, stop)))
        return index, features.host(index)

    for index, host in prefetch(prepare, range(first, stop, batch_size), features.device):
        outputs = model.head(features.on_device(index, host))
        total += _batch_loss(outputs, [data.targets[i] for i in index], anchors, size, config,
                             [data.target_labels[i] for i in index]).item() * len(index)
        boxes, scores, labels = decode_batch(outputs, anchors, size)
        selected = select_detections(boxes, scores, conf_threshold=config["conf_threshold"],
                                     nms_threshold=config["nms_threshold"], max_detections=config["max_detections"],
                                     nms=config["nms"], labels=labels)
        for i, (image_boxes, image_scores, image_labels) in zip(index, selected):
            detections.append((image_boxes * np.tile(data.scales[i], 2), image_scores, image_labels))
    if distributed.is_active():
        detections = _gathered_detections(detections, first, len(data))
    return distributed.all_reduce_sum([total])[0] / len(data), detections


def _gathered_detections(local: list[Detections], first: int, n: int) -> list[Detections]:
    """The detections of all ``n`` images, in image order, from every rank's block starting at ``first``.

    Each detection travels as one float64 row (image index, box, score, class); rows arrive in rank order, so
    sorted by image, and each image's rows keep their order (best first).
    """
    rows = [np.column_stack([np.full(len(scores), first + k, np.float64), boxes, scores, labels])
            for k, (boxes, scores, labels) in enumerate(local)]
    every = distributed.gather_arrays(np.concatenate(rows) if rows else np.empty((0, 7)))
    bounds = np.searchsorted(every[:, 0], np.arange(n + 1), side="left")
    return [(every[a:b, 1:5], every[a:b, 5], every[a:b, 6].astype(np.int64)) for a, b in zip(bounds[:-1], bounds[1:])]


def _matches(truths: list[np.ndarray], truth_labels: Sequence[np.ndarray] | None,
             detections: Sequence[Sequence[np.ndarray]], n_classes: int) -> ClassMatches:
    """The matches of per-image ``(boxes, scores[, labels])`` against the truths (class 0 where unlabelled)."""
    parts = [detection_parts(d) for d in detections]
    if truth_labels is None:
        truth_labels = [np.zeros(len(t), dtype=np.int64) for t in truths]
    return ClassMatches(truths, truth_labels, [b for b, _, _ in parts], [s for _, s, _ in parts],
                        [l for _, _, l in parts], n_classes)


def _map_metrics(matches: ClassMatches) -> dict[str, float | None]:
    """``map``, ``ap40`` … ``ap75`` over every image and ``map_mgca`` with MGCA's skipping; None where undefined."""
    coco = summarize(matches)
    mgca = summarize(matches.subset(mgca_kept(matches)))
    metrics = {key: value for key, value in coco.items() if key == "map" or key.startswith("ap")}
    metrics["map_mgca"] = mgca["map"]
    return {key: (None if math.isnan(value) else float(value)) for key, value in metrics.items()}
