"""Torch threads: --threads, else OMP_NUM_THREADS, else the process's CPU affinity (vlpbench.threads)."""

import logging
import os

import numpy as np
import pytest
import torch

from vlpbench import threads
from vlpbench.cli import main
from vlpbench.errors import ConfigError
from vlpbench.results import environment
from vlpbench.protocols import detection, grounding
from vlpbench.threads import ThreadChoice, choose_threads, set_torch_threads, single_threaded, torch_threads


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


def test_single_threaded_sets_one_and_gives_the_count_back_also_after_an_error():
    torch.set_num_threads(2)
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError), single_threaded():
        raise ValueError("inside")
    assert torch.get_num_threads() == 2
    with single_threaded(False):
        assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 1


def test_single_threaded_as_a_decorator():
    @single_threaded()
    def count(fail: bool) -> int:
        if fail:
            raise RuntimeError("inside")
        return torch.get_num_threads()

    torch.set_num_threads(2)
    assert count(False) == 1 and count.__wrapped__(False) == 2 and torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        count(True)
    assert torch.get_num_threads() == 2


def _same(a, b) -> bool:
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _head_outputs(batch: int, size: int, n_classes: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3 * (detection.BOX_ATTRIBUTES + n_classes), size // s, size // s, generator=generator)
            for s in (32, 16, 8)]


def test_box_decoding_runs_on_one_thread_and_equals_its_result_on_two(monkeypatch):
    # 16 x 3 x 28² predictions at the finest scale: above torch's grain of 32768, so two threads split them.
    outputs, anchors = _head_outputs(16, 224, 3), detection.scaled_anchors(224)
    torch.set_num_threads(2)
    many = detection.decode_batch.__wrapped__(outputs, anchors, 224)
    one = detection.decode_batch(outputs, anchors, 224)
    assert _same(one, many) and one[0].shape == (16, 3 * (49 + 196 + 784), 4) and torch.get_num_threads() == 2
    seen = []
    decode = detection.decode
    monkeypatch.setattr(detection, "decode", lambda *a: (seen.append(torch.get_num_threads()), decode(*a))[1])
    detection.decode_batch(outputs, anchors, 224)
    assert seen == [1, 1, 1] and torch.get_num_threads() == 2


def test_yolo_targets_run_on_one_thread_and_equal_their_result_on_two(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    corners = [torch.rand(k, 2, generator=generator) * 120 for k in (1, 3, 0, 2) * 4]
    boxes = [torch.cat([c, c + 20 + torch.rand(len(c), 2, generator=generator) * 80], 1) for c in corners]
    labels = [torch.randint(0, 5, (len(b),), generator=generator) for b in boxes]
    anchors = detection.scaled_anchors(224)[2]
    torch.set_num_threads(2)
    arguments = (boxes, (28, 28), (8.0, 8.0), anchors, 0.5)
    many = detection.assign_targets.__wrapped__(*arguments, labels=labels, n_classes=5)
    one = detection.assign_targets(*arguments, labels=labels, n_classes=5)
    fields = ("positive", "ignore", "offsets", "log_sizes", "classes")
    assert _same([getattr(one, f) for f in fields], [getattr(many, f) for f in fields])
    assert int(one.positive.sum()) == 24 and one.classes.shape == (16, 3, 28, 28, 5)
    seen = []
    shape_iou = detection._shape_iou
    monkeypatch.setattr(detection, "_shape_iou", lambda *a: (seen.append(torch.get_num_threads()), shape_iou(*a))[1])
    detection.assign_targets(*arguments)
    assert seen == [1] and torch.get_num_threads() == 2


class _Masks:
    """Two 300 x 260 masks with one box each."""

    def mask(self, image_id: str) -> np.ndarray:
        mask = np.zeros((300, 260), dtype=np.uint8)
        mask[40:200, 30 + 50 * int(image_id):150] = 1
        return mask


@pytest.mark.parametrize("resolution, inside", [("fixed", 1), ("native", 2)])
def test_grounding_maps_on_one_thread_at_the_fixed_grid_only(monkeypatch, resolution, inside):
    config = {"eval_resolution": resolution, "eval_size": 224, "upsample": "bilinear", "normalize": "minmax"}
    queries = [grounding.Query(key, key, "text") for key in ("0", "1")]
    maps = {q.key: torch.rand(14, 14, generator=torch.Generator().manual_seed(int(q.key))) for q in queries}
    torch.set_num_threads(2)
    expected = [(grounding.prepare_heatmap(maps[q.key], t.shape, config), t)
                for q in queries for t in [grounding.truth_mask(_Masks(), q, config)]]
    seen = []
    truth_mask = grounding.truth_mask
    monkeypatch.setattr(grounding, "truth_mask", lambda *a: (seen.append(torch.get_num_threads()), truth_mask(*a))[1])
    between = []
    for (heat, truth), (want_heat, want_truth) in zip(grounding._pairs(maps, queries, _Masks(), config, "x", False),
                                                      expected, strict=True):
        between.append(torch.get_num_threads())  # the caller's count while it scores the pair
        assert np.array_equal(heat, want_heat) and np.array_equal(truth, want_truth)
    assert seen == [inside, inside] and between == [2, 2] and torch.get_num_threads() == 2
    assert expected[0][0].shape == ((224, 224) if resolution == "fixed" else (300, 260))
