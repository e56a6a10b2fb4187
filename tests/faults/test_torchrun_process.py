"""A sweep's torchrun runs take the same lock per run as local runs, and die with the sweep.

A fake ``torchrun`` (a script that records what it saw) stands in for the real one: what is under test is the
process that holds the run (``vlpbench.sweep.torchrun_hold``), the chain sweep → holder → torchrun → ranks, and
the rank's entry point, not torch's launcher.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlpbench.sweep import build_spec, expand, torchrun
from vlpbench.sweep.lifeline import SWEEP_PID_VARIABLE
from vlpbench.sweep.runlock import HELD_EXIT, held_message, holder, lock_path, run_lock
from vlpbench.sweep.torchrun_hold import hold_command

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
HOST = socket.gethostname()

# What the fake torchrun does: write down its arguments, the sweep pid it was given and the run's lock as it
# finds it, then start one "rank" in a session of its own, as torchrun does, and wait for it.
FAKE_TORCHRUN = """#!{python}
import os, subprocess, sys
from pathlib import Path

out = Path({out!r})
lock = Path({lock!r})
(out / "torchrun.txt").write_text("\\n".join([str(os.getpid()), os.environ.get({variable!r}, ""),
                                            lock.read_text().strip() if lock.exists() else "no lock", *sys.argv[1:]]))
