"""Guards and switches shared by every protocol's training and inference loops.

- :func:`fit`: the epoch loop of the training protocols (segmentation, detection, linear,
  finetune): divergence check, best-epoch selection and snapshot, early stopping, history.
- :func:`check_finite`: stop a run at the first NaN or infinite loss, naming the epoch and step
  (:class:`EpochLosses`: the same check once per epoch, so that the host does not wait at every step).
- :func:`out_of_memory_hint`: turn a CUDA out-of-memory error into a message with the batch size in
  use and the option that lowers it.
- Precision (``--precision``): ``fp32`` (default) or ``bf16``. With ``bf16`` the forward passes of
  the models a protocol prepares with :func:`prepare_model` run under ``torch.autocast`` with
  bfloat16, and their outputs come back as float32, so losses, metrics and numpy conversions stay in
  float32. On CUDA this is the fast path (no gradient scaler is needed for bfloat16). On a CPU,
  bf16 is accepted but runs under CPU autocast, which is slower than fp32 on most CPUs: it is there
  to check a bf16 configuration without a GPU, not to save time.
- Encoders with a neck (:func:`freeze_backbone`, :func:`eval_backbone`, :func:`head_name`): the one
  convention by which the frozen-encoder protocols treat a ViT (``vlpbench.adapters.transformer``).
- :func:`prepare_model` also puts a model in channels-last memory format on CUDA (faster
  convolutions on tensor cores), and :func:`to_device` copies host batches through pinned memory on
  CUDA so that the copy can overlap with compute.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from vlpbench.errors import ConfigError, VlpbenchError
from vlpbench.protocols.prefetch import pinned

log = logging.getLogger("vlpbench")

PRECISIONS = ("fp32", "bf16")
DEFAULT_PRECISION = "fp32"
# What else than the learning rate to try when a loss diverges.
DIVERGED_HINT = "check the images for constant or corrupt ones, or run with --precision fp32"


class NonFiniteLossError(VlpbenchError):
    """A training or validation loss became NaN or infinite; the run stopped before writing a record."""


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
    _require_finite(value, epoch, step)
    return value


class EpochLosses:
    """One epoch's training losses, kept on the device and read once at its end (:meth:`total`): a training loop
    that adds each step's loss here waits for the device once per epoch, where :func:`check_finite` waits at every
    step, so the host can queue the next steps while the device computes. A non-finite loss is then found at the
    end of the epoch instead of at its step (the weights after it are NaN; nothing is recorded either way)."""

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._weights: list[float] = []

    def add(self, loss: torch.Tensor, weight: float = 1.0) -> None:
        """Step ``len(self) + 1``'s scalar loss, counted ``weight`` times in :meth:`total` (its batch size)."""
        self._losses.append(loss.detach().float().reshape(()))
        self._weights.append(weight)

    def __len__(self) -> int:
        return len(self._losses)

    def total(self, epoch: int) -> float:
        """The weighted sum of the losses, in step order in float64: the value a loop summing
        ``check_finite(loss) * weight`` step by step computes, bit for bit.

        Raises:
            NonFiniteLossError: naming ``epoch`` and the first step whose loss is NaN or infinite.
        """
        values = torch.stack(self._losses).cpu().tolist() if self._losses else []
        total = 0.0
        for step, (value, weight) in enumerate(zip(values, self._weights), 1):
            _require_finite(value, epoch, step)
            total += value * weight
        return total


def _require_finite(value: float, epoch: int, step: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"training loss became {value} at epoch {epoch}, step {step}; the run stopped and no record was "
            f"written. Lower the learning rate (--set lr=...), {DIVERGED_HINT}")


