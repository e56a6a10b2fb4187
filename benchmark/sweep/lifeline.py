"""Run processes die with the sweep that launched them, however the sweep ends (``kill -9`` included).

A local run process is forked by a multiprocessing forkserver, itself a child of the sweep process; the
forkserver lives as long as any run it forked does. So a sweep killed with SIGKILL (no ``finally`` runs)
would leave the forkserver and its runs going, and a resumed sweep would train the same runs again beside
them. On Linux the kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) closes the chain:
the forkserver is killed when the sweep dies, each run process when the forkserver dies. The kernel does
it at once, whatever the process is doing (a watchdog thread would wait for the GIL, and could mistake a
recycled pid for the sweep). Elsewhere (macOS) a run process polls the sweep's pid instead.

A torchrun run (``vlpbench.sweep.torchrun``) is a chain of its own: the sweep starts the run's holder process
(``vlpbench.sweep.torchrun_hold``), which starts torchrun, which starts the ranks. The holder and the ranks
find the sweep's pid in the environment (:data:`SWEEP_PID_VARIABLE`) and tie themselves to their parents as
above (:func:`tie_to_sweep_in_environment`), and the holder has the kernel tie torchrun to itself before
torchrun starts (:func:`die_with`). torchrun puts each rank in a session of its own, out of reach of a kill
of the process group, so the ranks' own tie is what ends them.

Caveat of the kernel signal: it follows the *thread* that started the process. A sweep is launched from
the main thread; a forkserver started from a thread that ends is restarted by multiprocessing when needed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path

# <linux/prctl.h>
_PR_SET_PDEATHSIG = 1
# How often a run process without the kernel signal checks that its sweep is alive.
_POLL_S = 0.5
# The sweep's pid, for the processes of a run that the sweep does not start itself (torchrun's).
SWEEP_PID_VARIABLE = "VLPBENCH_SWEEP_PID"


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent exits (Linux); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and, where ``/proc`` says so, is not a zombie (dead, not yet
    reaped by its parent: a sweep killed a moment ago looks like that)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): existing is all we can tell
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state follows the command name, which may hold ")"


def tie_to_sweep(sweep_pid: int) -> None:
    """Make this run process end when the sweep process ``sweep_pid`` does.

    With the kernel signal, the parent (the forkserver, or the sweep itself for spawned processes) is the
    one to follow; the sweep is checked once after asking for it, in case it died before. Without it, a
    daemon thread polls ``sweep_pid`` and kills this process when it is gone.
    """
    if die_with_parent():
        if not alive(sweep_pid):
            os._exit(1)  # the sweep died before the signal was armed
        return
    threading.Thread(target=_watch, args=(sweep_pid,), name="vlpbench sweep watchdog", daemon=True).start()


def tie_to_sweep_in_environment() -> bool:
    """:func:`tie_to_sweep` with the pid :data:`SWEEP_PID_VARIABLE` names; False, doing nothing, where the
    variable is not set (a command started by hand, not by a sweep).

    Raises:
        ValueError: the variable is set but holds no pid.
    """
    value = os.environ.get(SWEEP_PID_VARIABLE)
    if value is None:
        return False
    if not value.isdigit():
        raise ValueError(f"{SWEEP_PID_VARIABLE}={value!r}: expected the pid of the sweep process")
    tie_to_sweep(int(value))
    return True


def die_with(parent_pid: int) -> None:
    """For ``subprocess.Popen(preexec_fn=...)``, run in the child between fork and exec: have the kernel
    SIGKILL the child when ``parent_pid``, the process starting it, exits, and exit at once if it already has.
    The signal outlives exec. Does nothing where the kernel signal is not available."""
    if die_with_parent() and os.getppid() != parent_pid:
        os._exit(1)


def _watch(sweep_pid: int) -> None:
    while alive(sweep_pid):
        threading.Event().wait(_POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)
