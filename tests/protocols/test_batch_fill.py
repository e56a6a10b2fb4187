"""Inference batch sizes that fill the device (vlpbench.protocols.batch_fill): the probe's arithmetic on a
simulated device memory, the halving retry, and that every protocol's numbers do not depend on the inference
batch (segmentation's validation loss is still taken per protocol batch)."""

import math

import numpy as np
import pytest
import torch

from vlpbench import api
from vlpbench.errors import ConfigError
from vlpbench.protocols import SplitIds, batch_fill, detection, finetune, segmentation
from vlpbench.protocols.batch_fill import (
    MAX_AUTO_BATCH,
    MEMORY_SHARE,
    InferenceBatch,
    fitting_batch,
    inference_batch,
    probing,
    protocol_chunks,
    requested_size,
)
from vlpbench.tasks import load_task
from vlpbench.tasks.domains import OutOfDomain, check_option

CPU = torch.device("cpu")
MIB = 2**20


class SimulatedMemory:
    """A device whose passes take ``fixed + per_image * batch`` bytes, with ``capacity`` bytes available.

    The probe callable reports its batch through :meth:`use`, as a real forward pass would allocate.
    """

    def __init__(self, fixed: int, per_image: int, capacity: int, total: int | None = None, allocated: int = 0):
        self.fixed, self.per_image, self.capacity = fixed, per_image, capacity
        self._total, self._allocated = total or capacity, allocated
        self.probed: list[int] = []
        self.released = 0
        self._peak = 0

    def use(self, batch: int) -> None:
        self.probed.append(batch)
        self._peak = self.fixed + self.per_image * batch

    def available(self) -> int:
        return self.capacity

    def total(self) -> int:
        return self._total

    def allocated(self) -> int:
        return self._allocated

    def peak_of(self, run) -> int:
        self._peak = 0
        run()
        return self._peak

    def release(self) -> None:
        self.released += 1


def _auto(meter, *, limit=10_000, multiple_of=1, reserve_bytes=0, fallback=8):
    return inference_batch({"eval_batch_size": "auto"}, "eval_batch_size", device=CPU, fallback=fallback,
                           limit=limit, probe=meter.use, multiple_of=multiple_of, reserve_bytes=reserve_bytes,
                           meter=meter)


# --- the arithmetic ------------------------------------------------------------------------------------------

def test_the_fitting_batch_is_the_linear_extrapolation_capped_and_rounded():
    peaks = {2: 1000 + 2 * 100, 4: 1000 + 4 * 100}  # 100 bytes per image, 1000 fixed
    assert fitting_batch(peaks, 8000, limit=10_000) == 70  # (8000 - 1000) / 100
    assert fitting_batch(peaks, 8000, limit=10_000, multiple_of=16) == 64
    assert fitting_batch(peaks, 8000, limit=20) == 20  # no larger batch than the images call for
    assert fitting_batch(peaks, 8000, limit=20, multiple_of=8) == 24  # one batch of whole protocol batches
    assert fitting_batch(peaks, 1e12, limit=10**9) == MAX_AUTO_BATCH
    assert fitting_batch(peaks, 500, limit=100) == 1  # not even one image fits: one image, the retry decides
    assert fitting_batch(peaks, 500, limit=100, multiple_of=8) == 8  # never below the protocol batch


def test_auto_probes_two_sizes_on_first_use_and_fits_the_memory_share():
    meter = SimulatedMemory(fixed=300 * MIB, per_image=40 * MIB, capacity=20 * 2**30)
    batch = _auto(meter)
    assert meter.probed == []  # nothing is probed until a pass needs the size
    expected = math.floor((MEMORY_SHARE * 20 * 2**30 - 300 * MIB) / (40 * MIB))
    assert batch.size == expected == 402
    assert meter.probed == [2, 4]
    assert batch.size == expected and meter.probed == [2, 4]  # chosen once
    described = batch.describe()
    assert described["size"] == 402 and described["requested"] == "auto" and described["lowered_from"] == []
    assert "probed 40.0 MiB per image" in described["how"] and "20.0 GiB available" in described["how"]


