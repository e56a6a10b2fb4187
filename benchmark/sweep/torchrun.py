"""The torchrun launcher: one run at a time, each over ``nproc_per_node`` processes on this node.

Each run is ``torchrun --standalone --nproc-per-node N -m vlpbench.cli run ...``. The processes share
the run (:mod:`vlpbench.distributed`): the segmentation, detection and finetune protocols train under
DistributedDataParallel on sharded batches and gather their validation and test scores; the linear
protocol shards feature extraction and gathers the features; the zero_shot and grounding protocols
shard inference and gather scores and heat maps; rank 0 alone writes the record. A protocol that does not
declare ``supports_distributed`` refuses N > 1 with a ConfigError naming those that do. ``--dry-run``
shows the commands.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from vlpbench.sweep.plan import Run
from vlpbench.sweep.report import RunOutcome, failure_reason
from vlpbench.sweep.worker import remove_stale_temporaries


def torchrun_command(arguments: list[str], nproc_per_node: int) -> list[str]:
    """The command that executes ``vlpbench <arguments>`` under torchrun with ``nproc_per_node`` processes.

    Uses the ``torchrun`` script next to this Python, else the module it runs (``torch.distributed.run``).
    """
    script = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    launcher = [script] if script else [sys.executable, "-m", "torch.distributed.run"]
    return launcher + ["--standalone", f"--nproc-per-node={nproc_per_node}", "-m", "vlpbench.cli", *arguments]


def launch_torchrun(runs: list[Run], arguments: Callable[[Run], list[str]], *, nproc_per_node: int,
                    started: Callable[[Run], None], finished: Callable[[RunOutcome], None]) -> list[RunOutcome]:
    """Execute ``runs`` one after the other under torchrun, each with its output in its log."""
    outcomes = []
    for run in runs:
        command = torchrun_command(arguments(run), nproc_per_node)
        run.log.parent.mkdir(parents=True, exist_ok=True)
        if run.record is not None:
            remove_stale_temporaries(run.record)
        started(run)
        since = time.monotonic()
        with open(run.log, "a", encoding="utf-8") as log:
            log.write(f"=== {' '.join(command)}\n")
            log.flush()
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        outcome = RunOutcome(run=run, status="done" if code == 0 else "failed", seconds=time.monotonic() - since,
                             exit_code=code, command=command)
        if code != 0:
            outcome.reason = failure_reason(code, run.log)
        outcomes.append(outcome)
        finished(outcome)
    return outcomes
