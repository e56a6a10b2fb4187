"""Image cache: every image decoded once at the protocol's resolution, then read memory-mapped.

Decoding a 1024² JPEG DICOM and shrinking it costs far more than training a frozen-encoder head on
it, and every run of a sweep needs the same images. :func:`cached_images` decodes each image once
(in worker processes), stores it as raw uint8 at ``size``², and hands back one read-only memory-map
per requested id list. Layout under ``cache_dir()/images``::

    <dataset>/<size>px-<key>/          key: sha256 of INFO.json's content
        INFO.json                      format version, method, Pillow version, reader class,
                                       data fingerprint, size
        entries/<2 hex>/<32 hex>.u8    one image, size*size bytes row-major, then the CRC-32 of those
                                       bytes (4 bytes, little-endian); the name hashes the image id (and
                                       its file's size and mtime, see source_fingerprint)
        runs/<32 hex>.npy              the images of one id list, in order (.npy, memory-mapped)
        runs/<32 hex>.sum              the CRC-32 of that .npy file's pixels (``crc32:<8 hex>``)
        tmp/                           files being written

Every file appears by the rename of a complete temp file from ``tmp/`` (``vlpbench.files.atomic_path``,
without fsync, for speed), so a crash (kill -9 included) leaves either no file or a complete one, and
two runs filling at once write the same bytes under the same name. Temp files orphaned by a crash are
removed by a later fill once they are an hour old.

Every entry and run file is verified against its checksum when read (``vlpbench.checksum``): one whose
bytes changed while its size stayed the same (zeroed pixels, a flipped byte) is rebuilt with a warning
naming it, as a truncated one is. Entries and run files written before checksums existed (an entry of
exactly size*size bytes, a run file without its ``.sum``) cannot be verified and are rebuilt the same
way, so an old cache is decoded once more rather than trusted. A run file's ``.sum`` is written before
the run file itself appears, so a run file never lacks a checksum it should have. Verifying a run file
reads it once at about 1 GB/s on one core: 47 ms per 1000 images at 224², 0.1 % of decoding them from
1024² DICOMs (perf/cache_checksum.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import numbers
import os
import pickle
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL
from tqdm.auto import tqdm

from vlpbench.checksum import checksum_text, content_checksum, crc32
from vlpbench.config import cache_dir
from vlpbench.data.resize import RESIZE_METHODS, resize_antialias, resize_method
from vlpbench.errors import DataError, VlpbenchError
from vlpbench.files import atomic_path, atomic_write

log = logging.getLogger("vlpbench")

FORMAT_VERSION = 1
METHOD = "pil-bilinear-antialias"
MAX_WORKERS = 16
MIN_IMAGES_PER_WORKER = 4  # fewer images do not pay for starting a worker process
STALE_TEMP_S = 3600.0

INFO = "INFO.json"
CRC_BYTES = 4  # the CRC-32 after each entry's pixels
ENTRIES, RUNS, TMP = "entries", "runs", "tmp"
_DATASET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def resize_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 image → ``size``² with antialiased bilinear resampling (the ``antialias`` method).

    Pillow's BILINEAR filter widens its support by the scale factor when shrinking, so this is an
    area-aware (antialiased) bilinear resize.
    """
    return resize_antialias(pixels, size)


# What INFO.json (and the feature cache key) calls each resize method; ``antialias`` keeps the name caches
# were first written under.
METHOD_TAGS = {"antialias": METHOD, "linear": "cv2-inter-linear", "pad_area": "mgca-pad-inter-area"}