def batch_sizes(config: Mapping[str, Any]) -> dict[str, int]:
    """The config's batch-size options (``batch_size``, ``batch_size_1pct``, ``feature_batch_size``, ...) and their
    values."""
    return {key: int(value) for key, value in config.items()
            if (key.startswith("batch_size") or key.endswith("_batch_size"))
            and isinstance(value, int) and not isinstance(value, bool)}


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
        automatic = [key for key, value in config.items()
                     if (key == "batch_size" or key.endswith("_batch_size")) and value == "auto"]
        if automatic:
            hint += " or " + " ".join(f"--set {key}=N" for key in automatic) + " (an integer below the automatic " \
                    "choice the log names)"
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


@contextlib.contextmanager
def cudnn_benchmark(device: torch.device) -> Iterator[None]:
    """On CUDA, let cuDNN pick the fastest convolution algorithms for the shapes it meets (a search on the
    first batch of each shape, worth it when every batch has the same shape, as a frozen encoder's do);
    the previous setting is restored on exit. Changes nothing elsewhere."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a host tensor bound for CUDA goes through pinned memory (:func:`pinned`: already
    pinned where a prefetching thread prepared it) without blocking."""
    return pinned(tensor, device).to(device, non_blocking=device.type == "cuda")


# --- frozen encoders, with or without a neck -----------------------------------------------------------
#
# The convention: an encoder whose feature maps come from a frozen backbone through a new, trained module
# exposes that module as ``encoder.neck`` (a ViT's Feature2Pyramid; smp encoders have none). The neck
# trains with the protocol's head, everything else of the encoder stays frozen; its ``pyramid`` attribute
# names it in records. Such an encoder also exposes ``taps(x)`` (the backbone's outputs, one per neck level)
# and ``neck.level(i, tap)``, so detection can cache the frozen part and run the neck in the trained one.

def neck_of(encoder: torch.nn.Module) -> torch.nn.Module | None:
    """The encoder's trained neck, or None (smp encoders)."""
    return getattr(encoder, "neck", None)


def freeze_backbone(encoder: torch.nn.Module) -> None:
    """No gradients for the encoder's parameters, except its neck's (which train with the head)."""
    neck = neck_of(encoder)
    trained = {id(p) for p in neck.parameters()} if neck is not None else set()
    for parameter in encoder.parameters():
        if id(parameter) not in trained:
            parameter.requires_grad_(False)


def eval_backbone(encoder: torch.nn.Module) -> None:
    """The frozen part in eval mode (BatchNorm statistics do not drift); the neck stays in training mode."""
    encoder.eval()
    if (neck := neck_of(encoder)) is not None:
        neck.train()


def head_name(encoder: torch.nn.Module, head: str) -> str:
    """What a record calls the trained head: ``head`` (e.g. ``"unet"``), over the encoder's neck if it has one
    (``"unet over feature2pyramid(3,5,7,11)"``)."""
    return head if neck_of(encoder) is None else f"{head} over {encoder.pyramid}"


# --- the epoch loop shared by the training protocols ------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """Which validation value picks the best epoch: ``key`` in the values ``validate`` returns, and
    ``mode`` ``"min"`` (a loss: lower is better) or ``"max"`` (a metric: higher is better).

    A value that is None or NaN (a metric undefined on the validation images) counts as the worst.
    """

    key: str
    mode: str

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"Selection mode {self.mode!r}: expected 'min' or 'max'")

    def score(self, values: Mapping[str, float | None]) -> float:
        """The epoch's value of ``key``, with None and NaN replaced by the worst value (-inf or +inf)."""
        value = values[self.key]
        if value is None or math.isnan(value):
            return math.inf if self.mode == "min" else -math.inf
        return float(value)

    def better(self, score: float, best: float) -> bool:
        """Whether ``score`` is strictly better than ``best`` (a tie keeps the earlier epoch)."""
        return score < best if self.mode == "min" else score > best


LOWEST_VAL_LOSS = Selection("val_loss", "min")