def test_memory_the_run_will_keep_is_left_out_and_the_protocol_batch_divides_the_size():
    meter = SimulatedMemory(fixed=0, per_image=10 * MIB, capacity=10 * 2**30)
    reserve = 4 * 2**30
    batch = _auto(meter, reserve_bytes=reserve, multiple_of=16)
    budget = MEMORY_SHARE * 10 * 2**30 - reserve
    assert batch.size == (int(budget // (10 * MIB)) // 16) * 16 == 400
    assert "less 4.00 GiB reserved" in batch.describe()["how"]


def test_runs_sharing_a_gpu_plan_within_their_share_of_its_memory(monkeypatch):
    # 40 GiB device, 30 GiB free, this run holds 2 GiB; 4 runs share it: 10 - 2 = 8 GiB left to this one.
    meter = SimulatedMemory(fixed=0, per_image=10 * MIB, capacity=30 * 2**30, total=40 * 2**30,
                            allocated=2 * 2**30)
    monkeypatch.setenv("VLPBENCH_RUNS_PER_DEVICE", "4")
    batch = _auto(meter)
    assert batch.size == math.floor(MEMORY_SHARE * 8 * 2**30 / (10 * MIB)) == 655
    assert "8.0 GiB available to this run, one of 4 sharing the device" in batch.describe()["how"]
    monkeypatch.setenv("VLPBENCH_RUNS_PER_DEVICE", "1")
    assert _auto(meter).size == MAX_AUTO_BATCH  # alone: 80 % of the 30 GiB free
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("VLPBENCH_RUNS_PER_DEVICE", bad)
        with pytest.raises(ConfigError, match=rf"VLPBENCH_RUNS_PER_DEVICE='{bad}': expected a positive integer"):
            _auto(meter).size


def test_a_part_of_one_or_two_images_is_one_batch_without_a_probe():
    meter = SimulatedMemory(fixed=0, per_image=MIB, capacity=2**30)
    assert _auto(meter, limit=2).size == 2
    assert _auto(meter, limit=1, multiple_of=8).size == 8
    assert meter.probed == []


def test_on_a_cpu_auto_is_the_protocols_fallback_and_nothing_is_probed():
    probed = []
    batch = inference_batch({}, "eval_batch_size", device=CPU, fallback=16, limit=1000, probe=probed.append)
    assert (batch.size, batch.requested, batch.retry) == (16, "auto", False)
    assert batch.describe()["how"] == "cpu: the protocol's fallback" and probed == []


def test_a_set_integer_is_used_as_it_is_and_must_divide_by_the_protocol_batch():
    batch = inference_batch({"eval_batch_size": 48}, "eval_batch_size", device=CPU, fallback=8, limit=10,
                            probe=None, multiple_of=16)
    assert (batch.size, batch.how, batch.retry) == (48, "set", False)
    with pytest.raises(ConfigError, match=r"eval_batch_size=40: expected a multiple of 16"):
        inference_batch({"eval_batch_size": 40}, "eval_batch_size", device=CPU, fallback=8, limit=10, probe=None,
                        multiple_of=16)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "big", None])
def test_anything_but_a_positive_integer_or_auto_is_refused_naming_the_option(bad):
    with pytest.raises(ConfigError, match=r"feature_batch_size=.*expected an integer of at least 1 or 'auto'"):
        requested_size({"feature_batch_size": bad}, "feature_batch_size")


def test_the_tasks_default_to_auto_and_take_an_integer_or_auto_with_set():
    for name, key in (("siim_seg", "eval_batch_size"), ("rsna_det", "eval_batch_size"),
                      ("cxr14_ft", "eval_batch_size"), ("rsna_cls", "feature_batch_size")):
        task = load_task(name)
        assert task.resolve()[key] == "auto"
        assert task.resolve({key: 64})[key] == 64
        with pytest.raises(ConfigError, match=rf"--set {key}='big': expected an integer >= 1 or 'auto'"):
            task.resolve({key: "big"})
    with pytest.raises(OutOfDomain):
        check_option("segmentation", "eval_batch_size", 0)


# --- the retry -----------------------------------------------------------------------------------------------

def _fails_above(limit: int, seen: list[int]):
    def one_pass(size: int) -> str:
        seen.append(size)
        if size > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return f"done at {size}"
    return one_pass


def test_an_automatic_batch_that_runs_out_of_memory_is_halved_and_the_pass_run_again():
    meter = SimulatedMemory(fixed=0, per_image=MIB, capacity=200 * MIB)  # chooses 160
    batch = _auto(meter, multiple_of=8)
    seen: list[int] = []
    assert batch.run(_fails_above(50, seen)) == "done at 40"
    assert seen == [160, 80, 40] and batch.size == 40 and meter.released == 2
    assert batch.describe()["lowered_from"] == [160, 80]
    seen.clear()
    assert batch.run(_fails_above(50, seen)) == "done at 40" and seen == [40]  # later passes start there