def source_fingerprint(source: Any) -> str:
    """What identifies the data behind ``source`` in the image cache's key.

    A reader may define ``fingerprint()`` (or a ``fingerprint`` attribute) returning a str that is
    cheap to compute (it runs on every call), the same in every process and run for the same data,
    and different whenever an image id could decode to other pixels (another root, another release,
    edited image files). Such a reader answers for its images: the cache then keys entries by image
    id alone. Without one, the cache uses the resolved ``source.root`` plus the size and modification
    time of ``source.label_file`` where the reader has one, and also keys each image's entry by the
    size and modification time of its file (``source.path(image_id)``, where the reader has ``path``
    and it returns a filesystem path), so an image edited in place is decoded again.

    Raises:
        VlpbenchError: the reader has neither ``fingerprint`` nor ``root``, or its fingerprint is
            not a str.
    """
    reader = type(source).__name__
    fingerprint = getattr(source, "fingerprint", None)
    if fingerprint is not None:
        value = fingerprint() if callable(fingerprint) else fingerprint
        if not isinstance(value, str):
            raise VlpbenchError(f"{reader}.fingerprint returned {type(value).__name__}; expected a str")
        return value
    root = getattr(source, "root", None)
    if root is None:
        raise VlpbenchError(f"{reader} has neither fingerprint() nor root, so the image cache cannot tell "
                            "its data from other data; give the reader a fingerprint() str")
    parts = [f"root={Path(root).resolve()}"]
    label_file = getattr(source, "label_file", None)
    if label_file is not None:
        try:
            stat = Path(label_file).stat()
        except OSError as exc:
            raise DataError(f"label file {label_file} of {reader} is unreadable: {exc.strerror}") from exc
        parts.append(f"label_file={Path(label_file).resolve()} {stat.st_size} {stat.st_mtime_ns}")
    return "\n".join(parts)


def cached_images(source: Any, dataset: str, ids: Sequence[str], size: int, *, method: str = "antialias",
                  workers: int | None = None, progress: bool = True) -> np.ndarray:
    """The images ``ids`` of ``source`` resized to ``size``² by the resize ``method`` (a name of
    :data:`vlpbench.data.resize.RESIZE_METHODS`; ``antialias`` is :func:`resize_image`), from the cache.

    Images not cached yet are decoded with ``source.image`` in ``workers`` processes (default: the
    usable CPUs, at most 16; threads, with a logged reason, where ``source`` cannot be pickled).
    The id list is then assembled once into one ``.npy`` file that later calls with the same ids
    (same order) map directly. The key covers ``dataset``, the reader class, its data (see
    :func:`source_fingerprint`), each image id, ``size``, the resize method and Pillow version,
    and :data:`FORMAT_VERSION`; any change gives new entries.

    Args:
        source: a dataset reader: ``image(id) -> uint8 (H, W)``, and ``fingerprint()`` or ``root``.
        dataset: the dataset's name, a folder name under the cache.
        ids: image ids, in the order wanted (repeats allowed).
        size: side of the square output.
        method: the resize rule (``antialias``, ``linear`` or ``pad_area``; see :mod:`vlpbench.data.resize`).
        workers: decoding processes; 1 decodes in this process.
        progress: show tqdm bars while decoding and assembling.

    Returns:
        A read-only ``np.memmap`` of shape ``(len(ids), size, size)``, uint8 (for no ids, an empty
        read-only array).

    Raises:
        DataError: an image file is missing (the message names it).
        CorruptImagesError: image files cannot be decoded; raised once every other image is stored,
            with each failed id and the reader's message naming its file. Nothing is stored for them.
        VlpbenchError: the cache cannot be written, or the reader cannot be fingerprinted.
        ValueError: a bad ``dataset`` name, ``size`` or ``workers``.
        ConfigError: an unknown ``method``.
    """
    ids = list(ids)
    resize_method(method)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    size = int(size)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not ids:
        empty = np.empty((0, size, size), dtype=np.uint8)
        empty.flags.writeable = False
        return empty
    folder = _key_folder(source, dataset, size, method)
    locate = getattr(source, "path", None) if getattr(source, "fingerprint", None) is None else None
    names = [_entry_name(locate, image_id) for image_id in ids]
    run = folder / RUNS / f"{hashlib.sha256(' '.join(names).encode()).hexdigest()[:32]}.npy"
    images = _open_run(run, len(ids), size)
    if images is not None:
        return images

    _sweep_temp(folder / TMP)
    todo = _missing(folder, ids, names, size)
    if todo:
        _fill(source, dataset, folder, todo, size, method, workers, progress)
    with atomic_path(run, fsync=False, tmp_dir=folder / TMP) as tmp:
        checksum = _assemble(tmp, folder, ids, names, size, dataset, progress)
        # Before the run file appears: a run file without its .sum is then one of an older vlpbench.
        atomic_write(_sum_path(run), checksum + "\n", fsync=False, tmp_dir=folder / TMP)
    images = _open_run(run, len(ids), size)
    if images is None:
        raise VlpbenchError(f"image cache file {run} was removed or damaged while it was being opened")
    return images