@dataclass
class FitResult:
    """What :func:`fit` trained: one ``history`` entry per epoch run (``epoch``, ``train_loss`` and
    the validation values), the selected epoch (1-based) and its selection value (-inf or +inf
    where that value was None or NaN)."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_value: float

    @property
    def epochs(self) -> int:
        """Epochs run."""
        return len(self.history)


def require_finite(value: float, what: str, epoch: int, lr_options: Sequence[str] = ("lr",)) -> float:
    """``value`` after checking that it is finite.

    Raises:
        NonFiniteLossError: naming ``what``, the value, the epoch (1-based) and the learning-rate
            option(s) ``lr_options`` to lower.
    """
    if not math.isfinite(value):
        lower = " / ".join(f"{option}=..." for option in lr_options)
        raise NonFiniteLossError(f"{what} became {value} at epoch {epoch}; the run stopped and no record was "
                                 f"written. Lower the learning rate (--set {lower}), {DIVERGED_HINT}")
    return value


def state_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state dict on the CPU, unaffected by further training."""
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def fit(train_epoch: Callable[[int], float], validate: Callable[[int], Mapping[str, float | None]], *,
        max_epochs: int, patience: int, snapshot: Callable[[], Any], restore: Callable[[Any], Any],
        select: Selection = LOWEST_VAL_LOSS, checked: Sequence[str] = ("val_loss",),
        lr_options: Sequence[str] = ("lr",), progress: bool = True) -> FitResult:
    """Train for up to ``max_epochs`` epochs, keep the best validation epoch, stop early, restore it.

    Each epoch ``e`` (1-based) runs ``train_epoch(e)``, which returns the epoch's training loss, then
    ``validate(e)``, which returns the validation values (an ordered mapping: its keys follow
    ``epoch`` and ``train_loss`` in the history entry).

    - Divergence: a training loss, or a validation value named in ``checked``, that is NaN or
      infinite stops the run with :class:`NonFiniteLossError` (the training loss is checked before
      ``validate`` runs).
    - Selection: the first epoch is always the best so far; a later epoch replaces it only when its
      ``select`` value is strictly better (ties keep the earlier epoch). ``snapshot()`` is called
      for each new best epoch and returns a copy of what training changes (see :func:`state_copy`).
    - Early stopping: training stops after epoch ``e`` when ``e - best_epoch >= patience``.
    - At the end ``restore`` receives the best epoch's snapshot.

    Under torchrun every rank must pass the same values (the protocols reduce or gather them), so
    every rank runs the same epochs and selects the same one.

    Raises:
        ConfigError: ``max_epochs`` below 1 (no epoch, no weights to restore).
        NonFiniteLossError: as above.
    """
    if max_epochs < 1:
        raise ConfigError(f"max_epochs={max_epochs!r}: expected an integer of at least 1")
    history: list[dict[str, Any]] = []
    best_epoch, best_value, best_state = 0, math.nan, None
    with tqdm(range(1, max_epochs + 1), desc="epochs", disable=not progress, unit="ep") as bar:
        for epoch in bar:
            train_loss = require_finite(train_epoch(epoch), "training loss", epoch, lr_options)
            values = dict(validate(epoch))
            for key in checked:
                require_finite(values[key], _VALUE_NAMES.get(key, f"validation value {key}"), epoch, lr_options)
            history.append({"epoch": epoch, "train_loss": train_loss, **values})
            score = select.score(values)
            if best_epoch == 0 or select.better(score, best_value):
                best_epoch, best_value, best_state = epoch, score, snapshot()
            shown = {key: _short(value) for key, value in history[-1].items() if key != "epoch"}
            bar.set_postfix({**shown, "best": best_epoch})
            log.debug("epoch %d: %s", epoch, ", ".join(f"{key} {value}" for key, value in shown.items()))
            if epoch - best_epoch >= patience:
                log.info("early stop after epoch %d (best %d)", epoch, best_epoch)
                break
    restore(best_state)
    return FitResult(history, best_epoch, best_value)


_VALUE_NAMES = {"val_loss": "validation loss"}


def _short(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