rank = subprocess.Popen([sys.executable, "-c", {rank!r}], start_new_session=True)
sys.exit(rank.wait() or int(os.environ.get("FAKE_TORCHRUN_EXIT", "0")))
"""
# A rank ties itself to the sweep as vlpbench.sweep.torchrun_rank does, says so, and lasts as long as told.
RANK = """import os, sys, time
from pathlib import Path
from vlpbench.sweep.lifeline import tie_to_sweep_in_environment
tie_to_sweep_in_environment()
Path({out!r}, "rank.pid").write_text(str(os.getpid()))
time.sleep(float(os.environ.get("FAKE_RANK_SECONDS", "0")))
"""


@pytest.fixture
def run(tmp_path):
    """One torchrun run of a sweep (nothing of it exists yet)."""
    [run] = expand(build_spec({"models": ["random"], "tasks": ["rsna_cls"], "fracs": [1.0], "seeds": [0],
                               "results": str(tmp_path / "results"), "launcher": "torchrun",
                               "nproc_per_node": 2})).runs
    return run


@pytest.fixture
def fake_torchrun(tmp_path, run, monkeypatch):
    """The fake torchrun, in place of the real one; its notes go to ``tmp_path / "fake"``."""
    out = tmp_path / "fake"
    out.mkdir()
    script = tmp_path / "bin" / "torchrun"
    script.parent.mkdir()
    script.write_text(FAKE_TORCHRUN.format(python=sys.executable, out=str(out), lock=str(lock_path(run.record)),
                                           variable=SWEEP_PID_VARIABLE, rank=RANK.format(out=str(out))))
    script.chmod(0o755)
    monkeypatch.setattr(torchrun, "torchrun_launcher", lambda: [str(script)])
    return out


def launch(run):
    ended = []
    outcomes = torchrun.launch_torchrun([run], lambda r: r.arguments(Path("results"), "cpu", overwrite=False),
                                        nproc_per_node=2, started=lambda r: None, finished=ended.append)
    assert outcomes == ended
    return outcomes[0]


def test_a_torchrun_run_another_live_process_holds_exits_75_and_starts_nothing(run, fake_torchrun):
    stale = run.record.with_name(f".{run.record.name}.0123abcd.tmp")
    run.record.parent.mkdir(parents=True)
    stale.write_text("{")  # the live holder's temporary file: not the launcher's to remove
    with run_lock(run.record):
        outcome = launch(run)
        assert outcome.status == "skipped" and outcome.exit_code == HELD_EXIT
        assert outcome.reason == held_message(run.record, f"pid {os.getpid()} on {HOST}")
    assert not (fake_torchrun / "torchrun.txt").exists()  # torchrun never started
    log = run.log.read_text()
    assert f": not started\nskipped: held by pid {os.getpid()} on {HOST}" in log and log.count("===") == 1
    assert stale.exists() and not run.record.exists()
    # The holder process alone, as the sweep starts it: the same refusal, the same exit code.
    with run_lock(run.record):
        held = subprocess.run(hold_command(["true"], run.record), capture_output=True, text=True)
    assert held.returncode == HELD_EXIT and f"skipped: held by pid {os.getpid()} on {HOST}" in held.stdout


def test_a_torchrun_run_holds_its_lock_while_torchrun_runs(run, fake_torchrun):
    run.record.parent.mkdir(parents=True)
    stale = run.record.with_name(f".{run.record.name}.0123abcd.tmp")
    stale.write_text("{")  # left by a killed attempt: removed under the lock
    outcome = launch(run)
    assert outcome.status == "done" and outcome.exit_code == 0, run.log.read_text()
    torchrun_pid, sweep_pid, lock_text, *argv = (fake_torchrun / "torchrun.txt").read_text().split("\n")
    holder_pid = int(run.log.read_text().split(" pid ", 1)[1].split(":", 1)[0])
    assert lock_text == f"pid {holder_pid} on {HOST}" and holder_pid not in (os.getpid(), int(torchrun_pid))
    assert sweep_pid == str(os.getpid())
    assert argv[:4] == ["--standalone", "--nproc-per-node=2", "-m", "vlpbench.sweep.torchrun_rank"]
    assert argv[4:8] == ["run", "--model", "random", "--task"] and "rsna_cls" in argv
    arguments = run.arguments(Path("results"), "cpu", overwrite=False)
    assert outcome.command == hold_command(torchrun.torchrun_command(arguments, 2), run.record)
    assert not stale.exists() and not lock_path(run.record).exists() and holder(run.record) is None


def test_a_failed_torchrun_run_is_reported_failed_with_its_log(run, fake_torchrun, monkeypatch):
    monkeypatch.setenv("FAKE_TORCHRUN_EXIT", "3")
    outcome = launch(run)
    assert outcome.status == "failed" and outcome.exit_code == 3 and outcome.reason == "exit code 3"
    assert "exit code 3 after" in run.log.read_text() and holder(run.record) is None


def test_a_rank_started_after_its_sweep_died_runs_nothing(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    env = {**os.environ, SWEEP_PID_VARIABLE: dead.stdout.strip()}
    rank = [sys.executable, "-m", "vlpbench.sweep.torchrun_rank", "--version"]
    orphan = subprocess.run(rank, env=env, capture_output=True, text=True)
    assert orphan.returncode == 1 and orphan.stdout == ""
    alive = subprocess.run(rank, env={**env, SWEEP_PID_VARIABLE: str(os.getpid())}, capture_output=True, text=True)
    assert alive.returncode == 0 and alive.stdout.startswith("vlpbench ")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@linux_only
def test_kill_9_of_the_sweep_ends_the_holder_torchrun_and_its_ranks(run, fake_torchrun, tmp_path):
    # A stand-in sweep: it starts the holder as launch_torchrun does (its pid in the environment) and waits.
    sweep_code = ("import os, subprocess, sys; os.environ[sys.argv[1]] = str(os.getpid()); "
                  "subprocess.run(sys.argv[2:])")
    command = hold_command(torchrun.torchrun_command(["--version"], 2), run.record)
    with open(tmp_path / "sweep.out", "wb") as out:
        sweep = subprocess.Popen([sys.executable, "-c", sweep_code, SWEEP_PID_VARIABLE, *command],
                                 env={**os.environ, "FAKE_RANK_SECONDS": "60"}, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    pids = []
    try:
        _wait_for(lambda: (fake_torchrun / "rank.pid").exists(), 20, (tmp_path / "sweep.out").read_text())
        torchrun_pid = int((fake_torchrun / "torchrun.txt").read_text().split("\n")[0])
        rank_pid = int((fake_torchrun / "rank.pid").read_text())
        holder_pid = int(holder(run.record).split()[1])
        pids = [holder_pid, torchrun_pid, rank_pid]
        assert os.getsid(rank_pid) != os.getsid(torchrun_pid)  # out of reach of a process-group kill

        os.kill(sweep.pid, signal.SIGKILL)  # the sweep alone
        sweep.wait()
        _wait_for(lambda: all(map(_gone, pids)), 5, "the holder, torchrun or a rank outlived the sweep")
        _wait_for(lambda: holder(run.record) is None, 5, "the killed run's lock is still held")
        assert not run.record.exists()
    finally:
        for pid in (sweep.pid, *pids):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