def clear_cache(dataset: str | None = None) -> int:
    """Delete the cached images of ``dataset`` (of every dataset when None); return the bytes freed.

    Open memory-maps stay valid (POSIX keeps deleted files' data until they are closed), but a run
    that is filling the same cache at that moment fails.
    """
    target = cache_root() if dataset is None else cache_root() / _checked_name(dataset)
    if not target.exists():
        return 0
    freed = 0
    for folder, _, files in os.walk(target):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                freed += os.stat(os.path.join(folder, name)).st_size
    shutil.rmtree(target)
    return freed


def cache_root() -> Path:
    """The image cache's folder: ``vlpbench.config.cache_dir() / "images"``."""
    return cache_dir() / "images"


def _checked_name(dataset: str) -> str:
    if not isinstance(dataset, str) or not _DATASET_NAME.fullmatch(dataset):
        raise ValueError(f"dataset name {dataset!r} cannot name a cache folder; expected letters, digits, "
                         "'_', '.' or '-', not starting with '.' or '-'")
    return dataset


def _key_folder(source: Any, dataset: str, size: int, method: str) -> Path:
    info = {
        "format": FORMAT_VERSION,
        "dataset": _checked_name(dataset),
        "reader": f"{type(source).__module__}.{type(source).__qualname__}",
        "fingerprint": source_fingerprint(source),
        "size": size,
        "method": METHOD_TAGS[method],
        "pillow": PIL.__version__,  # a Pillow release may resample differently
    }
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    folder = cache_root() / dataset / f"{size}px-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    try:
        for sub in (ENTRIES, RUNS, TMP):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        if not (folder / INFO).is_file():
            atomic_write(folder / INFO, text, fsync=False, tmp_dir=folder / TMP)
    except OSError as exc:
        raise VlpbenchError(f"cannot create the image cache in {folder}: {exc}; "
                            "set VLPBENCH_CACHE to a writable folder") from exc
    return folder


def _entry_name(locate: Any, image_id: str) -> str:
    """The entry's file name: a hash of the id and, where ``locate`` gives a file, its size and mtime."""
    stamp = ""
    path = locate(image_id) if locate is not None else None
    if isinstance(path, (str, os.PathLike)):  # not e.g. a zipfile.Path member
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise DataError(f"image file of {image_id} not found: {path} ({exc.strerror})") from exc
        stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    return hashlib.sha256(f"{image_id}\0{stamp}".encode()).hexdigest()[:32]


def _entry_path(folder: Path, name: str) -> Path:
    # 256 subfolders keep directories small for datasets of 100k+ images.
    return folder / ENTRIES / name[:2] / f"{name}.u8"


def _sum_path(run: Path) -> Path:
    return run.with_suffix(".sum")


def _open_run(path: Path, n: int, size: int) -> np.ndarray | None:
    """The run file memory-mapped, or None when absent or not trustworthy (logged): unreadable, of the
    wrong shape, without its checksum file, or not matching it."""
    try:
        images = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("image cache: %s is unreadable (%s); rebuilding it", path, exc)
        return None
    if images.shape != (n, size, size) or images.dtype != np.uint8:
        log.warning("image cache: %s holds %s %s, expected uint8 %s; rebuilding it",
                    path, images.dtype, images.shape, (n, size, size))
        return None
    try:
        stored = _sum_path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        log.warning("image cache: %s has no checksum file %s (written before vlpbench checked cache "
                    "content); rebuilding it", path, _sum_path(path).name)
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("image cache: checksum file %s is unreadable (%s); rebuilding %s", _sum_path(path), exc, path)
        return None
    found = content_checksum(images)
    if found != stored:
        log.warning("image cache: %s does not match its checksum (stored %s, found %s): its pixels changed "
                    "after it was written; rebuilding it", path, stored, found)
        return None
    return images


