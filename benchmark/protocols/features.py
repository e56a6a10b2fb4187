"""Frozen-encoder features: the test-time image pipeline, pooled features, and their on-disk cache.

A linear probe on a frozen encoder sees each validation and test image through one deterministic
pipeline, so its features can be computed once and reused by every run of a sweep (fractions,
seeds, learning rates). :func:`cached_features` does that.

Pipeline (:class:`Preprocessing`): the image cache's resize to ``resize`` pixels square, a center
crop of ``crop`` pixels, scaling to [0, 1], the task's mean/std on the grey value repeated to three
channels, optionally MGCA's bilinear upsampling to 299 pixels, the encoder, and a global average pool
of its deepest feature map (a ViT pools itself: class token or mean token, :func:`pooled`).

The resize is config ``resize``:

- ``square`` (canonical): every image squashed to ``resize``² with Pillow's antialiased bilinear
  filter (the image cache's ``antialias`` method); the aspect ratio is not kept.
- ``pad``: MGCA's ``resize_img`` (HKU-MedAI/MGCA mgca/datasets/utils.py:28-74, called by ``get_imgs``
  and ``read_from_dicom``, utils.py:8-25,77-85): the longer side to ``resize`` with OpenCV's
  ``INTER_AREA``, the aspect ratio kept, the shorter side zero-padded to a square (the image cache's
  ``pad_area`` method).

The two differ by more than a padding band. A non-square image is stretched along its shorter side by
``square``: a CheXpert frontal film of the small release (about 320 x 390 px) by about 20 %, and
many COVIDx files likewise. ``pad`` keeps the anatomy's proportions, but then the 224 center crop of a
256² padded image cuts 16 px off each side of the longer axis and keeps part of the zero band of the
shorter one. Square chest films (most RSNA DICOMs, 1024²) come out alike under both, up to the
resampling filter.

Cache layout under ``vlpbench.config.cache_dir() / "features"``::

    <dataset>/<key>.npy     float32 (n images, channels), numpy format (never a pickle)
    <dataset>/<key>.json    the key's content: what produced the features, and under ``checksum`` the
                            CRC-32 of the features' bytes (``crc32:<8 hex>``, ``vlpbench.checksum``)

``key`` is a hash of the adapter (name, checkpoint sha256, options, encoder name), the pooling, the data (reader,
:func:`vlpbench.data.cache.source_fingerprint`, the image ids in order and, where the reader gives
file paths, each file's size and modification time), the pipeline and the resize rule the image
cache applied (``resize_method``: ``pil-bilinear-antialias`` for ``square``, ``mgca-pad-inter-area``
for ``pad``, the image cache's own names), so features of the two resizes never share an entry. Both files
appear by an atomic rename, the ``.json`` last; a file that is unreadable, truncated, of the wrong shape,
whose ``.json`` does not hold the expected key, or whose features do not match the checksum there is
recomputed with a warning naming it, never trusted. So is an entry written before checksums existed (a
``.json`` without ``checksum``): it cannot be verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlpbench import distributed
from vlpbench.checksum import content_checksum
from vlpbench.config import cache_dir
from vlpbench.data.cache import METHOD_TAGS, cached_images, source_fingerprint
from vlpbench.errors import ConfigError, VlpbenchError
from vlpbench.files import atomic_path, atomic_write
from vlpbench.protocols.runtime import DEFAULT_PRECISION, prepare_model, to_device

log = logging.getLogger("vlpbench")

FORMAT_VERSION = 1
MGCA_UPSAMPLE = 299  # MGCA ImageEncoder.resnet_forward: bilinear, align_corners=True, before the ResNet
# Config ``resize`` → the image cache's resize method (vlpbench.data.resize.RESIZE_METHODS).
RESIZES = {"square": "antialias", "pad": "pad_area"}
DEFAULT_RESIZE = "square"


@dataclass(frozen=True)
class Preprocessing:
    """The deterministic (test-time) image pipeline in front of a frozen encoder.

    Attributes:
        resize: side of the square image-cache resize.
        crop: side of the center crop fed to the encoder (before ``upsample_299``).
        mean, std: normalisation of the [0, 1] grey value repeated to three channels: one number for
            every channel (MGCA's 0.5) or one per channel (ImageNet's).
        upsample_299: MGCA's bilinear upsampling of the crop to 299 pixels.
        resize_rule: ``square`` or ``pad`` (module docstring); the feature key records it as the
            image cache's method name, not under this field's name, so ``square`` keys are those
            written before the option existed.
    """

    resize: int
    crop: int
    mean: float | tuple[float, float, float]
    std: float | tuple[float, float, float]
    upsample_299: bool = False
    resize_rule: str = DEFAULT_RESIZE

    def __post_init__(self) -> None:
        if self.resize_rule not in RESIZES:
            raise ConfigError(f"resize={self.resize_rule!r}: expected one of {', '.join(RESIZES)}")

    @property
    def cache_method(self) -> str:
        """The image cache's resize method for ``resize_rule``."""
        return RESIZES[self.resize_rule]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Preprocessing":
        """From a task config's ``resize_size``, ``image_size``, ``mean``, ``std``, ``upsample_299`` and
        ``resize`` (``square`` where the task has no such option).

        Raises:
            ConfigError: a size below 1, a crop larger than the resize, ``std`` not positive, or an
                unknown ``resize``.
        """
        pre = cls(resize=int(config["resize_size"]), crop=int(config["image_size"]),
                  mean=channel_values(config["mean"], "mean"), std=channel_values(config["std"], "std"),
                  upsample_299=bool(config["upsample_299"]), resize_rule=config.get("resize", DEFAULT_RESIZE))
        if pre.crop < 1 or pre.resize < pre.crop:
            raise ConfigError(f"image_size={pre.crop} must be between 1 and resize_size={pre.resize} "
                              "(the crop is taken from the resized image)")
        return pre


