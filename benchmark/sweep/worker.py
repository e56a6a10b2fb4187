"""The code a run's own process executes: ``vlpbench run ...`` with its output in the run's log file.

The local launcher forks run processes from a server that has imported this module (and so torch and
vlpbench) once; the slurm launcher calls ``execute_job`` inside each array task.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import traceback
import warnings
from contextlib import ExitStack
from pathlib import Path

from vlpbench.cli import main as cli_main
from vlpbench.sweep.lifeline import tie_to_sweep
from vlpbench.sweep.report import SKIPPED_PREFIX, log_time
from vlpbench.sweep.runlock import HELD_EXIT, RunHeld, remove_stale_temporaries, run_lock


def _preload() -> None:
    """Import what every run needs (torch, smp with timm and torchvision, the protocols: seconds of
    imports), so that processes forked from a server that imported this module start warm."""
    import segmentation_models_pytorch  # noqa: F401

    import vlpbench.adapters.base  # noqa: F401
    import vlpbench.api  # noqa: F401
    from vlpbench.registry import PROTOCOLS

    for name in PROTOCOLS.names():
        PROTOCOLS.get(name)
    # A run process forked from the server re-imports the sweep's main module; when that is
    # ``python -m vlpbench.cli``, runpy warns that the module is already imported, which is harmless.
    warnings.filterwarnings("ignore", message=r".*found in sys\.modules after import of package",
                            category=RuntimeWarning)


_preload()


def execute(argv: list[str], log: str | os.PathLike, record: str | os.PathLike | None = None) -> int:
    """Run ``vlpbench <argv>`` in this process, appending its stdout and stderr to ``log``; the exit code.

    The run's lock (``vlpbench.sweep.runlock``, beside ``record``) is held while it runs; when another live
    process holds it, nothing runs, the log says who holds it, and the code is ``HELD_EXIT``. Before the
    run, temporary files that a killed earlier attempt left next to ``record`` are removed (``write_record``
    renames its temporary file into place, so such a file is never a record).
    """
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out, ExitStack() as held:
        if record is not None:
            try:
                held.enter_context(run_lock(record))
            except RunHeld as error:
                out.write(f"=== {log_time()} pid {os.getpid()}: not started\n{SKIPPED_PREFIX}{error}\n")
                return HELD_EXIT
            remove_stale_temporaries(Path(record))  # under the lock: no live run's temporary file is touched
        started = time.monotonic()
        out.write(f"=== {log_time()} pid {os.getpid()}: vlpbench {shlex.join(argv)}\n")
        out.flush()
        code = _with_output_to(out.fileno(), argv)
        out.write(f"=== {log_time()} exit code {code} after {time.monotonic() - started:.1f} s\n")
    return code


def child_main(argv: list[str], log: str, record: str | None, env: dict[str, str], sweep_pid: int) -> None:
    """Entry point of a local run process: die with the sweep ``sweep_pid``, set the slot's environment, run,
    exit with the run's code (``argv``'s ``--threads`` sizes torch's threads, ``vlpbench.threads``)."""
    tie_to_sweep(sweep_pid)
    os.environ.update(env)
    sys.exit(execute(argv, log, record))


def execute_job(argv: list[str], log: str, record: str | None) -> int:
    """Entry point of a slurm array task (pickled by submitit): the run's exit code."""
    return execute(argv, log, record)


def _with_output_to(fd: int, argv: list[str]) -> int:
    """``vlpbench.cli.main(argv)`` with file descriptors 1 and 2 pointing at ``fd``, then restored."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        code = cli_main(argv)
    except SystemExit as stop:  # argparse rejects the arguments
        code = stop.code if isinstance(stop.code, int) else 1
    except Exception:  # a bug, not a user error: the traceback goes to the log, the sweep carries on
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    return code
