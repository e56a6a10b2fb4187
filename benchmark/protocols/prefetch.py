"""Batches prepared on the host while the device computes the previous one.

A protocol's loop reads a batch from the image cache (memory-mapped numpy), draws its augmentation, and only
then runs the model: done in turn, the device idles while the host prepares. :func:`prefetch` runs the
preparation in one background thread, up to ``depth`` batches ahead; numpy's copies out of a memory map and
torch's operators release the GIL, so the reading overlaps the model's compute. Bound for CUDA, the host
tensors are page-locked in that thread (:func:`pinned`), so the consumer's copy to the device does not block.

What it changes is when a batch is prepared, never what: one thread prepares the batches one after another in
the order of ``keys``, so a ``torch.Generator`` that only the preparation draws from gives the same draws in
the same order as the serial loop, and the batches are bit for bit the same. The loop must therefore leave
that generator alone until the iteration ends (the protocols draw an epoch's order before it and nothing during
it).

An exception raised while preparing is raised in the loop, with the traceback of where it happened; a loop that
ends early (``break``, an exception in its body) stops the thread before going on.

The depth is ``$VLPBENCH_PREFETCH`` (batches prepared ahead; 0: the serial loop), default
:data:`DEFAULT_DEPTH`. It changes speed only, so records do not state it.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import torch

from vlpbench.errors import ConfigError

ENVIRONMENT = "VLPBENCH_PREFETCH"
DEFAULT_DEPTH = 2
_POLL_S = 0.05  # how often a producer waiting for room checks whether the loop has ended

K = TypeVar("K")
T = TypeVar("T")


def prefetch_depth(environ: Mapping[str, str] | None = None) -> int:
    """Batches to prepare ahead: ``$VLPBENCH_PREFETCH`` in ``environ`` (default ``os.environ``), else
    :data:`DEFAULT_DEPTH`.

    Raises:
        ConfigError: the variable is set to anything but a non-negative integer.
    """
    text = (os.environ if environ is None else environ).get(ENVIRONMENT, "").strip()
    if not text:
        return DEFAULT_DEPTH
    if not text.isdigit():
        raise ConfigError(f"environment variable {ENVIRONMENT}={text!r}: expected a non-negative integer "
                          "(batches prepared ahead; 0: none)")
    return int(text)


def pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` in page-locked memory where it is bound for CUDA (its copy then does not block), else itself."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory()
    return tensor


def prefetch(prepare: Callable[[K], T], keys: Iterable[K], device: torch.device,
             depth: int | None = None) -> Iterator[T]:
    """``prepare(key)`` for each of ``keys``, in order; with ``depth`` > 0 prepared by a background thread up to
    ``depth`` batches ahead of the loop (module docstring); ``depth`` None: :func:`prefetch_depth`.

    ``device``: where the batches go; a CUDA thread prepares under that device.

    Raises:
        ConfigError: ``depth`` is negative, or as :func:`prefetch_depth`.
        whatever ``prepare`` raises, from the iteration that would have yielded its batch.
    """
    depth = prefetch_depth() if depth is None else depth
    if depth < 0:
        raise ConfigError(f"prefetch depth {depth}: expected a non-negative integer")
    if depth == 0:
        return (prepare(key) for key in keys)
    return _threaded(prepare, keys, device, depth)


_BATCH, _FAILED, _DONE = "batch", "failed", "done"


def _threaded(prepare: Callable[[K], T], keys: Iterable[K], device: torch.device, depth: int) -> Iterator[T]:
    slots: queue.Queue = queue.Queue(maxsize=depth)
    ended = threading.Event()
    cuda = None
    if device.type == "cuda":
        cuda = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())

    def offer(item: tuple[str, Any]) -> bool:
        while not ended.is_set():
            try:
                slots.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            if cuda is not None:  # the loop's device, not device 0, for the page-locked memory
                torch.cuda.set_device(cuda)
            for key in keys:
                if not offer((_BATCH, prepare(key))):
                    return
        except BaseException as error:  # handed to the loop, which raises it
            offer((_FAILED, error))
            return
        offer((_DONE, None))

    thread = threading.Thread(target=produce, name="vlpbench-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == _DONE:
                return
            if kind == _FAILED:
                raise value
            yield value
    finally:
        ended.set()
        thread.join()
