"""Torch's intra-op thread count for ``run``, ``score`` and each run of a sweep.

Torch's own default depends on its build and platform and may count CPUs the process cannot use (a SLURM
job given 4 of a node's 64 cores running 64 threads, which then wait on each other); here the count is
chosen, logged and recorded. First match wins:

1. ``--threads N`` (the ``threads`` argument of ``vlpbench.api.run`` / ``score`` / ``sweep``);
2. the environment variable ``OMP_NUM_THREADS``;
3. the CPUs of the process's affinity mask (``os.sched_getaffinity``: what SLURM, ``taskset`` or a
   container's cpuset allow), or ``os.cpu_count()`` where the platform has no affinity call (macOS, Windows),
   but never more than torch's own default at import (which counts physical cores on most builds: the
   affinity mask counts hyper-threads, and two threads per core slow torch's kernels down).

The choice is logged once at INFO (``torch threads: 4 (CPU affinity)``) and recorded as
``env.torch_threads`` in result records. :func:`torch_threads` holds it for one call of the API and then
gives the caller back its own count.

:func:`single_threaded` runs a block on one thread: loops of many small CPU ops (box decoding and YOLO
targets per batch, grounding maps per query at a fixed grid). Splitting tensors of some ten thousand elements
among threads saves a millisecond at most, and costs far more when those threads wait for a busy CPU: on a
shared 2-core machine these loops ran up to 50 to 130 times faster on one thread, and at most 0.3 ms slower
per batch while the second core was free (``perf/tiny_ops.py`` times each loop both ways).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from vlpbench.errors import ConfigError

log = logging.getLogger("vlpbench")

OPTION = "--threads"
ENVIRONMENT = "OMP_NUM_THREADS"


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and where it came from (``--threads``, ``OMP_NUM_THREADS``, ``CPU affinity`` or
    ``CPU count``)."""

    count: int
    source: str


# Torch's count before vlpbench changes it: the upper bound of the affinity rule.
_TORCH_DEFAULT = torch.get_num_threads()

# The last choice logged in this process: a second run in the same process with the same choice stays quiet.
_logged: ThreadChoice | None = None


def usable_cpus() -> ThreadChoice:
    """How many CPUs this process may run on: its affinity mask, else every CPU of the machine; at most
    torch's own default."""
    affinity = getattr(os, "sched_getaffinity", None)
    usable = ThreadChoice(len(affinity(0)), "CPU affinity") if affinity is not None else \
        ThreadChoice(os.cpu_count() or 1, "CPU count")
    if _TORCH_DEFAULT < usable.count:
        return ThreadChoice(_TORCH_DEFAULT, f"torch default, under the {usable.count} of the {usable.source}")
    return usable


def choose_threads(threads: int | None = None, environ: Mapping[str, str] | None = None) -> ThreadChoice:
    """The thread count for ``threads`` (None: not given) and ``environ`` (default ``os.environ``), in the
    order of the module docstring.

    Raises:
        ConfigError: ``threads`` is not a positive integer, or ``OMP_NUM_THREADS`` is set to anything else.
    """
    if threads is not None:
        if type(threads) is not int or threads < 1:
            raise ConfigError(f"{OPTION} {threads!r}: expected a positive integer (torch threads per run)")
        return ThreadChoice(threads, OPTION)
    text = (os.environ if environ is None else environ).get(ENVIRONMENT, "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"environment variable {ENVIRONMENT}={text!r}: expected a positive integer "
                              f"(or unset it to use the CPUs this process may run on)")
        return ThreadChoice(int(text), ENVIRONMENT)
    return usable_cpus()


def set_torch_threads(threads: int | None = None) -> ThreadChoice:
    """Set torch's intra-op threads to :func:`choose_threads`'s count and log it (once per distinct choice).

    Raises:
        ConfigError: as :func:`choose_threads`.
    """
    global _logged
    choice = choose_threads(threads)
    torch.set_num_threads(choice.count)
    if choice != _logged:
        log.info("torch threads: %d (%s)", choice.count, choice.source)
        _logged = choice
    return choice


@contextlib.contextmanager
def torch_threads(threads: int | None = None) -> Iterator[ThreadChoice]:
    """:func:`set_torch_threads` for the block, then torch's previous count again (a program that calls
    ``vlpbench.api`` keeps its own setting).

    Raises:
        ConfigError: as :func:`choose_threads`, before the block runs.
    """
    before = torch.get_num_threads()
    choice = set_torch_threads(threads)
    try:
        yield choice
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def single_threaded(when: bool = True) -> Iterator[None]:
    """Torch's intra-op threads set to 1 for the block (when ``when``), then the previous count again, also
    when the block raises. Also a decorator (``@single_threaded()``; the undecorated function is
    ``__wrapped__``).

    Only for ops whose results do not depend on the thread count (elementwise ops, indexing, min / max,
    argmax; not floating-point sums, whose order the threads change). Only CPU ops use these threads: a
    block whose tensors are on an accelerator runs as before, the switch itself costing under a microsecond.
    """
    before = torch.get_num_threads()
    if not when or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