def test_the_retry_stops_at_the_protocol_batch_and_a_set_size_is_never_retried():
    batch = _auto(SimulatedMemory(fixed=0, per_image=MIB, capacity=200 * MIB), multiple_of=8)
    seen: list[int] = []
    with pytest.raises(torch.cuda.OutOfMemoryError):
        batch.run(_fails_above(4, seen))
    assert seen == [160, 80, 40, 16, 8]  # 20 rounds down to 16; 8 = the protocol batch, which training runs
    fixed = InferenceBatch(64, size=64)
    seen.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fixed.run(_fails_above(4, seen))
    assert seen == [64]


# --- the probe's mode ----------------------------------------------------------------------------------------

def test_probing_runs_in_eval_mode_without_autograd_and_restores_every_modules_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Dropout())
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model stays frozen
    with probing(model):
        assert not any(m.training for m in model.modules())
        assert torch.is_inference_mode_enabled()
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_protocol_chunks_cover_a_forward_batch_in_protocol_batches():
    assert protocol_chunks(20, 8) == [slice(0, 8), slice(8, 16), slice(16, 20)]
    assert protocol_chunks(16, 16) == [slice(0, 16)]


# --- the protocols' numbers do not depend on the inference batch ---------------------------------------------

@pytest.fixture(scope="module")
def siim_tiny(siim_parts):
    return siim_parts("siim_seg", 16, 20, 20)


def _segment(siim_tiny, **changes):
    from segmentation_models_pytorch.encoders import get_encoder

    source, split = siim_tiny
    config = {**load_task("siim_seg").config, "image_size": 32, "batch_size": 4, "max_epochs": 2, "patience": 2,
              "bootstrap_resamples": 10, "dice_resolution": "input", "balance_negatives": False, **changes}
    torch.manual_seed(0)
    encoder = get_encoder("resnet18", weights=None, depth=5)
    torch.manual_seed(1)  # the decoder's initialisation
    return segmentation.run_segmentation(encoder, source, split, config, seed=0, device=CPU, progress=False,
                                         encoder_name="resnet18")


def test_segmentation_scores_the_same_whatever_the_inference_batch(siim_tiny, monkeypatch):
    at_protocol = _segment(siim_tiny, eval_batch_size=4)
    assert at_protocol["training"]["inference_batch"] == {"size": 4, "requested": 4, "how": "set", "lowered_from": []}
    # The automatic size on a simulated device: one forward batch of all 20 images (a multiple of 4).
    meter = SimulatedMemory(fixed=0, per_image=MIB, capacity=2**30)
    probed = []
    real_probe = segmentation._probe
    monkeypatch.setattr(segmentation, "_probe", lambda *args: (probed.append(args[2]), meter.use(args[2]),
                                                               real_probe(*args)))
    monkeypatch.setattr(segmentation, "inference_batch",
                        lambda *args, **kwargs: inference_batch(*args, **kwargs, meter=meter))
    automatic = _segment(siim_tiny)
    assert probed == [2, 4]  # the real model ran on blank images of those sizes
    assert automatic["training"]["inference_batch"]["size"] == 20
    assert "probed 1.0 MiB per image" in automatic["training"]["inference_batch"]["how"]
    for other in (automatic, _segment(siim_tiny, eval_batch_size=12)):
        # The loss is taken per 4 images whatever the forward batch: the same to float rounding.
        for a, b in zip(at_protocol["training"]["history"], other["training"]["history"]):
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
            assert b["train_loss"] == a["train_loss"]
        assert list(other["per_image"]) == list(at_protocol["per_image"])
        np.testing.assert_allclose(list(other["per_image"].values()), list(at_protocol["per_image"].values()),
                                   atol=1e-6)


def test_segmentation_refuses_an_inference_batch_that_splits_a_protocol_batch(siim_tiny):
    with pytest.raises(ConfigError, match=r"eval_batch_size=6: expected a multiple of 4"):
        _segment(siim_tiny, eval_batch_size=6)


def _tiny_detection_part(ids, size, desc):
    rng = np.random.default_rng({"train": 0, "val": 1, "test": 2}[desc])
    truths = [np.array([[8.0, 8.0, 40.0, 48.0]]) + rng.integers(0, 16, 4) for _ in ids]

    class Part:
        def __len__(self):
            return len(ids)

    part = Part()
    part.ids, part.truths = list(ids), truths
    part.images = torch.from_numpy(rng.integers(0, 256, (len(ids), size, size), dtype=np.uint8))
    part.truth_labels = [np.zeros(1, np.int64) for _ in truths]
    part.scales = np.ones((len(ids), 2))
    part.targets = [torch.from_numpy(t).float() for t in truths]
    part.target_labels = [torch.zeros(1, dtype=torch.long)] * len(ids)
    return part


