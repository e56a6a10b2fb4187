"""One lock per run, so that no two live processes train the same run (a resumed sweep beside the old one,
two sweeps over the same results folder, a slurm array beside a local resume).

The lock is ``fcntl.flock`` on ``.<record name>.lock`` beside the record the run will write, taken by the
run's own process before it starts and held until it ends. The file names its holder (pid and host) for
messages. The kernel drops a flock when its holder dies, ``kill -9`` included, so a lock file that a dead
process left is simply taken over: no pid to test, so no recycled pid is mistaken for a live holder.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vlpbench.files import leftover_temporaries

# Exit code of a run process that found its run held by another process (sysexits' EX_TEMPFAIL).
HELD_EXIT = 75
# How every message about a held run starts (reports pick those runs out by it).
HELD = "held by"


class RunHeld(Exception):
    """The run's lock is held by another live process; the message names it and the lock file."""


def lock_path(record: str | os.PathLike) -> Path:
    """The lock file of the run writing ``record``: ``.<name>.lock`` beside it (hidden, like its temporaries)."""
    record = Path(record)
    return record.with_name(f".{record.name}.lock")


def holder(record: str | os.PathLike) -> str | None:
    """Who holds the lock of the run writing ``record`` now (``"pid 123 on host"``), or None if no live
    process does (no lock file, or one a dead process left)."""
    try:
        fd = os.open(lock_path(record), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(fd)
    else:
        return None
    finally:
        os.close(fd)  # releases the shared lock if it was taken


def held_message(record: str | os.PathLike, who: str) -> str:
    """What a sweep says of a run it does not start because ``who`` holds it; starts with ``HELD``."""
    return f"{HELD} {who} (lock file {lock_path(record)}): another process is running it; not started again"


@contextmanager
def run_lock(record: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of the run writing ``record`` for the ``with`` block; yields the lock file's path.

    Raises:
        RunHeld: another live process holds it (the message names it); nothing is written then.
    """
    path = lock_path(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder_text(fd)
            os.close(fd)
            raise RunHeld(held_message(record, who)) from None
        # The holder before us unlinks the file as it ends; if it did between our open and our flock, we
        # locked a file nobody else will see: lock the one now at the path instead.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # still locked: a process that opened it first re-checks the path
        os.close(fd)


def _holder_text(fd: int) -> str:
    """The holder a lock file names, or a stand-in while its holder has not written it yet."""
    text = os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip()
    return text or "another process"


def remove_stale_temporaries(record: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writes of ``record`` left (``vlpbench.files.leftover_temporaries``);
    the paths removed. Call it holding the run's lock: then no live run's temporary file is touched."""
    stale = leftover_temporaries(record)
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
