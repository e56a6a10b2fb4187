"""Torch threads: --threads, else OMP_NUM_THREADS, else the process's CPU affinity (vlpbench.threads)."""

import logging
import os

import pytest
import torch

from vlpbench import threads
from vlpbench.cli import main
from vlpbench.errors import ConfigError
from vlpbench.results import environment
from vlpbench.threads import ThreadChoice, choose_threads, set_torch_threads, torch_threads


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """Restore torch's thread count and forget the logged choice; no OMP_NUM_THREADS unless a test sets it."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_logged", None)
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 64)  # a 64-core machine's default, above every mask below
    yield
    torch.set_num_threads(before)


def _affinity(monkeypatch, cpus):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus), raising=False)


def test_affinity_sets_the_count(monkeypatch):
    _affinity(monkeypatch, {0, 5, 9})  # e.g. a SLURM job given 3 of a node's cores
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert choose_threads() == ThreadChoice(3, "CPU affinity")
    assert set_torch_threads() == ThreadChoice(3, "CPU affinity") and torch.get_num_threads() == 3


def test_never_more_than_torchs_own_default(monkeypatch):
    _affinity(monkeypatch, range(16))  # 8 cores with two hyper-threads each
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 8)
    assert choose_threads() == ThreadChoice(8, "torch default, under the 16 of the CPU affinity")


def test_cpu_count_where_there_is_no_affinity_call(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert choose_threads() == ThreadChoice(5, "CPU count")
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert choose_threads() == ThreadChoice(1, "CPU count")


def test_omp_num_threads_is_respected_and_threads_wins(monkeypatch):
    _affinity(monkeypatch, range(8))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert set_torch_threads() == ThreadChoice(2, "OMP_NUM_THREADS") and torch.get_num_threads() == 2
    assert set_torch_threads(1) == ThreadChoice(1, "--threads") and torch.get_num_threads() == 1
    assert choose_threads(environ={"OMP_NUM_THREADS": " "}) == ThreadChoice(8, "CPU affinity")  # blank: unset


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4"])
def test_threads_below_one_or_not_an_integer_are_refused(value):
    with pytest.raises(ConfigError, match=rf"--threads {value!r}: expected a positive integer"):
        choose_threads(value)


@pytest.mark.parametrize("text", ["0", "two", "4,2", "-1"])
def test_a_bad_omp_num_threads_is_refused_by_name(text):
    with pytest.raises(ConfigError, match=rf"OMP_NUM_THREADS='{text}': expected a positive integer"):
        choose_threads(environ={"OMP_NUM_THREADS": text})


def test_the_choice_is_logged_once_and_recorded(monkeypatch, caplog):
    _affinity(monkeypatch, range(4))
    with caplog.at_level(logging.INFO, logger="vlpbench"):
        set_torch_threads()
        set_torch_threads()
        set_torch_threads(1)
    assert [r.getMessage() for r in caplog.records] == ["torch threads: 4 (CPU affinity)",
                                                       "torch threads: 1 (--threads)"]
    assert environment()["torch_threads"] == 1


@pytest.mark.parametrize("command", [
    ["run", "--model", "random", "--task", "siim_seg", "--frac", "1"],
    ["score", "--task", "siim_seg", "--predictions", "absent"],
    ["sweep", "--models", "random", "--tasks", "siim_seg", "--fracs", "1", "--seeds", "0", "--dry-run"],
])
def test_commands_refuse_threads_zero(command, capsys):
    assert main([*command, "--threads", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_the_block_runs_with_the_choice_and_the_callers_count_comes_back(monkeypatch):
    _affinity(monkeypatch, range(3))
    torch.set_num_threads(1)
    with torch_threads() as choice:
        assert choice == ThreadChoice(3, "CPU affinity") and torch.get_num_threads() == 3
        assert environment()["torch_threads"] == 3  # what a record written in the run says
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError), torch_threads(2):
        raise ValueError("the run failed")
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("command", [
    ["run", "--model", "random", "--task", "siim_seg", "--frac", "0.5"],  # a fraction the task does not allow
    ["score", "--task", "siim_seg", "--predictions", "absent", "--data-root", "absent"],
])
def test_run_and_score_set_threads_before_anything_else(command, caplog):
    # Each command stops at a user error, after setting the threads.
    with caplog.at_level(logging.INFO, logger="vlpbench"):
        assert main([*command, "--threads", "1"]) == 2
    assert "torch threads: 1 (--threads)" in caplog.text