def channel_values(value: Any, key: str) -> float | tuple[float, float, float]:
    """A config ``mean`` / ``std``: one number, or a list of three (R, G, B); ``std`` must be positive.

    Raises:
        ConfigError: naming ``key``, for anything else.
    """
    values = value if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, 3) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{key}={value!r}: expected a number or a list of three numbers (R, G, B)")
    if key == "std" and min(values) <= 0:
        raise ConfigError(f"std={value!r} must be positive")
    return float(values[0]) if len(values) == 1 else tuple(float(v) for v in values)


def normalize(images01: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]) -> torch.Tensor:
    """``(B, 1, h, w)`` grey images in [0, 1] → ``(B, 3, h, w)`` normalised with ``mean`` / ``std``."""
    def per_channel(value: float | Sequence[float]) -> torch.Tensor:
        values = [value] * 3 if isinstance(value, (int, float)) else list(value)
        return torch.tensor(values, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)

    return (images01.expand(-1, 3, -1, -1) - per_channel(mean)) / per_channel(std)


def dataset_name(source: Any) -> str:
    """The dataset's name as the caches know it: readers live in ``vlpbench.data.<dataset>``."""
    return type(source).__module__.rpartition(".")[2]


def load_images(source: Any, ids: Sequence[str], size: int, progress: bool, method: str = "antialias") -> np.ndarray:
    """The images ``ids`` as a read-only uint8 memory-map ``(n, size, size)`` from the image cache,
    resized by the cache's ``method`` (``Preprocessing.cache_method``)."""
    return cached_images(source, dataset_name(source), list(ids), size, method=method, progress=progress)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size``² window of ``(B, C, H, W)`` images (torchvision's CenterCrop offsets)."""
    height, width = images.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def encoder_input(images01: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """``(B, 1, h, w)`` grey images in [0, 1] → the normalised 3-channel encoder input."""
    x = normalize(images01, pre.mean, pre.std)
    if pre.upsample_299:
        x = F.interpolate(x, size=(MGCA_UPSAMPLE, MGCA_UPSAMPLE), mode="bilinear", align_corners=True)
    return x


GLOBAL_AVERAGE = "global average of the deepest feature map"


def pooled(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder's pooled feature ``(B, pooled_channels(encoder))``: the global average pool of its deepest
    feature map, or, for an encoder that pools itself (a ViT: class token or mean token, declared by a
    ``pooled_channels`` attribute), ``encoder(x, output="pooled")``."""
    if hasattr(encoder, "pooled_channels"):
        return encoder(x, output="pooled")
    return encoder(x)[-1].mean(dim=(2, 3))


def pooled_channels(encoder: torch.nn.Module) -> int:
    """The width of :func:`pooled`'s feature."""
    return int(getattr(encoder, "pooled_channels", encoder.out_channels[-1]))


def pool_description(adapter: Any) -> str:
    """What :func:`pooled` computes for ``adapter``'s encoder: the adapter's ``pool_description`` (ViT
    adapters: ``cls`` or ``mean``) or the global average pool; in the feature-cache key and the record."""
    return getattr(adapter, "pool_description", GLOBAL_AVERAGE)


def freeze(encoder: torch.nn.Module) -> torch.nn.Module:
    """Frozen means frozen: no gradients and BatchNorm in eval mode (as MGCA's classifier does)."""
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder.eval()


def uint8_batch(images: np.ndarray, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """Images ``index`` of a uint8 (memory-mapped) stack as float ``(B, 1, S, S)`` in [0, 1] on ``device``."""
    return to_device(torch.from_numpy(np.ascontiguousarray(images[index])), device).unsqueeze(1).float().div_(255.0)


@torch.inference_mode()
def extract_features(encoder: torch.nn.Module, images: np.ndarray, pre: Preprocessing, *, batch_size: int,
                     device: torch.device, progress: bool = False, desc: str = "features") -> np.ndarray:
    """Pooled features ``(n, channels)`` float32 of uint8 images ``(n, resize, resize)`` through ``pre``."""
    freeze(encoder).to(device)
    channels = pooled_channels(encoder)
    features = np.empty((len(images), channels), dtype=np.float32)
    bar = tqdm(total=len(images), desc=desc, disable=not progress, leave=False, unit="img")
    for start in range(0, len(images), batch_size):
        index = np.arange(start, min(start + batch_size, len(images)))
        x = encoder_input(center_crop(uint8_batch(images, index, device), pre.crop), pre)
        features[index] = pooled(encoder, x).float().cpu().numpy()
        bar.update(len(index))
    bar.close()
    return features


@dataclass
class Features:
    """Features of one id list and where they came from (``hit``: read from the cache)."""

    values: np.ndarray
    hit: bool
    path: Path
    seconds: float


def feature_key(adapter: Any, source: Any, ids: Sequence[str], pre: Preprocessing) -> dict[str, Any]:
    """What identifies a set of cached features (JSON-able); see the module docstring."""
    return {
        "format": FORMAT_VERSION,
        "adapter": {"name": adapter.name, "checkpoint_sha256": adapter.checkpoint_sha256,
                    "options": {k: adapter.options[k] for k in sorted(adapter.options)},
                    "encoder_name": adapter.encoder_name},
        "data": {"dataset": dataset_name(source),
                 "reader": f"{type(source).__module__}.{type(source).__qualname__}",
                 "fingerprint": source_fingerprint(source),
                 "n": len(ids), "ids_sha256": _ids_digest(source, ids)},
        "preprocessing": {**{k: v for k, v in asdict(pre).items() if k != "resize_rule"},
                          "resize_method": METHOD_TAGS[pre.cache_method], "pillow": PIL.__version__,
                          "pool": pool_description(adapter)},
    }


def cached_features(adapter: Any, source: Any, ids: Sequence[str], pre: Preprocessing, *, batch_size: int,
                    device: torch.device, progress: bool = False, desc: str = "features",
                    precision: str = DEFAULT_PRECISION) -> Features:
    """Pooled frozen-encoder features of ``ids``, from the feature cache or computed and stored there.

    On a miss the images come from the image cache and the encoder from ``adapter.encoder()``, run in
    ``precision`` (``vlpbench.protocols.runtime``); on a hit neither is touched. Features computed in
    bf16 are cached under a key of their own.

    Raises:
        VlpbenchError: the cache folder cannot be written.
    """
    started = time.perf_counter()
    ids = list(ids)
    key = feature_key(adapter, source, ids, pre)
    if precision != DEFAULT_PRECISION:  # fp32 keys stay as they were, so existing caches stay valid
        key["precision"] = precision
    text = json.dumps(key, indent=2, sort_keys=True) + "\n"
    folder = cache_root() / dataset_name(source)
    stem = hashlib.sha256(text.encode()).hexdigest()[:32]
    path = folder / f"{stem}.npy"
    values = _load(path, folder / f"{stem}.json", key, len(ids))
    if distributed.all_true(values is not None):
        log.info("feature cache: hit %s (%d images)", path, len(ids))
        return Features(values, True, path, time.perf_counter() - started)

    log.info("feature cache: computing %d %s features into %s", len(ids), desc, path)
    with distributed.main_first():  # rank 0 fills the image cache, the others then read it
        images = load_images(source, ids, pre.resize, progress, pre.cache_method)
    # Under torchrun each rank encodes its block of whole batches; the gathered features are in id order.
    start, stop = distributed.batch_block(len(ids), batch_size)
    values = distributed.gather_arrays(extract_features(
        prepare_model(adapter.encoder(), device, precision), images[start:stop], pre, batch_size=batch_size,
        device=device, progress=progress, desc=desc))
    try:
        if distributed.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            # A cache, rebuilt when damaged: no fsync.
            with atomic_path(path, fsync=False) as tmp, open(tmp, "wb") as handle:
                np.save(handle, values, allow_pickle=False)
            # Written after the features: a .json names features that are complete.
            stored = {**key, "checksum": content_checksum(values)}
            atomic_write(folder / f"{stem}.json", json.dumps(stored, indent=2, sort_keys=True) + "\n", fsync=False)
    except OSError as exc:
        raise VlpbenchError(f"cannot write the feature cache {path}: {exc}; "
                            "free disk space or set VLPBENCH_CACHE to another folder") from exc
    distributed.barrier()
    return Features(values, False, path, time.perf_counter() - started)


def cache_root() -> Path:
    """The feature cache's folder: ``vlpbench.config.cache_dir() / "features"``."""
    return cache_dir() / "features"


def _ids_digest(source: Any, ids: Sequence[str]) -> str:
    """Hash of the ids in order and, where the reader has no fingerprint of its own but gives file
    paths, of each file's size and modification time (an image edited in place changes the key)."""
    locate = getattr(source, "path", None) if getattr(source, "fingerprint", None) is None else None
    digest = hashlib.sha256()
    for image_id in ids:
        stamp = ""
        path = locate(image_id) if locate is not None else None
        if isinstance(path, (str, os.PathLike)):
            with contextlib.suppress(OSError):  # a missing file fails later, where the image is read
                stat = os.stat(path)
                stamp = f"{stat.st_size} {stat.st_mtime_ns}"
        digest.update(f"{image_id}\0{stamp}\n".encode())
    return digest.hexdigest()


def _load(path: Path, key_path: Path, key: dict[str, Any], n: int) -> np.ndarray | None:
    """The cached features, or None when absent or not trustworthy (logged)."""
    try:
        stored = json.loads(key_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError, OSError) as exc:
        log.warning("feature cache: %s is unreadable (%s); recomputing", key_path, exc)
        return None
    checksum = stored.pop("checksum", None) if isinstance(stored, dict) else None
    # The key as JSON gives it back (tuples as lists), to compare like with like.
    if stored != json.loads(json.dumps(key)):
        log.warning("feature cache: %s does not hold the expected key; recomputing", key_path)
        return None
    if checksum is None:
        log.warning("feature cache: %s has no checksum (written before vlpbench checked cache content); "
                    "recomputing %s", key_path, path.name)
        return None
    try:
        values = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as exc:
        log.warning("feature cache: %s is unreadable (%s); recomputing", path, exc)
        return None
    if values.dtype != np.float32 or values.ndim != 2 or len(values) != n or not np.isfinite(values).all():
        log.warning("feature cache: %s holds %s %s, expected finite float32 (%d, channels); recomputing",
                    path, values.dtype, values.shape, n)
        return None
    found = content_checksum(values)
    if found != checksum:
        log.warning("feature cache: %s does not match the checksum in %s (stored %s, found %s): its values "
                    "changed after they were written; recomputing", path, key_path.name, checksum, found)
        return None
    return values
