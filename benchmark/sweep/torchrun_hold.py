"""The process of one torchrun run of a sweep: ``python -m vlpbench.sweep.torchrun_hold [--record R] -- COMMAND``.

It does for a torchrun run what a local run's own process does (``vlpbench.sweep.worker.execute``): it dies
with the sweep (``vlpbench.sweep.lifeline``; the sweep's pid is in the environment), holds the run's lock
(``vlpbench.sweep.runlock``, beside record ``R``) while COMMAND, the torchrun command, runs, and before that
removes the temporary files a killed earlier attempt left. When another live process holds the run, COMMAND
is not started, the output says who holds it, and the exit code is ``HELD_EXIT``. COMMAND is started with the
kernel's parent-death signal, so it dies with this process; its exit code is this process's, and a COMMAND
killed by a signal has this process end by the same signal. Output goes to stdout: the sweep points it at the
run's log.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from functools import partial

from vlpbench.sweep.lifeline import die_with, tie_to_sweep_in_environment
from vlpbench.sweep.report import SKIPPED_PREFIX, log_time
from vlpbench.sweep.runlock import HELD_EXIT, RunHeld, remove_stale_temporaries, run_lock


def hold_command(command: list[str], record: str | os.PathLike | None) -> list[str]:
    """The command that runs ``command`` (a torchrun command) holding the lock of the run writing ``record``
    (None: a run whose record path is unknown, run without a lock)."""
    held = ["--record", os.fspath(record)] if record is not None else []
    return [sys.executable, "-m", "vlpbench.sweep.torchrun_hold", *held, "--", *command]


def hold(command: list[str], record: str | os.PathLike | None) -> int:
    """Run ``command`` holding the run's lock (module docstring); its exit code, ``HELD_EXIT`` when another live
    process holds the run, or ``-N`` when a signal N killed it."""
    with ExitStack() as held:
        if record is not None:
            try:
                held.enter_context(run_lock(record))
            except RunHeld as error:
                print(f"=== {log_time()} pid {os.getpid()}: not started\n{SKIPPED_PREFIX}{error}", flush=True)
                return HELD_EXIT
            remove_stale_temporaries(record)
        started = time.monotonic()
        print(f"=== {log_time()} pid {os.getpid()}: {shlex.join(command)}", flush=True)
        code = subprocess.run(command, preexec_fn=partial(die_with, os.getpid()), check=False).returncode
        print(f"=== {log_time()} exit code {code} after {time.monotonic() - started:.1f} s", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: tie to the sweep, then :func:`hold`."""
    parser = argparse.ArgumentParser(prog="python -m vlpbench.sweep.torchrun_hold")
    parser.add_argument("--record", help="the record the run writes; its lock is held while COMMAND runs")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND: the torchrun command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("expected -- COMMAND")
    tie_to_sweep_in_environment()
    code = hold(command, args.record)
    if code < 0:  # end as COMMAND ended, so the sweep reports the signal (the lock is released by now)
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code  # the shell's code for it, where the signal does not end this process
    return code


if __name__ == "__main__":
    sys.exit(main())
