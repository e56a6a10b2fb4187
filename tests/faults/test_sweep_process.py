"""Issue 17 item 7: a sweep's run processes die with it, and a run another live process holds is not
started again (one lock per run)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vlpbench import api
from vlpbench.cli import main
from vlpbench.sweep import build_spec, expand
from vlpbench.sweep.runlock import HELD_EXIT, RunHeld, holder, lock_path, run_lock
from vlpbench.sweep.worker import execute

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


def _values(root, results):
    """One cheap run: the random-init model on RSNA classification, one image size, one epoch."""
    return {"models": ["random"], "tasks": ["rsna_cls"], "fracs": [1.0], "seeds": [0],
            "set": {"image_size": 32, "resize_size": 32, "max_epochs": 1, "bootstrap_resamples": 20},
            "data_roots": {"rsna": str(root)}, "results": str(results), "device": "cpu"}


@pytest.fixture
def blocking_rsna(tmp_path):
    """A synthetic RSNA folder whose label file is a FIFO nobody writes: a run reading it blocks, without
    using the CPU, as long as a training run would last."""
    root = tmp_path / "rsna"
    api.synth("rsna", root, n=8, size=32, progress=False)
    labels = root / "stage_2_train_labels.csv"
    labels.unlink()
    os.mkfifo(labels)
    return root


def _state(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` of process ``pid`` from /proc, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def _gone(pid: int) -> bool:
    state = _state(pid)
    return state is None or state[0] == "Z"  # a zombie is dead, its parent just has not reaped it


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@linux_only
def test_kill_9_of_the_sweep_alone_ends_its_forkserver_and_its_runs(blocking_rsna, tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(_values(blocking_rsna, tmp_path / "results")))
    [run] = expand(build_spec(_values(blocking_rsna, tmp_path / "results"))).runs
    with open(tmp_path / "sweep.out", "wb") as out:
        sweep = subprocess.Popen([sys.executable, "-m", "vlpbench.cli", "-q", "sweep", "--config", str(sweep_file)],
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    child = forkserver = None
    try:
        # The run process writes its pid into the run's log before it starts (then blocks on the FIFO).
        _wait_for(lambda: run.log.is_file() and ": vlpbench run" in run.log.read_text(), 120,
                  (tmp_path / "sweep.out").read_bytes().decode(errors="replace"))
        child = int(run.log.read_text().split(" pid ", 1)[1].split(":", 1)[0])
        forkserver = _state(child)[1]
        assert forkserver != sweep.pid and _state(forkserver)[1] == sweep.pid  # sweep → forkserver → run
        assert holder(run.record) == f"pid {child} on {socket.gethostname()}"

        os.kill(sweep.pid, signal.SIGKILL)  # the sweep alone, not its process group
        sweep.wait()
        _wait_for(lambda: _gone(forkserver) and _gone(child), 5, "the forkserver or the run outlived the sweep")
        # The kernel releases the dead run's lock once its last thread has exited (the zombie leader may go first).
        _wait_for(lambda: holder(run.record) is None, 5, "the killed run's lock is still held")
        assert not run.record.exists()
    finally:
        for pid in (sweep.pid, child, forkserver):
            if pid and not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_sweep_skips_a_run_another_live_process_holds_and_names_it(tmp_path, capsys):
    values = _values(tmp_path / "rsna", tmp_path / "results")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(values))
    [run] = expand(build_spec(values)).runs
    with run_lock(run.record) as lock:
        assert lock == lock_path(run.record) and lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        assert main(["-q", "sweep", "--config", str(sweep_file)]) == 0
    out = capsys.readouterr().out
    assert "1 run(s): 0 done, 0 failed, 1 skipped" in out
    assert "runs another live process holds (not started):" in out
    assert f"held by pid {os.getpid()} on {socket.gethostname()} (lock file {lock})" in out
    assert not run.log.exists() and not run.record.exists()  # nothing was started
    assert not lock.exists()  # released and removed with the block


def test_a_run_process_that_loses_the_race_for_the_lock_runs_nothing(tmp_path):
    record, log = tmp_path / "runs" / "frac1-seed0.json", tmp_path / "logs" / "run.log"
    record.parent.mkdir(parents=True)
    stale = record.with_name(f".{record.name}.0123abcd.tmp")
    stale.write_text("{")  # a live holder's temporary file: not ours to remove
    with run_lock(record):
        assert execute(["--version"], log, record) == HELD_EXIT
    text = log.read_text()
    assert f"skipped: held by pid {os.getpid()}" in text and "vlpbench --version" not in text
    assert stale.exists() and not record.exists()
    with pytest.raises(RunHeld, match=f"held by pid {os.getpid()} .*lock file {lock_path(record)}"):
        with run_lock(record), run_lock(record):
            pass


def test_a_lock_file_a_dead_process_left_is_taken_over(tmp_path):
    record = tmp_path / "frac1-seed0.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(record).write_text(f"pid {dead.stdout.strip()} on {socket.gethostname()}\n")  # no flock behind it
    assert holder(record) is None
    with run_lock(record) as lock:
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        assert holder(record) == f"pid {os.getpid()} on {socket.gethostname()}"
    assert holder(record) is None and not lock.exists()
