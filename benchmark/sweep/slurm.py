"""The slurm launcher: the runs of a sweep as one SLURM job array, submitted through submitit.

Each array task executes one run (``vlpbench.sweep.worker.execute_job``) and writes the run's own log;
submitit's logs of the tasks go to ``<results>/sweep_logs/submitit``. Setting ``cluster: local`` runs the
array on this machine through submitit's local executor (each task a separate process), which is how
the launcher is tested without a cluster.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

from vlpbench.errors import ConfigError
from vlpbench.sweep.plan import LOG_FOLDER, Run
from vlpbench.sweep.report import RunOutcome, exit_outcome

# A run gets this many minutes unless the sweep sets slurm.timeout_min.
DEFAULT_TIMEOUT_MIN = 24 * 60
_POLL_S = 2.0


def executor(results: Path, options: dict[str, Any]):
    """A submitit ``AutoExecutor`` for ``options`` (the sweep's ``slurm`` mapping).

    Raises:
        ConfigError: submitit is not installed, there is no SLURM and ``cluster`` is not ``local``, or
            submitit rejects the options.
    """
    try:
        import submitit
    except ImportError as error:
        raise ConfigError("the slurm launcher needs submitit: pip install submitit") from error
    cluster = options.get("cluster") or "slurm"
    # submitit would otherwise fall back to running the array here without a word.
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("the slurm launcher found no SLURM here (sbatch is not on PATH): run the sweep where jobs "
                          "can be submitted, or pass --slurm-cluster local (slurm: {cluster: local}) to run the "
                          "job array on this machine")
    folder = Path(results) / LOG_FOLDER / "submitit"
    try:
        auto = submitit.AutoExecutor(folder=folder, cluster=cluster)
        auto.update_parameters(
            name="vlpbench-sweep",
            timeout_min=int(options.get("timeout_min") or DEFAULT_TIMEOUT_MIN),
            gpus_per_node=options.get("gpus_per_node"),
            cpus_per_task=options.get("cpus_per_task"),
            mem_gb=options.get("mem_gb"),
            slurm_partition=options.get("partition"),
            slurm_array_parallelism=options.get("array_parallelism"),
        )
    except (ValueError, NameError, AssertionError, RuntimeError) as error:
        raise ConfigError(f"slurm options {options}: {error}") from error
    return auto


def launch_slurm(runs: list[Run], arguments: Callable[[Run], list[str]], *, results: Path, options: dict[str, Any],
                 started: Callable[[Run], None], finished: Callable[[RunOutcome], None]) -> list[RunOutcome]:
    """Submit ``runs`` as one job array and wait for every task; the outcomes in completion order.

    Killing the sweep does not cancel the submitted tasks: their records still arrive, and a rerun of
    the sweep skips them.
    """
    from vlpbench.sweep.worker import execute_job

    if not runs:
        return []
    auto = executor(results, options)
    payloads = [(arguments(run), str(run.log), str(run.record) if run.record else None) for run in runs]
    jobs = auto.map_array(execute_job, *zip(*payloads))
    submitted = time.monotonic()
    for run in runs:
        started(run)
    waiting = dict(zip(jobs, runs))
    outcomes: list[RunOutcome] = []
    while waiting:
        for job in [job for job in waiting if job.done()]:
            run = waiting.pop(job)
            outcome = _outcome(job, run, time.monotonic() - submitted)
            outcomes.append(outcome)
            finished(outcome)
        if waiting:
            time.sleep(_POLL_S)
    return outcomes


def _outcome(job, run: Run, seconds: float) -> RunOutcome:
    """A finished job's outcome: its exit code, or why submitit says the task did not complete."""
    try:
        code = job.result()
    except Exception as error:  # submitit's FailedJobError / UncompletedJobError: timeout, preemption, crash
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return RunOutcome(run=run, status="failed", seconds=seconds,
                          reason=f"job {job.job_id}: {first} (submitit log: {job.paths.stderr})")
    return exit_outcome(run, code, seconds)