def _sweep_temp(tmp_dir: Path) -> None:
    cutoff = time.time() - STALE_TEMP_S
    for entry in os.scandir(tmp_dir):
        with contextlib.suppress(FileNotFoundError):  # a concurrent run renamed or swept it
            if entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)


def _missing(folder: Path, ids: list[str], names: list[str], size: int) -> list[tuple[str, str]]:
    """(id, entry name) of each distinct entry that is absent or fails :func:`_entry_pixels` (logged:
    each damaged entry by name, entries of the format before checksums once in all)."""
    todo, seen, unverifiable = [], set(), 0
    for image_id, name in zip(ids, names):
        if name in seen:
            continue
        seen.add(name)
        path = _entry_path(folder, name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            todo.append((image_id, name))
            continue
        except OSError as exc:
            raise VlpbenchError(f"image cache entry {path} (image {image_id}) is unreadable ({exc})") from exc
        if len(data) == size * size:
            unverifiable += 1
            todo.append((image_id, name))
        elif _entry_pixels(data, size) is None:
            log.warning("image cache: entry %s (image %s) is truncated or does not match its checksum; "
                        "decoding it again", path, image_id)
            todo.append((image_id, name))
    if unverifiable:
        log.warning("image cache: %d entries in %s have no checksum (written before vlpbench checked cache "
                    "content); decoding them again", unverifiable, folder)
    return todo


def _entry_pixels(data: bytes, size: int) -> np.ndarray | None:
    """The ``size``² pixels of an entry file's bytes, or None when its length or checksum is wrong."""
    if len(data) != size * size + CRC_BYTES:
        return None
    pixels = np.frombuffer(data, dtype=np.uint8, count=size * size)
    return pixels if crc32(pixels).to_bytes(CRC_BYTES, "little") == data[size * size:] else None


class CorruptImagesError(DataError):
    """Image files that cannot be decoded; ``failures`` maps each image id to the reader's message,
    which names the file."""

    def __init__(self, dataset: str, failures: dict[str, str]) -> None:
        self.failures = dict(failures)
        shown = "; ".join(f"{image_id}: {message}" for image_id, message in list(self.failures.items())[:5])
        more = f"; and {len(self.failures) - 5} more" if len(self.failures) > 5 else ""
        super().__init__(f"{len(self.failures)} {dataset} image(s) cannot be decoded: {shown}{more}. Replace the "
                         "files, or run without them (vlpbench run --skip-corrupt)")


class _Filler:
    """Decodes, resizes and stores one image; pickled into each worker process."""

    def __init__(self, source: Any, folder: Path, size: int, method: str) -> None:
        self.source = source
        self.folder = folder
        self.size = size
        self.method = method

    def __call__(self, item: tuple[str, str]) -> str | None:
        """Store the entry of ``item`` (id, entry name); return None, or the reader's DataError message
        for a file that cannot be decoded (nothing is stored for it)."""
        image_id, name = item
        try:
            pixels = self.source.image(image_id)
        except DataError as exc:  # a corrupt file: reported with the others once every image is tried
            return str(exc)
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
            described = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
            raise DataError(f"{type(self.source).__name__}.image({image_id!r}) returned {described}; "
                            "expected a uint8 (H, W) array")
        resized = RESIZE_METHODS[self.method](pixels, self.size).tobytes()
        data = resized + crc32(resized).to_bytes(CRC_BYTES, "little")
        path = _entry_path(self.folder, name)
        try:
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, data, fsync=False, tmp_dir=self.folder / TMP)
        except OSError as exc:
            raise VlpbenchError(f"cannot write image cache entry {path} (image {image_id}): {exc}; "
                                "free disk space or set VLPBENCH_CACHE to another folder") from exc
        return None


