"""One run over several processes (``torchrun``): the process group and the collectives protocols use.

``torchrun --standalone --nproc-per-node N -m vlpbench.cli run ...`` starts N processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`session` (used by
``vlpbench.api.run``) joins them into a process group (NCCL on CUDA, gloo on CPU) and leaves it at
the end. Outside such a session every helper here behaves as the single process it is: ``rank 0 of
1``, :func:`shard` returns everything, :func:`gather_arrays` returns its input, :func:`barrier` does
nothing. So a protocol written with these helpers runs unchanged without torchrun.

Sharding is contiguous (rank r gets the r-th of ``world_size`` consecutive blocks, sizes differing by
at most one), so concatenating the ranks' blocks in rank order — what :func:`gather_arrays` does —
gives back the original order.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from vlpbench.errors import ConfigError

T = TypeVar("T")

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def requested_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): how many processes torchrun started.

    Raises:
        ConfigError: ``WORLD_SIZE`` is not a positive integer.
    """
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={text!r}: expected a positive integer (torchrun sets it)")
    return value


def is_active() -> bool:
    """Whether this process belongs to an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes sharing the run (1 outside a process group)."""
    return dist.get_world_size() if is_active() else 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_active() else 0


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes records and caches and logs results."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device this rank computes on: on CUDA, the GPU of ``LOCAL_RANK`` (``cuda:<LOCAL_RANK>``)."""
    if device.type == "cuda" and device.index is None and is_active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_from_env(device: torch.device) -> bool:
    """Join the process group that torchrun's environment describes; whether one was joined here.

    Does nothing (False) when ``WORLD_SIZE`` is 1 or a group is already initialised. The backend is
    NCCL for a CUDA ``device`` (after selecting the GPU ``LOCAL_RANK``), gloo otherwise.

    Raises:
        ConfigError: ``WORLD_SIZE`` > 1 without ``RANK`` / ``LOCAL_RANK`` / ``MASTER_ADDR``, or with
            fewer visible GPUs than ``LOCAL_RANK`` needs.
    """
    size = requested_world_size()
    if size == 1 or (dist.is_available() and dist.is_initialized()):
        return False
    missing = [name for name in (*ENVIRONMENT, "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={size} but {', '.join(missing)} is not set: start a distributed run "
                          "with torchrun (vlpbench sweep --launcher torchrun prints the command)")
    backend = "gloo"
    if device.type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible: "
                              "use --nproc-per-node of at most the number of GPUs")
        torch.cuda.set_device(local)
        backend = "nccl"
    dist.init_process_group(backend=backend)
    return True


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[None]:
    """Inside the block, this process is in torchrun's process group (if any); left at the end.

    A group that was already initialised by the caller is used and left in place.
    """
    joined = init_from_env(device)
    try:
        yield
    finally:
        if joined:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, then the others: for work that fills a cache the others then read."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object, sent between this run's own processes)."""
    if not is_active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, device=_comm_device())
    return holder[0]


def all_true(flag: bool) -> bool:
    """Whether ``flag`` is true on every rank."""
    if not is_active():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_min(value: int) -> int:
    """The smallest of the ranks' ``value``."""
    if not is_active():
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over ranks of ``values`` (float64), e.g. a loss total and an image count."""
    if not is_active():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def differentiable_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor``, through which gradients flow back to every rank's part.

    With every rank computing the same loss from such sums, backward gives each rank ``world_size``
    times its part of the gradient; DistributedDataParallel's average then yields exactly the
    gradient of the single-process loss over the whole batch.
    """
    if not is_active():
        return tensor
    from torch.distributed._functional_collectives import all_reduce, wait_tensor

    # The functional all_reduce is the differentiable one: its backward is an all_reduce of the gradients.
    return wait_tensor(all_reduce(tensor, "sum", dist.group.WORLD))


def shard_bounds(n: int, parts: int | None = None, index: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of block ``index`` (default: this rank) of ``range(n)`` cut into ``parts``
    (default: the world size) contiguous blocks whose sizes differ by at most one, larger ones first."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard(items: Sequence[T], parts: int | None = None, index: int | None = None) -> Sequence[T]:
    """This rank's contiguous block of ``items`` (a list, array or range): the blocks of all ranks are
    disjoint, cover ``items``, and in rank order give ``items`` back."""
    start, stop = shard_bounds(len(items), parts, index)
    return items[start:stop]


def batch_block(n: int, batch_size: int) -> tuple[int, int]:
    """``(start, stop)`` of this rank's rows of ``range(n)`` processed in batches of ``batch_size``: a
    contiguous block of whole batches, the batches being those of a single process (so that every
    item is computed with the same batch mates, hence bit for bit as in one process)."""
    starts = shard(range(0, n, batch_size))
    return (starts[0], min(starts[-1] + batch_size, n)) if starts else (0, 0)


def gather_arrays(array: np.ndarray) -> np.ndarray:
    """Every rank's ``array`` (same dtype and trailing shape, any length) concatenated in rank order,
    on every rank: with :func:`shard`'s blocks, the array of the whole list in its original order."""
    array = np.ascontiguousarray(array)
    if not is_active():
        return array
    device = _comm_device()
    size = torch.tensor([len(array)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    # all_gather moves equal shapes: pad every block to the longest, then cut the padding off.
    longest = max(lengths)
    local = torch.from_numpy(array).to(device)
    padded = torch.zeros((longest, *array.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(array)] = local
    blocks = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(blocks, padded)
    return np.concatenate([block[:length].cpu().numpy() for block, length in zip(blocks, lengths)])


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole batch over all ranks.

    PyTorch's SyncBatchNorm does this on GPUs only; this one works on any backend (gloo included), so
    a distributed run on CPUs normalises as the single-process run does. In eval mode, or outside a
    process group, it is a plain BatchNorm2d; its running statistics, updated from the global batch,
    are the same on every rank.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_active()):
            return super().forward(x)
        x = x.float()  # statistics in float32, as BatchNorm keeps them under bf16 autocast
        channels = x.shape[1]
        total = differentiable_sum(torch.cat([x.sum(dim=(0, 2, 3)), x.new_full((1,), x.numel() / channels)]))
        count = total[-1]
        mean = total[:channels] / count
        # Two passes (mean, then squared deviations) rather than E[x²] - mean², which cancels in float32.
        centred = x - mean.view(1, -1, 1, 1)
        var = differentiable_sum((centred * centred).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                n = float(count)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))  # the unbiased variance, as BatchNorm records
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


def global_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every BatchNorm2d turned into a :class:`GlobalBatchNorm2d` in place (same
    parameters, buffers and state-dict keys); returns ``model``."""
    for module in model.modules():
        if type(module) is torch.nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d  # only forward differs; the state stays as it is
    return model


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