@pytest.mark.parametrize("cache_gb", [1.0, 0.0])  # features kept in memory, or in a float16 file
def test_detection_scores_the_same_whatever_the_inference_batch(monkeypatch, cache_gb):
    from segmentation_models_pytorch.encoders import get_encoder

    monkeypatch.setattr(detection, "DetectionImages",
                        lambda source, ids, size, config, desc, progress: _tiny_detection_part(ids, size, desc))
    ids = [f"img{k}" for k in range(40)]
    split = SplitIds(ids[:16], ids[16:28], ids[28:], fraction=1.0)

    def run(**changes):
        config = load_task("rsna_det").resolve({"image_size": 64, "neck_width": 16, "max_epochs": 2, "batch_size": 4,
                                                "bootstrap_resamples": 10, "conf_threshold": 0.0,
                                                "feature_cache_gb": cache_gb, **changes})
        torch.manual_seed(0)
        encoder = get_encoder("resnet18", weights=None, depth=4)
        return detection.run_detection(encoder, None, split, config, seed=0, device=CPU, progress=False)

    small, large = run(eval_batch_size=4), run(eval_batch_size=12)
    assert (small["training"]["inference_batch"]["size"], large["training"]["inference_batch"]["size"]) == (4, 12)
    assert run()["training"]["inference_batch"]["size"] == 4  # auto on a CPU: the training batch
    for a, b in zip(small["training"]["history"], large["training"]["history"]):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert large["metrics"]["map"] == pytest.approx(small["metrics"]["map"], abs=1e-6)


def test_finetuning_scores_the_same_whatever_the_inference_batch(tmp_path):
    from tests.protocols.test_finetune import FAST, TinyAdapter

    api.synth("cxr14", tmp_path / "cxr14", n=60, size=64, progress=False)
    spec = load_task("cxr14_ft")
    source = api.open_dataset(spec, tmp_path / "cxr14")
    split, _ = api.task_splits(spec, source)
    ids = SplitIds(*(api.split_ids(split, part, source)[0] for part in ("train", "val", "test")), fraction=1.0)

    def run(**changes):
        config = spec.resolve({**FAST, "max_epochs": 2, "batch_size": 8, **changes})
        return finetune.run_finetune_task(TinyAdapter(), source, ids, config, seed=0, device=CPU, progress=False)

    small, large = run(eval_batch_size=3), run(eval_batch_size=64)
    assert large["training"]["inference_batch"]["size"] == 64
    assert run()["training"]["inference_batch"]["size"] == 8
    for a, b in zip(small["training"]["history"], large["training"]["history"]):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
        assert b["train_loss"] == a["train_loss"]
    assert large["metrics"] == pytest.approx(small["metrics"], abs=1e-6)


def test_on_cuda_the_allocators_statistics_are_read(monkeypatch):
    """The CUDA meter's wiring, with torch.cuda's statistics simulated (no GPU here): free memory plus the
    allocator's cached free blocks is what is available, the peak is read above what was allocated before."""
    state = {"allocated": 1 * 2**30, "peak": 0}
    gib = 2**30

    def run_probe(count):  # a pass that allocates 64 MiB per image at its peak
        state["peak"] = state["allocated"] + count * 64 * MIB

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (20 * gib, 80 * gib))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["allocated"]))
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "get_device_properties", lambda device=None: type("P", (), {"total_memory": 80 * gib}))
    device = torch.device("cuda", 0)
    meter = batch_fill.CudaMemory(device)
    assert meter.available() == 22 * gib and meter.total() == 80 * gib and meter.allocated() == gib
    batch = inference_batch({}, "eval_batch_size", device=device, fallback=8, limit=10_000, probe=run_probe)
    assert batch.size == int(MEMORY_SHARE * 22 * gib // (64 * MIB)) == 281
    assert batch.retry and "cuda: probed 64.0 MiB per image, 80% of 22.0 GiB available" in batch.how


def test_a_probe_that_runs_out_of_memory_falls_back_to_the_protocol_batch_and_frees_the_cache():
    class FullDevice(SimulatedMemory):
        def peak_of(self, run):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    meter = FullDevice(fixed=0, per_image=MIB, capacity=MIB)
    batch = _auto(meter, fallback=16, multiple_of=8)
    assert batch.size == 16 and batch.retry and meter.released == 1
    assert batch.how == "cpu: the probe ran out of memory, so the protocol's fallback"