_worker_filler: _Filler | None = None


def _start_worker(payload: bytes) -> None:
    global _worker_filler
    _worker_filler = pickle.loads(payload)


def _fill_in_worker(item: tuple[str, str]) -> str | None:
    return _worker_filler(item)


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # honours taskset / cgroup CPU sets on Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _fill(source: Any, dataset: str, folder: Path, todo: list[tuple[str, str]], size: int, method: str,
          workers: int | None, progress: bool) -> None:
    filler = _Filler(source, folder, size, method)
    wanted = min(MAX_WORKERS, _usable_cpus()) if workers is None else workers
    count = max(1, min(wanted, len(todo) // MIN_IMAGES_PER_WORKER))
    bar = tqdm(total=len(todo), desc=f"cache {dataset} {size}px", unit="img", disable=not progress, leave=False)
    failures: dict[str, str] = {}
    try:
        if count == 1:
            log.info("image cache: decoding %d %s images into %s", len(todo), dataset, folder)
            for item in todo:
                if (failure := filler(item)) is not None:
                    failures[item[0]] = failure
                bar.update()
        else:
            _fill_in_pool(filler, todo, count, dataset, folder, failures, bar)
    finally:
        bar.close()
    if failures:
        raise CorruptImagesError(dataset, failures)


def _fill_in_pool(filler: _Filler, todo: list[tuple[str, str]], count: int, dataset: str, folder: Path,
                  failures: dict[str, str], bar: Any) -> None:
    """Decode ``todo`` in ``count`` worker processes (threads where the reader cannot be pickled),
    adding each id whose file cannot be decoded to ``failures``."""
    try:
        # Pickled once here rather than by the pool, to fall back before starting any process;
        # the workers then get the same copy whichever start method the platform uses.
        payload = pickle.dumps(filler)
    except Exception as exc:  # pickling fails with PicklingError, TypeError or AttributeError
        log.warning("image cache: %s cannot be pickled for worker processes (%s: %s); decoding in "
                    "%d threads instead", type(filler.source).__name__, type(exc).__name__, exc, count)
        pool, task = ThreadPoolExecutor(count), filler
    else:
        log.info("image cache: decoding %d %s images into %s with %d processes",
                 len(todo), dataset, folder, count)
        pool, task = ProcessPoolExecutor(count, initializer=_start_worker, initargs=(payload,)), _fill_in_worker
    chunk = max(1, min(32, len(todo) // (count * 8)))
    try:
        for (image_id, _), failure in zip(todo, pool.map(task, todo, chunksize=chunk)):
            if failure is not None:
                failures[image_id] = failure
            bar.update()
    except BrokenProcessPool as exc:
        raise VlpbenchError(f"an image cache worker process died while decoding {dataset} images ({exc}); "
                            "the images decoded so far are kept, run again") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _assemble(out: Path, folder: Path, ids: list[str], names: list[str], size: int, dataset: str,
              progress: bool) -> str:
    """Write the entries of ``ids`` in order to the .npy file ``out``; return the checksum of its pixels."""
    images = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(ids), size, size))
    running = 0
    pairs = tqdm(zip(ids, names), total=len(ids), desc=f"assemble {dataset} {size}px", unit="img",
                 disable=not progress, leave=False)
    for index, (image_id, name) in enumerate(pairs):
        path = _entry_path(folder, name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise VlpbenchError(f"image cache entry {path} (image {image_id}) vanished or is unreadable "
                                f"({exc}); was the cache cleared during the run?") from exc
        pixels = _entry_pixels(data, size)
        if pixels is None:  # verified a moment ago by _missing: something else is writing the cache
            raise VlpbenchError(f"image cache entry {path} (image {image_id}) holds {len(data)} bytes that are "
                                f"not {size * size} pixels and their checksum; it was changed outside vlpbench "
                                f"during this run: run clear_cache({dataset!r})")
        images[index] = pixels.reshape(size, size)
        running = crc32(pixels, running)
    images.flush()
    del images  # unmap before the rename
    return checksum_text(running)
