"""Resumable sweeps: many ``vlpbench run``\\ s (models × tasks × fractions × seeds), each in its own process.

A run whose record already exists is skipped, so a sweep that was killed resumes where it stopped; so is a
run that another live process holds (a lock per run), so two sweeps never train the same run at once;
records are written atomically, so a killed run leaves none behind. Each run appends its output to
``<results>/sweep_logs/<model>/<task>/frac<f>-seed<s>.log``. Launchers: ``local`` (this machine,
:mod:`vlpbench.sweep.local`), ``slurm`` (a job array through submitit, :mod:`vlpbench.sweep.slurm`) and
``torchrun`` (one run over several processes, :mod:`vlpbench.sweep.torchrun`). Before launching,
``vlpbench sweep --plan`` (:mod:`vlpbench.sweep.estimate`) lists the runs with each one's estimated device time.

Example::

    from vlpbench.sweep import build_spec, run_sweep

    spec = build_spec({"models": ["random"], "tasks": ["siim_seg"], "fracs": [0.1, 1.0], "seeds": [0, 1]})
    report = run_sweep(spec)
    print(report.format())
"""

from __future__ import annotations

import time

from vlpbench.sweep.plan import Plan, Run, expand, pending
from vlpbench.sweep.report import LiveSummary, RunOutcome, SweepReport
from vlpbench.sweep.runlock import held_message, holder
from vlpbench.sweep.spec import ModelSpec, SweepSpec, build_spec, cli_values, load_sweep_file

__all__ = ["ModelSpec", "Plan", "Run", "RunOutcome", "SweepReport", "SweepSpec", "build_spec", "cli_values",
           "expand", "load_sweep_file", "pending", "run_sweep"]


def run_sweep(spec: SweepSpec, *, force: bool = False, dry_run: bool = False, progress: bool = True) -> SweepReport:
    """Expand ``spec``, skip the runs whose records exist (all run with ``force``, replacing records and
    keeping the old ones as .bak) and those another live process is running (their lock is held,
    ``vlpbench.sweep.runlock``), and launch the others with ``spec.launcher``.

    ``dry_run`` launches nothing: the report lists the command of each run that would be launched.
    Runs that fail do not stop the others; the report's ``exit_code`` is 1 when any failed.

    Raises:
        ConfigError / RegistryError: the spec names an unknown task or adapter, or an override a task
            rejects (checked before anything runs).
    """
    started = time.monotonic()
    plan = expand(spec)
    to_run, skipped = runs_to_launch(plan, force=force)
    outcomes = {id(outcome.run): outcome for outcome in skipped}
    threads = run_threads(spec)

    def arguments(run: Run) -> list[str]:
        return run.arguments(spec.results, spec.device, overwrite=force, threads=threads)

    if dry_run:
        for run in to_run:
            outcomes[id(run)] = RunOutcome(run=run, status="planned", command=run_command(spec, arguments(run)))
    else:
        summary = LiveSummary(len(plan.runs), len(skipped), progress=progress)
        try:
            for outcome in _launch(spec, to_run, arguments, summary):
                outcomes[id(outcome.run)] = outcome
        finally:
            summary.close()
    ordered = [outcomes[id(run)] for run in plan.runs if id(run) in outcomes]
    return SweepReport(outcomes=ordered, notes=plan.notes, seconds=time.monotonic() - started)


def runs_to_launch(plan: Plan, *, force: bool = False) -> tuple[list[Run], list[RunOutcome]]:
    """The runs of ``plan`` to launch, in plan order, and a ``skipped`` outcome for each of the others: its
    record exists (none is skipped for that with ``force``), or another live process holds it."""
    to_run, done = pending(plan.runs, force=force)
    skipped = [RunOutcome(run=run, status="skipped", reason=f"record exists: {run.record}") for run in done]
    for run, who in held_runs(to_run):
        to_run.remove(run)
        skipped.append(RunOutcome(run=run, status="skipped", reason=held_message(run.record, who)))
    return to_run, skipped


def run_threads(spec: SweepSpec) -> int | None:
    """Each run's ``--threads``: the sweep's, else the local launcher's share of the CPUs on CPU, else None
    (a slurm or torchrun run sizes its own threads to the CPUs it is given)."""
    return spec.threads if spec.threads is not None else _default_threads(spec)


def held_runs(runs: list[Run]) -> list[tuple[Run, str]]:
    """``(run, its holder)`` for each of ``runs`` whose lock another live process holds now."""
    held = [(run, holder(run.record)) for run in runs if run.record is not None]
    return [(run, who) for run, who in held if who is not None]


def _default_threads(spec: SweepSpec) -> int | None:
    """Each run's ``--threads`` where the sweep sets none: the local launcher's share of the CPUs on CPU;
    else None (a slurm or torchrun run sizes its own threads to the CPUs it is given)."""
    if spec.launcher != "local":
        return None
    from vlpbench.sweep.local import cpu_share, visible_gpus

    return cpu_share(spec.workers, visible_gpus(spec.device))


def _launch(spec: SweepSpec, runs: list[Run], arguments, summary: LiveSummary) -> list[RunOutcome]:
    hooks = {"started": summary.started, "finished": summary.finished}
    if spec.launcher == "slurm":
        from vlpbench.sweep.slurm import launch_slurm

        return launch_slurm(runs, arguments, results=spec.results, options=spec.slurm, **hooks)
    if spec.launcher == "torchrun":
        from vlpbench.sweep.torchrun import launch_torchrun

        return launch_torchrun(runs, arguments, nproc_per_node=spec.nproc_per_node, **hooks)
    from vlpbench.sweep.local import launch_local

    return launch_local(runs, arguments, workers=spec.workers, device=spec.device, **hooks)


def run_command(spec: SweepSpec, arguments: list[str]) -> list[str]:
    """What a dry run prints for one run: the torchrun command, or the ``vlpbench`` one."""
    if spec.launcher == "torchrun":
        from vlpbench.sweep.torchrun import torchrun_command

        return torchrun_command(arguments, spec.nproc_per_node)
    return ["vlpbench", *arguments]
