"""Inference batch sizes that fill the device: the ``auto`` value of ``eval_batch_size`` and
``feature_batch_size``.

A training batch size is a protocol setting: it changes the numbers, so it is never changed here. An
inference batch size (validation and test predictions, frozen-feature extraction) changes memory and speed
only: with the model in eval mode an image's output does not depend on its batch mates, up to floating-point
rounding; where a protocol's validation loss depends on how images are grouped (segmentation's batch Dice),
the loss is still computed per protocol batch (:func:`protocol_chunks`).

``auto`` (the tasks' default):

- On CUDA, when a pass first needs the size (so during training, with the optimiser's state already
  held), the inference pass is run on blank input at two small batch sizes (:data:`PROBE_SIZES`); the
  growth of the peak allocated memory per image is the per-image cost, the rest the fixed cost. The batch is
  the largest that fits :data:`MEMORY_SHARE` of the memory available (free on the device plus the caching
  allocator's free blocks, less what the run will still allocate, such as features it keeps), at most
  :data:`MAX_AUTO_BATCH` and no more than the images call for, a multiple of ``multiple_of``. Should a pass
  still run out of memory, the batch is halved and the pass run again (passes are pure). Under torchrun
  every rank takes the smallest of the ranks' choices, and an out-of-memory error stops the run: the ranks
  could not retry in step.
- Where several runs share one GPU (a local sweep with more workers than GPUs sets
  ``$VLPBENCH_RUNS_PER_DEVICE`` in each run's environment), a run plans within its equal share of the
  device's memory, so that one run's inference batch does not take what another's training needs.
- On a CPU, the protocol's fallback (its training batch, or the feature batch of the linear protocol): CPU
  throughput is flat past small batches, and host memory is shared with the image cache, which this cannot
  measure.

An integer set with ``--set`` is used as it is. Records state the size used and how it was chosen
(:meth:`InferenceBatch.describe`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping, Protocol, TypeVar

import torch

from vlpbench import distributed
from vlpbench.errors import ConfigError

log = logging.getLogger("vlpbench")

AUTO = "auto"
# Runs sharing this process's GPU (set by a local sweep with more workers than GPUs): each plans within its share.
RUNS_PER_DEVICE = "VLPBENCH_RUNS_PER_DEVICE"
# Batch sizes of the memory probe; two points give the per-image slope and the fixed cost.
PROBE_SIZES = (2, 4)
# Share of the available memory an automatic batch may plan to use: the rest absorbs fragmentation and the
# workspace of algorithms cuDNN picks per batch shape.
MEMORY_SHARE = 0.8
# Past this, larger batches no longer speed inference up on current GPUs; it also bounds host memory for
# the batches prepared ahead (vlpbench.protocols.prefetch).
MAX_AUTO_BATCH = 1024

T = TypeVar("T")


class MemoryMeter(Protocol):
    """What the probe reads of a device's memory (:class:`CudaMemory`; tests pass their own)."""

    def available(self) -> int:
        """Bytes a new allocation could still get."""

    def total(self) -> int:
        """The device's memory in bytes."""

    def allocated(self) -> int:
        """Bytes this process holds in tensors on the device."""

    def peak_of(self, run: Callable[[], object]) -> int:
        """Peak bytes allocated while ``run()`` ran, above what was allocated before it."""

    def release(self) -> None:
        """Return cached free blocks after an out-of-memory error."""


class CudaMemory:
    """:class:`MemoryMeter` of one CUDA device, from the caching allocator's statistics."""

    def __init__(self, device: torch.device):
        self.device = device

    def available(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device))

    def total(self) -> int:
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def peak_of(self, run: Callable[[], object]) -> int:
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        run()
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - before)

    def release(self) -> None:
        torch.cuda.empty_cache()


