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

Cache layout under ``vlpbench.config.cache_dir() / "features"``: one store per encoder and pipeline,
holding each image's feature once::

    <dataset>/<store>/<shard>.npy    float32 (n images, channels), numpy format (never a pickle)
    <dataset>/<store>/<shard>.json   the store's key, the shard's image ids in row order (with their file
                                     stamps) and, under ``checksum``, the CRC-32 of the features' bytes
                                     (``crc32:<8 hex>``, ``vlpbench.checksum``)

``store`` is a hash of the key: the adapter (name, checkpoint sha256, options, encoder name), the pooling,
the data (reader and :func:`vlpbench.data.cache.source_fingerprint`), the pipeline, the resize rule the
image cache applied (``resize_method``: ``pil-bilinear-antialias`` for ``square``, ``mgca-pad-inter-area``
for ``pad``, the image cache's own names; features of the two resizes never share a store) and the
precision. Within a store an image is known by its id and, where the reader gives file paths but no
fingerprint of its own, its file's size and modification time. A request reads every image the store
holds and encodes only the others, written as a new shard; so the 1 %, 10 % and 100 % runs of a sweep,
every seed and every split over the same images pass each image through the encoder once, whatever
order they run in. An image's row is the same whichever request computed it, up to the rounding a
different batch composition may give (float32 ulps).

Both files of a shard appear by an atomic rename, the ``.json`` last; a shard that is unreadable,
truncated, of the wrong shape, whose ``.json`` does not hold the store's key, or whose features do not
match the checksum there is logged with its name, removed and its images computed again, never trusted.
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
from vlpbench.protocols.batch_fill import InferenceBatch, given
from vlpbench.protocols.prefetch import pinned, prefetch
from vlpbench.protocols.runtime import DEFAULT_PRECISION, prepare_model, to_device

log = logging.getLogger("vlpbench")

FORMAT_VERSION = 2
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


def uint8_pixels(images: np.ndarray, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """Images ``index`` of a uint8 (memory-mapped) stack, read into host memory ``(B, S, S)`` uint8 (page-locked
    where bound for CUDA): the host half of :func:`uint8_batch`."""
    return pinned(torch.from_numpy(np.ascontiguousarray(images[index])), device)


def as_unit_float(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 pixels ``(B, S, S)`` → float ``(B, 1, S, S)`` in [0, 1] on ``device``: the device half of
    :func:`uint8_batch`."""
    return to_device(pixels, device).unsqueeze(1).float().div_(255.0)


def uint8_batch(images: np.ndarray, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """Images ``index`` of a uint8 (memory-mapped) stack as float ``(B, 1, S, S)`` in [0, 1] on ``device``."""
    return as_unit_float(uint8_pixels(images, index, device), device)


def batch_ranges(n: int, batch_size: int) -> list[np.ndarray]:
    """The indices of each batch of ``range(n)`` in order, the last one possibly smaller."""
    return [np.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


@torch.inference_mode()
def extract_features(encoder: torch.nn.Module, images: np.ndarray, pre: Preprocessing, *, batch_size: int,
                     device: torch.device, progress: bool = False, desc: str = "features",
                     depth: int | None = None) -> np.ndarray:
    """Pooled features ``(n, channels)`` float32 of uint8 images ``(n, resize, resize)`` through ``pre``; the
    next batches are read while the encoder runs (``depth``: :func:`vlpbench.protocols.prefetch.prefetch`)."""
    freeze(encoder).to(device)
    channels = pooled_channels(encoder)
    features = np.empty((len(images), channels), dtype=np.float32)
    bar = tqdm(total=len(images), desc=desc, disable=not progress, leave=False, unit="img")

    def read(index: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        return index, uint8_pixels(images, index, device)

    for index, pixels in prefetch(read, batch_ranges(len(images), batch_size), device, depth):
        x = encoder_input(center_crop(as_unit_float(pixels, device), pre.crop), pre)
        features[index] = pooled(encoder, x).float().cpu().numpy()
        bar.update(len(index))
    bar.close()
    return features


@dataclass
class Features:
    """Features of one id list, in its order, and where they came from.

    Attributes:
        values: ``(n, channels)`` float32.
        computed: how many distinct images this call passed through the encoder (0: every row was read
            from the cache).
        paths: the cache files the rows were read from or written to.
        seconds: wall time of the call.
    """

    values: np.ndarray
    computed: int
    paths: list[Path]
    seconds: float

    @property
    def hit(self) -> bool:
        """Whether every row came from the cache (the encoder did not run)."""
        return self.computed == 0

    def cache_state(self) -> str:
        """How a record states it: ``hit``, ``miss``, or ``partial`` with how many images were encoded."""
        if self.hit:
            return "hit"
        n = len(self.values)
        return "miss" if self.computed == n else f"partial ({self.computed} of {n} encoded)"


def feature_key(adapter: Any, source: Any, pre: Preprocessing, precision: str = DEFAULT_PRECISION) -> dict[str, Any]:
    """What identifies a feature store, everything but the images (JSON-able); see the module docstring."""
    return {
        "format": FORMAT_VERSION,
        "adapter": {"name": adapter.name, "checkpoint_sha256": adapter.checkpoint_sha256,
                    "options": {k: adapter.options[k] for k in sorted(adapter.options)},
                    "encoder_name": adapter.encoder_name},
        "data": {"dataset": dataset_name(source),
                 "reader": f"{type(source).__module__}.{type(source).__qualname__}",
                 "fingerprint": source_fingerprint(source)},
        "preprocessing": {**{k: v for k, v in asdict(pre).items() if k != "resize_rule"},
                          "resize_method": METHOD_TAGS[pre.cache_method], "pillow": PIL.__version__,
                          "pool": pool_description(adapter)},
        "precision": precision,
    }


def store_folder(source: Any, key: dict[str, Any]) -> Path:
    """The folder of the feature store ``key`` names: ``cache_root() / <dataset> / <32 hex of its hash>``."""
    text = json.dumps(key, sort_keys=True)
    return cache_root() / dataset_name(source) / hashlib.sha256(text.encode()).hexdigest()[:32]


def image_keys(source: Any, ids: Sequence[str]) -> list[tuple[str, str]]:
    """Each image's key within a store: its id and a stamp, the size and modification time of its file where
    the reader has no fingerprint of its own but gives file paths (an image edited in place is encoded
    again), else ``""``."""
    locate = getattr(source, "path", None) if getattr(source, "fingerprint", None) is None else None
    keys = []
    for image_id in ids:
        stamp = ""
        path = locate(image_id) if locate is not None else None
        if isinstance(path, (str, os.PathLike)):
            with contextlib.suppress(OSError):  # a missing file fails later, where the image is read
                stat = os.stat(path)
                stamp = f"{stat.st_size} {stat.st_mtime_ns}"
        keys.append((image_id, stamp))
    return keys


class RunEncoder:
    """The adapter's encoder for one run, frozen and prepared for ``device`` and ``precision``: built on first
    use, then the same module for every split part (building one loads the checkpoint's weights again)."""

    def __init__(self, adapter: Any, device: torch.device, precision: str = DEFAULT_PRECISION):
        self.adapter, self.device, self.precision = adapter, device, precision
        self._module: torch.nn.Module | None = None

    def __call__(self) -> torch.nn.Module:
        if self._module is None:
            self._module = prepare_model(freeze(self.adapter.encoder()), self.device, self.precision)
        return self._module


def cached_features(adapter: Any, source: Any, ids: Sequence[str], pre: Preprocessing, *,
                    batch_size: int | InferenceBatch, device: torch.device, progress: bool = False, desc: str = "features",
                    precision: str = DEFAULT_PRECISION, encoder: RunEncoder | None = None) -> Features:
    """Pooled frozen-encoder features of ``ids``: each image's row from the feature store, the images the
    store lacks computed and stored there.

    ``batch_size``: images per encoder call, or the run's :class:`~vlpbench.protocols.batch_fill.InferenceBatch`
    (an automatic size is then chosen only if some image needs computing).
    ``encoder``: the run's :class:`RunEncoder`, shared by the calls of one run (default: one for this call).
    Only the images without a stored row are read from the image cache and passed through
    ``adapter.encoder()``, run in ``precision`` (``vlpbench.protocols.runtime``); when the store has them
    all, neither is touched. Features computed in bf16 have a store of their own.

    Raises:
        VlpbenchError: the cache folder cannot be written.
    """
    started = time.perf_counter()
    ids = list(ids)
    key = feature_key(adapter, source, pre, precision)
    folder = store_folder(source, key)
    wanted = image_keys(source, ids)
    rows, paths = _read_store(folder, key, set(wanted))
    found = np.array([image in rows for image in wanted], dtype=bool)
    if distributed.all_true(found.all()):
        log.info("feature cache: hit, %d images from %d file(s) in %s", len(ids), len(paths), folder)
        return Features(_stack(rows, wanted), 0, paths, time.perf_counter() - started)

    # Every rank computes the same images: those rank 0 lacks, or all of them where another rank lacks one
    # that rank 0 found (a file that changed between the ranks' reads).
    missing = distributed.broadcast_object(np.flatnonzero(~found).tolist())
    elsewhere = found.copy()
    elsewhere[missing] = True
    if not distributed.all_true(elsewhere.all()):
        missing = list(range(len(ids)))
    todo = list(dict.fromkeys(wanted[k] for k in missing))  # distinct images, in request order
    log.info("feature cache: computing %d of %d %s features into %s", len(todo), len(ids), desc, folder)
    with distributed.main_first():  # rank 0 fills the image cache, the others then read it
        images = load_images(source, [image_id for image_id, _ in todo], pre.resize, progress, pre.cache_method)
    encoder = encoder or RunEncoder(adapter, device, precision)
    batch = given(batch_size)

    def one_pass(size: int) -> np.ndarray:
        # Under torchrun each rank encodes its block of whole batches; the gathered features are in todo order.
        start, stop = distributed.batch_block(len(todo), size)
        return distributed.gather_arrays(extract_features(encoder(), images[start:stop], pre, batch_size=size,
                                                          device=device, progress=progress, desc=desc))

    values = batch.run(one_pass)
    path = _write_shard(folder, key, todo, values)
    distributed.barrier()
    rows.update(zip(todo, values))
    return Features(_stack(rows, wanted), len(todo), [*paths, path], time.perf_counter() - started)

def cache_root() -> Path:
    """The feature cache's folder: ``vlpbench.config.cache_dir() / "features"``."""
    return cache_dir() / "features"


def _stack(rows: dict[tuple[str, str], np.ndarray], wanted: list[tuple[str, str]]) -> np.ndarray:
    """The rows of ``wanted``, in order, as one float32 array."""
    return np.stack([rows[image] for image in wanted]).astype(np.float32, copy=False)


def _shard_stem(images: list[tuple[str, str]]) -> str:
    """A shard's file name: a hash of its images in order (the same images give the same name)."""
    digest = hashlib.sha256()
    for image_id, stamp in images:
        digest.update(f"{image_id}\0{stamp}\n".encode())
    return digest.hexdigest()[:32]


def _write_shard(folder: Path, key: dict[str, Any], images: list[tuple[str, str]], values: np.ndarray) -> Path:
    """Store ``values``, the rows of ``images``, as one shard (rank 0 writes); the ``.npy`` path."""
    stem = _shard_stem(images)
    path = folder / f"{stem}.npy"
    if not distributed.is_main():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A cache, rebuilt when damaged: no fsync.
        with atomic_path(path, fsync=False) as tmp, open(tmp, "wb") as handle:
            np.save(handle, values, allow_pickle=False)
        # Written after the features: a .json names features that are complete.
        stored = {**key, "ids": [image_id for image_id, _ in images], "stamps": [stamp for _, stamp in images],
                  "checksum": content_checksum(values)}
        atomic_write(folder / f"{stem}.json", json.dumps(stored, indent=1, sort_keys=True) + "\n", fsync=False)
    except OSError as exc:
        raise VlpbenchError(f"cannot write the feature cache {path}: {exc}; "
                            "free disk space or set VLPBENCH_CACHE to another folder") from exc
    return path


def _read_store(folder: Path, key: dict[str, Any],
                wanted: set[tuple[str, str]]) -> tuple[dict[tuple[str, str], np.ndarray], list[Path]]:
    """The stored rows of the images ``wanted`` that the store holds, and the ``.npy`` files read.

    A shard that cannot be trusted is logged, removed and passed over. The shard holding most of the wanted
    images is read first (fewer files read), ties by name, so every process takes a row from the same file.
    """
    shards = []
    for key_path in sorted(folder.glob("*.json")):
        if (listed := _shard_listing(key_path, key)) is not None:
            shards.append((key_path, *listed))
    shards.sort(key=lambda shard: (-len(wanted.intersection(shard[1])), shard[0].name))
    rows: dict[tuple[str, str], np.ndarray] = {}
    paths = []
    for key_path, images, checksum in shards:
        need = [r for r, image in enumerate(images) if image in wanted and image not in rows]
        if not need:
            continue
        path = key_path.with_suffix(".npy")
        values = _shard_values(path, key_path, checksum, len(images))
        if values is None:
            _discard(key_path)
            continue
        rows.update((images[r], values[r]) for r in need)
        paths.append(path)
    return rows, paths


def _shard_listing(key_path: Path, key: dict[str, Any]) -> tuple[list[tuple[str, str]], str] | None:
    """A shard's images and checksum from its ``.json``; None when gone, or untrustworthy (logged, removed)."""
    try:
        stored = json.loads(key_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError, OSError) as exc:
        log.warning("feature cache: %s is unreadable (%s); recomputing its images", key_path, exc)
        _discard(key_path)
        return None
    if not isinstance(stored, dict):
        stored = {}
    ids, stamps, checksum = stored.pop("ids", None), stored.pop("stamps", None), stored.pop("checksum", None)
    # The key as JSON gives it back (tuples as lists), to compare like with like.
    if stored != json.loads(json.dumps(key)):
        log.warning("feature cache: %s does not hold the expected key; recomputing its images", key_path)
        _discard(key_path)
        return None
    if (not isinstance(ids, list) or not isinstance(stamps, list) or len(ids) != len(stamps)
            or not all(isinstance(v, str) for v in ids + stamps) or not isinstance(checksum, str)):
        log.warning("feature cache: %s lacks its image list or checksum; recomputing its images", key_path)
        _discard(key_path)
        return None
    return list(zip(ids, stamps)), checksum


def _shard_values(path: Path, key_path: Path, checksum: str, n: int) -> np.ndarray | None:
    """A shard's features, or None when absent or not trustworthy (logged)."""
    try:
        values = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        log.warning("feature cache: %s is gone while %s lists it; recomputing its images", path, key_path.name)
        return None
    except (OSError, ValueError, EOFError) as exc:
        log.warning("feature cache: %s is unreadable (%s); recomputing its images", path, exc)
        return None
    if values.dtype != np.float32 or values.ndim != 2 or len(values) != n or not np.isfinite(values).all():
        log.warning("feature cache: %s holds %s %s, expected finite float32 (%d, channels); recomputing its images",
                    path, values.dtype, values.shape, n)
        return None
    found = content_checksum(values)
    if found != checksum:
        log.warning("feature cache: %s does not match the checksum in %s (stored %s, found %s): its values "
                    "changed after they were written; recomputing its images", path, key_path.name, checksum, found)
        return None
    return values


def _discard(key_path: Path) -> None:
    """Remove an untrustworthy shard (rank 0; its ``.json`` first, so no listing names missing features)."""
    if distributed.is_main():
        for path in (key_path, key_path.with_suffix(".npy")):
            with contextlib.suppress(OSError):
                path.unlink()
