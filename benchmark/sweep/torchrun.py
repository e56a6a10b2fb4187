"""The torchrun launcher: one run at a time, each over ``nproc_per_node`` processes on this node.

Each run is ``torchrun --standalone --nproc-per-node N -m vlpbench.sweep.torchrun_rank run ...``. The processes
share the run (:mod:`vlpbench.distributed`): the segmentation, detection and finetune protocols train under
DistributedDataParallel on sharded batches and gather their validation and test scores; the linear
protocol shards feature extraction and gathers the features; the zero_shot and grounding protocols
shard inference and gather scores and heat maps; rank 0 alone writes the record. A protocol that does not
declare ``supports_distributed`` refuses N > 1 with a ConfigError naming those that do. ``--dry-run``
shows the commands.

As a local run does, a torchrun run holds its lock while it runs (a run another live process holds is not
started: it is reported skipped, naming the holder) and dies with the sweep, ``kill -9`` of the sweep
included: the sweep starts :mod:`vlpbench.sweep.torchrun_hold`, which holds the lock and starts torchrun;
the sweep, the holder, torchrun and the ranks are tied one to the next (:mod:`vlpbench.sweep.lifeline`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from vlpbench.sweep.lifeline import SWEEP_PID_VARIABLE
from vlpbench.sweep.plan import Run
from vlpbench.sweep.report import RunOutcome, exit_outcome
from vlpbench.sweep.torchrun_hold import hold_command


def torchrun_launcher() -> list[str]:
    """How torchrun is started: the ``torchrun`` script next to this Python, else the one on PATH, else the
    module it runs (``torch.distributed.run``)."""
    script = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    return [script] if script else [sys.executable, "-m", "torch.distributed.run"]


def torchrun_command(arguments: list[str], nproc_per_node: int) -> list[str]:
    """The command that executes ``vlpbench <arguments>`` under torchrun with ``nproc_per_node`` processes."""
    return torchrun_launcher() + ["--standalone", f"--nproc-per-node={nproc_per_node}", "-m",
                                  "vlpbench.sweep.torchrun_rank", *arguments]


def launch_torchrun(runs: list[Run], arguments: Callable[[Run], list[str]], *, nproc_per_node: int,
                    started: Callable[[Run], None], finished: Callable[[RunOutcome], None]) -> list[RunOutcome]:
    """Execute ``runs`` one after the other under torchrun, each holding its lock, with its output in its log.

    A run another live process holds ends ``skipped`` (``vlpbench.sweep.runlock.HELD_EXIT``), naming the holder.
    """
    environment = {**os.environ, SWEEP_PID_VARIABLE: str(os.getpid())}
    outcomes = []
    for run in runs:
        command = hold_command(torchrun_command(arguments(run), nproc_per_node), run.record)
        run.log.parent.mkdir(parents=True, exist_ok=True)
        started(run)
        since = time.monotonic()
        with open(run.log, "a", encoding="utf-8") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                  check=False).returncode
        outcome = exit_outcome(run, code, time.monotonic() - since)
        outcome.command = command
        outcomes.append(outcome)
        finished(outcome)
    return outcomes