class InferenceBatch:
    """The batch size of a protocol's inference passes, and how it was chosen.

    An automatic size is chosen when a pass first needs it (:attr:`size`), so a run that needs no pass
    (every feature cached) probes nothing, and a probe during training sees the memory training holds.
    ``retry``: halve and rerun a pass that runs out of memory (automatic sizes in a single process only).
    """

    def __init__(self, requested: int | str, *, size: int | None = None, how: str = "set",
                 choose: Callable[[], tuple[int, str]] | None = None, multiple_of: int = 1, retry: bool = False,
                 meter: MemoryMeter | None = None):
        self.requested, self.multiple_of, self.retry, self.meter = requested, multiple_of, retry, meter
        self._size, self.how, self._choose = size, how, choose
        self.lowered_from: list[int] = []  # sizes given up after out-of-memory errors, in order

    @property
    def size(self) -> int:
        """The size in use, chosen on first use where automatic."""
        if self._size is None:
            self._size, self.how = self._choose()
        return self._size

    def run(self, one_pass: Callable[[int], T]) -> T:
        """``one_pass(self.size)``; on an out-of-memory error with ``retry``, the size halved (a multiple of
        ``multiple_of``) and the pass run again, down to ``multiple_of`` images (the protocol batch, which
        training itself runs with gradients)."""
        while True:
            try:
                return one_pass(self.size)
            except torch.cuda.OutOfMemoryError:
                if not self.retry or self.size <= self.multiple_of:
                    raise
            # Out of the handler, the failed pass's tensors (held by its traceback until then) are freed.
            if self.meter is not None:
                self.meter.release()
            smaller = _round_down(self.size // 2, self.multiple_of)
            log.warning("inference batch %d ran out of device memory; running the pass again at %d",
                        self.size, smaller)
            self.lowered_from.append(self.size)
            self._size = smaller

    def describe(self) -> dict[str, Any]:
        """What a record states: the size used last (None: no pass needed one), what was asked for, how it was
        chosen, and sizes given up."""
        return {"size": self._size, "requested": self.requested,
                "how": self.how if self._size is not None else "no inference pass needed it",
                "lowered_from": list(self.lowered_from)}


def given(size: int | InferenceBatch) -> InferenceBatch:
    """``size`` as an :class:`InferenceBatch`: an integer is used as it is."""
    return size if isinstance(size, InferenceBatch) else InferenceBatch(size, size=size)


def requested_size(config: Mapping[str, Any], key: str, default: int | str = AUTO) -> int | str:
    """``config[key]`` (``default`` where absent): an integer of at least 1 or ``"auto"``.

    Raises:
        ConfigError: anything else, naming the option.
    """
    value = config.get(key, default)
    if value == AUTO or (type(value) is int and value >= 1):
        return value
    raise ConfigError(f"{key}={value!r}: expected an integer of at least 1 or 'auto'")


def fitting_batch(peaks: Mapping[int, int], budget: float, *, limit: int, multiple_of: int = 1) -> int:
    """The largest batch whose memory, extrapolated linearly from ``peaks`` (batch size -> peak bytes, two
    sizes), fits ``budget`` bytes: at most :data:`MAX_AUTO_BATCH` and ``limit`` rounded up to a multiple of
    ``multiple_of`` (one batch for all images), itself a multiple of ``multiple_of``, at least one batch of it.
    """
    (small, small_peak), (large, large_peak) = sorted(peaks.items())[:2]
    per_image = max((large_peak - small_peak) / (large - small), 1.0)
    fixed = max(small_peak - small * per_image, 0.0)
    fits = math.floor((budget - fixed) / per_image)
    cap = min(MAX_AUTO_BATCH, math.ceil(limit / multiple_of) * multiple_of)
    return _round_down(min(fits, cap), multiple_of)


def inference_batch(config: Mapping[str, Any], key: str, *, device: torch.device, fallback: int, limit: int,
                    probe: Callable[[int], object], multiple_of: int = 1, reserve_bytes: int = 0,
                    meter: MemoryMeter | None = None) -> InferenceBatch:
    """The inference batch of ``config[key]`` (module docstring): the integer set, or for ``auto`` the probed
    size on CUDA and ``fallback`` elsewhere.

    Args:
        probe: runs the inference pass on blank input of the given batch size (outputs discarded).
        limit: images of the largest part the batch will serve (no larger batch is useful).
        multiple_of: the automatic size is a multiple of this (the protocol batch, where losses are computed
            per protocol batch).
        reserve_bytes: device memory the run will hold during the passes that is not allocated when the size
            is chosen (features it will keep on the device), left out of the budget.
        meter: the device's memory (default :class:`CudaMemory` of ``device``).

    Raises:
        ConfigError: ``config[key]`` neither an integer of at least 1 nor ``auto``, or an integer that is not a
            multiple of ``multiple_of``.
    """
    requested = requested_size(config, key)
    if requested != AUTO:
        if requested % multiple_of:
            raise ConfigError(f"{key}={requested}: expected a multiple of {multiple_of} (the protocol batch, over "
                              "which its validation loss is taken), or 'auto'")
        return InferenceBatch(requested, size=requested, how="set")
    if meter is None and device.type != "cuda":
        return InferenceBatch(AUTO, size=fallback, how=f"{device.type}: the protocol's fallback")
    meter = meter or CudaMemory(device)

    def probed(sizes: tuple[int, int]) -> tuple[int, str]:
        try:
            peaks = {size: meter.peak_of(lambda size=size: probe(size)) for size in sizes}
        except torch.cuda.OutOfMemoryError:
            peaks = None
        if peaks is None:  # out of the handler, so that the probe's tensors are freed: the retry halves from here
            meter.release()
            return (_round_down(fallback, multiple_of),
                    f"{device.type}: the probe ran out of memory, so the protocol's fallback")
        sharing = runs_per_device()
        available = meter.available()
        if sharing > 1:  # what is left of this run's share of the device
            available = min(available, max(0, meter.total() // sharing - meter.allocated()))
        size = fitting_batch(peaks, MEMORY_SHARE * available - reserve_bytes, limit=limit, multiple_of=multiple_of)
        (small, small_peak), (large, large_peak) = sorted(peaks.items())
        return size, (f"{device.type}: probed {(large_peak - small_peak) / (large - small) / 2**20:.1f} MiB per "
                      f"image, {MEMORY_SHARE:.0%} of {available / 2**30:.1f} GiB available"
                      + (f" to this run, one of {sharing} sharing the device" if sharing > 1 else "")
                      + (f", less {reserve_bytes / 2**30:.2f} GiB reserved" if reserve_bytes else ""))

    def choose() -> tuple[int, str]:
        sizes = (min(PROBE_SIZES[0], max(limit, 1)), min(PROBE_SIZES[1], max(limit, 1)))
        if sizes[0] == sizes[1]:  # so few images that one small batch holds them all
            size = _round_down(math.ceil(limit / multiple_of) * multiple_of, multiple_of)
            how = f"{device.type}: all {limit} image(s) in one batch"
        else:
            size, how = probed(sizes)
        if distributed.is_active():
            size = distributed.all_min(size)
            how += ", the smallest of the ranks' choices"
        log.info("%s: %d images per inference batch (%s)", key, size, how)
        return size, how

    return InferenceBatch(AUTO, choose=choose, multiple_of=multiple_of, retry=not distributed.is_active(),
                          meter=meter)


def runs_per_device(environ: Mapping[str, str] | None = None) -> int:
    """Runs sharing this process's GPU: ``$VLPBENCH_RUNS_PER_DEVICE`` in ``environ`` (default ``os.environ``),
    else 1.

    Raises:
        ConfigError: the variable is set to anything but a positive integer.
    """
    text = (os.environ if environ is None else environ).get(RUNS_PER_DEVICE, "").strip()
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"environment variable {RUNS_PER_DEVICE}={text!r}: expected a positive integer (runs "
                          "sharing this process's GPU)")
    return int(text)


def planned_size(config: Mapping[str, Any], key: str, fallback: int) -> int:
    """The inference batch a plan times (``vlpbench sweep --plan``): the integer set, else ``fallback``, what
    ``auto`` gives on a CPU. On a GPU ``auto`` picks a batch at least as large where memory allows, so the plan's
    inference passes are then an upper bound.

    Raises:
        ConfigError: ``config[key]`` neither an integer of at least 1 nor ``auto``.
    """
    requested = requested_size(config, key)
    return fallback if requested == AUTO else requested


@contextlib.contextmanager
def probing(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode without autograd for a probe; each submodule's mode is restored afterwards (a probe
    may run between training epochs)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, training in modes:
            m.training = training


def protocol_chunks(count: int, batch_size: int) -> list[slice]:
    """Consecutive slices of ``batch_size`` items (the last one shorter) covering ``range(count)``: the
    protocol batches inside one larger inference batch that starts at a multiple of ``batch_size``."""
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def _round_down(size: int, multiple_of: int) -> int:
    """``size`` rounded down to a multiple of ``multiple_of``, at least ``multiple_of``."""
    return max(multiple_of, size - size % multiple_of)
