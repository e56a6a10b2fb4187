"""Guards and switches shared by every protocol's training and inference loops.

- :func:`check_finite`: stop a run at the first NaN or infinite loss, naming the epoch and step.
- :func:`out_of_memory_hint`: turn a CUDA out-of-memory error into a message with the batch size in
  use and the option that lowers it.
- Precision (``--precision``): ``fp32`` (default) or ``bf16``. With ``bf16`` the forward passes of
  the models a protocol prepares with :func:`prepare_model` run under ``torch.autocast`` with
  bfloat16, and their outputs come back as float32, so losses, metrics and numpy conversions stay in
  float32. On CUDA this is the fast path (no gradient scaler is needed for bfloat16). On a CPU,
  bf16 is accepted but runs under CPU autocast, which is slower than fp32 on most CPUs: it is there
  to check a bf16 configuration without a GPU, not to save time.
- :func:`prepare_model` also puts a model in channels-last memory format on CUDA (faster
  convolutions on tensor cores), and :func:`to_device` copies host batches through pinned memory on
  CUDA so that the copy can overlap with compute.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Iterator, Mapping

import torch

from vlpbench.errors import ConfigError, VlpbenchError

log = logging.getLogger("vlpbench")

PRECISIONS = ("fp32", "bf16")
DEFAULT_PRECISION = "fp32"


class NonFiniteLossError(VlpbenchError):
    """The training loss became NaN or infinite; the run stopped before writing a record."""


class OutOfMemoryError(VlpbenchError):
    """The GPU ran out of memory; the message names the batch size in use and how to lower it."""


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> float:
    """The loss as a Python float, after checking that it is finite.

    Reading the value is the one device synchronisation a training step already pays for its running
    loss, so the check costs nothing extra when the loop uses the returned float.

    Args:
        loss: a scalar loss tensor.
        epoch, step: 1-based position in training, for the message.

    Raises:
        NonFiniteLossError: naming the value, the epoch and the step.
    """
    value = float(loss.detach().float().item())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"training loss became {value} at epoch {epoch}, step {step}; the run stopped and no record was "
            "written. Lower the learning rate (--set lr=...), check the images for constant or corrupt ones, "
            "or run with --precision fp32")
    return value


def batch_sizes(config: Mapping[str, Any]) -> dict[str, int]:
    """The config's batch-size options (``batch_size``, ``batch_size_1pct``, ...) and their values."""
    return {key: int(value) for key, value in config.items()
            if key.startswith("batch_size") and isinstance(value, int) and not isinstance(value, bool)}


@contextlib.contextmanager
def out_of_memory_hint(config: Mapping[str, Any]) -> Iterator[None]:
    """Re-raise a CUDA out-of-memory error inside the block as :class:`OutOfMemoryError`.

    The message names the batch size(s) of ``config`` and suggests halving them with ``--set``. The
    CUDA caching allocator's free blocks are released first, so a caller that retries starts clean.
    """
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        sizes = batch_sizes(config)
        in_use = ", ".join(f"{key}={value}" for key, value in sizes.items()) or "the task's default"
        smaller = " ".join(f"--set {key}={max(1, value // 2)}" for key, value in sizes.items())
        hint = f"rerun with a smaller batch ({smaller})" if smaller else "rerun with a smaller batch"
        if config.get("precision", DEFAULT_PRECISION) == "fp32":
            hint += ", or with --precision bf16 (about half the activation memory)"
        raise OutOfMemoryError(f"CUDA ran out of memory with batch size {in_use}; {hint}. "
                               f"Detail: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def resolve_precision(precision: str, device: torch.device) -> str:
    """Check a ``--precision`` value for ``device``; bf16 on a CPU is accepted with a warning.

    Raises:
        ConfigError: a value other than fp32 or bf16.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type != "cuda":
        log.warning("--precision bf16 on %s runs under CPU autocast: usually slower than fp32; "
                    "bf16 pays off on a GPU", device)
    return precision


def precision_of(config: Mapping[str, Any]) -> str:
    """The run's precision from a protocol config (``precision`` as ``vlpbench.api.run`` sets it; fp32
    where a caller of the protocol leaves it out).

    Raises:
        ConfigError: an unknown value.
    """
    precision = config.get("precision", DEFAULT_PRECISION)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in bfloat16 for ``bf16``; a context that changes nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device, precision: str = DEFAULT_PRECISION) -> torch.nn.Module:
    """Move ``model`` to ``device`` (channels-last on CUDA) and run its forward in ``precision``.

    With ``bf16`` the module's ``forward`` is replaced on the instance by one that runs under
    :func:`autocast` and returns floating outputs (tensors, or lists / tuples / dicts of them) as
    float32. Parameters, gradients and the state dict stay float32 and keep their keys. Returns the
    same module.
    """
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if precision == "bf16":
        forward = model.forward

        @functools.wraps(forward)
        def forward_in_bf16(*args: Any, **kwargs: Any) -> Any:
            with autocast(device, precision):
                outputs = forward(*args, **kwargs)
            return _float32(outputs)

        model.forward = forward_in_bf16
    return model


def _float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if type(value) in (list, tuple):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a host tensor bound for CUDA goes through pinned memory without blocking."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
