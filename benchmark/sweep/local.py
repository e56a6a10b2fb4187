"""The local launcher: up to N runs at a time on this machine, each in its own process.

Run processes are forked from a multiprocessing *forkserver* that has imported torch and vlpbench once,
so a run starts in milliseconds instead of the seconds a fresh interpreter needs, and shares nothing
with the sweep process: a run that crashes, or is killed, ends only itself. The other way round, the
forkserver and the runs die with the sweep, even on a ``kill -9`` of it alone (``vlpbench.sweep.lifeline``).
With GPUs, each worker slot owns one visible GPU (``CUDA_VISIBLE_DEVICES`` is set in its processes); on CPU
the usable CPUs are divided between the slots (each run's ``--threads``, :func:`cpu_share`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Callable

from vlpbench.sweep.plan import Run
from vlpbench.sweep.report import RunOutcome, exit_outcome

# How long to wait for a terminated run process before killing it.
_TERMINATE_GRACE_S = 10.0


def visible_gpus(device: str) -> list[str]:
    """The GPUs runs may use: ``CUDA_VISIBLE_DEVICES``'s entries, else every CUDA device; none for
    ``device="cpu"``. Counting devices does not initialise CUDA, so forking stays safe."""
    if device == "cpu":
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_slots(workers: int | None, gpus: list[str]) -> list[dict[str, str]]:
    """The environment of each worker slot: one slot per GPU by default, else one; slots take the GPUs in
    turn (``CUDA_VISIBLE_DEVICES``), and where several share a GPU each is told how many do
    (``VLPBENCH_RUNS_PER_DEVICE``: automatic inference batches then plan within an equal share of its memory,
    :mod:`vlpbench.protocols.batch_fill`)."""
    from vlpbench.protocols.batch_fill import RUNS_PER_DEVICE

    count = workers or max(1, len(gpus))
    if not gpus:
        return [{} for _ in range(count)]
    slots = [gpus[i % len(gpus)] for i in range(count)]
    return [{"CUDA_VISIBLE_DEVICES": gpu, **({RUNS_PER_DEVICE: str(slots.count(gpu))} if slots.count(gpu) > 1 else {})}
            for gpu in slots]


def cpu_share(workers: int | None, gpus: list[str]) -> int | None:
    """The ``--threads`` of each run on CPU: an equal share of the usable CPUs per worker slot, so that
    parallel runs do not oversubscribe them; None with GPUs, or where ``OMP_NUM_THREADS`` is set (each run
    then follows it, ``vlpbench.threads``)."""
    from vlpbench.threads import ENVIRONMENT, usable_cpus

    if gpus or os.environ.get(ENVIRONMENT, "").strip():
        return None
    return max(1, usable_cpus().count // (workers or 1))


def launch_local(runs: list[Run], arguments: Callable[[Run], list[str]], *, workers: int | None, device: str,
                 started: Callable[[Run], None], finished: Callable[[RunOutcome], None]) -> list[RunOutcome]:
    """Execute ``runs`` (``vlpbench <arguments(run)>`` each), at most one per worker slot at a time.

    ``started`` and ``finished`` are called as runs start and end. On an interrupt the runs still going
    are terminated, so that no process outlives the sweep.
    """
    context = _context()
    slots = worker_slots(workers, visible_gpus(device))
    free = list(range(len(slots)))
    queue = deque(runs)
    running: dict[int, tuple[multiprocessing.Process, Run, int, float]] = {}
    outcomes: list[RunOutcome] = []
    try:
        while queue or running:
            while queue and free:
                slot, run = free.pop(0), queue.popleft()
                process = context.Process(
                    target=_child, name=f"vlpbench run {run.describe()}",
                    args=(arguments(run), str(run.log), str(run.record) if run.record else None, slots[slot],
                          os.getpid()))
                process.start()
                running[process.sentinel] = (process, run, slot, time.monotonic())
                started(run)
            for sentinel in wait(list(running), timeout=1.0):
                process, run, slot, since = running.pop(sentinel)
                process.join()
                free.append(slot)
                outcome = exit_outcome(run, process.exitcode, time.monotonic() - since)
                outcomes.append(outcome)
                finished(outcome)
    finally:
        _stop([entry[0] for entry in running.values()])
    return outcomes


def _child(argv: list[str], log: str, record: str | None, env: dict[str, str], sweep_pid: int) -> None:
    # Imported in the child: the forkserver preloads this module, so the import costs nothing there.
    from vlpbench.sweep.worker import child_main

    child_main(argv, log, record, env, sweep_pid)


def start_server() -> None:
    """Start this process's run server now rather than at the first run, so that its imports (seconds)
    overlap with other work; later sweeps of this process reuse it."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _context() -> multiprocessing.context.BaseContext:
    """A forkserver that has imported the worker module, where the platform has one; else spawn.

    ``forkserver_init`` comes first so the server is tied to this process before seconds of imports.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["vlpbench.sweep.forkserver_init", "vlpbench.sweep.worker"])
    return context


def _stop(processes: list[multiprocessing.Process]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
            process.join()

